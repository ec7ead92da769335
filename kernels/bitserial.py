"""Bit-serial conv2d / depthwise conv2d / dense in TVM TE, scheduled with ``tvm.s_tir``.

Why our own compute: TVM 0.27's topi bit-serial ops have no schedule, no groups (no depthwise),
and ``bitserial_conv2d_nhwc`` misreads 5-D packed kernels (see TVM_NOTES.md).

Layout: **NHWC** activations and HWIO weights packed to ``(KH, KW, CW, w_bits, O)`` (see
:mod:`apq.kernels.bitpack`). NHWC schedules best here because the packed reduction (input-channel
words, 1-20 words for MobileNet widths) is far too short to vectorise over, while output channels
(hundreds) are contiguous in the packed weights: the kernel broadcasts one activation word and
ANDs/POPCOUNTs a vector of 16 weight words (uint32 x 16 = one AVX-512 register, ``vpopcntd`` with
VPOPCNTDQ; NEON ``cnt`` + pairwise adds on AArch64). Activations arrive unpacked (uint8, as the
previous layer writes them) and are packed inside the kernel, with zero padding fused into the
packing, so every measurement includes the packing cost.

Depthwise: each output channel reduces over its own KxK window only, so channel packing cannot
work; the window is packed instead (9/25 bits in uint32, 49 in uint64), one word per (pixel,
channel, activation bit), vectorised over channels. Packing is an im2col in bits; the default
``rows`` packer builds K-bit row words once per input row and ORs K of them per window (about
2K instead of K*K operations per output and bit). Measured (bench/kernels.py, 3x3): it only
pays at 1-2 bits (W1A1 ~2-3x, W2A2 ~1-2x the simple int8 kernel); W4A4 and W2A8 are slower
than int8 because packing a-bit activations costs a*2K per output against K*K MACs. 7x7:
``rows`` is ~3x faster than the direct ``window`` packer.

Also here: float32 / int8 direct NHWC convs with the same simple schedule, the honest baselines
for the benchmark (NOT a tuned VNNI int8 kernel: with this schedule int8 is even slower than
float32, the int16 multiply and int32 widening cost more than one FMA).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from apq.kernels import bitpack
from apq.kernels.cpu_schedules import _largest_divisor
from apq.toolchain.errors import InvalidInputError


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class BitserialConfig:
    """What a bit-serial kernel computes (not how it is scheduled)."""

    a_bits: int
    w_bits: int
    mode: str = "unipolar"  # weight encoding, see bitpack.WEIGHT_MODES
    stride: int = 1
    padding: int = 0
    word_bits: int = 32  # packing word for channel-packed conv / dense (depthwise picks by window)
    acc_bits: int = 32  # accumulator lanes of a channel-packed conv: 16 only where narrow_words allows

    def __post_init__(self) -> None:
        bitpack.check_bits(self.a_bits, "a_bits")
        bitpack.check_bits(self.w_bits, "w_bits")
        bitpack.check_mode(self.mode)
        bitpack.word_dtype(self.word_bits)
        if self.stride < 1 or self.padding < 0:
            raise InvalidInputError(f"bad stride/padding {self.stride}/{self.padding}")
        if self.acc_bits not in ACC_BITS:
            raise InvalidInputError(f"acc_bits must be one of {ACC_BITS}, got {self.acc_bits}")
        if self.acc_bits == 16 and self.mode == "bipolar":
            raise InvalidInputError("16-bit accumulators are for unipolar / signed weights only")

    @property
    def acc_dtype(self) -> str:
        return f"int{self.acc_bits}"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> "BitserialConfig":
        return cls(**(json.loads(d) if isinstance(d, str) else d))


#: Accumulator widths of a channel-packed conv (:func:`narrow_words`).
ACC_BITS = (16, 32)


def accumulator_bound(channels: int, kernel_size: int, a_bits: int, w_bits: int) -> int:
    """Largest sum of absolute plane terms of one output: ``k^2 C (2^a - 1)(2^w - 1)``. Every
    partial sum of the reduction, in any order, is bounded by it (unipolar and signed weights)."""
    return kernel_size * kernel_size * channels * ((1 << a_bits) - 1) * ((1 << w_bits) - 1)


def narrow_words(channels: int, kernel_size: int, a_bits: int, w_bits: int, mode: str, target=None) -> bool:
    """Whether a conv packs its channels into 16-bit words and accumulates in int16 lanes.

    Why: a 16-channel layer packed into 32-bit words leaves half of every AND and popcount idle
    (the 16 -> 64 expansion at 112 px, the largest bit-serial kernel of bench/mixed_precision.py's
    224 px networks). In 16-bit words with int16 accumulators, one 512-bit vector holds 32 output
    channels of 16 useful bits each (``vpopcntw``, AVX-512 BITALG): measured on that layer, W2A2
    signed with a requantizing epilogue, 1 thread, interleaved: 100 us against 190 us for 32-bit
    words (and 206 us for 16-bit words with int32 accumulators). On 24-256 channels the two forms
    timed within 5% of each other, so only layers whose 32-bit packing pads more than 16-bit
    packing would (``C mod 32`` in 1..16) take it.

    Conditions: a 1x1 conv (the only form measured), unipolar or signed weights (bipolar kernels
    need int32 activation sums), :func:`accumulator_bound` <= 32767 (no partial sum can overflow
    int16), and an x86 target with AVX-512 BW and BITALG (16-bit vector popcount in hardware).
    """
    if kernel_size != 1 or mode == "bipolar" or channels % 32 == 0 or channels % 32 > 16:
        return False
    if accumulator_bound(channels, kernel_size, a_bits, w_bits) > 32767:
        return False
    from apq.kernels.cpu_schedules import target_has

    return target_has(target, ["avx512bw", "avx512bitalg"])


def kernel_config(op: str, a_bits: int, w_bits: int, mode: str, stride: int, padding: int, channels: int,
                  kernel_size: int, target=None) -> BitserialConfig:
    """The config of the conv kernel the lowering emits for a layer (``op``: "depthwise", or a
    channel-packed "pointwise" / "conv"), so the measured kernel choice times that same kernel:
    32-bit words, or for narrow channel-packed layers 16-bit words with int16 accumulators
    (:func:`narrow_words`)."""
    narrow = op != "depthwise" and narrow_words(channels, kernel_size, a_bits, w_bits, mode, target)
    return BitserialConfig(a_bits, w_bits, mode, stride=stride, padding=padding,
                           word_bits=16 if narrow else 32, acc_bits=16 if narrow else 32)


@dataclass(frozen=True)
class ScheduleConfig:
    """The small knob space of the CPU schedule template.

    ``vector_lanes`` 0 = pick from the target (16 for AVX-512, 8 for AVX2, 4 for NEON);
    the output-channel tile is ``vector_lanes * oc_vectors`` and ``row_tile`` output pixels are
    computed together, so ``row_tile * oc_vectors`` vector accumulators stay in registers.
    """

    row_tile: int = 4
    oc_vectors: int = 1
    vector_lanes: int = 0
    parallel: bool = True
    unroll_bits: bool = True
    # where activations are packed: "root" (all first, own parallel loop), "row" (inside each
    # parallel row tile: one fork-join less, words hot in L1; measured 10-25% faster for 1x1 at
    # 1-2 bits), "auto" = "row" when no packed word is needed by two tiles (1x1 conv, dense)
    pack_at: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | str) -> "ScheduleConfig":
        return cls(**(json.loads(d) if isinstance(d, str) else d))


def default_schedule(a_bits: int, w_bits: int) -> ScheduleConfig:
    """The conv knobs used when none are given. With a single bit-plane pair (W1A1) each packed
    activation word feeds one AND + popcount per output vector: a one-vector tile leaves the
    popcount unit waiting on too few independent chains, and two output-channel vectors measured
    1.22-1.39x faster on bench/kernels.py's four pointwise shapes (two interleaved runs, 1 thread).
    With more bit-plane pairs the unrolled pairs already fill the tile (W2A2: 0.997-1.011x)."""
    return ScheduleConfig(oc_vectors=2) if a_bits * w_bits == 1 else ScheduleConfig()


def conv_out_size(size: int, kernel: int, stride: int, padding: int) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise InvalidInputError(f"conv output would be empty (size {size}, kernel {kernel}, pad {padding})")
    return out


# ----------------------------------------------------------------------------- TE compute


def _plane_term(a, w, ri, rj, cfg: BitserialConfig, word_sum=None):
    """int32 contribution of one (activation word, weight word) pair, bit planes ``ri``, ``rj``.

    - unipolar: ``popcount(a & w) << (i + j)``;
    - signed: the same, negated for the top plane (``rj == w_bits - 1``);
    - bipolar: ``popcount(a & w) << (i + j + 1)`` plus a correction: summed over the planes this is
      ``2 P - (2^w - 1) S``, ``S`` the sum of the activations the word packs.
      With ``word_sum`` (conv and dense: ``S`` of this word position, precomputed once per
      activation word by :func:`_word_sums`) the correction is one broadcast add on the plane pair
      ``(0, 0)``. Without it (depthwise) it is derived here: ``-(2^w - 1) popcount(a) << i`` on
      plane ``j == 0``, a scalar popcount + broadcast + add per (plane, word, output vector).
    TE cannot express the correction as a reduction init (``create_prim_func`` silently drops a
    tensor init) nor as an epilogue under the tile loop (s_tir needs every producer under the
    loop). The ``ri``/``rj`` conditions constant-fold once the bit loops are unrolled.
    """
    from tvm import te, tirx

    acc = cfg.acc_dtype
    t = te.popcount(a & w).astype(acc)
    if cfg.mode == "bipolar":
        top = (1 << cfg.w_bits) - 1
        if word_sum is not None:
            corr, on = word_sum * (-top), tirx.all(ri == 0, rj == 0)
        else:
            corr, on = (te.popcount(a).astype("int32") << ri.astype("int32")) * (-top), rj == 0
        return (t << (ri + rj + 1).astype("int32")) + te.if_then_else(on, corr, tirx.const(0, "int32"))
    t = t << (ri + rj).astype(acc)
    if cfg.mode == "signed":
        t = te.if_then_else(rj == cfg.w_bits - 1, -t, t)
    return t


def _channel_packer(x, channels: int):
    """SWAR packer (8 channels per 64-bit multiply) when the layout allows it, else bit by bit."""
    if channels % 8 == 0 and str(x.dtype) in ("uint8", "int8"):
        return bitpack.te_pack_activations_nhwc_swar
    return bitpack.te_pack_activations_nhwc


def _pack_conv_input(x, cfg: BitserialConfig, target=None):
    """The conv's packed activations: AVX2 movemask (kernels/x86_bitpack.py) where the layer and
    target allow it, else SWAR (8-channel multiples), else bit by bit."""
    from apq.kernels import x86_bitpack

    c = int(x.shape[3])
    # bipolar weights need the activation sums, taken from the bytes behind this packer
    # (_word_sums); at 1 bit that sum costs more than SWAR's single plane saves (measured: 64 -> 24
    # at 64x64, 1 thread: 138 us against 68 us with SWAR), from 2 bits the packer wins (1.2-2.2x on
    # bench shapes), so 1-bit activations of bipolar layers keep SWAR.
    if (not (cfg.mode == "bipolar" and cfg.a_bits == 1)
            and x86_bitpack.supports(c, cfg.padding, cfg.stride, cfg.word_bits, str(x.dtype), target)):
        return x86_bitpack.te_pack_activations(x, cfg.a_bits)
    return _channel_packer(x, c)(x, cfg.a_bits, cfg.padding, cfg.word_bits)


#: Block name of a bipolar conv / dense's per-word activation sums (:func:`_word_sums`).
XSUM_BLOCK = "xsum"


def _word_sums(xp, idx: str, x=None):
    """``S[..., word] = sum_i 2^i popcount(xp[..., word, i])``: the sum of the activations one
    packed word holds, once per word (int32, ``xp``'s leading shape); with ``x`` (the unpadded
    NHWC input behind the movemask packer), the sum of the activation bytes themselves.

    Why: bipolar weights need ``S`` (:func:`_plane_term`); before, each reduction step re-derived
    it, a scalar popcount + broadcast + add per (plane, word) and output-channel vector.
    Why the bytes behind the movemask packer (kernels/x86_bitpack.py): LLVM keeps the movemask
    words in AVX-512 mask registers and, in some kernels, read a stale one (in the assembly: the
    last plane's ``vpmovmskb`` went to a general register for a popcount while the broadcast took
    a ``kunpckdq`` of the previous plane's mask register). Three forms came out wrong with that
    packer: the popcount in the reduction (>= 3-bit activations, >= 64 channels), these per-word
    sums taken as popcounts of the packed words, and one byte sum per pixel added at the first word
    (3 of 150 random convs, 1-bit activations, >= 256 channels). This form (per-word byte sums,
    added on plane pair (0, 0)) was exact on 750 random bipolar convs (all bit pairs, 32-512
    channels, 1-16 px), and 320 unipolar/signed ones were exact too; a randomized test keeps watch
    (tests/test_bitserial.py). What triggers LLVM is not predictable from the TIR.
    """
    from tvm import te

    shape = tuple(xp.shape)
    if x is not None:
        from apq.kernels.x86_bitpack import WORD_BITS

        b = te.reduce_axis((bitpack.te_extent(0, idx), bitpack.te_extent(WORD_BITS, idx)), "sb")
        return te.compute(shape[:-1], lambda nn, hh, ww, ci: te.sum(
            x[nn, hh, ww, ci * WORD_BITS + b].astype("int32"), axis=b), name=XSUM_BLOCK)
    si = te.reduce_axis((bitpack.te_extent(0, idx), shape[-1]), "si")
    return te.compute(shape[:-1], lambda *ix: te.sum(
        te.popcount(xp[(*ix, si)]).astype("int32") << si.astype("int32"), axis=si), name=XSUM_BLOCK)


def bitserial_conv2d_nhwc(x, w_packed, cfg: BitserialConfig, name: str = "bsconv", target=None):
    """TE: x (N, H, W, C) unsigned ints, w_packed (KH, KW, CW, w_bits, O) -> int32 (N, OH, OW, O).

    Every extent has ``x``'s index type (:func:`bitpack.index_dtype_of`): int64 when the kernel is
    to be fused with Relax's int64 epilogues (FuseTIR maps the kernel's output and the epilogue's
    input to one buffer and rejects a type mismatch). ``target`` picks the activation packer
    (:func:`_pack_conv_input`); None = the portable ones.
    """
    from tvm import te

    from apq.kernels import x86_bitpack

    n, h, w, c = (int(s) for s in x.shape)
    kh, kw, cw, wb, o = (int(s) for s in w_packed.shape)
    if wb != cfg.w_bits or cw != bitpack.num_words(c, cfg.word_bits):
        raise InvalidInputError(f"packed weights {tuple(w_packed.shape)} do not match C={c}, {cfg}")
    s = cfg.stride
    oh, ow = conv_out_size(h, kh, s, cfg.padding), conv_out_size(w, kw, s, cfg.padding)
    xp = _pack_conv_input(x, cfg, target)
    idx = bitpack.index_dtype_of(x)

    def axis(extent: int, label: str):
        return te.reduce_axis((bitpack.te_extent(0, idx), bitpack.te_extent(extent, idx)), label)

    rh, rw, rc = axis(kh, "rh"), axis(kw, "rw"), axis(cw, "rc")
    ri, rj = axis(cfg.a_bits, "ri"), axis(cfg.w_bits, "rj")

    movemask = xp.op.name == x86_bitpack.PACK_BLOCK
    sums = _word_sums(xp, idx, x if movemask else None) if cfg.mode == "bipolar" else None

    def body(nn, y, xo, oc):
        a = xp[nn, y * s + rh, xo * s + rw, rc, ri]
        ws = None if sums is None else sums[nn, y * s + rh, xo * s + rw, rc]
        return te.sum(_plane_term(a, w_packed[rh, rw, rc, rj, oc], ri, rj, cfg, ws), axis=[rh, rw, rc, ri, rj])

    out_shape = tuple(bitpack.te_extent(v, idx) for v in (n, oh, ow, o))
    acc = te.compute(out_shape, body, name=name)
    if cfg.acc_bits == 32:
        return acc
    # int16 lanes (narrow_words): the kernel still returns int32, widened per register tile
    return te.compute(out_shape, lambda *i: acc[i].astype("int32"), name=f"{name}_widen")


DW_PACKERS = {
    "rows": bitpack.te_pack_depthwise_activations_rows,  # default: row words, then windows
    "window": bitpack.te_pack_depthwise_activations,  # direct K*K im2col in bits
}


def bitserial_depthwise_conv2d_nhwc(x, w_packed, kernel_size: int, cfg: BitserialConfig, pack: str = "rows",
                                    name: str = "bsdw"):
    """TE: x (N, H, W, C), w_packed (w_bits, C) window words -> int32 (N, OH, OW, C).

    ``pack`` picks the activation window packer from :data:`DW_PACKERS`.
    """
    from tvm import te

    n, h, w, c = (int(s) for s in x.shape)
    wb, wc = (int(s) for s in w_packed.shape)
    if wb != cfg.w_bits or wc != c:
        raise InvalidInputError(f"packed depthwise weights {(wb, wc)} do not match C={c}, {cfg}")
    if pack not in DW_PACKERS:
        raise InvalidInputError(f"unknown depthwise packer {pack!r}; valid: {', '.join(DW_PACKERS)}")
    xw = DW_PACKERS[pack](x, cfg.a_bits, kernel_size, cfg.stride, cfg.padding)
    _, oh, ow, _, _ = (int(s) for s in xw.shape)
    ri, rj = te.reduce_axis((0, cfg.a_bits), "ri"), te.reduce_axis((0, cfg.w_bits), "rj")

    def body(nn, y, xo, ch):
        return te.sum(_plane_term(xw[nn, y, xo, ri, ch], w_packed[rj, ch], ri, rj, cfg), axis=[ri, rj])

    return te.compute((n, oh, ow, c), body, name=name)


def bitserial_dense(x, w_packed, cfg: BitserialConfig, name: str = "bsdense"):
    """TE: x (M, K) unsigned ints, w_packed (KW, w_bits, O) -> int32 (M, O)."""
    from tvm import te

    m, k = (int(s) for s in x.shape)
    kw_, wb, o = (int(s) for s in w_packed.shape)
    if wb != cfg.w_bits or kw_ != bitpack.num_words(k, cfg.word_bits):
        raise InvalidInputError(f"packed dense weights {(kw_, wb, o)} do not match K={k}, {cfg}")
    x4 = te.compute((1, 1, m, k), lambda a, b, mm, kk: x[mm, kk], name="xview")
    xp = _channel_packer(x, k)(x4, cfg.a_bits, 0, cfg.word_bits)
    rc = te.reduce_axis((0, kw_), "rc")
    ri, rj = te.reduce_axis((0, cfg.a_bits), "ri"), te.reduce_axis((0, cfg.w_bits), "rj")

    sums = _word_sums(xp, "int32") if cfg.mode == "bipolar" else None

    def body(mm, oc):
        ws = None if sums is None else sums[0, 0, mm, rc]
        return te.sum(_plane_term(xp[0, 0, mm, rc, ri], w_packed[rc, rj, oc], ri, rj, cfg, ws), axis=[rc, ri, rj])

    return te.compute((m, o), body, name=name)


def _mul(x, w, acc_dtype: str):
    if acc_dtype == "int32" and x.dtype in ("uint8", "int8") and w.dtype in ("uint8", "int8"):
        return (x.astype("int16") * w.astype("int16")).astype("int32")
    return x.astype(acc_dtype) * w.astype(acc_dtype)


def direct_conv2d_nhwc(x, w, stride: int, padding: int, acc_dtype: str, depthwise: bool = False,
                       name: str = "conv"):
    """TE baseline: float32 or int8 direct conv, NHWC x, HWIO w (depthwise: (K, K, C)).

    int8: uint8 x int8 products fit int16 exactly (|255 * -128| < 2^15), so the multiply is done
    in int16 and only the product is widened to the int32 accumulator (no faster than an int32
    multiply in our measurements, and still slower than float32: no VNNI, no vpmaddwd pairing).
    """
    from tvm import te, tirx

    n, h, wd, c = (int(s) for s in x.shape)
    kh, kw = int(w.shape[0]), int(w.shape[1])
    o = c if depthwise else int(w.shape[3])
    oh, ow = conv_out_size(h, kh, stride, padding), conv_out_size(wd, kw, stride, padding)
    if padding:
        p = padding
        xpad = te.compute(
            (n, h + 2 * p, wd + 2 * p, c),
            lambda a, y, xx, ch: te.if_then_else(
                tirx.all(y >= p, y < h + p, xx >= p, xx < wd + p), x[a, y - p, xx - p, ch],
                tirx.const(0, x.dtype)),
            name="pad")
    else:
        xpad = x
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    if depthwise:
        def body(a, y, xx, ch):
            return te.sum(_mul(xpad[a, y * stride + rh, xx * stride + rw, ch], w[rh, rw, ch], acc_dtype),
                          axis=[rh, rw])
    else:
        rc = te.reduce_axis((0, c), "rc")

        def body(a, y, xx, oc):
            return te.sum(_mul(xpad[a, y * stride + rh, xx * stride + rw, rc], w[rh, rw, rc, oc], acc_dtype),
                          axis=[rh, rw, rc])
    return te.compute((n, oh, ow, o), body, name=name)


# ----------------------------------------------------------------------------- schedules


def default_vector_lanes(target) -> int:
    """int32 lanes of one vector register on the target: AVX-512 16, AVX2 8, NEON / SSE 4.

    Asks LLVM about the target's features (``llvm_get_vector_width`` answers 512 for every x86
    CPU in this TVM build, so it cannot be used).
    """
    from apq.kernels.cpu_schedules import target_has

    t = tvm_target(target)
    if "aarch64" in str(t.attrs.get("mtriple", "")):
        return 4
    if target_has(t, "avx512f"):
        return 16
    return 8 if target_has(t, "avx2") else 4  # else (non-LLVM, SSE, NEON) a safe 128-bit default


def tvm_target(target):
    """Accept a TargetSpec, a JSON dict or a tvm Target; return a tvm Target."""
    import tvm

    if target is None:
        from apq.targets.registry import get_target

        return get_target("host").tvm()
    if hasattr(target, "tvm_target"):
        return target.tvm()
    if isinstance(target, dict):
        return tvm.target.Target(target)
    return target


def _register_lanes(channels: int, lanes: int) -> int:
    """The largest power of two that divides ``channels``, at most ``lanes``: a whole vector
    register (zmm / ymm / xmm). A 24-channel layer used to get 12-lane vectors, which LLVM splits
    into an 8- and a 4-lane half. Below 8 lanes (odd or 4k + 2 channel counts: a 10-class dense)
    the largest divisor up to ``lanes`` stays: one partial vector beats many 1-2 lane ones."""
    ln = 1
    while ln * 2 <= lanes and channels % (ln * 2) == 0:
        ln *= 2
    return ln if ln >= min(lanes, 8) else _largest_divisor(channels, lanes)


def _channel_tile(channels: int, lanes: int, oc_vectors: int) -> tuple[int, int]:
    """(lanes, vectors) of the output-channel register tile: full registers
    (:func:`_register_lanes`), and when those are narrower than ``lanes``, as many more vectors as
    needed to keep the tile ``oc_vectors * lanes`` wide (the smallest that divides the channels).
    Measured on W2A2 pointwise layers with 24 output channels (1 thread, interleaved): 8 lanes x 3
    vectors took 62 / 51 us where 12 lanes x 1 took 87 / 61 us (56 px, 96 / 64 input channels)."""
    ln = _register_lanes(channels, lanes)
    groups = channels // ln
    if ln in (1, lanes) or ln & (ln - 1):  # a whole register, or a partial one (see _register_lanes)
        return ln, _largest_divisor(groups, oc_vectors)
    want = oc_vectors * lanes // ln
    wider = next((d for d in range(want, groups + 1) if groups % d == 0), groups)
    # at most twice the tile asked for (register pressure), else the widest tile below it
    return ln, wider if wider <= 2 * want else _largest_divisor(groups, want)


def _schedule_reduction_block(sch, block_name: str, lanes: int, sc: ScheduleConfig, unroll_last: int):
    """Schedule one ``out[spatial..., channel] = sum(reduce...)`` block for a CPU.

    Spatial loops: the last one (channels) is split into ``(oc_outer, oc_vec, lanes)`` and
    vectorised; the one before (output columns / rows of a dense) is split by ``row_tile`` and
    unrolled; all earlier spatial loops are fused and parallelised. Reduction loops stay in order
    between the outer tiles and the register tile, their last ``unroll_last`` (the bit loops) are
    unrolled. The accumulator tile lives in a local buffer (registers), written back once.
    ``lanes`` counts int32 lanes; a block accumulating in narrower integers (int16,
    :func:`narrow_words`) gets as many more as fit the same register.
    Returns the parallel row loop and the output-tile loop.
    """
    from tvm import DataType

    from apq.kernels.cpu_schedules import _is_output_block, vectorize_by_divisor

    block = sch.get_sblock(block_name)
    acc_bits = DataType(sch.get(block).writes[0].source.dtype).bits
    epilogue_lanes = lanes  # the epilogue works in int32 / float32 (and may store 16-channel blocks)
    lanes = lanes * 32 // acc_bits if acc_bits < 32 else lanes
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    n_sp = sum(1 for it in iters if it.iter_type == 0)
    sp, red = loops[:n_sp], loops[n_sp:]
    extents = [int(sch.get(l).extent) for l in loops]
    oc_ext, row_ext = extents[n_sp - 1], extents[n_sp - 2] if n_sp >= 2 else 1

    ln, vecs = _channel_tile(oc_ext, lanes, sc.oc_vectors)
    oc_o, oc_v, oc_l = sch.split(sp[-1], [None, vecs, ln])
    if n_sp >= 2:
        rt = _largest_divisor(row_ext, sc.row_tile)
        row_o, row_i = sch.split(sp[-2], [None, rt])
        outer = list(sp[:-2]) + [row_o, oc_o]
        tile = [row_i, oc_v, oc_l]
    else:
        outer, tile = [oc_o], [oc_v, oc_l]
    sch.reorder(*outer, *red, *tile)
    par = sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0]
    if sc.parallel:
        sch.parallel(par)
    if _is_output_block(sch, block, sch.mod["main"]):
        # accumulate in a register tile, written back after the reduction
        cache = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(cache, outer[-1])
        sch.vectorize(sch.get_loops(cache)[-1])
    else:
        # fused with its epilogue (schedule_fused_pointwise): the accumulator tile lives in
        # registers and the epilogue, computed per tile, reads it there (no int32 round trip)
        sch.set_scope(block, 0, "local")
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            raise ValueError("a fused bit-serial conv needs exactly one epilogue block")
        sch.reverse_compute_at(consumers[0], outer[-1], preserve_unit_loops=False)
        vectorize_by_divisor(sch, sch.get_loops(consumers[0])[-1], _register_lanes(oc_ext, epilogue_lanes))
    # vectorise while the block still has its init (a "local reduction block"); decompose after
    for lp in tile[:-1]:
        sch.unroll(lp)
    sch.vectorize(tile[-1])
    if sc.unroll_bits:
        for lp in red[len(red) - unroll_last:]:
            sch.unroll(lp)
    init = sch.decompose_reduction(block, red[0])
    sch.vectorize(sch.get_loops(init)[-1])
    return par, outer[-1]  # the parallel row loop and the output-tile loop


def _schedule_pack_block(sch, block_name: str, parallel: bool) -> None:
    """Packing stage (bit extraction, a reduction over the word): parallel over rows, word loop
    unrolled (or, for the movemask packer, its core tensorized)."""
    block = sch.get_sblock(block_name)
    loops = sch.get_loops(block)
    if parallel and len(loops) >= 3:
        sch.parallel(sch.fuse(loops[0], loops[1]))
    _finish_pack_core(sch, block)


def _finish_pack_core(sch, block) -> None:
    from apq.kernels import x86_bitpack

    if x86_bitpack.is_pack_block(sch, block):
        x86_bitpack.schedule_pack(sch, block)
    else:
        sch.unroll(sch.get_loops(block)[-1])


def _pack_block_name(sch) -> str | None:
    """The conv's activation packing block (one of :data:`PACK_BLOCKS`), None if there is none or two."""
    found = [n for n in PACK_BLOCKS if _has_block(sch, n)]
    return found[0] if len(found) == 1 else None


def opaque_scheduled(func):
    """Prepare a scheduled PrimFunc for a Relax module: strip the symbol (Relax renames it), mark
    it opaque (FuseTIR must not fuse into it) and scheduled (``tirx.is_scheduled``: dlight's
    ApplyDefaultSchedule, which apq's CPU pipeline runs, skips it)."""
    from apq.kernels.pipeline import OP_PATTERN_OPAQUE

    return (func.without_attr("global_symbol").with_attr("op_pattern", OP_PATTERN_OPAQUE)
            .with_attr("tirx.is_scheduled", True))


def fuses_epilogue(op: str, stride: int, padding: int, target=None) -> bool:
    """Whether a layer's bit-serial kernel is emitted unscheduled and fusable with its requantize
    epilogue (:func:`schedule_fused_pointwise`): stride-1 unpadded pointwise convs on targets apq's
    CPU pipeline schedules. The lowering and the measured kernel choice ask the same question."""
    from apq.kernels.pipeline import supports

    return op == "pointwise" and stride == 1 and not padding and supports(tvm_target(target))


def fusable_unscheduled(func):
    """Prepare an unscheduled pointwise conv PrimFunc (``conv2d_primfunc(..., scheduled=False)``)
    for a Relax module: no symbol, and fusable with its elementwise consumers (FuseOps folds the
    requantize epilogue in; :func:`schedule_fused_pointwise` schedules the fused PrimFunc)."""
    from apq.kernels.pipeline import OP_PATTERN_OUT_EWISE_FUSABLE

    return func.without_attr("global_symbol").with_attr("op_pattern", OP_PATTERN_OUT_EWISE_FUSABLE)


def _schedule(func, stages: Sequence[tuple[str, str]], target, sc: ScheduleConfig, unroll_last: int,
              pack_at_auto: str = "root"):
    from tvm import s_tir

    lanes = sc.vector_lanes or default_vector_lanes(target)
    sch = s_tir.Schedule(func)
    if sc.pack_at not in ("auto", "root", "row"):
        raise InvalidInputError(f"pack_at must be auto, root or row, got {sc.pack_at!r}")
    pack_at = pack_at_auto if sc.pack_at == "auto" else sc.pack_at
    packs = _with_word_sums(sch, [name for kind, name in stages if kind == "pack"])
    par = None
    for kind, name in stages:
        if kind != "pack":
            par, _ = _schedule_reduction_block(sch, name, lanes, sc, unroll_last)
    for name in packs:
        if pack_at == "row" and par is not None:
            # pack the rows a parallel row tile needs inside that tile: one parallel region
            # instead of two (a fork-join saved), packed words still in L1 when consumed
            block = sch.get_sblock(name)
            sch.compute_at(block, par)
            _finish_pack_core(sch, block)
        else:
            _schedule_pack_block(sch, name, sc.parallel)
    return sch.mod["main"]


def _with_symbol(func, name: str):
    return func.with_attr("global_symbol", name)


#: Names of the conv's activation packing block: portable packers, AVX2 movemask packer.
PACK_BLOCKS = ("xpack", "xpack_movemask")


def conv2d_primfunc(x_shape: Sequence[int], w_packed_shape: Sequence[int], cfg: BitserialConfig,
                    target=None, sched: ScheduleConfig | None = None, x_dtype: str = "uint8",
                    scheduled: bool = True):
    """PrimFunc ``(x, w_packed) -> out`` for a bit-serial NHWC conv2d: scheduled, or (``scheduled``
    False) the bare compute, for a Relax module that fuses its epilogue into it first
    (:func:`schedule_fused_pointwise` then schedules the fused PrimFunc)."""
    from tvm import s_tir, te, tirx

    index_dtype = "int32" if scheduled else "int64"
    x = te.placeholder(tuple(tirx.IntImm(index_dtype, int(v)) for v in x_shape), x_dtype, name="x")
    w = te.placeholder(tuple(tirx.IntImm(index_dtype, int(v)) for v in w_packed_shape),
                       bitpack.word_dtype(cfg.word_bits), name="w")
    out = bitserial_conv2d_nhwc(x, w, cfg, target=target)
    func = te.create_prim_func([x, w, out])
    if not scheduled:
        return func
    pointwise = int(w_packed_shape[0]) == 1 and int(w_packed_shape[1]) == 1
    stages = [("pack", _pack_block_name(s_tir.Schedule(func))), ("red", "bsconv")]
    return _schedule(func, stages, target, sched or default_schedule(cfg.a_bits, cfg.w_bits), 2,
                     "row" if pointwise else "root")


def schedule_fused_pointwise(sch, func, lanes: int, sched: ScheduleConfig | None = None) -> bool:
    """Schedule a bit-serial pointwise conv fused with its elementwise epilogue (requantize, ReLU,
    residual add, the next layer's unsigned shift), as FuseOps/FuseTIR left it; False if ``func``
    is not one.

    Why: an opaque, pre-scheduled kernel writes its int32 accumulators to memory and the epilogue
    runs as a kernel of its own that reads them back (bench/mixed_precision.py, 32 px: those
    epilogue kernels took ~40% of the bit-serial layers' instrumented time; fused, the model ran
    1.05-1.10x faster in interleaved A/Bs). Here the epilogue is
    inlined into one block and computed per register tile, as apq's int8 kernels do.
    """
    from apq.kernels.cpu_schedules import _blocks, _is_output_block, inline_elementwise

    names = [sch.get(b).name_hint for b in _blocks(sch)]
    pack = _pack_block_name(sch)
    if names.count("bsconv") != 1 or pack is None:
        return False
    conv = sch.get_sblock("bsconv")
    rh, rw = (int(iv.dom.extent) for iv in sch.get(conv).iter_vars[4:6])
    if (rh, rw) != (1, 1) or _is_output_block(sch, conv, func):
        return False
    inline_elementwise(sch, func, keep=[conv, sch.get_sblock(pack)])
    if len(sch.get_consumers(conv)) != 1:
        return False
    a_bits, w_bits = (int(iv.dom.extent) for iv in sch.get(conv).iter_vars[7:9])  # the ri, rj loops
    sc = dataclasses.replace(sched or default_schedule(a_bits, w_bits), vector_lanes=lanes)
    par, _ = _schedule_reduction_block(sch, "bsconv", lanes, sc, 2)
    for name in _with_word_sums(sch, [pack]):
        block = sch.get_sblock(name)
        sch.compute_at(block, par)
        _finish_pack_core(sch, block)
    return True


def _with_word_sums(sch, packs: list[str]) -> list[str]:
    """The blocks scheduled like activation packers, in placement order: a bipolar kernel's
    per-word sums (:data:`XSUM_BLOCK`) first, since they may read the packed words and a packer
    moves under a loop only once all its consumers are there."""
    return ([XSUM_BLOCK] if _has_block(sch, XSUM_BLOCK) else []) + packs


def depthwise_primfunc(x_shape: Sequence[int], kernel_size: int, cfg: BitserialConfig, target=None,
                       sched: ScheduleConfig | None = None, x_dtype: str = "uint8", pack: str = "rows"):
    """Scheduled PrimFunc ``(x, w_packed) -> out`` for a bit-serial NHWC depthwise conv."""
    from tvm import te

    c = int(x_shape[3])
    wdt = bitpack.word_dtype(bitpack.window_word_bits(kernel_size))
    x = te.placeholder(tuple(x_shape), x_dtype, name="x")
    w = te.placeholder((cfg.w_bits, c), wdt, name="w")
    out = bitserial_depthwise_conv2d_nhwc(x, w, kernel_size, cfg, pack)
    func = te.create_prim_func([x, w, out])
    return _schedule_depthwise(func, target, sched or ScheduleConfig())


def _schedule_row_pack(sch, lanes: int, parallel: bool) -> None:
    """Row packing stage (N, Hp, OW, A, C | kw): parallel rows, taps unrolled, channels vectorised."""
    block = sch.get_sblock("xrow")
    nn, hh, xo, i, ch, r = sch.get_loops(block)
    co, ci = sch.split(ch, [None, _largest_divisor(int(sch.get(ch).extent), lanes)])
    sch.reorder(xo, i, co, r, ci)
    if parallel:
        sch.parallel(sch.fuse(nn, hh))
    sch.unroll(r)
    sch.vectorize(ci)
    init = sch.decompose_reduction(block, r)
    sch.vectorize(sch.get_loops(init)[-1])


def _schedule_depthwise(func, target, sc: ScheduleConfig):
    """Depthwise: pack each output tile's windows right before use (compute_at), vectorise channels;
    the row stage (if any) is materialised once for the whole image (each row word is shared)."""
    from tvm import s_tir

    lanes = sc.vector_lanes or default_vector_lanes(target)
    sch = s_tir.Schedule(func)
    if _has_block(sch, "xrow"):
        _schedule_row_pack(sch, lanes, sc.parallel)
    _schedule_reduction_block(sch, "bsdw", lanes, ScheduleConfig(
        row_tile=sc.row_tile, oc_vectors=sc.oc_vectors, vector_lanes=lanes, parallel=sc.parallel,
        unroll_bits=sc.unroll_bits), 2)
    pack = sch.get_sblock("xwin")
    loops = sch.get_loops(sch.get_sblock("bsdw_init") if _has_block(sch, "bsdw_init") else sch.get_sblock("bsdw"))
    sch.compute_at(pack, loops[1])  # under (fused rows, row tile): one tile of window words
    ploops = sch.get_loops(pack)
    # pack loops under the anchor: (tile cols, a_bits, channels, window); window reduction outside
    # the channel loop so channels vectorise
    ch, r = ploops[-2], ploops[-1]
    sch.reorder(r, ch)
    sch.unroll(r)
    sch.vectorize(ch)
    pinit = sch.decompose_reduction(pack, r)
    sch.vectorize(sch.get_loops(pinit)[-1])
    return sch.mod["main"]


def _has_block(sch, name: str) -> bool:
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # get_sblock raises when the name is absent
        return False


def dense_primfunc(x_shape: Sequence[int], w_packed_shape: Sequence[int], cfg: BitserialConfig,
                   target=None, sched: ScheduleConfig | None = None, x_dtype: str = "uint8"):
    """Scheduled PrimFunc ``(x, w_packed) -> out`` for a bit-serial dense."""
    from tvm import s_tir, te

    x = te.placeholder(tuple(x_shape), x_dtype, name="x")
    w = te.placeholder(tuple(w_packed_shape), bitpack.word_dtype(cfg.word_bits), name="w")
    out = bitserial_dense(x, w, cfg)
    func = te.create_prim_func([x, w, out])
    sch = s_tir.Schedule(func)
    sch.compute_inline(sch.get_sblock("xview"))
    func = sch.mod["main"]
    stages = [("pack", "xpack"), ("red", "bsdense")]
    return _schedule(func, stages, target, sched or ScheduleConfig(), 2, "row")


def direct_conv2d_primfunc(x_shape: Sequence[int], w_shape: Sequence[int], stride: int, padding: int,
                           dtype: str, target=None, sched: ScheduleConfig | None = None,
                           depthwise: bool = False, x_dtype: str | None = None):
    """Scheduled float32 / int8 baseline conv (same template as the bit-serial kernels).

    ``dtype`` "float32" (accumulate float32) or "int8" (uint8 activations x int8 weights, int32).
    """
    from tvm import te

    acc = "float32" if dtype == "float32" else "int32"
    x = te.placeholder(tuple(x_shape), x_dtype or ("float32" if dtype == "float32" else "uint8"), name="x")
    w = te.placeholder(tuple(w_shape), dtype, name="w")
    out = direct_conv2d_nhwc(x, w, stride, padding, acc, depthwise)
    func = te.create_prim_func([x, w, out])
    stages = ([("pack", "pad")] if padding else []) + [("red", "conv")]
    return _schedule(func, stages, target, sched or ScheduleConfig(), 0)


def build(func, target=None, name: str = "main"):
    """Compile one PrimFunc for the target; returns the runtime module (``mod[name](...)``)."""
    import tvm

    return tvm.compile(tvm.IRModule({name: _with_symbol(func, name)}), tvm_target(target)).jit()


def build_many(funcs: dict[str, Any], target=None):
    """Compile several PrimFuncs into ONE module (one LLVM run: far cheaper than one build each);
    returns the runtime module, call ``mod[name](...)``."""
    import tvm

    mod = tvm.IRModule({name: _with_symbol(f, name) for name, f in funcs.items()})
    return tvm.compile(mod, tvm_target(target)).jit()


# ----------------------------------------------------------------------------- Relax integration


def _shape_of(expr) -> tuple[int, ...]:
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    if ty is None or getattr(ty, "shape", None) is None:
        raise InvalidInputError("bit-serial conv needs a tensor input with a static shape")
    return tuple(int(s) for s in ty.shape)


def _dtype_of(expr) -> str:
    ty = getattr(expr, "ty", None) or getattr(expr, "struct_info", None)
    return str(ty.dtype)


def emit_bitserial_conv2d(bb, x, packed_w, *, cfg: BitserialConfig, kernel_size: int,
                          depthwise: bool = False, target=None, sched: ScheduleConfig | None = None,
                          dw_pack: str = "rows", name: str = "bitserial_conv2d"):
    """Emit a bit-serial conv into a Relax function being built; returns the int32 NHWC output var.

    ``x``: a Relax expr of unsigned a-bit ints (uint8/int32 container, NHWC); ``packed_w``: the
    packed weights (a NumPy array from :mod:`apq.kernels.bitpack` or a ``relax.Constant``), which
    become a constant of the network. The scheduled PrimFunc is added to the module with its
    symbol stripped and ``op_pattern`` 8 (opaque), so one network can mix bit-serial, int8 and
    float layers and FuseTIR leaves it alone.
    """
    import tvm
    from tvm import relax

    x_shape, x_dtype = _shape_of(x), _dtype_of(x)
    w_const = packed_w if isinstance(packed_w, tvm.ir.expr.Constant) else relax.const(np.ascontiguousarray(packed_w))
    w_shape = _shape_of(w_const)
    if depthwise:
        func = depthwise_primfunc(x_shape, kernel_size, cfg, target, sched, x_dtype, dw_pack)
        o = x_shape[3]
    else:
        func = conv2d_primfunc(x_shape, w_shape, cfg, target, sched, x_dtype)
        o = w_shape[-1]
    oh = conv_out_size(x_shape[1], kernel_size, cfg.stride, cfg.padding)
    ow = conv_out_size(x_shape[2], kernel_size, cfg.stride, cfg.padding)
    gv = bb.add_func(opaque_scheduled(func), name)
    out_ty = relax.TensorType((x_shape[0], oh, ow, o), "int32")
    return bb.emit(relax.call_tir(gv, [x, w_const], out_ty))


def emit_bitserial_dense(bb, x, packed_w, *, cfg: BitserialConfig, target=None,
                         sched: ScheduleConfig | None = None, name: str = "bitserial_dense"):
    """Emit a bit-serial dense ``(M, K) x packed (KW, w_bits, O) -> int32 (M, O)`` into a Relax function."""
    import tvm
    from tvm import relax

    x_shape, x_dtype = _shape_of(x), _dtype_of(x)
    w_const = packed_w if isinstance(packed_w, tvm.ir.expr.Constant) else relax.const(np.ascontiguousarray(packed_w))
    w_shape = _shape_of(w_const)
    func = dense_primfunc(x_shape, w_shape, cfg, target, sched, x_dtype)
    gv = bb.add_func(opaque_scheduled(func), name)
    return bb.emit(relax.call_tir(gv, [x, w_const], relax.TensorType((x_shape[0], w_shape[-1]), "int32")))
