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
