"""Knob tuning: apq's schedule rules with a small per-kernel knob space, tuned in seconds, cached.

Why this exists: apq's CPU schedules (kernels/cpu_schedules.py) are analytic and fixed, one
:class:`CpuScheduleConfig` per target, and MetaSchedule (kernels/tuning.py) costs minutes per
model. Between the two: for every fused PrimFunc of a model, schedule it with a handful of config
variants (tile sizes, padding placement, GEMV streaming), build each variant alone, time it on
random inputs with TVM's ``time_evaluator``, check it computes the same as the default variant,
and keep the fastest only when it beats the default by a margin. A few seconds per kernel.

Why per PrimFunc, not per model: a tile that suits a 56x56 depthwise conv need not suit a 7x7
one; the rules take their knobs from a config, so choosing a config per function is all the
build needs (:func:`knob_schedule_pass`).

Why a cache keyed by the unscheduled PrimFunc: the fused PrimFunc's structure (its structural
hash) fixes the op, shapes and dtypes (hence the bit-widths), and the key spells the buffer
signature out for humans. One JSON file per target (``<cache>/knobs/<target key>.json``): a second
compile, or another model sharing a layer shape, reuses the choice with no timing at all.

Knob-tuned choices are only timed on this machine: :func:`knob_tune_for_target` refuses targets
whose code cannot run here (cross-compiled boards, the simulator's non-LLVM targets).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apq.kernels.interleaved import interleaved_samples
from apq.kernels.json_cache import read_entries, write_entries
from apq.kernels.pipeline import fused_module
from apq.kernels.cpu_schedules import RULES, CpuScheduleConfig
from apq.toolchain.errors import InvalidInputError

CACHE_VERSION = 1


@dataclass(frozen=True)
class Scaled:
    """A knob value relative to the base config's own (an int field times ``factor``), for knobs
    whose sensible values depend on the target, e.g. cache-sized blocks: the base already derives
    them from the target's L2 (``CpuScheduleConfig.with_l2_cache``). Resolved to an absolute value
    before a choice is recorded (:func:`resolve_overrides`)."""

    factor: float

    def of(self, value: int) -> int:
        return max(1, int(value * self.factor))


#: Knob variants per rule (``RULES`` name), as overrides of the target's default config. Each list
#: is small on purpose (seconds per kernel); variants that schedule a function into the same code
#: as another (e.g. depthwise knobs on a pointwise conv) are timed once. Fields the installed
#: CpuScheduleConfig does not have are dropped (:func:`variant_config`).
KNOB_SPACE: dict[str, tuple[dict[str, Any], ...]] = {
    "conv2d-nchw": (
        {"max_oc_tile": 4},
        {"max_oc_tile": 16},
        {"max_row_tile": 1},
        {"max_row_tile": 2},
        {"dw_max_row_tile": 4},
        {"dw_max_oc_tile": 2, "dw_max_row_tile": 4},
        {"per_channel_padding": False},
        {"partition_padding": True},
    ),
    # rows per expansion block of a merged block (kernels/fuse_dw_pw.py): 8 vs 14 rows measured
    # within noise on the 224 px MobileNetV2's second block; a merged pair without an expansion
    # schedules the same under each, so nothing is timed for it
    "dw-chain-nhwc": (
        {"fuse_block_bytes": Scaled(0.5)},
        {"fuse_block_bytes": Scaled(2.0)},
    ),
    "matmul": (
        {"gemv_stream": False},
        {"vector_bits": 256},
    ),
    "generic": (
        {"vector_bits": 256},
    ),
}


@dataclass
class KnobTuneConfig:
    """How knob candidates are timed and when one replaces the default.

    ``threads``: TVM runtime threads while timing (1: the benches' single-thread setting, and the
    least noisy on a shared machine). ``number``/``min_repeat_ms``/``repeat``: ``time_evaluator``'s
    arguments per round; ``rounds`` alternates the candidates' order so drift hits all of them;
    each candidate's time is its best repeat over all rounds. ``min_gain``: a variant is kept only
    if ``best <= default * (1 - min_gain)`` (3% is above the side-by-side noise here).
    """

    threads: int = 1
    number: int = 1
    repeat: int = 3
    min_repeat_ms: int = 10
    rounds: int = 3
    min_gain: float = 0.03

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "KnobTuneConfig":
        return KnobTuneConfig(**d)

    def validate(self) -> None:
        if not 0.0 <= self.min_gain < 1.0:
            raise InvalidInputError(f"knob-tune min_gain must be in [0, 1), got {self.min_gain}")
        if min(self.threads, self.number, self.repeat, self.rounds) < 1 or self.min_repeat_ms < 0:
            raise InvalidInputError("knob-tune threads, number, repeat and rounds must be >= 1, min_repeat_ms >= 0")


@dataclass
class KnobChoice:
    """One PrimFunc's decision: the overrides the build applies ({} = the default config).

    ``times_ms``: best time per distinct candidate, keyed by its overrides as JSON; ``rule``: the
    rule that schedules it by default (the op kind); ``signature``: its buffers' dtypes and shapes.
    """

    name: str
    rule: str
    signature: str
    overrides: dict[str, Any]
    default_ms: float | None
    best_ms: float | None
    candidates: int
    times_ms: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.overrides)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "source": "measured"}  # the *_ms are timings of compiled kernels here

    @staticmethod
    def from_json(d: dict[str, Any]) -> "KnobChoice":
        names = {f.name for f in dataclasses.fields(KnobChoice)}
        return KnobChoice(**{k: v for k, v in d.items() if k in names})


@dataclass
class KnobTuneReport:
    """What one tune did: ``timed`` kernels were measured now, ``cached`` came from the file."""

    cache_file: str
    kernels: int
    cached: int
    timed: int
    changed: int
    seconds: float
    choices: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 3)
        return d


# --------------------------------------------------------------------------- configs and keys


def resolve_overrides(base: CpuScheduleConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with every :class:`Scaled` value made absolute against ``base``."""
    return {k: (v.of(getattr(base, k)) if isinstance(v, Scaled) else v) for k, v in overrides.items()}


def variant_config(base: CpuScheduleConfig, overrides: dict[str, Any]) -> CpuScheduleConfig:
    """``base`` with the overrides the installed CpuScheduleConfig knows (others ignored)."""
    known = {f.name for f in dataclasses.fields(CpuScheduleConfig)}
    return dataclasses.replace(base, **{k: v for k, v in resolve_overrides(base, overrides).items() if k in known})


@functools.lru_cache(maxsize=32)
def space_fingerprint(base: CpuScheduleConfig) -> str:
    """A short hash of what a choice was measured against: :data:`KNOB_SPACE`, the target's default
    config and the schedule rules' source. Changing any of them invalidates cached choices (they
    would still build correct code, but the comparison that picked them no longer holds)."""
    from apq.kernels import cpu_schedules

    rules_src = Path(cpu_schedules.__file__).read_bytes()
    blob = json.dumps({"space": {k: list(v) for k, v in KNOB_SPACE.items()}, "base": base.to_json(),
                       "rules": hashlib.sha256(rules_src).hexdigest()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def signature(func: Any) -> str:
    """Human-readable buffer signature, e.g. ``float32[1x4x8x8],float32[8x4x3x3]``."""
    parts = []
    for p in func.params:
        buf = p  # TVM 0.27: PrimFunc params are the buffers themselves
        shape = "x".join(str(int(s)) if hasattr(s, "value") else str(s) for s in getattr(buf, "shape", ()))
        parts.append(f"{buf.dtype}[{shape}]")
    return ",".join(parts)


def func_key(func: Any, space: str) -> str:
    """Cache key of an unscheduled PrimFunc: signature + structural hash + ``space`` (a
    :func:`space_fingerprint`).

    The structural hash covers the op, shapes and dtypes; the function's symbol name is dropped
    first so the same layer shape in another model (``fused_conv2d_add1``) maps to the same key.
    """
    from tvm_ffi import structural_hash

    if func.attrs is not None and "global_symbol" in func.attrs:
        func = func.without_attr("global_symbol")
    return f"{signature(func)}|{structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}|{space}"


def target_key(target: Any) -> str:
    """A short stable hash of the target's canonical JSON (TVM's export fills in defaults)."""
    import tvm

    if hasattr(target, "tvm_target"):
        target = target.tvm_target
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    blob = json.dumps(dict(target.export()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the cache file


def cache_file(target: Any, cache_dir: Path | None = None) -> Path:
    """``<cache>/knobs/<target key>.json``, cache = apq.toolchain.cache_dir.cache_root."""
    from apq.toolchain.cache_dir import cache_root

    return cache_root(cache_dir) / "knobs" / f"{target_key(target)}.json"


def load_cache(path: Path) -> dict[str, KnobChoice]:
    """Choices by key ({} when the file is missing, unreadable or of another version)."""
    return {k: KnobChoice.from_json(v) for k, v in read_entries(path, CACHE_VERSION).items()}


def save_cache(path: Path, new: dict[str, KnobChoice], target: Any | None = None) -> None:
    """Merge ``new`` into the file under its lock, written atomically (kernels/json_cache.py)."""
    write_entries(path, {k: c.to_json() for k, c in new.items()}, CACHE_VERSION, target)


# --------------------------------------------------------------------------- scheduling


def schedule_with(func: Any, target: Any, cfg: CpuScheduleConfig) -> tuple[Any | None, str | None]:
    """(scheduled PrimFunc, rule name) as ``dlight.ApplyDefaultSchedule`` with ``cfg`` would give.

    Same rules in the same order (first one that returns a schedule wins): what is timed here is
    what the build runs.
    """
    for name, rule_cls in RULES.items():
        sch = rule_cls(cfg).apply(func, target, False)
        if sch is not None:
            return sch.mod["main"].with_attr("tirx.is_scheduled", True), name
    return None, None


def _is_scheduled(func: Any) -> bool:
    return func.attrs is not None and "tirx.is_scheduled" in func.attrs and int(func.attrs["tirx.is_scheduled"]) == 1


def knob_schedule_pass(choices: dict[str, dict[str, Any]], cfg: CpuScheduleConfig | None = None) -> Any:
    """Module pass: schedule each unscheduled PrimFunc with its chosen overrides (else the default).

    ``choices`` maps :func:`func_key` to overrides. Needs an enclosing target context unless
    ``cfg`` is given (the default config is derived from the target, as ``schedule_pass`` does).
    """
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="ApqKnobSchedule")
    def _pass(mod: Any, _ctx: Any) -> Any:
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs is not None else None
            target = target or tvm.target.Target.current(allow_none=False)
            base = cfg or CpuScheduleConfig.for_target(target)
            over = choices.get(func_key(func, space_fingerprint(base)), {}) if choices else {}
            sched, _ = schedule_with(func, target, variant_config(base, over))
            if sched is None and over:  # a stale choice the rules no longer accept: the default
                sched, _ = schedule_with(func, target, base)
            if sched is not None:
                updated[gv] = sched
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _pass


# --------------------------------------------------------------------------- timing


def _random_args(func: Any, seed: int) -> list[Any]:
    """Numpy arrays for every buffer parameter: random inputs, zero outputs.

    int64 buffers are zero (they are indices or shapes in a CNN; random ones could read out of
    bounds); int32 stays within +-2^15 so sums cannot overflow differently per schedule.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for p in func.params:
        buf = p  # TVM 0.27: PrimFunc params are the buffers themselves
        shape, dtype = tuple(int(s) for s in buf.shape), str(buf.dtype)
        if dtype.startswith("float"):
            a = rng.uniform(-1.0, 1.0, shape).astype(dtype)
        elif dtype == "int64" or dtype == "bool":
            a = np.zeros(shape, dtype)
        else:
            info = np.iinfo(dtype)
            lo, hi = max(int(info.min), -(1 << 15)), min(int(info.max), 1 << 15)
            a = rng.integers(lo, hi, shape, endpoint=True).astype(dtype)
        arrays.append(a)
    return arrays


def _build(func: Any, target: Any) -> Any:
    import tvm

    from apq.kernels.stack_alloc import tir_pipeline

    # the Executable's host module is an LLVM runtime module: runnable here, and it has time_evaluator;
    # the TIR pipeline is the one the model build uses (kernels/pipeline.py), so the timed code is the same
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target,
                       tir_pipeline=tir_pipeline()).mod


def _outputs_match(ref: list[Any], got: list[Any]) -> bool:
    """Integer buffers exact, float ones within 1e-5 (relative to the reference's magnitude)."""
    import numpy as np

    for a, b in zip(ref, got):
        if a.dtype.kind == "f":
            if not np.array_equal(np.isnan(a), np.isnan(b)):
                return False
            fa, fb = np.nan_to_num(a.astype(np.float64)), np.nan_to_num(b.astype(np.float64))
            scale = max(1.0, float(np.abs(fa).max(initial=0.0)))
            if float(np.abs(fa - fb).max(initial=0.0)) > 1e-5 * scale:
                return False
        elif not np.array_equal(a, b):
            return False
    return True


def time_candidates(funcs: list[Any], target: Any, cfg: KnobTuneConfig, seed: int = 0) -> list[float | None]:
    """Best milliseconds of each scheduled PrimFunc on shared random inputs (None: failed/wrong).

    ``funcs[0]`` is the default schedule: every other candidate must reproduce its outputs
    (:func:`_outputs_match`) or it is rejected. Candidates are timed in ``cfg.rounds`` passes in
    alternating order with ``time_evaluator``; a candidate's time is its best repeat.
    """
    import tvm

    dev = tvm.cpu()
    inputs = _random_args(funcs[0], seed)
    ready: dict[int, tuple[Any, list[Any]]] = {}
    ref: list[Any] | None = None
    for i, func in enumerate(funcs):
        try:
            lib = _build(func, target)
            args = [tvm.runtime.tensor(a, dev) for a in inputs]
            lib["main"](*args)
            outs = [a.numpy() for a in args]
        except Exception:  # noqa: BLE001 -- a variant that fails to build or run is no candidate
            if i == 0:
                return [None] * len(funcs)
            continue
        if i == 0:
            ref = outs
        elif ref is None or not _outputs_match(ref, outs):
            continue
        ready[i] = (lib, args)
    def best_repeat_ms(i: int) -> float:
        lib, args = ready[i]
        ev = lib.time_evaluator("main", dev, number=cfg.number, repeat=cfg.repeat, min_repeat_ms=cfg.min_repeat_ms)
        return min(ev(*args).results) * 1e3

    samples = interleaved_samples(list(ready), cfg.rounds, best_repeat_ms)
    return [min(samples[i]) if samples.get(i) else None for i in range(len(funcs))]


# --------------------------------------------------------------------------- tuning


def tune_function(func: Any, name: str, target: Any, base: CpuScheduleConfig, cfg: KnobTuneConfig,
                  measure: Callable[..., list[float | None]] | None = None) -> KnobChoice | None:
    """Schedule ``func`` with every variant of its rule's knob space, time the distinct ones,
    and choose; None when apq's rules do not schedule it at all."""
    from tvm_ffi import structural_hash

    default, rule = schedule_with(func, target, base)
    if default is None or rule is None:
        return None
    cands: list[tuple[dict[str, Any], Any]] = [({}, default)]
    seen = {structural_hash(default)}
    for over in (resolve_overrides(base, o) for o in KNOB_SPACE.get(rule, ())):
        vcfg = variant_config(base, over)
        if vcfg == base:
            continue
        sched, _ = schedule_with(func, target, vcfg)
        if sched is None or structural_hash(sched) in seen:
            continue  # same code as an earlier candidate: nothing new to time
        seen.add(structural_hash(sched))
        cands.append((over, sched))
    sig = signature(func)
    if len(cands) == 1:  # the knobs do not change this kernel: nothing to time
        return KnobChoice(name, rule, sig, {}, None, None, 1)
    times = (measure or time_candidates)([s for _, s in cands], target, cfg)
    default_ms = times[0]
    pick = 0
    if default_ms is not None:
        for i, t in enumerate(times[1:], start=1):
            if t is not None and t <= default_ms * (1.0 - cfg.min_gain) and t < (times[pick] or float("inf")):
                pick = i
    return KnobChoice(name, rule, sig, dict(cands[pick][0]), _round(default_ms), _round(times[pick]), len(cands),
                      {json.dumps(o, sort_keys=True): _round(t) for (o, _), t in zip(cands, times) if t is not None})


def knob_tune(mod: Any, target: Any, cfg: KnobTuneConfig | None = None, cache_dir: Path | None = None,
              progress: bool = True, measure: Callable[..., list[float | None]] | None = None,
              prepared: bool = False, schedule_cfg: CpuScheduleConfig | None = None,
              ) -> tuple[dict[str, dict[str, Any]], KnobTuneReport]:
    """Knob-tune every fused PrimFunc of Relax ``mod`` for ``target`` (a ``tvm.target.Target``).

    Returns ``(choices, report)``: ``choices`` maps :func:`func_key` to overrides, what
    :func:`knob_schedule_pass` (``compile_relax(..., knobs=choices)``) applies. Functions already
    in the target's cache file are not timed again. ``measure`` replaces :func:`time_candidates`
    (tests count its calls). ``prepared``: ``mod`` is already :func:`fused_module`'s output.
    ``schedule_cfg``: the build's CpuScheduleConfig (None: the target's), the base every variant
    overrides; :func:`knob_schedule_pass` must get the same one, or the keys do not match.
    """
    from tqdm import tqdm
    from tvm import tirx

    cfg = cfg or KnobTuneConfig()
    cfg.validate()
    t0 = time.perf_counter()
    path = cache_file(target, cache_dir)
    cached = load_cache(path)
    base = schedule_cfg or CpuScheduleConfig.for_target(target)
    space = space_fingerprint(base)
    fused = mod if prepared else fused_module(mod, target, schedule_cfg)
    funcs = [(gv.name_hint, f) for gv, f in fused.functions_items()
             if isinstance(f, tirx.PrimFunc) and not _is_scheduled(f)]
    new: dict[str, KnobChoice] = {}
    chosen: dict[str, KnobChoice] = {}
    restore = _set_threads(cfg.threads)
    try:
        for name, func in tqdm(funcs, desc="apq knob-tune", unit="kernel", disable=None if progress else True,
                               leave=False):
            key = func_key(func, space)
            if key in cached or key in new:
                chosen[key] = cached.get(key) or new[key]
                continue
            with target:
                choice = tune_function(func, name, target, base, cfg, measure)
            if choice is not None:
                new[key] = chosen[key] = choice
    finally:
        _set_threads(restore)
    if new:
        save_cache(path, new, target)
    timed = sum(1 for c in new.values() if c.candidates > 1)
    report = KnobTuneReport(str(path), len(funcs), len(funcs) - len(new), timed,
                            sum(1 for c in chosen.values() if c.changed), time.perf_counter() - t0,
                            [c.to_json() for c in chosen.values()])
    return {k: c.overrides for k, c in chosen.items() if c.changed}, report


def tunable(spec: Any) -> bool:
    """Knob tuning times kernels on this machine: only native LLVM CPU targets qualify."""
    return not spec.is_cross and spec.tvm_target.get("kind") == "llvm" and spec.executor == "local"


def check_tunable(spec: Any) -> None:
    """Raise the one-line user error for a target whose kernels cannot be timed on this machine."""
    if not tunable(spec):
        raise InvalidInputError(f"cannot knob-tune for target {spec.name}: knob tuning times kernels on this "
                                "machine, so it needs the local host target")


def knob_tune_for_target(mod: Any, spec: Any, cfg: KnobTuneConfig | None = None, cache_dir: Path | None = None,
                         progress: bool = True, prepared: bool = False) -> tuple[dict[str, dict[str, Any]], KnobTuneReport]:
    """:func:`knob_tune` for an apq TargetSpec (with the config its builds schedule with,
    :meth:`CpuScheduleConfig.for_spec`), refusing targets whose kernels cannot be timed here."""
    check_tunable(spec)
    return knob_tune(mod, spec.tvm(), cfg, cache_dir, progress, prepared=prepared,
                     schedule_cfg=CpuScheduleConfig.for_spec(spec))


def _set_threads(threads: int) -> int:
    """Set the TVM runtime's thread count; returns the previous one (to restore it).

    Through :func:`apq.toolchain.profile.set_runtime_threads`: ``config_threadpool`` alone cannot
    grow TVM's pool past its ``TVM_NUM_THREADS`` cap (1 on a 2-core x86 machine by default), so
    ``threads=2`` silently timed 1 thread before.
    """
    import tvm

    from apq.toolchain.profile import set_runtime_threads

    prev = int(tvm.get_global_func("runtime.NumThreads")())
    set_runtime_threads(int(threads))
    return prev


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 6)
