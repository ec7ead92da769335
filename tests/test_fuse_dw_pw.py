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


def _dw_pw_module(c: int, oc: int, hw: int, stride: int, dw_bias: bool, residual: bool):
    """Relax: NHWC depthwise 3x3 (+ bias + ReLU6) -> 1x1 conv + bias (+ the input, when shapes
    allow), as float_layout produces; also the weights for a NumPy reference."""
    from tvm import relax

    rng = np.random.default_rng(c + oc + hw + stride)
    w1 = (rng.standard_normal((3, 3, 1, c)) * 0.3).astype("float32")
    b1 = rng.standard_normal((1, 1, 1, c)).astype("float32")
    w2 = (rng.standard_normal((1, 1, c, oc)) * 0.2).astype("float32")
    b2 = rng.standard_normal((1, 1, 1, oc)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, hw, hw, c], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), strides=stride, padding=1, groups=c,
                                           data_layout="NHWC", kernel_layout="HWIO"))
            if dw_bias:
                y = bb.emit(relax.op.add(y, relax.const(b1)))
                y = bb.emit(relax.op.minimum(relax.op.maximum(y, relax.const(0.0)), relax.const(6.0)))
            y = bb.emit(relax.op.nn.conv2d(y, relax.const(w2), data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.add(y, relax.const(b2)))
            if residual:
                y = bb.emit(relax.op.add(y, x))
            y = bb.emit_output(y)
        bb.emit_func_output(y)

    def reference(inp: np.ndarray) -> np.ndarray:
        y = _numpy_nhwc_conv(inp, w1, stride, c)
        if dw_bias:
            y = np.clip(y + b1, 0.0, 6.0)
        y = _numpy_nhwc_conv(y, w2, 1, 1) + b2
        return y + inp if residual else y

    return bb.get(), reference


def _cfg(min_bytes: int):
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    target = tvm.target.Target("llvm")
    return target, dataclasses.replace(CpuScheduleConfig.for_target(target), fuse_dw_pw_min_bytes=min_bytes)


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


@pytest.mark.parametrize("c,oc,hw,stride,dw_bias,residual", [
    (32, 16, 24, 1, True, False),    # MobileNetV2's first block
    (16, 24, 24, 2, True, False),    # stride-2 depthwise
    (24, 24, 14, 1, True, True),     # residual add in the pointwise epilogue, 14-pixel rows
    (16, 8, 12, 1, False, False),    # no depthwise epilogue: the conv writes what the 1x1 reads
])
def test_merged_kernel_equals_the_two_kernels(c, oc, hw, stride, dw_bias, residual):
    from apq.kernels.fuse_dw_pw import schedule_depthwise_pointwise

    mod, reference = _dw_pw_module(c, oc, hw, stride, dw_bias, residual)
    target, fused_cfg = _cfg(0)
    _, apart_cfg = _cfg(1 << 62)
    merged = _prepared(mod, target, fused_cfg)
    names = _primfunc_names(merged)
    assert len(names) == 1 and names[0].count("conv2d") == 2, names
    func = merged[names[0]]
    assert schedule_depthwise_pointwise(tvm.s_tir.Schedule(func), func, fused_cfg)
    assert len(_primfunc_names(_prepared(mod, target, apart_cfg))) == 2

    x = np.random.default_rng(hw).standard_normal((1, hw, hw, c)).astype("float32")
    together, apart = _run(mod, target, fused_cfg, x), _run(mod, target, apart_cfg, x)
    np.testing.assert_array_equal(together, apart)  # same arithmetic in the same order
    np.testing.assert_allclose(together, reference(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(_run(mod, target, fused_cfg, x, threads=2), apart)


def test_the_rule_schedules_merged_kernels_only():
    """The generic rule must never get a merged kernel, and the merged rule no single conv."""
    from apq.kernels.cpu_schedules import RULES
    from apq.kernels.fuse_dw_pw import is_depthwise, is_pointwise, schedule_depthwise_pointwise

    mod, _ = _dw_pw_module(32, 16, 16, 1, True, False)
    target, apart_cfg = _cfg(1 << 62)
    apart = _prepared(mod, target, apart_cfg)
    dw_name, pw_name = sorted(_primfunc_names(apart), key=lambda n: "conv2d1" in n)
    assert is_depthwise(apart[dw_name]) and not is_pointwise(apart[dw_name])
    assert is_pointwise(apart[pw_name]) and not is_depthwise(apart[pw_name])
    for name in (dw_name, pw_name):
        assert not schedule_depthwise_pointwise(tvm.s_tir.Schedule(apart[name]), apart[name], apart_cfg)
    assert list(RULES).index("dw-pw-nhwc") < list(RULES).index("generic")


def test_only_pairs_that_move_enough_bytes_merge():
    from apq.kernels.fuse_dw_pw import find_pairs

    mod, _ = _dw_pw_module(32, 16, 24, 1, True, False)
    target, cfg = _cfg(1 << 62)
    apart = _prepared(mod, target, cfg)
    moved = 2 * 24 * 24 * 32 * 4  # depthwise input + output, float32
    assert len(find_pairs(apart, moved)) == 1
    assert find_pairs(apart, moved + 1) == {}
    default = dataclasses.replace(cfg, fuse_dw_pw_min_bytes=type(cfg)().fuse_dw_pw_min_bytes)
    assert default.fuse_dw_pw_min_bytes > moved  # a 24 px pair stays two kernels by default
    assert len(_primfunc_names(_prepared(mod, target, default))) == 2


def test_mobilenetv2_with_every_pair_merged_matches_onnxruntime(tmp_path, mbv2_float, monkeypatch):
    """Whole model, every depthwise -> pointwise pair merged (down to 1x1 feature maps): outputs
    match onnxruntime and the manifest still pairs each layer with its kernel (two per merge)."""
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.verify import verify_artifact

    derive = CpuScheduleConfig.for_target
    monkeypatch.setattr(CpuScheduleConfig, "for_target",
                        staticmethod(lambda t: dataclasses.replace(derive(t), fuse_dw_pw_min_bytes=0)))
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
    names = _primfunc_names(_prepared(mod, target, CpuScheduleConfig.for_target(target)))
    merged = [n for n in names if n.count("conv2d") == 2]
    dw_layers = [layer for layer in layers if layer["geometry"].get("op") == "dwconv"]
    assert len(merged) >= len(dw_layers) // 2 > 0, names  # identical pairs share one kernel
