"""Side-by-side timing of alternative builds: interleaved rounds with alternating order.

Why one helper: knob tuning (kernels/knob_tuning.py) and the MetaSchedule apply-if-faster
choice (kernels/tuning_choice.py) both decide between candidate kernels from timings a few
percent apart on a shared 2-core machine. Timing each candidate in one block lets a drift in
load (a neighbour's job, frequency changes) land on whichever ran last; timing them in rounds,
forward then backward, spreads it over all of them.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)


def interleaved_samples(keys: Sequence[K], rounds: int, time_one: Callable[[K], float]) -> dict[K, list[float]]:
    """One ``time_one(key)`` sample per key and round, the order reversed every other round.

    A key whose timing raises gets no sample that round (a candidate that crashes at run time
    is no candidate); the result maps every key to its list of samples, possibly empty.
    """
    samples: dict[K, list[float]] = {k: [] for k in keys}
    order = list(keys)
    for r in range(max(1, rounds)):
        for key in (order if r % 2 == 0 else order[::-1]):
            try:
                samples[key].append(time_one(key))
            except Exception:  # noqa: BLE001 -- see the docstring
                continue
    return samples


__all__ = ["interleaved_samples"]
