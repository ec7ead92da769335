"""Which instruction path each compiled layer really runs, read from the scheduled TIR.

Why: the manifest promises "per-layer precision actually executed". Operand dtypes (what
:mod:`apq.toolchain.layers` reads before scheduling) cannot tell an int8 conv tensorized onto
AVX-512 VNNI ``vpdpbusd`` (kernels/x86_int8.py) from the same conv left to LLVM's generic
widening int16/int32 loop nest, nor show the AArch64 ``sdot`` path (kernels/arm_int8.py). The
schedule rules decide per PrimFunc, and a MetaSchedule database (``--tune-trials``) can
replace their decision, so this module does not re-derive any rule: it looks at the TIR that
is handed to code generation. ``tensorize`` leaves the instruction's LLVM intrinsic call in
the body of the reduction block, bit-serial kernels compute ``popcount``; without either the
block's operand and accumulator dtypes tell integer from float arithmetic.

How layers meet PrimFuncs: after FuseOps/FuseTIR each conv2d / matmul / bit-serial call of
the Relax ``main`` sits in exactly one fused PrimFunc holding one *dot block* (a reduction
block that reads two operands besides its accumulator); pooling and means read one. The
final ``main`` calls those PrimFuncs in program order (identical layers share one PrimFunc
and are called twice), the same order :func:`apq.toolchain.layers.describe_layers` lists its
records in, so the k-th dot call is the k-th record. The one exception, a merged MobileNet
block (kernels/fuse_dw_pw.py: [expand ->] depthwise [-> project]), holds one dot block per conv,
each writing its own accumulator, and counts as one layer per accumulator, in block order. When
the counts disagree the mapping is not trusted and every layer reports ``unknown`` rather than
a guess.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from apq.toolchain.layers import LayerRecord

#: Every value a layer's ``impl`` can take, with what it means (documentation and tests).
IMPLS: dict[str, str] = {
    "avx512-vnni": "x86 AVX-512 VNNI vpdpbusd: u8 x s8 products summed 4 at a time into int32 lanes",
    "neon-sdot": "AArch64 NEON sdot (+dotprod): s8 x s8 products summed 4 at a time into int32 lanes",
    "neon-udot": "AArch64 NEON udot (+dotprod): u8 x u8 products summed 4 at a time into int32 lanes",
    "bitserial-popcount": "bit-serial: AND + popcount over activation and weight bit planes",
    "generic": "integer multiply-adds in a loop nest LLVM vectorizes (widening to int16/int32), no dot instruction",
    "int-fp32acc": "integer operands multiplied and accumulated in float32 (exact: bounded sums, see qdq_lowering)",
    "float": "floating-point operands (float model, or fake-quant QDQ that TVM runs as float)",
    "unknown": "the compiled PrimFunc of this layer could not be identified",
}

#: Registry: LLVM intrinsic name prefix -> impl. A new tensor intrinsic is one entry.
INTRINSIC_IMPLS: tuple[tuple[str, str], ...] = (
    ("llvm.x86.avx512.vpdpbusd", "avx512-vnni"),  # .512 / .256 / .128 and the saturating ...ds
    ("llvm.aarch64.neon.sdot", "neon-sdot"),
    ("llvm.aarch64.neon.udot", "neon-udot"),
    ("llvm.ctpop", "bitserial-popcount"),
)

#: Registry: TIR op name -> impl, for ops that are not LLVM intrinsic calls before lowering.
TIR_OP_IMPLS: dict[str, str] = {
    "tirx.popcount": "bitserial-popcount",
}

_LLVM_INTRIN_OPS = ("tirx.call_llvm_pure_intrin", "tirx.call_llvm_intrin")
_COMM_REDUCE = 2  # IterVar.iter_type of a reduction axis (kCommReduce)
#: When one PrimFunc holds several dot blocks, the most specific path names it.
_PRIORITY = tuple(IMPLS)


@dataclass(frozen=True)
class KernelCall:
    """One call of a dot-holding PrimFunc in the compiled ``main``: its name and impl."""

    function: str
    impl: str
    #: elements of the PrimFunc's output (its last parameter), to cross-check the pairing
    out_elements: int | None = None


def _llvm_intrinsic_name(arg: Any) -> str:
    """The name of a ``call_llvm_*intrin`` first argument (an intrinsic id, or already a name)."""
    value = getattr(arg, "value", arg)
    if isinstance(value, str):
        return value
    try:
        from tvm.target import codegen

        return str(codegen.llvm_get_intrinsic_name(int(value)))
    except Exception:  # a TVM without LLVM, or an id this LLVM does not know
        return ""


def _call_impl(call: Any) -> str | None:
    op = str(getattr(getattr(call, "op", None), "name", ""))
    if op in TIR_OP_IMPLS:
        return TIR_OP_IMPLS[op]
    if op in _LLVM_INTRIN_OPS and len(call.args) > 0:
        name = _llvm_intrinsic_name(call.args[0])
        return next((impl for prefix, impl in INTRINSIC_IMPLS if name.startswith(prefix)), None)
    return None


def _buffer(region: Any) -> Any:
    source = getattr(region, "source", None)  # TVM 0.27: TensorRegion.source; older: BufferRegion.buffer
    return source if source is not None else getattr(region, "buffer", None)


def _dtype(buffer: Any) -> str:
    dtype = getattr(buffer, "dtype", None)
    if dtype is None:
        dtype = getattr(getattr(buffer, "ty", None), "dtype", None)
    return str(dtype) if dtype is not None else ""


def _is_dot_block(block: Any) -> bool:
    """A reduction block reading two operands besides what it writes (conv, dense, bit-serial)."""
    if not any(int(iv.iter_type) == _COMM_REDUCE for iv in block.iter_vars):
        return False
    outs = [_buffer(w) for w in block.writes]
    operands = []
    for r in block.reads:
        b = _buffer(r)
        if b is None or any(b.same_as(o) for o in outs) or any(b.same_as(x) for x in operands):
            continue
        operands.append(b)
    return len(operands) >= 2


def _block_impl(block: Any) -> str:
    """The instruction path of one dot block: an intrinsic found in its body, else its dtypes."""
    import tvm_ffi
    from tvm import ir, tirx
    from tvm.ir.expr import TensorLoad

    found: list[str] = []

    def on_call(call: Any) -> None:
        impl = _call_impl(call)
        if impl is not None:
            found.append(impl)

    tvm_ffi.structural_walk(block.body, [(ir.Call, on_call)])
    if found:
        return min(found, key=_PRIORITY.index)
    outs = [_buffer(w) for w in block.writes]
    # the operands its update multiplies: what the body loads (a bias read by the block's init,
    # kernels/bias_init.py, is not one of them), not every declared read
    loaded: list[Any] = []
    tvm_ffi.structural_walk(block.body, [(TensorLoad, lambda load: loaded.append(load.source))])
    operands = [b for b in loaded if not any(b.same_as(o) for o in outs)]
    if any(_dtype(b).startswith(("float", "bfloat")) for b in operands):
        return "float"
    if any(_dtype(o).startswith(("float", "bfloat")) for o in outs):
        # integers multiplied in float are exact only as plain casts: a float constant in the
        # body (an inlined dequantize's scale or zero point) makes it float arithmetic
        scaled: list[Any] = []
        tvm_ffi.structural_walk(block.body, [(tirx.FloatImm, lambda imm: scaled.append(imm)
                                              if float(imm.value) != 0.0 else None)])
        return "float" if scaled else "int-fp32acc"
    return "generic"


def _dot_layers(func: Any) -> list[tuple[str, Any]]:
    """``(impl, output buffer)`` per layer of a scheduled PrimFunc, in program order.

    Dot blocks are grouped by the buffer they write: a schedule may split one conv into several
    blocks (a partitioned loop), all writing its accumulator; a merged MobileNet block
    (kernels/fuse_dw_pw.py) writes one accumulator per conv, one per layer.
    """
    import tvm_ffi
    from tvm import s_tir

    layers: list[tuple[list[str], Any]] = []

    def on_block(block: Any) -> None:
        if not _is_dot_block(block):
            return
        out = _buffer(block.writes[0])
        for impls, buf in layers:
            if buf.same_as(out):
                impls.append(_block_impl(block))
                return
        layers.append(([_block_impl(block)], out))

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    return [(min(impls, key=_PRIORITY.index), buf) for impls, buf in layers]


def primfunc_impl(func: Any) -> str | None:
    """The impl of a scheduled PrimFunc's dot block(s), or None when it holds no dot block."""
    impls = [impl for impl, _ in _dot_layers(func)]
    return min(impls, key=_PRIORITY.index) if impls else None


def _bindings(func: Any) -> Iterator[Any]:
    for block in getattr(func.body, "blocks", []):
        yield from block.bindings


def kernel_calls(mod: Any, func_name: str = "main") -> list[KernelCall]:
    """Every call of a dot-holding PrimFunc in ``mod[func_name]``, in program order.

    Works on the module after FuseTIR (``call_tir``) and after VM lowering (the PrimFunc's
    GlobalVar called directly), i.e. on what :class:`ScheduledModuleCapture` keeps.
    """
    from tvm import ir, tirx

    layers_of: dict[str, list[tuple[str, int | None]]] = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            layers = _dot_layers(func)
            if len(layers) == 1:  # the PrimFunc's output is the layer's (a partitioned conv: one)
                layers_of[gv.name_hint] = [(layers[0][0], _output_elements(func))]
            else:
                layers_of[gv.name_hint] = [(impl, _elements(buf)) for impl, buf in layers]
    calls: list[KernelCall] = []
    for binding in _bindings(mod[func_name]):
        value = getattr(binding, "value", None)
        callee = getattr(value, "op", None)
        if callee is None:
            continue
        if str(getattr(callee, "name", "")).startswith("relax.call_tir") and len(value.args) > 0:
            callee = value.args[0]
        name = getattr(callee, "name_hint", None)
        if isinstance(callee, ir.GlobalVar):
            calls.extend(KernelCall(str(name), impl, size) for impl, size in layers_of.get(str(name), []))
    return calls


def _output_elements(func: Any) -> int | None:
    """Element count of a PrimFunc's last parameter (FuseTIR and apq's kernels put the output last)."""
    try:
        param = func.params[-1]  # TVM 0.27: a buffer-typed Var with a shape; older: via buffer_map
        return _elements(func.buffer_map[param] if hasattr(func, "buffer_map") else param)
    except (IndexError, KeyError):  # no params
        return None


def _elements(buf: Any) -> int | None:
    """Element count of a buffer with a static shape (None for symbolic dims)."""
    try:
        n = 1
        for dim in buf.shape:
            n *= int(dim)
        return n
    except (TypeError, ValueError, AttributeError):
        return None


def layer_output_elements(record: LayerRecord) -> int | None:
    """Elements of a layer's output from its geometry (None when it has none)."""
    g = record.geometry
    if not g:
        return None
    try:
        if g["op"] == "dense":
            return int(g["batch"]) * int(g["out_ch"])
        s = int(g["stride"])
        return int(g["batch"]) * int(g["out_ch"]) * (int(g["in_h"]) // s) * (int(g["in_w"]) // s)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def pairing_is_consistent(records: Sequence[LayerRecord], calls: Sequence[KernelCall]) -> bool:
    """Same count, and each layer's output size equals its PrimFunc's wherever both are known.

    The size check guards the program-order assumption: a reordering that pairs a layer with
    a neighbour of another shape is caught instead of reported.
    """
    if len(records) != len(calls):
        return False
    for rec, call in zip(records, calls):
        want = layer_output_elements(rec)
        if want is not None and call.out_elements is not None and want != call.out_elements:
            return False
    return True


def attach_impls(records: Sequence[LayerRecord], calls: Sequence[KernelCall]) -> list[LayerRecord]:
    """Records with ``impl`` from the k-th dot call; all ``unknown`` unless the pairing is consistent."""
    if not pairing_is_consistent(records, calls):
        return [dataclasses.replace(r, impl="unknown") for r in records]
    return [dataclasses.replace(r, impl=c.impl) for r, c in zip(records, calls)]


class ScheduledModuleCapture:
    """A pass instrument keeping the last Relax+TIR module the build produced.

    The last module after any pass that still has the Relax ``main`` is the one handed to
    VM code generation: every schedule (apq's rules, a tuning database) is applied, and only
    TIR-to-LLVM lowering follows (which runs on PrimFunc-only modules, so it is not kept).
    Hooking instrumentation instead of a pass name keeps this independent of how
    kernels/pipeline.py composes its pipeline.
    """

    def __init__(self, func_name: str = "main") -> None:
        self.func_name = func_name
        self.module: Any = None

    def run_after_pass(self, mod: Any, _info: Any) -> None:
        from tvm import relax

        try:
            if any(gv.name_hint == self.func_name and isinstance(f, relax.Function)
                   for gv, f in mod.functions.items()):
                self.module = mod
        except Exception:  # an instrument must never break the build it watches
            pass


@contextlib.contextmanager
def capture_scheduled(func_name: str = "main") -> Iterator[ScheduledModuleCapture]:
    """``with capture_scheduled() as cap: tvm.compile(...)``; then ``cap.module`` (or None).

    Enters a PassContext equal to the current one plus the capturing instrument, so a
    caller's opt level, config and instruments still apply.
    """
    import tvm

    capture = tvm.instrument.pass_instrument(ScheduledModuleCapture)(func_name)
    cur = tvm.transform.PassContext.current()
    ctx = tvm.transform.PassContext(opt_level=cur.opt_level, required_pass=list(cur.required_pass),
                                    disabled_pass=list(cur.disabled_pass),
                                    instruments=list(cur.instruments) + [capture], config=dict(cur.config))
    with ctx:
        yield capture
