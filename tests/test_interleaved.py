"""kernels/interleaved.py: the alternating-order timing rounds both tuners rely on."""

from __future__ import annotations

from apq.kernels.interleaved import interleaved_samples


def test_rounds_alternate_order_and_failures_only_lose_their_sample():
    calls: list[str] = []

    def time_one(key: str) -> float:
        calls.append(key)
        if key == "b" and len(calls) <= 3:
            raise RuntimeError("crashed once")
        return float(len(calls))

    samples = interleaved_samples(["a", "b", "c"], 3, time_one)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert samples == {"a": [1.0, 6.0, 7.0], "b": [5.0, 8.0], "c": [3.0, 4.0, 9.0]}


def test_zero_rounds_still_times_once_and_keys_without_samples_stay_listed():
    samples = interleaved_samples(["x", "y"], 0, lambda k: 1 / 0 if k == "y" else 2.0)
    assert samples == {"x": [2.0], "y": []}


def _bench_module():
    """bench/compile_vs_ort.py, loaded by path (bench/ is not a package)."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "compile_vs_ort.py"
    spec = importlib.util.spec_from_file_location("apq_bench_compile_vs_ort", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_bench_rounds_pair_figures_by_round_and_surface_failures():
    """The benches' protocol (bench/compile_vs_ort.time_rounds): every callable once per round in
    alternating order, ratios as medians of per-round ratios, and a crash stops the bench."""
    import pytest

    from apq.toolchain.profile import MeasureConfig

    bench = _bench_module()
    now = [0.0]
    step = {"apq": [1.0, 2.0, 4.0], "ort": [3.0, 3.0, 3.0]}  # seconds per call, by round
    calls: list[str] = []

    def make(name: str):
        def fn() -> None:
            calls.append(name)
            now[0] += step[name][sum(c == name for c in calls) - 1]
        return fn

    cfg = MeasureConfig(warmup=0, min_repeats=1, min_time_s=0.0, max_repeats=1)
    ms, last = bench.time_rounds({"apq": make("apq"), "ort": make("ort")}, cfg, 1, lambda: now[0], 3)
    assert calls == ["apq", "ort", "ort", "apq", "apq", "ort"]
    assert ms == {"apq": [1000.0, 2000.0, 4000.0], "ort": [3000.0, 3000.0, 3000.0]}
    assert last["apq"].median_ms == 4000.0
    assert bench.round_ratio(ms, "ort", "apq") == 1.5  # per-round 3, 1.5, 0.75
    # per-round 1, 0.5, 3 -> 1.0; the ratio of the medians would be 2 / 1 = 2.0
    assert bench.round_ratio({"a": [1.0, 2.0, 3.0], "b": [1.0, 4.0, 1.0]}, "a", "b") == 1.0

    def boom() -> None:
        raise RuntimeError("kernel crashed")

    with pytest.raises(RuntimeError, match="kernel crashed"):
        bench.time_rounds({"apq": boom}, cfg, 1, lambda: now[0], 2)
