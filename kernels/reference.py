"""NumPy references for apq's integer kernels (int8 and bit-serial conv / dense).

Two independent paths, so a test can catch a mistake in either:
- ``conv2d_nhwc_int`` / ``dense_int``: plain integer arithmetic in int64 on decoded values;
- ``bitserial_*_ref``: the popcount formula on NumPy-packed bit planes, exactly what the TVM
  kernels compute (same packing, same plane signs and bipolar epilogue).
Both must agree with each other and with the compiled kernels bit for bit.
"""

from __future__ import annotations

import numpy as np

from apq.kernels import bitpack


def conv2d_nhwc_int(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0,
                    groups: int = 1) -> np.ndarray:
    """Integer conv: x (N, H, W, C), w HWIO (KH, KW, C // groups, O) -> int64 (N, OH, OW, O).

    Zero padding in the integer domain. Works for int8, uint8 and low-bit values alike.
    """
    x = bitpack.pad_nhwc(np.asarray(x).astype(np.int64), padding)
    w = np.asarray(w).astype(np.int64)
    n, hp, wp, c = x.shape
    kh, kw, cg, o = w.shape
    if c != cg * groups or o % groups:
        raise ValueError(f"channels {c} / weights {w.shape} do not match groups={groups}")
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    og = o // groups
    out = np.zeros((n, oh, ow, o), dtype=np.int64)
    for g in range(groups):
        xs = x[..., g * cg:(g + 1) * cg]
        ws = w[..., g * og:(g + 1) * og]
        for y in range(kh):
            for xx in range(kw):
                patch = xs[:, y:y + stride * (oh - 1) + 1:stride, xx:xx + stride * (ow - 1) + 1:stride, :]
                out[..., g * og:(g + 1) * og] += patch @ ws[y, xx]
    return out


def depthwise_conv2d_nhwc_int(x: np.ndarray, w: np.ndarray, stride: int = 1, padding: int = 0) -> np.ndarray:
    """Depthwise integer conv: x (N, H, W, C), w (K, K, C) -> int64 (N, OH, OW, C)."""
    w = np.asarray(w)
    return conv2d_nhwc_int(x, w[:, :, None, :], stride, padding, groups=w.shape[2])


def dense_int(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Integer dense: x (M, K), w (O, K) -> int64 (M, O)."""
    return np.asarray(x).astype(np.int64) @ np.asarray(w).astype(np.int64).T


def _popcount(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a).astype(np.uint64)
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(a).astype(np.int64)
    return np.unpackbits(a.view(np.uint8)[..., None], axis=-1).reshape(a.shape + (-1,)).sum(-1).astype(np.int64)


def _finish(p: np.ndarray, s: np.ndarray, w_bits: int, mode: str) -> np.ndarray:
    """Bipolar epilogue: ``2 P - (2^w - 1) S``; other modes return P unchanged."""
    return 2 * p - ((1 << w_bits) - 1) * s if mode == "bipolar" else p


def bitserial_conv2d_ref(x: np.ndarray, w: np.ndarray, a_bits: int, w_bits: int, mode: str = "unipolar",
                         stride: int = 1, padding: int = 0, word_bits: int = 32) -> np.ndarray:
    """Popcount-formula conv on packed planes: x (N, H, W, C) unsigned, w HWIO integer values."""
    xp = bitpack.pack_activations_nhwc(bitpack.pad_nhwc(x, padding), a_bits, word_bits)  # N,H,W,CW,A
    wp = bitpack.pack_conv_weights_hwio(w, w_bits, mode, word_bits)  # KH,KW,CW,WB,O
    n, hp, wpad = xp.shape[:3]
    kh, kw = wp.shape[:2]
    oh, ow = (hp - kh) // stride + 1, (wpad - kw) // stride + 1
    p = np.zeros((n, oh, ow, wp.shape[-1]), dtype=np.int64)
    s = np.zeros((n, oh, ow, 1), dtype=np.int64)
    for y in range(kh):
        for xx in range(kw):
            patch = xp[:, y:y + stride * (oh - 1) + 1:stride, xx:xx + stride * (ow - 1) + 1:stride]  # N,OH,OW,CW,A
            for i in range(a_bits):
                a = patch[..., :, i][..., :, None]  # N,OH,OW,CW,1
                s += _popcount(a).sum(axis=3) << i
                for j in range(w_bits):
                    sign = bitpack.plane_sign(j, w_bits, mode)
                    p += sign * (_popcount(np.bitwise_and(a, wp[y, xx, :, j, :])).sum(axis=3) << (i + j))
    return _finish(p, s, w_bits, mode)


def bitserial_dense_ref(x: np.ndarray, w: np.ndarray, a_bits: int, w_bits: int, mode: str = "unipolar",
                        word_bits: int = 32) -> np.ndarray:
    """Popcount-formula dense: x (M, K) unsigned, w (O, K) integer values -> (M, O)."""
    xp = bitpack.pack_bits(bitpack.check_activations(x, a_bits), a_bits, axis=1, word_bits=word_bits)  # M,KW,A
    wp = bitpack.pack_dense_weights(w, w_bits, mode, word_bits)  # KW,WB,O
    p = np.zeros((xp.shape[0], wp.shape[-1]), dtype=np.int64)
    s = np.zeros((xp.shape[0], 1), dtype=np.int64)
    for i in range(a_bits):
        a = xp[:, :, i, None]
        s += _popcount(a).sum(axis=1) << i
        for j in range(w_bits):
            sign = bitpack.plane_sign(j, w_bits, mode)
            p += sign * (_popcount(np.bitwise_and(a, wp[None, :, j, :])).sum(axis=1) << (i + j))
    return _finish(p, s, w_bits, mode)


def bitserial_depthwise_ref(x: np.ndarray, w: np.ndarray, a_bits: int, w_bits: int, mode: str = "unipolar",
                            stride: int = 1, padding: int = 0) -> np.ndarray:
    """Popcount-formula depthwise conv with window packing: x (N, H, W, C), w (K, K, C)."""
    k = np.asarray(w).shape[0]
    xp = bitpack.pack_depthwise_activations(x, a_bits, k, stride, padding)  # N,OH,OW,A,C
    wp = bitpack.pack_depthwise_weights(w, w_bits, mode)  # WB,C
    p = np.zeros(xp.shape[:3] + (xp.shape[-1],), dtype=np.int64)
    s = np.zeros_like(p)
    for i in range(a_bits):
        s += _popcount(xp[:, :, :, i, :]) << i
        for j in range(w_bits):
            sign = bitpack.plane_sign(j, w_bits, mode)
            p += sign * (_popcount(np.bitwise_and(xp[:, :, :, i, :], wp[j])) << (i + j))
    return _finish(p, s, w_bits, mode)
