"""Per task, keep MetaSchedule's best record only if it beats apq's own schedule: tuning never loses.

Why this exists: with a small budget (32 trials over 24 MobileNetV2 tasks, ~1 trial each),
MetaSchedule's best record for a fused PrimFunc is usually a random point of its space, slower
than apq's rule-based schedule (kernels/cpu_schedules.py); applying every record made a model
3.7x slower (0.220 -> 0.805 ms at 32 px). So for every task we build apq's scheduled PrimFunc and
the best tuned one with MetaSchedule's own builder and runner (same build function, same
evaluator, same random-filled inputs), time them side by side in alternating order, and apply
the record only when it is faster by ``min_gain``. Otherwise the PrimFunc gets no record and the
build schedules it with apq's rules, exactly as an untuned compile does.

Why not commit apq's schedule into the database as a baseline record: apq's rules use
``transform_layout`` with Python lambdas, tensorize with apq's own intrinsics and trial schedules
on copies; their traces are not guaranteed to replay from JSON. Filtering at apply time needs no
trace of apq's schedule at all, only its PrimFunc.

The choices are saved beside the target's database (``apq_choices.json``), keyed by the task's
structural hash and the chosen record's fingerprint: a recompile re-measures nothing unless the
database's best record for a task changed (another model tuned the same PrimFunc further).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from apq.kernels.interleaved import interleaved_samples

CHOICES_FILE = "apq_choices.json"
CHOICES_VERSION = 1
APQ, TUNED = "apq", "tuned"


@dataclass
class TaskChoice:
    """One task's decision and the two times it rests on (milliseconds, same runner, one session).

    ``record`` fingerprints the tuned record's scheduled code that was measured ("" when the database has no valid
    record for the task); ``chosen`` is ``"tuned"`` only when ``tuned_ms <= apq_ms * (1 - min_gain)``.
    """

    task: str
    workload: str
    record: str
    apq_ms: float | None
    tuned_ms: float | None
    chosen: str
    min_gain: float

    @property
    def gain(self) -> float | None:
        """apq_ms / tuned_ms (> 1: the tuned record is faster)."""
        if self.apq_ms is None or self.tuned_ms is None or self.tuned_ms <= 0:
            return None
        return self.apq_ms / self.tuned_ms

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["gain"] = None if self.gain is None else round(self.gain, 4)
        d["source"] = "measured"  # apq_ms / tuned_ms are timings of compiled kernels on this machine
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> "TaskChoice":
        names = {f.name for f in fields(TaskChoice)}
        return TaskChoice(**{k: v for k, v in d.items() if k in names})

    def with_min_gain(self, min_gain: float) -> "TaskChoice":
        """The same measurement judged by another margin (no re-measurement needed)."""
        return TaskChoice(self.task, self.workload, self.record, self.apq_ms, self.tuned_ms,
                          choose(self.apq_ms, self.tuned_ms, min_gain), min_gain)


def choose(apq_ms: float | None, tuned_ms: float | None, min_gain: float) -> str:
    """``"tuned"`` iff the tuned PrimFunc ran and is at least ``min_gain`` faster than apq's.

    A tuned record that failed to build or run is never chosen. If apq's own schedule failed in
    the runner (it never has) but the record ran, the record is the only measured code: take it.
    """
    if tuned_ms is None:
        return APQ
    if apq_ms is None:
        return TUNED
    return TUNED if tuned_ms <= apq_ms * (1.0 - min_gain) else APQ


# --------------------------------------------------------------------------- identities


def workload_key(task_mod: Any) -> str:
    """The task IRModule's structural hash (what MetaSchedule's databases match workloads by)."""
    from tvm_ffi import structural_hash

    return f"{structural_hash(task_mod) & 0xFFFFFFFFFFFFFFFF:016x}"


def schedule_fingerprint(scheduled_mod: Any | None) -> str:
    """The structural hash of a record's scheduled IRModule ("" for none): tells whether the
    database's best record for a task changed since it was measured.

    Why not a hash of the record's trace JSON: a MetaSchedule record read back from the JSON file
    serializes differently from the one committed in memory during the search, so a recompile saw
    every choice as stale and re-measured all 24 tasks (101 s); the scheduled code is canonical.
    """
    return "" if scheduled_mod is None else workload_key(scheduled_mod)


# --------------------------------------------------------------------------- the two candidates


def apq_scheduled(task_mod: Any, target: Any, cfg: Any = None) -> Any | None:
    """``task_mod`` scheduled by apq's rules, as the build's ``ApplyDefaultSchedule`` would.

    Same rules, same order, same config (the build's ``cfg``; None: derived from the target): the
    function this returns is the one an untuned build runs for this task (tests check it against
    the build's fused module).
    """
    from apq.kernels.cpu_schedules import CpuScheduleConfig, make_rules

    func = task_mod["main"]
    for rule in make_rules(cfg or CpuScheduleConfig.for_target(target)):
        sch = rule.apply(func, target, False)
        if sch is not None:
            return sch.mod
    return None


def tuned_scheduled(db: Any, task_mod: Any, target: Any, name: str) -> tuple[Any | None, Any | None]:
    """(best record, its scheduled IRModule) from the database, or (None, None)."""
    record = db.query_tuning_record(task_mod, target, name)
    if record is None:
        return None, None
    return record, db.query_ir_module(task_mod, target, name)


# --------------------------------------------------------------------------- measurement


@dataclass
class RunnerConfig:
    """MetaSchedule's runner settings, shared by the tuner and the side-by-side decision.

    ``number``/``repeat``/``min_repeat_ms`` are MetaSchedule's ``EvaluatorConfig`` (its defaults);
    ``threads`` is the TVM thread count the candidates run with (apq's benches time 1 thread;
    0 = the runtime's default, all cores); ``rounds`` alternates the candidates' order this many
    times for a decision (median over rounds), so drift on a shared machine hits both equally.
    """

    number: int = 3
    repeat: int = 1
    min_repeat_ms: int = 100
    threads: int = 1
    rounds: int = 3
    timeout_s: float = 60.0

    def evaluator(self) -> Any:
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig

        return EvaluatorConfig(number=self.number, repeat=self.repeat, min_repeat_ms=self.min_repeat_ms)

    def runner(self) -> Any:
        """The tuner's ``LocalRunner`` (one worker process, threads pinned by its initializer)."""
        from tvm.s_tir import meta_schedule as ms

        init = functools.partial(set_worker_threads, self.threads) if self.threads > 0 else None
        return ms.runner.LocalRunner(timeout_sec=self.timeout_s, evaluator_config=self.evaluator(),
                                     initializer=init)


def set_worker_threads(threads: int) -> int:
    """Pin this process's TVM thread pool to ``threads`` workers (the runner's initializer)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    import tvm

    tvm.get_global_func("runtime.config_threadpool")(1, threads)
    return int(tvm.get_global_func("runtime.NumThreads")())


def build_candidate(mod: Any, target: Any, _params: Any = None) -> Any:
    """MetaSchedule's ``default_build`` minus its ``import tvm.s_tir.tensor_intrin``.

    Why: that import registers ~250 TVMScript intrinsics and took 69 s of CPU (4.6 min wall on the
    loaded 2-core machine) in *every* builder worker, and ``LocalBuilder`` restarts its workers on
    every batch: it dominated tuning time. A candidate reaching the builder is already scheduled
    (tensorized blocks carry the intrinsic's body), so building it needs no intrinsic registry.
    The TIR pipeline is the model build's (kernels/stack_alloc.py), so a tuned kernel is timed
    as it will run, and against apq's schedule on equal terms.
    """
    import warnings

    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from apq.kernels.stack_alloc import tir_pipeline

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with warnings.catch_warnings():  # tvm.driver.build is deprecated; it is what MetaSchedule calls
        warnings.simplefilter("ignore", DeprecationWarning)
        return tvm_build(mod, target=target, pipeline=tir_pipeline())


def measure_modules(mods: list[Any | None], target: Any, runner_cfg: RunnerConfig) -> list[float | None]:
    """Median milliseconds of each scheduled task IRModule (None: missing, or failed to build/run).

    Same build (``build_candidate``), same random-filled arguments and the same evaluator
    (``default_alloc_argument``/``default_run_evaluator`` of MetaSchedule's LocalRunner, with
    ``runner_cfg``'s EvaluatorConfig and threads) as the tuner's records were timed with, but in
    this process: a runner worker would import TVM again (~20 s here) for a few seconds of timing,
    and these candidates (apq's schedule, an already-measured record) need no crash isolation.
    Candidates are timed in ``rounds`` interleaved passes (kernels/interleaved.py).
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument, default_run_evaluator

    if runner_cfg.threads > 0:
        set_worker_threads(runner_cfg.threads)
    dev = tvm.cpu()
    ready: dict[int, tuple[Any, Any]] = {}
    for i, mod in enumerate(mods):
        if mod is None:
            continue
        try:
            lib = build_candidate(mod, target)
        except Exception:  # a candidate that does not build is simply not a candidate
            continue
        args_info = tuple(a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"]))
        ready[i] = (lib, default_alloc_argument(dev, args_info, 1))
    def median_s(i: int) -> float:
        lib, args = ready[i]
        return statistics.median(default_run_evaluator(lib, dev, runner_cfg.evaluator(), args))

    secs = interleaved_samples(list(ready), runner_cfg.rounds, median_s)
    return [statistics.median(secs[i]) * 1e3 if secs.get(i) else None for i in range(len(mods))]


# --------------------------------------------------------------------------- the choice book


def load_choices(db_dir: Path) -> dict[str, TaskChoice]:
    """Saved choices by workload key ({} when there are none or the file is from another version)."""
    path = Path(db_dir) / CHOICES_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != CHOICES_VERSION:
        return {}
    return {k: TaskChoice.from_json(v) for k, v in data.get("choices", {}).items()}


def save_choices(db_dir: Path, choices: dict[str, TaskChoice]) -> None:
    """Write atomically (a reader never sees half a file); callers hold the database lock."""
    path = Path(db_dir) / CHOICES_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": CHOICES_VERSION,
                               "choices": {k: c.to_json() for k, c in sorted(choices.items())}}, indent=1))
    tmp.replace(path)


def decide(tasks: list[Any], db: Any, target: Any, db_dir: Path, min_gain: float,
           runner_cfg: RunnerConfig, schedule_cfg: Any = None) -> tuple[list[TaskChoice], int]:
    """A choice per task (saved ones reused while still about the same record); (choices, measured).

    Only tasks whose database best record is new to the choice book are measured, all in one
    session (``measure_modules``). ``schedule_cfg``: the build's CpuScheduleConfig, so apq's side
    is scheduled as the build will schedule it.
    """
    book = load_choices(db_dir)
    keyed = []
    for task in tasks:
        task_mod = task.dispatched[0]
        record, tuned_mod = tuned_scheduled(db, task_mod, target, task.task_name)
        keyed.append((task, workload_key(task_mod), record, tuned_mod))
    stale = [k for k in keyed if k[1] not in book or book[k[1]].record != schedule_fingerprint(k[3])]
    mods: list[Any | None] = []
    for task, _, record, tuned_mod in stale:
        mods += [apq_scheduled(task.dispatched[0], target, schedule_cfg), tuned_mod]
    times = measure_modules(mods, target, runner_cfg) if stale else []
    for j, (task, key, _, tuned_mod) in enumerate(stale):
        apq_ms, tuned_ms = times[2 * j], times[2 * j + 1]
        book[key] = TaskChoice(task.task_name, key, schedule_fingerprint(tuned_mod), _round(apq_ms), _round(tuned_ms),
                               choose(apq_ms, tuned_ms, min_gain), min_gain)
    if stale:
        save_choices(db_dir, book)
    return [book[key].with_min_gain(min_gain) for _, key, _, _ in keyed], len(stale)


def chosen_database(tasks: list[Any], choices: list[TaskChoice], db: Any, target: Any) -> Any:
    """An in-memory database holding exactly the records chosen over apq's schedules.

    ``MetaScheduleApplyDatabase`` with it replaces only those PrimFuncs; every other one keeps
    going to apq's rules in the build pipeline.
    """
    from tvm.s_tir import meta_schedule as ms

    mem = ms.database.MemoryDatabase()
    for task, choice in zip(tasks, choices):
        if choice.chosen != TUNED:
            continue
        record = db.query_tuning_record(task.dispatched[0], target, task.task_name)
        workload = mem.commit_workload(task.dispatched[0])
        mem.commit_tuning_record(ms.database.TuningRecord(record.trace, workload, record.run_secs, record.target,
                                                          record.args_info))
    return mem


def _round(ms_: float | None) -> float | None:
    return None if ms_ is None else round(ms_, 5)
