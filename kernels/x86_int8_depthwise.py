"""Int8 depthwise convs in NHWC on AVX-512 VNNI: 4 horizontal taps per ``vpdpbusd`` lane.

Why: apq's int8 depthwise convs used to accumulate in float32 (exact, see
:func:`apq.toolchain.qdq_lowering.float_accumulation_is_exact`): per 16 outputs a 3x3 conv costs
9 FMAs plus the byte -> int32 -> float32 conversions of its inputs, all on the two vector ALU
ports. They were a quarter to a third of an int8 MobileNetV2's time at 224 px. ``vpdpbusd``
multiplies 4 bytes per int32 lane and sums them: with 4 horizontal taps of one channel in each
lane, a 3x3 conv is 3 dot products per 16 outputs and no conversion at all.

Layout. ``vpdpbusd`` wants, for 16 channels, the 4 bytes of each channel adjacent. NHWC puts
16 channels of 4 consecutive pixels in 64 bytes that are adjacent only when the tensor has
exactly 16 channels. So the kernel first copies its input, zero-point padded, into channel
blocks: ``P[n, C/L, H, W, L]`` (the padding copy a depthwise conv needs anyway, written per block).
There, the 4 pixels ``x .. x+3`` of a block are one 64-byte load, and one byte permutation
(``vpermb`` with AVX-512 VBMI; LLVM picks the shuffle) turns pixel-major ``[4][L]`` into the
lane-major ``[L][4]`` that ``vpdpbusd`` reads:

    acc[n, y, x, c] += sum_{ky, g, k<4} P[n, c/L, s*y + ky, s*x + 4g + k, c%L] * Wp[ky, g, c, k]

Taps ``kx >= KW`` (the 4th of a 3-wide row) have weight 0 in the packed weight
(:func:`pack_depthwise_weight`); the copy is made wide enough for them to read in bounds. Any
stride works the same way: a window of 4 pixels is contiguous whatever the stride.

The copy is made per band of rows and channel block (:func:`band_rows`), sized to stay in L1.
From NHWC it moves 16-byte pieces, each from another cache line; measured standalone (1 thread),
that was 40-60% of a stride-2 conv's time. So where the input has no other reader, its producer
writes it in channel blocks already (kernels/blocked_handoff.py), and the copy moves whole
contiguous rows. A zero-point pad in front of the conv (toolchain/int8_layout.py) is folded into
the same copy.

Exact: ``vpdpbusd`` sums u8 x s8 products into int32 without saturation, so the accumulator is
the int32 conv, bit for bit, and the graph's epilogue (offset, scale, requantize) is unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

#: TE compute names = the block names the schedule rule recognises.
DEPTHWISE_BLOCK = "apq_depthwise_u8s8_nhwc"
PADDED_BLOCK = "apq_depthwise_u8s8_blocked_pad"
TAP_GROUP = 4  # horizontal taps summed in one int32 lane by vpdpbusd
#: int32 lanes -> (LLVM intrinsic, TensorIntrin name). LLVM 22 operand types (kernels/x86_int8.py).
_VPDPBUSD = {
    16: ("llvm.x86.avx512.vpdpbusd.512", "apq_vnni_depthwise_u8s8i32_lanes16"),
    8: ("llvm.x86.avx512.vpdpbusd.256", "apq_vnni_depthwise_u8s8i32_lanes8"),
    4: ("llvm.x86.avx512.vpdpbusd.128", "apq_vnni_depthwise_u8s8i32_lanes4"),
}
#: Most int32 accumulator vectors per register tile (of 32 zmm: the rest hold the packed
#: weights of one channel block and the permuted inputs).
MAX_ACCUMULATORS = 16
#: zmm registers for accumulators and packed weights together (4 of 32 stay for the permuted
#: inputs and temporaries).
TILE_REGISTERS = 28
#: Most output rows per register tile: an input window permuted once serves up to ``kh`` rows.
MAX_ROW_TILE = 4


def lanes_for(channels: int) -> int | None:
    """int32 lanes of the vpdpbusd that tiles ``channels`` exactly (16 preferred), else None."""
    return next((lanes for lanes in (16, 8, 4) if channels % lanes == 0), None)


def tap_groups(kernel_w: int) -> int:
    """Groups of 4 horizontal taps per kernel row (3 -> 1, 5 or 7 -> 2)."""
    return -(-kernel_w // TAP_GROUP)


def pack_depthwise_weight(weight_hwio: np.ndarray) -> np.ndarray:
    """``(KH, KW, 1, C)`` int8 HWIO depthwise weight -> ``(KH, G, C, 4)``: the 4 horizontal taps
    of group ``g`` of one channel adjacent (one 64-byte vpdpbusd operand per 16 channels), taps
    past ``KW`` zero."""
    kh, kw, one, channels = weight_hwio.shape
    if one != 1:
        raise ValueError(f"depthwise HWIO weight must have one input channel per group, got {weight_hwio.shape}")
    groups = tap_groups(kw)
    packed = np.zeros((kh, groups * TAP_GROUP, channels), dtype=np.int8)
    packed[:, :kw, :] = weight_hwio[:, :, 0, :]
    return np.ascontiguousarray(packed.reshape(kh, groups, TAP_GROUP, channels).transpose(0, 1, 3, 2))


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int) -> int:
    return (size + pad_before + pad_after - kernel) // stride + 1


def depthwise_packed_compute(data: Any, packed_weight: Any, kernel_w: int, strides: Sequence[int],
                             padding: Sequence[int], pad_value: int = 0) -> Any:
    """TE: the NHWC depthwise conv ``u8 x s8 -> i32`` over the channel-blocked padded copy.

    ``padding`` is (top, left, bottom, right); ``pad_value`` is the input's zero point (what the
    real value 0.0 quantizes to). Returns the int32 ``[N, OH, OW, C]`` output.
    """
    from tvm import te, tirx

    n, h, w, channels = (int(d) for d in data.shape)
    kh, groups, _, _ = (int(d) for d in packed_weight.shape)
    lanes = lanes_for(channels)
    if lanes is None:
        raise ValueError(f"{channels} channels: vpdpbusd tiles multiples of 4 only")
    sy, sx = (int(s) for s in strides)
    top, left, bottom, right = (int(p) for p in padding)
    oh = output_size(h, kh, sy, top, bottom)
    ow = output_size(w, kernel_w, sx, left, right)
    rows = sy * (oh - 1) + kh
    cols = sx * (ow - 1) + groups * TAP_GROUP  # the dummy taps of the last window read in bounds

    def padded(b: Any, cb: Any, y: Any, x: Any, ci: Any) -> Any:
        yy, xx = y - top, x - left
        inside = tirx.all(yy >= 0, yy < h, xx >= 0, xx < w)
        return tirx.if_then_else(inside, data[b, yy, xx, cb * lanes + ci], tirx.const(pad_value, data.dtype))

    blocked = te.compute((n, channels // lanes, rows, cols, lanes), padded, name=PADDED_BLOCK)
    ky = te.reduce_axis((0, kh), "ky")
    g = te.reduce_axis((0, groups), "g")
    k = te.reduce_axis((0, TAP_GROUP), "k")
    return te.compute(
        (n, oh, ow, channels),
        lambda b, y, x, c: te.sum(
            blocked[b, c // lanes, sy * y + ky, sx * x + g * TAP_GROUP + k, c % lanes].astype("int32")
            * packed_weight[ky, g, c, k].astype("int32"), axis=[ky, g, k]),
        name=DEPTHWISE_BLOCK,
    )


def _intrin_funcs(lanes: int) -> tuple[Any, Any]:
    """(desc, impl) of ``C[l] += sum_k A[k, l] * B[l, k]``: 4 pixels x ``lanes`` channels of
    input, pixel-major as stored, permuted to channel-major and fed to one vpdpbusd."""
    from tvm.script import tirx as T

    llvm_name = _VPDPBUSD[lanes][0]
    n_bytes = lanes * TAP_GROUP
    # byte 4*l + k of the vpdpbusd operand = pixel k, channel l = byte k*lanes + l of the load
    permutation = [k * lanes + lane for lane in range(lanes) for k in range(TAP_GROUP)]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TAP_GROUP, lanes), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, TAP_GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:TAP_GROUP, 0:lanes], B[0:lanes, 0:TAP_GROUP])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, TAP_GROUP):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vk, vi]) * T.Cast("int32", B[vi, vk])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TAP_GROUP, lanes), "uint8", offset_factor=1)
        B = T.match_buffer(b, (lanes, TAP_GROUP), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:TAP_GROUP, 0:lanes], B[0:lanes, 0:TAP_GROUP])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                f"int32x{lanes}", llvm_name, C.vload([0], f"int32x{lanes}"),
                T.Shuffle([A.vload([0, 0], f"uint8x{n_bytes}")], permutation),
                B.vload([0, 0], f"int8x{n_bytes}"))

    return desc, impl


def register_intrinsic(lanes: int) -> str:
    """Register the ``lanes``-channel intrinsic once per process; returns its name."""
    from apq.kernels.tensor_intrin import register_once

    return register_once(_VPDPBUSD[lanes][1], lambda: _intrin_funcs(lanes))


def find_packed_depthwise(sch: Any) -> tuple[Any, Any] | None:
    """(conv, padded copy) blocks of a (fused) PrimFunc holding the packed depthwise conv."""
    from apq.kernels.cpu_schedules import single_block

    conv, blocked = single_block(sch, DEPTHWISE_BLOCK), single_block(sch, PADDED_BLOCK)
    return (conv, blocked) if conv is not None and blocked is not None else None


def register_tile(out_h: int, out_w: int, weight_vectors: int) -> tuple[int, int]:
    """(rows, columns) of int32 accumulator vectors per register tile.

    Rows first (up to :data:`MAX_ROW_TILE`): a permuted input window of row ``y`` serves every
    output row of the tile whose taps reach ``y``; columns share nothing and fill what is left of
    :data:`MAX_ACCUMULATORS` after the weights.
    """
    from apq.kernels.cpu_schedules import _largest_divisor

    rows = _largest_divisor(out_h, MAX_ROW_TILE)
    budget = max(1, min(MAX_ACCUMULATORS, TILE_REGISTERS - weight_vectors) // rows)
    return rows, _largest_divisor(out_w, budget)


#: Most bytes of one band of the padded copy (one channel block): it is written and then read by
#: the band's register tiles, so it should stay in L1, shared with the other hyperthread, the
#: weights and the output. Measured on the onnxruntime-quantized MobileNetV2 at 224 px, the sum of
#: its seven depthwise kernels (standalone, interleaved, us at 1 / 2 threads): 32 KB bands 326 /
#: 186, 16 KB 318 / 177, 8 KB 287 / 160 (a second run 278 / 157), 4 KB 290 / 160, one register
#: tile of rows 287 / 168; the float-accumulated kernels they replace 465 / 211.
BAND_BYTES = 8 * 1024


def band_rows(out_h: int, row_tile: int, copy_bytes: Callable[[int], int], budget: int = BAND_BYTES) -> int:
    """Output rows per band: the largest multiple of ``row_tile`` dividing ``out_h`` whose padded
    copy (``copy_bytes(rows)``) fits ``budget`` (at least one register tile of rows).

    Why bands: the copy of a band is consumed from L1 right after it is written; a copy of the
    whole plane (206 KB for 112 px) is read back from L2. Consecutive bands both copy the
    ``kh - stride`` rows they share, paid once per band instead of once per register tile.
    """
    best = row_tile
    for rows in range(row_tile, out_h + 1, row_tile):
        if out_h % rows == 0 and copy_bytes(rows) <= budget:
            best = rows
    return best


def _row_stride(copy_rows: int, out_h: int, kh: int) -> int:
    """The conv's vertical stride, from its copy's height (``s * (OH - 1) + KH`` rows)."""
    return (copy_rows - kh) // (out_h - 1) if out_h > 1 else 1


def _copy_columns(sch: Any, blocked: Any) -> tuple[int, int] | None:
    """The interior columns ``[left, left + W)`` of the padded copy (where it reads the input),
    from an NHWC input or one in channel blocks (kernels/blocked_handoff.py)."""
    from apq.kernels.padded_copy import _linear

    stmt = sch.get(blocked)
    region = stmt.reads[0]
    x_axis = 2 if len(region.source.shape) == 4 else 3
    width = int(region.source.shape[x_axis])
    cols = _linear(region.region[x_axis].min, [stmt.iter_vars[3].var])
    if cols is None or cols[0] != 1:
        return None
    return -cols[1], -cols[1] + width


def _vectorize_rows(sch: Any, leaf: Any) -> None:
    """Vectorize a copy or fill whose innermost two loops (columns x 16 channels) are contiguous:
    64 bytes per vector where the row divides, else 16."""
    x, ci = sch.get_loops(leaf)[-2:]
    run = sch.fuse(x, ci)
    extent = int(sch.get(run).extent)
    sch.vectorize(sch.split(run, [None, 64])[1] if extent % 64 == 0 else sch.split(run, [None, 16])[1])


def _schedule_copy(sch: Any, blocked: Any) -> None:
    """The padded copy of one band of one channel block, the padding split off.

    From NHWC, the column loop is partitioned at the padding bounds, so the interior copy has no
    branch, 16-byte moves. From an input already in channel blocks (kernels/blocked_handoff.py),
    rows are contiguous on both sides: a fill, then the interior copied 64 bytes at a time.
    """
    from apq.kernels.cpu_schedules import _can_decompose_padding
    from apq.kernels.padded_copy import _pieces, partition_loop

    first, _, x_loop, _ = sch.get_loops(blocked)[-4:]  # (channel block, row, column, channel)
    if len(sch.get(blocked).reads[0].source.shape) == 5 and _can_decompose_padding(sch, blocked, first):
        fill = sch.decompose_padding(blocked, first)
        _vectorize_rows(sch, fill)
        _vectorize_rows(sch, blocked)
        return
    interior = _copy_columns(sch, blocked)
    leaves = [blocked]
    if interior is not None:
        pieces = _pieces(int(sch.get(x_loop).extent), *interior)
        if pieces is not None:
            leaves = partition_loop(sch, blocked, x_loop, pieces[0])
    for leaf in leaves:
        sch.vectorize(sch.get_loops(leaf)[-1])


def schedule_packed_depthwise(sch: Any, func: Any, conv: Any, blocked: Any, cfg: Any) -> bool:
    """Per band of rows and channel block (together the parallel loop): the padded copy, then
    register tiles of (rows x columns) output vectors, each tap group one tensorized vpdpbusd
    per vector, the epilogue written per tile."""
    from apq.kernels.cpu_schedules import (Conv2dNCHWRule, _block_iterations, _finish_tiled_reduction,
                                           _int_extent, inline_elementwise, worth_parallel)

    block = sch.get(conv)
    _, out_h, out_w, channels, kh, groups, _ = (int(iv.dom.extent) for iv in block.iter_vars)
    lanes = lanes_for(channels)
    if lanes is None:
        return False
    intrin = register_intrinsic(lanes)
    inline_elementwise(sch, func, keep=[conv, blocked])
    y_t, x_t = register_tile(out_h, out_w, kh * groups)
    copy_shape = [int(d) for d in sch.get(blocked).writes[0].source.shape]  # (N, C/L, rows, cols, L)
    stride_h, cols = _row_stride(copy_shape[2], out_h, kh), copy_shape[3]
    band = band_rows(out_h, y_t, lambda rows: (stride_h * (rows - 1) + kh) * cols * lanes, BAND_BYTES)
    copy_name = sch.get(blocked).name_hint
    acc = Conv2dNCHWRule._accumulator(sch, func, conv)
    n, y, x, c, ky, g, k = sch.get_loops(acc)
    cb, ci = sch.split(c, [None, lanes])
    yb, yo, yi = sch.split(y, [None, band // y_t, y_t])
    xo, xi = sch.split(x, [None, x_t])
    # bands outside channel blocks: a thread's outputs are whole rows. Channel blocks outermost put
    # the threads' 16-byte pieces of one pixel in one cache line (false sharing: at 2 threads a
    # 112 px stride-2 conv took 94 us against 52 us on the float schedule)
    sch.reorder(n, yb, cb, yo, xo, ky, g, yi, xi, ci, k)
    outer = sch.fuse(n, yb, cb)
    if worth_parallel(cfg, _block_iterations(sch, acc), "int8_dot_mac") and _int_extent(sch, outer) > 1:
        sch.parallel(outer)
    sch.compute_at(blocked, outer, preserve_unit_loops=True)
    _schedule_copy(sch, blocked)
    tile = sch.fuse(yo, xo)
    _finish_tiled_reduction(sch, func, cfg, acc, ky, tile, lanes, done=[copy_name])
    sch.tensorize(ci, intrin)
    for loop in (ky, g, yi, xi):
        sch.unroll(loop)
    return True


__all__ = ["BAND_BYTES", "DEPTHWISE_BLOCK", "PADDED_BLOCK", "TAP_GROUP", "band_rows", "depthwise_packed_compute",
           "find_packed_depthwise", "lanes_for", "output_size", "pack_depthwise_weight", "register_intrinsic",
           "register_tile", "schedule_packed_depthwise", "tap_groups"]
