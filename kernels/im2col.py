"""Patch gather (``im2col``): a KxK conv with few input channels as a pointwise conv over patches.

Why: apq's conv schedules put channels in the vector lanes (NHWC) and broadcast one input value
per tap. A conv with fewer input channels than that (an RGB stem: 3) gets little from it: the
224 px MobileNetV2 int8 stem ran on the float channel-vector schedule at 0.39 ms, the float
stem at 0.35 ms, each the largest kernel of its model. Gathered into patches,
``cols[n, y, x, (ky * kw + kx) * C + c] = x[n, y*sy + ky*dy - top, x*sx + kx*dx - left, c]``,
the conv is ``conv1x1(cols, W.reshape(kh * kw * C, OC))``: a GEMM over ``kh * kw * C`` channels,
which the int8 path runs on ``vpdpbusd`` (4 taps per instruction) and the float path on the
pointwise channel-vector tile. The gather writes ``kh * kw / (sy * sx)`` times the input
(2.25x for 3x3 stride 2) and runs fully unrolled per output pixel (:func:`schedule_im2col`),
so each kernel row's contiguous bytes move as a few wide loads and stores.

Exact by construction: the same products and sums (rows padding the depth to whole groups
gather zeros against zero weights). The Relax rewrite is toolchain/patch_gather.py. A float
stem reading the NCHW model input no longer takes this path: kernels/nchw_input_conv.py
computes it without patches (the gather was a third of that stem's time).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: TE compute name = the block name :func:`find_im2col` (and the schedule rule) recognise.
IM2COL_BLOCK = "apq_im2col"
#: Source layouts the gather reads: NHWC, or NCHW (a float model input, without its transpose).
SOURCE_LAYOUTS = ("NHWC", "NCHW")


def conv_output_extent(size: int, kernel: int, stride: int, dilation: int, pad_before: int, pad_after: int) -> int:
    """Output rows (or columns) of a conv over ``size`` input rows with this padding."""
    return (size + pad_before + pad_after - (kernel - 1) * dilation - 1) // stride + 1


def im2col_depth(kh: int, kw: int, in_channels: int, multiple: int = 1) -> int:
    """Patch length ``kh * kw * in_channels`` rounded up to a multiple of ``multiple``."""
    return -(-kh * kw * in_channels // multiple) * multiple


def im2col_weight(weight_hwio: np.ndarray, multiple: int = 1) -> np.ndarray:
    """``(KH, KW, IC, OC)`` -> ``(1, 1, depth, OC)`` in the gather's patch order (``ky``, ``kx``,
    ``c``), zero rows padding the depth to ``multiple``."""
    kh, kw, ic, oc = weight_hwio.shape
    flat = weight_hwio.reshape(kh * kw * ic, oc)
    padded = np.zeros((im2col_depth(kh, kw, ic, multiple), oc), weight_hwio.dtype)
    padded[: flat.shape[0]] = flat
    return padded.reshape(1, 1, -1, oc)


def im2col_compute(kh: int, kw: int, strides: tuple[int, int], dilation: tuple[int, int],
                   padding: tuple[int, int, int, int], pad_value: float = 0, multiple: int = 1,
                   source_layout: str = "NHWC") -> Any:
    """TE compute factory: ``data`` (NHWC, or NCHW) -> ``cols`` ``(N, OH, OW, depth)`` NHWC.

    Outside the image the value is ``pad_value`` (the conv's padding); past ``kh * kw * C`` it
    is 0 (the depth padding, which meets zero weights).
    """
    from tvm import te, tirx

    if source_layout not in SOURCE_LAYOUTS:
        raise ValueError(f"source_layout must be one of {SOURCE_LAYOUTS}, got {source_layout!r}")
    (sy, sx), (dy, dx) = strides, dilation
    top, left, bottom, right = padding
    nchw = source_layout == "NCHW"

    def compute(data: Any) -> Any:
        n, d1, d2, d3 = (int(v) for v in data.shape)
        c, h, w = (d1, d2, d3) if nchw else (d3, d1, d2)
        oh, ow = conv_output_extent(h, kh, sy, dy, top, bottom), conv_output_extent(w, kw, sx, dx, left, right)
        taps = kh * kw * c

        def element(b: Any, y: Any, x: Any, k: Any) -> Any:
            kk = te.min(k, taps - 1)  # the depth padding reads a valid address, then is masked
            tap, ch = kk // c, kk % c
            iy, ix = y * sy + (tap // kw) * dy - top, x * sx + (tap % kw) * dx - left
            inside = tirx.all(iy >= 0, iy < h, ix >= 0, ix < w)
            cy, cx = te.max(te.min(iy, h - 1), 0), te.max(te.min(ix, w - 1), 0)
            value = data[b, ch, cy, cx] if nchw else data[b, cy, cx, ch]
            pad = tirx.const(pad_value, data.dtype)
            return tirx.Select(k < taps, tirx.Select(inside, value, pad), tirx.const(0, data.dtype))

        return te.compute((n, oh, ow, im2col_depth(kh, kw, c, multiple)), element, name=IM2COL_BLOCK)

    return compute


def find_im2col(sch: Any) -> Any | None:
    """The gather block of a PrimFunc that holds nothing else, else None."""
    from apq.kernels.cpu_schedules import _blocks

    blocks = _blocks(sch)
    return blocks[0] if len(blocks) == 1 and sch.get(blocks[0]).name_hint == IM2COL_BLOCK else None


def schedule_im2col(sch: Any, block: Any, cfg: Any) -> bool:
    """One output pixel's patch per iteration, fully unrolled: the bounds checks fold to
    constants per tap, and each kernel row's contiguous bytes become a few wide moves (the
    generic vectorized schedule gathered byte by byte: 0.25 ms for the 224 px int8 RGB stem,
    0.045 ms unrolled, per-layer profile, 1 thread)."""
    from apq.kernels.cpu_schedules import _block_iterations, worth_parallel

    n, y, x, k = sch.get_loops(block)
    outer = sch.fuse(n, y)
    if worth_parallel(cfg, _block_iterations(sch, block), "gather_element"):
        sch.parallel(outer)
    sch.unroll(k)
    return True


__all__ = ["IM2COL_BLOCK", "SOURCE_LAYOUTS", "conv_output_extent", "find_im2col", "im2col_compute", "im2col_depth",
           "im2col_weight", "schedule_im2col"]
