"""Int8 pointwise convs in NHWC on AVX-512 VNNI: output channels in the lanes.

Why a second VNNI orientation (the first, kernels/x86_int8.py, puts 16 *pixels* in the lanes of
an NCHW conv): onnxruntime runs int8 MobileNets in NHWC, and apq's NCHW int8 path lost to it on
exactly the layers NCHW is bad at (depthwise convs at stride 2: 2.6-2.8x slower; a 16-channel
input at 112 px: 2.4x). With the whole int8 graph in NHWC (toolchain/int8_layout.py), the
depthwise and stem convs use the channel-vector NHWC schedule, and the pointwise convs use this
kernel:

    acc[p][oc0:oc0+L] += sum_{k<4} X[p][ic+k] * Wp[ic/4][oc0:oc0+L][k]

One ``vpdpbusd`` multiplies a 32-bit broadcast of 4 input channels of one pixel (contiguous in
NHWC: no activation packing at all, unlike the pixel-lane kernel) by 16 output channels x 4
input channels of weights. Those weights must be adjacent as ``[IC/4][OC][4]``; they are
constants, so the Relax pass packs them once at compile time (:func:`pack_pointwise_weight`)
and the conv becomes a ``call_tir`` of :func:`pointwise_packed_compute`, whose reduction is
already split into ``(IC/4, 4)``. L is 16 (zmm, 512-bit ``vpdpbusd``), else 8 (ymm: 24 output
channels) or 4 (xmm: 12 channels, as in width-0.5 MobileNets). A pointwise conv with input
channels not a multiple of 4 or output channels not a multiple of 4 keeps the generic schedule.

Register tile: ``fv`` channel vectors x ``w_t`` pixels of int32 accumulators across the whole
reduction; per 4 input channels, ``fv`` weight loads and ``w_t`` broadcasts feed ``fv * w_t``
dot products (the same port model as the float NHWC tile, :func:`apq.kernels.cpu_schedules.choose_tile`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: TE compute name = the block name the schedule rule recognises.
PACKED_POINTWISE_BLOCK = "apq_pointwise_u8s8_nhwc"
K_GROUP = 4  # bytes reduced into one int32 lane by vpdpbusd
#: int32 lanes -> (LLVM intrinsic, TensorIntrin name). LLVM 22 operand types (kernels/x86_int8.py).
_VPDPBUSD = {
    16: ("llvm.x86.avx512.vpdpbusd.512", "apq_vnni_u8s8i32_channels16_k4"),
    8: ("llvm.x86.avx512.vpdpbusd.256", "apq_vnni_u8s8i32_channels8_k4"),
    4: ("llvm.x86.avx512.vpdpbusd.128", "apq_vnni_u8s8i32_channels4_k4"),
}


def lanes_for(out_channels: int) -> int | None:
    """int32 lanes of the vpdpbusd that tiles ``out_channels`` exactly (16 preferred), else None."""
    return next((lanes for lanes in (16, 8, 4) if out_channels % lanes == 0), None)


def pack_pointwise_weight(weight_hwio: np.ndarray) -> np.ndarray:
    """``(1, 1, IC, OC)`` int8 HWIO weight -> ``(IC/4, OC, 4)``: 4 input channels of one output
    channel adjacent, output channels next (one 64-byte vpdpbusd operand per 16 of them)."""
    _, _, ic, oc = weight_hwio.shape
    return np.ascontiguousarray(weight_hwio.reshape(ic // K_GROUP, K_GROUP, oc).transpose(0, 2, 1))


def pointwise_packed_compute(data: Any, packed_weight: Any) -> Any:
    """TE: ``out[n, y, x, o] = sum_{g, k} i32(data[n, y, x, 4g + k]) * i32(packed_weight[g, o, k])``."""
    from tvm import te

    n, h, w, _ = data.shape
    groups, oc, _ = packed_weight.shape
    g = te.reduce_axis((0, groups), "g")
    k = te.reduce_axis((0, K_GROUP), "k")
    return te.compute(
        (n, h, w, oc),
        lambda b, y, x, o: te.sum(data[b, y, x, g * K_GROUP + k].astype("int32")
                                  * packed_weight[g, o, k].astype("int32"), axis=[g, k]),
        name=PACKED_POINTWISE_BLOCK,
    )


def _intrin_funcs(lanes: int) -> tuple[Any, Any]:
    """(desc, impl) of ``C[l] += sum_k A[k] * B[l, k]`` for ``lanes`` output channels (one vpdpbusd)."""
    from tvm.script import tirx as T

    llvm_name = _VPDPBUSD[lanes][0]
    n_bytes = lanes * K_GROUP

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (K_GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, K_GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:K_GROUP], B[0:lanes, 0:K_GROUP])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, K_GROUP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk]) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (K_GROUP,), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, K_GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:K_GROUP], B[0:lanes, 0:K_GROUP])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                f"int32x{lanes}", llvm_name, C.vload([0], f"int32x{lanes}"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=f"uint8x{n_bytes}"),
                B.vload([0, 0], f"int8x{n_bytes}"))

    return desc, impl


def register_intrinsic(lanes: int) -> str:
    """Register the ``lanes``-channel intrinsic once per process; returns its name."""
    from apq.kernels.tensor_intrin import register_once

    return register_once(_VPDPBUSD[lanes][1], lambda: _intrin_funcs(lanes))


def find_packed_pointwise(sch: Any) -> Any | None:
    """The packed pointwise conv block of a (fused) PrimFunc, if it has one."""
    from apq.kernels.cpu_schedules import single_block

    return single_block(sch, PACKED_POINTWISE_BLOCK)


def schedule_packed_pointwise(sch: Any, func: Any, conv: Any, cfg: Any) -> bool:
    """Register-tile the packed pointwise conv and tensorize its (lanes x 4) core with vpdpbusd."""
    from apq.kernels.cpu_schedules import (Conv2dNCHWRule, _block_iterations, _finish_tiled_reduction, choose_tile,
                                           inline_elementwise, worth_parallel)

    block = sch.get(conv)
    _, _, w_ext, oc, _, _ = (int(iv.dom.extent) for iv in block.iter_vars)
    lanes = lanes_for(oc)
    if lanes is None:
        return False
    intrin = register_intrinsic(lanes)
    inline_elementwise(sch, func, keep=[conv])
    _, fv, w_t = choose_tile({"oc": oc, "ow": w_ext, "depthwise": 0}, lanes, cfg.accumulators)
    acc = Conv2dNCHWRule._accumulator(sch, func, conv)
    n, y, x, o, g, k = sch.get_loops(acc)
    xo, xi = sch.split(x, [None, w_t])
    oo, ov, ol = sch.split(o, [None, fv, lanes])
    sch.reorder(n, y, xo, oo, g, xi, ov, ol, k)
    outer = sch.fuse(n, y, xo, oo)
    if worth_parallel(cfg, _block_iterations(sch, acc), "int8_dot_mac"):
        sch.parallel(outer)
    _finish_tiled_reduction(sch, func, cfg, acc, g, outer, lanes)
    sch.tensorize(ol, intrin)
    sch.unroll(xi)
    sch.unroll(ov)
    return True


__all__ = ["K_GROUP", "PACKED_POINTWISE_BLOCK", "find_packed_pointwise", "lanes_for", "pack_pointwise_weight",
           "pointwise_packed_compute", "register_intrinsic", "schedule_packed_pointwise"]
