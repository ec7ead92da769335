"""Float convs to NHWC activations / HWIO weights before compilation (x86 and AArch64 CPUs).

Why: apq's NHWC conv schedule (kernels/cpu_schedules.py, ``Conv2dNHWCRule``) vectorizes along
channels, which suits depthwise convs at any stride and pointwise convs on small maps far
better than NCHW's pixel vectors. Relax's ``ConvertLayout`` rewrites the convs and carries the
layout through layout-agnostic ops (add, mean, ...); only the model input and the classifier's
flatten get a transpose.

One obstacle: TVM's ONNX importer lowers ``Clip`` straight to TE ``call_tir`` maximum/minimum
kernels, which ``ConvertLayout`` cannot see through, so every ReLU6 would be wrapped in two
transposes. :func:`clip_calls_to_ops` first turns those calls back into ``R.maximum`` /
``R.minimum`` with the same scalar bound (TOPI's maximum/minimum are what both legalize to,
so the arithmetic is unchanged).

A stem with at most 4 input channels then becomes a patch gather read straight from the NCHW
input + a 1x1 conv over ``kh * kw * C`` channels (:func:`gather_stems`, toolchain/patch_gather.py):
the input transpose goes away, and the 224 px MobileNetV2 float model went 2.66 -> 2.47 ms
(1 thread, interleaved).

Only float convs are converted here: a module with integer convs is returned unchanged (its
layout is toolchain/int8_layout.py's business: NHWC on VNNI CPUs, else NCHW for the pixel-lane
VNNI/sdot schedules).
"""

from __future__ import annotations

from typing import Any

#: PrimFunc names of the importer's Clip kernels (and the Relax ops with the same semantics) ->
#: the TIR call their body must contain
_CLIP_KERNELS = {"maximum": "T.max(", "minimum": "T.min("}

#: CompileOptions.float_layout values: NHWC converts float convs, NCHW keeps the ONNX layout
FLOAT_LAYOUTS = ("NHWC", "NCHW")

#: what ConvertLayout asks of every conv2d
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


def _clip_kernel_op(mod: Any, call: Any) -> Any | None:
    """The Relax op for ``call_tir(maximum*/minimum*, (x, scalar))``, else None."""
    from tvm import relax

    if not isinstance(call, relax.Call) or getattr(call.op, "name", "") != "relax.call_tir":
        return None
    gvar, args = call.args[0], call.args[1]
    prefix = next((p for p in _CLIP_KERNELS if gvar.name_hint.rstrip("0123456789_") == p), None)
    if prefix is None or len(getattr(args, "fields", ())) != 2:
        return None
    bound = args.fields[1]  # the clip bound: a 0-d tensor (a constant, or the NaN-sanitized one)
    if getattr(getattr(bound, "ty", None), "ndim", None) != 0:
        return None
    func = mod[gvar]
    body = func.body.script() if hasattr(func, "body") else ""
    if _CLIP_KERNELS[prefix] not in body:
        return None  # a kernel of the same name that does something else
    return getattr(relax.op, prefix)(args.fields[0], bound)


def clip_calls_to_ops(mod: Any) -> Any:
    """Rewrite the importer's scalar maximum/minimum ``call_tir`` kernels into Relax ops."""
    from tvm import relax

    from apq.toolchain.layers import rewrite_calls

    rewritten, _ = rewrite_calls(mod, "relax.call_tir", lambda _builder, call: _clip_kernel_op(mod, call))
    return relax.transform.DeadCodeElimination()(rewritten)


def has_integer_conv(mod: Any) -> bool:
    """Does any Relax conv2d take integer inputs (a lowered QDQ layer)?"""
    from tvm import relax

    found = False

    def visit(expr: Any) -> None:
        nonlocal found
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.nn.conv2d":
            dtype = str(getattr(getattr(expr.args[0], "ty", None), "dtype", ""))
            found = found or not dtype.startswith("float")

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def to_nhwc(mod: Any) -> Any:
    """Float convs to NHWC/HWIO (module docstring); unchanged if any conv is integer."""
    if has_integer_conv(mod):
        return mod
    return float_model_to_nhwc(mod)


def float_model_to_nhwc(mod: Any) -> Any:
    """A float model's convs to NHWC/HWIO, and its stem to a direct conv read straight from the
    NCHW input (:func:`gather_stems`)."""
    return gather_stems(convert_convs(mod))


def gather_stems(mod: Any) -> Any:
    """Few-input-channel float KxK convs (the RGB stem) -> one conv reading the model's NCHW
    input itself (kernels/nchw_input_conv.py), so the input transpose ConvertLayout put there goes
    away; on an NHWC input (not the model input) -> patch gather + 1x1 conv over ``kh * kw * C``
    channels (toolchain/patch_gather.py)."""
    from tvm import relax

    from apq.toolchain.patch_gather import GatherPolicy, gather_few_channel_convs

    mod, _ = gather_few_channel_convs(mod, GatherPolicy("float32", "float32"))
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(mod))


def convert_convs(mod: Any) -> Any:
    """Every conv2d to NHWC/HWIO, Clip kernels first turned into ops, weight transposes folded."""
    from tvm import relax

    mod = clip_calls_to_ops(mod)
    mod = relax.transform.ConvertLayout(NHWC_LAYOUTS)(mod)
    # the HWIO weights are transposes of constants: fold them so no inference transposes weights
    return relax.transform.FoldConstant()(mod)
