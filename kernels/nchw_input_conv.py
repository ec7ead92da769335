"""A few-input-channel float conv (the RGB stem) read straight from the NCHW model input.

Why: apq's float convs run NHWC (channel vectors x pixels register tiles), but the model input
is NCHW, and its 3 channels fill no vector. The stem used to be a patch gather (kernels/im2col.py)
plus a pointwise conv over ``kh * kw * C`` patch channels. That gather is scalar (each patch
element comes from a different channel plane), and it writes 2.25x the input to memory for the
GEMM to read back: on the 224 px MobileNetV2 (1 thread, perf samples of the whole model) the
gather took ~0.09 ms and the GEMM ~0.17 ms, about 14% of the model.

A register-tiled conv does not need the patches: each reduction step (one channel, one tap)
multiplies a weight vector (``f_t`` output channels, HWIO) by one *broadcast* input value per
output pixel of the tile, and a broadcast can come from any address, so reading the NCHW input
costs nothing extra. The tile is the NHWC rule's (:func:`~apq.kernels.cpu_schedules.tile_nhwc_conv`).
What stays is the padding: a bounds check per broadcast would cost more than the multiply-add,
so the input rows one output row needs are copied into a small zero-padded buffer first
(``kh`` rows x channels, a few KB, L1-resident), computed at the output-row loop, split into a
zero fill and an unconditional (vectorized) interior copy (``decompose_padding``).

Measured (1 thread, thread CPU time, this 2-core VM, interleaved): the 224 px stem kernel alone
0.17-0.22 ms against 0.16-0.20 ms for the same conv over a pre-padded input, i.e. the row copy
costs ~8%, where the gather + GEMM pair it replaces took ~0.27 ms in the model.

Exact: the same products summed in the same order as the gather + GEMM path (taps ``ky``,
``kx``, then channels), so outputs are bit-identical to it.
"""

from __future__ import annotations

from typing import Any

from apq.kernels.im2col import conv_output_extent

#: TE compute names the schedule rule (:func:`find_nchw_input_conv`) recognises.
CONV_BLOCK = "apq_nchw_input_conv"
PAD_BLOCK = "apq_nchw_input_pad"


def nchw_input_conv_compute(kh: int, kw: int, strides: tuple[int, int], dilation: tuple[int, int],
                            padding: tuple[int, int, int, int]) -> Any:
    """TE compute factory: ``data`` (N, C, H, W) float32, ``weight`` (KH, KW, C, OC) HWIO ->
    ``out`` (N, OH, OW, OC) NHWC, zero padding ``(top, left, bottom, right)``."""
    from tvm import te, tirx

    (sy, sx), (dy, dx) = strides, dilation
    top, left, bottom, right = padding

    def compute(data: Any, weight: Any) -> Any:
        n, c, h, w = (int(v) for v in data.shape)
        oc = int(weight.shape[3])
        oh, ow = conv_output_extent(h, kh, sy, dy, top, bottom), conv_output_extent(w, kw, sx, dx, left, right)
        # only the rows and columns the conv reads (bottom/right padding past them is never used)
        ph, pw = (oh - 1) * sy + (kh - 1) * dy + 1, (ow - 1) * sx + (kw - 1) * dx + 1

        def padded(b: Any, ch: Any, r: Any, q: Any) -> Any:
            inside = tirx.all(r >= top, r < h + top, q >= left, q < w + left)
            return tirx.if_then_else(inside, data[b, ch, r - top, q - left], tirx.const(0.0, data.dtype))

        pad = te.compute((n, c, ph, pw), padded, name=PAD_BLOCK)
        ry, rx, rc = te.reduce_axis((0, kh), "ry"), te.reduce_axis((0, kw), "rx"), te.reduce_axis((0, c), "rc")
        return te.compute(
            (n, oh, ow, oc),
            lambda b, y, x, f: te.sum(pad[b, rc, y * sy + ry * dy, x * sx + rx * dx] * weight[ry, rx, rc, f],
                                      axis=[ry, rx, rc]),
            name=CONV_BLOCK)

    return compute


def find_nchw_input_conv(sch: Any) -> tuple[Any, Any] | None:
    """``(pad block, conv block)`` of a PrimFunc made from :func:`nchw_input_conv_compute` (plus
    any fused elementwise epilogue), else None."""
    from apq.kernels.cpu_schedules import _blocks

    by_name = {sch.get(b).name_hint: b for b in _blocks(sch)}
    if CONV_BLOCK not in by_name or PAD_BLOCK not in by_name:
        return None
    return by_name[PAD_BLOCK], by_name[CONV_BLOCK]


def schedule_nchw_input_conv(sch: Any, func: Any, cfg: Any) -> bool:
    """The NHWC register tile over output rows, the padded input rows copied per output row."""
    from apq.kernels.cpu_schedules import (
        Conv2dNCHWRule,
        _block_iterations,
        _finish_tiled_reduction,
        inline_elementwise,
        tile_nhwc_conv,
        worth_parallel,
    )

    found = find_nchw_input_conv(sch)
    if found is None:
        return False
    pad, conv = found
    if str(sch.get(conv).writes[0].source.dtype) != "float32":
        return False
    inline_elementwise(sch, func, keep=[pad, conv])
    exts = [int(iv.dom.extent) for iv in sch.get(conv).iter_vars]  # n, oh, ow, oc, kh, kw, c
    geo = {"oh": exts[1], "ow": exts[2], "oc": exts[3], "kh": exts[4], "kw": exts[5], "ic": exts[6],
           "stride_w": 0, "depthwise": 0}
    acc = Conv2dNCHWRule._accumulator(sch, func, conv)
    n, y = sch.get_loops(acc)[:2]
    _, fo, ry, f_t = tile_nhwc_conv(sch, acc, [n, y], geo, cfg)
    row = sch.fuse(n, y)
    sch.compute_at(pad, row)  # the padded rows this output row reads; buffer compaction shrinks it to them
    if worth_parallel(cfg, _block_iterations(sch, acc)):
        sch.parallel(row)  # (the row buffer is allocated inside the loop: one per worker thread)
    pad_name = sch.get(pad).name_hint
    _finish_tiled_reduction(sch, func, cfg, acc, ry, fo, f_t, done=[pad_name])
    # zero fill + unconditional interior copy: a conditional copy does not vectorize
    pad = sch.get_sblock(pad_name)
    fill = sch.decompose_padding(pad, sch.get_loops(pad)[1])
    for block in (fill, pad):
        sch.vectorize(sch.get_loops(block)[-1])
    return True


__all__ = ["CONV_BLOCK", "PAD_BLOCK", "find_nchw_input_conv", "nchw_input_conv_compute", "schedule_nchw_input_conv"]
