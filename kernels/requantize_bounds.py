"""Drop the saturation clamp of a requantize whose input is provably finite and bounded.

Why: :func:`apq.kernels.requantize.legalize_quantize` clamps its input to ``+-s * 2^24`` before
the division-free quotient, so that an infinite, NaN or overflowing ``x`` saturates exactly as
the division would. That clamp is two vector instructions (min, max) per 16 outputs in every
int8 layer's epilogue, about an eighth of it, and measured 8-10% of the fused kernel's time on
int8 MobileNetV2 layers (pointwise 16->64 at 112 px, depthwise 3x3 at 112 px, 1 thread).

But an int8 layer's requantize never sees such an ``x``: its input is
``RN(float(acc) * m)`` with an integer accumulator ``acc`` and constant multipliers ``m``, so
``|x| <= 2^31 * max|m|``, finite. When that bound, times the reciprocal of the scale, is far
below float32's overflow (:data:`QUOTIENT_LIMIT`), every step of the correction
(``q0 = RN(x r)``, ``e = fma(-q0, s, x)``, ``q = fma(e, r, q0)``) is finite and exact as in the
clamped version, quotients at or beyond ``2^24`` saturate identically through the output
clip, and the clamp changes no output: it can go. :func:`drop_proven_clamps` proves the bound
by walking the Relax dataflow bindings above each ``quantize`` through a handful of ops
(astype from an integer, multiply/add/subtract by constants or other bounded values,
dequantize, min/max/clip) and rewrites the quantizes it can prove into the unclamped TE
compute; anything it cannot prove (a float model input, an unknown op) keeps the clamp.

Tested in tests/test_requantize.py: bit-identical to the clamped legalization on extreme int32
accumulators, and the rewrite fires on an int8 network's layers but not on its input quantize.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from apq.toolchain.layers import const_value, mutate_functions, static_shape, tensor_dtype

#: Largest proven ``bound(x) * |1/s|`` that drops the clamp: 2^100, far below float32's 2^128.
QUOTIENT_LIMIT = 2.0 ** 100
#: How many bindings up the dataflow the proof may look (an int8 epilogue is 3-5 ops deep).
MAX_DEPTH = 12
#: Relative slack per float operation for its rounding (float32 unit roundoff is 2^-24).
_ROUNDING_SLACK = 1.0 + 2.0 ** -20


def _const_bound(expr: Any) -> float | None:
    """max |value| of a finite Relax constant, else None."""
    value = const_value(expr)
    if value is None or value.size == 0:
        return None
    v = np.abs(value.astype(np.float64))
    return float(v.max()) if np.all(np.isfinite(v)) else None


def _int_range_bound(dtype: str) -> float | None:
    """max |value| of an integer dtype (``2^31`` for int32), else None for non-integers."""
    if not dtype.startswith(("int", "uint")):
        return None
    info = np.iinfo(np.dtype(dtype))
    return float(max(abs(int(info.min)), int(info.max)))


def value_bound(expr: Any, var2val: dict[Any, Any], depth: int = 0) -> float | None:
    """A proven upper bound of ``|expr|`` for every input, or None when it cannot be proven."""
    from tvm import relax

    if depth > MAX_DEPTH:
        return None
    constant = _const_bound(expr)
    if constant is not None:
        return constant
    as_int = _int_range_bound(tensor_dtype(expr))
    if as_int is not None:
        return as_int
    if isinstance(expr, relax.Var):
        bound_to = var2val.get(expr)
        return None if bound_to is None else value_bound(bound_to, var2val, depth + 1)
    if not isinstance(expr, relax.Call):
        return None
    op = getattr(expr.op, "name", "")
    rule = _RULES.get(op)
    return None if rule is None else rule(expr, lambda e: value_bound(e, var2val, depth + 1))


def _both(call: Any, bound: Any, combine: Any) -> float | None:
    a, b = (bound(arg) for arg in call.args[:2])
    return None if a is None or b is None else combine(a, b) * _ROUNDING_SLACK


def _astype(call: Any, bound: Any) -> float | None:
    """To float32: an integer source's range (float32 of an int32 is at most 2^31), else the
    source's bound. Narrower floats (float16 overflows at 65504) are not followed."""
    if tensor_dtype(call) != "float32":
        return None
    limit = _int_range_bound(tensor_dtype(call.args[0]))
    return limit if limit is not None else bound(call.args[0])


def _mean(call: Any, bound: Any) -> float | None:
    """|mean| <= max |x|, provided the running sum (at most numel * max |x|) cannot overflow."""
    b, shape = bound(call.args[0]), static_shape(call.args[0])
    numel = int(np.prod(shape)) if shape is not None else None  # None: symbolic dims
    if b is None or numel is None or b * numel >= QUOTIENT_LIMIT:
        return None
    return b * _ROUNDING_SLACK


def _dequantize(call: Any, bound: Any) -> float | None:
    """``(q - z) * s`` with an integer q and constant s, z."""
    q_range = _int_range_bound(tensor_dtype(call.args[0]))
    s, z = _const_bound(call.args[1]), _const_bound(call.args[2])
    if q_range is None or s is None or z is None:
        return None
    return (q_range + z) * s * _ROUNDING_SLACK


def _clip(call: Any, bound: Any) -> float | None:
    """clip(x, lo, hi) lies within its limits (when both are known numbers)."""
    limits = [_prim_or_const(a) for a in call.args[1:3]]
    if len(limits) != 2 or any(v is None for v in limits):
        return None
    return max(abs(v) for v in limits)


def _conv(call: Any, bound: Any) -> float | None:
    """A conv of a bounded input with constant weights: every output sums a subset of the
    products, so ``|out| <= max|x| * sum|w|`` whatever the layout, groups or padding (padding
    adds zeros; a zero point is padded explicitly, as data). Covers the exact float-accumulated
    integer convs of qdq_lowering, whose output is float32."""
    x, w = bound(call.args[0]), const_value(call.args[1])
    if x is None or w is None or not np.all(np.isfinite(w.astype(np.float64))):
        return None
    return x * float(np.abs(w.astype(np.float64)).sum()) * _ROUNDING_SLACK


def _prim_or_const(expr: Any) -> float | None:
    """A finite number from a Relax PrimValue or scalar constant, else None."""
    value = getattr(getattr(expr, "value", None), "value", None)  # relax.PrimValue(FloatImm/IntImm)
    if isinstance(value, (int, float)) and np.isfinite(value):
        return float(value)
    return _const_bound(expr)


_RULES = {
    "relax.astype": _astype,
    "relax.multiply": lambda c, b: _both(c, b, lambda x, y: x * y),
    "relax.add": lambda c, b: _both(c, b, lambda x, y: x + y),
    "relax.subtract": lambda c, b: _both(c, b, lambda x, y: x + y),
    "relax.dequantize": _dequantize,
    "relax.maximum": lambda c, b: _both(c, b, max),
    "relax.minimum": lambda c, b: _both(c, b, max),
    "relax.clip": _clip,
    "relax.nn.relu": lambda c, b: b(c.args[0]),
    "relax.mean": _mean,
    "relax.nn.conv2d": _conv,
    # value-preserving: |out| <= max |in|
    "relax.reshape": lambda c, b: b(c.args[0]),
    "relax.permute_dims": lambda c, b: b(c.args[0]),
}


def _droppable(call: Any, var2val: dict[Any, Any],
               data: Any = None) -> tuple[tuple[float, float, int, str], bool] | None:
    """(scale, reciprocal, zero point, out dtype) of a quantize whose clamp is provably dead, and
    whether its quotient is also proven small enough to round straight to int32. ``data``: the
    value quantized in place of ``call``'s input (:func:`_absorbed_clip`)."""
    from apq.kernels.requantize import INTEGER_ROUNDING_LIMIT, exact_quantize_params

    params = exact_quantize_params(call)
    if params is None:
        return None
    reciprocal = params[1]
    bound = value_bound(call.args[0] if data is None else data, var2val)
    if bound is None:
        return None
    quotient_bound = bound * abs(reciprocal) * _ROUNDING_SLACK
    if quotient_bound >= QUOTIENT_LIMIT:
        return None
    return params, quotient_bound < INTEGER_ROUNDING_LIMIT


def _signed_limit(expr: Any) -> float | None:
    """A finite clip limit, sign kept: a PrimValue's number or a one-element constant's
    (requantize.scalar_value); else None. (:func:`_prim_or_const` gives a bound, |value|.)"""
    from apq.kernels.requantize import scalar_value

    value = getattr(getattr(expr, "value", None), "value", None)  # relax.PrimValue(FloatImm/IntImm)
    if not isinstance(value, (int, float)):
        value = scalar_value(expr)
    return float(value) if value is not None and np.isfinite(float(value)) else None


def _clip_limits(call: Any) -> tuple[Any, float | None, float | None] | None:
    """(input, lower, upper) of a clip-like call with constant scalar limits (None: no limit on
    that side): ``maximum``/``minimum`` by a scalar, ``clip``, ``relu``; else None."""
    op = getattr(call.op, "name", "") if hasattr(call, "op") else ""
    if op == "relax.nn.relu":
        return call.args[0], 0.0, None
    if op == "relax.clip":
        lo, hi = (_signed_limit(a) for a in call.args[1:3])
        return None if lo is None or hi is None else (call.args[0], lo, hi)
    if op in ("relax.maximum", "relax.minimum"):
        for x, c in ((call.args[0], call.args[1]), (call.args[1], call.args[0])):
            limit = _signed_limit(c)
            if limit is not None:
                return (x, limit, None) if op == "relax.maximum" else (x, None, limit)
    return None


def _absorbed_clip(data: Any, params: tuple[float, float, int, str], var2val: dict[Any, Any]) -> Any | None:
    """What ``quantize(data)`` may quantize instead: ``data`` without the clips (ReLU6's maximum
    and minimum) that the quantize's own output saturation makes redundant, or None.

    Why: an int8 layer's ReLU6 is two vector instructions per 16 outputs in every epilogue, and
    the saturation to the output type right after it already clamps at least as hard whenever
    ``rint(lo / s) + z <= qmin`` and ``rint(hi / s) + z >= qmax``: ``rint(x / s)`` is monotone, so
    every ``x`` below ``lo`` quantizes to ``qmin`` with or without the clip, and likewise above
    ``hi``. apq's exporter calibrates the output scale to the activation's clip range
    (``s = c / 255``, ``c <= 6``), so ``rint(6 / s) >= 255``: ReLU6 never binds. Only clips of a
    provably finite value go (a NaN would pass ``maximum`` differently); the caller re-proves the
    quantize's bound on the unclipped value.
    """
    from tvm import relax

    from apq.kernels.requantize import output_range

    scale, _, zero_point, out_dtype = params
    qmin, qmax = output_range(out_dtype)

    def level(x: float) -> float:
        return float(np.rint(np.float32(x) / np.float32(scale))) + zero_point  # ONNX: rint(x / s) + z

    inner, expr = None, data
    while isinstance(expr, relax.Var) and isinstance(var2val.get(expr), relax.Call):
        found = _clip_limits(var2val[expr])
        if found is None:
            break
        x, lo, hi = found
        if (lo is not None and level(lo) > qmin) or (hi is not None and level(hi) < qmax):
            break
        inner = expr = x
    if inner is None or value_bound(inner, var2val) is None:
        return None
    return inner


def drop_proven_clamps(mod: Any) -> tuple[Any, int]:
    """Rewrite every ``quantize`` with a proven-bounded input to the unclamped compute.

    Returns (module, rewritten count). Run after layout conversion and before ``LegalizeOps``
    (kernels/pipeline.py: :func:`apq.kernels.pipeline.prepare_passes`). Such a quantize also
    skips the clips right before it that its output saturation makes redundant
    (:func:`_absorbed_clip`), when the quotient stays as provably small without them.
    """
    from tvm import relax

    from apq.kernels.requantize import quantize_compute

    count = 0

    @relax.expr_functor.mutator
    class _Rewriter(relax.PyExprMutator):
        var2val: dict[Any, Any] = {}

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            nonlocal count
            is_quantize = getattr(call.op, "name", "") == "relax.quantize"
            proven = _droppable(call, self.var2val) if is_quantize else None
            data = None
            if proven is not None:
                inner = _absorbed_clip(call.args[0], proven[0], self.var2val)
                unclipped = None if inner is None else _droppable(call, self.var2val, inner)
                if unclipped is not None and unclipped[1] >= proven[1]:  # as cheap a rounding
                    data, proven = inner, unclipped
            call = super().visit_call_(call)
            if proven is None:
                return call
            count += 1
            params, integer_rounding = proven
            compute = quantize_compute(*params, clamp=False, integer_rounding=integer_rounding)
            return self.builder_.call_te(compute, call.args[0] if data is None else self.visit_expr(data),
                                         primfunc_name_hint="quantize")

    rewriter = _Rewriter(mod)

    def enter(func: Any) -> None:
        rewriter.var2val = relax.analysis.get_var2val(func)

    module = mutate_functions(rewriter, mod, enter)
    return module, count


def drop_proven_clamps_pass() -> Any:
    """:func:`drop_proven_clamps` as a module pass for ``prepare_passes``."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApqDropProvenQuantizeClamps")
    def _pass(mod: Any, _ctx: Any) -> Any:
        return drop_proven_clamps(mod)[0]

    return _pass


__all__ = ["MAX_DEPTH", "QUOTIENT_LIMIT", "drop_proven_clamps", "drop_proven_clamps_pass", "value_bound"]
