"""Bit packing for bit-serial kernels: NumPy packers (offline weights, references) and TE packers
(activations, packed inside the compiled kernel so the packing cost is part of every measurement).

Why bit planes: a product of an a-bit and a w-bit unsigned integer is
``sum_{i<a, j<w} 2^(i+j) * (x_i AND y_j)``, so a dot product over K elements becomes
``sum_{i,j} popcount(X_i & Y_j) << (i+j)`` where ``X_i`` is the word holding bit ``i`` of 32 (or
64) consecutive elements. One AND + one POPCOUNT replace 32 multiply-adds per bit pair.

Layout conventions (one source of truth for every packer and kernel):

- the packed axis is replaced by ``ceil(n / word_bits)`` words, followed by a new bit-plane axis
  of length ``bits`` (plane ``i`` holds bit ``i``); element ``k`` of the packed axis goes to word
  ``k // word_bits``, bit ``k % word_bits`` (LSB first); missing tail elements are 0.
- activations NHWC ``(N, H, W, C)`` -> ``(N, H, W, CW, a_bits)``;
- conv weights HWIO ``(KH, KW, C, O)`` -> ``(KH, KW, CW, w_bits, O)`` (O innermost, so a kernel
  vectorises over output channels);
- dense weights ``(O, K)`` are packed as ``(KW, w_bits, O)`` (same idea);
- depthwise: the reduction is the KxK window, not the channels, so window bits are packed
  (``k = kh * K + kw``): weights ``(KH, KW, C)`` -> ``(w_bits, C)`` one word per channel, and
  activations are packed per output pixel (an im2col in bits) -> ``(N, OH, OW, a_bits, C)``.
  3x3 and 5x5 windows (9, 25 bits) fit uint32; 7x7 (49 bits) needs uint64.

Weight modes (activations are always unsigned ``{0 .. 2^a - 1}`` with zero point 0, e.g. after
ReLU/ReLU6, which is also why zero padding in the integer domain is exact). Every kernel computes
``P = sum_{i,j} sign_j 2^(i+j) popcount(X_i & W_j)`` and then:

- ``unipolar``: unsigned weights ``{0 .. 2^w - 1}``; code = value; all ``sign_j = +1``; out = P.
- ``signed``: two's complement ``{-2^(w-1) .. 2^(w-1) - 1}`` (what symmetric signed quantizers
  produce); code = value mod 2^w; the top plane is worth ``-2^(w-1)`` so ``sign_(w-1) = -1``;
  out = P, no extra cost. (1 bit signed is ``{-1, 0}``.)
- ``bipolar``: offset binary, every plane is worth ``+-2^j``: ``v = sum_j 2^j (2 b_j - 1) =
  2 u - (2^w - 1)`` for code ``u``; 1 bit is ``{-1, +1}`` (XNOR-net style), 2 bits
  ``{-3, -1, 1, 3}``: odd symmetric levels, no zero. out = ``2 P - (2^w - 1) S`` with
  ``S = sum_i 2^i popcount(X_i)`` the activation sum of the window (an epilogue, per pixel for
  conv/dense). Elements with x = 0 (padding, channel tail) contribute nothing in every mode.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from apq.toolchain.errors import InvalidInputError

WEIGHT_MODES = ("unipolar", "signed", "bipolar")
WORD_BITS = (16, 32, 64)  # 16: narrow layers (bitserial.narrow_words)


def word_dtype(word_bits: int) -> str:
    """The unsigned integer type of one packed word."""
    if word_bits not in WORD_BITS:
        raise InvalidInputError(f"word_bits must be one of {WORD_BITS}, got {word_bits}")
    return f"uint{word_bits}"


def num_words(n: int, word_bits: int) -> int:
    return -(-int(n) // int(word_bits))


def check_bits(bits: int, what: str = "bits") -> None:
    if not 1 <= int(bits) <= 8:
        raise InvalidInputError(f"{what} must be in 1..8 for bit-serial kernels, got {bits}")


def check_mode(mode: str) -> None:
    if mode not in WEIGHT_MODES:
        raise InvalidInputError(f"unknown weight mode {mode!r}; valid: {', '.join(WEIGHT_MODES)}")


# ----------------------------------------------------------------------------- value <-> code


def weight_range(w_bits: int, mode: str) -> tuple[int, int]:
    """Smallest and largest representable weight value."""
    check_mode(mode)
    top = (1 << w_bits) - 1
    if mode == "unipolar":
        return 0, top
    if mode == "signed":
        return -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    return -top, top


def plane_sign(j: int, w_bits: int, mode: str) -> int:
    """Sign of weight bit plane ``j`` in the popcount sum (-1 only for the two's complement top plane)."""
    return -1 if mode == "signed" and j == w_bits - 1 else 1


def encode_weights(w: np.ndarray, w_bits: int, mode: str) -> np.ndarray:
    """Integer weight values -> unsigned codes whose bits are packed; rejects unrepresentable values."""
    check_bits(w_bits, "w_bits")
    check_mode(mode)
    w = np.asarray(w).astype(np.int64)
    lo, hi = weight_range(w_bits, mode)
    if w.size and (w.min() < lo or w.max() > hi):
        raise InvalidInputError(f"{mode} {w_bits}-bit weights must lie in [{lo}, {hi}]")
    if mode == "unipolar":
        return w.astype(np.uint64)
    if mode == "signed":
        return (w & ((1 << w_bits) - 1)).astype(np.uint64)
    if np.any((w + hi) % 2):
        raise InvalidInputError(f"bipolar {w_bits}-bit weights must be odd (offset binary), got an even value")
    return ((w + hi) // 2).astype(np.uint64)


def decode_weights(codes: np.ndarray, w_bits: int, mode: str) -> np.ndarray:
    """Unsigned codes -> integer weight values (inverse of :func:`encode_weights`)."""
    check_mode(mode)
    c = np.asarray(codes).astype(np.int64)
    if mode == "unipolar":
        return c
    if mode == "signed":
        return np.where(c >= (1 << (w_bits - 1)), c - (1 << w_bits), c)
    return 2 * c - ((1 << w_bits) - 1)


def check_activations(x: np.ndarray, a_bits: int) -> np.ndarray:
    check_bits(a_bits, "a_bits")
    x = np.asarray(x)
    if x.size and (x.min() < 0 or x.max() > (1 << a_bits) - 1):
        raise InvalidInputError(f"{a_bits}-bit activations must lie in [0, {(1 << a_bits) - 1}]")
    return x


# ----------------------------------------------------------------------------- NumPy packers


def pack_bits(codes: np.ndarray, bits: int, axis: int, word_bits: int = 32) -> np.ndarray:
    """Pack unsigned ``codes`` along ``axis`` into words followed by a bit-plane axis.

    The output shape is ``shape[:axis] + (words, bits) + shape[axis+1:]``.
    """
    dt = np.dtype(word_dtype(word_bits))
    codes = np.asarray(codes).astype(np.uint64)
    axis = axis % codes.ndim
    n = codes.shape[axis]
    nw = num_words(n, word_bits)
    pad = [(0, 0)] * codes.ndim
    pad[axis] = (0, nw * word_bits - n)
    c = np.moveaxis(np.pad(codes, pad), axis, -1)  # (..., nw*word_bits)
    c = c.reshape(c.shape[:-1] + (nw, word_bits))
    weights = np.left_shift(np.uint64(1), np.arange(word_bits, dtype=np.uint64))
    planes = [((c >> np.uint64(i)) & np.uint64(1)) for i in range(bits)]
    packed = np.stack([(p * weights).sum(axis=-1, dtype=np.uint64) for p in planes], axis=-1)  # (..., nw, bits)
    # move (nw, bits) back to where the packed axis was
    packed = np.moveaxis(packed, [-2, -1], [axis, axis + 1])
    return packed.astype(dt)


def unpack_bits(packed: np.ndarray, bits: int, axis: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` (``axis`` is the word axis; ``n`` the original length)."""
    word_bits = packed.dtype.itemsize * 8
    p = np.moveaxis(np.asarray(packed).astype(np.uint64), [axis, axis + 1], [-2, -1])  # (..., nw, bits)
    shifts = np.arange(word_bits, dtype=np.uint64)
    bitsarr = (p[..., None] >> shifts) & np.uint64(1)  # (..., nw, bits, word_bits)
    vals = (bitsarr * (np.uint64(1) << np.arange(bits, dtype=np.uint64))[:, None]).sum(axis=-2)  # (..., nw, wb)
    vals = vals.reshape(vals.shape[:-2] + (-1,))[..., :n]
    return np.moveaxis(vals, -1, axis).astype(np.int64)


def pack_activations_nhwc(x: np.ndarray, a_bits: int, word_bits: int = 32) -> np.ndarray:
    """(N, H, W, C) unsigned activations -> (N, H, W, CW, a_bits)."""
    return pack_bits(check_activations(x, a_bits), a_bits, axis=3, word_bits=word_bits)


def pack_conv_weights_hwio(w: np.ndarray, w_bits: int, mode: str, word_bits: int = 32) -> np.ndarray:
    """(KH, KW, C, O) integer weights -> (KH, KW, CW, w_bits, O) packed codes."""
    return pack_bits(encode_weights(w, w_bits, mode), w_bits, axis=2, word_bits=word_bits)


def pack_dense_weights(w: np.ndarray, w_bits: int, mode: str, word_bits: int = 32) -> np.ndarray:
    """(O, K) integer weights -> (KW, w_bits, O) packed codes."""
    return pack_bits(encode_weights(np.asarray(w).T, w_bits, mode), w_bits, axis=0, word_bits=word_bits)


def window_word_bits(kernel_size: int) -> int:
    """Smallest word that holds a KxK window (depthwise packing)."""
    k2 = kernel_size * kernel_size
    if k2 > 64:
        raise InvalidInputError(f"depthwise bit-serial supports windows up to 8x8 (64 bits), got {kernel_size}")
    return 32 if k2 <= 32 else 64


def pack_depthwise_weights(w: np.ndarray, w_bits: int, mode: str) -> np.ndarray:
    """(K, K, C) integer weights -> (w_bits, C) words, window position ``kh*K+kw`` -> bit."""
    w = np.asarray(w)
    k = w.shape[0]
    flat = w.reshape(k * k, w.shape[2])
    return pack_bits(encode_weights(flat, w_bits, mode), w_bits, axis=0, word_bits=window_word_bits(k))[0]


def pad_nhwc(x: np.ndarray, padding: int) -> np.ndarray:
    return np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def im2win_nhwc(x: np.ndarray, kernel_size: int, stride: int, padding: int) -> np.ndarray:
    """(N, H, W, C) -> (N, OH, OW, K*K, C) windows (zero padded), position ``kh*K+kw``."""
    xp = pad_nhwc(np.asarray(x), padding)
    n, hp, wp, c = xp.shape
    k = kernel_size
    oh, ow = (hp - k) // stride + 1, (wp - k) // stride + 1
    cols = [xp[:, kh:kh + stride * (oh - 1) + 1:stride, kw:kw + stride * (ow - 1) + 1:stride, :]
            for kh in range(k) for kw in range(k)]
    return np.stack(cols, axis=3)


def pack_depthwise_activations(x: np.ndarray, a_bits: int, kernel_size: int, stride: int,
                               padding: int) -> np.ndarray:
    """(N, H, W, C) -> (N, OH, OW, a_bits, C): per output pixel, the window bits of each channel."""
    win = im2win_nhwc(check_activations(x, a_bits), kernel_size, stride, padding)
    return pack_bits(win, a_bits, axis=3, word_bits=window_word_bits(kernel_size))[:, :, :, 0]


# ----------------------------------------------------------------------------- TE packers


def index_dtype_of(x) -> str:
    """The integer type of a TE tensor's shape: what every extent of a compute over it uses
    (int32 for apq's standalone kernels, int64 for kernels fused into Relax's int64 code)."""
    dim = x.shape[0]
    return str(getattr(dim, "ty", None) or getattr(dim, "dtype", None) or "int32")  # TVM 0.27 IntImm: .ty


def te_extent(value: int, index_dtype: str):
    """A shape / loop extent of ``index_dtype`` (one index type per PrimFunc: mixed types fail to build)."""
    from tvm import tirx

    return tirx.IntImm(index_dtype, int(value))


def te_pack_activations_nhwc(x, a_bits: int, padding: int = 0, word_bits: int = 32, name: str = "xpack"):
    """TE: (N, H, W, C) unsigned ints -> zero-padded (N, H+2p, W+2p, CW, a_bits) words.

    Padding is fused into packing: out-of-image positions and the channel tail pack to 0, which is
    the integer 0 (activations have zero point 0), so no separate pad stage is materialised.
    """
    from tvm import te, tirx

    n, h, w, c = (int(s) for s in x.shape)
    idx = index_dtype_of(x)
    wdt = word_dtype(word_bits)
    cw = num_words(c, word_bits)
    b = te.reduce_axis((te_extent(0, idx), te_extent(word_bits, idx)), "b")

    def body(nn, hh, ww, ci, i):
        ch = ci * word_bits + b
        hi, wi = hh - padding, ww - padding
        inside = tirx.all(hi >= 0, hi < h, wi >= 0, wi < w, ch < c)
        val = te.if_then_else(inside, x[nn, hi, wi, ch].astype(wdt), tirx.const(0, wdt))
        bit = (val >> i.astype(wdt)) & tirx.const(1, wdt)
        return te.sum(bit << b.astype(wdt), axis=b)

    shape = tuple(te_extent(v, idx) for v in (n, h + 2 * padding, w + 2 * padding, cw, a_bits))
    return te.compute(shape, body, name=name)


_GATHER_MUL = 0x0102040810204080  # moves bit 8k of a uint64 to bit 56+k (no carries: see below)
_BYTE_LSBS = 0x0101010101010101


def te_pack_activations_nhwc_swar(x, a_bits: int, padding: int = 0, word_bits: int = 32, name: str = "xpack"):
    """TE: same result as :func:`te_pack_activations_nhwc`, ~6x fewer operations (needs C % 8 == 0).

    SWAR bit gather: 8 channels (bytes) are combined into one uint64 ``u`` (TE cannot express a
    reinterpreting 64-bit load; LLVM vectorises the byte loads instead); ``t = (u >> i) &
    0x0101..01`` keeps bit i of every byte at bit 8k, and ``(t * 0x0102040810204080) >> 56``
    gathers them into one byte, element k at bit k: the partial products land at 7(k+j+1)+k, all
    distinct, so nothing carries into the top byte. Shift, and, multiply, shift, or per 8
    channels and bit, instead of 5 operations per channel and bit. Portable (a 64-bit multiply).
    """
    from tvm import te, tirx

    n, h, w, c = (int(s) for s in x.shape)
    if c % 8:
        raise InvalidInputError(f"SWAR packing needs channels % 8 == 0, got {c}")
    wdt = word_dtype(word_bits)
    cw = num_words(c, word_bits)
    u64 = "uint64"
    groups = word_bits // 8

    def body(nn, hh, ww, ci, i):
        hi, wi = hh - padding, ww - padding
        inside = tirx.all(hi >= 0, hi < h, wi >= 0, wi < w)
        word = tirx.const(0, wdt)
        for g in range(groups):
            c0 = ci * word_bits + 8 * g
            u = x[nn, hi, wi, c0].astype(u64)
            for m in range(1, 8):
                u = u | (x[nn, hi, wi, c0 + m].astype(u64) << tirx.const(8 * m, u64))
            t = (u >> i.astype(u64)) & tirx.const(_BYTE_LSBS, u64)
            byte = ((t * tirx.const(_GATHER_MUL, u64)) >> tirx.const(56, u64)).astype(wdt)
            ok = tirx.all(inside, c0 < c)
            word = word | te.if_then_else(ok, byte << tirx.const(8 * g, wdt), tirx.const(0, wdt))
        return word

    idx = index_dtype_of(x)
    shape = tuple(te_extent(v, idx) for v in (n, h + 2 * padding, w + 2 * padding, cw, a_bits))
    return te.compute(shape, body, name=name)


def te_pack_depthwise_activations(x, a_bits: int, kernel_size: int, stride: int, padding: int,
                                  name: str = "xwin"):
    """TE: (N, H, W, C) -> (N, OH, OW, a_bits, C) window words (an im2col in bits, zero padded)."""
    from tvm import te, tirx

    n, h, w, c = (int(s) for s in x.shape)
    k = kernel_size
    wdt = word_dtype(window_word_bits(k))
    oh, ow = (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    r = te.reduce_axis((0, k * k), "r")

    def body(nn, y, xo, i, ch):
        hi = y * stride + r // k - padding
        wi = xo * stride + r % k - padding
        inside = tirx.all(hi >= 0, hi < h, wi >= 0, wi < w)
        val = te.if_then_else(inside, x[nn, hi, wi, ch].astype(wdt), tirx.const(0, wdt))
        bit = (val >> i.astype(wdt)) & tirx.const(1, wdt)
        return te.sum(bit << r.astype(wdt), axis=r)

    return te.compute((n, oh, ow, a_bits, c), body, name=name)


def te_pack_depthwise_activations_rows(x, a_bits: int, kernel_size: int, stride: int, padding: int,
                                       name: str = "xwin"):
    """TE, two stages, same result as :func:`te_pack_depthwise_activations` but cheaper.

    Stage 1 packs the K horizontal taps of every padded input row once: ``xrow`` (N, H+2p, OW,
    a_bits, C), bits ``0..K-1``. Stage 2 ORs K row words into a window word:
    ``win = sum_kh xrow[y*s + kh] << (kh*K)``. Per output and activation bit that is about
    ``s*K + K`` operations instead of ``K*K`` (a row word is shared by the K/s output rows that
    overlap it): 6 vs 9 for 3x3, 14 vs 49 for 7x7.
    """
    from tvm import te, tirx

    n, h, w, c = (int(s) for s in x.shape)
    k = kernel_size
    wdt = word_dtype(window_word_bits(k))
    hp = h + 2 * padding
    oh, ow = (hp - k) // stride + 1, (w + 2 * padding - k) // stride + 1
    rw = te.reduce_axis((0, k), "rw")

    def row_body(nn, hh, xo, i, ch):
        hi, wi = hh - padding, xo * stride + rw - padding
        inside = tirx.all(hi >= 0, hi < h, wi >= 0, wi < w)
        val = te.if_then_else(inside, x[nn, hi, wi, ch].astype(wdt), tirx.const(0, wdt))
        return te.sum(((val >> i.astype(wdt)) & tirx.const(1, wdt)) << rw.astype(wdt), axis=rw)

    xrow = te.compute((n, hp, ow, a_bits, c), row_body, name="xrow")
    rh = te.reduce_axis((0, k), "rh")
    return te.compute(
        (n, oh, ow, a_bits, c),
        lambda nn, y, xo, i, ch: te.sum(xrow[nn, y * stride + rh, xo, i, ch] << (rh * k).astype(wdt), axis=rh),
        name=name)


def te_pack_weights_hwio(w, w_bits: int, word_bits: int = 32, name: str = "wpack"):
    """TE: (KH, KW, C, O) unsigned codes -> (KH, KW, CW, w_bits, O) (for weights computed at runtime)."""
    from tvm import te, tirx

    kh, kw, c, o = (int(s) for s in w.shape)
    wdt = word_dtype(word_bits)
    b = te.reduce_axis((0, word_bits), "b")

    def body(y, xx, ci, j, oc):
        ch = ci * word_bits + b
        val = te.if_then_else(ch < c, w[y, xx, ch, oc].astype(wdt), tirx.const(0, wdt))
        return te.sum(((val >> j.astype(wdt)) & tirx.const(1, wdt)) << b.astype(wdt), axis=b)

    return te.compute((kh, kw, num_words(c, word_bits), w_bits, o), body, name=name)


NUMPY_PACKERS: dict[str, Callable[..., np.ndarray]] = {
    "activations_nhwc": pack_activations_nhwc,
    "conv_weights_hwio": pack_conv_weights_hwio,
    "dense_weights": pack_dense_weights,
    "depthwise_weights": pack_depthwise_weights,
    "depthwise_activations": pack_depthwise_activations,
}
