"""Float convs in NHWC (toolchain/float_layout.py + Conv2dNHWCRule in kernels/cpu_schedules.py):
the layout pass keeps the model's function, the rule takes every NHWC float conv (and no other),
and scheduled kernels equal TVM's unscheduled build."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_cpu_schedules import (  # noqa: E402
    _assert_schedule_keeps_outputs,
    _fused,
    _ort,
    _relax_module,
    _rule_for_each_func,
    _run,
)


def _nhwc_conv_module(ic: int, oc: int, hw: int, k: int, stride: int, groups: int, relu6: bool = True):
    """(module, weights, bias): one NHWC/HWIO conv (+ bias, + ReLU6) as Relax, the form
    float_layout produces."""
    from tvm import relax

    rng = np.random.default_rng(ic * 7 + oc + hw + k + stride)
    w = (rng.standard_normal((k, k, ic // groups, oc)) * 0.2).astype("float32")
    b = rng.standard_normal((1, 1, 1, oc)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, hw, hw, ic], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=k // 2, groups=groups,
                                           data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.add(y, relax.const(b)))
            if relu6:
                y = bb.emit(relax.op.minimum(relax.op.maximum(y, relax.const(0.0)), relax.const(6.0)))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get(), w, b


def _numpy_nhwc_conv(x: np.ndarray, w: np.ndarray, stride: int, groups: int) -> np.ndarray:
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    oh = (x.shape[1] + 2 * p - k) // stride + 1
    out = np.zeros((1, oh, oh, w.shape[3]), np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i:i + stride * oh:stride, j:j + stride * oh:stride, :]
            if groups == 1:
                out += patch @ w[i, j]
            else:
                out += patch * w[i, j, 0]
    return out


def test_choose_tile_fills_the_fma_ports():
    from apq.kernels.cpu_schedules import MIN_CHAINS, choose_tile

    # 14x14 pointwise, 256 outputs, AVX-512 (16 lanes, 24 accumulators)
    f_t, fv, w_t = choose_tile({"oc": 256, "ow": 14, "depthwise": 0}, 16, 24)
    assert f_t == 16 and 14 % w_t == 0 and fv * w_t <= 24
    assert fv * w_t >= max(MIN_CHAINS, fv + w_t)  # FMA-bound: more FMAs than loads per step
    # 24 channels: 12-lane vectors (a divisor), not 16 with a tail
    assert choose_tile({"oc": 24, "ow": 56, "depthwise": 0}, 16, 24)[0] == 12
    # depthwise: one load per FMA whatever the tile, so the tile is as large as registers allow
    f_t, fv, w_t = choose_tile({"oc": 96, "ow": 56, "depthwise": 1}, 16, 24)
    assert fv * w_t >= MIN_CHAINS and fv * w_t <= 24
    # NEON: 4 lanes, 16 accumulators
    f_t, fv, w_t = choose_tile({"oc": 64, "ow": 28, "depthwise": 0}, 4, 16)
    assert f_t == 4 and fv * w_t <= 16


@pytest.mark.parametrize("ic,oc,hw,k,stride,groups", [
    (64, 256, 14, 1, 1, 1),    # pointwise, 14-pixel rows
    (32, 24, 28, 1, 1, 1),     # 24 channels: 12-lane vectors
    (96, 96, 28, 3, 1, 96),    # depthwise 3x3
    (64, 64, 28, 3, 2, 64),    # depthwise stride 2 (no de-interleaving copy in NHWC)
    (48, 48, 14, 7, 1, 48),    # depthwise 7x7: taps not unrolled
    (3, 32, 32, 3, 2, 1),      # stem
])
def test_nhwc_conv_rule_applies_and_matches_numpy(ic, oc, hw, k, stride, groups):
    from apq.targets.registry import get_target

    relu6 = groups > 1  # depthwise cases carry the ReLU6 epilogue too
    mod, w, b = _nhwc_conv_module(ic, oc, hw, k, stride, groups, relu6)
    target = get_target("host").tvm()
    chosen = _rule_for_each_func(mod, target)
    assert set(chosen.values()) == {"conv2d-nhwc"}, chosen
    x = np.random.default_rng(1).standard_normal((1, hw, hw, ic)).astype("float32")
    _assert_schedule_keeps_outputs(mod, target, [x], exact=False, atol=1e-4)
    out = _run(mod, target, [x], schedule=True)
    ref = _numpy_nhwc_conv(x, w, stride, groups) + b
    np.testing.assert_allclose(out, np.clip(ref, 0, 6) if relu6 else ref, rtol=1e-4, atol=1e-4)


def test_nchw_and_integer_convs_are_left_to_the_other_rules(mbv2_qdq):
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNHWCRule, CpuScheduleConfig
    from apq.toolchain.compile import CompileOptions
    from apq.toolchain.float_layout import has_integer_conv, to_nhwc

    mod, _, spec = _relax_module(mbv2_qdq, int8_layout="NCHW")  # lowered int8 kept in NCHW
    assert has_integer_conv(mod) and to_nhwc(mod).same_as(mod)
    target = spec.tvm()
    cfg = CpuScheduleConfig.for_target(target)
    for _, func in _fused(mod, target).functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            assert not Conv2dNHWCRule(cfg).schedule(s_tir.Schedule(func), func, cfg)
    with pytest.raises(Exception, match="unknown float layout"):
        CompileOptions(float_layout="NCHW16c")


def test_float_model_in_nhwc_has_no_clip_kernels_and_matches_onnxruntime(mbv2_float):
    from apq.toolchain.onnx_import import random_inputs

    mod, specs, spec = _relax_module(mbv2_float)  # CompileOptions default: NHWC
    text = mod.script(show_meta=False)
    assert "call_tir(cls.maximum" not in text and "call_tir(cls.minimum" not in text
    assert text.count('data_layout="NHWC"') >= 15
    # one transpose out (the classifier's flatten); none in: the stem reads the NCHW input itself
    assert text.count("R.permute_dims(") == 1, text.count("R.permute_dims(")
    chosen = _rule_for_each_func(mod, spec.tvm())
    rules = [v for k, v in chosen.items() if "conv2d" in k]
    assert set(rules) == {"conv2d-nhwc", "nchw-input-conv"} and rules.count("nchw-input-conv") == 1, chosen
    x = random_inputs(specs, 0)
    np.testing.assert_allclose(_run(mod, spec.tvm(), x, schedule=True), _ort(mbv2_float, x), rtol=1e-4, atol=1e-4)


def test_nchw_option_keeps_the_onnx_layout(mbv2_float):
    from apq.targets.registry import get_target
    from apq.toolchain.compile import CompileOptions, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    model = load_onnx(mbv2_float)
    mod = import_to_relax(model, resolve_input_specs(model, {}))
    mod, _ = lower_module(mod, model, get_target("host"), CompileOptions(float_layout="NCHW"))
    assert 'data_layout="NHWC"' not in mod.script(show_meta=False)
