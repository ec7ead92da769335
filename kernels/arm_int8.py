"""AArch64 NEON dot-product (``sdot``, Armv8.2 ``+dotprod``) int8 kernels for apq's integer convs.

Why this exists: without ``+dotprod`` an int8 conv on a Cortex-A72 widens bytes to 16 bits
(``smull``/``smlal``: 8 MACs per instruction). ``sdot`` does 16 s8 x s8 MACs into 4 int32
lanes, exactly (int32 accumulation, no saturation). Cortex-A55/A76 (Raspberry Pi 5) have it;
A53/A72 (Pi 3/4) do not, hence the ``dotprod`` key of ``cpu_schedules.INT8_DOT_CONV``.
TVM 0.27 ships no ARM tensor intrinsic that builds (``topi.arm_cpu`` is gone), so this is ours.

Tiling: the x86 VNNI "pixel lanes" tiling of :mod:`apq.kernels.x86_int8`, at NEON width.
The 4 int32 lanes are 4 output pixels of one output channel, the 4 bytes a lane reduces are
4 consecutive input channels of that pixel, and the 4 weights of those channels are one 32-bit
broadcast (``ld1r``/``dup``; LLVM 22 keeps it a full register, not ``sdot``'s by-element form)::

    acc[oc][p0:p0+4] += sum_{k<4} X4[ic/4][p0:p0+4][k] * W[oc][ic + k]

Activations are packed per call into ``[N, C/4, H*W, 4]``; OIHW pointwise weights need no
repack. The packing/padding helpers are shared with the x86 module (same layout, K = 4).

Signedness (A76 has ``sdot``/``udot`` but not the mixed ``usdot``, which needs ``+i8mm``):

- ``int8 x int8`` (apq's own symmetric activations; the QDQ lowering re-biases int8 inputs
  to uint8 only for VNNI targets, so ARM keeps them int8): one ``sdot``.
- ``uint8 x int8`` (onnxruntime's ``quantize_static`` QUInt8 activations): the tensor
  intrinsic flips each byte's top bit (``a ^ 0x80 == a - 128`` as int8), runs ``sdot`` and
  adds back ``128 * sum(w)`` of the 4 weights, computed with a second ``sdot`` against a
  splat of -128 that depends on the weights only (LLVM hoists/CSEs it across the pixel
  vectors of a tile). Exact for every u8/s8 value. Why not re-bias at the Relax level
  instead: it would change ``compile.py``'s lowering for every ARM target, and for apq's
  own int8 models there is nothing to undo. Why not ``udot``: it needs both operands
  unsigned, i.e. a per-pixel correction instead of this per-weight one.

Scope is the VNNI path's: stride-1 pointwise convs, ``groups == 1``, input channels a multiple
of 4, int32 accumulation. Pixel counts that are no multiple of a tile are padded when at least
:data:`apq.kernels.int8_dot_conv.MIN_PADDED_LANE_USE` of the padded lanes are real. Timing needs a real board
(qemu runs these kernels for correctness only); no speed figure is claimed here.
"""

from __future__ import annotations

from typing import Any

from apq.kernels.int8_dot_conv import DotInstruction, dot_intrin_pair, schedule_pointwise_dot

#: TensorIntrin names (one per activation signedness).
SDOT_S8S8_PIXELS4_K4 = "apq_neon_sdot_s8s8i32_pixels4_k4"
SDOT_U8S8_PIXELS4_K4 = "apq_neon_sdot_u8s8i32_pixels4_k4"
#: LLVM intrinsic: (<4 x i32> acc, <16 x i8> a, <16 x i8> b) -> <4 x i32>, lane i += a[4i:4i+4].b[4i:4i+4].
_LLVM_SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"

LANES = 4  # int32 accumulators per 128-bit q register
K_GROUP = 4  # bytes reduced into one int32 lane by sdot
#: Pixel vectors per register tile, in order of preference. 4 vectors x 4 output channels =
#: 16 accumulators, 4 activation loads and 4 weight broadcasts per 16 sdot (NEON has 32 q
#: registers); 2 x 8 needs 10 loads for the same 16 sdot.
_PIXEL_VECTOR_CHOICES = (4, 2, 1, 3, 6, 5)
SDOT = DotInstruction("sdot", LANES, K_GROUP, _PIXEL_VECTOR_CHOICES)
pixel_vectors = SDOT.pixel_vectors
padded_pixel_vectors = SDOT.padded_pixel_vectors
#: Activation dtype of the conv -> tensor intrinsic that covers it.
_INTRIN_BY_DTYPE = {"int8": SDOT_S8S8_PIXELS4_K4, "uint8": SDOT_U8S8_PIXELS4_K4}


def _intrin_funcs(a_dtype: str) -> tuple[Any, Any]:
    """(desc, impl) PrimFuncs of the 4-pixel x 4-channel dot product for ``a_dtype`` activations.

    ``A``: 4 pixels x 4 channels of the packed input; ``B``: the 4 weights of one output
    channel (a ``[4, 1, 1]`` slice of a pointwise OIHW weight); ``C``: 4 local accumulators.
    """
    from tvm.script import tirx as T

    vec = f"{a_dtype}x{LANES * K_GROUP}"

    def weights(B: Any) -> Any:  # the 4 weight bytes repeated in every lane: <16 x i8>
        return T.reinterpret(T.broadcast(T.reinterpret(B.vload([0, 0, 0], "int8x4"), dtype="int32"), LANES),
                             dtype="int8x16")

    def dot(C: Any, A: Any, B: Any) -> Any:
        acc = C.vload([0], "int32x4")
        if a_dtype == "int8":
            return T.call_llvm_pure_intrin("int32x4", _LLVM_SDOT, acc, A.vload([0, 0], vec), weights(B))
        # u8 -> s8 by flipping the top bit (a - 128), then + 128 * sum(w) = - sdot(0, -128, w)
        a_s8 = T.reinterpret(T.bitwise_xor(A.vload([0, 0], vec), T.broadcast(T.uint8(128), 16)), dtype="int8x16")
        corr = T.call_llvm_pure_intrin("int32x4", _LLVM_SDOT, T.broadcast(T.int32(0), LANES),
                                       T.broadcast(T.int8(-128), 16), weights(B))
        return T.call_llvm_pure_intrin("int32x4", _LLVM_SDOT, acc, a_s8, weights(B)) - corr

    return dot_intrin_pair(LANES, K_GROUP, a_dtype, dot)


def register_intrinsics(a_dtype: str = "int8") -> str:
    """Register the sdot tensor intrinsic for ``a_dtype`` activations once per process; returns its name."""
    from apq.kernels.tensor_intrin import register_once

    return register_once(_INTRIN_BY_DTYPE[a_dtype], lambda: _intrin_funcs(a_dtype))


# --------------------------------------------------------------------------- conv2d schedule


def _dot_conv_operands(sch: Any, conv: Any) -> tuple[int, int, str] | None:
    """(data read index, weight read index, data dtype) of an ``{s8,u8} x s8 -> i32`` conv, else None.

    Both operands may be int8, so roles come from the indices, not the dtypes: the weight is
    the 4-D read indexed by the output-channel iterator, the data the one indexed by batch.
    """
    from apq.kernels.cpu_schedules import _vars

    block = sch.get(conv)
    if str(block.writes[0].source.dtype) != "int32" or len(block.reads) < 2:
        return None
    v_n, v_f = block.iter_vars[0].var, block.iter_vars[1].var
    data = weight = None
    for i, region in enumerate(block.reads):
        if len(region.source.shape) != 4:
            continue
        first = _vars(region.region[0].min)
        if any(v_f.same_as(v) for v in first) and str(region.source.dtype) == "int8":
            weight = i
        elif any(v_n.same_as(v) for v in first) and str(region.source.dtype) in _INTRIN_BY_DTYPE:
            data = i
    if data is None or weight is None:
        return None
    return data, weight, str(block.reads[data].source.dtype)


def sdot_conv_applicable(sch: Any, conv: Any, geo: dict[str, int]) -> bool:
    """Is this (already inlined) NCHW conv block one the sdot pixel-lane tiling covers?"""
    ops = _dot_conv_operands(sch, conv)
    if ops is None:
        return False
    if not (geo["kh"] == 1 and geo["kw"] == 1 and geo["stride_w"] == 1):
        return False
    data_i, weight_i, _ = ops
    block = sch.get(conv)
    n_ic = int(block.iter_vars[4].dom.extent)
    w_shape = [int(s) for s in block.reads[weight_i].source.shape]
    x_shape = [int(s) for s in block.reads[data_i].source.shape]
    if w_shape[1] != n_ic or x_shape[1] != n_ic:  # groups == 1
        return False
    if x_shape[2] != geo["oh"] or x_shape[3] != geo["ow"]:  # no padding border
        return False
    npix = geo["oh"] * geo["ow"]
    if n_ic % K_GROUP or npix < 1:
        return False
    return SDOT.covers(npix)


def schedule_conv2d_dot(sch: Any, func: Any, conv: Any, geo: dict[str, int], cfg: Any) -> bool:
    """Tile a pointwise {s8,u8} x s8 conv so its inner (4 pixels x 4 channels) block is sdot.

    Same contract and loop structure as :func:`apq.kernels.x86_int8.schedule_conv2d_vnni`
    (``oc_t`` output channels x ``n_vec`` 4-pixel vectors of accumulators in registers across
    the reduction), at NEON width. Expects ``conv`` already inlined and
    :func:`sdot_conv_applicable`; returns True when the function is fully scheduled.
    """
    data_i, _, a_dtype = _dot_conv_operands(sch, conv)
    return schedule_pointwise_dot(sch, func, conv, geo, cfg, data_i, SDOT, register_intrinsics(a_dtype))
