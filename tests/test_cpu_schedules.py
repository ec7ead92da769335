"""apq's CPU schedule rules: they must apply (not silently fall back), keep outputs identical
(float within 1e-5, int8 bit-exact) and actually make kernels faster."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def _relax_module(onnx_path, target_name: str = "host", **options):
    from apq.targets.registry import get_target
    from apq.toolchain.compile import CompileOptions, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    spec = get_target(target_name)
    model = load_onnx(onnx_path)
    specs = resolve_input_specs(model, {})
    mod = import_to_relax(model, specs)
    mod, _ = lower_module(mod, model, spec, CompileOptions(target=target_name, **options))
    return mod, specs, spec


def _fused(mod, target):
    """The PrimFuncs the schedule pass sees (the build's own legalize + fuse passes)."""
    from apq.kernels.pipeline import prepare_passes

    with target:
        return tvm.transform.Sequential(prepare_passes(target))(mod)


def _run(mod, target, inputs, schedule: bool) -> np.ndarray:
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, target, schedule=schedule), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return (out if hasattr(out, "numpy") else out[0]).numpy()


def _scheduled_single_primfunc(mod, target):
    """The one PrimFunc of a one-kernel module, fused and scheduled by apq's rules."""
    from apq.kernels.pipeline import schedule_pass

    with target:
        scheduled = schedule_pass()(_fused(mod, target))
    (func,) = [f for gv, f in scheduled.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    return func


def _assert_schedule_keeps_outputs(mod, target, inputs, exact: bool, atol: float = 1e-5) -> None:
    """apq's schedules vs TVM's unscheduled build: integer outputs identical, float within 1e-5
    relative (``atol`` absolute)."""
    fast, slow = _run(mod, target, inputs, True), _run(mod, target, inputs, False)
    if exact:
        np.testing.assert_array_equal(fast, slow)
    else:
        np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=atol)


def _ort(onnx_path, inputs) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: inputs[0]})[0]


def _rule_for_each_func(mod, target) -> dict[str, str]:
    from tvm import s_tir

    from apq.kernels.cpu_schedules import RULES, CpuScheduleConfig

    cfg = CpuScheduleConfig.for_target(target)
    chosen = {}
    for gv, func in _fused(mod, target).functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        for name, rule in RULES.items():
            if rule(cfg).schedule(s_tir.Schedule(func), func, cfg):
                chosen[gv.name_hint] = name
                break
    return chosen


# --------------------------------------------------------------------------- config


def test_config_from_targets_and_json_roundtrip():
    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.targets.registry import get_target

    arm = CpuScheduleConfig.for_target(get_target("raspberry-pi/4b-aarch64").tvm())
    assert arm.vector_bits == 128 and arm.lanes(32) == 4 and arm.num_cores == 4  # NEON
    assert (arm.accumulators, arm.max_oc_tile) == (16, 8)  # no register-tile entry: the defaults
    host_spec = get_target("host")
    host = CpuScheduleConfig.for_target(host_spec.tvm())
    if "avx512f" in host_spec.features:
        assert host.lanes(32) == 16 and host.lanes(8) == 64
        assert (host.accumulators, host.max_oc_tile) == (24, 16)  # 32 zmm registers
    elif "avx2" in host_spec.features:
        assert host.lanes(32) == 8
    assert CpuScheduleConfig.from_json(host.to_json()) == host


# --------------------------------------------------------------------------- rules apply


def test_every_conv_and_matmul_gets_its_rule(mbv2_float, mbv2_qdq):
    from apq.targets.registry import get_target

    # float convs run NHWC by default (CompileOptions.float_layout); lowered int8 convs NCHW when
    # asked, NHWC by default on VNNI hosts (packed pointwise and packed depthwise rules)
    # (model, options, rules of the convs, patch gathers): the float RGB stem reads the NCHW input
    # directly (kernels/nchw_input_conv.py), the int8 NHWC one is gathered (toolchain/patch_gather.py)
    cases = [(mbv2_float, {}, {"conv2d-nhwc", "nchw-input-conv"}, []),
             (mbv2_qdq, {"int8_layout": "NCHW"}, {"conv2d-nchw"}, [])]
    if "avx512vnni" in get_target("host").features:
        cases.append((mbv2_qdq, {}, {"int8-pointwise-nhwc", "int8-depthwise-nhwc"}, ["im2col"]))
    for path, options, rules, want_gathers in cases:
        mod, _, spec = _relax_module(path, **options)
        chosen = _rule_for_each_func(mod, spec.tvm())
        convs = {k: v for k, v in chosen.items() if "conv2d" in k or "depthwise" in k}
        assert len(convs) >= 15, chosen
        assert set(convs.values()) == rules, convs
        assert sum(v == "nchw-input-conv" for v in convs.values()) == ("nchw-input-conv" in rules), convs
        # the classifier: apq's matmul rule, or the packed VNNI kernel where int8_layout packed it
        matmuls = {k: v for k, v in chosen.items() if "matmul" in k}
        assert len(matmuls) == 1, chosen
        assert all(v == ("int8-pointwise-nhwc" if "packed" in k else "matmul") for k, v in matmuls.items()), matmuls
        gathers = [v for k, v in chosen.items() if k.startswith("im2col")]
        assert gathers == want_gathers, chosen


def test_scheduled_conv_is_parallel_vectorized_and_exact(mbv2_qdq):
    """One integer pointwise conv (with its requantize epilogue): the NCHW rule must parallelize and
    vectorize it and compute exactly what the unscheduled PrimFunc computes. How much faster it
    runs is a benchmark (bench/schedule_vs_default.py), not a test: wall time on a shared machine
    is not a correctness property."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig

    mod, _, spec = _relax_module(mbv2_qdq, int8_layout="NCHW")  # the NCHW rule's path
    target = spec.tvm()
    fused = _fused(mod, target)
    # parallel loops are only emitted above min_parallel_work (a region costs ~1 us at 2 threads,
    # see CpuScheduleConfig); lower it so this small model's conv must get one
    cfg = dataclasses.replace(CpuScheduleConfig.for_target(target), min_parallel_work=1)
    name, func = max(((gv.name_hint, f) for gv, f in fused.functions_items()
                      if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint),
                     key=lambda kv: sum(int(np.prod([int(s) for s in p.shape])) for p in kv[1].params))
    func = func.with_attr("global_symbol", "main")
    sch = s_tir.Schedule(func)
    assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg), name
    script = sch.mod["main"].script()
    assert "T.vectorized" in script and "T.parallel" in script, script[:2000]

    rng = np.random.default_rng(0)
    args = [(rng.integers(-50, 50, [int(s) for s in p.shape]) if "int" in str(p.dtype)
             else rng.standard_normal([int(s) for s in p.shape])).astype(str(p.dtype)) for p in func.params]
    outs = {}
    for label, f in (("naive", func), ("apq", sch.mod["main"])):
        lib = tvm.compile(tvm.IRModule({"main": f}), target).jit()
        targs = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*targs)
        outs[label] = targs[-1].numpy()
    assert np.any(outs["naive"] != outs["naive"].flat[0]), "degenerate output: the comparison would be vacuous"
    np.testing.assert_array_equal(outs["apq"], outs["naive"])


def _depthwise_module(channels: int, hw: int, stride: int, dtype: str):
    """A bare padded 3x3 depthwise conv (float32, or uint8 x int8 -> int32) as Relax."""
    from tvm import relax

    rng = np.random.default_rng(channels + hw + stride)
    if dtype == "float32":
        w = rng.standard_normal((channels, 1, 3, 3)).astype("float32")
        x_ty, out = "float32", "float32"
    else:
        w = rng.integers(-128, 128, (channels, 1, 3, 3)).astype("int8")
        x_ty, out = "uint8", "int32"
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, channels, hw, hw], x_ty))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=1, groups=channels,
                                           out_dtype=out))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_small_convs_get_no_parallel_region_and_a_vector_padding_fill(dtype):
    """Below min_parallel_work no T.parallel (~1 us per region at 2 threads); the padding fill of a
    34-wide row is vectorized (it used to be a scalar loop) and outputs stay exact."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    mod = _depthwise_module(8, 32, 1, dtype)
    fused = _fused(mod, target)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(func)
    cfg = dataclasses.replace(cfg, num_cores=2)
    assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg)
    script = sch.mod["main"].script()
    assert "T.parallel" not in script  # 32*32*8*9 depthwise multiply-adds, weighted x2: < 3 * 2**16
    fill = script[script.index('T.sblock("pad_temp_pad_const")') - 200:script.index('T.sblock("pad_temp_pad_const")')]
    assert "T.vectorized(T.int64(34))" in fill, fill
    # a big conv still gets its parallel region (multi-core targets)
    big = dataclasses.replace(cfg, num_cores=2, min_parallel_work=1 << 16)
    sch = s_tir.Schedule(func)
    assert Conv2dNCHWRule(big).schedule(sch, func, big)
    assert "T.parallel" in sch.mod["main"].script()


def test_parallel_decision_weighs_iterations_by_kernel_kind():
    """worth_parallel compares estimated work, not raw iterations: a gathered element counts 16
    multiply-adds, a VNNI multiply-add half of one, a depthwise one two, a streamed GEMV one a
    quarter; 1-core targets never."""
    from apq.kernels.cpu_schedules import PARALLEL_WORK_WEIGHT, CpuScheduleConfig, worth_parallel

    cfg = dataclasses.replace(CpuScheduleConfig(), num_cores=2)
    limit = cfg.min_parallel_work
    assert worth_parallel(cfg, limit) and not worth_parallel(cfg, limit - 1)
    assert worth_parallel(cfg, limit // 16, "gather_element") and not worth_parallel(cfg, limit // 17, "element")
    assert worth_parallel(cfg, limit // 2, "depthwise_mac") and not worth_parallel(cfg, limit // 2, "mac")
    assert not worth_parallel(cfg, limit, "int8_dot_mac") and worth_parallel(cfg, 2 * limit, "int8_dot_mac")
    assert not worth_parallel(dataclasses.replace(cfg, num_cores=1), 1 << 40)
    with pytest.raises(KeyError):
        worth_parallel(cfg, limit, "no-such-kind")
    assert worth_parallel(cfg, limit, "mac") and not worth_parallel(cfg, 3 * limit, "gemv_mac")
    assert set(PARALLEL_WORK_WEIGHT) == {"mac", "depthwise_mac", "int8_dot_mac", "gemv_mac", "element",
                                         "gather_element"}


@pytest.mark.parametrize("dtype,stride", [("float32", 1), ("float32", 2), ("uint8", 1), ("uint8", 2)])
def test_depthwise_scheduled_matches_unscheduled(dtype, stride):
    """Exact, with the padding computed per channel block (inside the channel-block loop, not
    one whole-tensor copy at the root: 224 px depthwise convs 0.44 -> 0.31 ms)."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    mod = _depthwise_module(16, 12, stride, dtype)
    cfg = CpuScheduleConfig.for_target(target)
    (func,) = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(func)
    assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg)
    script = sch.mod["main"].script()
    assert script.index("for nn_ff_0_fused in") < script.index('T.sblock("pad_temp")'), script
    if stride == 1:  # a vectorizable fill + interior copy instead of a branchy copy
        assert script.index("for nn_ff_0_fused in") < script.index('T.sblock("pad_temp_pad_const")'), script
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((1, 16, 12, 12)).astype("float32") if dtype == "float32"
         else rng.integers(0, 256, (1, 16, 12, 12)).astype("uint8"))
    _assert_schedule_keeps_outputs(mod, target, [x], exact=dtype != "float32")


def _pointwise_module(ic: int, oc: int, hw: int, dtype: str):
    """A bare 1x1 conv + ReLU (float32, or uint8 x int8 -> int32) as Relax."""
    from tvm import relax

    rng = np.random.default_rng(ic + oc + hw)
    if dtype == "float32":
        w, x_ty, out = rng.standard_normal((oc, ic, 1, 1)).astype("float32"), "float32", "float32"
    else:
        w, x_ty, out = rng.integers(-128, 128, (oc, ic, 1, 1)).astype("int8"), "uint8", "int32"
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, ic, hw, hw], x_ty))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), out_dtype=out))
            y = bb.emit_output(bb.emit(relax.op.nn.relu(y)))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype,hw", [("float32", 28), ("float32", 14), ("uint8", 28), ("uint8", 14)])
def test_pointwise_rows_that_are_no_vector_multiple(dtype, hw):
    """28- and 14-pixel rows (MobileNetV2 at 224 px): the float conv gets whole 16-lane vector
    tiles over the flat H*W axis (it used to fall to 1-pixel or 28-lane tiles, 4-18x slower),
    tiles that cross rows keep outputs exact."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    mod = _pointwise_module(8, 24, hw, dtype)
    cfg = CpuScheduleConfig.for_target(target)
    if dtype == "float32" and cfg.lanes(32) == 16:
        (func,) = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        sch = s_tir.Schedule(func)
        assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg)
        script = sch.mod["main"].script()
        lanes = "T.vectorized(T.int64(16))" if hw == 28 else "T.vectorized(T.int64(14))"
        assert lanes in script and "T.vectorized(T.int64(28))" not in script, script[:3000]
    rng = np.random.default_rng(hw)
    x = (rng.standard_normal((1, 8, hw, hw)).astype("float32") if dtype == "float32"
         else rng.integers(0, 256, (1, 8, hw, hw)).astype("uint8"))
    _assert_schedule_keeps_outputs(mod, target, [x], exact=dtype != "float32")


def _stem_module(dtype: str):
    """A 3->16 3x3 stride-2 conv on an input that arrives already padded (no pad block in
    the fused function), like the int8 stem after qdq_lowering's zero-point padding."""
    from tvm import relax

    rng = np.random.default_rng(7)
    if dtype == "float32":
        w, x_ty, out = rng.standard_normal((16, 3, 3, 3)).astype("float32"), "float32", "float32"
    else:
        w, x_ty, out = rng.integers(-128, 128, (16, 3, 3, 3)).astype("int8"), "uint8", "int32"
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, 34, 34], x_ty))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=2, out_dtype=out)))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_strided_conv_on_a_prepadded_input_is_deinterleaved_and_row_tiled(dtype):
    """No padding block to deinterleave: the rule copies the input into [.., W % 2, W // 2]
    (contiguous vector loads) and tiles several output rows (the stem at 224 px: int8
    0.67 -> 0.50 ms); outputs stay exact."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    mod = _stem_module(dtype)
    (func,) = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(func)
    assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg)
    script = sch.mod["main"].script()
    assert "T.int64(2), T.int64(17)" in script, script[:2000]  # the deinterleaved copy of W=34
    assert "for yy_1 in T.unroll(T.int64(4))" in script, script[:4000]  # 16 output rows, 4 per tile
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 3, 34, 34)).astype("float32") if dtype == "float32"
         else rng.integers(0, 256, (1, 3, 34, 34)).astype("uint8"))
    _assert_schedule_keeps_outputs(mod, target, [x], exact=dtype != "float32")


# --------------------------------------------------------------------------- whole models


def test_float_model_scheduled_matches_unscheduled_and_onnxruntime(mbv2_float):
    from apq.toolchain.onnx_import import random_inputs

    mod, specs, spec = _relax_module(mbv2_float)
    x = random_inputs(specs, 0)
    fast = _run(mod, spec.tvm(), x, schedule=True)
    slow = _run(mod, spec.tvm(), x, schedule=False)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fast, _ort(mbv2_float, x), rtol=1e-4, atol=1e-4)


def test_int8_model_scheduled_is_bit_exact(mbv2_qdq):
    from apq.toolchain.onnx_import import random_inputs

    mod, specs, spec = _relax_module(mbv2_qdq)
    x = random_inputs(specs, 0)
    fast = _run(mod, spec.tvm(), x, schedule=True)
    slow = _run(mod, spec.tvm(), x, schedule=False)
    np.testing.assert_array_equal(fast, slow)  # integer kernels: same int32 sums, same requant
    ref = _ort(mbv2_qdq, x)
    # vs onnxruntime: rare 1-LSB requantization flips (float32 rescale), as in qdq_lowering's tests
    assert np.abs(fast - ref).max() < 0.1 * np.abs(ref).max() + 1e-3


def test_arm_target_compiles_with_the_rules(mbv2_qdq):
    """Cross target: the rules pick NEON widths and LLVM accepts the scheduled aarch64 module."""
    from apq.kernels.pipeline import compile_relax

    mod, _, spec = _relax_module(mbv2_qdq, "raspberry-pi/4b-aarch64")
    chosen = _rule_for_each_func(mod, spec.tvm())
    assert "conv2d-nchw" in chosen.values()
    ex = compile_relax(mod, spec.tvm())
    assert ex is not None


@pytest.mark.slow
def test_224px_models_scheduled_match_unscheduled(tmp_path):
    """ImageNet resolution (rows of 112/56/28/14 pixels, the shapes the tile choices are
    about): float identical within 1e-5, int8 bit-exact vs TVM's unscheduled build (~25 s)."""
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.onnx_import import random_inputs

    fp = mobilenetv2_onnx(tmp_path / "m224.onnx", resolution=224, classes=1000)
    q8 = quantize_qdq(fp, tmp_path / "m224_q.onnx")
    for path in (fp, q8):
        mod, specs, spec = _relax_module(path)
        x = random_inputs(specs, 0)
        _assert_schedule_keeps_outputs(mod, spec.tvm(), x, exact=path != fp)


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_depthwise_tile_is_one_channel_by_several_rows(dtype):
    """A 3x3 depthwise conv tiles 1 channel x 7 rows x one vector row with the taps unrolled
    (input rows shared by up to 3 output rows), not 8 channels x 1 row (load-bound); a row
    count with no divisor <= 7 (13) falls back to channel tiles. Exact either way."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    for hw, rows, chans in ((28, 7, 1), (13, 1, min(cfg.max_oc_tile, 16))):  # (16 on AVX-512, 8 elsewhere)
        mod = _depthwise_module(16, hw, 1, dtype)
        (func,) = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
        sch = s_tir.Schedule(func)
        assert Conv2dNCHWRule(cfg).schedule(sch, func, cfg)
        script = sch.mod["main"].script()
        assert f"for ff_1 in T.unroll(T.int64({chans})):" in script, script
        assert ("for yy_1 in T.unroll(T.int64(7)):" in script) == (rows == 7), script
        rng = np.random.default_rng(hw)
        x = (rng.standard_normal((1, 16, hw, hw)).astype("float32") if dtype == "float32"
             else rng.integers(0, 256, (1, 16, hw, hw)).astype("uint8"))
        _assert_schedule_keeps_outputs(mod, target, [x], exact=dtype != "float32")


@pytest.mark.parametrize("dtype", ["float32", "uint8"])
def test_batch1_dense_streams_weight_rows_and_matches_unscheduled(dtype):
    """A [1, K] x [K, N] classifier: the reduction is outermost (each weight row read once,
    contiguously: 320x1000 float 0.063 -> 0.033 ms hot, 0.60 -> 0.51 ms cold) and the output
    is unchanged (float within 1e-5, integers exact)."""
    from tvm import relax, s_tir

    from apq.kernels.cpu_schedules import CpuScheduleConfig, MatmulRule
    from apq.targets.registry import get_target

    rng = np.random.default_rng(7)
    k, n = 64, 1000
    if dtype == "float32":
        w, x, out = rng.standard_normal((k, n)).astype("float32"), rng.standard_normal((1, k)).astype("float32"), dtype
    else:
        w, x, out = rng.integers(-128, 128, (k, n)).astype("int8"), rng.integers(0, 256, (1, k)).astype(dtype), "int32"
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType([1, k], dtype))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.matmul(xv, relax.const(w), out_dtype=out)))
        bb.emit_func_output(y)
    mod = bb.get()
    target = get_target("host").tvm()
    cfg = CpuScheduleConfig.for_target(target)
    (func,) = [f for _, f in _fused(mod, target).functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = s_tir.Schedule(func)
    assert MatmulRule(cfg).schedule(sch, func, cfg)
    script = sch.mod["main"].script()
    assert re.search(rf"for k, \w+ in T\.grid\(T\.int64\({k}\), ", script), script  # k outside the outputs
    _assert_schedule_keeps_outputs(mod, target, [x], exact=dtype != "float32", atol=1e-4)


def test_few_channel_transpose_vectorizes_the_input_row_and_matches_unscheduled():
    """NCHW -> NHWC of a 3-channel image fused with its quantize (an int8 model's input): the
    vector loop runs along the input's contiguous row (16 float lanes), not the 3 channels."""
    from tvm import relax

    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 3, 32, 32], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = relax.op.quantize(x, relax.const(np.float32(0.02)), relax.const(np.uint8(127)), axis=1,
                                  out_dtype="uint8")
            y = bb.emit_output(bb.emit(relax.op.permute_dims(q, [0, 2, 3, 1])))
        bb.emit_func_output(y)
    mod = bb.get()
    script = _scheduled_single_primfunc(mod, target).script()
    assert "T.vectorized(T.int64(16))" in script and "T.vectorized(T.int64(3))" not in script, script
    rng = np.random.default_rng(0)
    img = (rng.standard_normal((1, 3, 32, 32)) * 2).astype(np.float32)
    _assert_schedule_keeps_outputs(mod, target, [img], exact=True)


def test_channels_last_global_pool_reduces_whole_channel_vectors():
    """NHWC mean over H, W (the int8 graph's global pooling since layout.py keeps it NHWC): the
    reduction loops sit outside a vectorized channel loop; same sums as unscheduled."""
    from tvm import relax

    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 14, 14, 320], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.mean(x, axis=[1, 2], keepdims=True)))
        bb.emit_func_output(y)
    mod = bb.get()
    script = _scheduled_single_primfunc(mod, target).script()
    lanes = 16 if "avx512f" in get_target("host").features else 8
    update = script[script.index("for k"):]  # the reduction loops, then the channel vector loop inside
    assert f"T.vectorized(T.int64({lanes}))" in update.split('T.sblock("')[0], script
    img = np.random.default_rng(0).standard_normal((1, 14, 14, 320)).astype(np.float32)
    _assert_schedule_keeps_outputs(mod, target, [img], exact=True)
