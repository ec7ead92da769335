"""Start a float conv's accumulator at its bias instead of adding the bias afterwards.

Why: a fused conv PrimFunc accumulates into zeros (the reduction block's ``init``), then an
elementwise block adds the per-channel bias. Once apq's schedule inlines that block into the
conv's epilogue, the add is one vector instruction per output vector; but the zeroing it
replaces is free (a zero idiom), and epilogues are a large share of the shallow convs that
dominate MobileNets: a 3x3 depthwise conv does 9 multiply-adds per output vector and then
bias, ReLU6 (max, min) and the store; a 16-channel expansion 16 multiply-adds and the same
four. Measured (224 px MobileNetV2 float, 1 thread, interleaved A/B in one process): 1.02x.

What changes: ``init: acc = 0`` + ``out = acc + bias[c]`` becomes ``init: acc = bias[c]`` +
``out = acc``. Only float32 accumulators, only when the add block is the accumulator's single
reader and reads it at its own iteration (an output-shaped map), and only when the bias is a
parameter of the PrimFunc (a constant the Relax side passes in). The sum is then rounded in a
different order (bias first), so float outputs move by float rounding (~1e-6 on MobileNetV2);
apq's merged and unmerged kernels, and every schedule of one PrimFunc, still compute the same
bits, because the rewrite runs on the fused PrimFuncs before anything schedules them
(kernels/pipeline.prepare_passes). For the exact float-accumulated integer convs of
toolchain/qdq_lowering.py every value stays an integer below 2^24 (``_float_offset_is_exact``
bounds ``|offset| + |sum|``), so their outputs are bit-identical.
"""

from __future__ import annotations

from typing import Any


def _blocks(func: Any) -> list[Any]:
    import tvm_ffi
    from tvm import s_tir

    found: list[Any] = []
    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, found.append)])
    return found


def _zero_float_init(block: Any) -> Any | None:
    """The ``init`` store of a float32 reduction block that starts at 0 at its own spatial
    point, else None."""
    from tvm.tirx import expr, stmt

    init = block.init
    if not isinstance(init, stmt.BufferStore) or str(init.buffer.dtype) != "float32":
        return None
    if not isinstance(init.value, expr.FloatImm) or float(init.value.value) != 0.0:
        return None
    spatial = [iv.var for iv in block.iter_vars if int(iv.iter_type) == 0]
    if len(init.indices) != len(spatial) or not all(i.same_as(v) for i, v in zip(init.indices, spatial)):
        return None
    return init


def _load_at(x: Any, buffer: Any, at: list[Any]) -> bool:
    """``x`` is ``buffer[at...]`` exactly."""
    from tvm.ir.expr import TensorLoad

    return (isinstance(x, TensorLoad) and x.source.same_as(buffer) and len(x.indices) == len(at)
            and all(i.same_as(v) for i, v in zip(x.indices, at)))


def _bias_add(block: Any, acc: Any, params: list[Any]) -> tuple[Any, Any] | None:
    """``(accumulator load, bias load)`` when ``block`` is ``out[v] = acc[v] + bias[...]`` with
    ``bias`` a PrimFunc parameter, else None."""
    from tvm.ir.expr import TensorLoad
    from tvm.tirx import expr, stmt

    body = block.body
    if block.init is not None or not isinstance(body, stmt.BufferStore) or not isinstance(body.value, expr.Add):
        return None
    at = [iv.var for iv in block.iter_vars]
    for a, b in ((body.value.a, body.value.b), (body.value.b, body.value.a)):
        if _load_at(a, acc, at) and isinstance(b, TensorLoad) and any(b.source.same_as(p) for p in params):
            return a, b
    return None


def fold_bias_into_init(func: Any) -> tuple[Any, int]:
    """``func`` with each foldable bias moved into its accumulator's ``init`` (module
    docstring); also how many were folded."""
    import tvm_ffi
    from tvm import ir, s_tir, tirx

    params = list(func.params)
    blocks = _blocks(func)
    replace: list[tuple[Any, Any]] = []
    for conv in blocks:
        init = _zero_float_init(conv)
        if init is None:
            continue
        readers = [b for b in blocks if not b.same_as(conv) and any(r.source.same_as(init.buffer) for r in b.reads)]
        found = _bias_add(readers[0], init.buffer, params) if len(readers) == 1 else None
        spatial = [iv.var for iv in conv.iter_vars if int(iv.iter_type) == 0]
        if found is None or len(readers[0].iter_vars) != len(spatial):
            continue
        add, (acc, bias) = readers[0], found
        to_conv = dict(zip((iv.var for iv in add.iter_vars), spatial))
        index = [tvm_ffi.structural_map(i, (tirx.Var, lambda v: to_conv.get(v, v))) for i in bias.indices]
        region = tirx.BufferRegion(bias.source, [ir.Range.from_min_extent(i, 1) for i in index])
        new_conv = s_tir.SBlock(conv.iter_vars, [*conv.reads, region], conv.writes, conv.name_hint, conv.body,
                                tirx.BufferStore(init.buffer, tirx.BufferLoad(bias.source, index), init.indices),
                                conv.alloc_buffers, conv.match_buffers, conv.annotations)
        new_add = s_tir.SBlock(add.iter_vars, [r for r in add.reads if not r.source.same_as(bias.source)], add.writes,
                               add.name_hint, tirx.BufferStore(add.body.buffer, acc, add.body.indices), None,
                               add.alloc_buffers, add.match_buffers, add.annotations)
        replace += [(conv, new_conv), (add, new_add)]
    if not replace:
        return func, 0

    def swap(block: Any) -> Any:
        return next((new for old, new in replace if old.same_as(block)), block)

    return tvm_ffi.structural_map(func, (s_tir.SBlock, swap)), len(replace) // 2


def bias_init_pass() -> Any:
    """The module pass form: every PrimFunc of the module through :func:`fold_bias_into_init`."""
    import tvm

    @tvm.ir.transform.module_pass(opt_level=0, name="ApqBiasIntoAccumulatorInit")
    def _pass(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions_items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                folded, count = fold_bias_into_init(func)
                if count:
                    mod[gv] = folded
        return mod

    return _pass


__all__ = ["bias_init_pass", "fold_bias_into_init"]
