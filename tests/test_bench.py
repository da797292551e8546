"""``dpt-jax bench --tiny``: every measurement runs, reports the anchor's keys, compiles once."""
import json
import math
import os
import subprocess
import sys

import pytest

from dpt_jax.testing import cpu_process_env

# The keys of shared/bench/torch_dpt_reference.py's lines: both sides can be put side by side.
ANCHOR_KEYS = {"impl", "device", "batch", "shapes", "what", "median_s", "min_s"}


def test_bench_tiny_lines(tmp_path):
    # A fresh process: --tiny's XLA flags act only before jax starts; the CLI shares the
    # persistent compilation cache with the other tests.
    env = cpu_process_env()
    # A flag of the caller's (one that changes no program nor the compilation cache's key): the
    # lines say which XLA flags they were measured with.
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), "--xla_dump_hlo_as_text=false"]))
    run = subprocess.run([sys.executable, "-m", "dpt_jax.cli", "bench", "--tiny", "--batch", "2",
                          "--profile", str(tmp_path), "--profile-runs", "2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    every_line = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    lines = [x for x in every_line if x["what"] != "profile"]
    check_profiles([x for x in every_line if x["what"] == "profile"], tmp_path)
    assert [(x["what"], x.get("eta")) for x in lines] == [
        ("tune_step", None), ("probe_step", None), ("sample", 0.0), ("sample", 0.5)]
    for x in lines:
        unit = "images_per_s" if x["what"] == "sample" else "samples_per_s"
        assert ANCHOR_KEYS | {unit, "compile_s", "mfu", "steady_s", "steady_mfu", "tflop", "xla_tflop"} <= set(x), x
        assert (x["impl"], x["device"], x["shapes"], x["batch"]) == ("dpt-jax", "cpu", "tiny", 2)
        assert x["triton_gemm"] is False  # dpt_jax.parallel.XLA_OPTIONS' default
        assert x["xla_flags"] == env["XLA_FLAGS"], x  # the caller's, not --tiny's
        for key in ("median_s", "min_s", "steady_s", unit, "compile_s", "tflop", "xla_tflop", "memory_gb"):
            assert math.isfinite(x[key]) and x[key] > 0, (key, x)
        assert x["min_s"] <= x["median_s"]
        assert x["mfu"] is None and x["steady_mfu"] is None  # no known peak on a CPU
        # Compiled once, before timing: no recompilation across the timed iterations.
        assert x["recompiles"] == 0 and x["cache_size"] == 1, x
    assert lines[3]["tflop"] > lines[2]["tflop"]  # self-correction adds a gradient per step


def check_profiles(profiles, directory):
    """Each measurement's profile: its device time joined to the HLO, and the passes the method
    needs, no more: stage 1 and plain sampling run no U-Net backward, stage 2 and the self-correction do."""
    from dpt_jax import profiling
    assert [x["measurement"] for x in profiles] == ["tune_step_b2", "probe_step_b2", "sample_b2_eta0.0",
                                                     "sample_b2_eta0.5"]
    unet_backward = {}
    for x in profiles:
        assert x["device_ms"] > 0 and x["kernels"] > 0 and x["wall_ms"] > 0, x
        assert x["joined"] >= 0.99, x  # a CPU trace names every thunk's HLO op
        assert abs(sum(x["by_category_ms"].values()) - x["device_ms"]) <= 0.01 * x["device_ms"]
        assert x["by_category_ms"]["conv"] > 0  # the U-Net's convolutions
        # The files reproduce the line (the same events and HLO, read back from disk); every scope.
        assert x["runs"] == 2, x  # figures per run of the two traced
        again = profiling.main([str(directory / f"{x['measurement']}.xplane.pb.gz"),
                                str(directory / f"{x['measurement']}.hlo.txt.gz"), "--top", "100000", "--runs", "2"])
        assert again["device_ms"] == x["device_ms"] and again["kernels"] == x["kernels"]
        # The calling thread's dispatch: the step's call, and the device's first op within the run.
        assert again["host_ms"] == x["host_ms"], x
        call = [ms for name, ms in x["host_ms"].items() if name.startswith("PjitFunction(")]
        assert len(call) == 1 and 0 < call[0] <= x["wall_ms"], x
        assert [n for name, n in x["host_count"].items() if name.startswith("PjitFunction(")] == [1.0], x
        assert 0 <= x["first_op_ms"] <= x["wall_ms"], x
        unet_backward[x["measurement"]] = any(s.startswith("bwd UNet2DConditionModel/") for s in again["by_scope_ms"])
    assert unet_backward == {"tune_step_b2": True, "probe_step_b2": False, "sample_b2_eta0.0": False,
                             "sample_b2_eta0.5": True}


def test_model_flops_count_attention_as_its_matmuls():
    # The MFU numerator: on a GPU, cuDNN's fused attention is one opaque call; model_flops traces
    # XLA attention, whose two matmuls are 2 * 2 * B * H * Lq * Lk * D flops.
    import jax.numpy as jnp
    from dpt_jax.bench import model_flops
    from dpt_jax.models.attention import attention
    b, lq, lk, h, d = 2, 64, 48, 4, 16
    q, k, v = jnp.ones((b, lq, h, d)), jnp.ones((b, lk, h, d)), jnp.ones((b, lk, h, d))
    assert model_flops(lambda q, k, v: attention(q, k, v), (q, k, v)) == 2 * 2 * b * h * lq * lk * d


def test_model_flops_of_convolutions_gradients_and_loops():
    import jax
    import jax.numpy as jnp
    from dpt_jax.bench import model_flops
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 5))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    forward = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)  # per output element, a dot over the 3x3x3 window
    assert model_flops(conv, (x, w)) == forward
    # Backward: the input's gradient and the kernel's, each as costly as the forward.
    assert model_flops(jax.grad(lambda x, w: conv(x, w).sum(), argnums=(0, 1)), (x, w)) == 3 * forward

    def body(i, c):
        return conv(c, w)[..., :3]
    assert model_flops(lambda x: jax.lax.fori_loop(0, 7, body, x), (x,)) == 7 * forward  # a scan: its length
    steps = jnp.int32(7)  # a traced bound: a while loop, counted loop_steps times
    assert model_flops(lambda x, n: jax.lax.fori_loop(0, n, body, x), (x, steps), loop_steps=7) == 7 * forward


def test_report_mfu_from_both_timings(capsys):
    from dpt_jax.bench import Timing, report
    line = report({"impl": "dpt-jax"}, "tune_step", 4, "samples_per_s", Timing(0.5, 0.4, 0.25, 0), 30.0,
                  flops=1e12, peak=1e13, executables=1)
    assert (line["samples_per_s"], line["mfu"], line["steady_mfu"], line["tflop"]) == (8.0, 0.2, 0.4, 1.0)
    assert json.loads(capsys.readouterr().out) == line


@pytest.fixture
def bench_in_process(monkeypatch):
    """``bench.main`` in this process: ``--tiny`` adds its XLA flags to the environment (for a backend
    not yet started), where they must not stay for the child processes of this worker's later tests."""
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    from dpt_jax import bench
    return bench.main


def test_bench_attention_lines(bench_in_process):
    # On this CPU only XLA's attention runs (timed at every shape, within bf16 rounding of float32);
    # cuDNN's and Pallas' variants say why they do not.
    from dpt_jax import bench
    lines = bench_in_process(["--tiny", "--what", "attention", "--batch", "2", "--iters", "1"])
    kinds = [kind for kind, _, _ in bench.unet_attention_shapes(bench.bench_shapes(True), 2)]
    assert kinds == ["self_16", "cross_16"]  # the tiny U-Net: one cross-attention level, 4x4 latents
    assert [(x["kind"], x["implementation"]) for x in lines] == [
        (kind, implementation) for kind in kinds
        for implementation, _ in bench.attention_variants(kind.startswith("self"))]
    assert {x["implementation"] for x in lines} == {"cudnn", "xla", "pallas_mgpu"}
    for x in lines:
        if x["implementation"] == "xla":
            assert x["fwd_tflops"] > 0 and x["fwd_bwd_tflops"] > 0 and x["fwd_bwd_ms"] > 0, x
            assert 0 < x["max_abs_err"] < 0.02, x
        else:
            assert "error" in x and "fwd_ms" not in x, x


def test_model_flops_count_lora_factored():
    # Training merges LoRA into the kernel (one matmul; its backward computes the kernel-sized
    # gradient x^T dy). Model flops count the factored form's: x W, x A, (x A) B, and the
    # backward's dy B^T, (x A)^T dy, x^T (dy B^T) - no kernel-sized gradient.
    import jax
    import jax.numpy as jnp
    from dpt_jax.bench import jaxpr_flops, model_flops
    from dpt_jax.models.layers import Linear
    m, k, n, r = 64, 32, 48, 4
    layer, x = Linear(n, use_bias=False), jnp.ones((m, k))
    params = layer.init(jax.random.PRNGKey(0), x)["params"]

    def loss(a, b):
        return layer.apply({"params": params, "lora": {"lora_A": a, "lora_B": b}}, x).sum()
    grad = jax.grad(loss, argnums=(0, 1))
    args = (jnp.ones((k, r)), jnp.ones((r, n)))
    factored = 2 * m * k * n + 2 * m * k * r + 2 * m * r * n + 2 * m * n * r + 2 * r * m * n + 2 * k * m * r
    merged = 2 * k * r * n + 2 * m * k * n + 2 * m * k * n + 2 * k * n * r + 2 * r * k * n
    def traced_flops():
        return jaxpr_flops(jax.make_jaxpr(grad)(*args).jaxpr)
    assert traced_flops() == merged  # what runs
    assert model_flops(grad, args) == factored  # not handed the cached merged trace of ``grad``
    assert traced_flops() == merged  # nor did it leave its factored trace behind


def test_steps_per_call_and_remat_report_one_steps_model_figures(bench_in_process):
    # Two steps per compiled call, the U-Net recomputing its blocks (--remat): the line's times,
    # flops and samples are per step; tflop (and mfu) count the model's flops, the plain step's,
    # traced alone. XLA's cost analysis counts the loop's body (one step) once, recomputation
    # included: at least the remat jaxpr's count, not twice it (nor half the plain step's).
    import dataclasses
    import jax
    import jax.numpy as jnp
    from dpt_jax import bench
    (line,) = bench_in_process(["--tiny", "--what", "tune", "--batch", "2", "--iters", "1", "--steps-per-call", "2",
                                "--remat"])
    shapes = bench.bench_shapes(True)
    sd = bench.bench_sd(shapes, jnp.bfloat16)
    remat_fn, args = bench.step_program(dataclasses.replace(sd, unet=sd.unet.clone(remat=True)), shapes, "tune",
                                        2, "bfloat16", 0)
    plain = bench.model_flops(bench.step_function(sd, shapes, "tune", 2, "bfloat16"), args)
    recomputed = bench.model_flops(remat_fn, args)
    assert line["steps_per_call"] == 2 and line["remat"] and line["recompiles"] == 0
    assert line["tflop"] == bench._tflop(plain) < bench._tflop(recomputed) <= line["xla_tflop"], (line, recomputed)
    assert line["xla_tflop"] <= 1.5 * bench._tflop(recomputed), (line, recomputed)
    assert abs(line["samples_per_s"] * line["median_s"] - 2) < 1e-3 * 2  # batch 2 per step
    # The program's memory holds at least its arguments (one step's batch here, two steps' there).
    assert sum(x.nbytes for x in jax.tree.leaves(args)) <= line["memory_gb"] * 1e9 * 1.001, line
