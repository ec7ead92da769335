"""Measurement protocol and per-layer profiles (apq.toolchain.profile).

The protocol tests drive ``measure`` with a fake clock, so they check the stopping rule by
counting calls, never by wall time. The library tests compile a small conv net with TVM and
profile the real compiled code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.profile import (
    BUILTINS_ROW,
    LatencyStats,
    MeasureConfig,
    elf_arch,
    layer_rows,
    measure,
    profile_library,
    set_runtime_threads,
)


class FakeClock:
    """Each fn() call advances the clock by ``step`` seconds; reading the clock costs nothing."""

    def __init__(self, step: float) -> None:
        self.now = 0.0
        self.step = step
        self.calls = 0

    def clock(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.now += self.step


# --------------------------------------------------------------------------- protocol


def test_measure_stops_at_min_time_when_min_repeats_reached():
    fc = FakeClock(step=0.125)  # exact in binary: no rounding in the running sum
    st = measure(fc.fn, MeasureConfig(warmup=2, min_repeats=3, min_time_s=1.0, max_repeats=100), clock=fc.clock)
    assert st.repeats == 8  # 3 repeats would be 0.375 s < 1.0 s: keeps going to 1.0 s
    assert fc.calls == 2 + 8  # warm-up calls run but are not timed
    assert st.median_ms == pytest.approx(125.0)
    assert st.std_ms == pytest.approx(0.0, abs=1e-9)


def test_measure_honours_min_repeats_when_time_is_already_reached():
    fc = FakeClock(step=2.0)
    st = measure(fc.fn, MeasureConfig(warmup=0, min_repeats=7, min_time_s=1.0, max_repeats=100), clock=fc.clock)
    assert st.repeats == 7 and fc.calls == 7


def test_measure_caps_at_max_repeats():
    fc = FakeClock(step=1e-6)
    st = measure(fc.fn, MeasureConfig(warmup=1, min_repeats=2, min_time_s=10.0, max_repeats=50), clock=fc.clock)
    assert st.repeats == 50 and fc.calls == 51


def test_measure_spread_from_varying_samples():
    times = iter([0.0, 1e-3, 1e-3, 3e-3, 3e-3, 4e-3, 4e-3, 8e-3])  # samples 1, 2, 1, 4 ms
    st = measure(lambda: None, MeasureConfig(warmup=0, min_repeats=4, min_time_s=0.0, max_repeats=4),
                 clock=lambda: next(times), threads=3, device="fake")
    assert st.repeats == 4 and st.threads == 3 and st.device == "fake" and st.source == "measured"
    assert st.median_ms == pytest.approx(1.5)
    assert st.min_ms == pytest.approx(1.0) and st.mean_ms == pytest.approx(2.0)
    assert st.p10_ms <= st.median_ms <= st.p90_ms


def test_measure_times_with_the_garbage_collector_off_and_restores_it():
    """Timed calls run with gc disabled (warm-up calls do not); the previous state comes back,
    also after ``fn`` raises, and a caller that had gc off keeps it off."""
    import gc

    seen: list[bool] = []
    cfg = MeasureConfig(warmup=1, min_repeats=3, min_time_s=0.0, max_repeats=3)
    assert gc.isenabled()
    measure(lambda: seen.append(gc.isenabled()), cfg)
    assert seen == [True, False, False, False] and gc.isenabled()

    def boom() -> None:
        if not gc.isenabled():
            raise RuntimeError("timed call failed")

    with pytest.raises(RuntimeError):
        measure(boom, cfg)
    assert gc.isenabled()
    gc.disable()
    try:
        measure(lambda: None, cfg)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_configs_round_trip_through_json():
    cfg = MeasureConfig(warmup=4, min_repeats=5, min_time_s=0.25, max_repeats=9, layer_runs=3)
    assert MeasureConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    st = LatencyStats.from_samples([1e-3, 2e-3, 3e-3], threads=2, device="cpu", governor="performance")
    assert LatencyStats.from_json(json.loads(json.dumps(st.to_json()))) == st


@pytest.mark.parametrize("bad", [dict(min_repeats=0), dict(min_repeats=5, max_repeats=2), dict(warmup=-1),
                                 dict(min_time_s=float("nan"))])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(InvalidInputError):
        MeasureConfig(**bad)
    with pytest.raises(InvalidInputError):
        MeasureConfig.from_json({"warmup": 1, "typo_key": 2})


def test_layer_rows_aggregate_per_inference_and_fold_builtins():
    rows = layer_rows({"conv2d": 0.004, "relu": 0.001, "vm.builtin.alloc_tensor": 0.0002,
                       "vm.builtin.match_shape": 0.0002},
                      {"conv2d": 4, "relu": 2, "vm.builtin.alloc_tensor": 6, "vm.builtin.match_shape": 2},
                      runs=2, instrumented_ms=4.0)
    assert [r.name for r in rows] == ["conv2d", "relu", BUILTINS_ROW]
    conv = rows[0]
    assert conv.calls == 2 and conv.total_ms == pytest.approx(2.0) and conv.percent == pytest.approx(50.0)
    assert rows[2].calls == 4 and rows[2].total_ms == pytest.approx(0.2) and rows[2].kind == "builtin"


# --------------------------------------------------------------------------- compiled library


def _conv_net_onnx(path: Path) -> None:
    """Two 3x3 convs dominate the work, so kernel time dwarfs the per-call instrumentation cost."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...]):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 24, 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [init("w1", (16, 8, 3, 3)), init("b1", (16,)), init("w2", (16, 16, 3, 3)), init("b2", (16,)),
         init("g", (10, 16))])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.fixture(scope="module")
def conv_lib(tmp_path_factory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    import onnx
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    d = tmp_path_factory.mktemp("convnet")
    _conv_net_onnx(d / "m.onnx")
    mod = from_onnx(onnx.load(str(d / "m.onnx")), shape_dict={"x": [1, 8, 24, 24]})
    mod = relax.transform.DecomposeOpsForInference()(mod)
    tvm.compile(mod, tvm.target.Target({"kind": "llvm"})).export_library(str(d / "model.so"))
    x = np.random.default_rng(1).standard_normal((1, 8, 24, 24)).astype(np.float32)
    ref = ort.InferenceSession(str(d / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return d / "model.so", [x], ref


def test_profile_library_per_layer_rows_are_the_models_kernels(conv_lib):
    import tvm

    lib_path, inputs, ref = conv_lib
    cfg = MeasureConfig(warmup=1, min_repeats=5, min_time_s=0.02, max_repeats=200, layer_runs=5)
    for _ in range(3):  # a load burst from other processes can hit every run of one attempt
        rep = profile_library(lib_path, inputs, threads=1, cfg=cfg)
        if rep.kernel_ms <= 2.0 * rep.e2e.median_ms:
            break
    np.testing.assert_allclose(rep.outputs[0], ref, rtol=1e-4, atol=1e-4)  # it ran the real model

    lib = tvm.runtime.load_module(str(lib_path))
    kernels = [r for r in rep.layers if r.kind == "kernel"]
    assert kernels, rep.format_table()
    for r in kernels:  # every row is a compiled PrimFunc of this library
        assert any(m.implements_function(r.name) for m in lib.imports), r.name
    names = {r.name for r in kernels}
    assert any("conv2d" in n for n in names), names
    conv_calls = sum(r.calls for r in kernels if "conv2d" in r.name)
    assert conv_calls == 2  # two Conv nodes, one call each per inference

    assert rep.e2e.median_ms > 0 and rep.e2e.repeats >= 3 and rep.e2e.threads == 1
    assert rep.kernel_ms <= rep.instrumented_ms  # kernels run inside the instrumented inference
    # ... and not longer than a plain one (medians on both sides; margin for a shared 2-core machine)
    assert rep.kernel_ms <= 2.0 * rep.e2e.median_ms
    total_pct = sum(r.percent for r in rep.layers)
    assert 0 < total_pct <= 100.0 + 1e-6
    assert 0 < rep.call_overhead_us < 1e3 * rep.instrumented_ms

    table = rep.format_table()
    assert "conv2d" in table and "end-to-end" in table
    d = json.loads(json.dumps(rep.to_json()))
    assert d["e2e"]["source"] == "measured" and d["layers"][0]["name"] == rep.layers[0].name


def test_runtime_threads_reported_as_used():
    assert set_runtime_threads(1) == 1
    with pytest.raises(InvalidInputError):
        set_runtime_threads(0)


def test_refuses_library_for_another_architecture(tmp_path, conv_lib):
    lib_path = conv_lib[0]
    assert elf_arch(lib_path) == "x86_64" or elf_arch(lib_path) == "aarch64"
    fake = tmp_path / "arm.so"
    data = bytearray(lib_path.read_bytes()[:64])
    other = 183 if elf_arch(lib_path) == "x86_64" else 62  # EM_AARCH64 / EM_X86_64
    data[18:20] = other.to_bytes(2, "little")
    fake.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="built for"):
        profile_library(fake, conv_lib[1], threads=1, cfg=MeasureConfig.quick())
    (tmp_path / "junk.so").write_bytes(b"not a library")
    with pytest.raises(ArtifactError, match="not an ELF"):
        profile_library(tmp_path / "junk.so", conv_lib[1], threads=1, cfg=MeasureConfig.quick())
