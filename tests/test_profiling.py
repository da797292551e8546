"""Profile summaries on a GPU-like module and trace (the CPU path runs for real in test_bench.py)."""
from types import SimpleNamespace

import pytest

from dpt_jax import profiling

UNET = "jit(train_step)/while/body/closed_call/{}(UNet2DConditionModel)/down_blocks_0/attentions_0/transformer_blocks_0"
# The shapes of XLA GPU's optimised HLO: a loop fusion, a cuDNN attention call, a cuBLAS call, a
# Triton GEMM fusion (its dot inside), a layout-only fusion, a reduction and a loop.
HLO = f"""HloModule jit_train_step, is_scheduled=true

%fused_multiply (param_0: bf16[8,64]) -> bf16[8,64] {{
  %param_0 = bf16[8,64]{{1,0}} parameter(0)
  ROOT %multiply.1 = bf16[8,64]{{1,0}} multiply(%param_0, %param_0), metadata={{op_name="{UNET.format('jvp')}/norm1/mul"}}
}}

%triton_gemm (p0: bf16[64,64], p1: bf16[64,64]) -> bf16[64,64] {{
  %p0 = bf16[64,64]{{1,0}} parameter(0)
  %p1 = bf16[64,64]{{1,0}} parameter(1)
  ROOT %dot.5 = bf16[64,64]{{1,0}} dot(%p0, %p1), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}, metadata={{op_name="{UNET.format('jvp')}/ff/net_2/dot_general"}}
}}

%fused_transpose (param_0.2: bf16[8,64]) -> bf16[64,8] {{
  %param_0.2 = bf16[8,64]{{1,0}} parameter(0)
  ROOT %transpose.7 = bf16[64,8]{{0,1}} transpose(%param_0.2), dimensions={{1,0}}
}}

%region_add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}}

ENTRY %main.10 (Arg_0.1: bf16[8,64], Arg_1.2: bf16[64,64]) -> bf16[64,8] {{
  %Arg_0.1 = bf16[8,64]{{1,0}} parameter(0)
  %Arg_1.2 = bf16[64,64]{{1,0}} parameter(1)
  %loop_multiply_fusion = bf16[8,64]{{1,0}} fusion(%Arg_0.1), kind=kLoop, calls=%fused_multiply
  %custom-call.3 = (bf16[4,4096,5,64]{{3,2,1,0}}, u8[0]{{0}}) custom-call(%Arg_0.1, %Arg_0.1, %Arg_0.1), custom_call_target="__cudnn$fmhaSoftmaxBackward", metadata={{op_name="{UNET.format('transpose(jvp')})/attn1/dot_product_attention"}}
  %cublas-gemm.1 = (bf16[64,64]{{1,0}}, s8[1024]{{0}}) custom-call(%Arg_1.2, %Arg_1.2), custom_call_target="__cublas$gemm", metadata={{op_name="{UNET.format('jvp')}/attn1/to_q/dot_general"}}
  %gemm_fusion_dot.5 = bf16[64,64]{{1,0}} fusion(%Arg_1.2, %Arg_1.2), kind=kCustom, calls=%triton_gemm, backend_config={{"fusion_backend_config":{{"kind":"__triton_gemm"}}}}
  %reduce.4 = f32[8]{{0}} reduce(%Arg_0.1, %Arg_0.1), dimensions={{1}}, to_apply=%region_add
  ROOT %transpose_fusion = bf16[64,8]{{0,1}} fusion(%loop_multiply_fusion), kind=kInput, calls=%fused_transpose
}}
"""


def test_hlo_ops_categories_and_op_names():
    ops = profiling.hlo_ops(HLO)
    assert {name: ops[name].category for name in ("loop_multiply_fusion", "custom-call.3", "cublas-gemm.1",
                                                  "gemm_fusion_dot.5", "reduce.4", "transpose_fusion")} == {
        "loop_multiply_fusion": "elementwise", "custom-call.3": "attention", "cublas-gemm.1": "matmul",
        "gemm_fusion_dot.5": "matmul", "reduce.4": "reduce", "transpose_fusion": "copy"}
    # A fusion without metadata of its own takes its root's; the kernel's name ('-' and '.' as '_')
    # finds the same op.
    assert ops["gemm_fusion_dot.5"].op_name.endswith("/ff/net_2/dot_general")
    assert ops["custom_call_3"] == ops["custom-call.3"]
    assert ops["transpose_fusion"].op_name == ""
    # Bytes moved: results plus operands, each as big as its instruction's result; a library call's
    # workspace (the last tuple element of bytes) is not counted.
    assert ops["loop_multiply_fusion"].bytes == 2 * 8 * 64 * 2
    assert ops["custom-call.3"].bytes == 4 * 4096 * 5 * 64 * 2 + 3 * 8 * 64 * 2
    assert ops["cublas-gemm.1"].bytes == 64 * 64 * 2 + 2 * 64 * 64 * 2
    assert ops["reduce.4"].bytes == 8 * 4 + 2 * 8 * 64 * 2


@pytest.mark.parametrize("op_name, scope", [
    (UNET.format("transpose(jvp") + ")/attn1/dot_product_attention",
     "bwd UNet2DConditionModel/down_blocks_0/attentions_0"),
    (UNET.format("jvp") + "/norm1/mul", "fwd UNet2DConditionModel/down_blocks_0/attentions_0"),
    ("jit(denoise)/while/body/closed_call/UNet2DConditionModel/conv_in/conv_general_dilated",
     "fwd UNet2DConditionModel/conv_in"),
    ("", "fwd (no module)"),
])
def test_module_scope(op_name, scope):
    assert profiling.module_scope(op_name) == scope


def _event(name, ms, **stats):
    return SimpleNamespace(name=name, duration_ns=ms * 1e6, stats=list(stats.items()))


def _profile(*planes):
    return SimpleNamespace(planes=[SimpleNamespace(name=name, lines=[SimpleNamespace(name=n, events=e)
                                                                     for n, e in lines]) for name, lines in planes])


def test_device_events_read_the_device_not_the_host():
    gpu = _profile(("/host:CPU", [("python", [_event("PjitFunction(step)", 50.0, hlo_op="x")])]),
                   ("/device:GPU:0", [("Stream #13(Kernel,MemcpyD2D)", [_event("loop_multiply_fusion", 1.0,
                                                                                hlo_op="loop_multiply_fusion"),
                                                                         _event("nvjet_tst_128x256_h_bz", 2.0)]),
                                      ("CUPTI overhead", [_event("overhead", 9.0)])]))
    assert list(profiling.device_events(gpu)) == [("loop_multiply_fusion", "loop_multiply_fusion", 1e-3),
                                                  ("", "nvjet_tst_128x256_h_bz", 2e-3)]
    tpu = _profile(("/device:TPU:0", [("XLA Modules", [_event("jit_step", 5.0)]),
                                      ("XLA Ops", [_event("fusion.1", 3.0, hlo_op="fusion.1")])]))
    assert list(profiling.device_events(tpu)) == [("fusion.1", "fusion.1", 3e-3)]


def test_summarize_per_run_by_category_scope_and_kernel_name():
    ops = profiling.hlo_ops(HLO)
    # Inside a CUDA graph a kernel's instruction is the command buffer (not in the HLO): the kernel
    # joins by its name, a library kernel is classed by its name.
    one_run = [("command_buffer_3", "loop_multiply_fusion", 1e-3), ("custom-call.3", "sdpa_bprop", 4e-3),
               ("cublas-gemm.1", "nvjet_tst", 2e-3),
               ("command_buffer_3", "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 3e-3),
               ("", "cudnn_generated_fort_native_sdpa_sm90_knob_7", 0.5e-3),
               ("command_buffer_4", "void cudnn::fusion::compute_dot_do_o_specialized<true, 64>", 0.25e-3),
               ("command_buffer_4", "void cudnn::fusion::convert_dq_to_16bits<true>", 0.25e-3)]
    summary = profiling.summarize(one_run * 2, ops, runs=2)
    assert summary["device_ms"] == pytest.approx(11.0) and summary["kernels"] == 7
    assert summary["joined"] == pytest.approx(7.0 / 11.0, abs=1e-4)
    assert summary["by_category_ms"] == pytest.approx({"attention": 5.0, "matmul": 5.0, "elementwise": 1.0})
    assert summary["by_scope_ms"] == pytest.approx({
        "fwd UNet2DConditionModel/down_blocks_0/attentions_0": 3.0,
        "bwd UNet2DConditionModel/down_blocks_0/attentions_0": 4.0, "(not in the HLO)": 4.0})
    assert [(x["op"], x["ms"], x["calls"]) for x in summary["top_ops"][:2]] == [
        ("custom-call.3", 4.0, 1), ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 3.0, 1)]
    # Where the op is in the HLO: the MB a call moves and the TB/s that makes (10.49 MB in 4 ms).
    assert (summary["top_ops"][0]["mb"], summary["top_ops"][0]["tb_per_s"]) == (10.49, 0.002622)
    assert "mb" not in summary["top_ops"][1]  # a library kernel known only by its name
    # A kernel seen in one of the two runs (a first-step-only copy): half a call a run, not 0.
    summary = profiling.summarize(one_run * 2 + [("cublas-gemm.1", "nvjet_tst", 2e-3)], ops, runs=2)
    assert summary["kernels"] == 7.5 and {x["op"]: x["calls"] for x in summary["top_ops"]}["cublas-gemm.1"] == 1.5


def test_control_flow_is_not_counted_twice():
    # A CPU trace has the loop's event around its body's: only the body counts.
    hlo = HLO.replace("  %reduce.4", "  %while.2 = f32[8]{0} while(%Arg_0.1), condition=%region_add, "
                                     "body=%region_add\n  %reduce.4")
    summary = profiling.summarize([("while.2", "while.2", 5e-3), ("reduce.4", "reduce.4", 1e-3)],
                                  profiling.hlo_ops(hlo))
    assert summary["device_ms"] == pytest.approx(1.0) and summary["by_category_ms"] == {"reduce": 1.0}


def test_cli_names_a_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        profiling.main([str(tmp_path / "none.xplane.pb"), str(tmp_path / "none.hlo.txt")])
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # figures are per run: zero runs divided by zero
        profiling.main([str(tmp_path / "none.xplane.pb"), str(tmp_path / "none.hlo.txt"), "--runs", "0"])
    assert "--runs 0: expected >= 1" in capsys.readouterr().err


# A loop whose body runs a fusion that reads its input only through a slice (GroupNorm's shift),
# a fusion that reads the same input whole, and a reduction with its reducer.
LOOP_HLO = """HloModule jit_denoise, is_scheduled=true

%fused_shift (p0: bf16[4,1024,320]) -> f32[4,320] {
  %p0 = bf16[4,1024,320]{2,1,0} parameter(0)
  %convert.1 = f32[4,1024,320]{2,1,0} convert(%p0)
  %slice.1 = f32[4,1,320]{2,1,0} slice(%convert.1), slice={[0:4], [0:1], [0:320]}
  ROOT %bitcast.1 = f32[4,320]{1,0} bitcast(%slice.1)
}

%fused_scale (p0.1: bf16[4,1024,320], p1.1: f32[4,320]) -> bf16[4,1024,320] {
  %p0.1 = bf16[4,1024,320]{2,1,0} parameter(0)
  %p1.1 = f32[4,320]{1,0} parameter(1)
  %slice.2 = bf16[4,1,320]{2,1,0} slice(%p0.1), slice={[0:4], [0:1], [0:320]}
  %broadcast.2 = bf16[4,1024,320]{2,1,0} broadcast(%slice.2), dimensions={0,1,2}
  ROOT %multiply.2 = bf16[4,1024,320]{2,1,0} multiply(%p0.1, %broadcast.2)
}

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.9 = f32[] add(%a, %b)
}

%body (state: (s32[], bf16[4,1024,320])) -> (s32[], bf16[4,1024,320]) {
  %state = (s32[], bf16[4,1024,320]{2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = bf16[4,1024,320]{2,1,0} get-tuple-element(%state), index=1
  %shift_fusion = f32[4,320]{1,0} fusion(%x), kind=kLoop, calls=%fused_shift
  %scale_fusion = bf16[4,1024,320]{2,1,0} fusion(%x, %shift_fusion), kind=kLoop, calls=%fused_scale
  %reduce.3 = f32[4]{0} reduce(%shift_fusion, %shift_fusion), dimensions={1}, to_apply=%region_add
  ROOT %tuple.4 = (s32[], bf16[4,1024,320]{2,1,0}) tuple(%i, %scale_fusion)
}

%cond (state.1: (s32[], bf16[4,1024,320])) -> pred[] {
  %state.1 = (s32[], bf16[4,1024,320]{2,1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%state.1), index=0
  %constant.5 = s32[] constant(50)
  ROOT %compare.6 = pred[] compare(%i.1, %constant.5), direction=LT
}

ENTRY %main.7 (Arg_0.1: bf16[4,1024,320]) -> (s32[], bf16[4,1024,320]) {
  %Arg_0.1 = bf16[4,1024,320]{2,1,0} parameter(0)
  %constant.8 = s32[] constant(0)
  %tuple.9 = (s32[], bf16[4,1024,320]{2,1,0}) tuple(%constant.8, %Arg_0.1)
  ROOT %while.10 = (s32[], bf16[4,1024,320]{2,1,0}) while(%tuple.9), condition=%cond, body=%body
}
"""


def test_hlo_traffic_counts_executed_ops_and_sliced_reads():
    x, stats, slice_f32 = 4 * 1024 * 320 * 2, 4 * 320 * 4, 4 * 320 * 4
    ops = profiling.hlo_ops(LOOP_HLO)
    assert ops["shift_fusion"].bytes == slice_f32 + stats  # x read through its slice only
    assert ops["scale_fusion"].bytes == x + stats + x  # x also read whole: counted whole
    traffic = profiling.hlo_traffic(LOOP_HLO)
    # The body's two fusions and reduction, and the loop condition's compare; not what runs inside
    # a fusion or reducer, nor parameters, tuples and the while itself.
    assert traffic["ops_by_category"] == {"elementwise": 2, "reduce": 1, "other": 1}
    moved = (slice_f32 + stats) + (2 * x + stats) + (4 * 4 + 2 * stats) + (1 + 4 + 4)
    assert traffic["memory_bound_bytes"] == moved
    assert traffic["memory_bound_ops"] == 4
    assert profiling.hlo_traffic(HLO)["by_category_gb"].keys() == {"elementwise", "attention", "matmul", "reduce",
                                                                    "copy"}


def test_hlo_traffic_per_loop_trip_spreads_what_runs_before_the_loop():
    # A copy before the loop, as the sampler lays out its frozen kernels once per call: per step of
    # a 50-step loop, the body once and a fiftieth of the copy.
    hlo = LOOP_HLO.replace(
        "%tuple.9 = (s32[], bf16[4,1024,320]{2,1,0}) tuple(%constant.8, %Arg_0.1)",
        "%copy.1 = bf16[4,1024,320]{1,2,0} copy(%Arg_0.1)\n"
        "  %tuple.9 = (s32[], bf16[4,1024,320]{2,1,0}) tuple(%constant.8, %copy.1)")
    x = 4 * 1024 * 320 * 2
    body = profiling.hlo_traffic(LOOP_HLO)["memory_bound_bytes"]
    assert profiling.hlo_traffic(hlo)["memory_bound_bytes"] == body + 2 * x
    per_step = profiling.hlo_traffic(hlo, loop_trips=50)
    assert per_step["memory_bound_bytes"] == body + round(2 * x / 50)
    assert per_step["memory_bound_ops"] == 4  # the body's; the copy is a fiftieth of one
    # A program without a loop is one call, whatever the trips.
    assert profiling.hlo_traffic(HLO, loop_trips=50) == profiling.hlo_traffic(HLO)


# Two fusions that each make a quarter of a row-normalised [8, 64] (the rows 2:4): one reduces
# each row (its last dimension) and needs only those rows of its input; the other reduces over the
# rows and needs them all.
ROOT_SLICE_HLO = """HloModule jit_step, is_scheduled=true

%region_add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%a, %b)
}

%fused_rows (p0: f32[8,64], p1: f32[64]) -> f32[2,64] {
  %p0 = f32[8,64]{1,0} parameter(0)
  %p1 = f32[64]{0} parameter(1)
  %zero = f32[] constant(0)
  %sum = f32[8]{0} reduce(%p0, %zero), dimensions={1}, to_apply=%region_add
  %sums = f32[8,64]{1,0} broadcast(%sum), dimensions={0}
  %scale = f32[8,64]{1,0} broadcast(%p1), dimensions={1}
  %out = f32[8,64]{1,0} divide(%p0, %sums)
  %scaled = f32[8,64]{1,0} multiply(%out, %scale)
  ROOT %slice.1 = f32[2,64]{1,0} slice(%scaled), slice={[2:4], [0:64]}
}

%fused_columns (p0.1: f32[8,64]) -> f32[2,64] {
  %p0.1 = f32[8,64]{1,0} parameter(0)
  %zero.1 = f32[] constant(0)
  %sum.1 = f32[64]{0} reduce(%p0.1, %zero.1), dimensions={0}, to_apply=%region_add
  %sums.1 = f32[8,64]{1,0} broadcast(%sum.1), dimensions={1}
  %out.1 = f32[8,64]{1,0} divide(%p0.1, %sums.1)
  ROOT %slice.2 = f32[2,64]{1,0} slice(%out.1), slice={[2:4], [0:64]}
}

ENTRY %main (x: f32[8,64], s: f32[64]) -> (f32[2,64], f32[2,64]) {
  %x = f32[8,64]{1,0} parameter(0)
  %s = f32[64]{0} parameter(1)
  %rows_fusion = f32[2,64]{1,0} fusion(%x, %s), kind=kCustom, calls=%fused_rows
  %columns_fusion = f32[2,64]{1,0} fusion(%x), kind=kLoop, calls=%fused_columns
  ROOT %tuple = (f32[2,64]{1,0}, f32[2,64]{1,0}) tuple(%rows_fusion, %columns_fusion)
}
"""


# GroupNorm's shift (the first position) of an up block's concatenated input, fused with the
# concatenation: each part is read through the slice only.
CONCAT_SLICE_HLO = """HloModule jit_denoise, is_scheduled=true

%fused_slice (p0: bf16[16,4096,320], p1: bf16[16,4096,320]) -> f32[16,1,640] {
  %p0 = bf16[16,4096,320]{2,1,0} parameter(0)
  %p1 = bf16[16,4096,320]{2,1,0} parameter(1)
  %concatenate.1 = bf16[16,4096,640]{2,1,0} concatenate(%p0, %p1), dimensions={2}
  %convert.1 = f32[16,4096,640]{2,1,0} convert(%concatenate.1)
  ROOT %slice.1 = f32[16,1,640]{2,1,0} slice(%convert.1), slice={[0:16], [0:1], [0:640]}
}

%fused_concat (p0.1: bf16[16,4096,320], p1.1: bf16[16,4096,320]) -> bf16[16,4096,640] {
  %p0.1 = bf16[16,4096,320]{2,1,0} parameter(0)
  %p1.1 = bf16[16,4096,320]{2,1,0} parameter(1)
  ROOT %concatenate.2 = bf16[16,4096,640]{2,1,0} concatenate(%p0.1, %p1.1), dimensions={2}
}

ENTRY %main (a: bf16[16,4096,320], b: bf16[16,4096,320]) -> (f32[16,1,640], bf16[16,4096,640]) {
  %a = bf16[16,4096,320]{2,1,0} parameter(0)
  %b = bf16[16,4096,320]{2,1,0} parameter(1)
  %shift_fusion = f32[16,1,640]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_slice
  %concat_fusion = bf16[16,4096,640]{2,1,0} fusion(%a, %b), kind=kLoop, calls=%fused_concat
  ROOT %tuple = (f32[16,1,640]{2,1,0}, bf16[16,4096,640]{2,1,0}) tuple(%shift_fusion, %concat_fusion)
}
"""


def test_a_slice_of_a_concatenation_reads_the_slice_of_each_part():
    ops = profiling.hlo_ops(CONCAT_SLICE_HLO)
    part, shift = 16 * 4096 * 320 * 2, 16 * 640 * 4
    assert ops["shift_fusion"].bytes == shift + 2 * shift  # at most the slice from each part
    assert ops["concat_fusion"].bytes == 2 * part + 2 * part  # the concatenation written: both read whole


def test_a_fusion_making_rows_of_a_slice_reads_only_those_rows():
    x, scale, out = 8 * 64 * 4, 64 * 4, 2 * 64 * 4
    ops = profiling.hlo_ops(ROOT_SLICE_HLO)
    assert ops["rows_fusion"].bytes == x // 4 + scale + out
    assert ops["columns_fusion"].bytes == x + out


# XLA's dynamic-slice fusion: a cuBLAS matmul that reads its weight at an offset of a packed
# [768, 256] buffer (the adapter's q, k, v projections) instead of a copy of the slice.
DYNAMIC_SLICE_HLO = """HloModule jit_step, is_scheduled=true

%dynamic-slice-fusion (p0: bf16[768,256], p1: bf16[1024,256]) -> (bf16[1024,256], s8[33554432]) {
  %p0 = bf16[768,256]{1,0} parameter(0)
  %p1 = bf16[1024,256]{1,0} parameter(1)
  %slice.1 = bf16[256,256]{1,0} slice(%p0), slice={[256:512], [0:256]}
  ROOT %custom-call.1 = (bf16[1024,256]{1,0}, s8[33554432]{0}) custom-call(%p1, %slice.1), custom_call_target="__cublas$lt$matmul"
}

ENTRY %main (w: bf16[768,256], x: bf16[1024,256]) -> (bf16[1024,256], s8[33554432]) {
  %w = bf16[768,256]{1,0} parameter(0)
  %x = bf16[1024,256]{1,0} parameter(1)
  ROOT %dynamic_slice_fusion = (bf16[1024,256]{1,0}, s8[33554432]{0}) fusion(%w, %x), kind=kCustom, calls=%dynamic-slice-fusion
}
"""


def test_a_fusion_around_a_library_call_is_that_call():
    # A matmul, not an elementwise op moving memory: its bytes are the slice it reads, its input
    # and output, not cuBLAS's workspace.
    op = profiling.hlo_ops(DYNAMIC_SLICE_HLO)["dynamic_slice_fusion"]
    assert op.category == "matmul"
    assert op.bytes == 256 * 256 * 2 + 2 * 1024 * 256 * 2
    assert profiling.hlo_traffic(DYNAMIC_SLICE_HLO)["memory_bound_bytes"] == 0


def test_host_calls_time_the_calling_threads_dispatch():
    # A traced call of a jitted program: the calling thread's 'PjitFunction' event, and the device's
    # first op after each call's start (the CPU's first thunk), within the calls' wall time.
    import jax
    import jax.numpy as jnp
    matmul = jax.jit(lambda x: jnp.sin(x) @ x)
    x = jnp.ones((256, 256))
    matmul(x).block_until_ready()
    trace, wall = profiling.capture(lambda: matmul(x), runs=2)
    host = profiling.host_calls(jax.profiler.ProfileData.from_serialized_xspace(trace), runs=2)
    assert 0 < host["host_ms"]["PjitFunction(<lambda>)"] <= wall * 1e3 / 2, (host, wall)
    assert 0 <= host["first_op_ms"] <= wall * 1e3 / 2, (host, wall)


def test_host_self_time_takes_nested_events_out_of_their_parents():
    from types import SimpleNamespace as NS

    def event(name, start_ms, end_ms):
        return NS(name=name, start_ns=int(start_ms * 1e6), duration_ns=int((end_ms - start_ms) * 1e6), stats=[])
    host = [event("PjitFunction(step)", 0, 100), event("ParseArguments", 1, 11), event("Execute", 20, 90),
            event("command_buffer_1", 30, 50), event("command_buffer::update", 31, 41),
            event("command_buffer_27", 60, 70), event("command_buffer::update", 61, 65)]
    device = [event("kernel", 25, 26)]
    profile = NS(planes=[NS(name="/host:CPU", lines=[NS(name="python3", events=host)]),
                         NS(name="/device:GPU:0", lines=[NS(name="Stream #1", events=device)])])
    calls = profiling.host_calls(profile)
    assert calls["host_self_ms"] == {"Execute": 40.0, "PjitFunction(step)": 20.0, "command_buffer_N": 16.0,
                                     "command_buffer::update": 14.0, "ParseArguments": 10.0}
    assert calls["host_ms"]["PjitFunction(step)"] == 100.0 and calls["host_ms"]["command_buffer::update"] == 14.0
    assert calls["host_count"] == {"Execute": 1, "PjitFunction(step)": 1, "command_buffer_N": 2,
                                   "command_buffer::update": 2, "ParseArguments": 1}
    assert profiling.host_calls(profile, runs=2)["host_count"]["command_buffer::update"] == 1  # per run
    assert calls["first_op_ms"] == 25.0


MUL_BODY = """
%fused_mul (p0: f32[1024,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  ROOT %m = f32[1024,1024]{1,0} multiply(%p0, %p0)
}
"""


def test_hlo_traffic_counts_the_ops_of_a_called_computation():
    # XLA:GPU wraps runs of kernels in command buffers, calls of a computation: their ops run
    # as the caller's (a fusion's body and a reducer's stay inside their instruction).
    direct = "HloModule jit_f, is_scheduled=true\n" + MUL_BODY + """
ENTRY %main (a: f32[1024,1024]) -> f32[1024,1024] {
  %a = f32[1024,1024]{1,0} parameter(0)
  ROOT %mul_fusion = f32[1024,1024]{1,0} fusion(%a), kind=kLoop, calls=%fused_mul
}
"""
    wrapped = "HloModule jit_f, is_scheduled=true\n" + MUL_BODY + """
%command_buffer (p: f32[1024,1024]) -> f32[1024,1024] {
  %p = f32[1024,1024]{1,0} parameter(0)
  ROOT %mul_fusion = f32[1024,1024]{1,0} fusion(%p), kind=kLoop, calls=%fused_mul
}

ENTRY %main (a: f32[1024,1024]) -> f32[1024,1024] {
  %a = f32[1024,1024]{1,0} parameter(0)
  ROOT %call = f32[1024,1024]{1,0} call(%a), to_apply=%command_buffer
}
"""
    traffic = profiling.hlo_traffic(direct)
    assert traffic["memory_bound_bytes"] == 2 * 1024 * 1024 * 4 and traffic["memory_bound_ops"] == 1
    assert profiling.hlo_traffic(wrapped) == traffic
