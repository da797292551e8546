"""``dpt-jax bench --tiny``: every measurement runs, reports the anchor's keys, compiles once."""
import json
import math
import subprocess
import sys

from dpt_jax.testing import cpu_process_env

# The keys of shared/bench/torch_dpt_reference.py's lines: both sides can be put side by side.
ANCHOR_KEYS = {"impl", "device", "batch", "shapes", "what", "median_s", "min_s"}


def test_bench_tiny_lines(tmp_path):
    # A fresh process: --tiny's XLA flags act only before jax starts; the CLI shares the
    # persistent compilation cache with the other tests.
    env = cpu_process_env()
    run = subprocess.run([sys.executable, "-m", "dpt_jax.cli", "bench", "--tiny", "--batch", "2",
                          "--profile", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    every_line = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    lines = [x for x in every_line if x["what"] != "profile"]
    check_profiles([x for x in every_line if x["what"] == "profile"], tmp_path)
    assert [(x["what"], x.get("eta")) for x in lines] == [
        ("tune_step", None), ("probe_step", None), ("sample", 0.0), ("sample", 0.5)]
    for x in lines:
        unit = "images_per_s" if x["what"] == "sample" else "samples_per_s"
        assert ANCHOR_KEYS | {unit, "compile_s", "mfu", "tflop", "xla_tflop"} <= set(x), x
        assert (x["impl"], x["device"], x["shapes"], x["batch"]) == ("dpt-jax", "cpu", "tiny", 2)
        for key in ("median_s", "min_s", unit, "compile_s", "tflop", "xla_tflop"):
            assert math.isfinite(x[key]) and x[key] > 0, (key, x)
        assert x["min_s"] <= x["median_s"]
        assert x["mfu"] is None  # no known peak on a CPU
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
        again = profiling.main([str(directory / f"{x['measurement']}.xplane.pb.gz"),
                                str(directory / f"{x['measurement']}.hlo.txt.gz"), "--top", "100000"])
        assert again["device_ms"] == x["device_ms"] and again["kernels"] == x["kernels"]
        unet_backward[x["measurement"]] = any(s.startswith("bwd UNet2DConditionModel/") for s in again["by_scope_ms"])
    assert unet_backward == {"tune_step_b2": True, "probe_step_b2": False, "sample_b2_eta0.0": False,
                             "sample_b2_eta0.5": True}


def test_model_flops_count_attention_as_its_matmuls():
    # The MFU numerator: on a GPU, cuDNN's fused attention counts 0 flops in XLA's analysis;
    # model_flops traces XLA attention, whose two matmuls are 2 * 2 * B * H * Lq * Lk * D flops.
    import jax.numpy as jnp
    from dpt_jax.bench import model_flops
    from dpt_jax.models.layers import attention
    b, lq, lk, h, d = 2, 64, 48, 4, 16
    q, k, v = jnp.ones((b, lq, h, d)), jnp.ones((b, lk, h, d)), jnp.ones((b, lk, h, d))
    matmuls = 2 * 2 * b * h * lq * lk * d
    flops = model_flops(lambda q, k, v: attention(q, k, v), (q, k, v))
    assert matmuls <= flops <= 1.1 * matmuls, (flops, matmuls)  # + the softmax's few flops per score
