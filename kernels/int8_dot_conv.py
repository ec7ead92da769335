"""One register-tiled schedule for pointwise int8 convs on a 4-way dot-product instruction.

Why shared: x86 ``vpdpbusd`` (16 int32 lanes, kernels/x86_int8.py) and AArch64 ``sdot``
(4 int32 lanes, kernels/arm_int8.py) both reduce groups of 4 bytes into int32 lanes, so the loop
structure around them is the same: pack activations so 4 input channels of one pixel are
contiguous, keep ``oc_t`` output channels x ``n_vec`` pixel vectors of accumulators in registers
across the whole reduction, and tensorize the innermost (pixels x 4 channels) block. Only the
lane count, the pixel-vector choice and the tensor intrinsic differ; :class:`DotInstruction`
carries those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DotInstruction:
    """What the shared schedule needs to know about one dot-product instruction family."""

    name: str  # for messages, e.g. "vpdpbusd"
    intrin: str  # registered tensor intrinsic name
    lanes: int  # int32 accumulators per vector register
    k_group: int  # bytes reduced into one lane
    pixel_vectors: Callable[..., int | None]  # (npix, row=None) -> vectors per tile, None if no whole tile
    padded_pixel_vectors: Callable[[int], tuple[int, int]]  # npix -> (vectors, padded pixel count)


def schedule_pointwise_dot(sch: Any, func: Any, conv: Any, geo: dict[str, int], cfg: Any, data_i: int,
                           dot: DotInstruction) -> bool:
    """Tile a pointwise int8 conv so its inner (``lanes`` pixels x ``k_group`` channels) block is
    ``dot.intrin``; returns True when the function is fully scheduled.

    Ragged pixel counts pad the conv's flat pixel axis (needs a 4-D epilogue); otherwise the
    accumulator (and, when possible, the epilogue) is flattened to H*W so tiles may cross rows.
    """
    from apq.kernels.cpu_schedules import Conv2dNCHWRule, _largest_divisor, _tile_consumer, flatten_pixels
    from apq.kernels.x86_int8 import _pack_activations, _pad_and_pack_activations

    width, npix = geo["ow"], geo["oh"] * geo["ow"]
    n_vec = dot.pixel_vectors(npix)
    if n_vec is None:
        acc = Conv2dNCHWRule._accumulator(sch, func, conv)
        flatten_pixels(sch, acc, width)
        n_vec, padded = dot.padded_pixel_vectors(npix)
        pack = _pad_and_pack_activations(sch, acc, data_i, padded, cfg)
    else:
        pack = _pack_activations(sch, conv, data_i, width, cfg)
        acc = Conv2dNCHWRule._accumulator(sch, func, conv)
        try:
            flatten_pixels(sch, acc, width)
            row: int | None = None
        except Exception:  # epilogue not a plain 4-D block: flatten the accumulator only
            sch.transform_layout(acc, ("write", 0), lambda n, f, h, w: (n, f, h * width + w))
            sch.transform_block_layout(acc, lambda n, f, h, w, rc, ry, rx: (n, f, h * width + w, rc, ry, rx))
            row = width
        n_vec = dot.pixel_vectors(npix, row)
        if n_vec is None:
            raise ValueError(f"no {dot.lanes}-pixel {dot.name} tile is whole rows of {width} or divides one")
    n, f, pix, rc, ry, rx = sch.get_loops(acc)
    n_ic = int(sch.get(rc).extent)
    oc_t = _largest_divisor(geo["oc"], min(cfg.max_oc_tile, max(1, cfg.accumulators // n_vec)))
    fo, fi = sch.split(f, [None, oc_t])
    po, pv, pl = sch.split(pix, [None, n_vec, dot.lanes])
    rco, rci = sch.split(rc, [None, dot.k_group])
    sch.reorder(n, fo, po, rco, ry, rx, fi, pv, pl, rci)
    outer = sch.fuse(n, fo, po)
    work = geo["oc"] * npix * n_ic  # multiply-adds
    if cfg.num_cores > 1 and int(sch.get(outer).extent) > 1 and work >= cfg.min_parallel_work:
        sch.parallel(outer)
    done = {sch.get(acc).name_hint, sch.get(pack).name_hint, _tile_consumer(sch, func, acc, outer, dot.lanes)}
    init = sch.decompose_reduction(acc, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(pl, dot.intrin)
    sch.unroll(fi)
    sch.unroll(pv)
    Conv2dNCHWRule._schedule_rest(sch, cfg, done)
    return True


__all__ = ["DotInstruction", "schedule_pointwise_dot"]
