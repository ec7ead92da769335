"""apq's CPU schedule rules: they must apply (not silently fall back), keep outputs identical
(float within 1e-5, int8 bit-exact) and actually make kernels faster."""

from __future__ import annotations

import time

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def _relax_module(onnx_path, target_name: str = "host"):
    from apq.targets.registry import get_target
    from apq.toolchain.compile import CompileOptions, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    spec = get_target(target_name)
    model = load_onnx(onnx_path)
    specs = resolve_input_specs(model, {})
    mod = import_to_relax(model, specs)
    mod, _ = lower_module(mod, model, spec, CompileOptions(target=target_name))
    return mod, specs, spec


def _fused(mod, target):
    """The PrimFuncs the schedule pass sees (legalized + fused, as inside the pipeline)."""
    from tvm import relax

    with target:
        seq = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])
        return seq(mod)


def _run(mod, target, inputs, schedule: bool) -> np.ndarray:
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    vm = relax.VirtualMachine(compile_relax(mod, target, schedule=schedule), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return (out if hasattr(out, "numpy") else out[0]).numpy()


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
    host_spec = get_target("host")
    host = CpuScheduleConfig.for_target(host_spec.tvm())
    if "avx512f" in host_spec.features:
        assert host.lanes(32) == 16 and host.lanes(8) == 64
    elif "avx2" in host_spec.features:
        assert host.lanes(32) == 8
    assert CpuScheduleConfig.from_json(host.to_json()) == host


# --------------------------------------------------------------------------- rules apply


def test_every_conv_and_matmul_gets_its_rule(mbv2_float, mbv2_qdq):
    for path in (mbv2_float, mbv2_qdq):
        mod, _, spec = _relax_module(path)
        chosen = _rule_for_each_func(mod, spec.tvm())
        convs = {k: v for k, v in chosen.items() if "conv2d" in k}
        assert len(convs) >= 15, chosen
        assert set(convs.values()) == {"conv2d-nchw"}, convs
        assert [v for k, v in chosen.items() if "matmul" in k] == ["matmul"]


def test_scheduled_conv_is_parallel_vectorized_and_faster(mbv2_qdq):
    """One integer pointwise conv (with its requantize epilogue): scheduled must beat naive."""
    from tvm import s_tir

    from apq.kernels.cpu_schedules import Conv2dNCHWRule, CpuScheduleConfig

    mod, _, spec = _relax_module(mbv2_qdq)
    target = spec.tvm()
    fused = _fused(mod, target)
    cfg = CpuScheduleConfig.for_target(target)
    # the biggest integer conv (most MACs) gives a stable timing
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
    times, outs = {}, {}
    for label, f in (("naive", func), ("apq", sch.mod["main"])):
        lib = tvm.compile(tvm.IRModule({"main": f}), target).jit()
        targs = [tvm.runtime.tensor(a) for a in args]
        lib["main"](*targs)
        outs[label] = targs[-1].numpy()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(5):
                lib["main"](*targs)
            best = min(best, (time.perf_counter() - t0) / 5)
        times[label] = best
    np.testing.assert_array_equal(outs["apq"], outs["naive"])
    assert times["apq"] * 2 < times["naive"], (name, times)


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
