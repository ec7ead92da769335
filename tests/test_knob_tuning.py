"""Knob tuning (kernels/knob_tuning.py): per-kernel schedule variants, timed, checked, cached.

No timing asserts: tests force choices with a fake ``measure`` where the outcome matters, and
count measure calls to prove the cache answers a second tune.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from apq.kernels import knob_tuning as kt
from apq.targets.registry import get_target
from apq.toolchain.compile import CompileOptions
from apq.toolchain.errors import InvalidInputError


def _tiny_conv(path: Path, relu: bool = True, cout: int = 8) -> Path:
    """conv 3x3 (4->cout) + bias (+ relu) at 8x8: one fused PrimFunc."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((cout, 4, 3, 3)) * 0.3).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(cout).astype(np.float32), "b")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c" if relu else "y"], kernel_shape=[3, 3], pads=[1] * 4)]
    if relu:
        nodes.append(helper.make_node("Relu", ["c"], ["y"]))
    graph = helper.make_graph(nodes, "tiny_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, cout, 8, 8])], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _lowered(onnx_path: Path):
    from apq.toolchain.compile import lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    model = load_onnx(onnx_path)
    mod = import_to_relax(model, resolve_input_specs(model, {}))
    # NCHW: these tests are about the NCHW conv rule's knob variants (the NHWC rule has none)
    return lower_module(mod, model, get_target("host"), CompileOptions(float_layout="NCHW"))[0]


def _prim_funcs(mod, target):
    from tvm import tirx

    return [(gv.name_hint, f) for gv, f in kt.fused_module(mod, target).functions_items()
            if isinstance(f, tirx.PrimFunc)]


class _CountingMeasure:
    """A fake ``time_candidates``: the last candidate is fastest (forces a change); counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, funcs, target, cfg):
        self.calls += 1
        return [1.0] + [1.0] * (len(funcs) - 2) + [0.5]


def test_configs_and_choices_round_trip_json():
    cfg = kt.KnobTuneConfig(threads=1, min_gain=0.05)
    assert kt.KnobTuneConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    choice = kt.KnobChoice("f", "conv2d-nchw", "float32[1x4]", {"max_oc_tile": 4}, 1.0, 0.5, 3, {"{}": 1.0})
    assert kt.KnobChoice.from_json(json.loads(json.dumps(choice.to_json()))) == choice and choice.changed
    opts = CompileOptions(target="host", knob_tune=True)
    assert CompileOptions.from_json(json.loads(json.dumps(opts.to_json()))) == opts
    with pytest.raises(InvalidInputError):
        kt.KnobTuneConfig(min_gain=1.5).validate()
    # unknown knob names (a field another version of CpuScheduleConfig lacks) are ignored
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    base = CpuScheduleConfig()
    assert kt.variant_config(base, {"max_oc_tile": 4, "no_such_knob": 1}).max_oc_tile == 4


def test_cache_file_location_and_merging_round_trip(tmp_path, monkeypatch):
    host = get_target("host")
    monkeypatch.delenv("APQ_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kt.cache_file(host).parent == tmp_path / "xdg" / "apq" / "knobs"
    # every cache of apq resolves its folder the same way (apq.toolchain.cache_dir)
    from apq.kernels import kernel_choice, tuning
    from apq.targets import aarch64_runtime

    assert tuning.database_dir(host).parent.parent == tmp_path / "xdg" / "apq"
    assert kernel_choice.cache_file(host).parent.parent == tmp_path / "xdg" / "apq"
    assert aarch64_runtime.cache_root() == tmp_path / "xdg" / "apq"
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "apq"))
    path = kt.cache_file(host)
    assert path == tmp_path / "apq" / "knobs" / f"{kt.target_key(host)}.json"
    assert kt.target_key(host) == kt.target_key(host.tvm())  # a spec and its Target share a file
    assert kt.target_key(host) != kt.target_key(get_target("raspberry-pi/4b-aarch64"))
    a = kt.KnobChoice("a", "conv2d-nchw", "s", {"max_oc_tile": 4}, 1.0, 0.5, 2)
    b = kt.KnobChoice("b", "generic", "s", {}, None, None, 1)
    kt.save_cache(path, {"ka": a})
    kt.save_cache(path, {"kb": b})  # merged, not overwritten
    assert kt.load_cache(path) == {"ka": a, "kb": b}
    assert not list(path.parent.glob("*.tmp"))  # the atomic write left no temp file
    path.write_text(json.dumps({"version": -1, "entries": {}}))
    assert kt.load_cache(path) == {}  # another version: ignored, retuned


def test_key_is_stable_and_separates_shapes(tmp_path):
    target = get_target("host").tvm()
    [(_, f1)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "a.onnx")), target)
    [(_, f2)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "b.onnx")), target)
    [(_, f3)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "c.onnx", cout=16)), target)
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    base = CpuScheduleConfig.for_target(target)
    space = kt.space_fingerprint(base)
    assert space == kt.space_fingerprint(CpuScheduleConfig.for_target(target))
    assert space != kt.space_fingerprint(kt.variant_config(base, {"max_oc_tile": 2}))  # other defaults: retune
    assert kt.func_key(f1, space) == kt.func_key(f2, space)  # re-imported: same key
    assert kt.func_key(f1, space) != kt.func_key(f3, space)
    assert "float32[1x4x8x8]" in kt.func_key(f1, space)  # dtypes (bits) and shapes are in the key
    assert kt.func_key(f1, space) == kt.func_key(f1.with_attr("global_symbol", "other_name"), space)


def test_tuned_module_matches_default_and_second_tune_hits_cache(tmp_path):
    import tvm
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    target = get_target("host").tvm()
    mod = _lowered(_tiny_conv(tmp_path / "t.onnx"))
    fake = _CountingMeasure()
    knobs, report = kt.knob_tune(mod, target, cache_dir=tmp_path, progress=False, measure=fake)
    assert fake.calls == 1 and report.timed == 1 and report.changed == 1 and len(knobs) == 1
    [choice] = report.choices
    assert choice["overrides"] and choice["best_ms"] == 0.5 and choice["candidates"] >= 2

    # the build really schedules with the chosen variant (different code), and computes the same
    [(_, func)] = _prim_funcs(mod, target)
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from tvm_ffi import structural_equal

    base = CpuScheduleConfig.for_target(target)
    with target:
        mod_default = kt.fused_module(mod, target)
        mod_knob = kt.knob_schedule_pass(knobs)(mod_default)
    [(_, sched)] = [(gv, f) for gv, f in mod_knob.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    default_sched, _ = kt.schedule_with(func, target, base)
    assert not structural_equal(sched, default_sched)
    from apq.kernels.pipeline import schedule_pass

    with target:  # the default candidate is exactly what an untuned build's dlight pass gives
        [dl] = [f for _, f in schedule_pass(base)(kt.fused_module(mod, target)).functions_items()
                if isinstance(f, tvm.tirx.PrimFunc)]
    assert structural_equal(dl, default_sched)
    # ... and inside the real build (tvm.compile's own fusion), the knob pass finds the same key
    seen = []

    @tvm.instrument.pass_instrument
    class _AfterKnobPass:
        def run_after_pass(self, m, info):
            if info.name == "ApqKnobSchedule":
                seen.append(m)

    with tvm.transform.PassContext(instruments=[_AfterKnobPass()]):
        compile_relax(mod, target, knobs=knobs)
    [built] = [f for _, f in seen[0].functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert structural_equal(built, sched)
    x = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    outs = []
    for k in (None, knobs):
        vm = relax.VirtualMachine(compile_relax(mod, target, knobs=k), tvm.cpu())
        outs.append(vm["main"](tvm.runtime.tensor(x)).numpy())
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)

    again, report2 = kt.knob_tune(mod, target, cache_dir=tmp_path, progress=False, measure=fake)
    assert fake.calls == 1 and report2.timed == 0 and report2.cached == report2.kernels == 1
    assert again == knobs


def test_time_candidates_rejects_a_variant_that_computes_something_else(tmp_path):
    """Real timing on the tiny conv: a 'variant' without the ReLU (same buffers) is refused."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    target = get_target("host").tvm()
    [(_, relu)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "r.onnx")), target)
    [(_, plain)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "p.onnx", relu=False)), target)
    assert kt.signature(relu) == kt.signature(plain)
    base = CpuScheduleConfig.for_target(target)
    with target:
        a, _ = kt.schedule_with(relu, target, base)
        b, _ = kt.schedule_with(relu, target, kt.variant_config(base, {"max_oc_tile": 4}))
        c, _ = kt.schedule_with(plain, target, base)
    fast = kt.KnobTuneConfig(repeat=1, rounds=1, min_repeat_ms=1)
    times = kt.time_candidates([a, b, c], target, fast)
    assert times[0] is not None and times[1] is not None and times[2] is None


def test_cli_knob_tune_and_cross_target_refusal(tmp_path, monkeypatch, capsys):
    from apq.toolchain.cli import compile_main

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    onnx_path = _tiny_conv(tmp_path / "tiny.onnx")
    # NCHW: one kernel (in NHWC the model's input and output transposes are kernels too)
    argv = [str(onnx_path), "--knob-tune", "--float-layout", "NCHW", "--verify", "--json", "-o", str(tmp_path / "t.apq")]
    assert compile_main(argv) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["verify"]["passed"] and first["knob_tuning"]["kernels"] == 1
    assert first["knob_tuning"]["timed"] == 1 and Path(first["knob_tuning"]["cache_file"]).exists()
    assert compile_main(argv) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["verify"]["passed"] and second["knob_tuning"]["timed"] == 0 and second["knob_tuning"]["cached"] == 1
    assert compile_main([str(onnx_path), "--knob-tune", "--float-layout", "NCHW", "-o", str(tmp_path / "t3.apq")]) == 0
    assert "knob-tune: 1 kernels, 0 timed, 1 cached" in capsys.readouterr().out

    with pytest.raises(InvalidInputError, match="cannot knob-tune"):
        kt.knob_tune_for_target(None, get_target("raspberry-pi/4b-aarch64"))
    rc = compile_main([str(onnx_path), "--knob-tune", "--target", "raspberry-pi/4b-aarch64", "-o",
                       str(tmp_path / "arm.apq")])
    assert rc == 2 and "cannot knob-tune" in capsys.readouterr().err


def test_a_variant_must_beat_the_default_by_the_margin(tmp_path):
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    target = get_target("host").tvm()
    [(name, func)] = _prim_funcs(_lowered(_tiny_conv(tmp_path / "m.onnx")), target)
    base = CpuScheduleConfig.for_target(target)
    cfg = kt.KnobTuneConfig(min_gain=0.03)

    def fixed(times):
        return lambda funcs, _t, _c: (times + [None] * len(funcs))[:len(funcs)]

    with target:
        close = kt.tune_function(func, name, target, base, cfg, fixed([1.0, 0.98]))  # 2%: noise
        failed = kt.tune_function(func, name, target, base, cfg, fixed([1.0, None]))  # wrong/failed variant
        win = kt.tune_function(func, name, target, base, cfg, fixed([1.0, 0.9, 0.8]))
    assert close.overrides == {} and close.best_ms == 1.0
    assert failed.overrides == {} and win.best_ms == 0.8 and win.overrides
    assert win.overrides == json.loads(sorted(win.times_ms, key=win.times_ms.get)[0])


def test_choices_are_keyed_by_the_config_the_build_schedules_with(tmp_path):
    """A build whose config is not the target's default (block-merging thresholds from the target's
    L2, ``--no-fuse-blocks``) gets knob choices keyed by that config, the one its
    ``knob_schedule_pass`` looks them up with; keyed by the default they would be silently unused."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    target = get_target("host").tvm()
    mod = _lowered(_tiny_conv(tmp_path / "t.onnx"))
    build_cfg = CpuScheduleConfig.for_target(target).with_l2_cache(256 << 10)
    assert kt.space_fingerprint(build_cfg) != kt.space_fingerprint(CpuScheduleConfig.for_target(target))
    knobs, report = kt.knob_tune(mod, target, cache_dir=tmp_path, progress=False, measure=_CountingMeasure(),
                                 schedule_cfg=build_cfg)
    [(_, func)] = _prim_funcs(mod, target)
    assert report.changed == 1 and set(knobs) == {kt.func_key(func, kt.space_fingerprint(build_cfg))}


def test_block_size_knobs_scale_with_the_targets_config():
    """The merged-block knobs are relative to the base config (which takes them from the target's
    L2): a Pi's 128 KiB blocks get 64 KiB / 256 KiB variants, this host's 1 MiB ones 512 KiB / 2 MiB.
    A recorded choice holds the absolute value it was timed with."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    space = kt.KNOB_SPACE["dw-chain-nhwc"]
    for l2, expect in ((256 << 10, {64 << 10, 256 << 10}), (2 << 20, {512 << 10, 2 << 20})):
        base = CpuScheduleConfig(vector_bits=512).with_l2_cache(l2)
        assert {kt.variant_config(base, over).fuse_block_bytes for over in space} == expect
        assert all(isinstance(v, int) for over in space for v in kt.resolve_overrides(base, over).values())
    base = CpuScheduleConfig(vector_bits=512)
    assert kt.space_fingerprint(base) == kt.space_fingerprint(CpuScheduleConfig(vector_bits=512))  # deterministic
