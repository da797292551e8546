"""``dpt-jax`` command line: ``dpt-jax <command> [flags]``.

    dpt-jax train --config configs/probe_tiny.py --workdir W [--config.key=value ...]
    dpt-jax pretrain --config configs/pretrain_shapes.py --workdir W --out DIR
    dpt-jax generate --checkpoint W --prompt "a red square" --out OUT
    dpt-jax export --checkpoint W --out DIR [--merged]
    dpt-jax precompute --config configs/probe_sd21.py --out DIR [--split train] [--config.key=value ...]
    dpt-jax evaluate --task itm|rec|t2i --run NAME=W [--run NAME=W ...] --out DIR
    dpt-jax bench [--tiny]
    dpt-jax demo [--out OUT] [--quick]
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional


# What a bad input raises (a missing file or directory, an output in the way, a wrong value, shape
# or config key): the command stops with its message, which names the input, not a traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError)


HELP_FLAGS = ("-h", "--help", "--helpshort")


def _asks_for_help(argv: List[str]) -> bool:
    return any(arg in HELP_FLAGS for arg in argv[1:])


def run_app(main: Callable[[List[str]], None], argv: List[str]) -> None:
    """absl's ``app.run`` for a command whose flags are defined, with: ``--help`` listing them
    (absl lists only the flags of the program's main module, none of ours); a ``--config`` file
    that does not exist named at once (ml_collections would raise an OSError at its first use,
    deep in the run); an override of a key the config lacks (``--config.no_such_key=1``) named
    as a bad input (ml_collections raises it from inside absl's flag parser as an
    ``AttributeError``, which absl would let through as a traceback)."""
    from absl import app, flags
    if _asks_for_help(argv):
        _print_help(argv[0])
        raise SystemExit(0)
    _check_config_file(argv)
    try:
        app.run(main, argv=argv)
    except (AttributeError, KeyError) as error:
        if flags.FLAGS.is_parsed():  # raised by the command itself, after parsing: not a bad flag
            raise
        raise ValueError(_unknown_config_key(error, argv)) from None


def _print_help(program: str) -> None:
    from absl import flags
    print(f"usage: {program} --flag=value ...\n")
    for module in sorted(flags.FLAGS.flags_by_module_dict()):
        if not module.startswith("absl."):  # ours: defined in dpt_jax (or its __main__)
            print(flags.FLAGS.module_help(module).strip().split("\n", 1)[1])  # without the module's name
    print("\n  --config.KEY=VALUE: overrides a key of the config (an unknown key is an error)."
          "\n  --helpfull: absl's flags too.")


def _check_config_file(argv: List[str]) -> None:
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg[len("--config="):] if arg.startswith("--config=") else None)
        path = value.split(":")[0] if value else None  # config_flags reads "FILE:ARGUMENT"
        if path and not os.path.isfile(path):
            raise FileNotFoundError(f"--config {path}: no such file (expected a get_config() file, "
                                    "e.g. configs/probe_tiny.py)")


def _unknown_config_key(error: BaseException, argv: List[str]) -> str:
    while error.args and isinstance(error.args[0], BaseException):  # AttributeError(KeyError(text))
        error = error.args[0]
    lines = str(error.args[0] if error.args else error).strip("'\"").splitlines()
    key = lines[0].strip("'\"") if lines else "?"
    names = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
    flag = next((name for name in names if key in name.split(".")[1:]), "--config." + key)
    return "; ".join([f"{flag}: the config has no key {key!r}"] + [line.strip() for line in lines[1:]])


def _train(argv: List[str]) -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Path to a get_config() file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard.")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(_):
        from absl import logging
        logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
        _join_processes()
        from dpt_jax.train import train
        train(flags.FLAGS.config, flags.FLAGS.workdir)

    run_app(main, argv)


def _join_processes() -> None:
    """Multi-host runs: join the other processes before any JAX work (dpt_jax/distributed.py)."""
    from dpt_jax import distributed
    distributed.initialize()


def _lazy(module: str, function: str = "main", multi_process: bool = False) -> Callable[[List[str]], None]:
    def run(argv: List[str]) -> None:
        import importlib
        if multi_process and not _asks_for_help(argv):
            _join_processes()
        getattr(importlib.import_module(module), function)(argv[1:])
    return run


COMMANDS: Dict[str, Callable[[List[str]], None]] = {
    "train": _train,
    "pretrain": _lazy("dpt_jax.pretrain"),
    "generate": _lazy("dpt_jax.generate", multi_process=True),
    "export": _lazy("dpt_jax.export"),
    "bench": _lazy("dpt_jax.bench"),
    "demo": _lazy("dpt_jax.demo"),
    "evaluate": _lazy("dpt_jax.evaluate_cli"),
    "precompute": _lazy("dpt_jax.precompute", multi_process=True),
}


def use_compilation_cache() -> None:
    """XLA compilations persist across runs (``$DPT_JAX_XLA_CACHE``, default ~/.cache/dpt_jax/xla)."""
    import jax
    path = os.environ.get("DPT_JAX_XLA_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dpt_jax", "xla"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: Optional[List[str]] = None) -> None:
    try:
        _run(list(sys.argv if argv is None else argv))
    except BrokenPipeError:
        # The reader went away (`dpt-jax train --help | head`): stop quietly, as a command killed by
        # SIGPIPE would; stdout goes to devnull so that Python's flush at exit does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def _run(argv: List[str]) -> None:
    if len(argv) < 2 or argv[1] not in COMMANDS:
        if len(argv) >= 2 and argv[1] not in ("-h", "--help"):
            print(f"dpt-jax: unknown command {argv[1]!r}\n")
        print(__doc__.strip())
        print(f"\ncommands: {', '.join(COMMANDS)}")
        raise SystemExit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help") else 2)
    command = argv[1]
    use_compilation_cache()
    try:
        COMMANDS[command]([f"dpt-jax {command}"] + argv[2:])
    except USER_ERRORS as e:
        raise SystemExit(f"dpt-jax {command}: {e}") from None


if __name__ == "__main__":
    main()
