"""Where a compiled program's device time goes: a profiler trace of its runs, each kernel's time
joined to the HLO instruction that launched it, that instruction's kind (matmul, conv, attention,
elementwise...) and the model code that made it (the Flax module path of its ``op_name``).

``dpt-jax bench --profile DIR`` writes one such summary per measurement, with the trace and the
optimised HLO (gzipped) for a closer look later, on any machine:

    python -m dpt_jax.profiling DIR/tune_step_b4.xplane.pb.gz DIR/tune_step_b4.hlo.txt.gz
"""
from __future__ import annotations

import argparse
import bisect
import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import jax

# Instructions whose time is that of the instructions they run (a CPU trace nests them).
CONTROL_OPCODES = {"while", "conditional", "call"}
# Ops that only move or re-lay data (a fusion of only these is a copy).
DATA_MOVEMENT = {"fusion", "parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy", "transpose",
                 "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad"}
# Components of an op_name that say how it was traced, not which module made it.
TRACE_COMPONENTS = re.compile(r"^(jit|pjit|shard_map|xla_call)\(|^(while|body|cond|closed_call|checkpoint|remat)$")
# Kinds by library name: a custom call's target (__cudnn$fmhaSoftmax, __cublas$gemm), or the name
# of a kernel the trace does not tie to an HLO op (e.g. one launched inside a CUDA graph).
# cuDNN's attention backward runs helper kernels beside the fused one (dot(dO, O), dQ to 16 bits).
LIBRARY_CATEGORIES = (("attention", re.compile(r"fmha|flash|sdpa|attention|compute_dot_do_o|convert_dq", re.I)),
                          ("conv", re.compile(r"conv|fprop|dgrad|wgrad", re.I)),
                          ("matmul", re.compile(r"gemm|xmma|cutlass|cublas|nvjet|matmul", re.I)))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
# The number of one of many events of a kind ('command_buffer_12', 'CudaGraph:584', 'fusion.3').
_NUMBERED = re.compile(r"(?<=[_.:])\d+")


@dataclasses.dataclass(frozen=True)
class HloOp:
    category: str   # matmul, conv, attention, reduce, elementwise, copy, collective, control, other
    op_name: str    # the traced jax op it came from ("" when XLA made it)
    bytes: int = 0  # its operands' and results' sizes: what it moves at most (a slice reads less)


_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
                  "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY_TYPE = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([\d,]*)\]")


def _type_bytes(hlo_type: str) -> int:
    """The size of an HLO type (an array or a tuple of arrays): ``bf16[16,4096,320]{2,1,0}``."""
    return sum(_ELEMENT_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY_TYPE.findall(hlo_type))


def _result_bytes(result_type: str, opcode: str) -> int:
    """What an instruction's result takes in memory, less a library call's scratch: cuBLAS and
    cuDNN calls return their workspace (32 MiB for each cuBLAS call on an H100) as a last tuple
    element of bytes, which the call does not fill."""
    arrays = _ARRAY_TYPE.findall(result_type)
    if opcode == "custom-call" and result_type.startswith("(") and len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
        result_type = result_type[:result_type.rindex(arrays[-1][0] + "[")]
    return _type_bytes(result_type)


def _custom_call_target(line: str) -> str:
    target = re.search(r'custom_call_target="([^"]*)"', line)
    return target.group(1) if target else ""


def _library_call(called: Sequence["_Instruction"]) -> Optional["_Instruction"]:
    """The library call a fusion wraps, if any. Such a fusion (XLA's dynamic-slice fusion: a cuBLAS
    matmul reading its operand at an offset of a buffer instead of a copy of the slice) is that call."""
    return next((i for i in called if i.opcode == "custom-call"), None)


def _category(opcode: str, line: str, called: Sequence["_Instruction"]) -> str:
    if opcode in CONTROL_OPCODES:
        return "control"
    if opcode == "custom-call":
        return _library_category(_custom_call_target(line))
    library = _library_call(called)
    if library is not None:
        return _library_category(_custom_call_target(library.line))
    inner = {i.opcode for i in called} | {opcode}
    for kind, opcodes in (("conv", {"convolution"}), ("matmul", {"dot"}), ("reduce", {"reduce", "reduce-window"}),
                          ("collective", {"all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                          "collective-permute"})):
        if inner & opcodes:
            return kind
    if inner <= DATA_MOVEMENT:
        return "copy"
    if opcode == "fusion" or inner & {"add", "multiply", "exponential", "convert", "select", "divide"}:
        return "elementwise"
    return "other"


# Ops through which a fused parameter may pass on its way to a slice and still be read only there.
# A slice of a concatenation reads at most the slice's size of each part (GroupNorm's shift, of
# the concatenated input of an up block's ResNet, fused with the concatenation).
_SLICE_PASSTHROUGH = {"bitcast", "convert", "reshape", "concatenate"}
_SLICES = {"slice", "dynamic-slice"}


@dataclasses.dataclass(frozen=True)
class _Instruction:
    name: str
    opcode: str
    operands: Tuple[str, ...]
    result_bytes: int
    line: str


def _computations(hlo_text: str) -> Dict[str, List[_Instruction]]:
    computations: Dict[str, List[_Instruction]] = collections.defaultdict(list)
    current = ""
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else current
            continue
        match = _INSTRUCTION.match(line)
        if match:
            name, result_type, opcode, arguments = match.groups()
            operands = tuple(re.findall(r"%([\w.\-]+)", arguments.split(")")[0]))
            computations[current].append(_Instruction(name, opcode, operands, _result_bytes(result_type, opcode),
                                                      line))
    return computations


def _parameter_index(instruction: _Instruction) -> int:
    return int(re.search(r"parameter\((\d+)\)", instruction.line).group(1))


def _sliced_reads(fused: List[_Instruction]) -> Dict[int, int]:
    """Bytes read of each parameter of a fused computation that is read only through slices
    (possibly after bitcasts, converts, reshapes, concatenations): the slices' sizes, not the
    parameter's."""
    users: Dict[str, List[_Instruction]] = collections.defaultdict(list)
    for instruction in fused:
        for operand in instruction.operands:
            users[operand].append(instruction)

    def read(name: str, depth: int = 0) -> Optional[int]:
        total = 0
        for user in users.get(name, ()):
            if user.opcode in _SLICES:
                total += user.result_bytes
            elif user.opcode in _SLICE_PASSTHROUGH and depth < 8:
                inner = read(user.name, depth + 1)
                if inner is None:
                    return None
                total += inner
            else:
                return None
        return total if users.get(name) else None
    reads = {}
    for instruction in fused:
        if instruction.opcode == "parameter":
            moved = read(instruction.name)
            if moved is not None:
                reads[_parameter_index(instruction)] = moved
    return reads


def _dims(instruction: _Instruction) -> Tuple[int, ...]:
    """The dimensions of an instruction's (array) result."""
    arrays = _ARRAY_TYPE.findall(_INSTRUCTION.match(instruction.line).group(2))
    return tuple(int(d) for d in arrays[0][1].split(",") if d) if len(arrays) == 1 else ()


def _root_slice_share(fused: List[_Instruction]) -> Optional[Tuple[int, float]]:
    """(elements, share) where a fused computation makes only a slice of a value of ``elements``
    elements, cut along its leading dimensions: its root is such a slice, and each reduction in it
    reduces only its operand's last dimension, so a row of the slice needs only its own rows of
    the inputs. XLA's fusions index from their output (a Triton fusion tiles it), so a parameter of
    that many elements is read in ``share``: DPT's shared U-Net start has its gradient summed from
    slices of a LayerNorm backward, one fusion per slice."""
    by_name = {i.name: i for i in fused}
    root = next((i for i in fused if i.line.lstrip().startswith("ROOT")), None)
    if root is None or root.opcode != "slice" or root.operands[0] not in by_name:
        return None
    whole, part = _dims(by_name[root.operands[0]]), _dims(root)
    if not whole or len(whole) != len(part) or whole[-1] != part[-1]:
        return None
    for instruction in fused:
        if instruction.opcode == "reduce":
            rank = len(_dims(by_name[instruction.operands[0]])) if instruction.operands[0] in by_name else 0
            if re.search(r"dimensions=\{([\d,]*)\}", instruction.line).group(1) != str(rank - 1):
                return None
    return math.prod(whole), math.prod(part) / math.prod(whole)


def _fusion_reads(fused: List[_Instruction]) -> Dict[int, int]:
    """Bytes read of the parameters of a fused computation that it does not read whole: through
    slices (:func:`_sliced_reads`), or in the rows of a sliced root (:func:`_root_slice_share`)."""
    reads = {}
    share = _root_slice_share(fused)
    if share is not None:
        for instruction in fused:
            if instruction.opcode == "parameter" and math.prod(_dims(instruction)) == share[0]:
                reads[_parameter_index(instruction)] = round(instruction.result_bytes * share[1])
    reads.update(_sliced_reads(fused))
    return reads


def _called(line: str) -> List[str]:
    """The computations an instruction calls: a fusion's body, a reduction's reducer."""
    return re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line)


def hlo_ops(hlo_text: str) -> Dict[str, HloOp]:
    """Every instruction of an optimised HLO module (``compiled.as_text()``) by name, also under
    the name XLA gives its kernel ('.' and '-' as '_'). A fusion without an ``op_name`` of its own
    takes that of an instruction inside it (its root's where it has one). A fusion's bytes count an
    operand it reads only through slices as those slices, and one it reads only in the rows of a
    sliced root as those rows (:func:`_fusion_reads`)."""
    return _ops(_computations(hlo_text))


def _ops(computations: Dict[str, List[_Instruction]]) -> Dict[str, HloOp]:
    inner_op_name: Dict[str, str] = {}  # computation -> an op_name inside it
    for computation, instructions in computations.items():
        for instruction in instructions:
            op_name = _op_name(instruction.line)
            if op_name and (computation not in inner_op_name or instruction.line.lstrip().startswith("ROOT")):
                inner_op_name[computation] = op_name
    result_bytes = {i.name: i.result_bytes for instructions in computations.values() for i in instructions}
    ops = {}
    for instructions in computations.values():
        for instruction in instructions:
            called = _called(instruction.line)
            op_name = _op_name(instruction.line) or next((inner_op_name[c] for c in called if c in inner_op_name), "")
            inner = [i for c in called for i in computations.get(c, ())]
            sliced = _fusion_reads(computations[called[0]]) if instruction.opcode == "fusion" and called else {}
            category = _category(instruction.opcode, instruction.line, inner)
            result = instruction.result_bytes
            if instruction.opcode == "fusion" and _library_call(inner) is not None:
                result = _result_bytes(_INSTRUCTION.match(instruction.line).group(2), "custom-call")
            moved = result + sum(sliced.get(i, result_bytes.get(operand, 0)) for i, operand in enumerate(instruction.operands))
            op = HloOp(category, op_name, moved)
            ops[instruction.name] = op
            ops.setdefault(re.sub(r"[.\-]", "_", instruction.name), op)
    return ops


# Executed instructions that launch nothing of their own.
_NOT_LAUNCHED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "opt-barrier",
                 "partition-id", "replica-id"} | CONTROL_OPCODES
MEMORY_BOUND = ("elementwise", "reduce", "copy", "other")


def _loop_depths(computations: Dict[str, List[_Instruction]]) -> Dict[str, int]:
    """How many while loops each computation runs inside: a loop's body and condition one more
    than the computation holding the loop, a conditional's branches and a call's computation as many."""
    parent: Dict[str, Tuple[str, int]] = {}
    for computation, instructions in computations.items():
        for instruction in instructions:
            if instruction.opcode == "while":
                for called in re.findall(r"(?:condition|body)=%?([\w.\-]+)", instruction.line):
                    parent[called] = (computation, 1)
            elif instruction.opcode == "call":
                for called in _called(instruction.line):
                    parent[called] = (computation, 0)
            elif instruction.opcode == "conditional":
                branches = re.findall(r"(?:true_computation|false_computation)=%?([\w.\-]+)", instruction.line)
                listed = re.search(r"branch_computations=\{([^}]*)\}", instruction.line)
                branches += re.findall(r"%?([\w.\-]+)", listed.group(1)) if listed else []
                for called in branches:
                    parent[called] = (computation, 0)

    def depth(computation: str) -> int:
        if computation not in parent:
            return 0
        holder, levels = parent[computation]
        return levels + depth(holder)
    return {computation: depth(computation) for computation in computations}


def program_memory_gb(compiled: Any) -> Optional[float]:
    """Device memory a compiled program needs by XLA's buffer assignment (its peak where XLA
    reports one, else arguments + outputs + temporaries - donated): whether a batch fits a chip
    can be read off a compile, also one made for a GPU on a CPU (``launch/aot_hlo.py``)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    peak = getattr(stats, "peak_memory_in_bytes", 0) or (
        stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes)
    return float(f"{peak / 1e9:.4g}")


def hlo_traffic(hlo_text: str, loop_trips: int = 1) -> Dict[str, Any]:
    """What an optimised HLO module moves through memory, read off the HLO alone (no device, no
    run): the executed instructions (those of the entry computation and of loop bodies, not the
    inside of fusions) by category, with the bytes they read and write.

    Figures are per trip of the module's loop (a sampling step), for ``loop_trips`` trips: a loop
    body counts once, what runs outside the loop (e.g. the frozen kernels laid out once before a
    sampling loop) ``1 / loop_trips`` times, a loop inside the loop ``loop_trips`` times. The
    default 1 counts every executed instruction once.

    ``memory_bound_gb`` totals the elementwise, reduce and copy kinds: those run at the memory's
    bandwidth, so less of it is less time, where matmuls, convolutions and attention are bound by
    their arithmetic as much. Compiled for a GPU without one (``launch/aot_hlo.py``) this shows
    what a change does to a program on that GPU before it runs there."""
    computations = _computations(hlo_text)
    # A call's computation runs as the caller's instructions (XLA:GPU's command buffers are calls);
    # a fusion's body and a reduction's reducer are inside their instruction.
    inside = {called for instructions in computations.values() for instruction in instructions
              if instruction.opcode != "call" and (instruction.opcode == "fusion" or "to_apply=" in instruction.line)
              for called in _called(instruction.line)}
    ops = _ops(computations)
    depths = _loop_depths(computations)
    outermost = min((d for c, d in depths.items() if d > 0 and c not in inside), default=0)
    count: Dict[str, float] = collections.Counter()
    moved: Dict[str, float] = collections.Counter()
    for computation, instructions in computations.items():
        if computation in inside:
            continue
        runs = float(loop_trips) ** (depths[computation] - outermost)
        for instruction in instructions:
            if instruction.opcode in _NOT_LAUNCHED:
                continue
            op = ops[instruction.name]
            count[op.category] += runs
            moved[op.category] += op.bytes * runs
    memory_bound = round(sum(moved[c] for c in MEMORY_BOUND))
    return dict(memory_bound_gb=round(memory_bound / 1e9, 3), memory_bound_bytes=memory_bound,
                memory_bound_ops=round(sum(count[c] for c in MEMORY_BOUND)),
                by_category_gb={c: round(moved[c] / 1e9, 3) for c in sorted(moved, key=lambda c: -moved[c])},
                ops_by_category={c: round(n) for c, n in sorted(count.items(), key=lambda kv: -kv[1])})


def _op_name(line: str) -> str:
    match = re.search(r'op_name="([^"]*)"', line)
    return match.group(1) if match else ""


def module_scope(op_name: str, depth: int = 3) -> str:
    """The module path of a traced op, ``depth`` components deep, marked ``bwd`` when it is part
    of a gradient: 'bwd UNet2DConditionModel/up_blocks_1/attentions_0'."""
    parts = [p for p in op_name.split("/")[:-1] if p and not TRACE_COMPONENTS.search(p)]
    parts = [re.sub(r"^(?:\w+\()+|\)+$", "", p) or p for p in parts]  # transpose(jvp(Unet)) -> Unet
    scope = "/".join(parts[:depth]) or "(no module)"
    return ("bwd " if "transpose(" in op_name else "fwd ") + scope


def _stats(event: Any) -> Dict[str, Any]:
    return {key: value for key, value in event.stats}


def _device_ops(profile: Any) -> Iterable[Any]:
    """The trace events of every op the device ran (see :func:`device_events`)."""
    devices = [p for p in profile.planes if p.name.startswith("/device:")]
    for plane in devices:
        lines = list(plane.lines)
        xla_ops = [line for line in lines if line.name == "XLA Ops"]
        for line in xla_ops or [line for line in lines if line.name.startswith("Stream")]:
            yield from line.events
    if devices:
        return
    for plane in profile.planes:
        if plane.name.startswith("/host:"):
            for line in plane.lines:
                yield from (event for event in line.events if _stats(event).get("hlo_op"))


def device_events(profile: Any) -> Iterable[Tuple[str, str, float]]:
    """(HLO instruction, kernel name, seconds) of every op the device ran; the instruction is ""
    where the trace names none.

    GPU: the kernels on the device plane's stream lines (inside a CUDA graph the instruction is
    the command buffer that launched the graph, the kernel name the fusion's); TPU: its 'XLA Ops'
    line; CPU (no device plane): the host's XLA thunks (events with an ``hlo_op`` stat)."""
    for event in _device_ops(profile):
        yield _stats(event).get("hlo_op", ""), event.name, event.duration_ns * 1e-9


def host_calls(profile: Any, runs: int = 1, top: int = 8) -> Dict[str, Any]:
    """What the host thread that called the program did, in milliseconds per run:

    - ``host_ms``: its ``top`` events by total time (nested ones inside their parents: a call's
      'PjitFunction' holds its argument handling and launch);
    - ``host_self_ms``: its ``top`` kinds of event by their own time, without that of the events
      inside them: where the call's time went (an H200 tune step: re-recording CUDA graphs,
      launching them, initialising thunks). Numbered names are one kind
      ('command_buffer_N', 'cuGraphLaunch (CudaGraph:N)');
    - ``host_count``: how many events of each of those kinds a run held (107 'command_buffer::update'
      a run: every CUDA graph of the program re-recorded at every call; 0: launched as recorded);
    - ``first_op_ms``: from a call's start to the first op the device ran after it: the latency a
      waited-for step pays before the device starts, which runs dispatched back to back hide
      (the H100 tune step's was 7.9 ms of 86.8)."""
    line = next((line for plane in profile.planes if plane.name.startswith("/host:") for line in plane.lines
                 if any(event.name.startswith("PjitFunction(") for event in line.events)), None)
    if line is None:
        return {}
    totals: Dict[str, float] = collections.Counter()
    own: Dict[str, float] = collections.Counter()
    count: Dict[str, int] = collections.Counter()
    ends: Dict[str, float] = {}
    open_events: List[Tuple[float, str]] = []  # (end, kind) of the events the current one is inside
    calls = []
    for event in sorted(line.events, key=lambda event: (event.start_ns, -event.duration_ns)):
        end = event.start_ns + event.duration_ns
        while open_events and open_events[-1][0] <= event.start_ns:
            open_events.pop()
        kind = _NUMBERED.sub("N", event.name)
        if open_events:
            own[open_events[-1][1]] -= event.duration_ns
        own[kind] += event.duration_ns
        open_events.append((end, kind))
        if event.start_ns < ends.get(event.name, -math.inf):
            continue  # inside an event of its own name (a call within the call): counted there
        ends[event.name] = end
        count[kind] += 1
        totals[event.name] += event.duration_ns
        if event.name.startswith("PjitFunction("):
            calls.append(event.start_ns)
    starts = sorted(event.start_ns for event in _device_ops(profile))
    delays = [starts[i] - call for call in calls if (i := bisect.bisect_left(starts, call)) < len(starts)]

    def ms(counts: Dict[str, float]) -> Dict[str, float]:
        return {name: round(ns / runs / 1e6, 3) for name, ns in counts.most_common(top)}
    self_ms = ms(own)
    return dict(first_op_ms=round(sum(delays) / len(delays) / 1e6, 3) if delays else None,
                host_ms=ms(totals), host_self_ms=self_ms, host_count={kind: count[kind] / runs for kind in self_ms})


def summarize(events: Iterable[Tuple[str, str, float]], ops: Dict[str, HloOp], runs: int = 1, top: int = 25,
              scope_depth: int = 3) -> Dict[str, Any]:
    """Milliseconds per run by op category, by module scope, and of the ``top`` ops (with the MB
    each call moves and its TB/s, where the op is in the HLO). An event is joined to its
    instruction where the HLO has it, else to the fusion its kernel is named after; ``joined`` is
    the share of the time so joined, the rest is categorised by kernel name."""
    per_op: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0])
    for hlo_op, kernel, seconds in events:
        name = hlo_op if hlo_op in ops else kernel
        per_op[name][0] += seconds
        per_op[name][1] += 1
    found = {name: ops[name] for name in per_op if name in ops}
    op_of = {name: found.get(name) or HloOp(_library_category(name), "") for name in per_op}
    per_op = {name: v for name, v in per_op.items() if op_of[name].category != "control"}
    total = sum(seconds for seconds, _ in per_op.values())
    by_category: Dict[str, float] = collections.Counter()
    by_scope: Dict[str, float] = collections.Counter()
    for name, (seconds, _) in per_op.items():
        by_category[op_of[name].category] += seconds
        by_scope[module_scope(op_of[name].op_name, scope_depth) if name in found else "(not in the HLO)"] += seconds

    def ms(seconds: float) -> float:
        return round(seconds / runs * 1e3, 3)

    def per_run(count: int) -> float:
        # A mean: an op that ran in one of two traced runs ran 0.5 times a run, not 0.
        return count // runs if count % runs == 0 else round(count / runs, 2)

    def ranked(counts: Dict[str, float], limit: Optional[int] = None) -> Dict[str, float]:
        return {k: ms(v) for k, v in sorted(counts.items(), key=lambda kv: -kv[1])[:limit]}
    return dict(
        device_ms=ms(total), kernels=per_run(sum(n for _, n in per_op.values())),
        joined=round(sum(per_op[n][0] for n in per_op if n in found) / total, 4) if total else 0.0,
        by_category_ms=ranked(by_category), by_scope_ms=ranked(by_scope, top),
        top_ops=[dict(op=name, ms=ms(seconds), calls=per_run(n), category=op_of[name].category,
                      **_bandwidth(op_of[name].bytes, seconds / n), op_name=op_of[name].op_name[-160:])
                 for name, (seconds, n) in sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]])


def _bandwidth(moved: int, seconds_per_call: float) -> Dict[str, float]:
    """MB an op moves per call and the TB/s that makes: how far a memory-bound op is from the
    chip's bandwidth (an upper bound where a fusion reads only part of an operand other than
    through a slice)."""
    if not moved or not seconds_per_call:
        return {}
    return dict(mb=float(f"{moved / 1e6:.4g}"), tb_per_s=float(f"{moved / seconds_per_call / 1e12:.4g}"))


def _library_category(name: str) -> str:
    return next((category for category, pattern in LIBRARY_CATEGORIES if pattern.search(name)), "other")


def _read(path: str, mode: str) -> Any:
    """A file's contents, gunzipped when its name ends in .gz (mode "rb" or "rt")."""
    with (gzip.open if path.endswith(".gz") else open)(path, mode) as f:
        return f.read()


def load_trace(path: str) -> Any:
    """A jax profiler trace (``*.xplane.pb``, or gzipped)."""
    return jax.profiler.ProfileData.from_serialized_xspace(_read(path, "rb"))


def capture(run: Callable[[], Any], runs: int = 1) -> Tuple[bytes, float]:
    """The serialised trace of ``runs`` calls of ``run`` (each waited for) and their wall seconds."""
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.enable_hlo_proto = False  # the HLO is saved as text beside the trace
    directory = tempfile.mkdtemp(prefix="dpt_jax_trace_")
    try:
        with jax.profiler.trace(directory, profiler_options=options):
            t0 = time.perf_counter()
            for _ in range(runs):
                jax.block_until_ready(run())
            wall = time.perf_counter() - t0
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        with open(path, "rb") as f:
            return f.read(), wall
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def profile_program(run: Callable[[], Any], hlo_text: str, directory: str, name: str,
                    runs: int = 1) -> Dict[str, Any]:
    """Trace ``runs`` calls of ``run``; write DIR/NAME.xplane.pb.gz and DIR/NAME.hlo.txt.gz and
    return the summary (plus ``wall_ms`` per run, ``busy``, the device's share of it, and the
    calling thread's :func:`host_calls`)."""
    trace, wall = capture(run, runs)
    os.makedirs(directory, exist_ok=True)
    for suffix, data in ((".xplane.pb.gz", trace), (".hlo.txt.gz", hlo_text.encode())):
        with gzip.open(os.path.join(directory, name + suffix), "wb", compresslevel=6) as f:
            f.write(data)
    profile = jax.profiler.ProfileData.from_serialized_xspace(trace)
    summary = summarize(device_events(profile), hlo_ops(hlo_text), runs)
    wall_ms = wall / runs * 1e3
    return dict(wall_ms=round(wall_ms, 3), busy=round(summary["device_ms"] / wall_ms, 4), **summary,
                **host_calls(profile, runs))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m dpt_jax.profiling", description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", help="a *.xplane.pb(.gz) written by jax.profiler or dpt-jax bench --profile")
    parser.add_argument("hlo", help="the program's optimised HLO text (*.hlo.txt(.gz))")
    parser.add_argument("--runs", type=int, default=1, help="runs the trace holds (times are per run)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--depth", type=int, default=3, help="module path components per scope")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs {args.runs}: expected >= 1 (the runs the trace holds)")
    for path in (args.trace, args.hlo):
        if not os.path.isfile(path):
            parser.error(f"no such file: {path}")
    ops = hlo_ops(_read(args.hlo, "rt"))
    profile = load_trace(args.trace)
    summary = dict(summarize(device_events(profile), ops, args.runs, args.top, args.depth),
                   **host_calls(profile, args.runs))
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
