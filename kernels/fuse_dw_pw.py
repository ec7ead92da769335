"""A depthwise conv and the pointwise conv that reads it, in one kernel, one output row at a time.

Why: every MobileNet-style block ends ``depthwise KxK -> (bias, ReLU6) -> pointwise 1x1``. At
224 px input the first blocks move multi-megabyte tensors (112x112x32 floats = 1.6 MB; the
2 MB L2 of this host holds little more), and both kernels alone run at the cache's bandwidth,
not at their arithmetic peak (~20 GB/s, measured per kernel). Fused, the depthwise output of
one row (112 x 32 floats = 14 KB) is consumed from L1 by the pointwise conv right after it is
produced, and the pointwise arithmetic overlaps the depthwise's memory stalls. Measured on the
224 px MobileNetV2 (1 thread, each pair's fused kernel vs the two kernels alone, same process):
112 px dw32 -> pw16 275 -> 203 us, 112 px stride-2 dw64 -> pw24 334 -> 264 us, 56 px dw96 -> pw24
331 -> 318 us. Pairs whose tensors fit in L2 gained nothing or lost up to ~10% (28 and 14 px),
so only pairs that move at least :attr:`CpuScheduleConfig.fuse_dw_pw_min_bytes` (depthwise
input + output) are fused.

How, in two steps:

1. :func:`fuse_depthwise_pointwise_pass` (Relax, after FuseOps/FuseTIR): a ``call_tir`` of a
   float NHWC depthwise conv whose only use is the next binding, a ``call_tir`` of a stride-1
   1x1 NHWC conv taking it as data, is wrapped with that call in one primitive Relax function,
   and TVM's ``FuseTIR`` merges the two PrimFuncs into one (buffers, epilogues and all).
2. :func:`schedule_depthwise_pointwise` (the ``dw-pw-nhwc`` schedule rule): the pointwise conv
   gets :class:`~apq.kernels.cpu_schedules.Conv2dNHWCRule`'s register tile with its rows as
   the outer (parallel) loop; the depthwise conv's output row is computed at that loop
   (``compute_at``), with its own register tile and its bias/ReLU6 written per tile. TVM's
   buffer compaction then allocates the intermediate as one row inside the row loop, so each
   worker thread has its own.

The arithmetic, and its order, is that of the two kernels alone: outputs are bit-identical.
The pass keeps a merge only when the rule can schedule the merged PrimFunc, so a pair never
falls to the generic (slow) rule.
"""

from __future__ import annotations

from typing import Any

from apq.kernels.cpu_schedules import (
    Conv2dNCHWRule,
    CpuScheduleConfig,
    _block_iterations,
    _blocks,
    _iter_kinds,
    _single_reduction,
    choose_tile,
    inline_elementwise,
    nhwc_geometry,
    vectorize_by_divisor,
    worth_parallel,
)

#: Name given to a merged PrimFunc: ``fused_<depthwise ops>_<pointwise ops>``.
MERGED_PREFIX = "fused_"


def _float_conv_geometry(func: Any) -> dict[str, int] | None:
    """NHWC geometry of a PrimFunc holding one float32 NHWC conv (else None)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    conv = _single_reduction(sch, "SSSSRRR")
    if conv is None or str(sch.get(conv).writes[0].source.dtype) != "float32":
        return None
    return nhwc_geometry(sch, conv)


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


def is_depthwise(func: Any) -> bool:
    geo = _float_conv_geometry(func)
    return bool(geo and geo["depthwise"])


def is_pointwise(func: Any) -> bool:
    """A stride-1 1x1 NHWC float conv (its output rows are its input rows)."""
    geo = _float_conv_geometry(func)
    if not geo or geo["depthwise"] or geo["kh"] * geo["kw"] != 1 or geo["stride_w"] != 1:
        return False
    data, out = func.params[0], func.params[-1]
    return [int(d) for d in data.shape[:3]] == [int(d) for d in out.shape[:3]]


def find_pairs(mod: Any, min_bytes: int, func_name: str = "main") -> dict[Any, Any]:
    """``{pointwise binding var: depthwise binding}`` for every fusable pair in ``mod[func_name]``.

    A pair: consecutive bindings ``a = call_tir(dw, ...)``, ``b = call_tir(pw, (a, ...))`` where
    ``a`` has no other use and the depthwise input plus output is at least ``min_bytes``.
    """
    import tvm
    from tvm import relax

    func = mod[func_name]
    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
        return {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    uses: dict[Any, int] = {}

    def count(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            uses[expr] = uses.get(expr, 0) + 1

    bindings = [b for block in func.body.blocks for b in block.bindings]
    for binding in bindings:
        relax.analysis.post_order_visit(binding.value, count)
    relax.analysis.post_order_visit(func.body.body, count)

    def tir_callee(binding: Any) -> Any:
        value = getattr(binding, "value", None)
        if isinstance(value, relax.Call) and value.op.same_as(call_tir):
            return mod[value.args[0]]
        return None

    pairs: dict[Any, Any] = {}
    kinds: dict[Any, tuple[bool, bool]] = {}

    def kind(func: Any) -> tuple[bool, bool]:
        if func not in kinds:
            kinds[func] = (is_depthwise(func), is_pointwise(func))
        return kinds[func]

    for prev, cur in zip(bindings, bindings[1:]):
        f_dw, f_pw = tir_callee(prev), tir_callee(cur)
        if f_dw is None or f_pw is None or prev in pairs.values():
            continue
        args = cur.value.args[1].fields
        if not args or not args[0].same_as(prev.var) or uses.get(prev.var, 0) != 1:
            continue
        moved = _bytes(prev.value.args[1].fields[0].ty) + _bytes(prev.var.ty)
        if moved < min_bytes or not kind(f_dw)[0] or not kind(f_pw)[1]:
            continue
        pairs[cur.var] = prev
    return pairs


def _merged_name(dw_name: str, pw_name: str) -> str:
    strip = lambda n: n[len(MERGED_PREFIX):] if n.startswith(MERGED_PREFIX) else n  # noqa: E731
    return f"{MERGED_PREFIX}{strip(dw_name)}_{strip(pw_name)}"


def merge_pairs(mod: Any, pairs: dict[Any, Any], func_name: str = "main") -> tuple[Any, dict[Any, str]]:
    """``mod`` with each pair's two calls replaced by one call of a merged PrimFunc; also each
    pair's merged PrimFunc name (by the pair's key). Needs an enclosing target context (FuseTIR)."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    producers = {prod.var for prod in pairs.values()}
    names: dict[Any, str] = {}

    def primitive(prod: Any, cons: Any) -> tuple[Any, list[Any]]:
        dw_args = list(prod.value.args[1].fields)
        pw_args = list(cons.value.args[1].fields)[1:]
        params = [relax.Var(f"p{i}", a.ty) for i, a in enumerate(dw_args + pw_args)]
        mid = relax.DataflowVar("mid", prod.var.ty)
        out = relax.Var("out", cons.var.ty)
        block = relax.DataflowBlock([
            relax.VarBinding(mid, relax.Call(call_tir, [prod.value.args[0], relax.Tuple(params[:len(dw_args)])],
                                             ty_args=prod.value.ty_args)),
            relax.VarBinding(out, relax.Call(call_tir, [cons.value.args[0], relax.Tuple([mid] + params[len(dw_args):])],
                                             ty_args=cons.value.ty_args)),
        ])
        func = relax.Function(params, relax.SeqExpr([block], out), cons.var.ty, is_pure=True)
        return func.with_attr("Primitive", True), dw_args + pw_args

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


def fuse_depthwise_pointwise(mod: Any, cfg: CpuScheduleConfig) -> Any:
    """Merge every fusable pair (:func:`find_pairs`) whose merged PrimFunc the rule schedules."""
    pairs = find_pairs(mod, cfg.fuse_dw_pw_min_bytes)
    while pairs:
        merged, names = merge_pairs(mod, pairs)
        failed = [var for var, name in names.items() if not _schedulable(merged[name], cfg)]
        if not failed:
            return merged
        pairs = {var: prod for var, prod in pairs.items() if var not in failed}
    return mod


def _schedulable(func: Any, cfg: CpuScheduleConfig) -> bool:
    from tvm import s_tir

    try:
        return schedule_depthwise_pointwise(s_tir.Schedule(func), func, cfg)
    except Exception:  # noqa: BLE001 -- a schedule error means "do not merge this pair"
        return False


def fuse_depthwise_pointwise_pass(cfg: CpuScheduleConfig | None = None) -> Any:
    """Module pass form of :func:`fuse_depthwise_pointwise` (``cfg`` None: from the target in
    scope, like the schedule rules)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApqFuseDepthwisePointwise")
    def _pass(mod: Any, _ctx: Any) -> Any:
        config = cfg or CpuScheduleConfig.for_target(tvm.target.Target.current())
        return fuse_depthwise_pointwise(mod, config)

    return _pass


def _tile_conv(sch: Any, conv: Any, outer: list[Any], geo: dict[str, int], cfg: CpuScheduleConfig) -> tuple[Any, Any]:
    """Conv2dNHWCRule's register tile on the loops ``outer`` + (x, f, ry, rx, rc) of ``conv``;
    returns (the channel-vector loop the epilogue goes to, the first reduction loop)."""
    lanes = cfg.lanes(32)
    x, f, ry, rx, rc = sch.get_loops(conv)[-5:]
    f_t, fv, w_t = choose_tile(geo, lanes, cfg.accumulators)
    fo, fvi, fl = sch.split(f, [None, fv, f_t])
    xo, xi = sch.split(x, [None, w_t])
    sch.reorder(*outer, xo, fo, ry, rx, rc, xi, fvi, fl)
    if geo["kh"] * geo["kw"] <= cfg.max_unrolled_taps:
        sch.unroll(ry)
        sch.unroll(rx)
    sch.unroll(xi)
    sch.unroll(fvi)
    sch.vectorize(fl)
    return fo, ry


def _epilogue_per_tile(sch: Any, block: Any, at_loop: Any, lanes: int) -> None:
    sch.reverse_compute_at(block, at_loop, preserve_unit_loops=False)
    vectorize_by_divisor(sch, sch.get_loops(block)[-1], lanes)


def schedule_depthwise_pointwise(sch: Any, func: Any, cfg: CpuScheduleConfig) -> bool:
    """Schedule a merged depthwise -> pointwise PrimFunc (module docstring); False if it is not one."""
    reds = [b for b in _blocks(sch) if "R" in _iter_kinds(sch, b)]
    if len(reds) != 2 or any(_iter_kinds(sch, b) != "SSSSRRR" for b in reds):
        return False
    dw, pw = reds
    if any(str(sch.get(b).writes[0].source.dtype) != "float32" for b in reds):
        return False
    g_dw, g_pw = nhwc_geometry(sch, dw), nhwc_geometry(sch, pw)
    if not g_dw or not g_pw or not g_dw["depthwise"] or g_pw["depthwise"] or g_pw["kh"] * g_pw["kw"] != 1:
        return False
    producers = sch.get_producers(pw)
    if len(producers) != 1:
        return False
    # ``mid`` writes what the pointwise conv reads: the depthwise epilogue (bias, ReLU6) after
    # inlining, or the depthwise conv itself when it has none.
    mid = producers[0]
    has_epilogue = sch.get(mid).name_hint != sch.get(dw).name_hint
    inline_elementwise(sch, func, keep=[dw, pw, mid])
    lanes = cfg.lanes(32)

    pw = Conv2dNCHWRule._accumulator(sch, func, pw)
    n, y = sch.get_loops(pw)[:2]
    row = sch.fuse(n, y)
    fo, ry = _tile_conv(sch, pw, [row], g_pw, cfg)
    if worth_parallel(cfg, _block_iterations(sch, pw) + 2 * _block_iterations(sch, dw), "mac"):
        sch.parallel(row)
    consumers = sch.get_consumers(pw)
    if len(consumers) != 1:
        return False
    _epilogue_per_tile(sch, consumers[0], fo, lanes)
    init = sch.decompose_reduction(pw, ry)
    sch.vectorize(sch.get_loops(init)[-1])

    if has_epilogue:
        sch.compute_at(mid, row, preserve_unit_loops=False)
    sch.compute_at(dw, row, preserve_unit_loops=True)
    if has_epilogue:
        sch.set_scope(dw, 0, "local")
    fo, ry = _tile_conv(sch, dw, [], g_dw, cfg)
    if has_epilogue:
        _epilogue_per_tile(sch, mid, fo, lanes)
    init = sch.decompose_reduction(dw, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    return True


__all__ = ["MERGED_PREFIX", "find_pairs", "fuse_depthwise_pointwise", "fuse_depthwise_pointwise_pass",
           "is_depthwise", "is_pointwise", "merge_pairs", "schedule_depthwise_pointwise"]
