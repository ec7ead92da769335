"""MetaSchedule tuning for final artifacts (kernels/tuning.py, kernels/tuning_choice.py,
`apq compile --tune-trials N`).

The fast tests seed a target database with one hand-written tuning record (split + parallel, slower
than apq's schedule of the same conv), so the side-by-side choice, the cache, the pipeline hook and
the manifest are exercised without a MetaSchedule search (a real search costs minutes here: its
first TuneContext imports TVM's tensor intrinsics; that end-to-end test is marked slow).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from apq.kernels import tuning_choice
from apq.kernels.pipeline import fused_module
from apq.kernels.tuning import (
    TuneConfig,
    count_records,
    database_dir,
    open_database,
    target_key,
    tune_for_target,
    trial_budget,
    tune_module,
    tuned_functions,
)
from apq.kernels.tuning_choice import (
    APQ,
    TUNED,
    TaskChoice,
    apq_scheduled,
    choose,
    load_choices,
    schedule_fingerprint,
    save_choices,
    workload_key,
)
from apq.targets.registry import get_target
from apq.toolchain.compile import CompileOptions, compile_onnx
from apq.toolchain.errors import InvalidInputError


def _tiny_conv(path: Path) -> Path:
    """conv 3x3 (4->8) + bias + relu at 8x8: one fused PrimFunc, one tuning task."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "tiny_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _lowered(onnx_path: Path, spec):
    from apq.toolchain.compile import lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    model = load_onnx(onnx_path)
    mod = import_to_relax(model, resolve_input_specs(model, {}))
    return lower_module(mod, model, spec, CompileOptions())[0]


def _seed_record(mod, target, cache_dir: Path) -> int:
    """Commit one hand-made schedule (split + parallel outer loop) for every task of ``mod``."""
    import tvm
    from tvm import tirx
    from tvm.s_tir import Schedule
    from tvm.s_tir import meta_schedule as ms

    db = open_database(target, cache_dir)
    fused = fused_module(mod, target)
    n = 0
    for gv, func in fused.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        task_mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
        workload = db.commit_workload(task_mod)
        sch = Schedule(task_mod)
        sch.parallel(sch.get_loops(_first_block(sch))[1])
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, workload, run_secs=[1e-5], target=target,
            args_info=ms.arg_info.ArgInfo.from_prim_func(task_mod["main"])))
        n += 1
    return n


def _first_block(sch):
    """The first block with loops (pad or conv): a hand schedule only needs a loop to parallelize."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if len(sch.get_loops(block)) >= 2:
            return block
    raise AssertionError("no loop nest")


def test_configs_round_trip_json():
    cfg = TuneConfig(trials=32, max_workers=1, seed=3, min_gain=0.05, threads=2, rounds=5)
    assert TuneConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    assert cfg.runner_config().threads == 2 and cfg.runner_config().rounds == 5
    opts = CompileOptions(target="host", tune_trials=8)
    assert CompileOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts
    old = opts.to_json()
    del old["tune_trials"]  # manifests written before tuning existed
    assert CompileOptions.from_json(old).tune_trials == 0
    for bad in (TuneConfig(min_gain=1.0), TuneConfig(min_gain=-0.1), TuneConfig(rounds=0)):
        with pytest.raises(InvalidInputError):
            bad.validate()


def test_choose_keeps_apq_unless_the_record_wins_by_the_margin():
    assert choose(1.0, 0.96, 0.03) == TUNED
    assert choose(1.0, 0.975, 0.03) == APQ  # faster, but within the margin
    assert choose(1.0, 1.5, 0.03) == APQ
    assert choose(1.0, 1.0, 0.0) == TUNED  # margin 0: ties go to the record
    assert choose(1.0, None, 0.03) == APQ  # the record failed to build or run
    assert choose(None, 0.5, 0.03) == TUNED  # only the record was measured


def test_choice_book_round_trips_and_rejudges_without_remeasuring(tmp_path):
    c = TaskChoice("fused_conv", "00ff", "abcd", 1.0, 0.95, choose(1.0, 0.95, 0.03), 0.03)
    assert c.chosen == TUNED and c.gain == pytest.approx(1 / 0.95)
    save_choices(tmp_path, {c.workload: c})
    back = load_choices(tmp_path)
    assert back == {"00ff": c}
    assert back["00ff"].with_min_gain(0.10).chosen == APQ  # same times, stricter margin
    (tmp_path / tuning_choice.CHOICES_FILE).write_text(json.dumps({"version": 999, "choices": {}}))
    assert load_choices(tmp_path) == {}  # another format: re-measure rather than misread


def test_database_dir_is_per_target_and_honours_apq_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path))
    host, arm = get_target("host"), get_target("raspberry-pi/4b-aarch64")
    assert database_dir(host) == tmp_path / "tuning" / target_key(host)
    assert target_key(host) != target_key(arm)
    assert target_key(host) == target_key(host.tvm())  # same key from the spec or the TVM Target
    assert open_database(host, create=False) is None  # nothing created by looking


def test_trial_budget_gives_every_task_a_trial():
    assert trial_budget(4, 1) == (4, 4)
    assert trial_budget(32, 40) == (40, 1)  # never leave a task without a record
    assert trial_budget(32, 24) == (32, 1)  # the first round reaches all 24 tasks
    assert trial_budget(64, 16) == (64, 4)
    assert trial_budget(1000, 2) == (1000, 64)


def test_refuses_cross_targets_and_negative_trials(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot tune"):
        tune_for_target(None, get_target("raspberry-pi/4b-aarch64"), TuneConfig(trials=4), tmp_path)
    with pytest.raises(InvalidInputError, match=">= 0"):
        tune_module(None, get_target("host").tvm(), TuneConfig(trials=-1), tmp_path)


def test_apq_schedule_measured_is_the_one_the_build_runs(tmp_path):
    """The baseline a record must beat is exactly the PrimFunc an untuned build runs."""
    from tvm_ffi import structural_equal

    from apq.kernels.pipeline import schedule_pass
    from apq.kernels.tuning import _tasks

    spec = get_target("host")
    target = spec.tvm()
    mod = _lowered(_tiny_conv(tmp_path / "tiny.onnx"), spec)
    tasks = _tasks(fused_module(mod, target), target)
    assert tasks
    with target:
        built = schedule_pass()(fused_module(mod, target))
    for task in tasks:
        ours = apq_scheduled(task.dispatched[0], target)["main"]
        assert any(structural_equal(ours.body, f.body, map_free_vars=True)
                   for gv, f in built.functions.items() if gv.name_hint == task.task_name)


def test_slower_record_is_not_applied_and_choices_match_the_times(tmp_path, monkeypatch):
    """The seeded record (split + parallel) is slower than apq's schedule: it stays in the database
    but the build keeps apq's; every recorded choice follows from its two measured times; a second
    tune measures nothing and runs no trials; the artifact matches onnxruntime."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    spec = get_target("host")
    onnx_path = _tiny_conv(tmp_path / "tiny.onnx")
    mod = _lowered(onnx_path, spec)
    target = spec.tvm()
    assert _seed_record(mod, target, None) >= 1
    db, report = tune_module(mod, target, TuneConfig(trials=4), progress=False)
    assert report.tasks >= 1 and report.cached_tasks == report.tasks and report.new_records == 0
    assert report.measured_tasks == report.tasks and len(report.choices) == report.tasks
    for c in report.choices:
        assert c["apq_ms"] > 0 and c["tuned_ms"] > 0  # both really ran
        assert c["chosen"] == choose(c["apq_ms"], c["tuned_ms"], c["min_gain"])
    kept = [c["task"] for c in report.choices if c["chosen"] == TUNED]
    assert tuned_functions(mod, target, db) == sorted(kept)
    assert report.choices[0]["chosen"] == APQ, report.choices  # ~3x slower than apq's, measured
    assert count_records(open_database(target)) == report.records_after  # the record is kept on disk

    _, again = tune_module(mod, target, TuneConfig(trials=4), progress=False)
    assert again.measured_tasks == 0 and again.new_records == 0
    assert [c["chosen"] for c in again.choices] == [c["chosen"] for c in report.choices]

    res = compile_onnx(onnx_path, "host", tmp_path / "tuned.apq", options=CompileOptions(tune_trials=4))
    tuning = res.manifest["compile"]["tuning"]
    assert tuning["new_records"] == 0 and tuning["measured_tasks"] == 0 and tuning["tuned_functions"] == []
    assert tuning["choices"] == again.to_json()["choices"]
    ver = verify_artifact(open_artifact(res.artifact_path), onnx_path)
    assert ver.passed, ver.to_json()


def test_winning_record_is_applied_and_still_matches_onnxruntime(tmp_path, monkeypatch):
    """The apply path: with the measurement replaced by times where the record wins (the seeded
    record never really wins), only the chosen record reaches the build, and the compiled
    artifact, running the record's loops, still matches onnxruntime."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning_choice, "measure_modules",
                        lambda mods, target, cfg: [1.0 if i % 2 == 0 else 0.5 for i in range(len(mods))])
    spec = get_target("host")
    onnx_path = _tiny_conv(tmp_path / "tiny.onnx")
    target = spec.tvm()
    mod = _lowered(onnx_path, spec)
    _seed_record(mod, target, None)
    res = compile_onnx(onnx_path, "host", tmp_path / "tuned.apq", options=CompileOptions(tune_trials=4))
    tuning = res.manifest["compile"]["tuning"]
    assert tuning["chosen_tuned"] == tuning["tasks"] >= 1
    assert tuning["tuned_functions"] == sorted(c["task"] for c in tuning["choices"])
    ver = verify_artifact(open_artifact(res.artifact_path), onnx_path)
    assert ver.passed, ver.to_json()


def test_database_round_trips_through_disk(tmp_path):
    """Records and choices written by one process are what the next one reads."""
    spec = get_target("host")
    target = spec.tvm()
    mod = _lowered(_tiny_conv(tmp_path / "tiny.onnx"), spec)
    n = _seed_record(mod, target, tmp_path)
    from apq.kernels.tuning import _tasks

    tasks = _tasks(fused_module(mod, target), target)
    first = open_database(target, tmp_path)
    prints = [schedule_fingerprint(first.query_ir_module(t.dispatched[0], target, t.task_name)) for t in tasks]
    reopened = open_database(target, tmp_path, create=False)
    assert count_records(reopened) == n
    again = [schedule_fingerprint(reopened.query_ir_module(t.dispatched[0], target, t.task_name)) for t in tasks]
    assert again == prints and all(prints)
    assert len({workload_key(t.dispatched[0]) for t in tasks}) == len(tasks)
    fresh = _tasks(fused_module(mod, target), target)[0].dispatched[0]
    assert workload_key(tasks[0].dispatched[0]) == workload_key(fresh)  # stable across re-fusing


def test_untuned_compile_does_not_touch_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    res = compile_onnx(_tiny_conv(tmp_path / "tiny.onnx"), "host", tmp_path / "plain.apq")
    assert "tuning" not in res.manifest["compile"]
    assert not (tmp_path / "cache" / "tuning").exists()


@pytest.mark.slow
def test_cli_tune_trials_end_to_end(tmp_path, monkeypatch, capsys):
    """`apq compile --tune-trials 4 --verify`: a real search (~4-5 min on the loaded machine),
    records on disk, every choice follows its measured times, parity with onnxruntime; the second
    compile reuses the records and the choices (zero new trials, nothing re-measured)."""
    from apq.toolchain.cli import compile_main

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    onnx_path = _tiny_conv(tmp_path / "tiny.onnx")
    argv = [str(onnx_path), "--tune-trials", "4", "--verify", "--json", "-o", str(tmp_path / "t.apq")]
    assert compile_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["tuning"]["new_records"] >= 1 and first["tuning"]["measured_tasks"] == first["tuning"]["tasks"]
    for c in first["tuning"]["choices"]:
        assert c["chosen"] == choose(c["apq_ms"], c["tuned_ms"], c["min_gain"])
    assert first["tuning"]["tuned_functions"] == sorted(c["task"] for c in first["tuning"]["choices"]
                                                        if c["chosen"] == TUNED)
    db = open_database(get_target("host"), create=False)
    assert db is not None and count_records(db) >= 1
    records = count_records(db)
    assert first["verify"]["passed"]

    assert compile_main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["verify"]["passed"] and second["tuning"]["new_records"] == 0
    assert second["tuning"]["measured_tasks"] == 0
    assert count_records(open_database(get_target("host"), create=False)) == records  # no new trials


def test_compile_with_both_tuners_fuses_the_module_once(tmp_path, monkeypatch):
    """``--tune-trials`` + ``--knob-tune``: MetaSchedule's tasks, its tuned-function report, the
    knob tuner and the build all use one fused module (fusing constant-folds every weight:
    seconds per float model), and the artifact still matches onnxruntime."""
    from apq.kernels import knob_tuning, pipeline
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.verify import verify_artifact

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning_choice, "measure_modules", lambda mods, target, cfg: [1.0] * len(mods))
    monkeypatch.setattr(knob_tuning, "time_candidates", lambda funcs, target, cfg, seed=0: [1.0] * len(funcs))
    onnx_path = _tiny_conv(tmp_path / "tiny.onnx")
    spec = get_target("host")
    _seed_record(_lowered(onnx_path, spec), spec.tvm(), None)  # no search: a record is already there
    calls = []
    real = pipeline.fused_module
    monkeypatch.setattr(pipeline, "fused_module", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(knob_tuning, "fused_module", pipeline.fused_module)
    res = compile_onnx(onnx_path, "host", tmp_path / "both.apq", options=CompileOptions(tune_trials=4, knob_tune=True))
    assert len(calls) == 1, len(calls)
    assert res.manifest["compile"]["tuning"]["tasks"] >= 1 and res.manifest["compile"]["knob_tuning"]
    ver = verify_artifact(open_artifact(res.artifact_path), onnx_path)
    assert ver.passed, ver.to_json()
