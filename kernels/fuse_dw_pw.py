"""A depthwise conv and the pointwise convs around it, in one kernel, a few rows at a time.

Why: a MobileNet-style block is ``pointwise expand -> depthwise KxK -> pointwise project`` (each
with bias and ReLU6). At 224 px input the first blocks move multi-megabyte tensors (112x112x64
floats = 3.2 MB; this host's L2 is 2 MB), and each kernel alone runs at the cache's bandwidth,
not at its arithmetic peak (~20 GB/s, measured per kernel). Fused, an intermediate is consumed
from L1/L2 right after it is produced, and one conv's arithmetic overlaps another's memory
stalls. Measured on the 224 px MobileNetV2 (1 thread, a fused kernel vs its kernels alone, same
process):

- depthwise -> project, one row at a time: 112 px dw32 -> pw16 275 -> 203 us, 112 px stride-2
  dw64 -> pw24 334 -> 264 us, 56 px dw96 -> pw24 331 -> 318 us; pairs whose tensors fit in L2
  (28 and 14 px) ranged from 14% faster to 46% slower merged, most of them slower.
- expand -> depthwise, the expansion computed per block of depthwise output rows (the rows a
  block needs, its halo rows computed twice): 112 px pw16 -> 64 -> stride-2 dw 372 -> 276 us with
  8-row blocks, 436 -> 280 us with 14; at 56 px (stride 1, 1.2 MB expanded) 190 -> 196 and
  256 -> 236 us; with 4-row blocks the recomputed halo ate the gain everywhere.

So a pair is fused only when it moves enough bytes (:class:`CpuScheduleConfig`
``fuse_dw_pw_min_bytes``, ``fuse_pw_dw_min_bytes``), and an expansion block is the most rows whose
expanded input stays within ``fuse_block_bytes``.

How, in two steps:

1. :func:`fuse_depthwise_chains` (Relax, after FuseOps/FuseTIR): a ``call_tir`` whose only use is
   the next binding, a ``call_tir`` that takes it as data, is wrapped with that call in one
   primitive Relax function, and TVM's ``FuseTIR`` merges the two PrimFuncs into one (buffers,
   epilogues and all). First depthwise -> project pairs, then expand -> (depthwise or merged
   depthwise -> project) pairs, so a whole block can become one kernel.
2. :func:`schedule_depthwise_chain` (the ``dw-chain-nhwc`` schedule rule): the last conv gets
   :class:`~apq.kernels.cpu_schedules.Conv2dNHWCRule`'s register tile with its rows (or blocks
   of rows) as the outer, parallel loop; the depthwise row is computed at the row loop and the
   expansion at the block loop (``compute_at``), each with its own register tile and its
   epilogue written per tile. TVM's buffer compaction allocates each intermediate as one row
   or block inside those loops, so each worker thread has its own.

The arithmetic, and its order, is that of the kernels alone: outputs are bit-identical. The pass
keeps a merge only when the rule schedules the merged PrimFunc, so a merged kernel never falls to
the generic (slow) rule.
"""

from __future__ import annotations

from typing import Any, Callable

from apq.kernels.cpu_schedules import (
    Conv2dNCHWRule,
    CpuScheduleConfig,
    _block_iterations,
    _blocks,
    _has_if_then_else,
    _iter_kinds,
    _tile_consumer,
    inline_elementwise,
    nhwc_geometry,
    tile_nhwc_conv,
    worth_parallel,
)

#: Name given to a merged PrimFunc: ``fused_<first ops>_<second ops>``.
MERGED_PREFIX = "fused_"
#: Conv chains (kinds of a PrimFunc's convs in order) the rule schedules.
CHAINS = (("dw", "pw"), ("pw", "dw"), ("pw", "dw", "pw"))


# --------------------------------------------------------------------------- what a PrimFunc is


def _float_convs(sch: Any) -> list[tuple[Any, dict[str, int]]] | None:
    """``(block, NHWC geometry)`` of every reduction block, in order; None unless every one is a
    float32 NHWC conv."""
    reds = [b for b in _blocks(sch) if "R" in _iter_kinds(sch, b)]
    convs = []
    for block in reds:
        if _iter_kinds(sch, block) != "SSSSRRR" or str(sch.get(block).writes[0].source.dtype) != "float32":
            return None
        geo = nhwc_geometry(sch, block)
        if geo is None:
            return None
        convs.append((block, geo))
    return convs


def _kind(geo: dict[str, int]) -> str:
    """``dw`` (depthwise), ``pw`` (stride-1 1x1: output rows are input rows) or ``conv``."""
    if geo["depthwise"]:
        return "dw"
    return "pw" if geo["kh"] * geo["kw"] == 1 and geo["stride_w"] == 1 else "conv"


def conv_chain(func: Any) -> tuple[str, ...]:
    """Kinds of a PrimFunc's float NHWC convs in order, e.g. ``("dw",)`` or ``("pw", "dw")``;
    empty for anything else (no conv, another dtype or layout, other reductions)."""
    from tvm import s_tir

    convs = _float_convs(s_tir.Schedule(func))
    if not convs:
        return ()
    kinds = tuple(_kind(geo) for _, geo in convs)
    if kinds == ("pw",):  # a lone 1x1 conv: also check that it keeps its input's rows
        data, out = func.params[0], func.params[-1]
        if [int(d) for d in data.shape[:3]] != [int(d) for d in out.shape[:3]]:
            return ("conv",)
    return kinds


def _bytes(ty: Any) -> int:
    """Size of a Relax tensor type with a static shape (0 when unknown)."""
    try:
        n = 1
        for dim in ty.shape:
            n *= int(dim)
        dtype = getattr(ty.dtype, "dtype", ty.dtype)  # TVM 0.27: a PrimType wrapping the dtype
        return n * ((int(dtype.bits) * int(dtype.lanes) + 7) // 8)
    except (AttributeError, TypeError, ValueError):
        return 0


# --------------------------------------------------------------------------- the Relax side

#: accept(producer binding, consumer binding, producer chain, consumer chain) -> merge?
PairTest = Callable[[Any, Any, tuple[str, ...], tuple[str, ...]], bool]


def bindings_and_uses(func: Any) -> tuple[list[Any], dict[Any, int]]:
    """A Relax function's bindings in order, and how often each variable is used (by bindings and
    by the function's result)."""
    from tvm import relax

    uses: dict[Any, int] = {}

    def count(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    bindings = [b for block in func.body.blocks for b in block.bindings]
    for binding in bindings:
        relax.analysis.post_order_visit(binding.value, count)
    relax.analysis.post_order_visit(func.body.body, count)
    return bindings, uses


def find_pairs(mod: Any, accept: PairTest, func_name: str = "main") -> dict[Any, Any]:
    """``{consumer binding var: producer binding}`` for consecutive ``call_tir`` bindings
    ``a = call_tir(f, ...)``, ``b = call_tir(g, (a, ...))`` where ``a`` has no other use and
    ``accept`` says yes."""
    import tvm
    from tvm import relax

    func = mod[func_name]
    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
        return {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    bindings, uses = bindings_and_uses(func)
    chains: dict[str, tuple[str, ...]] = {}

    def chain_of(binding: Any) -> tuple[str, ...] | None:
        value = getattr(binding, "value", None)
        if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
            return None
        name = value.args[0].name_hint
        if name not in chains:
            chains[name] = conv_chain(mod[value.args[0]])
        return chains[name]

    pairs: dict[Any, Any] = {}
    for prev, cur in zip(bindings, bindings[1:]):
        c_prev, c_cur = chain_of(prev), chain_of(cur)
        if not c_prev or not c_cur or any(p.same_as(prev.var) for p in pairs):
            continue
        args = cur.value.args[1].fields
        if not args or not args[0].same_as(prev.var) or uses.get(prev.var, 0) != 1:
            continue
        if accept(prev, cur, c_prev, c_cur):
            pairs[cur.var] = prev
    return pairs


def _merged_name(first: str, second: str) -> str:
    strip = lambda n: n[len(MERGED_PREFIX):] if n.startswith(MERGED_PREFIX) else n  # noqa: E731
    return f"{MERGED_PREFIX}{strip(first)}_{strip(second)}"


def merge_pairs(mod: Any, pairs: dict[Any, Any], func_name: str = "main") -> tuple[Any, dict[Any, str]]:
    """``mod`` with each pair's two calls replaced by one call of a merged PrimFunc; also each
    pair's merged PrimFunc name (by the pair's key). Needs an enclosing target context (FuseTIR)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    producers = {prod.var for prod in pairs.values()}
    names: dict[Any, str] = {}

    def primitive(prod: Any, cons: Any) -> tuple[Any, list[Any]]:
        first_args = list(prod.value.args[1].fields)
        second_args = list(cons.value.args[1].fields)[1:]
        params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(first_args + second_args)]
        mid = relax.DataflowVar("mid", prod.var.ty)
        out = relax.Var("out", cons.var.ty)
        block = relax.DataflowBlock([
            relax.VarBinding(mid, relax.Call(call_tir, [prod.value.args[0], relax.Tuple(params[:len(first_args)])],
                                             ty_args=prod.value.ty_args)),
            relax.VarBinding(out, relax.Call(call_tir, [cons.value.args[0],
                                                        relax.Tuple([mid] + params[len(first_args):])],
                                             ty_args=cons.value.ty_args)),
        ])
        func = relax.Function(params, relax.SeqExpr([block], out), cons.var.ty, is_pure=True)
        return func.with_attr("Primitive", True), first_args + second_args

    @relax.expr_functor.mutator
    class _Merge(relax.PyExprMutator):
        def visit_var_binding_(self, binding: Any) -> None:
            if binding.var in producers:
                return  # emitted inside the merged function
            prod = pairs.get(binding.var)
            if prod is None:
                super().visit_var_binding_(binding)
                return
            func, args = primitive(prod, binding)
            name = _merged_name(prod.value.args[0].name_hint, binding.value.args[0].name_hint)
            gvar = self.builder_.add_func(func, name)
            names[binding.var] = gvar.name_hint
            call = self.builder_.normalize(relax.Call(gvar, [self.visit_expr(a) for a in args]))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, call))

    mutator = _Merge(mod)
    mutator.builder_.update_func(mod.get_global_var(func_name), mutator.visit_expr(mod[func_name]))
    merged = relax.transform.FuseTIR()(mutator.builder_.get())
    return relax.transform.DeadCodeElimination()(merged), names


def _merge_schedulable(mod: Any, pairs: dict[Any, Any], cfg: CpuScheduleConfig) -> Any:
    """Merge ``pairs``, dropping (and retrying without) any whose merged PrimFunc the rule declines."""
    while pairs:
        merged, names = merge_pairs(mod, pairs)
        failed = {var for var, name in names.items() if not _schedulable(merged[name], cfg)}
        if not failed:
            return merged
        pairs = {var: prod for var, prod in pairs.items() if var not in failed}
    return mod


def _schedulable(func: Any, cfg: CpuScheduleConfig) -> bool:
    from tvm import s_tir

    try:
        return schedule_depthwise_chain(s_tir.Schedule(func), func, cfg)
    except Exception:  # noqa: BLE001 -- a schedule error means "do not merge this pair"
        return False


def depthwise_project_test(cfg: CpuScheduleConfig) -> PairTest:
    """A depthwise conv -> a pointwise conv, moving >= ``fuse_dw_pw_min_bytes`` (dw in + out)."""
    def accept(prev: Any, cur: Any, c_prev: tuple[str, ...], c_cur: tuple[str, ...]) -> bool:
        moved = _bytes(prev.value.args[1].fields[0].ty) + _bytes(prev.var.ty)
        return c_prev == ("dw",) and c_cur == ("pw",) and moved >= cfg.fuse_dw_pw_min_bytes

    return accept


def expand_depthwise_test(cfg: CpuScheduleConfig) -> PairTest:
    """A pointwise conv -> a depthwise one (maybe merged with its project), expanded tensor
    >= ``fuse_pw_dw_min_bytes``."""
    def accept(prev: Any, cur: Any, c_prev: tuple[str, ...], c_cur: tuple[str, ...]) -> bool:
        return (c_prev == ("pw",) and c_cur in (("dw",), ("dw", "pw"))
                and _bytes(prev.var.ty) >= cfg.fuse_pw_dw_min_bytes)

    return accept


def fuse_depthwise_chains(mod: Any, cfg: CpuScheduleConfig) -> Any:
    """Depthwise -> project pairs, then expand -> depthwise(-project) pairs, merged where the
    rule schedules the result (module docstring). Nothing when ``cfg.fuse_blocks`` is off."""
    if not cfg.fuse_blocks:
        return mod
    for test in (depthwise_project_test(cfg), expand_depthwise_test(cfg)):
        mod = _merge_schedulable(mod, find_pairs(mod, test), cfg)
    return mod


def fuse_depthwise_chains_pass(cfg: CpuScheduleConfig) -> Any:
    """Module pass form of :func:`fuse_depthwise_chains` (kernels/pipeline.py ``prepare_passes``)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApqFuseDepthwiseChains")
    def _pass(mod: Any, _ctx: Any) -> Any:
        return fuse_depthwise_chains(mod, cfg)

    return _pass


# --------------------------------------------------------------------------- the schedule


def _finish(sch: Any, func: Any, conv: Any, with_epilogue: bool, tile_loop: Any, reduce_loop: Any, lanes: int) -> None:
    """Epilogue (``conv``'s one consumer) per register tile, vectorized; zero-init split off,
    vectorized."""
    if with_epilogue:
        _tile_consumer(sch, func, conv, tile_loop, lanes)
    init = sch.decompose_reduction(conv, reduce_loop)
    sch.vectorize(sch.get_loops(init)[-1])


def _materialized(sch: Any, producer: Any, consumer: Any) -> Any | None:
    """The block whose output ``consumer`` reads, materialized: the last block of the chain from
    ``producer`` to ``consumer`` that is not padding (padding is inlined into the consumer), or
    ``producer`` itself when nothing lies between. None when the chain branches."""
    target_name = sch.get(consumer).name_hint
    last, block = producer, producer
    while True:
        nxt = sch.get_consumers(block)
        if len(nxt) != 1:
            return None
        if sch.get(nxt[0]).name_hint == target_name:
            return last
        block = nxt[0]
        if not _has_if_then_else(sch, block):
            last = block


def _compute_at(sch: Any, func: Any, conv: Any, mid: Any, loop: Any, geo: dict[str, int], cfg: CpuScheduleConfig) -> None:
    """Compute ``conv`` (and its epilogue ``mid``) where ``loop`` needs it, register-tiled."""
    has_epilogue = sch.get(mid).name_hint != sch.get(conv).name_hint
    if has_epilogue:
        sch.compute_at(mid, loop, preserve_unit_loops=False)
    # unit loops kept: without, a depthwise conv's rc (extent 1) vanishes and the tile loses its axes
    sch.compute_at(conv, loop, preserve_unit_loops=True)
    if has_epilogue:
        sch.set_scope(conv, 0, "local")
    _, fo, ry, _ = tile_nhwc_conv(sch, conv, [], geo, cfg)
    _finish(sch, func, conv, has_epilogue, fo, ry, cfg.lanes(32))


def rows_per_block(out_rows: int, stride: int, kh: int, in_row_bytes: int, budget: int) -> int:
    """Depthwise output rows per expansion block: the largest divisor of ``out_rows`` whose
    input rows (``rows * stride + kh - stride``, halo included) fit in ``budget`` bytes (>= 1)."""
    fits = [r for r in range(1, out_rows + 1)
            if out_rows % r == 0 and (r * stride + kh - stride) * in_row_bytes <= budget]
    return max(fits, default=1)


def schedule_depthwise_chain(sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
    """Schedule a merged [expand ->] depthwise [-> project] PrimFunc (module docstring); False
    (schedule untouched) if it is not one."""
    convs = _float_convs(sch)
    if not convs or tuple(_kind(geo) for _, geo in convs) not in CHAINS:
        return False
    kinds = [_kind(geo) for _, geo in convs]
    i_dw = kinds.index("dw")
    dw, g_dw = convs[i_dw]
    expand, g_expand = convs[0] if i_dw == 1 else (None, None)
    project, g_project = convs[i_dw + 1] if i_dw + 1 < len(convs) else (None, None)
    mid_expand = _materialized(sch, expand, dw) if expand is not None else None
    mid_dw = _materialized(sch, dw, project) if project is not None else None
    if (expand is not None and mid_expand is None) or (project is not None and mid_dw is None):
        return False
    last, g_last = (project, g_project) if project is not None else (dw, g_dw)
    if len(sch.get_consumers(last)) != 1:
        return False
    work = sum(_block_iterations(sch, b) * (2 if g["depthwise"] else 1) for b, g in convs)
    inline_elementwise(sch, func, keep=[b for b, _ in convs] + [m for m in (mid_expand, mid_dw) if m is not None])
    lanes = cfg.lanes(32)

    last = Conv2dNCHWRule._accumulator(sch, func, last)
    n, y = sch.get_loops(last)[:2]
    if expand is not None:
        row_bytes = g_dw["ow"] * g_dw["stride_w"] * g_dw["oc"] * 4
        rows = rows_per_block(g_dw["oh"], g_dw["stride_w"], g_dw["kh"], row_bytes, cfg.fuse_block_bytes)
        y_block, row = sch.split(y, [None, rows])
        outer = sch.fuse(n, y_block)
        inner = [outer, row]
    else:
        outer = row = sch.fuse(n, y)
        inner = [row]
    _, fo, ry, _ = tile_nhwc_conv(sch, last, inner, g_last, cfg)
    if worth_parallel(cfg, work, "mac"):
        sch.parallel(outer)
    _finish(sch, func, last, True, fo, ry, lanes)
    if project is not None:
        _compute_at(sch, func, dw, mid_dw, row, g_dw, cfg)
    if expand is not None:
        _compute_at(sch, func, expand, mid_expand, outer, g_expand, cfg)
    return True


__all__ = ["CHAINS", "MERGED_PREFIX", "conv_chain", "depthwise_project_test", "expand_depthwise_test",
           "find_pairs", "fuse_depthwise_chains", "fuse_depthwise_chains_pass", "merge_pairs", "rows_per_block",
           "schedule_depthwise_chain"]
