"""What actually executes, layer by layer, in a Relax module.

The artifact manifest promises "per-layer precision actually executed". A QDQ ONNX model
that TVM imports as quantize -> dequantize -> *float* conv is fake quant: it must be
reported as 32-bit float even though the ONNX file says int8, otherwise the manifest would
claim integer kernels that never run. So this module never trusts the ONNX file; it reads
the dtypes of the conv2d / matmul calls in the Relax ``main`` function (after import or
after :func:`apq.toolchain.qdq_lowering.lower_qdq`) and recognises bit-serial ``call_tir``
kernels by name.

Bit-widths below 8 are not visible in dtypes (apq stores 2/4-bit values in int8
containers), so they come from the IR itself (the ``clip`` that bounds an activation) and,
for weights, from a module attribute that ``lower_qdq`` writes, keyed by a fingerprint of
the weight constant's values (Relax variable names do not survive import, values do).

Which instruction path a layer's kernel takes (VNNI, sdot, bit-serial popcount, a generic
loop nest) is decided by scheduling, after this walk: :mod:`apq.toolchain.kernel_impl` reads
it from the scheduled TIR and fills :attr:`LayerRecord.impl`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np

#: IRModule attribute written by lower_qdq: {weight fingerprint: weight bits}.
WEIGHT_BITS_ATTR = "apq_weight_bits"
#: IRModule attribute written by lower_qdq: {weight fingerprint: ONNX initializer name}.
WEIGHT_NAMES_ATTR = "apq_weight_names"

FLOAT_BITS = 32


@dataclass
class LayerRecord:
    """One compute layer as it executes: kernel name and the bit-widths it really uses.

    ``weight_bits`` / ``activation_bits`` are 32 for float execution (including fake-quant
    QDQ), 8 for int8 kernels, and b < 8 for low-bit values in 8-bit containers or
    bit-serial kernels; 0 means a bit-serial kernel that declares its bits nowhere (neither
    ``apq.weight_bits``/``apq.activation_bits`` PrimFunc attributes nor an ``a<A>w<W>`` name).
    """

    name: str
    op: str
    kernel: str
    weight_bits: int
    activation_bits: int
    #: layer geometry for cost models (apq.targets.layers.LayerShape fields without bits):
    #: op conv|dwconv|dense, in_ch, out_ch, kernel, stride, in_h, in_w, groups, batch.
    geometry: dict[str, Any] | None = None
    #: instruction path the compiled kernel really uses, read from the scheduled TIR by
    #: :mod:`apq.toolchain.kernel_impl` (a key of its ``IMPLS``: "avx512-vnni", "neon-sdot",
    #: "bitserial-popcount", "generic", "int-fp32acc", "float", "unknown"); None before compiling.
    impl: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerRecord":
        """Unknown keys are ignored: a manifest from a newer apq with extra per-layer fields still loads."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def is_integer(self) -> bool:
        return self.weight_bits < FLOAT_BITS and self.activation_bits < FLOAT_BITS


def weight_fingerprint(values: np.ndarray) -> str:
    """A stable id for a weight tensor's quantized values (dtype, shape and bytes).

    Used to carry per-layer bit-widths from the ONNX file to the Relax module, where the
    initializer's name is gone but its values survive unchanged as a constant.
    """
    a = np.ascontiguousarray(values)
    h = hashlib.sha1()
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- IR helpers


def _op_name(call: Any) -> str:
    op = getattr(call, "op", None)
    return str(getattr(op, "name", "")) if op is not None else ""


def tensor_dtype(expr: Any) -> str:
    """The tensor dtype of a Relax expression ('' when unknown; TVM 0.27 calls its type ``ty``)."""
    ty = getattr(expr, "ty", None)
    return str(getattr(ty, "dtype", "")) if ty is not None else ""


def const_value(expr: Any) -> np.ndarray | None:
    """The value of a Relax constant (tensor constant or scalar IntImm/FloatImm), else None."""
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        return None
    value = expr.value
    if hasattr(value, "numpy"):
        return value.numpy()
    if isinstance(value, (bool, int, float)):
        return np.array(value)
    return None


def rewrite_calls(mod: Any, op_name: str, rewrite: Callable[[Any, Any], Any]) -> tuple[Any, int]:
    """Replace every call of ``op_name`` in the module's Relax functions by ``rewrite(builder,
    call)`` (its arguments already rewritten), or keep it where that returns None; returns
    (module, rewritten count). The one mutator loop of apq's call-for-call Relax rewrites."""
    from tvm import relax

    count = 0

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            nonlocal count
            call = super().visit_call_(call)
            if str(getattr(call.op, "name", "")) != op_name:
                return call
            new = rewrite(self.builder_, call)
            if new is None:
                return call
            count += 1
            return new

    module = mutate_functions(_Rewriter(mod), mod)
    return module, count


def mutate_functions(mutator: Any, mod: Any, enter: Callable[[Any], None] | None = None) -> Any:
    """Run a ``relax.PyExprMutator`` (built on ``mod``) over every Relax function of ``mod`` and
    return the rebuilt module. ``enter(func)`` runs before each function, for mutators that keep
    per-function state (e.g. ``var2val``)."""
    from tvm import relax

    for gvar, func in mod.functions.items():
        if isinstance(func, relax.Function):
            if enter is not None:
                enter(func)
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def _bindings(func: Any) -> list[Any]:
    from tvm import relax

    body = func.body
    if not isinstance(body, relax.SeqExpr):
        return []
    return [b for block in body.blocks for b in block.bindings]


def _dtype_bits(dtype: str) -> int:
    m = re.search(r"(\d+)$", dtype)
    return int(m.group(1)) if m else FLOAT_BITS


def range_bits(lo: int, hi: int) -> int:
    """Bits of the integer range [lo, hi]: unsigned if lo >= 0, else two's complement."""
    if lo >= 0:
        return max(1, int(hi).bit_length())
    return max(1, int(max(-lo - 1, hi)).bit_length() + 1)


class _Producers:
    """var -> bound value for main, to look through to what feeds a conv/matmul.

    Also carries what describers need besides the IR walk: the module (to read PrimFunc
    attributes of call_tir kernels) and the weight bits lower_qdq recorded.
    """

    def __init__(self, mod: Any, func: Any, wbits_by_fp: dict[str, int]) -> None:
        self._by_var = {b.var: b.value for b in _bindings(func) if hasattr(b, "value")}
        self.mod = mod
        self.wbits_by_fp = wbits_by_fp

    def __call__(self, expr: Any) -> Any:
        return self._by_var.get(expr)

    def through(self, expr: Any, ops: tuple[str, ...]) -> Any:
        """Follow producers through layout-only / padding ops (reshape, pad, permute...)."""
        seen = 0
        while seen < 16:
            val = self(expr)
            if val is None or _op_name(val) not in ops:
                return expr
            expr = val.args[0]
            seen += 1
        return expr


_PASS_THROUGH = ("relax.nn.pad", "relax.reshape", "relax.permute_dims", "relax.flatten")


def _scalar(expr: Any) -> float | None:
    """A one-element constant as a float, else None."""
    arr = const_value(expr)
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _clip_step(val: Any) -> "tuple[Any, float | None, float | None] | None":
    """(input, lower bound, upper bound) of one clip-like call, else None.

    The ONNX frontend imports Clip on integer tensors as call_tir(maximum) then
    call_tir(minimum); float Clip becomes relax.clip. All of them bound an activation.
    """
    name = _op_name(val)
    if name == "relax.clip":
        return val.args[0], _scalar(val.args[1]), _scalar(val.args[2])
    if name in ("relax.minimum", "relax.maximum"):
        args = list(val.args)
    elif name == "relax.call_tir":
        fn = str(getattr(val.args[0], "name_hint", ""))
        if not fn.startswith(("minimum", "maximum")):
            return None
        name = "relax.minimum" if fn.startswith("minimum") else "relax.maximum"
        args = list(getattr(val.args[1], "fields", []))
    else:
        return None
    if len(args) != 2 or _scalar(args[1]) is None:
        return None
    bound = _scalar(args[1])
    return (args[0], None, bound) if name == "relax.minimum" else (args[0], bound, None)


def _activation_bits(producers: _Producers, data: Any) -> int:
    """Bits of an integer activation: from the clip bounding the quantized value, else its dtype."""
    dtype_bits = _dtype_bits(tensor_dtype(data))
    info = np.iinfo(np.dtype(tensor_dtype(data))) if tensor_dtype(data) in ("int8", "uint8", "int16", "uint16") else None
    if info is None:
        return dtype_bits
    lo, hi = float(info.min), float(info.max)
    expr = producers.through(data, _PASS_THROUGH)
    unbiased = _through_rebias(producers, expr)
    if unbiased is not None:  # a shift by a constant keeps the number of levels: read the source's
        expr = producers.through(unbiased, _PASS_THROUGH)
        src = np.iinfo(np.dtype(tensor_dtype(unbiased))) if tensor_dtype(unbiased) in ("int8", "uint8") else info
        lo, hi = float(src.min), float(src.max)
    for _ in range(8):
        step = _clip_step(producers(expr))
        if step is None:
            break
        expr, step_lo, step_hi = step
        lo = max(lo, step_lo) if step_lo is not None else lo
        hi = min(hi, step_hi) if step_hi is not None else hi
        expr = producers.through(expr, _PASS_THROUGH)
    return min(dtype_bits, range_bits(int(lo), int(hi)))


def _bound_or_self(producers: _Producers, expr: Any) -> Any:
    val = producers(expr)
    return expr if val is None else val


def _through_rebias(producers: _Producers, expr: Any) -> Any | None:
    """x in ``astype(astype(x, int16) + c, uint8)`` (lower_qdq's exact int8 -> uint8 re-bias), else None."""
    outer = producers(expr)
    if outer is None or _op_name(outer) != "relax.astype":
        return None
    add = _bound_or_self(producers, outer.args[0])
    if _op_name(add) != "relax.add" or _scalar(add.args[1]) is None:
        return None
    inner = _bound_or_self(producers, add.args[0])
    if _op_name(inner) != "relax.astype":
        return None
    return inner.args[0]


def _is_dequantized(producers: _Producers, expr: Any) -> bool:
    src = producers.through(expr, _PASS_THROUGH)
    val = producers(src)
    return val is not None and _op_name(val) == "relax.dequantize"


# --------------------------------------------------------------------------- describers

_Describer = Callable[[Any, _Producers], "tuple[str, str, int, int] | None"]


def _describe_dot(kind: str) -> _Describer:
    """conv2d / matmul: float (maybe fake-quant) or integer, from the operand dtypes."""

    def describe(call: Any, producers: _Producers) -> tuple[str, str, int, int]:
        data, weight = call.args[0], call.args[1]
        a_dt, w_dt = tensor_dtype(data), tensor_dtype(weight)
        if a_dt.startswith("float") or w_dt.startswith("float"):
            fake = _is_dequantized(producers, data) or _is_dequantized(producers, weight)
            suffix = "(fake-quant QDQ)" if fake else ""
            out_dt = tensor_dtype(call) or a_dt
            return kind, f"{kind}.{out_dt}{suffix}", FLOAT_BITS, FLOAT_BITS
        out_dt = tensor_dtype(call)
        w_arr = const_value(producers.through(weight, _PASS_THROUGH))
        wbits = _dtype_bits(w_dt)
        if w_arr is not None:
            wbits = producers.wbits_by_fp.get(weight_fingerprint(w_arr), wbits)
        abits = _activation_bits(producers, data)
        return kind, f"{kind}.{a_dt}x{w_dt}->{out_dt}", wbits, abits

    return describe


_BITSERIAL_BITS = re.compile(r"a(\d+)w(\d+)")


def _describe_call_tir(call: Any, producers: _Producers) -> tuple[str, str, int, int] | None:
    """Bit-serial kernels (kernels/bitserial.py) by name; bits from PrimFunc attrs or name."""
    gv = call.args[0]
    name = str(getattr(gv, "name_hint", ""))
    if not name.startswith("bitserial"):
        return None
    wbits = abits = None
    if producers.mod is not None:
        try:
            func = producers.mod[gv]
            attrs = func.attrs or {}
            wbits = int(attrs["apq.weight_bits"]) if "apq.weight_bits" in attrs else None
            abits = int(attrs["apq.activation_bits"]) if "apq.activation_bits" in attrs else None
        except Exception:  # a foreign or malformed PrimFunc: fall back to the name
            pass
    m = _BITSERIAL_BITS.search(name)
    if m:
        abits = abits if abits is not None else int(m.group(1))
        wbits = wbits if wbits is not None else int(m.group(2))
    op = "dense" if "dense" in name else "conv2d" if "conv" in name else name
    return op, name, int(wbits or 0), int(abits or 0)


#: Registry: Relax op name -> describer. A new kernel family is one entry.
DESCRIBERS: dict[str, _Describer] = {
    "relax.nn.conv2d": _describe_dot("conv2d"),
    "relax.matmul": _describe_dot("matmul"),
    "relax.call_tir": _describe_call_tir,
}


def _module_attr(mod: Any, key: str) -> dict[Any, Any]:
    value = mod.get_attr(key) if mod.attrs is not None else None
    return dict(value) if value is not None else {}


def describe_layers(mod: Any, func_name: str = "main") -> list[LayerRecord]:
    """Every conv2d / matmul / bit-serial call of ``mod[func_name]`` and how it executes.

    Layers are named ``<op>_<i>`` in program order, or by their ONNX weight initializer
    when ``lower_qdq`` recorded it. Call it on the module before ``tvm.compile`` (after
    import, ``lower_qdq`` or DecomposeOpsForInference): after FuseOps the calls move into
    fused sub-functions that this walk of ``main`` does not enter.
    """
    func = mod[func_name]
    wbits_by_fp = {str(k): int(v) for k, v in _module_attr(mod, WEIGHT_BITS_ATTR).items()}
    names_by_fp = {str(k): str(v) for k, v in _module_attr(mod, WEIGHT_NAMES_ATTR).items()}
    producers = _Producers(mod, func, wbits_by_fp)
    records: list[LayerRecord] = []
    for binding in _bindings(func):
        call = getattr(binding, "value", None)
        describer = DESCRIBERS.get(_op_name(call))
        if describer is None:
            continue
        described = describer(call, producers)
        if described is None:
            continue
        op, kernel, wbits, abits = described
        name = f"{op}_{len(records)}"
        if len(call.args) > 1:
            w_arr = const_value(producers.through(call.args[1], _PASS_THROUGH))
            if w_arr is not None and weight_fingerprint(w_arr) in names_by_fp:
                name = names_by_fp[weight_fingerprint(w_arr)]
        records.append(LayerRecord(name, op, kernel, int(wbits), int(abits), _geometry(op, call)))
    return records


def static_shape(expr: Any) -> list[int] | None:
    """The static shape of a Relax expression, or None (unknown or symbolic dims)."""
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    shape = getattr(ty, "shape", None)
    try:
        return [int(v) for v in shape.values] if shape is not None else None
    except (TypeError, AttributeError):  # symbolic dims
        return None


def _geometry(op: str, call: Any) -> dict[str, Any] | None:
    """Static geometry of a conv2d (NCHW/OIHW) or matmul call, or None when not static."""
    try:
        if op == "conv2d" and _op_name(call) == "relax.nn.conv2d":
            x, w, y = static_shape(call.args[0]), static_shape(call.args[1]), static_shape(call)
            if x is None or w is None or y is None or len(x) != 4 or str(call.attrs.data_layout) != "NCHW":
                return None
            groups = int(call.attrs.groups)
            strides = [int(v) for v in call.attrs.strides]
            kind = "dwconv" if groups == x[1] and groups > 1 and w[0] == x[1] else "conv"
            # in_h/in_w as the "same"-padded input that yields this output: lower_qdq pads
            # explicitly (zero points), so the conv's own input is larger than the layer's.
            return {"op": kind, "in_ch": x[1], "out_ch": w[0], "kernel": w[2], "stride": strides[0],
                    "in_h": y[2] * strides[0], "in_w": y[3] * strides[1], "groups": groups, "batch": x[0]}
        if op == "matmul":
            x, out = static_shape(call.args[0]), static_shape(call)
            if x is None or out is None or len(x) != 2:
                return None
            return {"op": "dense", "in_ch": x[1], "out_ch": out[-1], "kernel": 1, "stride": 1, "in_h": 1,
                    "in_w": 1, "groups": 1, "batch": x[0]}
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    return None
