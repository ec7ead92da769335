"""Few-input-channel KxK convs -> patch gather + pointwise conv, in a Relax module.

Why and how the gather works: kernels/im2col.py. This pass finds NHWC/HWIO ungrouped convs with
at most :attr:`GatherPolicy.max_channels` input channels and a kernel larger than 1x1 (the
stem) and rewrites ``conv2d(x, W)`` into ``conv2d_1x1(im2col(x), W')``, which the pointwise
paths then take: apq's packed ``vpdpbusd`` kernel for int8 (toolchain/int8_layout.py), the
float channel-vector tile for float (toolchain/float_layout.py).

- An integer conv that accumulated in float (qdq_lowering's exact ``int-fp32acc`` path,
  ``astype(conv_f32, int32)``) becomes the int32 pointwise conv directly.
- When the conv's input is ``permute_dims(x, [0, 2, 3, 1])`` (the transpose ConvertLayout puts
  after an NCHW model input, or after its quantize + pad), the gather reads ``x`` in NCHW and
  the transpose goes away (224 px MobileNetV2, 1 thread: int8 1.587 -> 1.547 ms, the
  quantize + pad kernel no longer scatters 3-byte pixels).
- The gather is its own kernel (op pattern opaque): fused into the ops before it, its reads
  would be scattered through their index math.
- A *float* conv whose input is NCHW (that transpose case: the float model input) skips the
  gather: it becomes one direct conv reading the NCHW input (kernels/nchw_input_conv.py, op
  pattern out-elementwise-fusable, so its bias and activation fuse into it), because the float
  tile broadcasts one input value per tap and can take it from any layout (224 px MobileNetV2
  float, 1 thread, interleaved: 1.04x faster model, outputs bit-identical).
  ``GatherPolicy.direct_nchw_float=False`` keeps the gather. Integer convs keep it: ``vpdpbusd``
  needs four consecutive patch bytes, which only the gathered layout has.

Exact: the same products and sums.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from apq.kernels.pipeline import OP_PATTERN_OPAQUE, OP_PATTERN_OUT_EWISE_FUSABLE
from apq.toolchain.layers import const_value, mutate_functions, tensor_dtype
from apq.toolchain.layout import TO_NHWC



@dataclass(frozen=True)
class GatherPolicy:
    """Which convs are gathered, and how."""

    data_dtype: str  # the conv input's dtype ("uint8" for apq's int8 graphs, "float32")
    weight_dtype: str
    depth_multiple: int = 1  # patch length rounded up to this (4: vpdpbusd groups)
    max_channels: int = 4  # input channels at most (RGB, grey)
    out_channels_ok: Callable[[int], bool] = lambda oc: True
    # a float conv whose input is NCHW (the model input) becomes one direct conv reading it
    # (kernels/nchw_input_conv.py) instead of a gather + pointwise conv
    direct_nchw_float: bool = True


def _candidate(call: Any, policy: GatherPolicy) -> Any | None:
    """The HWIO weight (NumPy) of a conv the policy gathers, else None."""
    attrs = call.attrs
    if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO" or int(attrs.groups) != 1:
        return None
    if str(attrs.out_layout) != "NHWC":
        return None
    data, weight = call.args
    w = const_value(weight)
    if tensor_dtype(data) != policy.data_dtype or w is None or w.ndim != 4 or w.dtype.name != policy.weight_dtype:
        return None
    kh, kw, ic, oc = w.shape
    if kh * kw == 1 or ic > policy.max_channels or not policy.out_channels_ok(oc):
        return None
    return w


def gather_few_channel_convs(mod: Any, policy: GatherPolicy) -> tuple[Any, int]:
    """Rewrite the convs ``policy`` selects (module docstring); returns (module, count).

    Run ``CanonicalizeBindings`` and ``DeadCodeElimination`` after it: the rewritten conv's
    output is bound through an alias, and the replaced transposes and float round trips die.
    """
    from tvm import relax

    from apq.kernels.im2col import im2col_compute, im2col_weight
    from apq.kernels.nchw_input_conv import nchw_input_conv_compute

    count = 0
    integer = policy.weight_dtype.startswith("int")

    @relax.expr_functor.mutator
    class _Gatherer(relax.PyExprMutator):
        def __init__(self, m: Any) -> None:
            super().__init__(m)
            self.widened: list[Any] = []  # astype(int32 conv, float32) calls made here

        def _bound(self, expr: Any) -> Any | None:
            """What a var is bound to, through aliases."""
            while isinstance(expr, relax.Var):
                bound = self.lookup_binding(expr)
                if bound is None:
                    return None
                if not isinstance(bound, relax.Var):
                    return bound
                expr = bound
            return None

        def _source(self, data: Any) -> tuple[Any, str]:
            bound = self._bound(data)
            if (bound is not None and getattr(bound.op, "name", "") == "relax.permute_dims"
                    and tuple(int(a) for a in bound.attrs.axes) == TO_NHWC):
                return bound.args[0], "NCHW"
            return data, "NHWC"

        def visit_call_(self, call: Any) -> Any:  # noqa: N802 (TVM's visitor name)
            nonlocal count
            call = super().visit_call_(call)
            name = getattr(call.op, "name", "")
            if name == "relax.astype" and str(call.attrs.dtype) == "int32":
                bound = self._bound(call.args[0])
                if bound is not None and any(bound.same_as(w) for w in self.widened):
                    return bound.args[0]  # int32 -> float32 -> int32: the int32 itself
            if name != "relax.nn.conv2d" or (w := _candidate(call, policy)) is None:
                return call
            count += 1
            a = call.attrs
            # (kh, kw, strides, dilation, padding): both kernels' compute factories start with these
            geometry = (w.shape[0], w.shape[1], *(tuple(int(v) for v in getattr(a, f))
                                                  for f in ("strides", "dilation", "padding")))
            source, layout = self._source(call.args[0])
            if layout == "NCHW" and not integer and policy.direct_nchw_float:
                return self._direct(source, w, geometry)
            gather = im2col_compute(*geometry, 0, policy.depth_multiple, layout)
            cols = self.builder_.emit(self.builder_.call_te(gather, source, primfunc_name_hint="im2col",
                                                            primfunc_attrs={"op_pattern": OP_PATTERN_OPAQUE}))
            declared = str(a.out_dtype)
            declared = declared if declared not in ("", "None", "void") else policy.data_dtype  # unset: the input's
            out_dtype = "int32" if integer else declared
            conv = relax.op.nn.conv2d(cols, relax.const(im2col_weight(w, policy.depth_multiple)), data_layout="NHWC",
                                      kernel_layout="HWIO", out_layout="NHWC", out_dtype=out_dtype)
            if out_dtype == declared:
                return conv
            widened = relax.op.astype(self.builder_.emit(conv), declared)
            self.widened.append(widened)
            return widened

        def _direct(self, source: Any, w: Any, geometry: tuple) -> Any:
            """The conv as one PrimFunc reading the NCHW source (kernels/nchw_input_conv.py)."""
            conv = nchw_input_conv_compute(*geometry)
            return self.builder_.call_te(conv, source, relax.const(w), primfunc_name_hint="conv2d_nchw_input",
                                         primfunc_attrs={"op_pattern": OP_PATTERN_OUT_EWISE_FUSABLE})

    module = mutate_functions(_Gatherer(mod), mod)
    return module, count


__all__ = ["GatherPolicy", "gather_few_channel_convs"]
