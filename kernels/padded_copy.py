"""Split a depthwise conv's padded-input copy into its border and a branch-free interior.

Why: the copy reads ``if_then_else(inside, x[..], 0)``. LLVM does not vectorize a loop with a
conditional load, so the copy ran one element per cycle, and in a stride-2 conv, whose copy
also deinterleaves even and odd columns (``CpuScheduleConfig``'s deinterleaved layout, see
``Conv2dNCHWRule._deinterleave_padded_input``), it was most of the kernel's time. With the row
and column loops partitioned (``Schedule.loop_partition``) at the padding bounds, the interior
partition's condition is provably true, TIR's simplifier drops it, and LLVM vectorizes the
plain copy; with the parity loop innermost, the stride-2 reads form one interleaved group
that LLVM loads as whole vectors and splits with shuffles (``vpermps``). The border
partitions keep the condition (they are a few rows and columns).

Measured (1 thread, thread CPU time, float, on a shared 2-core VM; single-kernel timings
moved by +-30% between runs): stride-1 3x3 convs at 112 and 56 px 0.38 -> 0.32 and
0.54 -> 0.32 ms; a 96-channel 112 px stride-2 conv 1.08 -> 0.84 ms in one run, 0.98 -> 0.93 in
another; a 28 px 5x5 conv 0.18 -> 0.25 ms in one run, even in another. The whole float
MobileNetV2 at 224 px: 0.99x. So it is off by default (``CpuScheduleConfig.partition_padding``)
and offered to knob tuning, which keeps it per kernel only where it times >= 3% faster.
A fill plus an unconditional interior copy (``decompose_padding``) is what the default uses for
stride 1; for the deinterleaved stride-2 copy it cannot be computed per channel block
(``compute_at`` refuses a buffer with two writers).
"""

from __future__ import annotations

from typing import Any


def _linear(expr: Any, variables: list[Any]) -> list[int] | None:
    """Integer coefficients ``[a_1.., a_n, offset]`` of ``expr`` in ``variables``, else None."""
    from tvm import sym as arith  # TVM 0.27 moved tvm.arith to tvm.sym
    from tvm import tirx

    coeff = arith.detect_linear_equation(expr, variables)
    if len(coeff) != len(variables) + 1 or not all(isinstance(c, tirx.IntImm) for c in coeff):
        return None
    return [int(c.value) for c in coeff]


def _get_realize() -> Any:
    """TVM's ``GetSBlockRealize`` (the block's bindings); not wrapped by ``Schedule`` in 0.27."""
    import tvm

    return tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def partition_loop(sch: Any, block: Any, loop: Any, factors: list[int | None]) -> list[Any]:
    """``sch.loop_partition(loop, factors)`` for a loop of ``block``; returns the pieces' blocks
    in order. Why by name: loop_partition puts each piece in an opaque block
    ``<block>_<loop var><i>`` (inside ``<block>_<loop var>_common``), which ``get_producers``
    does not see and at which ``get_loops`` stops."""
    name, var = sch.get(block).name_hint, sch.get(loop).loop_var.name
    sch.loop_partition(loop, factors)
    return [sch.get_sblock(f"{name}_{var}{i}") for i in range(len(factors))]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pieces(extent: int, lo: int, hi: int) -> tuple[list[int | None], int] | None:
    """Partition factors of ``range(extent)`` around the interior ``[lo, hi)`` and the index of
    the interior piece; None when there is no border to split off (or no interior)."""
    lo, hi = max(0, lo), min(extent, hi)
    if hi <= lo or (lo == 0 and hi == extent):
        return None
    factors: list[int | None] = [f for f in (lo, hi - lo, extent - hi) if f > 0]
    factors[-1] = None  # loop_partition infers the last piece (explicit factors must sum below the extent)
    return factors, (1 if lo > 0 else 0)


def _geometry(sch: Any, block: Any) -> dict[str, Any] | None:
    """Loops and interior bounds of a padded copy ``P[n, c, y, (p,) q] = x[n, c, y - pt, s*q + p - pl]``."""
    stmt = sch.get(block)
    if len(stmt.reads) != 1:
        return None
    region = stmt.reads[0]
    src_shape = [int(d) for d in region.source.shape]
    idx = [r.min for r in region.region]
    ivs = [iv.var for iv in stmt.iter_vars]
    loops = sch.get_loops(block)
    if len(idx) != 4 or len(ivs) not in (4, 5) or len(loops) < len(ivs):
        return None
    row_var, col_vars = ivs[2], ivs[3:][::-1]  # (q,) or (q, p): column index = s*q + p - pl
    rows = _linear(idx[2], [row_var])
    cols = _linear(idx[3], col_vars)
    if rows is None or cols is None or rows[0] != 1:
        return None
    stride = cols[0]
    if len(col_vars) == 2 and (cols[1] != 1 or int(stmt.iter_vars[3].dom.extent) != stride):
        return None  # not the deinterleaved [.., y, parity, q] layout
    if len(col_vars) == 1 and stride != 1:
        return None
    pad_top, pad_left = -rows[1], -cols[-1]
    height, width = src_shape[2], src_shape[3]
    own = loops[len(loops) - len(ivs):]
    # Row/column block vars must be bound to their loops as they are (``v = loop var``): the
    # bounds above are block coordinates. (The copy is computed per channel block, so loops may
    # be narrower than the block's domain, e.g. the 113 rows a stride-2 conv of 112 reads of 114.)
    realize = _get_realize()(sch, block)
    for lp, value in zip(own[2:], list(realize.iter_values)[2:]):
        if not sch.get(lp).loop_var.same_as(value):
            return None
    # interior columns: every parity p in [0, s) reads inside, pl <= s*q + p < pl + W
    return {"row_loop": own[2], "col_loop": own[-1], "parity_loop": own[3] if len(ivs) == 5 else None,
            "rows": (pad_top, pad_top + height),
            "cols": (_ceil_div(pad_left, stride), (pad_left + width - stride) // stride + 1)}


def partition_padded_copy(sch: Any, block: Any) -> bool:
    """Partition a padded copy's row and column loops at the padding bounds (see the module
    docstring); returns False, leaving ``sch`` unchanged, when ``block`` is not such a copy."""
    geo = _geometry(sch, block)
    if geo is None:
        return False
    row_pieces = _pieces(int(sch.get(geo["row_loop"]).extent), *geo["rows"])
    col_pieces = _pieces(int(sch.get(geo["col_loop"]).extent), *geo["cols"])
    if row_pieces is None and col_pieces is None:
        return False
    if geo["parity_loop"] is not None:
        sch.reorder(geo["col_loop"], geo["parity_loop"])  # stride-2 reads of one column pair together
    # the interior's column loop is partitioned inside its row piece
    interior = block
    leaves = [block]
    if row_pieces is not None:
        leaves = partition_loop(sch, block, geo["row_loop"], row_pieces[0])
        interior = leaves[row_pieces[1]]
    if col_pieces is not None:
        col_loop = sch.get_loops(interior)[-2 if geo["parity_loop"] is not None else -1]
        parts = partition_loop(sch, interior, col_loop, col_pieces[0])
        leaves = [b for b in leaves if b is not interior] + parts
    if geo["parity_loop"] is not None:
        for leaf in leaves:
            sch.unroll(sch.get_loops(leaf)[-1])
    return True


__all__ = ["partition_padded_copy", "partition_loop"]
