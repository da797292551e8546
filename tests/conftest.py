import os

from dpt_jax.cli import use_compilation_cache

# Many tests compile the same tiny programs (in-process and in subprocesses): share compilations.
use_compilation_cache()

# The files that take longest on 2 CPU cores, longest first (seconds each in a full run, 2 workers:
# test_train ~700, test_multihost ~300, test_unet_vae_parity, test_pretrain_demo, test_sampler,
# test_lora ~200 to 250). `--dist loadfile` hands each worker whole files in collection order, which
# pytest-xdist sorts by the number of tests unless told not to: test_pretrain_demo's two tests
# (~4 min) came last and ran while the other worker sat idle. Longest first, the workers end together.
LONGEST_FIRST = ("test_train.py", "test_multihost.py", "test_unet_vae_parity.py", "test_pretrain_demo.py",
                 "test_sampler.py", "test_lora.py", "test_bench.py", "test_export.py", "test_evaluate.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's reordering by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)  # stable: the tests of a file keep their order
