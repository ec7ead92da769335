"""Keep runs of NHWC kernels in NHWC: sink ``NHWC -> NCHW`` permutes through elementwise ops.

Why: apq's bit-serial kernels (kernels/bitserial.py) are NHWC while the rest of an imported ONNX
model is NCHW, so :func:`apq.toolchain.bitserial_lowering.lower_bitserial` wraps every kernel in
``permute_dims(x, [0, 2, 3, 1])`` / ``permute_dims(y, [0, 3, 1, 2])``. Between two bit-serial
layers sit only elementwise ops (requantize multiply/add/clip/quantize, ReLU6, the residual add,
the unsigned shift), which do not care about the layout. Measured (bench/mixed_precision.py
--transposes): the permutes cost more than the bit-serial kernels save, mostly because the
requantize epilogue then reads its int32 input with a transposed (strided) pattern.

What this pass does (one forward walk over the bindings of a function, in program order):

- ``v = permute_dims(y, [0, 3, 1, 2])`` makes ``y`` the NHWC form of ``v``;
- an elementwise / broadcast op (see :data:`CONVERTERS`) with an argument that has an NHWC form
  is re-emitted in NHWC: broadcast constants are transposed at compile time (``(1, C, 1, 1)`` ->
  ``(1, 1, 1, C)``), scalars stay, ``quantize``'s channel axis moves from 1 to 3, a full-size
  NCHW operand (the skip input of a residual add that comes from an int8 layer) gets a permute
  of its own; the NCHW result becomes ``permute_dims(nhwc, [0, 3, 1, 2])``, which dead-code
  elimination removes unless an NCHW consumer (an int8 conv, a pooling) still needs it, so the
  transpose is materialised once, where the NHWC run ends, fused into the epilogue before it;
- a global pooling (``mean``/``sum``/``max``/``min`` over H and W, ``keepdims``) of a var with
  an NHWC form reduces NHWC axes 1 and 2, so the run ends after the pooling with a transpose of a
  (1, 1, 1, C) tensor instead of the whole last feature map (0.05 ms of a 1.9 ms int8
  MobileNetV2 at 224 px, 1 thread);
- ``permute_dims(v, [0, 2, 3, 1])`` of a var with an NHWC form is that form: the pair cancels;
- optionally (``depthwise=True``) an int8 depthwise ``conv2d`` whose input has an NHWC form runs
  as ``conv2d(data_layout="NHWC", kernel_layout="HWOI")`` so a whole inverted-residual block
  (bit-serial expand, int8 depthwise, bit-serial project) stays NHWC.

Exactness: every rewrite is a pure relayout of the same elementwise arithmetic (the same ops on
the same values, the same dtypes), so results are bit-identical; tests check it end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: NCHW -> NHWC and back, as permute_dims axes.
TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)


@dataclass
class LayoutStats:
    """What :func:`sink_nhwc_permutes` did (for tests and reports)."""

    converted: dict[str, int] = field(default_factory=dict)  # op name -> count re-emitted in NHWC
    cancelled: int = 0  # NHWC->NCHW->NHWC permute pairs removed
    operand_permutes: int = 0  # permutes added for full-size NCHW operands (residual skip inputs)
    # per relaid-out conv, in program order: {"layer", "geometry", "fingerprint", "source"}; the
    # source (NCHW/OIHW) weight's name and bits are re-keyed to the HWOI weight's fingerprint
    convs: list[dict[str, Any]] = field(default_factory=list)

    def count(self, op: str) -> None:
        self.converted[op] = self.converted.get(op, 0) + 1


def _op_name(call: Any) -> str:
    op = getattr(call, "op", None)
    return str(getattr(op, "name", "")) if op is not None else ""


def _shape(expr: Any) -> tuple[int, ...] | None:
    shape = getattr(getattr(expr, "ty", None), "shape", None)
    try:
        return tuple(int(v) for v in shape.values) if shape is not None else None
    except (TypeError, AttributeError):
        return None


def _axes(call: Any) -> tuple[int, ...] | None:
    axes = getattr(call.attrs, "axes", None)
    return tuple(int(a) for a in axes) if axes is not None else None


class _Ctx:
    """What a converter needs: the NHWC forms found so far, constant folding, a builder."""

    def __init__(self, builder: Any, producers: dict[Any, Any], stats: LayoutStats) -> None:
        self.bb = builder
        self.producers = producers
        self.nhwc: dict[Any, Any] = {}  # original var -> new NHWC var
        self.stats = stats
        self.remap: Callable[[Any], Any] = lambda e: e

    def const(self, expr: Any) -> np.ndarray | None:
        """Value of a constant, looking through vars bound to reshape / astype of constants."""
        from tvm import relax

        from apq.toolchain.layers import const_value

        value = const_value(expr)
        if value is not None:
            return value
        val = self.producers.get(expr) if isinstance(expr, relax.Var) else None
        if val is None or _op_name(val) != "relax.reshape":
            return None
        inner, shape = self.const(val.args[0]), _shape(val)
        return None if inner is None or shape is None else inner.reshape(shape)

    def operand(self, expr: Any, out_shape: tuple[int, ...]) -> Any | None:
        """``expr`` (an operand of an op whose NCHW output has ``out_shape``) in NHWC form, or
        None when it cannot be had cheaply."""
        from tvm import relax

        if expr in self.nhwc:
            return self.nhwc[expr]
        shape = _shape(expr)
        if shape is None:
            return None
        if len(shape) == 0:
            return self.remap(expr)  # scalar: layout-free
        value = self.const(expr)
        if value is not None and len(shape) <= 4:
            value = value.reshape((1,) * (4 - value.ndim) + value.shape)
            return relax.const(np.ascontiguousarray(np.transpose(value, TO_NHWC)))
        if len(shape) == 4 and shape == out_shape:  # full-size NCHW tensor (e.g. a skip input)
            self.stats.operand_permutes += 1
            return self.bb.emit(relax.op.permute_dims(self.remap(expr), list(TO_NHWC)))
        return None


# --------------------------------------------------------------------------- converters
# Each takes (ctx, call, out_shape) and returns the NHWC call (not emitted) or None.


def _elementwise(make: Callable[..., Any]) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    """Broadcast op over all tensor args; ``make(*nhwc_args, call)`` rebuilds it."""

    def convert(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
        if not any(a in ctx.nhwc for a in call.args):
            return None
        args = [ctx.operand(a, out_shape) for a in call.args]
        return None if any(a is None for a in args) else make(*args, call)

    return convert


def _unary(op: Callable[..., Any]) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    def convert(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
        return op(ctx.nhwc[call.args[0]], call) if call.args[0] in ctx.nhwc else None

    return convert


def _quantize_like(op_name: str) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    """quantize / dequantize: per-channel axis 1 -> 3; scale and zero point are 1-D or scalar."""

    def convert(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
        from tvm import relax

        x = call.args[0]
        if x not in ctx.nhwc or int(call.attrs.axis) not in (1, -3):
            return None
        shapes = [_shape(a) for a in call.args[1:]]
        if any(s is None or len(s) > 1 for s in shapes):
            return None
        op = relax.op.quantize if op_name == "quantize" else relax.op.dequantize
        return op(ctx.nhwc[x], ctx.remap(call.args[1]), ctx.remap(call.args[2]), axis=3,
                  out_dtype=str(call.attrs.out_dtype))

    return convert


def _clip_call_tir(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
    """The ONNX frontend's Clip: ``call_tir(maximum*/minimum*, (x, bound))``, emitted by the
    frontend with ``topi.maximum`` / ``topi.minimum`` (the naming layers._clip_step trusts too);
    rebuilt as the Relax op, which legalizes to the same topi op, on NHWC operands."""
    from tvm import relax

    fn = str(getattr(call.args[0], "name_hint", ""))
    fields = list(getattr(call.args[1], "fields", []))
    if not fn.startswith(("minimum", "maximum")) or len(fields) != 2 or fields[0] not in ctx.nhwc:
        return None
    args = [ctx.operand(a, out_shape) for a in fields]
    if any(a is None for a in args):
        return None
    return (relax.op.minimum if fn.startswith("minimum") else relax.op.maximum)(*args)


def _depthwise_conv(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
    """NCHW/OIHW depthwise conv with a constant weight -> NHWC/HWOI (same padding, strides)."""
    from tvm import relax

    a = call.attrs
    x, w = call.args
    wv = ctx.const(w)
    xs = _shape(x)
    if x not in ctx.nhwc or wv is None or xs is None or len(xs) != 4:
        return None
    if (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) != ("NCHW", "OIHW", "NCHW"):
        return None
    if not (int(a.groups) == xs[1] == wv.shape[0] and wv.shape[1] == 1):
        return None
    w_hwoi = np.ascontiguousarray(np.transpose(wv, (2, 3, 0, 1)))
    from apq.toolchain.layers import _geometry, weight_fingerprint

    ctx.stats.convs.append({"geometry": _geometry("conv2d", call), "fingerprint": weight_fingerprint(w_hwoi),
                            "source": weight_fingerprint(wv)})
    return relax.op.nn.conv2d(ctx.nhwc[x], relax.const(w_hwoi), strides=a.strides, padding=a.padding,
                              dilation=a.dilation, groups=int(a.groups), data_layout="NHWC",
                              kernel_layout="HWOI", out_layout="NHWC", out_dtype=str(a.out_dtype))


def _binary(name: str) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    def make(x: Any, y: Any, call: Any) -> Any:
        from tvm import relax

        return getattr(relax.op, name)(x, y)

    return _elementwise(make)


def _astype(x: Any, call: Any) -> Any:
    from tvm import relax

    return relax.op.astype(x, str(call.attrs.dtype))


def _clip(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
    from tvm import relax

    if call.args[0] not in ctx.nhwc:
        return None
    return relax.op.clip(ctx.nhwc[call.args[0]], call.args[1], call.args[2])


def _unary_op(name: str) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    """``relax.op.<name>`` or, for ``nn.<name>``, ``relax.op.nn.<name>``."""

    def make(x: Any, call: Any) -> Any:
        from tvm import relax

        op: Any = relax.op
        for part in name.split("."):
            op = getattr(op, part)
        return op(x)

    return _unary(make)


def _spatial_reduce(name: str) -> Callable[[_Ctx, Any, tuple[int, ...]], Any]:
    """``mean`` / ``sum`` / ``max`` / ``min`` over H and W with ``keepdims`` (global pooling) ->
    the same reduction over NHWC axes 1 and 2: each channel reduces the same values in the same
    (h, w) order, and the (1, 1, 1, C) result's transpose back to (1, C, 1, 1) is a relabelling.
    Without it the NHWC run ends in a full transpose of the last feature map just before it."""

    def convert(ctx: _Ctx, call: Any, out_shape: tuple[int, ...]) -> Any:
        from tvm import relax

        x = call.args[0]
        axes = getattr(call.attrs, "axis", None)
        if x not in ctx.nhwc or axes is None or not bool(call.attrs.keepdims):
            return None
        if sorted(int(a) % 4 for a in axes) != [2, 3]:
            return None
        return getattr(relax.op, name)(ctx.nhwc[x], axis=[1, 2], keepdims=True)

    return convert


#: Registry: Relax op name -> NHWC converter. Every entry must be layout-free arithmetic (or, for
#: conv2d and the spatial reductions, an exact relayout); a new elementwise op is one line.
CONVERTERS: dict[str, Callable[[_Ctx, Any, tuple[int, ...]], Any]] = {
    **{f"relax.{n}": _binary(n) for n in ("add", "subtract", "multiply", "divide", "maximum", "minimum")},
    **{f"relax.{n}": _unary_op(n) for n in ("round", "floor", "negative", "abs", "nn.relu")},
    "relax.astype": _unary(_astype),
    "relax.clip": _clip,
    "relax.quantize": _quantize_like("quantize"),
    "relax.dequantize": _quantize_like("dequantize"),
    "relax.call_tir": _clip_call_tir,
    **{f"relax.{n}": _spatial_reduce(n) for n in ("mean", "sum", "max", "min")},
}
#: Converters enabled only by ``depthwise=True`` (they change which kernel schedule applies).
DEPTHWISE_CONVERTERS = {"relax.nn.conv2d": _depthwise_conv}


def sink_nhwc_permutes(mod: Any, func_name: str = "main", depthwise: bool = False) -> tuple[Any, LayoutStats]:
    """Rewrite ``mod[func_name]`` so NHWC runs stay NHWC (see the module docstring).

    Returns (new module, :class:`LayoutStats`). Bit-identical by construction; dead NCHW
    bindings are removed by ``DeadCodeElimination``.
    """
    import tvm
    from tvm import relax

    # a copy: the mutator's builder adds to (and we then overwrite main of) the module it was given
    mod = tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
    func = mod[func_name]
    producers: dict[Any, Any] = {}
    if isinstance(func.body, relax.SeqExpr):
        for block in func.body.blocks:
            for b in block.bindings:
                if hasattr(b, "value"):
                    producers[b.var] = b.value
    converters = {**CONVERTERS, **(DEPTHWISE_CONVERTERS if depthwise else {})}
    stats = LayoutStats()

    @relax.expr_functor.mutator
    class _Sinker(relax.PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.ctx = _Ctx(self.builder_, producers, stats)
            self.ctx.remap = self.visit_expr

        def visit_var_binding_(self, binding: Any) -> None:  # noqa: N802 (TVM's visitor name)
            ctx, var, val = self.ctx, binding.var, binding.value
            name = _op_name(val)
            out_shape = _shape(var)
            if name == "relax.permute_dims" and out_shape is not None and len(out_shape) == 4:
                src = val.args[0]
                if _axes(val) == TO_NHWC and src in ctx.nhwc:  # NHWC -> NCHW -> NHWC: cancel
                    stats.cancelled += 1
                    self.set_var_remap(var, ctx.nhwc[src])
                    return
                if _axes(val) == TO_NCHW:  # src is the NHWC form of var
                    super().visit_var_binding_(binding)
                    ctx.nhwc[var] = self.visit_expr(src)
                    return
            conv = converters.get(name)
            new = conv(ctx, val, out_shape) if conv and out_shape is not None and len(out_shape) == 4 else None
            if new is None:
                super().visit_var_binding_(binding)
                return
            stats.count(name if name != "relax.call_tir" else "clip(call_tir)")
            nhwc = self.builder_.emit(new)
            ctx.nhwc[var] = nhwc
            nchw = self.builder_.emit(relax.op.permute_dims(nhwc, list(TO_NCHW)))
            self.set_var_remap(var, nchw)

    sinker = _Sinker(mod)
    new_func = sinker.visit_expr(func)
    out = sinker.builder_.get()
    out[func_name] = new_func
    out = relax.transform.DeadCodeElimination([func_name])(relax.transform.Normalize()(out))
    if mod.attrs is not None:
        for key in mod.attrs.keys():
            out = out.with_attr(str(key), mod.attrs[key])
    return _rekey_weights(out, stats), stats


def _rekey_weights(mod: Any, stats: LayoutStats) -> Any:
    """Carry lower_qdq's per-weight records (bits, ONNX name; keyed by the weight's fingerprint)
    over to the transposed HWOI weights, so describe_layers still names and sizes those layers."""
    from apq.toolchain.layers import WEIGHT_BITS_ATTR, WEIGHT_NAMES_ATTR

    for key in (WEIGHT_BITS_ATTR, WEIGHT_NAMES_ATTR):
        raw = mod.get_attr(key) if mod.attrs is not None else None
        if raw is None:
            continue
        table = {str(k): v for k, v in dict(raw).items()}
        for conv in stats.convs:
            if conv["source"] in table:
                table[conv["fingerprint"]] = table[conv["source"]]
                if key == WEIGHT_NAMES_ATTR:
                    conv["layer"] = str(table[conv["source"]])
        mod = mod.with_attr(key, table)
    return mod
