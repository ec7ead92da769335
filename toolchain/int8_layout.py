"""Lowered int8 graphs to NHWC on AVX-512 VNNI CPUs, with compile-time packed pointwise weights.

Why: apq's NCHW int8 path puts 16 pixels in the vector lanes, which loses to onnxruntime's NHWC
QLinearConv on depthwise convs (stride 2 worst) and on pointwise convs with few input channels
(measured per layer against onnxruntime's node profile: 2.4-2.8x slower there). In NHWC the
channels are in the lanes:

1. ``ConvertLayout(NHWC, HWIO)`` rewrites every conv2d; the per-tensor ``quantize`` /
   ``dequantize`` ops of the lowered QDQ graph have no layout rule, so ConvertLayout wraps each
   in transposes, which :func:`apq.toolchain.layout.sink_nhwc_permutes` then removes (it moves
   their channel axis, exact). On MobileNetV2 only the input and the classifier keep a transpose.
2. The integer KxK convs that accumulate in float (depthwise: see qdq_lowering) write
   float32 and are scheduled by the float NHWC channel-vector rule.
3. A KxK conv with at most 4 input channels (the RGB stem) becomes a patch gather
   (``im2col``, read from the NCHW output of the input's quantize + pad) + a pointwise conv over
   ``kh * kw * C`` channels (:func:`im2col_few_channel_convs`): 224 px MobileNetV2's stem went
   from 0.39 ms on the float schedule to 0.12 ms + the gather.
4. Each ``u8 x s8 -> i32`` pointwise conv becomes a ``call_tir`` of
   :func:`apq.kernels.x86_int8_nhwc.pointwise_packed_compute` with its weight packed once here
   to ``[IC/4, OC, 4]`` (the operand layout of ``vpdpbusd`` with output channels in the lanes).
5. So does each ``u8 x s8 -> i32`` matmul with a constant weight (the classifier), as a 1x1 conv
   on a ``1 x M`` image (:func:`pack_matmuls`).

Everything is a relayout of the same integer arithmetic, so outputs are bit-identical to the
NCHW path (tests compare both against onnxruntime).
"""

from __future__ import annotations

from typing import Any

from apq.toolchain.layers import const_value, rewrite_calls, static_shape, tensor_dtype

#: CompileOptions.int8_layout values: NHWC converts lowered int8 graphs on VNNI CPUs, NCHW keeps them
INT8_LAYOUTS = ("NHWC", "NCHW")


def _packable_pointwise(call: Any) -> Any | None:
    """The weight constant of an NHWC ``u8 x s8 -> i32`` 1x1 stride-1 ungrouped conv2d, else None."""
    from apq.kernels.x86_int8_nhwc import K_GROUP, lanes_for

    attrs = call.attrs
    if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO" or int(attrs.groups) != 1:
        return None
    if [int(s) for s in attrs.strides] != [1, 1] or any(int(p) for p in attrs.padding):
        return None
    if str(attrs.out_dtype) != "int32" or [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    data, weight = call.args
    w = const_value(weight)
    if tensor_dtype(data) != "uint8" or w is None or w.dtype.name != "int8" or w.ndim != 4:
        return None
    if w.shape[:2] != (1, 1) or w.shape[2] % K_GROUP or lanes_for(w.shape[3]) is None:
        return None
    return w


def pack_pointwise_convs(mod: Any) -> tuple[Any, int]:
    """Rewrite packable pointwise convs into packed-weight ``call_tir``s; returns (mod, count)."""
    from tvm import relax

    from apq.kernels.x86_int8_nhwc import pack_pointwise_weight, pointwise_packed_compute

    def pack(builder: Any, call: Any) -> Any | None:
        w = _packable_pointwise(call)
        if w is None:
            return None
        packed = relax.const(pack_pointwise_weight(w), "int8")
        return builder.call_te(pointwise_packed_compute, call.args[0], packed, primfunc_name_hint="conv2d_u8s8_nhwc")

    return rewrite_calls(mod, "relax.nn.conv2d", pack)


def _gather_policy() -> Any:
    from apq.kernels.x86_int8_nhwc import K_GROUP, lanes_for
    from apq.toolchain.patch_gather import GatherPolicy

    return GatherPolicy(data_dtype="uint8", weight_dtype="int8", depth_multiple=K_GROUP,
                        out_channels_ok=lambda oc: lanes_for(oc) is not None)


def gathers_patches(w_oihw: Any, groups: int) -> bool:
    """Would :func:`im2col_few_channel_convs` gather this integer conv (OIHW weight), given a
    u8 input? An ungrouped KxK conv over few input channels (the RGB stem).

    Why qdq_lowering asks (its ``uint8_stems``): the gather takes u8 inputs only (``vpdpbusd``
    multiplies u8 x s8), and apq's exporter writes the stem's input signed (a normalized image).
    Without a re-bias such a stem stayed on the float-accumulated KxK schedule, which broadcasts
    one input value per tap: the largest kernel of the 32 px benchmark network (36 us of ~230),
    against ~22 us for gather + VNNI (bench/mixed_precision.py's int8 model, one interleaved A/B:
    2.19x -> 2.53x of onnxruntime, outputs bit-identical).
    """
    policy = _gather_policy()
    oc, ic, kh, kw = w_oihw.shape
    return groups == 1 and kh * kw > 1 and ic <= policy.max_channels and policy.out_channels_ok(oc)


def packs_depthwise(w_oihw: Any, groups: int) -> bool:
    """Would :func:`pack_depthwise_convs` run this integer conv (OIHW weight), given a u8 input
    and int32 accumulation? A KxK depthwise conv (one input channel per group, multiplier 1) over
    a channel count ``vpdpbusd`` tiles.

    Why qdq_lowering asks (its ``vnni_depthwise``): these convs otherwise accumulate in float32,
    and the kernel takes u8 inputs only, as the stem gather does.
    """
    from apq.kernels.x86_int8_depthwise import lanes_for

    oc, ic, kh, kw = w_oihw.shape
    return ic == 1 and groups == oc and kh * kw > 1 and lanes_for(oc) is not None


def _packable_depthwise(call: Any) -> Any | None:
    """The HWIO weight constant of an NHWC ``u8 x s8 -> i32`` depthwise conv2d that
    :func:`packs_depthwise` accepts, else None."""
    attrs = call.attrs
    if str(attrs.data_layout) != "NHWC" or str(attrs.kernel_layout) != "HWIO" or str(attrs.out_dtype) != "int32":
        return None
    if [int(d) for d in attrs.dilation] != [1, 1]:
        return None
    data, weight = call.args
    w = const_value(weight)
    if tensor_dtype(data) != "uint8" or w is None or w.dtype.name != "int8" or w.ndim != 4:
        return None
    return w if packs_depthwise(w.transpose(3, 2, 0, 1), int(attrs.groups)) else None  # HWIO -> OIHW


def _padded_source(data: Any, var2val: dict[Any, Any]) -> tuple[Any, list[int], int] | None:
    """``(x, [top, left, bottom, right], value)`` when ``data`` is a constant pad of the NHWC
    tensor ``x`` over rows and columns only: an NHWC ``pad``, or the NCHW one ConvertLayout leaves
    between two transposes (``permute_dims(pad(permute_dims(x)))``, qdq_lowering's zero-point pad)."""
    from tvm import relax

    def call_of(var: Any, op: str) -> Any | None:
        value = var2val.get(var) if isinstance(var, relax.Var) else None
        return value if isinstance(value, relax.Call) and str(getattr(value.op, "name", "")) == op else None

    def axes(call: Any) -> list[int]:
        return [int(a) for a in call.attrs.axes]

    outer = call_of(data, "relax.permute_dims")
    pad = call_of(outer.args[0], "relax.nn.pad") if outer is not None and axes(outer) == [0, 2, 3, 1] else None
    if pad is not None:
        inner = call_of(pad.args[0], "relax.permute_dims")
        if inner is None or axes(inner) != [0, 3, 1, 2]:
            return None
        source, (h_axis, w_axis) = inner.args[0], (2, 3)  # the NCHW pad's rows and columns
    else:
        pad = call_of(data, "relax.nn.pad")
        if pad is None:
            return None
        source, (h_axis, w_axis) = pad.args[0], (1, 2)
    if str(pad.attrs.pad_mode) != "constant":
        return None
    width = [int(p) for p in pad.attrs.pad_width]  # (before, after) per axis
    spatial = {h_axis, w_axis}
    if any(width[2 * a] or width[2 * a + 1] for a in range(4) if a not in spatial):
        return None
    value = float(pad.attrs.pad_value)
    if value != int(value) or not 0 <= value <= 255:
        return None
    return source, [width[2 * h_axis], width[2 * w_axis], width[2 * h_axis + 1], width[2 * w_axis + 1]], int(value)


def pack_depthwise_convs(mod: Any) -> tuple[Any, int]:
    """Rewrite ``u8 x s8 -> i32`` NHWC depthwise convs into ``call_tir``s of
    :func:`apq.kernels.x86_int8_depthwise.depthwise_packed_compute` (weights packed once here to
    ``[KH, G, C, 4]``); returns (mod, count).

    A zero-point pad in front of the conv (qdq_lowering pads explicitly when the zero point is
    not 0) is done by the kernel's own padded copy instead: measured, the separate pad kernel took
    longer than the 32 px depthwise conv after it (39 us, mostly transposes, against 7 us).
    """
    from tvm import relax

    from apq.kernels.x86_int8_depthwise import depthwise_packed_compute, pack_depthwise_weight

    var2val: dict[Any, Any] = {}
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            var2val.update(relax.analysis.get_var2val(func))

    def pack(builder: Any, call: Any) -> Any | None:
        w = _packable_depthwise(call)
        if w is None:
            return None
        attrs = call.attrs
        data, pad_value = call.args[0], 0
        padding = [int(p) for p in attrs.padding]  # Relax order: (top, left, bottom, right)
        absorbed = _padded_source(data, var2val) if not any(padding) else None
        if absorbed is not None and tensor_dtype(absorbed[0]) == "uint8":
            data, padding, pad_value = absorbed
        packed = relax.const(pack_depthwise_weight(w), "int8")
        return builder.call_te(depthwise_packed_compute, data, packed, int(w.shape[1]),
                               [int(s) for s in attrs.strides], padding, pad_value,
                               primfunc_name_hint="depthwise_u8s8_nhwc")

    return rewrite_calls(mod, "relax.nn.conv2d", pack)


def im2col_few_channel_convs(mod: Any) -> tuple[Any, int]:
    """Few-input-channel KxK int8 convs (the RGB stem) -> patch gather + ``u8 x s8`` pointwise
    conv over ``kh * kw * C`` channels rounded up to whole ``vpdpbusd`` groups
    (toolchain/patch_gather.py); :func:`pack_pointwise_convs` then packs it. Returns (mod, count)."""
    from apq.toolchain.patch_gather import gather_few_channel_convs

    return gather_few_channel_convs(mod, _gather_policy())


def pack_matmuls(mod: Any) -> tuple[Any, int]:
    """``u8 x s8 -> i32`` matmuls with a constant ``[K, N]`` weight -> the packed pointwise conv
    on a ``1 x M`` image (``reshape`` in and out); returns (mod, count).

    Why: a matmul is a 1x1 conv over ``K`` channels, and apq's generic matmul schedule widens
    bytes instead of using ``vpdpbusd``; the batch-1 classifier of MobileNetV2 at 224 px
    (320 -> 1000) took 0.05 ms that way, against onnxruntime's 0.03 ms QGemm.
    """
    from tvm import relax

    from apq.kernels.x86_int8_nhwc import K_GROUP, lanes_for, pack_pointwise_weight, pointwise_packed_compute

    def pack(builder: Any, call: Any) -> Any | None:
        data, weight = call.args
        shape, w = static_shape(data), const_value(weight)
        if str(call.attrs.out_dtype) != "int32" or tensor_dtype(data) != "uint8" or shape is None or len(shape) != 2:
            return None
        if w is None or w.dtype.name != "int8" or w.ndim != 2 or w.shape[0] % K_GROUP or lanes_for(w.shape[1]) is None:
            return None
        (m, k), n = shape, w.shape[1]
        image = builder.emit(relax.op.reshape(data, (1, 1, m, k)))
        packed = relax.const(pack_pointwise_weight(w.reshape(1, 1, k, n)), "int8")
        conv = builder.emit(builder.call_te(pointwise_packed_compute, image, packed,
                                            primfunc_name_hint="matmul_u8s8_packed"))
        return relax.op.reshape(conv, (m, n))

    return rewrite_calls(mod, "relax.matmul", pack)


def int8_to_nhwc(mod: Any) -> Any:
    """The lowered int8 module in NHWC with packed pointwise convs (module docstring)."""
    from tvm import relax

    from apq.toolchain.float_layout import convert_convs
    from apq.toolchain.layout import sink_nhwc_permutes

    mod, _ = sink_nhwc_permutes(convert_convs(mod))
    mod, _ = im2col_few_channel_convs(mod)
    mod = relax.transform.CanonicalizeBindings()(mod)  # the int32 conv's alias, so FuseOps sees its epilogue
    mod = relax.transform.DeadCodeElimination()(mod)
    mod, _ = pack_pointwise_convs(mod)
    mod, _ = pack_depthwise_convs(mod)
    mod = relax.transform.DeadCodeElimination()(mod)  # the pads the depthwise kernels took over
    mod, _ = pack_matmuls(mod)
    return mod


__all__ = ["INT8_LAYOUTS", "im2col_few_channel_convs", "int8_to_nhwc", "pack_depthwise_convs", "pack_matmuls",
           "pack_pointwise_convs", "packs_depthwise"]
