"""Depthwise -> pointwise pairs merged into one kernel (kernels/fuse_dw_pw.py): which pairs merge,
that the merged kernel is scheduled by its own rule (not the generic fallback), that it computes
exactly what the two kernels compute apart (1 and 2 threads), and that the manifest still pairs
every layer with its kernel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_nhwc_conv import _numpy_nhwc_conv  # noqa: E402


def _dw_pw_module(c: int, oc: int, hw: int, stride: int, dw_bias: bool, residual: bool,
                  expand_from: int = 0, project: bool = True):
    """Relax: [1x1 expansion from ``expand_from`` channels + bias + ReLU6 ->] NHWC depthwise 3x3
    (+ bias + ReLU6) [-> 1x1 conv + bias (+ the input, when shapes allow)], as float_layout
    produces; also a NumPy reference."""
    from tvm import relax

    rng = np.random.default_rng(c + oc + hw + stride + expand_from)
    w0 = (rng.standard_normal((1, 1, max(expand_from, 1), c)) * 0.3).astype("float32")
    b0 = rng.standard_normal((1, 1, 1, c)).astype("float32")
    w1 = (rng.standard_normal((3, 3, 1, c)) * 0.3).astype("float32")
    b1 = rng.standard_normal((1, 1, 1, c)).astype("float32")
    w2 = (rng.standard_normal((1, 1, c, oc)) * 0.2).astype("float32")
    b2 = rng.standard_normal((1, 1, 1, oc)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, hw, hw, expand_from or c], "float32"))

    def relu6(v):
        return relax.op.minimum(relax.op.maximum(v, relax.const(0.0)), relax.const(6.0))

    with bb.function("main", [x]):
        with bb.dataflow():
            y = x
            if expand_from:
                y = bb.emit(relax.op.nn.conv2d(y, relax.const(w0), data_layout="NHWC", kernel_layout="HWIO"))
                y = bb.emit(relu6(relax.op.add(y, relax.const(b0))))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w1), strides=stride, padding=1, groups=c,
                                           data_layout="NHWC", kernel_layout="HWIO"))
            if dw_bias:
                y = bb.emit(relu6(relax.op.add(y, relax.const(b1))))
            if project:
                y = bb.emit(relax.op.nn.conv2d(y, relax.const(w2), data_layout="NHWC", kernel_layout="HWIO"))
                y = bb.emit(relax.op.add(y, relax.const(b2)))
                if residual:
                    y = bb.emit(relax.op.add(y, x))
            y = bb.emit_output(y)
        bb.emit_func_output(y)

    def reference(inp: np.ndarray) -> np.ndarray:
        y = np.clip(_numpy_nhwc_conv(inp, w0, 1, 1) + b0, 0.0, 6.0) if expand_from else inp
        y = _numpy_nhwc_conv(y, w1, stride, c)
        if dw_bias:
            y = np.clip(y + b1, 0.0, 6.0)
        if not project:
            return y
        y = _numpy_nhwc_conv(y, w2, 1, 1) + b2
        return y + inp if residual else y

    return bb.get(), reference


def _cfg(min_bytes: int, block_bytes: int | None = None):
    """(target, config) with both fusion thresholds at ``min_bytes``."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    target = tvm.target.Target("llvm")
    cfg = dataclasses.replace(CpuScheduleConfig.for_target(target), fuse_dw_pw_min_bytes=min_bytes,
                              fuse_pw_dw_min_bytes=min_bytes)
    return target, cfg if block_bytes is None else dataclasses.replace(cfg, fuse_block_bytes=block_bytes)


def _prepared(mod, target, cfg):
    from apq.kernels.pipeline import prepare_passes

    with target:
        return tvm.transform.Sequential(prepare_passes(target, cfg))(mod)


def _primfunc_names(mod) -> list[str]:
    return [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def _run(mod, target, cfg, x: np.ndarray, threads: int = 1) -> np.ndarray:
    from tvm import relax

    from apq.kernels.pipeline import compile_relax
    from apq.toolchain.profile import set_runtime_threads

    set_runtime_threads(threads)
    try:
        vm = relax.VirtualMachine(compile_relax(mod, target, cfg=cfg), tvm.cpu())
        return vm["main"](tvm.runtime.tensor(x)).numpy()
    finally:
        set_runtime_threads(1)


def _check_merged(mod, reference, x: np.ndarray, convs: int, block_bytes: int | None = None) -> None:
    """Fused into one PrimFunc of ``convs`` convs that the chain rule schedules; bit-identical to
    the kernels apart at 1 and 2 threads; within float tolerance of NumPy."""
    from apq.kernels.fuse_dw_pw import conv_chain, schedule_depthwise_chain

    target, fused_cfg = _cfg(0, block_bytes)
    _, apart_cfg = _cfg(1 << 62)
    merged = _prepared(mod, target, fused_cfg)
    names = _primfunc_names(merged)
    assert len(names) == 1 and len(conv_chain(merged[names[0]])) == convs, names
    func = merged[names[0]]
    assert schedule_depthwise_chain(tvm.s_tir.Schedule(func), func, fused_cfg)
    assert len(_primfunc_names(_prepared(mod, target, apart_cfg))) == convs

    together, apart = _run(mod, target, fused_cfg, x), _run(mod, target, apart_cfg, x)
    np.testing.assert_array_equal(together, apart)  # same arithmetic in the same order
    np.testing.assert_allclose(together, reference(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(_run(mod, target, fused_cfg, x, threads=2), apart)


@pytest.mark.parametrize("c,oc,hw,stride,dw_bias,residual", [
    (32, 16, 24, 1, True, False),    # MobileNetV2's first block
    (16, 24, 24, 2, True, False),    # stride-2 depthwise
    (24, 24, 14, 1, True, True),     # residual add in the pointwise epilogue, 14-pixel rows
    (16, 8, 12, 1, False, False),    # no depthwise epilogue: the conv writes what the 1x1 reads
])
def test_depthwise_project_kernel_equals_the_two_kernels(c, oc, hw, stride, dw_bias, residual):
    mod, reference = _dw_pw_module(c, oc, hw, stride, dw_bias, residual)
    x = np.random.default_rng(hw).standard_normal((1, hw, hw, c)).astype("float32")
    _check_merged(mod, reference, x, convs=2)


@pytest.mark.parametrize("c_in,c,oc,hw,stride,residual,project,block_bytes", [
    (16, 48, 24, 24, 2, False, True, None),     # MobileNetV2's second block: expand, s2, project
    (8, 32, 8, 16, 1, True, True, None),        # stride 1 with the residual add
    (8, 32, 8, 15, 2, False, True, 1),          # one-row blocks: every block has a halo; odd size
    (8, 32, 8, 16, 1, False, True, 3 * 16 * 32 * 4 * 2),  # 4-row blocks at stride 1
    (8, 24, 0, 16, 2, False, False, None),      # expand -> depthwise, no project
])
def test_expand_depthwise_kernel_equals_the_kernels(c_in, c, oc, hw, stride, residual, project, block_bytes):
    mod, reference = _dw_pw_module(c, oc or c, hw, stride, True, residual, expand_from=c_in, project=project)
    x = np.random.default_rng(hw + c).standard_normal((1, hw, hw, c_in)).astype("float32")
    _check_merged(mod, reference, x, convs=3 if project else 2, block_bytes=block_bytes)


def test_rows_per_block_fits_the_budget_with_its_halo():
    from apq.kernels.fuse_dw_pw import rows_per_block

    row = 112 * 64 * 4  # one expanded 112 px row of 64 floats
    # 56 stride-2 output rows: 14 need 29 input rows (831 KB), 28 would need 57
    assert rows_per_block(56, 2, 3, row, 1 << 20) == 14
    assert rows_per_block(56, 2, 3, row, 512 << 10) == 8
    assert rows_per_block(56, 1, 3, row, 0) == 1  # nothing fits: one row at a time
    assert rows_per_block(7, 1, 3, row, 1 << 30) == 7


def test_the_rule_schedules_merged_kernels_only():
    """The generic rule must never get a merged kernel, and the chain rule no single conv."""
    from apq.kernels.cpu_schedules import RULES
    from apq.kernels.fuse_dw_pw import conv_chain, schedule_depthwise_chain

    mod, _ = _dw_pw_module(32, 16, 16, 1, True, False, expand_from=8)
    target, apart_cfg = _cfg(1 << 62)
    apart = _prepared(mod, target, apart_cfg)
    chains = sorted(conv_chain(apart[name]) for name in _primfunc_names(apart))
    assert chains == [("dw",), ("pw",), ("pw",)]
    for name in _primfunc_names(apart):
        assert not schedule_depthwise_chain(tvm.s_tir.Schedule(apart[name]), apart[name], apart_cfg)
    assert list(RULES).index("dw-chain-nhwc") < list(RULES).index("generic")


def test_only_pairs_that_move_enough_bytes_merge():
    from apq.kernels.fuse_dw_pw import depthwise_project_test, expand_depthwise_test, find_pairs

    mod, _ = _dw_pw_module(32, 16, 24, 1, True, False, expand_from=8)
    target, cfg = _cfg(1 << 62)
    apart = _prepared(mod, target, cfg)
    tensor = 24 * 24 * 32 * 4  # the expanded tensor and the depthwise output, float32
    at = lambda dw_pw, pw_dw: dataclasses.replace(cfg, fuse_dw_pw_min_bytes=dw_pw, fuse_pw_dw_min_bytes=pw_dw)  # noqa: E731
    assert len(find_pairs(apart, depthwise_project_test(at(2 * tensor, 0)))) == 1
    assert find_pairs(apart, depthwise_project_test(at(2 * tensor + 1, 0))) == {}
    assert len(find_pairs(apart, expand_depthwise_test(at(0, tensor)))) == 1
    assert find_pairs(apart, expand_depthwise_test(at(0, tensor + 1))) == {}
    default = type(cfg)()
    assert default.fuse_dw_pw_min_bytes > 2 * tensor and default.fuse_pw_dw_min_bytes > tensor
    default_cfg = at(default.fuse_dw_pw_min_bytes, default.fuse_pw_dw_min_bytes)
    assert len(_primfunc_names(_prepared(mod, target, default_cfg))) == 3  # a 24 px block stays apart


def _force_merges(monkeypatch) -> None:
    """Every depthwise pair merges: thresholds 0, both where a config is derived from a TVM target
    and where a build sets them from the target's L2 (``compile.schedule_config``)."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    derive = CpuScheduleConfig.for_target
    monkeypatch.setattr(CpuScheduleConfig, "for_target", staticmethod(
        lambda t: dataclasses.replace(derive(t), fuse_dw_pw_min_bytes=0, fuse_pw_dw_min_bytes=0)))
    monkeypatch.setattr(CpuScheduleConfig, "with_l2_cache", lambda self, _l2: self)


def test_mobilenetv2_with_every_pair_merged_matches_onnxruntime(tmp_path, mbv2_float, monkeypatch):
    """Whole model, every depthwise -> pointwise pair merged (down to 1x1 feature maps): outputs
    match onnxruntime and the manifest still pairs each layer with its kernel (two per merge)."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.verify import verify_artifact

    _force_merges(monkeypatch)
    res = compile_onnx(mbv2_float, "host", tmp_path / "merged.apq")
    art = open_artifact(res.artifact_path, "host")
    rep = verify_artifact(art, mbv2_float, seed=3)
    assert rep.passed and rep.max_abs_err < 1e-4, rep.to_json()
    layers = art.manifest["layers"]
    # "unknown" would mean the merged kernels were not counted as two layers each
    assert all(layer["impl"] == "float" for layer in layers), {layer["impl"] for layer in layers}

    from test_cpu_schedules import _relax_module

    mod, _, spec = _relax_module(mbv2_float)
    target = spec.tvm()
    prepared = _prepared(mod, target, CpuScheduleConfig.for_target(target))
    from apq.kernels.fuse_dw_pw import conv_chain

    chains = [conv_chain(prepared[name]) for name in _primfunc_names(prepared)]
    assert ("pw", "dw", "pw") in chains and ("dw",) not in chains, chains  # every depthwise conv merged


@pytest.mark.qemu
def test_merged_kernels_run_right_on_aarch64_under_qemu(tmp_path, mbv2_float, monkeypatch):
    """The merged kernels cross-compiled for a Pi (NEON tiles, 4 cores: parallel row blocks)."""
    from apq.targets.qemu import qemu_available
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.verify import verify_artifact

    ok, why = qemu_available()
    if not ok:
        pytest.skip(why)
    _force_merges(monkeypatch)
    target = "raspberry-pi/4b-aarch64"
    art = open_artifact(compile_onnx(mbv2_float, target, tmp_path / "arm.apq").artifact_path, target)
    rep = verify_artifact(art, mbv2_float, seed=4)
    assert rep.executed_on == "qemu-aarch64"
    assert rep.passed and rep.max_abs_err < 1e-4, rep.to_json()
    assert all(layer["impl"] == "float" for layer in art.manifest["layers"])


def test_rows_per_block_are_a_knob():
    """Knob tuning times the block sizes of a merged expansion (each variant must compute what the
    default computes, or time_candidates rejects it) and a merged pair without one times nothing."""
    from apq.kernels import knob_tuning as kt

    target, cfg = _cfg(0)
    cfg = dataclasses.replace(cfg, fuse_block_bytes=1 << 20)
    prefer_variant = lambda funcs, t, c: [1.0] + [0.5] * (len(funcs) - 1)  # noqa: E731
    # 112 px, 64 expanded channels, stride 2: 28.7 KB per expanded row -> 14, 8, 28 rows per block
    mod, _ = _dw_pw_module(64, 24, 112, 2, True, False, expand_from=16)
    [name] = _primfunc_names(merged := _prepared(mod, target, cfg))
    choice = kt.tune_function(merged[name], name, target, cfg, kt.KnobTuneConfig(), measure=prefer_variant)
    assert choice.rule == "dw-chain-nhwc" and choice.candidates == 3 and choice.overrides
    variants = [kt.schedule_with(merged[name], target, kt.variant_config(cfg, over))[0]
                for over in ({}, *kt.KNOB_SPACE["dw-chain-nhwc"])]
    times = kt.time_candidates(variants, target, kt.KnobTuneConfig(rounds=1, repeat=1, min_repeat_ms=0))
    assert all(t is not None for t in times), times

    mod, _ = _dw_pw_module(32, 16, 24, 1, True, False)
    [name] = _primfunc_names(merged := _prepared(mod, target, cfg))
    choice = kt.tune_function(merged[name], name, target, cfg, kt.KnobTuneConfig(), measure=prefer_variant)
    assert choice.rule == "dw-chain-nhwc" and choice.candidates == 1 and not choice.overrides


def test_no_fuse_blocks_builds_every_conv_as_its_own_kernel(tmp_path, mbv2_float, monkeypatch, capsys):
    """``apq compile --no-fuse-blocks`` reaches the build: with merging forced on (thresholds 0)
    the default build has merged kernels, the switched-off one none, and both pair every layer."""
    import json

    from apq.targets.registry import get_target
    from apq.toolchain.cli import compile_main
    from apq.toolchain.compile import CompileOptions, build_library_traced, schedule_config
    from test_cpu_schedules import _relax_module

    _force_merges(monkeypatch)
    spec = get_target("host")
    mod, _, _ = _relax_module(mbv2_float)
    calls = {}
    for on in (True, False):
        sched_cfg = schedule_config(spec, CompileOptions(fuse_blocks=on))
        assert sched_cfg.fuse_blocks == on
        (tmp_path / str(on)).mkdir()
        _, calls[on] = build_library_traced(mod, spec, tmp_path / str(on), schedule_cfg=sched_cfg)
    merged = {on: {c.function for c in calls[on] if c.function.count("conv2d") > 1} for on in calls}
    assert merged[True] and not merged[False]
    assert len(calls[True]) == len(calls[False])  # one call per layer either way

    out = tmp_path / "off.apq"
    assert compile_main([str(mbv2_float), "-o", str(out), "--no-fuse-blocks", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] and all(layer["impl"] == "float" for layer in report["layers"])
    from apq.toolchain.artifact import open_artifact

    assert open_artifact(out, "host").manifest["compile"]["options"]["fuse_blocks"] is False
