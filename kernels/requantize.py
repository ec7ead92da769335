"""Exact division-free requantization: ONNX QuantizeLinear's ``rint(x / s)`` without a divide.

Why: every int8 layer ends in ``quantize(acc * m, s, z) = saturate(rint(fl(acc * m) / s) + z)``
and TVM's legalization emits that ``/ s`` as a float division per output (``vdivps``, ~10x a
multiply's cost): 12% of int8 MobileNetV2's time at 224 px, 1 thread. onnxruntime's optimized
QLinearConv multiplies by a folded ``m / s`` instead, but ``rint(a * fl(m / s))`` and
``rint(fl(a * m) / s)`` differ in rare outputs, and a one-step flip in a middle layer grows to
two steps at the output (docs/tvm_pitfalls.md; ``apq verify`` checks against the ONNX
semantics, i.e. the division).

How: Markstein's correction step (P. Markstein, IBM J. Res. Dev. 34(1), 1990, Theorem 1; also
Cornea, Harrison, Tang, *Scientific Computing on Itanium-based Systems*, 2002). With
``r = RN(1/s)`` (computed once at compile time; IEEE float32 division is correctly rounded):

    q0 = RN(x * r)           # within one ulp of x / s
    e  = fma(-q0, s, x)      # the residual x - q0 * s, exact (no rounding) for such q0
    q  = fma(e, r, q0)       # == RN(x / s), the correctly rounded quotient

so ``q`` is bit-identical to the division for every finite ``x``, and the rest of the
quantize (round half to even, + z, saturate) is unchanged. Cost: one multiply and two FMAs
instead of one division. Preconditions checked here at compile time: the scale is a scalar
float32 constant, finite, and a normal number with enough headroom that the residual ``e``
cannot be subnormal where the rounding matters (``|x / s| >= 0.5``); anything else falls back
to TVM's default legalization (the division). Non-finite and huge ``x`` are clamped first
(:data:`SATURATION_QUOTIENT`), which changes no output.

Exactness is tested, not just argued: tests/test_requantize.py compares the compiled kernel
with NumPy's float32 division on boundary-heavy inputs for many scales, and
tests/test_compile_parity.py checks whole int8 networks against unoptimized onnxruntime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: scales outside [2^-100, 2^100] keep the division: there the residual of a quotient >= 0.5
#: could leave float32's normal range and lose the exactness the correction step relies on.
SCALE_MIN, SCALE_MAX = 2.0 ** -100, 2.0 ** 100

#: ``x`` is clamped to ``+-s * 2^24`` before dividing: every quotient at or beyond that bound
#: saturates any integer output of <= 16 bits exactly as the division's would, so the result is
#: unchanged, while the correction step never sees an infinite or overflowing quotient (where its
#: FMAs would give NaN). NaN inputs end at the same saturated value as the division's (TVM's
#: float min/max return the non-NaN operand there, as its saturating clip does). Why not test
#: for non-finite values instead: ``isinf``/``isnan`` in TIR lowered to code 4x slower than the
#: division, and ``q == q`` is folded to true by TVM's (not IEEE-aware) simplifier.
SATURATION_QUOTIENT = 2.0 ** 24

#: ``|quotient|`` below which it is rounded straight to int32 (``llvm.lrint``: one ``vcvtps2dq``
#: on x86, ``frintx`` + ``fcvtzs`` on AArch64) and saturated in integers, instead of rounding in
#: float (``vrndscaleps``), adding the zero point, clipping in float and truncating: two fewer
#: 512-bit instructions per 16 outputs, and the zero point is added after the narrowing pack.
#: ``lrint`` rounds half to even in the default rounding mode, as ``rint`` does; quotients
#: beyond int32 would convert to INT_MIN, hence the bound (2^30 leaves room for ``+ z``).
INTEGER_ROUNDING_LIMIT = 2.0 ** 30


def exact_reciprocal(scale: float) -> float | None:
    """``RN(1/scale)`` in float32 when the correction step is exact for this scale, else None."""
    s = np.float32(scale)
    if not np.isfinite(s) or not (SCALE_MIN <= abs(float(s)) <= SCALE_MAX):
        return None
    return float(np.float32(1.0) / s)


def exact_quotient(x: Any, scale: Any, reciprocal: Any) -> Any:
    """TIR expression equal to ``RN(x / scale)`` for finite float32 ``x`` whose quotient is
    finite (see the module docstring; :func:`legalize_quantize` clamps ``x`` first).

    ``scale`` and ``reciprocal`` are Python floats (compile-time constants, the legalization's
    case) or float32 PrimExprs (the exhaustive test feeds them per row at run time).
    """
    from tvm import tirx
    from tvm.tirx.op import fma  # not re-exported by tvm.tirx in 0.27

    s = tirx.const(scale, "float32") if isinstance(scale, float) else scale
    r = tirx.const(reciprocal, "float32") if isinstance(reciprocal, float) else reciprocal
    q0 = x * r
    residual = fma(-q0, s, x)
    return fma(residual, r, q0)


def scalar_value(expr: Any) -> np.ndarray | None:
    """The one element of a constant (a 0-d or size-1 tensor), else None."""
    from apq.toolchain.layers import const_value

    value = const_value(expr)
    return None if value is None or value.size != 1 else value.reshape(-1)[0]


def output_range(out_dtype: str) -> tuple[int, int]:
    """(lowest, highest) value of an integer quantize output type: what it saturates to."""
    import tvm

    info = tvm.DataType(out_dtype)
    lowest = 0 if info.type_code == tvm.DataTypeCode.UINT else -(1 << (info.bits - 1))
    highest = (1 << info.bits) - 1 if lowest == 0 else (1 << (info.bits - 1)) - 1
    return lowest, highest


def round_saturate(q: Any, zero_point: int, out_dtype: str) -> Any:
    """TIR ``saturate(rint(q) + zero_point)`` to ``out_dtype``, rounding to int32 directly.

    Only for ``|q| <`` :data:`INTEGER_ROUNDING_LIMIT` (finite): see there.
    """
    from tvm import te, tirx

    lowest, highest = output_range(out_dtype)
    shifted = tirx.call_llvm_pure_intrin("int32", "llvm.lrint", q) + tirx.const(zero_point, "int32")
    clipped = te.max(te.min(shifted, tirx.const(highest, "int32")), tirx.const(lowest, "int32"))
    return clipped.astype(out_dtype)


def exact_quantize_params(call: Any) -> tuple[float, float, int, str] | None:
    """(scale, reciprocal, zero point, out dtype) of a ``relax.quantize`` the division-free
    compute covers: scalar float32 constant scale in the proven range, scalar constant zero
    point, integer output of <= 16 bits. None: keep TVM's default legalization."""
    import tvm

    scale, zp = scalar_value(call.args[1]), scalar_value(call.args[2])
    out_dtype = str(call.attrs.out_dtype)
    if scale is None or zp is None or scale.dtype != np.float32 or "int" not in out_dtype:
        return None
    if tvm.DataType(out_dtype).bits > 16:
        return None
    reciprocal = exact_reciprocal(float(scale))
    return None if reciprocal is None else (float(scale), reciprocal, int(zp), out_dtype)


def legalize_quantize(bb: Any, call: Any) -> Any:
    """``relax.quantize`` -> TE, dividing by a scalar constant scale without a divide.

    Same computation, rounding and saturation as TVM's default legalization (which it falls
    back to for per-channel or non-constant scales, float outputs, or scales the correction
    step does not cover), so fusion and apq's schedules see the same single elementwise block.
    """
    import tvm

    default = tvm.ir.Op.get("relax.quantize").get_attr("FLegalize")
    params = exact_quantize_params(call)
    if params is None:
        return default(bb, call)
    compute = quantize_compute(*params, clamp=True)
    return bb.call_te(compute, call.args[0], primfunc_name_hint="quantize")


def quantize_compute(scale: float, reciprocal: float, zero_point: int, out_dtype: str, clamp: bool = True,
                     integer_rounding: bool = True) -> Any:
    """TE compute of ``saturate(rint(x / scale) + zero_point)`` via :func:`exact_quotient`.

    ``clamp=False`` omits the +-``scale * 2^24`` input clamp; only for inputs proven finite and
    bounded (kernels/requantize_bounds.py), where it changes no output. ``integer_rounding``
    rounds and saturates in int32 (:func:`round_saturate`); it needs ``|x / scale|`` below
    :data:`INTEGER_ROUNDING_LIMIT`, which the clamp guarantees, so an unclamped caller must
    prove it (else pass False: round and clip in float, as TVM's legalization does).
    """
    from tvm import te, tirx
    from tvm.relax.transform.legalize_ops.qdq import clip_cast  # the default legalization's saturation

    bound = tirx.const(float(np.float32(abs(scale) * SATURATION_QUOTIENT)), "float32")

    def compute(data: Any) -> Any:
        def element(*indices: Any) -> Any:
            x = data[indices]
            if clamp:
                x = te.max(te.min(x, bound), -bound)  # +-inf, NaN: see SATURATION_QUOTIENT
            q = exact_quotient(x, scale, reciprocal)
            if integer_rounding or clamp:
                return round_saturate(q, zero_point, out_dtype)
            return clip_cast(te.round(q) + tirx.const(zero_point, "float32"), out_dtype)

        return te.compute(data.shape, element, name="quantized")

    return compute


def legalize_map() -> dict[str, Any]:
    """Overrides for ``relax.transform.LegalizeOps(customize_legalize_map=...)``."""
    return {"relax.quantize": legalize_quantize}


__all__ = ["exact_reciprocal", "exact_quotient", "legalize_quantize", "legalize_map", "quantize_compute", "scalar_value", "exact_quantize_params", "output_range", "round_saturate", "INTEGER_ROUNDING_LIMIT", "SCALE_MIN",
           "SCALE_MAX"]
