"""Lower fake-quant QDQ Relax graphs to integer conv2d / matmul kernels.

TVM 0.27's ONNX frontend imports QuantizeLinear/DequantizeLinear faithfully but runs every
Conv/Gemm in float on dequantized tensors ("fake quant"): the model is numerically
quantized yet no integer kernel ever executes. :func:`lower_qdq` rewrites

    conv2d(dequantize(q_x, s_x, z_x), dequantize(W_q, s_w[c], 0)) [+ dequantize(b_q, s_x*s_w[c], 0)]

into ``conv2d(q_x, W_q, out_dtype="int32")`` (int8/uint8 x int8, exact int32 accumulation),
an integer bias add, and one float rescale by ``s_x * s_w[c]`` per output channel. The
following ``quantize`` (the requantization), relu/clip and the next layer's dequantize are
left as they are: they already implement ONNX's rounding (round half to even, saturate),
so the lowered graph computes exactly what the QDQ graph specifies, up to float32 rounding
of the rescale (a rare one-LSB flip, as in onnxruntime's own QLinearConv). TVM's FuseOps
folds the bias, rescale and quantize into the integer conv's kernel as an epilogue
(``fused_conv2d_add_cast_multiply_quantize``), so the int32 accumulator never hits memory.

Nonzero activation zero points (uint8 from onnxruntime's quantize_static) are handled
exactly: conv(q_x - z_x, W) = conv(pad(q_x, value=z_x), W) - z_x * sum(W[c]). The padding
must be done with z_x (not 0), because padding zeros in the float graph are the real value
0.0, i.e. z_x in the quantized domain.

On request (``float_accumulation``: worth it where pointwise convs go to x86 VNNI) KxK
convs (the stem, depthwise) keep their 8-bit operands but accumulate in float32, which is
bit-identical to int32 whenever the sums stay within 2^24 (checked per conv on the actual
weights, see :func:`float_accumulation_is_exact`) and runs as one FMA per tap instead of
LLVM's byte -> int16 -> int32 widening. Such a conv also adds its bias and zero-point offset
in float32 where that too stays exact (:func:`_float_offset_is_exact`), instead of converting to
int32 and back (224 px MobileNetV2 int8, 1 thread, interleaved: 1.03x, outputs bit-identical).

The requantization's division by ``s_y`` is kept in the graph: apq's legalization
(kernels/requantize.py) computes it without a divide instruction, bit-identical to the division.
Folding ``1 / s_y`` into the rescale (onnxruntime's optimized QLinearConv) was tried and
dropped: it flips rare outputs by one step against the ONNX semantics.

Anything the rewrite cannot prove exact (nonzero weight zero points, per-channel activation
scales, non-NCHW layouts) stays float and :func:`apq.toolchain.layers.describe_layers`
reports it as fake quant: an honest float layer beats a wrong integer one.

Bit-widths below 8 (apq's convention, docs/qdq_convention.md) do not change the kernels
here (values live in 8-bit containers); they are carried to the layer report through
module attributes keyed by weight fingerprints, see :func:`read_bits_hint`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.layers import (
    WEIGHT_BITS_ATTR,
    WEIGHT_NAMES_ATTR,
    const_value as _const,
    range_bits,
    weight_fingerprint,
)

CONVENTION_KEY = "apq.qdq_convention"
BITS_KEY = "apq.bits"
#: read_bits_hint adds "<initializer name>@<fingerprint>" aliases for weights, so that
#: lower_qdq (which sees Relax constants, not ONNX names) can find a weight's bits.
ALIAS_SEP = "@"


# --------------------------------------------------------------------------- bits hint (ONNX side)


def _initializers(model: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold clip bounds in some exporters
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    arrays[node.output[0]] = numpy_helper.to_array(attr.t)
    return arrays


def _parse_bits_metadata(model: Any) -> dict[str, int]:
    props = {p.key: p.value for p in model.metadata_props}
    if BITS_KEY not in props:
        return {}
    try:
        raw = json.loads(props[BITS_KEY])
        bits = {str(k): int(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidInputError(f"model metadata {BITS_KEY!r} is not a JSON object of integers: {e}") from None
    bad = {k: v for k, v in bits.items() if not 1 <= v <= 8}
    if bad:
        raise InvalidInputError(f"model metadata {BITS_KEY!r} has bit-widths outside 1..8: {bad}")
    return bits


def read_bits_hint(onnx_model: Any) -> dict[str, int]:
    """Per-tensor bit-widths of a QDQ model, following apq's QDQ convention.

    Keys are ONNX names: weight initializers feeding a DequantizeLinear, and activation
    QuantizeLinear outputs. ``apq.bits`` metadata is trusted when present; otherwise an
    activation's bits are inferred from the Clip that follows its QuantizeLinear, and a
    weight's are 8. Each weight also gets an alias ``"<name>@<fingerprint>"`` (fingerprint
    of its integer values), which is how :func:`lower_qdq` recognises it after import.
    """
    declared = _parse_bits_metadata(onnx_model)
    arrays = _initializers(onnx_model)
    consumers: dict[str, list[Any]] = {}
    for node in onnx_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    hint: dict[str, int] = {}
    for node in onnx_model.graph.node:
        if node.op_type == "QuantizeLinear":
            out = node.output[0]
            hint[out] = declared.get(out, _activation_bits_from_clip(out, consumers, arrays))
        elif node.op_type == "DequantizeLinear":
            name = node.input[0]
            w = arrays.get(name)
            if w is None or w.dtype not in (np.int8, np.uint8):
                continue  # an activation, or an int32 bias: no bit-width of its own
            bits = declared.get(name, 8)
            hint[name] = bits
            hint[f"{name}{ALIAS_SEP}{weight_fingerprint(w)}"] = bits
    for name, bits in declared.items():  # names we could not classify are kept as given
        hint.setdefault(name, bits)
    return hint


def _activation_bits_from_clip(out: str, consumers: dict[str, list[Any]], arrays: dict[str, np.ndarray]) -> int:
    for node in consumers.get(out, []):
        if node.op_type == "Clip" and len(node.input) >= 3:
            lo, hi = arrays.get(node.input[1]), arrays.get(node.input[2])
            if lo is not None and hi is not None:
                return min(8, range_bits(int(lo), int(hi)))
    return 8


def _weight_hints(bits_hint: dict[str, int] | None) -> dict[str, tuple[str, int]]:
    """fingerprint -> (ONNX name, bits), from the aliases read_bits_hint wrote."""
    out: dict[str, tuple[str, int]] = {}
    for key, bits in (bits_hint or {}).items():
        name, sep, fp = key.rpartition(ALIAS_SEP)
        if sep and len(fp) == 16 and all(c in "0123456789abcdef" for c in fp):
            out[fp] = (name, int(bits))
    return out


# --------------------------------------------------------------------------- Relax side


def _attr(call: Any, key: str) -> Any:
    return getattr(call.attrs, key) if call.attrs is not None and hasattr(call.attrs, key) else None


@dataclass
class _Dequant:
    """A dequantize(q, scale, zero_point, axis) whose scale and zero point are constants."""

    q: Any  # the integer expression (Relax)
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int

    @classmethod
    def of(cls, call: Any) -> "_Dequant | None":
        scale, zp = _const(call.args[1]), _const(call.args[2])
        if scale is None or zp is None:
            return None
        return cls(call.args[0], scale.astype(np.float32), zp, int(_attr(call, "axis")))


def weight_range_problem(w: np.ndarray, bits: int) -> str:
    """'' if the integer weight ``w`` fits its declared ``bits``, else what is wrong with it.

    ``bits`` >= 2: two's complement levels. 1 bit: apq's binary levels ``{-1, +1}`` (the QDQ
    convention, docs/qdq_convention.md, what the supernet's 1-bit quantizer writes) or the
    two's complement ``{-1, 0}``; a two's complement range alone would reject every binary layer
    apq exports.
    """
    if not w.size:
        return ""
    lo, hi = int(w.min()), int(w.max())
    if bits == 1:
        levels = set(np.unique(w).tolist())
        if levels <= {-1, 1} or levels <= {-1, 0}:
            return ""
        return f"holds the levels {sorted(levels)}, not its declared 1-bit levels {{-1, +1}} (or {{-1, 0}})"
    top = 1 << (bits - 1)
    if lo < -top or hi > top - 1:
        return f"holds values in [{lo}, {hi}], outside its declared {bits}-bit range [{-top}, {top - 1}]"
    return ""


@dataclass
class _Lowering:
    """State of one lower_qdq run: bit-widths to look up and to record."""

    weight_hints: dict[str, tuple[str, int]]
    weight_bits: dict[str, int] = field(default_factory=dict)
    weight_names: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # raised after the rewrite (not across the FFI)
    #: shift int8 activations of pointwise convs to uint8 (x + 128, zero point + 128): exact, and
    #: lets u8 x s8 dot-product instructions (x86 VNNI vpdpbusd) run them.
    uint8_pointwise: bool = False
    #: accumulate KxK integer convs (depthwise, the stem) in float32 where that is provably
    #: exact (see :func:`float_accumulation_is_exact`).
    float_accumulation: bool = False
    #: shift int8 activations of few-channel KxK convs (the RGB stem, int8_layout.gathers_patches)
    #: to uint8 like ``uint8_pointwise`` does, and keep them on int32 accumulation: the NHWC int8
    #: layout then runs them as a patch gather + u8 x s8 pointwise conv (toolchain/patch_gather.py).
    uint8_stems: bool = False
    #: the same for depthwise KxK convs the NHWC int8 layout runs on ``vpdpbusd``
    #: (int8_layout.packs_depthwise, kernels/x86_int8_depthwise.py): u8 input, int32 accumulation.
    vnni_depthwise: bool = False
    #: weight fingerprints (:func:`apq.toolchain.layers.weight_fingerprint` of the integer weight
    #: as emitted) of layers lowered plainly whatever the two options above say: the layers a
    #: bit-serial plan takes, which need their zero-point-0 integer input and int32 accumulator.
    plain_layers: frozenset[str] = frozenset()

    def weight(self, w: np.ndarray, emitted: np.ndarray) -> None:
        """Record bits of a lowered weight (keyed by the constant as emitted) and check them."""
        name, bits = self.weight_hints.get(weight_fingerprint(w), ("", 8))
        problem = weight_range_problem(w, bits)
        if problem:
            self.errors.append(f"weight {name or 'initializer'} {problem}")
        fp = weight_fingerprint(emitted)
        self.weight_bits[fp] = bits
        if name:
            self.weight_names[fp] = name


def _per_channel(scale: np.ndarray, channels: int, axis: int, want_axis: int) -> np.ndarray | None:
    """Weight scale as a vector over output channels, or None if it is over another axis."""
    if scale.size == 1:
        return np.full(channels, scale.reshape(()), dtype=np.float32)
    if scale.size == channels and axis == want_axis:
        return scale.reshape(channels).astype(np.float32)
    return None


def _activation(deq: _Dequant) -> tuple[int, float] | None:
    """(zero point, scale) of a per-tensor int8/uint8 activation, else None."""
    if deq.scale.size != 1 or deq.zero_point.size != 1:
        return None
    if str(deq.q.ty.dtype) not in ("int8", "uint8"):
        return None
    return int(deq.zero_point.reshape(())), float(deq.scale.reshape(()))


def _int_weight(deq: _Dequant) -> np.ndarray | None:
    """The int8 weight values if the weight is symmetric (zero points all 0)."""
    w = _const(deq.q)
    if w is None or w.dtype != np.int8 or np.any(deq.zero_point != 0):
        return None
    return w


def _bias_q(bias: Any, out_scale: np.ndarray) -> np.ndarray | None:
    """int32 bias values if bias = dequantize(b_q, s_x*s_w, 0): then it adds exactly in int32."""
    deq = _Dequant.of(bias)
    b = _const(deq.q) if deq is not None else None
    if b is None or b.dtype != np.int32 or np.any(deq.zero_point != 0) or b.size != out_scale.size:
        return None
    scale = np.broadcast_to(deq.scale.reshape(-1), out_scale.shape)
    if not np.allclose(scale, out_scale, rtol=1e-5, atol=0):
        return None
    return b.reshape(-1)


def _rescale(acc: Any, out_scale: np.ndarray, offset: np.ndarray, bshape: tuple[int, ...]) -> Any:
    """int32 accumulator + int32 ``offset`` (bias minus the zero point's share) -> float32 by the
    per-channel scale s_x * s_w[c].

    One add of the combined constant, not a subtract and an add: int32 addition wraps modulo
    2^32, so ``(acc - a) + b`` and ``acc + (b - a)`` are the same bits for every input, and
    small-K pointwise convs (16 input channels: 4 ``vpdpbusd`` per 16 outputs) spend more
    instructions in this epilogue than in their products."""
    from tvm import relax

    if np.any(offset):
        wrapped = offset.astype(np.int64).astype(np.int32)  # two's complement wrap, as int32 adds do
        acc = relax.op.add(acc, relax.const(wrapped.reshape(bshape)))
    return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(out_scale.reshape(bshape)))


@dataclass
class _Match:
    """The calls one pattern match binds: the dot op, its dequantized operands, the bias."""

    dot: Any  # conv2d / matmul call
    x: Any  # dequantize call of the activation
    w: Any  # dequantize call of the weight
    w_transposed: bool = False  # weight went through permute_dims([1, 0]) (Gemm transB)
    bias: Any | None = None  # dequantize call of the bias, when the rule folds it


def _operands(m: _Match) -> "tuple[int, float, np.ndarray, _Dequant] | None":
    """(z_x, s_x, W_int8, weight dequant) when the activation and weight are lowerable."""
    x_deq, w_deq = _Dequant.of(m.x), _Dequant.of(m.w)
    if x_deq is None or w_deq is None:
        return None
    act, w = _activation(x_deq), _int_weight(w_deq)
    if act is None or w is None:
        return None
    return act[0], act[1], w, w_deq


#: float32 has a 24-bit significand: every integer of magnitude <= 2^24 is exactly representable.
F32_EXACT_INT = 1 << 24


def float_accumulation_is_exact(w: np.ndarray, data_dtype: str) -> bool:
    """Does a float32 accumulation of ``conv2d(x, w)`` give exactly the int32 result?

    Why float at all: LLVM vectorizes an ``u8 x s8 -> i32`` KxK conv by widening every tap's
    bytes to int16/int32 (measured at 224 px, 1 thread: the int8 depthwise convs ~2x the float
    ones, the int8 stem 1.4x), while a float32 FMA per tap is one instruction.

    Proof of exactness: ``x`` holds integers with ``|x| <= xmax`` (255 for uint8, 128 for
    int8; padding values are zero points, in the same range), ``w`` integers. Every product
    ``x * w`` and every partial sum of output channel ``c``, in *any* order of summation
    (vector lanes, reassociation), has magnitude ``<= xmax * sum(|w[c]|) = B``. If ``B <=
    2^24`` every operand and every exact result of each float add/FMA is an integer that
    float32 represents exactly, and IEEE rounding of an exactly representable result is the
    result itself: no step rounds, so the float sum equals the int32 sum bit for bit (and the
    cast back to int32 is exact). Worst case of a 3x3 depthwise: 9 * 255 * 128 = 293,760; a
    3-channel 3x3 stem: 27 * 255 * 128 = 881,280; both far below 2^24 = 16,777,216. The check
    uses the actual weights, so it holds for the constants compiled, not just for typical ones.
    """
    bound = _accumulator_bound(w, data_dtype)
    return bound is not None and bound <= F32_EXACT_INT


def _accumulator_bound(w: np.ndarray, data_dtype: str) -> int | None:
    """``B = xmax * max_c sum(|w[c]|)``, the largest magnitude any partial sum of
    ``conv2d(x, w)`` reaches (:func:`float_accumulation_is_exact`), or None for other operands."""
    xmax = {"uint8": 255, "int8": 128}.get(data_dtype)
    if xmax is None or w.ndim != 4 or w.size == 0:
        return None
    return int(np.abs(w.astype(np.int64)).reshape(w.shape[0], -1).sum(axis=1).max()) * xmax


def _float_offset_is_exact(w: np.ndarray, data_dtype: str, offset: np.ndarray) -> bool:
    """May a float-accumulated conv add its per-channel integer ``offset`` (bias minus the zero
    point's share) in float32 and still hold the exact int32 result?

    Why: the int32 route (``astype(acc, int32) + offset``, then ``astype(float32)``) costs three
    vector instructions per 16 outputs (convert, add, convert back) where a float add is one;
    in a depthwise conv's epilogue that is a fifth of its instructions. Exact when every value is
    an integer of magnitude <= 2^24: ``|acc| <= B`` (:func:`float_accumulation_is_exact`'s bound)
    and ``|acc + offset| <= B + max|offset|``; so the float add rounds nothing and equals the
    int32 sum, converted, bit for bit.
    """
    bound = _accumulator_bound(w, data_dtype)
    return bound is not None and bound + int(np.abs(offset).max(initial=0)) <= F32_EXACT_INT


def _offset(bias_q: np.ndarray | None, zero_share: np.ndarray) -> np.ndarray:
    """Per output channel, what the epilogue adds to the accumulator: the int32 bias (if any)
    minus the activation zero point's share ``z_x * sum(W[c])``, in int64."""
    return (bias_q.astype(np.int64) if bias_q is not None else 0) - zero_share.astype(np.int64)


def _rescale_float(acc: Any, offset: np.ndarray, out_scale: np.ndarray, bshape: tuple[int, ...]) -> Any:
    """float32 integer-valued accumulator + integer offset (exact, :func:`_float_offset_is_exact`)
    -> float32 by the per-channel scale: the same values as :func:`_rescale` on the int32 route."""
    from tvm import relax

    if np.any(offset):
        acc = relax.op.add(acc, relax.const(offset.astype(np.float32).reshape(bshape)))
    return relax.op.multiply(acc, relax.const(out_scale.reshape(bshape)))


def _lower_conv2d(state: _Lowering, m: _Match) -> Any | None:
    """conv2d(dequantize(x), dequantize(W)) [+ bias] -> integer conv2d + rescale, or None."""
    from tvm import relax

    from apq.toolchain.int8_layout import gathers_patches, packs_depthwise

    conv = m.dot
    if str(_attr(conv, "data_layout")) != "NCHW" or str(_attr(conv, "kernel_layout")) != "OIHW":
        return None
    ops = _operands(m)
    if ops is None:
        return None
    zx, sx, w, w_deq = ops
    out_ch = w.shape[0]
    sw = _per_channel(w_deq.scale, out_ch, w_deq.axis % w.ndim, 0)
    if sw is None:
        return None
    out_scale = (np.float32(sx) * sw).astype(np.float32)
    bias_q = _bias_q(m.bias, out_scale) if m.bias is not None else None
    if m.bias is not None and bias_q is None:
        return None  # bias not exactly integer: the bias-free rule lowers the conv alone

    padding = [int(p) for p in _attr(conv, "padding")]  # (top, left, bottom, right)
    kwargs = dict(strides=[int(s) for s in _attr(conv, "strides")],
                  dilation=[int(d) for d in _attr(conv, "dilation")],
                  groups=int(_attr(conv, "groups")), out_dtype="int32")
    data = _Dequant.of(m.x).q
    pointwise = w.shape[2:] == (1, 1) and kwargs["groups"] == 1
    # KxK convs only: 1x1 convs are GEMMs, which the int8 dot-product instructions run faster
    data_dtype = str(data.ty.dtype)
    plain = weight_fingerprint(w) in state.plain_layers
    stem = state.uint8_stems and not plain and gathers_patches(w, kwargs["groups"])  # int8_layout's gather
    dw_dot = (state.vnni_depthwise and not plain and kwargs["dilation"] == [1, 1]
              and packs_depthwise(w, kwargs["groups"]))  # int8_layout's vpdpbusd depthwise kernel
    float_acc = (state.float_accumulation and not plain and not stem and not dw_dot and w.shape[2] * w.shape[3] > 1
                 and float_accumulation_is_exact(w, data_dtype))
    if ((state.uint8_pointwise and pointwise) or stem or dw_dot) and not plain and data_dtype == "int8":
        data = relax.op.astype(relax.op.add(relax.op.astype(data, "int16"), relax.const(128, "int16")), "uint8")
        zx += 128
    if zx != 0 and any(padding):
        # Padding is the real value 0.0, i.e. z_x in the quantized domain: pad explicitly.
        top, left, bottom, right = padding
        data = relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], pad_value=float(zx))
        padding = [0, 0, 0, 0]
    wsum = w.astype(np.int64).reshape(out_ch, -1).sum(axis=1)
    state.weight(w, w)
    offset = _offset(bias_q, zx * wsum)
    if float_acc:  # exact (float_accumulation_is_exact); operands stay 8-bit integers in memory
        acc = relax.op.nn.conv2d(data, relax.const(w), padding=padding, **{**kwargs, "out_dtype": "float32"})
        if _float_offset_is_exact(w, data_dtype, offset):
            return _rescale_float(acc, offset, out_scale, (1, out_ch, 1, 1))
        acc = relax.op.astype(acc, "int32")
    else:
        acc = relax.op.nn.conv2d(data, relax.const(w), padding=padding, **kwargs)
    return _rescale(acc, out_scale, offset, (1, out_ch, 1, 1))


def _lower_matmul(state: _Lowering, m: _Match) -> Any | None:
    """matmul(dequantize(x), [permute_dims](dequantize(W))) [+ bias] -> integer matmul + rescale."""
    from tvm import relax

    ops = _operands(m)
    if ops is None:
        return None
    zx, sx, w, w_deq = ops
    if w.ndim != 2:
        return None
    w_kn = np.ascontiguousarray(w.T if m.w_transposed else w)
    out_ch = w_kn.shape[1]
    sw = _per_channel(w_deq.scale, out_ch, w_deq.axis % 2, 0 if m.w_transposed else 1)
    if sw is None:
        return None
    out_scale = (np.float32(sx) * sw).astype(np.float32)
    bias_q = _bias_q(m.bias, out_scale) if m.bias is not None else None
    if m.bias is not None and bias_q is None:
        return None
    acc = relax.op.matmul(_Dequant.of(m.x).q, relax.const(w_kn), out_dtype="int32")
    # no padding in a matmul: the zero point's share is a per-column constant
    offset = _offset(bias_q, zx * w_kn.astype(np.int64).sum(axis=0))
    state.weight(w, w_kn)
    return _rescale(acc, out_scale, offset, (out_ch,))


@dataclass(frozen=True)
class _Rule:
    """One rewrite: a Relax dataflow pattern and the lowering to apply to its matches."""

    name: str
    op: str
    with_bias: bool
    lower: Callable[[_Lowering, _Match], Any | None]


#: Registry of lowering rules, tried in order (bias-folding forms before bare ones).
RULES: tuple[_Rule, ...] = (
    _Rule("conv2d+bias", "relax.nn.conv2d", True, _lower_conv2d),
    _Rule("matmul+bias", "relax.matmul", True, _lower_matmul),
    _Rule("conv2d", "relax.nn.conv2d", False, _lower_conv2d),
    _Rule("matmul", "relax.matmul", False, _lower_matmul),
)


def _apply_rule(func: Any, rule: _Rule, state: _Lowering) -> Any:
    from tvm.relax import dpl

    def deq() -> Any:
        return dpl.is_op("relax.dequantize")(dpl.wildcard(), dpl.is_const(), dpl.is_const())

    x_deq, w_deq = deq(), deq()
    w_perm = dpl.is_op("relax.permute_dims")(w_deq)
    weight = (w_deq | w_perm) if rule.op == "relax.matmul" else w_deq
    dot = dpl.is_op(rule.op)(x_deq, weight)
    b_deq = deq()
    pattern = dot
    if rule.with_bias:
        pattern = dpl.is_op("relax.add")(dot, b_deq | dpl.is_op("relax.reshape")(b_deq, dpl.wildcard()))

    def rewrite(expr: Any, matches: Any) -> Any:
        match = _Match(dot=matches[dot], x=matches[x_deq], w=matches[w_deq],
                       w_transposed=w_perm in matches,
                       bias=matches[b_deq] if rule.with_bias else None)
        lowered = rule.lower(state, match)
        return expr if lowered is None else lowered

    return dpl.rewrite_call(pattern, rewrite, func)


def lower_qdq(mod: Any, bits_hint: dict[str, int] | None = None, func_name: str = "main",
              uint8_pointwise: bool = False, float_accumulation: bool = False, uint8_stems: bool = False,
              vnni_depthwise: bool = False, plain_layers: frozenset[str] = frozenset()) -> Any:
    """Rewrite fake-quant conv2d/matmul chains of ``mod[func_name]`` into integer kernels.

    ``bits_hint`` is :func:`read_bits_hint`'s result (or None: all weights 8-bit). Returns a
    new module (the input is not modified) whose attributes record the weight bit-widths
    for :func:`apq.toolchain.layers.describe_layers`. Raises InvalidInputError if a weight
    holds values outside its declared bit range. ``uint8_pointwise`` re-biases int8 inputs
    of pointwise convs to uint8 (exact; for targets whose fast int8 dot product is u8 x s8).
    ``float_accumulation`` accumulates KxK integer convs in float32 where that is provably
    bit-exact (:func:`float_accumulation_is_exact`): measured faster on x86 AVX-512 (whose
    VNNI takes the 1x1 convs; int8 MobileNetV2 at 224 px 0.67x -> 0.83x of onnxruntime), not
    yet measured on ARM. Off by default: the layer report then names these kernels
    ``conv2d.uint8xint8->float32`` (8-bit operands, float32 accumulator), not ``...->int32``.
    ``uint8_stems`` re-biases int8 inputs of few-channel KxK convs (int8_layout.gathers_patches)
    the same way and keeps them on int32 accumulation, for a layout that gathers them into patches
    (toolchain/int8_layout.py). ``vnni_depthwise`` does the same for the depthwise convs
    :func:`apq.toolchain.int8_layout.packs_depthwise` accepts (u8 input, int32 accumulator), which
    that layout runs on ``vpdpbusd``. ``plain_layers`` (integer weight fingerprints) exempts layers
    from these options: the ones a bit-serial plan
    (:func:`apq.toolchain.bitserial_lowering.plan_bitserial`) takes.
    """
    from tvm import relax

    state = _Lowering(_weight_hints(bits_hint), uint8_pointwise=uint8_pointwise,
                      float_accumulation=float_accumulation, uint8_stems=uint8_stems,
                      vnni_depthwise=vnni_depthwise, plain_layers=frozenset(plain_layers))
    func = mod[func_name]
    for rule in RULES:
        func = _apply_rule(func, rule, state)
    if state.errors:  # raised here: exceptions inside the rewriter callback lose their type in the FFI
        raise InvalidInputError(state.errors[0])
    func = relax.analysis.remove_all_unused(func)
    out = mod.clone() if hasattr(mod, "clone") else mod
    out[func_name] = func
    out = relax.transform.Normalize()(out)
    previous_bits = dict(out.get_attr(WEIGHT_BITS_ATTR) or {}) if out.attrs is not None else {}
    previous_names = dict(out.get_attr(WEIGHT_NAMES_ATTR) or {}) if out.attrs is not None else {}
    out = out.with_attr(WEIGHT_BITS_ATTR, {**{str(k): int(v) for k, v in previous_bits.items()},
                                           **state.weight_bits})
    out = out.with_attr(WEIGHT_NAMES_ATTR, {**{str(k): str(v) for k, v in previous_names.items()},
                                            **state.weight_names})
    return out
