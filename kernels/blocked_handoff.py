"""Producers of a packed int8 depthwise conv's input write it in the conv's channel blocks.

Why: the ``vpdpbusd`` depthwise kernel (kernels/x86_int8_depthwise.py) reads 4 pixels of 16
channels as one 64-byte load, so it copies its NHWC input into channel blocks ``[N, C/L, H, W, L]``
first. From NHWC that copy moves one 16-byte piece per load and store, each from another cache
line: measured standalone (1 thread, interleaved), the copy was 40-60% of a stride-2 conv's time
(112 px, 64 channels: 61 us with it, 30 us on an input already in blocks). But the tensor has one
reader, and its producer (the expansion conv before it, with its requantize epilogue) writes 16
channels of one pixel per vector store whichever layout it writes. So after FuseTIR this pass
changes the tensor's layout on both sides: the producer's output buffer and the conv's input
buffer get the index map ``(n, y, x, c) -> (n, c / L, y, x, c % L)`` (``Schedule.transform_layout``
on the unscheduled PrimFuncs), and the Relax ``call_tir`` between them carries the 5-D shape. The
conv's padded copy then reads whole rows of a block in order.

The values are untouched (a relayout of one tensor between two kernels): outputs are
bit-identical. Each rewritten call gets its own copies of the two PrimFuncs (``..._blocked``), as
a PrimFunc may be shared by call sites whose tensors keep NHWC.
"""

from __future__ import annotations

from typing import Any

#: Suffix of the PrimFunc copies whose interface tensor is in channel blocks.
BLOCKED_SUFFIX = "_blocked"


def depthwise_lanes(func: Any) -> int | None:
    """The channel block width of a packed depthwise PrimFunc (its copy's last axis), else None."""
    import tvm_ffi
    from tvm import s_tir

    from apq.kernels.x86_int8_depthwise import DEPTHWISE_BLOCK, PADDED_BLOCK

    blocks: dict[str, Any] = {}

    def on_block(block: Any) -> None:  # the walker takes None (or a WalkResult) back
        blocks.setdefault(str(block.name_hint), block)

    tvm_ffi.structural_walk(func.body, [(s_tir.SBlock, on_block)])
    copy = blocks.get(PADDED_BLOCK)
    if DEPTHWISE_BLOCK not in blocks or copy is None or len(copy.writes) != 1:
        return None
    return int(copy.writes[0].source.shape[-1])


def _static_shape(ty: Any) -> list[int] | None:
    try:
        return [int(d) for d in ty.shape]
    except (AttributeError, TypeError, ValueError):
        return None


def _with_blocked_param(func: Any, param_index: int, lanes: int) -> Any | None:
    """``func`` with its ``param_index``-th (4-D NHWC) buffer stored as ``[N, C/L, H, W, L]``, or
    None when TVM refuses (e.g. no block accesses it)."""
    from tvm import s_tir

    buf = func.params[param_index]  # TVM 0.27: PrimFunc params are the buffers
    sch = s_tir.Schedule(func)
    blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
    for block in blocks:
        stmt = sch.get(block)
        if any(r.source.same_as(buf) for r in list(stmt.reads) + list(stmt.writes)):
            try:
                sch.transform_layout(block, buf.name, lambda n, y, x, c: (n, c // lanes, y, x, c % lanes))
            except Exception:  # noqa: BLE001 -- TVM's schedule errors: keep NHWC
                return None
            return sch.mod["main"]
    return None


def find_handoffs(mod: Any, func_name: str = "main") -> list[tuple[Any, Any, int]]:
    """``(producer binding, depthwise binding, lanes)`` for each ``a = call_tir(f, ...)`` whose only
    use is as the data of a packed depthwise ``call_tir`` (4-D uint8, channels a multiple of the
    conv's block)."""
    import tvm
    from tvm import relax

    func = mod[func_name]
    if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
        return []
    from apq.kernels.fuse_dw_pw import bindings_and_uses

    call_tir = tvm.ir.Op.get("relax.call_tir")
    bindings, uses = bindings_and_uses(func)
    producers = {b.var: b for b in bindings
                 if isinstance(b.value, relax.Call) and b.value.op.same_as(call_tir)}
    found = []
    for binding in bindings:
        value = binding.value
        if not (isinstance(value, relax.Call) and value.op.same_as(call_tir)):
            continue
        lanes = depthwise_lanes(mod[value.args[0]])
        args = value.args[1].fields
        if lanes is None or not args or args[0] not in producers or uses.get(args[0], 0) != 1:
            continue
        prod = producers[args[0]]
        shape = _static_shape(prod.var.ty)
        if shape is None or len(shape) != 4 or shape[3] % lanes or str(prod.var.ty.dtype) != "uint8":
            continue
        found.append((prod, binding, lanes))
    return found


def hand_over_blocked(mod: Any, func_name: str = "main") -> tuple[Any, int]:
    """Rewrite every :func:`find_handoffs` pair (module docstring); returns (mod, count)."""
    import tvm
    from tvm import relax

    handoffs = find_handoffs(mod, func_name)
    plans: dict[Any, tuple[Any, Any, Any]] = {}  # producer var -> (new producer func, new dw func, 5-D type)
    for prod, cons, lanes in handoffs:
        new_prod = _with_blocked_param(mod[prod.value.args[0]], -1, lanes)
        new_cons = _with_blocked_param(mod[cons.value.args[0]], 0, lanes)
        if new_prod is None or new_cons is None:
            continue
        n, h, w, c = _static_shape(prod.var.ty)
        plans[prod.var] = (new_prod, new_cons, relax.TensorType([n, c // lanes, h, w, lanes], "uint8"))
    if not plans:
        return mod, 0
    call_tir = tvm.ir.Op.get("relax.call_tir")
    consumers = {cons.var: prod.var for prod, cons, _ in handoffs if prod.var in plans}

    @relax.expr_functor.mutator
    class _Handoff(relax.PyExprMutator):
        def _retargeted(self, value: Any, func: Any, ty_args: Any) -> Any:
            """``value``'s call_tir, calling ``func`` (added as ``<callee>_blocked``) instead."""
            gvar = self.builder_.add_func(func, value.args[0].name_hint + BLOCKED_SUFFIX)
            args = [self.visit_expr(a) for a in value.args[1].fields]
            return relax.Call(call_tir, [gvar, relax.Tuple(args)], ty_args=ty_args)

        def visit_var_binding_(self, binding: Any) -> None:
            if binding.var in plans:  # a new variable: its type is the 5-D one
                new_prod, _, ty = plans[binding.var]
                call = self._retargeted(binding.value, new_prod, [ty])
                self.set_var_remap(binding.var, self.builder_.emit(call, binding.var.name))
            elif binding.var in consumers:
                new_cons = plans[consumers[binding.var]][1]
                call = self._retargeted(binding.value, new_cons, binding.value.ty_args)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(call)))
            else:
                super().visit_var_binding_(binding)

    mutator = _Handoff(mod)
    mutator.builder_.update_func(mod.get_global_var(func_name), mutator.visit_expr(mod[func_name]))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get()), len(plans)


def blocked_handoff_pass() -> Any:
    """Module pass form of :func:`hand_over_blocked` (kernels/pipeline.py ``prepare_passes``)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="ApqBlockedDepthwiseHandoff")
    def _pass(mod: Any, _ctx: Any) -> Any:
        return hand_over_blocked(mod)[0]

    return _pass


__all__ = ["BLOCKED_SUFFIX", "blocked_handoff_pass", "depthwise_lanes", "find_handoffs", "hand_over_blocked"]
