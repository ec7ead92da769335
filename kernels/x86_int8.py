"""AVX-512 VNNI (``vpdpbusd``) int8 dot products for apq's integer conv2d schedules.

Why this exists: an ``uint8 x int8 -> int32`` conv left to LLVM's auto-vectorizer becomes
16-bit multiply-adds (``vpmaddwd``/``vpdpwssd``: 32 MACs per instruction). ``vpdpbusd``
does 64 u8 x s8 MACs per instruction into 16 int32 lanes, exactly (no int16 saturation,
unlike ``vpmaddubsw``). TVM 0.27 ships a ``dot_16x4_vnni`` tensor intrinsic, but it calls
``llvm.x86.avx512.vpdpbusd.512`` with the pre-LLVM-22 operand types (``<16 x i32>`` for the
byte operands), so the LLVM 22 in the wheel rejects the module. The intrinsic below passes
the bytes as ``<64 x i8>`` (the LLVM 22 signature, verified by building and running it).

Tiling ("pixel lanes"): the 16 int32 lanes are 16 *output pixels* of one output channel,
the 4 bytes each lane reduces are 4 consecutive *input channels* of that pixel, and the
weights of those 4 input channels are one 32-bit broadcast. So

    acc[oc][p0:p0+16] += sum_{k<4} X4[ic/4][p0:p0+16][k] * W[oc][ic + k]

Why this orientation: the output stays NCHW with 16 contiguous pixels per accumulator (the
fused requantize epilogue vectorizes exactly as in the float schedule), and a pointwise
conv's OIHW weights already hold 4 consecutive input channels contiguously, so weights,
which are constants but arrive as function parameters, need no repacking per call. Only
the activations are repacked per call into ``[N, C/4, H*W, 4]`` (C*H*W bytes, against
C*H*W*OC multiply-adds in the conv).

Scope (everything else keeps the LLVM-vectorized path of :mod:`apq.kernels.cpu_schedules`):
stride-1 pointwise convs, ``groups == 1``, uint8 activations, int8 weights, int32
accumulation, input channels a multiple of 4. H*W that splits into no whole 16-pixel vectors
(14x14 and 7x7 images: 196 and 49 pixels) is padded (:func:`_pad_and_pack_activations`) when
at least :data:`apq.kernels.int8_dot_conv.MIN_PADDED_LANE_USE` of the padded lanes are real pixels. Not covered:
signed int8 activations (exact via ``x + 128`` as uint8 and a ``-128 * sum(W)`` correction,
but that changes the computation, which a schedule cannot do: it belongs in the Relax-level
QDQ lowering), KxK / strided convs (their weights would need a per-call repack, or a
compile-time one at the Relax level) and matmul (batch-1 dense layers have no pixel axis
for the lanes; they need compile-time packed weights).
"""

from __future__ import annotations

from typing import Any

from apq.kernels.int8_dot_conv import DotInstruction, dot_intrin_pair, schedule_pointwise_dot
from apq.kernels.padded_copy import partition_loop

#: Name under which the tensor intrinsic is registered in TVM's TensorIntrin table.
VNNI_U8S8_PIXELS16_K4 = "apq_vnni_u8s8i32_pixels16_k4"
#: LLVM intrinsic (LLVM 22 operand types: <16 x i32>, <64 x i8>, <64 x i8> -> <16 x i32>).
_LLVM_VPDPBUSD_512 = "llvm.x86.avx512.vpdpbusd.512"

LANES = 16  # int32 accumulators per zmm register
K_GROUP = 4  # bytes reduced into one int32 lane by vpdpbusd


def _intrin_funcs() -> tuple[Any, Any]:
    """(desc, impl) PrimFuncs of the 16-pixel x 4-channel u8 x s8 dot product (one vpdpbusd)."""
    from tvm.script import tirx as T

    def dot(C: Any, A: Any, B: Any) -> Any:  # the 4 weight bytes repeated in every lane: <64 x i8>
        weights = T.reinterpret(T.broadcast(T.reinterpret(B.vload([0, 0, 0], "int8x4"), dtype="int32"), LANES),
                                dtype="int8x64")
        return T.call_llvm_pure_intrin("int32x16", _LLVM_VPDPBUSD_512, C.vload([0], "int32x16"),
                                       A.vload([0, 0], "uint8x64"), weights)

    return dot_intrin_pair(LANES, K_GROUP, "uint8", dot)


def register_intrinsics() -> str:
    """Register the VNNI tensor intrinsic once per process; returns its name."""
    from apq.kernels.tensor_intrin import register_once

    return register_once(VNNI_U8S8_PIXELS16_K4, _intrin_funcs)


# --------------------------------------------------------------------------- conv2d schedule


def _vnni_conv_operands(sch: Any, conv: Any) -> tuple[int, int] | None:
    """(data read index, weight read index) when the conv block is ``u8 x s8 -> i32``, else None."""
    block = sch.get(conv)
    if str(block.writes[0].source.dtype) != "int32" or len(block.reads) < 2:
        return None
    data = weight = None
    for i, region in enumerate(block.reads):
        buf = region.source
        if len(buf.shape) != 4:
            continue
        if str(buf.dtype) == "uint8":
            data = i
        elif str(buf.dtype) == "int8":
            weight = i
    if data is None or weight is None:
        return None
    return data, weight


def vnni_conv_applicable(sch: Any, conv: Any, geo: dict[str, int]) -> bool:
    """Is this (already inlined) NCHW conv block one the VNNI pixel-lane tiling covers?"""
    if _vnni_conv_operands(sch, conv) is None:
        return False
    if not (geo["kh"] == 1 and geo["kw"] == 1 and geo["stride_w"] == 1):
        return False
    block = sch.get(conv)
    exts = [int(iv.dom.extent) for iv in block.iter_vars]
    n_ic = exts[4]
    data_i, weight_i = _vnni_conv_operands(sch, conv)
    w_shape = [int(s) for s in block.reads[weight_i].source.shape]
    x_shape = [int(s) for s in block.reads[data_i].source.shape]
    # groups == 1: the reduction covers every input channel of both operands
    if w_shape[1] != n_ic or x_shape[1] != n_ic:
        return False
    # a stride-1 pointwise conv reads exactly the output grid (no padding border)
    if x_shape[2] != geo["oh"] or x_shape[3] != geo["ow"]:
        return False
    # the row constraint is checked by the schedule, which knows whether the epilogue flattens
    npix = geo["oh"] * geo["ow"]
    if n_ic % K_GROUP or npix < 1:
        return False
    return VNNI.covers(npix)


#: Pixel vectors per register tile, in order of preference (2 amortizes each weight
#: broadcast over two vpdpbusd; more vectors leave fewer registers for output channels).
_PIXEL_VECTOR_CHOICES = (2, 1, 4, 3, 5, 6)
VNNI = DotInstruction("vpdpbusd", LANES, K_GROUP, _PIXEL_VECTOR_CHOICES)
#: Public names kept for callers: the rules live in :class:`apq.kernels.int8_dot_conv.DotInstruction`.
pixel_vectors = VNNI.pixel_vectors
padded_pixel_vectors = VNNI.padded_pixel_vectors


def _pack_activations(sch: Any, conv: Any, data_i: int, width: int, cfg: Any) -> Any:
    """Copy the conv's uint8 input into ``[N, C/4, H*W, 4]`` (4 channels of a pixel adjacent)."""
    pack = sch.cache_read(conv, data_i, "global")

    def layout(n: Any, c: Any, h: Any, w: Any) -> tuple[Any, ...]:
        return (n, c // K_GROUP, h * width + w, c % K_GROUP)

    sch.transform_layout(pack, ("write", 0), layout)
    sch.transform_block_layout(pack, layout)
    _schedule_pack(sch, pack, cfg)
    return pack


def _schedule_pack(sch: Any, pack: Any, cfg: Any) -> None:
    """The packing copy iterates in the packed order (contiguous writes) with the 4 channels
    unrolled and left to LLVM: TVM's ``vectorize`` of this loop produced per-lane scalar
    accesses. Rows of channel groups run in parallel when the copy is big enough."""
    n, c4, pix, k = sch.get_loops(pack)
    sch.unroll(k)
    _parallel_rows(sch, sch.fuse(n, c4), int(sch.get(pix).extent), cfg)


def _parallel_rows(sch: Any, rows: Any, pixels: int, cfg: Any) -> None:
    """Run the pack's channel-group rows in parallel when the copy is big enough."""
    from apq.kernels.cpu_schedules import worth_parallel

    n_rows = int(sch.get(rows).extent)
    if n_rows > 1 and worth_parallel(cfg, n_rows * pixels * K_GROUP, "element"):
        sch.parallel(rows)


def _pad_and_pack_activations(sch: Any, acc: Any, data_i: int, padded: int, cfg: Any) -> Any:
    """Pad the flat pixel axis of a (flattened) pointwise conv to ``padded`` and pack its input.

    Why: 14x14 and 7x7 images (196 and 49 pixels) split into no whole 16-pixel vectors, so
    their convs ran on the 16-bit path (~1.7 ms of the int8 MobileNetV2 at 224 px). The conv's
    iteration domain is padded (``pad_einsum``): the zero pixels of the packed input give
    accumulators nobody reads, the epilogue still iterates the real pixels only (its last
    tile gets a predicate). The extra work is ``padded / npix`` (196 -> 208: 6%).
    The input is first re-indexed to ``[N, H*W, C]`` (``reindex``: plain iterator indices,
    which ``pad_einsum`` requires), then the padded copy is stored as ``[N, C/4, P, 4]``.
    """
    reindex = sch.reindex(acc, ("read", data_i))
    shape = [int(d) for d in sch.get(reindex).writes[0].source.shape]
    n_ic = int(sch.get(acc).iter_vars[3].dom.extent)
    if len(shape) != 3 or shape[2] != n_ic:
        raise ValueError(f"unexpected re-indexed input {shape}")
    pads = [1] * len(sch.get(acc).iter_vars)
    pads[2] = padded
    sch.pad_einsum(acc, pads)
    (pack,) = sch.get_producers(acc)  # the weight needs no padding: only the input is copied
    (unpad,) = sch.get_consumers(acc)  # padded accumulator -> real one: read it in the epilogue
    sch.compute_inline(reindex)
    sch.compute_inline(unpad)

    def layout(n: Any, p: Any, c: Any) -> tuple[Any, ...]:
        return (n, c // K_GROUP, p, c % K_GROUP)

    sch.transform_layout(pack, ("write", 0), layout)
    sch.transform_block_layout(pack, layout)
    return _partition_padded_pack(sch, pack, shape[1], cfg)


def _partition_padded_pack(sch: Any, pack: Any, npix: int, cfg: Any) -> Any:
    """Split the padded pack's pixel loop at ``npix``; returns the block copying real pixels.

    Why: the copy reads ``if_then_else(p < npix, x, 0)``, a conditional load LLVM leaves
    scalar (19 byte moves and no vector op for a 64-channel 14x14 input). Partitioned, the
    real pixels are a plain copy (the condition simplifies away) that LLVM vectorizes with
    byte unpacks like the unpadded pack, and the padded tail only stores zeros.
    """
    n, c4, pix, _ = sch.get_loops(pack)
    parts = partition_loop(sch, pack, pix, [npix, None])
    for part in parts:
        sch.unroll(sch.get_loops(part)[-1])
    _parallel_rows(sch, sch.fuse(n, c4), npix, cfg)  # n, c4: around both pieces
    return parts[0]


def schedule_conv2d_vnni(sch: Any, func: Any, conv: Any, geo: dict[str, int], cfg: Any) -> bool:
    """Tile a pointwise u8 x s8 conv so its inner (16 pixels x 4 channels) block is vpdpbusd.

    Register tile: ``oc_t`` output channels x ``n_vec`` vectors of 16 pixels, all int32
    accumulators live in zmm registers across the whole reduction; per 4 input channels
    each pixel vector is loaded once and each channel's 4 weights are one broadcast.
    Expects ``conv`` already inlined (see :func:`vnni_conv_applicable`); returns True when
    the function is fully scheduled.
    """
    data_i, _ = _vnni_conv_operands(sch, conv)
    return schedule_pointwise_dot(sch, func, conv, geo, cfg, data_i, VNNI, register_intrinsics())
