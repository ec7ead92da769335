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


#: Ragged pixel counts are padded to whole pixel vectors only when at least this share of the
#: padded lanes is real work (x86: 196 -> 208 is 94%, 49 -> 64 is 77%; a 2x2 image, 4 of 16 lanes,
#: is not worth a packed copy and 4x the multiply-adds: it keeps the 16-bit path).
MIN_PADDED_LANE_USE = 0.5


@dataclass(frozen=True)
class DotInstruction:
    """What the shared schedule needs to know about one dot-product instruction family.

    ``pixel_vector_choices``: vectors of ``lanes`` pixels per register tile, in order of
    preference (the instruction's register budget decides it; see each backend's constant).
    """

    name: str  # for messages, e.g. "vpdpbusd"
    lanes: int  # int32 accumulators per vector register (= pixels per vector)
    k_group: int  # bytes reduced into one lane
    pixel_vector_choices: tuple[int, ...]

    def pixel_vectors(self, npix: int, row: int | None = None) -> int | None:
        """Pixel vectors per tile, or None if no tile of whole vectors fits the image.

        The tile must divide the H*W pixels. With ``row`` given it must also be a whole number
        of rows or divide a row: an epilogue computed per tile over a rectangle of (y, x) would
        otherwise read accumulators of the next tile (measured: silently wrong outputs on a
        12x12 image with 16-pixel tiles). ``row=None`` is for an epilogue iterating the flat
        H*W axis (:func:`apq.kernels.cpu_schedules.flatten_pixels`), where any divisor is fine:
        that is what lets 56x56 and 28x28 images (rows of 3.5 and 1.75 vectors) use VNNI.
        """
        for n_vec in self.pixel_vector_choices:
            tile = n_vec * self.lanes
            if npix % tile == 0 and (row is None or tile % row == 0 or row % tile == 0):
                return n_vec
        return None

    def padded_pixel_vectors(self, npix: int) -> tuple[int, int]:
        """(vectors per tile, padded pixel count) for a pixel axis no whole tile divides.

        The smallest padding wins (x86: 196 -> 208 with 1-vector tiles, 49 -> 64), ties go to
        the order of ``pixel_vector_choices``.
        """
        best: tuple[int, int] | None = None
        for n_vec in self.pixel_vector_choices:
            tile = n_vec * self.lanes
            padded = -(-npix // tile) * tile
            if best is None or padded < best[1]:
                best = (n_vec, padded)
        assert best is not None
        return best

    def covers(self, npix: int) -> bool:
        """Whole vectors divide the pixels, or padding them wastes less than half the lanes."""
        return self.pixel_vectors(npix) is not None or npix / self.padded_pixel_vectors(npix)[1] >= MIN_PADDED_LANE_USE


def dot_intrin_pair(lanes: int, k_group: int, a_dtype: str, dot: Callable[[Any, Any, Any], Any]) -> tuple[Any, Any]:
    """(desc, impl) PrimFuncs of a ``lanes`` pixels x ``k_group`` channels int8 dot product.

    ``A``: the packed input tile; ``B``: the ``k_group`` weights of one output channel (a
    ``[k_group, 1, 1]`` slice of a pointwise OIHW weight); ``C``: ``lanes`` local int32
    accumulators. ``dot(C, A, B)`` returns the new accumulator vector: the backend's LLVM call.
    It is stored as one expression because named temporaries would become local allocations.
    """
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, k_group), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (k_group, 1, 1), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:k_group], B[0:k_group, 0:1, 0:1])
            T.writes(C[0:lanes])
            for i, k in T.grid(lanes, k_group):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.Cast("int32", A[vi, vk]) * T.Cast("int32", B[vk, 0, 0])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (lanes, k_group), a_dtype, offset_factor=1)
        B = T.match_buffer(b, (k_group, 1, 1), "int8", offset_factor=1)
        C = T.match_buffer(c, (lanes,), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:lanes, 0:k_group], B[0:k_group, 0:1, 0:1])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = dot(C, A, B)

    return desc, impl


def schedule_pointwise_dot(sch: Any, func: Any, conv: Any, geo: dict[str, int], cfg: Any, data_i: int,
                           dot: DotInstruction, intrin: str) -> bool:
    """Tile a pointwise int8 conv so its inner (``lanes`` pixels x ``k_group`` channels) block is
    ``intrin`` (a tensor intrinsic registered for ``dot``); returns True when the function is fully scheduled.

    Ragged pixel counts pad the conv's flat pixel axis (needs a 4-D epilogue); otherwise the
    accumulator (and, when possible, the epilogue) is flattened to H*W so tiles may cross rows.
    """
    from apq.kernels.cpu_schedules import (Conv2dNCHWRule, _largest_divisor, _tile_consumer, flatten_pixels,
                                           vectorize_by_divisor, worth_parallel)
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
    if int(sch.get(outer).extent) > 1 and worth_parallel(cfg, work, "int8_dot_mac"):
        sch.parallel(outer)
    done = {sch.get(acc).name_hint, sch.get(pack).name_hint}
    if npix % (n_vec * dot.lanes) == 0:
        done.add(_tile_consumer(sch, func, acc, outer, dot.lanes))
    else:
        # Ragged pixel axis: an epilogue computed per tile is predicated (pixel < npix) in every
        # tile of the fused loop, and LLVM then reads the accumulators with vpgatherdd (measured
        # on a 64->256 conv at 14x14: 4.4x slower than onnxruntime). The accumulators go to
        # memory instead (a vectorized copy per tile) and the epilogue runs once over the real
        # pixels, unpredicated.
        tile_out = sch.cache_write(acc, 0, "local")  # acc: a fresh local tile; tile_out: the copy out
        sch.set_scope(tile_out, 0, "global")
        [epilogue] = sch.get_consumers(tile_out)
        done.add(_tile_consumer(sch, func, acc, outer, dot.lanes))
        vectorize_by_divisor(sch, sch.get_loops(epilogue)[-1], dot.lanes)  # the flat pixel axis
        done.add(sch.get(epilogue).name_hint)
    init = sch.decompose_reduction(acc, rco)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(pl, intrin)
    sch.unroll(fi)
    sch.unroll(pv)
    Conv2dNCHWRule._schedule_rest(sch, cfg, done)
    return True


__all__ = ["MIN_PADDED_LANE_USE", "DotInstruction", "dot_intrin_pair", "schedule_pointwise_dot"]
