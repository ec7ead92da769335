#!/usr/bin/env python3
"""Issue #4's figures for a trained supernet checkpoint, reproducibly, in one JSON record.

What is measured (Fashion-MNIST, or whatever dataset the checkpoint names; test split):

- ``fixed``: top-1 of the largest and smallest subnets at float, W8A8, W4A4 and W2A2, each
  (a) extracted and BN-recalibrated exactly as :class:`SubnetEvaluator` does, and (b) after a
  short QAT (:func:`qat_finetune` via :meth:`SubnetEvaluator.evaluate_qat`) on training
  batches only, every run from freshly extracted weights. The float "QAT" row is the control:
  the same number of fine-tuning steps without quantization, so a QAT gain can be told apart
  from the gain of simply training longer.
- ``random_spread``: ``--random`` random architectures with random per-block bit policies
  (``mixed``) and the *same* architectures in float; min/max/mean/std of each and the paired
  float-minus-mixed gap.
- ``training``: the training wall time and steps the training run recorded in the checkpoint.

Every figure is tagged ``source: measured`` and carries its sample count; seeds, settings,
host and wall times are in the record. Progress bars go to stderr, so ``--json`` output is clean.

Cost, measured on the checked-in checkpoint (sha256 8328efa9...), 1 torch thread, on the shared
2-core host (load average 5-6: a training run and other jobs beside it), so CPU seconds of this
process are the cost on one free core and wall time says little:
``--qat-steps 10 --random 20 --test-subset 2000`` took 316 s CPU (27.7 min wall): the 16
largest/smallest rows 170 s (a QAT step of the largest quantized subnet, batch 128, ~2.5-3 s; of
the smallest ~0.4 s; a BN recalibration + 2000-image evaluation of the largest ~6-9 s), the 20
random architectures (each mixed and float) 138 s, i.e. ~7 s per architecture. The defaults
(``--qat-steps 20 --random 50``) therefore cost about 11 min CPU (170 + ~110 for the 10 extra
QAT steps of 8 runs + 50 x 7 s). An end-to-end run at these defaults was stopped after its first
5 of 16 rows (138 s CPU, on track) because the shared host gave it ~17% of a core; every run
records its own ``cpu_time_s`` and ``wall_time_s``.

    python bench/supernet_figures.py --checkpoint apq_namespace/checkpoints/fmnist_supernet.pt \\
        --out figures.json --plot figures.png
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

FIGURES_VERSION = 1
SUBNETS = ("largest", "smallest")
POLICIES = ("float", "W8A8", "W4A4", "W2A2")
#: Keys of an evaluator record that a figure row keeps (the full config dict and the
#: repeated checkpoint hash are left to the top-level record).
ROW_KEYS = ("top1", "source", "split", "samples", "bits", "config_string", "macs", "params", "calib_batches",
            "seconds", "qat_steps", "qat_lr", "qat_batch_size", "qat_teacher", "qat_data", "weight_change",
            "arch", "seed")


@dataclass
class FiguresConfig:
    """Everything that determines a figures run (saved in its output, so it can be rerun)."""

    checkpoint: str
    qat_steps: int = 20
    qat_lr: float = 0.005
    random: int = 50
    seed: int = 0
    test_subset: int | None = 2000
    calib_batches: int = 10
    threads: int = 1
    subnets: tuple[str, ...] = SUBNETS
    policies: tuple[str, ...] = POLICIES
    data: str | None = None  # default: the dataset the checkpoint names

    def __post_init__(self) -> None:
        from apq.toolchain.errors import InvalidInputError
        from apq.toolchain.supernet.space import parse_bits

        self.subnets, self.policies = tuple(self.subnets), tuple(self.policies)
        bad = [s for s in self.subnets if s not in SUBNETS]
        if bad or not self.subnets:
            raise InvalidInputError(f"subnets must be among {', '.join(SUBNETS)}, got {', '.join(bad) or 'none'}")
        for p in self.policies:
            try:
                parse_bits(p)
            except ValueError as e:
                raise InvalidInputError(str(e)) from None
        if self.qat_steps < 0 or self.random < 0 or self.calib_batches < 1 or self.threads < 1:
            raise InvalidInputError("qat_steps and random must be >= 0, calib_batches and threads >= 1")
        if self.test_subset is not None and self.test_subset < 1:
            raise InvalidInputError(f"test_subset must be >= 1, got {self.test_subset}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["subnets"], d["policies"] = list(self.subnets), list(self.policies)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FiguresConfig":
        from apq.targets.layers import check_json_fields

        check_json_fields(cls, d, "figures config")
        return cls(**d)


def _row(rec: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**extra, **{k: rec[k] for k in ROW_KEYS if k in rec}}


def spread(values: Sequence[float]) -> dict[str, float | int]:
    """n, min, max, mean and sample standard deviation (0 for a single value)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0}
    return {"n": int(v.size), "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def fixed_figures(ev: Any, cfg: FiguresConfig) -> list[dict[str, Any]]:
    """Largest/smallest x policies, calibrated and (if ``qat_steps``) after QAT."""
    from tqdm import tqdm

    from apq.toolchain.supernet.evaluate import apply_bits

    jobs = [(name, policy, stage) for name in cfg.subnets for policy in cfg.policies
            for stage in (("calibrated", "qat") if cfg.qat_steps > 0 else ("calibrated",))]
    rows = []
    for name, policy, stage in tqdm(jobs, desc="largest/smallest"):
        sub = apply_bits(getattr(ev.space, name)(), policy)
        c0 = time.process_time()
        rec = (ev.evaluate(sub, "test") if stage == "calibrated"
               else ev.evaluate_qat(sub, cfg.qat_steps, "test", lr=cfg.qat_lr, progress=True))
        rows.append(_row(rec, name=name, policy=policy, stage=stage, cpu_seconds=time.process_time() - c0))
    return rows


def spread_figures(ev: Any, cfg: FiguresConfig) -> dict[str, Any]:
    """Random architectures with random bit policies, and the same architectures in float."""
    from apq.toolchain.supernet.evaluate import random_spread

    t0, c0 = time.perf_counter(), time.process_time()
    recs = random_spread(ev, cfg.random, seed=cfg.seed, split="test", also_bits=("float",))
    rows = [_row(r, policy="float" if r["bits"] == "float" else "mixed") for r in recs]
    by = {p: {r["arch"]: r["top1"] for r in rows if r["policy"] == p} for p in ("mixed", "float")}
    gaps = [by["float"][a] - by["mixed"][a] for a in by["mixed"] if a in by["float"]]
    return {"source": "measured", "split": "test", "samples_per_subnet": rows[0]["samples"] if rows else 0,
            "n_architectures": cfg.random, "seed": cfg.seed,
            "sampling": "SearchSpace.sample(rng, quantized=True) with rng = numpy default_rng(seed): uniform depth, "
                        "kernel, expand and per-layer bits; 'float' = the same architecture with bits removed",
            "mixed_top1": spread(list(by["mixed"].values())), "float_top1": spread(list(by["float"].values())),
            "float_minus_mixed": spread(gaps), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "rows": rows}


def training_figures(checkpoint: Path) -> dict[str, Any]:
    """What the training run itself measured and saved in the checkpoint."""
    from apq.toolchain.supernet.supernet import load_checkpoint

    ck = load_checkpoint(checkpoint)
    tc = ck.get("train_config", {})
    return {"source": "measured", "measured_by": "train_supernet (wall clock of the training loop, saved in the checkpoint)",
            "wall_time_s": ck.get("wall_time_s"), "steps": ck.get("steps"), "batch_size": tc.get("batch_size"),
            "threads": tc.get("threads"), "channels_last": tc.get("channels_last"), "seed": ck.get("seed"),
            "phases": [{"name": p["name"], "epochs": p["epochs"]} for p in tc.get("phases", [])]}


def host_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):
        info["loadavg_1min"] = os.getloadavg()[0]
    return info


def compute_figures(cfg: FiguresConfig) -> dict[str, Any]:
    """All figures of issue #4 for ``cfg.checkpoint``, as one JSON-ready record."""
    from apq.toolchain.supernet.evaluate import SubnetEvaluator

    t0, c0 = time.perf_counter(), time.process_time()
    ck = Path(cfg.checkpoint)
    ev = SubnetEvaluator(ck, cfg.data, calib_batches=cfg.calib_batches, eval_subset=cfg.test_subset,
                         threads=cfg.threads)
    host = host_info()
    out: dict[str, Any] = {"figures_version": FIGURES_VERSION, "source": "measured",
                           "checkpoint": {"path": str(ck), "sha256": ev.sha256}, "dataset": ev.ds.name,
                           "config": cfg.to_dict(), "host": host,
                           "fixed": fixed_figures(ev, cfg)}
    if cfg.random > 0:
        out["random_spread"] = spread_figures(ev, cfg)
    out["training"] = training_figures(ck)
    if hasattr(os, "getloadavg"):
        host["loadavg_1min_end"] = os.getloadavg()[0]
    # Wall time depends on what else the machine runs; CPU time of this process is the cost on
    # one free core (the evaluator runs torch with ``threads`` intra-op threads).
    out["wall_time_s"] = time.perf_counter() - t0
    out["cpu_time_s"] = time.process_time() - c0
    return out


def plot_figures(fig: dict[str, Any], path: str | Path, x: str = "macs") -> Path:
    """Top-1 of the random subnets (float and mixed) vs MACs or params, largest/smallest marked."""
    from apq.toolchain.plots import new_figure, save_figure

    fig_, ax = new_figure(10, 5)
    scale, unit = (1e6, "M") if x == "macs" else (1e3, "k")
    rows = fig.get("random_spread", {}).get("rows", [])
    for policy, style in (("float", dict(marker="o", color="#4477aa")), ("mixed", dict(marker="^", color="#ee6677"))):
        pts = [(r[x] / scale, 100 * r["top1"]) for r in rows if r["policy"] == policy]
        if pts:
            ax.scatter(*zip(*pts), s=22, alpha=0.8, label=f"random subnets, {policy} bits ({len(pts)})", **style)
    marks = {"float": "s", "W8A8": "D", "W4A4": "P", "W2A2": "X"}
    for r in fig["fixed"]:
        filled = r["stage"] == "calibrated"
        m = marks.get(r["policy"], "*")
        ax.scatter([r[x] / scale], [100 * r["top1"]], marker=m, s=70, color="black" if filled else "none",
                   edgecolors="black", zorder=3,
                   label=f"largest/smallest {r['policy']} ({'calibrated' if filled else 'after QAT'})")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # off the data
    n = fig["fixed"][0]["samples"] if fig["fixed"] else 0
    n_random = rows[0]["samples"] if rows else n
    images = f"{n} images" if n_random == n or not fig["fixed"] else f"largest/smallest {n} images, random {n_random}"
    ax.set_xlabel(f"{x} per image ({unit})")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"measured: {fig['dataset']} test top-1 ({images}), checkpoint {fig['checkpoint']['sha256'][:8]}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig_, path)


def summary_lines(fig: dict[str, Any]) -> list[str]:
    """A short human-readable table of the record."""
    lines = [f"checkpoint {fig['checkpoint']['sha256'][:12]}  ({fig['wall_time_s']:.0f} s wall, "
             f"{fig['cpu_time_s']:.0f} s CPU)"]
    for r in fig["fixed"]:
        lines.append(f"  {r['name']:8s} {r['policy']:5s} {r['stage']:10s} top-1 {100 * r['top1']:6.2f}%  "
                     f"({r['samples']} images, {r['seconds']:.0f} s)")
    rs = fig.get("random_spread")
    if rs:
        for k in ("mixed_top1", "float_top1", "float_minus_mixed"):
            s = rs[k]
            if s.get("n"):
                lines.append(f"  random {k:17s} n={s['n']} min {100 * s['min']:.2f} max {100 * s['max']:.2f} "
                             f"mean {100 * s['mean']:.2f} std {100 * s['std']:.2f} (%)")
    tr = fig["training"]
    if tr.get("wall_time_s") is not None:
        lines.append(f"  training {tr['wall_time_s']:.0f} s, {tr['steps']} steps")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    from apq.toolchain.errors import ApqError

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    d = FiguresConfig(checkpoint="")
    ap.add_argument("--qat-steps", type=int, default=d.qat_steps, help="QAT batches per run (0: no QAT rows)")
    ap.add_argument("--qat-lr", type=float, default=d.qat_lr)
    ap.add_argument("--random", type=int, default=d.random, help="random architectures (each: mixed and float)")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the random architectures")
    ap.add_argument("--test-subset", type=int, default=d.test_subset,
                    help="first N test images (0: the whole test split)")
    ap.add_argument("--calib-batches", type=int, default=d.calib_batches)
    ap.add_argument("--threads", type=int, default=d.threads)
    ap.add_argument("--subnets", default=",".join(d.subnets))
    ap.add_argument("--policies", default=",".join(d.policies))
    ap.add_argument("--data", default=None, help="dataset (default: the one the checkpoint names)")
    ap.add_argument("--json", action="store_true", help="print the JSON record instead of a table")
    ap.add_argument("--out", type=Path, help="write the JSON record here")
    ap.add_argument("--plot", type=Path, help="write a PNG here")
    ap.add_argument("--plot-x", choices=("macs", "params"), default="macs")
    args = ap.parse_args(argv)
    try:
        cfg = FiguresConfig(checkpoint=str(args.checkpoint), qat_steps=args.qat_steps, qat_lr=args.qat_lr,
                            random=args.random, seed=args.seed, test_subset=args.test_subset or None,
                            calib_batches=args.calib_batches, threads=args.threads,
                            subnets=tuple(s for s in args.subnets.split(",") if s),
                            policies=tuple(p for p in args.policies.split(",") if p), data=args.data)
        fig = compute_figures(cfg)
    except ApqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(fig, indent=1) + "\n")
    if args.plot:
        fig["plot"] = str(plot_figures(fig, args.plot, args.plot_x))
    print(json.dumps(fig, indent=1) if args.json else "\n".join(summary_lines(fig)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
