#!/usr/bin/env python3
"""Supernet training-step time with channels_last on vs off, side by side in one run.

Issue #4 claims "channels_last measured 1.1-2x faster here for training"; this checks it. For
each thread count and each phase (``full``: the largest float subnet alone; ``quant``: the
sandwich step of the quantization-aware phase, teacher + smallest + ``random_per_step`` random
subnets with random bit policies), two copies of the same supernet, one NCHW and one
channels_last, run the project's own :func:`train_step` plus an optimiser step on the same
batch with the same sampled subnets. Steps alternate between the two layouts (ABBA order) so
a change in machine load hits both alike; the record gives per-step medians and the ratio
``nchw / channels_last`` (> 1: channels_last is faster). Absolute times on a shared machine
mean little; the ratio is the result. No data loading is timed. The defaults cost ~6 min CPU
(measured: 373 s user; 27 min wall at load average ~6, where the 2-thread rows were pure noise).

    python bench/train_step.py --json [--threads 1,2] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

LAYOUTS = ("nchw", "channels_last")


@dataclass
class StepBenchConfig:
    """What a run measures (printed with its results)."""

    threads: tuple[int, ...] = (1, 2)
    phases: tuple[str, ...] = ("full", "quant")
    steps: int = 3  # timed steps per layout
    warmup: int = 1  # untimed steps per layout (oneDNN primitive creation, allocator)
    batch_size: int = 128
    seed: int = 0
    data: str = "fashion-mnist"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threads"], d["phases"] = list(self.threads), list(self.phases)
        return d


def _phase(name: str) -> Any:
    from apq.toolchain.errors import InvalidInputError
    from apq.toolchain.supernet.train import default_phases

    phases = {p.name: p for p in default_phases()}
    if name not in phases:
        raise InvalidInputError(f"unknown phase {name!r}; use one of {', '.join(phases)}")
    return phases[name]


def _batch(cfg: StepBenchConfig) -> tuple[Any, Any, str]:
    """One training batch: real images when the dataset is installed, else seeded noise
    (the step's cost does not depend on pixel values)."""
    import numpy as np
    import torch

    from apq.toolchain.errors import ApqError
    from apq.toolchain.supernet.train import EpochBatches, TrainConfig, resolve_dataset, train_indices

    try:
        ds = resolve_dataset(cfg.data)
        tc = TrainConfig(seed=cfg.seed, batch_size=cfg.batch_size)
        x, y = EpochBatches(ds, train_indices(ds, tc), cfg.batch_size, cfg.seed, channels_last=False).batch(0, 0)
        return x, y, f"{cfg.data} training batch 0"
    except ApqError:
        g = torch.Generator().manual_seed(cfg.seed)
        sp = TrainConfig().space
        x = torch.randn(cfg.batch_size, sp.in_channels, sp.image_size, sp.image_size, generator=g)
        y = torch.from_numpy(np.random.default_rng(cfg.seed).integers(0, sp.num_classes, cfg.batch_size))
        return x, y, "seeded random noise (dataset not installed)"


def _nets(x: Any) -> dict[str, Any]:
    """The same randomly initialised supernet in both layouts, clips calibrated as the quant
    phase does at its start (8-bit percentile clips, then per-bit-width MSE clips)."""
    import torch

    from apq.toolchain.supernet.calibrate import calibrate_bit_clips, calibrate_clips
    from apq.toolchain.supernet.supernet import Supernet
    from apq.toolchain.supernet.train import TrainConfig

    torch.manual_seed(0)
    net = Supernet(TrainConfig().space)
    calibrate_clips(net, net.space.largest(), x)
    calibrate_bit_clips(net, x)
    net.train()
    return {"nchw": net, "channels_last": copy.deepcopy(net).to(memory_format=torch.channels_last)}


def time_phase(phase_name: str, threads: int, x: Any, y: Any, cfg: StepBenchConfig) -> list[dict[str, Any]]:
    """Per-layout step times of one phase at ``threads`` intra-op threads."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from apq.toolchain.supernet.train import TrainConfig, train_step

    torch.set_num_threads(threads)
    phase, tc = _phase(phase_name), TrainConfig(seed=cfg.seed, batch_size=cfg.batch_size, threads=threads)
    nets = _nets(x)
    inputs = {"nchw": x.contiguous(), "channels_last": x.contiguous(memory_format=torch.channels_last)}
    opts = {k: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9, nesterov=True) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in LAYOUTS}
    for i in tqdm(range(cfg.warmup + cfg.steps), desc=f"{phase_name} x{threads} threads", leave=False):
        for layout in (LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]):  # ABBA: load drift hits both alike
            t0 = time.perf_counter()
            opts[layout].zero_grad(set_to_none=True)
            # The same step index -> the same sampled subnets in both layouts.
            train_step(nets[layout], phase, inputs[layout], y, np.random.default_rng([cfg.seed, 3, i]), tc)
            opts[layout].step()
            if i >= cfg.warmup:
                times[layout].append(time.perf_counter() - t0)
    return [{"phase": phase_name, "elastic": list(phase.elastic), "threads": threads, "layout": k,
             "median_s": statistics.median(v), "min_s": min(v), "steps_s": v} for k, v in times.items()]


def run_benchmark(cfg: StepBenchConfig) -> dict[str, Any]:
    import torch

    x, y, inputs = _batch(cfg)
    rows, ratios = [], []
    t0 = time.perf_counter()
    for threads in cfg.threads:
        for name in cfg.phases:
            r = time_phase(name, threads, x, y, cfg)
            rows += r
            med = {row["layout"]: row["median_s"] for row in r}
            ratios.append({"phase": name, "threads": threads,
                           "speedup_channels_last": med["nchw"] / med["channels_last"]})
    return {"source": "measured", "what": "supernet train_step + SGD step, median wall seconds per step",
            "inputs": inputs, "config": cfg.to_dict(), "rows": rows, "ratios": ratios,
            "host": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__,
                     "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
            "wall_time_s": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = StepBenchConfig()
    ap.add_argument("--threads", default=",".join(map(str, d.threads)))
    ap.add_argument("--phases", default=",".join(d.phases))
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--data", default=d.data)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 2:
        ap.error("--steps >= 1, --warmup >= 0 and --batch-size >= 2 please")
    cfg = StepBenchConfig(threads=tuple(int(t) for t in args.threads.split(",")),
                          phases=tuple(args.phases.split(",")), steps=args.steps, warmup=args.warmup,
                          batch_size=args.batch_size, data=args.data)
    res = run_benchmark(cfg)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        for r in res["ratios"]:
            print(f"{r['phase']:6s} threads={r['threads']}  channels_last speedup x{r['speedup_channels_last']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
