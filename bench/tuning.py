#!/usr/bin/env python3
"""What MetaSchedule tuning costs and gains over apq's own schedules, per model (kernels/tuning.py).

For each model (the MobileNetV2-style example, float32 and its int8 QDQ version, batch 1, this
machine): compile with apq's rules only; compile with ``--tune-trials N`` into a fresh database
(tune wall time, tasks, trials, and per task apq's time, the best record's time and which one the
build uses); compile once more to show the cache (zero new trials, nothing re-measured). The
untuned and tuned artifacts are timed side by side in this one process, in alternating order
(apq.toolchain.profile.measure), so the ratio is meaningful on a loaded machine; absolute numbers
are not. By construction a record replaces apq's schedule only when it measured faster, so the
tuned/untuned ratio should be >= 1 up to measurement noise. Prints one JSON record per model
with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

#: Models this bench can build, by name: (work dir, resolution, width) -> ONNX path.
MODELS: dict[str, Callable[[Path, int, float], Path]] = {}


def _model(name: str) -> Callable[[Callable[[Path, int, float], Path]], Callable[[Path, int, float], Path]]:
    def register(fn: Callable[[Path, int, float], Path]) -> Callable[[Path, int, float], Path]:
        MODELS[name] = fn
        return fn

    return register


@_model("float32")
def _float(work: Path, resolution: int, width: float) -> Path:
    from apq.toolchain.examples import mobilenetv2_onnx

    return mobilenetv2_onnx(work / f"mbv2_{resolution}.onnx", resolution=resolution, width=width)


@_model("int8")
def _int8(work: Path, resolution: int, width: float) -> Path:
    from apq.toolchain.examples import quantize_qdq

    return quantize_qdq(_float(work, resolution, width), work / f"mbv2_{resolution}_int8.onnx")


def bench_model(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One model: untuned / tuned / cached compiles, side-by-side latency, parity, per-task choices."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.profile import MeasureConfig, profile_library
    from apq.toolchain.verify import verify_artifact

    work.mkdir(parents=True, exist_ok=True)
    os.environ["APQ_CACHE_DIR"] = str(Path(args.cache_dir) / name) if args.cache_dir else str(work / "cache")
    onnx_path = MODELS[name](work, args.resolution, args.width)
    plain = compile_onnx(onnx_path, "host", work / "plain.apq")
    t0 = time.perf_counter()
    tuned = compile_onnx(onnx_path, "host", work / "tuned.apq", options=CompileOptions(tune_trials=args.trials),
                         progress=not args.json)
    tuned_compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = compile_onnx(onnx_path, "host", work / "again.apq", options=CompileOptions(tune_trials=args.trials))
    recompile_s = time.perf_counter() - t0

    arts = {"untuned": open_artifact(plain.artifact_path), "tuned": open_artifact(tuned.artifact_path)}
    x = arts["untuned"].random_inputs(0)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=5)
    samples: dict[str, list[float]] = {k: [] for k in arts}
    stats: dict[str, Any] = {}
    for r in range(args.rounds):  # alternate the order: drift on a shared machine hits both
        for k in (list(arts) if r % 2 == 0 else list(arts)[::-1]):
            stats[k] = profile_library(arts[k].lib_path, x, args.threads, cfg, per_layer=False).e2e
            samples[k].append(stats[k].median_ms)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    ver = verify_artifact(arts["tuned"], onnx_path)

    tuning = tuned.manifest["compile"]["tuning"]
    recheck = again.manifest["compile"]["tuning"]
    return {"model": "mobilenetv2-style", "precision": name, "resolution": args.resolution, "width": args.width,
            "threads": args.threads, "trials_budget": args.trials, "trials_run": tuning["new_records"],
            "tasks": tuning["tasks"], "tune_s": tuning["seconds"], "tuned_compile_s": round(tuned_compile_s, 2),
            "untuned_compile_s": round(plain.compile_s, 2),
            "tasks_tuned_kept": tuning["chosen_tuned"], "tuned_functions": tuning["tuned_functions"],
            "recompile_s": round(recompile_s, 2), "recompile_new_trials": recheck["new_records"],
            "recompile_measured_tasks": recheck["measured_tasks"],
            "untuned_ms": round(ms["untuned"], 4), "tuned_ms": round(ms["tuned"], 4),
            "tuned_speedup": round(ms["untuned"] / ms["tuned"], 4), "rounds": args.rounds,
            "tuned_matches_ort": ver.passed, "per_task": tuning["choices"],
            "source": "measured", "device": stats["tuned"].device}


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="float32,int8", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--trials", type=int, default=32, help="global MetaSchedule trial budget per model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=4, help="alternating untuned/tuned timing rounds")
    ap.add_argument("--cache-dir", help="tuning cache root (default: a fresh temporary one, so the tune is real)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {sorted(MODELS)}")

    with tempfile.TemporaryDirectory(prefix="apq-bench-tune-") as tmp:
        for name in tqdm(names, desc="bench tuning", unit="model", disable=None):
            rec = bench_model(name, Path(tmp) / name, args)
            if args.json:
                print(json.dumps(rec), flush=True)
            else:
                for k, v in rec.items():
                    if k != "per_task":
                        print(f"{k:<26} {v}")
                for c in rec["per_task"]:
                    print(f"  {c['task']:<48} apq {c['apq_ms']} ms  tuned {c['tuned_ms']} ms  -> {c['chosen']}")
                print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
