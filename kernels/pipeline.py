"""The Relax compile pipeline apq uses for CPU targets: TVM's default one plus our schedules.

Why a pipeline and not a pass run before ``tvm.compile``: the schedules must see the fused
PrimFuncs, which only exist after ``LegalizeOps`` + ``FuseOps`` + ``FuseTIR`` inside the
pipeline, and must run before the dataflow is lowered to the VM. So we rebuild TVM's CPU
pipeline (``relax.backend.cpu_generic``) from its own pass groups and insert
``ApplyDefaultSchedule(<apq rules>)`` between legalization and dataflow lowering.
"""

from __future__ import annotations

import contextlib
from typing import Any

from apq.kernels.cpu_schedules import CpuScheduleConfig, make_rules

#: Relax/TIR op patterns (tvm/relax/op_attr_types.h) a PrimFunc's ``op_pattern`` attribute gives
#: FuseOps: "out-elementwise fusable" (a conv: its bias / activation / requantize fuse into it) and
#: "opaque" (nothing fuses into it).
OP_PATTERN_OUT_EWISE_FUSABLE = 4
OP_PATTERN_OPAQUE = 8


def schedule_pass(cfg: CpuScheduleConfig | None = None) -> Any:
    """The module pass that schedules every unscheduled PrimFunc with apq's CPU rules.

    Needs an enclosing target context (``with target:``) unless ``cfg`` is given.
    """
    from tvm.s_tir import dlight

    return dlight.ApplyDefaultSchedule(*make_rules(cfg))


def prepare_passes(target: Any, cfg: CpuScheduleConfig | None = None) -> list[Any]:
    """Dispatch + legalize + FuseOps + FuseTIR: the passes whose output apq schedules.

    Shared with kernels/tuning.py so MetaSchedule tunes exactly the PrimFuncs the build sees.
    TVM's own passes, preceded by a ``LegalizeOps`` whose ``relax.quantize`` is apq's exact
    division-free requantize (:mod:`apq.kernels.requantize`); TVM's ``LegalizeOps`` then finds
    nothing left to legalize. Before it, quantizes whose input is provably finite and bounded
    (every int8 layer's epilogue) lose their saturation clamp (:mod:`apq.kernels.requantize_bounds`).
    After FuseTIR, large depthwise blocks (expand ->) depthwise (-> project) become one PrimFunc
    (:mod:`apq.kernels.fuse_dw_pw`; ``cfg`` None: the target's config), and float accumulators
    start at their bias (:mod:`apq.kernels.bias_init`), and the inputs of packed int8 depthwise
    convs are written in their channel blocks (:mod:`apq.kernels.blocked_handoff`).
    """
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from apq.kernels.bias_init import bias_init_pass
    from apq.kernels.blocked_handoff import blocked_handoff_pass
    from apq.kernels.fuse_dw_pw import fuse_depthwise_chains_pass
    from apq.kernels.requantize import legalize_map
    from apq.kernels.requantize_bounds import drop_proven_clamps_pass

    return (cpu.library_dispatch_passes(target)
            + [drop_proven_clamps_pass(), relax.transform.LegalizeOps(customize_legalize_map=legalize_map())]
            + cpu.legalize_passes(target)
            + [fuse_depthwise_chains_pass(cfg or CpuScheduleConfig.for_target(target)), bias_init_pass(),
               blocked_handoff_pass()])


def fused_module(mod: Any, target: Any, cfg: CpuScheduleConfig | None = None) -> Any:
    """``mod`` after :func:`prepare_passes`: the PrimFuncs the build schedules (what knob tuning
    and MetaSchedule tune). ``cfg`` None: the target's config."""
    import tvm

    with target:
        return tvm.transform.Sequential(prepare_passes(target, cfg))(mod)


def relax_pipeline(target: Any, cfg: CpuScheduleConfig | None = None, schedule: bool = True,
                   database: Any | None = None, knobs: dict[str, dict[str, Any]] | None = None,
                   prepared: bool = False) -> Any:
    """TVM's default CPU Relax pipeline with apq's schedules inserted after FuseTIR.

    ``target`` is a ``tvm.target.Target``; ``schedule=False`` gives TVM's unscheduled pipeline
    (what apq compiled before, kept for A/B tests and benchmarks). ``database`` (a MetaSchedule
    database, kernels/tuning.py) is applied before apq's rules: tuned PrimFuncs are marked
    scheduled and keep their tuned loops, untuned ones still get apq's schedules. ``knobs``
    (kernels/knob_tuning.py: unscheduled PrimFunc key -> config overrides) schedules each listed
    PrimFunc with its knob-tuned config instead of ``cfg``; the others keep ``cfg``.
    ``prepared=True``: ``mod`` already went through :func:`prepare_passes` (knob tuning fused it
    to find its kernels; fusing again would repeat the constant folding, seconds per model).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    cfg = cfg or CpuScheduleConfig.for_target(target)
    if knobs:
        from apq.kernels.knob_tuning import knob_schedule_pass

        middle = [knob_schedule_pass(knobs, cfg)] if schedule else []
    else:
        middle = [schedule_pass(cfg)] if schedule else []

    @tvm.transform.module_pass(opt_level=0, name="ApqCpuPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target, (database if database is not None else contextlib.nullcontext()):
            tuned = [relax.transform.MetaScheduleApplyDatabase()] if database is not None else []
            seq = tvm.transform.Sequential(
                ([] if prepared else prepare_passes(target, cfg)) + tuned + middle
                + cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def supports(target: Any) -> bool:
    """apq's rules are for LLVM CPU targets (x86-64, AArch64)."""
    return str(target.kind.name) == "llvm"


def compile_relax(mod: Any, target: Any, schedule: bool = True, cfg: CpuScheduleConfig | None = None,
                  database: Any | None = None, knobs: dict[str, dict[str, Any]] | None = None,
                  prepared: bool = False) -> Any:
    """``tvm.compile`` with apq's CPU pipeline (the one-line hook build_library calls).

    The TIR side is TVM's default pipeline plus :mod:`apq.kernels.stack_alloc` (register tiles on
    the stack, not the heap) when apq schedules. ``database``: optional MetaSchedule tuning
    records applied before apq's rules. ``knobs``:
    optional per-PrimFunc config overrides from ``kernels.knob_tuning.knob_tune``. ``prepared``:
    ``mod`` is already fused (``kernels.knob_tuning.fused_module``).
    """
    import tvm

    from apq.kernels.stack_alloc import tir_pipeline

    if not supports(target):
        return tvm.compile(mod, target)
    return tvm.compile(mod, target, relax_pipeline=relax_pipeline(target, cfg, schedule, database, knobs, prepared),
                       tir_pipeline=tir_pipeline() if schedule else "default")
