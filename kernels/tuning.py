"""Optional MetaSchedule tuning of the fused PrimFuncs of a final artifact, with a per-target cache.

Why optional: apq's own schedules (kernels/cpu_schedules.py) compile a model in seconds and are
what the search measures; MetaSchedule finds faster loops for a *final* artifact but costs minutes
(TVM_NOTES.md: the builder is the bottleneck). Why a per-target database on disk: tuning records
are keyed by the PrimFunc's structure, so a second compile of the same model (or of another model
sharing layer shapes) reuses them and runs zero new trials -- that is what makes tuning usable.

Why tune the module after apq's own legalize/fuse passes (``pipeline.prepare_passes``): the
records must match the exact fused PrimFuncs the build later looks up with
``MetaScheduleApplyDatabase``; tuning anything else would produce records that never hit.

Why the build does not get the database itself but only the records that beat apq's schedule
(kernels/tuning_choice.py): at small budgets MetaSchedule's best record is often slower than apq's
rules (32 trials over 24 tasks made MobileNetV2 at 32 px 3.7x slower); a tune must never make a
model slower by choice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from apq.kernels.tuning_choice import (TUNED, RunnerConfig, build_candidate, chosen_database, decide, load_choices,
                                       workload_key)
from apq.toolchain.errors import InvalidInputError


@dataclass
class TuneConfig:
    """How much to tune, and when a tuned record may replace apq's schedule.

    ``trials`` is the global MetaSchedule budget for one module (raised to one trial per untuned
    task, see ``trial_budget``). ``max_workers`` is 1 by default: the machines apq runs on have 2
    cores, and each builder worker imports TVM (~5 s) and competes with the runner that is timing
    candidates. ``builder``: a key of ``BUILDERS``. ``min_gain``: a record is applied only if it
    runs at least this much faster than apq's own schedule of the same PrimFunc
    (kernels/tuning_choice.py); 3% is a margin for the runner's noise, not yet calibrated against
    repeated side-by-side runs. ``threads``, ``min_repeat_ms`` and ``rounds``
    configure MetaSchedule's runner, the same for the search and for that comparison.
    """

    trials: int = 0
    max_workers: int = 1
    seed: int = 0
    builder_timeout_s: float = 180.0
    min_gain: float = 0.03
    builder: str = "in-process"
    threads: int = 1
    min_repeat_ms: int = 100
    rounds: int = 3

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "TuneConfig":
        return TuneConfig(**d)

    def validate(self) -> None:
        if self.trials < 0:
            raise InvalidInputError(f"tune trials must be >= 0, got {self.trials}")
        if self.max_workers < 1:
            raise InvalidInputError(f"tune max_workers must be >= 1, got {self.max_workers}")
        if self.builder not in BUILDERS:
            raise InvalidInputError(f"unknown tune builder {self.builder!r}; known: {sorted(BUILDERS)}")
        if not 0.0 <= self.min_gain < 1.0:
            raise InvalidInputError(f"tune min_gain must be in [0, 1), got {self.min_gain}")
        if self.threads < 0 or self.rounds < 1 or self.min_repeat_ms < 1:
            raise InvalidInputError(f"tune threads must be >= 0 and rounds, min_repeat_ms >= 1, got "
                                    f"{self.threads}, {self.rounds}, {self.min_repeat_ms}")

    def runner_config(self) -> RunnerConfig:
        return RunnerConfig(min_repeat_ms=self.min_repeat_ms, threads=self.threads, rounds=self.rounds)


@dataclass
class TuneReport:
    """What one ``tune_module`` call did (``new_records == 0`` means no new trials ran).

    ``choices``: per task, apq's and the best record's time and which one the build uses
    (``TaskChoice.to_json``); ``measured_tasks``: how many of them were timed by this call (the
    others came from the saved choices).
    """

    database_dir: str
    tasks: int
    cached_tasks: int
    tuned_tasks: int
    records_before: int
    records_after: int
    seconds: float
    measured_tasks: int = 0
    choices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def new_records(self) -> int:
        return self.records_after - self.records_before

    @property
    def chosen_tuned(self) -> int:
        """Tasks whose tuned record beat apq's schedule by the margin (the rest keep apq's)."""
        return sum(1 for c in self.choices if c["chosen"] == TUNED)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["new_records"] = self.new_records
        d["chosen_tuned"] = self.chosen_tuned
        d["seconds"] = round(self.seconds, 3)
        return d


def _target_dict(target: Any) -> dict[str, Any]:
    """The target's canonical JSON dict (from a TargetSpec, a ``tvm.target.Target`` or a dict).

    Canonical = TVM's own export, which fills in defaults (keys, features): a spec and the
    ``tvm.target.Target`` built from it must map to the same database.
    """
    import tvm

    if hasattr(target, "tvm_target"):
        target = target.tvm_target
    if isinstance(target, dict):
        target = tvm.target.Target(target)
    return dict(target.export())


def target_key(target: Any) -> str:
    """A short stable hash of the target's JSON dict: the cache sub-folder of its records."""
    blob = json.dumps(_target_dict(target), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def database_dir(target: Any, cache_dir: Path | None = None) -> Path:
    """``<cache>/tuning/<target key>``, cache = apq.toolchain.cache_dir.cache_root."""
    from apq.toolchain.cache_dir import cache_root

    return cache_root(cache_dir) / "tuning" / target_key(target)


def open_database(target: Any, cache_dir: Path | None = None, create: bool = True) -> Any | None:
    """The target's JSON database, or None when it does not exist and ``create`` is False."""
    from tvm.s_tir import meta_schedule as ms

    d = database_dir(target, cache_dir)
    if not create and not (d / "database_tuning_record.json").exists():
        return None
    d.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(d))


def count_records(db: Any) -> int:
    return len(db.get_all_tuning_records())


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One tuner per target database at a time (JSONDatabase appends lines, two writers interleave)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tasks(fused: Any, target: Any) -> list[Any]:
    """MetaSchedule tasks of the fused module, minus PrimFuncs apq already scheduled by hand."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    def scheduled(task: Any) -> bool:
        attrs = task.dispatched[0]["main"].attrs
        return attrs is not None and bool(attrs.get("tirx.is_scheduled", False))

    return [t for t in extract_tasks(fused, target) if not scheduled(t)]


def tune_module(mod: Any, target: Any, cfg: TuneConfig, cache_dir: Path | None = None,
                progress: bool = True, schedule_cfg: Any = None, prepared: bool = False) -> tuple[Any, TuneReport]:
    """Tune ``mod``'s fused PrimFuncs for ``target``; returns (database of the chosen records, report).

    Three steps under the target database's lock: (1) MetaSchedule searches the tasks that have
    neither a record nor a saved choice; (2) every task whose best record is new to the choice book
    is timed side by side against apq's own schedule (kernels/tuning_choice.py); (3) the returned
    in-memory database holds only the records that won by ``cfg.min_gain``, so applying it can
    replace a PrimFunc only with a faster one. Recompiling the same model runs no trials and
    measures nothing. ``target`` is a ``tvm.target.Target`` (LLVM CPU; candidates run here).
    ``schedule_cfg``: the build's CpuScheduleConfig (None: the target's), so the tasks are the
    PrimFuncs the build fuses (e.g. with ``fuse_blocks`` off). ``prepared``: ``mod`` is already
    ``pipeline.fused_module``'s output (fusing costs seconds per float model: do it once per build).
    """
    from apq.kernels.pipeline import fused_module

    cfg.validate()
    t0 = time.perf_counter()
    d = database_dir(target, cache_dir)
    with _locked(d):
        db = open_database(target, cache_dir)
        before = count_records(db)
        tasks = _tasks(mod if prepared else fused_module(mod, target, schedule_cfg), target)
        book = load_choices(d)
        missing = [t for t in tasks if workload_key(t.dispatched[0]) not in book
                   and db.query_tuning_record(t.dispatched[0], target, t.task_name) is None]
        if missing and cfg.trials > 0:
            _print(progress, f"apq-tune: {len(missing)}/{len(tasks)} tasks untuned, {cfg.trials} trials "
                             f"-> {d}")
            _search(missing, db, cfg)
        after = count_records(db)
        with contextlib.redirect_stdout(sys.stderr):
            choices, measured = decide(tasks, db, target, d, cfg.min_gain, cfg.runner_config(), schedule_cfg)
        chosen = chosen_database(tasks, choices, db, target)
    report = TuneReport(str(d), len(tasks), len(tasks) - len(missing),
                        len(missing) if cfg.trials > 0 else 0, before, after, time.perf_counter() - t0,
                        measured, [c.to_json() for c in choices])
    _print(progress, f"apq-tune: {report.tasks} tasks ({report.cached_tasks} cached), "
                     f"{report.new_records} new records, {report.measured_tasks} timed against apq's "
                     f"schedules, {report.chosen_tuned} tuned kept, in {report.seconds:.1f} s")
    return chosen, report


def _search(tasks: list[Any], db: Any, cfg: TuneConfig) -> None:
    """One MetaSchedule search over ``tasks``, records committed to ``db``."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    # MetaSchedule's console logger binds to sys.stdout when created: send it to stderr so
    # stdout stays machine-readable (`apq compile --json`, bench --json)
    with tempfile.TemporaryDirectory(prefix="apq-tune-") as logs, contextlib.redirect_stdout(sys.stderr):
        # the first TuneContext imports tvm.s_tir.tensor_intrin (~250 TVMScript functions, 69 s of
        # CPU, minutes of wall time on the loaded 2-core machine): a fixed cost of the first tune
        # in a process
        contexts, weights = extracted_tasks_to_tune_contexts(
            tasks, logs, strategy=_search_strategy(cfg, len(tasks)), seed=cfg.seed, num_threads=cfg.max_workers)
        budget, per_iter = trial_budget(cfg.trials, len(contexts))
        ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=logs,
                      max_trials_global=budget, num_trials_per_iter=per_iter,
                      builder=BUILDERS[cfg.builder](cfg),
                      runner=cfg.runner_config().runner(),  # one worker process
                      database=db, cost_model="xgb")


def _local_builder(cfg: TuneConfig) -> Any:
    """MetaSchedule's LocalBuilder (worker processes, timeouts), minus the intrinsics import."""
    from tvm.s_tir import meta_schedule as ms

    return ms.builder.LocalBuilder(timeout_sec=cfg.builder_timeout_s, max_workers=cfg.max_workers,
                                   f_build=build_candidate)


def _in_process_builder(cfg: TuneConfig) -> Any:
    """Build candidates in this process with ``build_candidate`` and MetaSchedule's export.

    Why the default: ``LocalBuilder`` restarts its worker pool on every batch, and each worker
    imports TVM (~5 s idle, ~20 s on the loaded 2-core machine): with one trial per task and
    iteration that is one import per trial, most of a small tune's wall time. In-process gives up
    the builder's timeout and crash isolation for LLVM CPU candidates, which build in well under a
    second; a candidate that raises is reported as a failed build, as LocalBuilder would.
    """
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.ir.utils import derived_object

    @derived_object
    class InProcessBuilder(ms.builder.PyBuilder):
        def build(self, build_inputs: list[Any]) -> list[Any]:
            results = []
            for inp in build_inputs:
                try:
                    results.append(ms.builder.BuilderResult(default_export(build_candidate(inp.mod, inp.target)), None))
                except Exception as e:  # noqa: BLE001 -- a failed candidate, not a failed tune
                    results.append(ms.builder.BuilderResult(None, f"apq in-process builder: {e}"[:2000]))
            return results

    return InProcessBuilder()


#: How tuning candidates are built, by ``TuneConfig.builder``.
BUILDERS: dict[str, Callable[[TuneConfig], Any]] = {
    "in-process": _in_process_builder,
    "local": _local_builder,
}


def trial_budget(trials: int, tasks: int) -> tuple[int, int]:
    """(global trials, trials per scheduler iteration) for ``tasks`` untuned tasks.

    At least one trial per task, even when ``trials`` is smaller: a task left without a record
    would be tuned again by the next compile, so recompiling would never become free. The gradient
    scheduler's first round gives every task one iteration of ``per_iter`` trials in turn, so
    ``per_iter`` is rounded down: rounding up spent a 32-trial budget on 16 of 24 MobileNetV2 tasks.
    """
    budget = max(trials, tasks)
    return budget, max(1, min(64, budget // max(1, tasks)))


def tunable(spec: Any) -> bool:
    """Tuning times candidates on this machine: only native LLVM CPU targets can be tuned here."""
    return not spec.is_cross and spec.tvm_target.get("kind") == "llvm"


def check_tunable(spec: Any) -> None:
    """Raise the one-line user error for a target whose candidates cannot run on this machine."""
    if not tunable(spec):
        raise InvalidInputError(f"cannot tune for target {spec.name}: MetaSchedule times candidates on this "
                                "machine, so tuning needs a native LLVM CPU target (e.g. host)")


def tune_for_target(mod: Any, spec: Any, cfg: TuneConfig, cache_dir: Path | None = None,
                    progress: bool = True, schedule_cfg: Any = None, prepared: bool = False) -> tuple[Any, TuneReport]:
    """``tune_module`` for an apq TargetSpec, refusing targets whose code cannot run here."""
    check_tunable(spec)
    return tune_module(mod, spec.tvm(), cfg, cache_dir, progress, schedule_cfg, prepared)


def tuned_functions(mod: Any, target: Any, db: Any, schedule_cfg: Any = None, prepared: bool = False) -> list[str]:
    """Names of the fused PrimFuncs the database replaces in ``mod`` (what the build will run tuned);
    ``prepared``: ``mod`` is already ``pipeline.fused_module``'s output."""
    from tvm import relax, tirx

    from apq.kernels.pipeline import fused_module

    fused = mod if prepared else fused_module(mod, target, schedule_cfg)
    with target, db:
        applied = relax.transform.MetaScheduleApplyDatabase()(fused)

    def scheduled(f: Any) -> bool:
        return isinstance(f, tirx.PrimFunc) and f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))

    before = {gv.name_hint for gv, f in fused.functions.items() if scheduled(f)}
    return sorted(gv.name_hint for gv, f in applied.functions.items() if scheduled(f) and gv.name_hint not in before)


def _search_strategy(cfg: TuneConfig, tasks: int) -> Any:
    """Evolutionary search sized to the per-task budget: each task draws a fresh population every
    round, and a population of 256 cost ~36 s per round (= per trial at 32 trials over 24 tasks) on
    the loaded 2-core machine, for one candidate measured; 16 per trial a task gets is plenty."""
    from tvm.s_tir import meta_schedule as ms

    per_task = -(-max(1, cfg.trials) // max(1, tasks))
    population = int(min(512, max(64, 16 * per_task)))
    return ms.search_strategy.EvolutionarySearch(population_size=population,
                                                 init_min_unmeasured=min(50, population // 2))


def _print(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)
