"""Knob tuning (kernels/knob_tuning.py) on MobileNetV2-style models: tune cost, cache hits, speed.

Per model (32 px and 224 px, float32 and int8 QDQ): the knob-tune wall time from an empty cache,
kernels tuned and how many changed, the second compile's tune time (every kernel a cache hit),
and the whole model's latency, apq default schedules vs knob-tuned, measured side by side in one
run (alternating rounds, 1 thread) plus the largest output difference between the two builds.

``--clock thread`` (the default) times by the calling thread's CPU time (``time.thread_time``):
on this shared 2-core machine wall time includes other processes' slices (see
bench/compile_vs_ort.py). Every latency is ``measured`` on this host.

Usage: python bench/knob_tuning.py --json [--resolutions 32 224] [--rounds 3]
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
from typing import Any

import numpy as np

CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _runner(lib_path: Path, inputs: list[np.ndarray]):
    """The compiled model's ``main`` with its inputs bound (as bench/compile_vs_ort.py)."""
    import tvm
    from tvm import relax

    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    vm.save_function("main", "__bench", *[tvm.runtime.tensor(a, dev) for a in inputs])
    return vm["__bench"], vm


def _outputs(vm: Any, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm

    from apq.toolchain.runtime import vm_outputs

    return vm_outputs(vm["main"](*[tvm.runtime.tensor(a) for a in inputs]))


def bench_model(name: str, precision: str, resolution: int, onnx_path: Path, work: Path, cfg: Any,
                clock: str, rounds: int) -> dict[str, Any]:
    """Default vs knob-tuned build of one ONNX file (cold tune, warm re-tune, side-by-side latency)."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.profile import measure, set_runtime_threads

    default = compile_onnx(onnx_path, "host", work / f"{onnx_path.stem}_default.apq")
    tuned = compile_onnx(onnx_path, "host", work / f"{onnx_path.stem}_knobs.apq",
                         options=CompileOptions(target="host", knob_tune=True), progress=True)
    again = compile_onnx(onnx_path, "host", work / f"{onnx_path.stem}_knobs2.apq",
                         options=CompileOptions(target="host", knob_tune=True))
    cold, warm = tuned.manifest["compile"]["knob_tuning"], again.manifest["compile"]["knob_tuning"]
    set_runtime_threads(1)
    arts = [open_artifact(default.artifact_path), open_artifact(tuned.artifact_path)]
    x = arts[0].random_inputs(0)
    runs = [_runner(a.lib_path, x) for a in arts]
    outs = [_outputs(vm, x) for _, vm in runs]
    max_diff = max(float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) for a, b in zip(*outs))
    medians: list[list[float]] = [[], []]
    for r in range(rounds):  # alternate the order so drift on the shared machine hits both builds
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            medians[i].append(measure(runs[i][0], cfg, threads=1, clock=CLOCKS[clock]).median_ms)
    default_ms, tuned_ms = statistics.median(medians[0]), statistics.median(medians[1])
    # the best round of each: robust to rounds that other processes slowed down (they only add time)
    default_best, tuned_best = min(medians[0]), min(medians[1])
    rec = {"model": name, "precision": precision, "resolution": resolution, "threads": 1,
           "knob_tune_s": cold["seconds"], "kernels": cold["kernels"], "kernels_timed": cold["timed"],
           "kernels_changed": cold["changed"], "second_tune_s": warm["seconds"], "second_timed": warm["timed"],
           "second_cached": warm["cached"], "default_ms": round(default_ms, 4), "knob_ms": round(tuned_ms, 4),
           "speedup": round(default_ms / tuned_ms, 4), "default_best_round_ms": round(default_best, 4),
           "knob_best_round_ms": round(tuned_best, 4), "speedup_best_rounds": round(default_best / tuned_best, 4), "max_abs_output_diff": max_diff,
           "rounds_ms": {"default": [round(m, 4) for m in medians[0]], "knob": [round(m, 4) for m in medians[1]]},
           "changed": [{"name": c["name"], "overrides": c["overrides"], "default_ms": c["default_ms"],
                        "best_ms": c["best_ms"]} for c in cold["choices"] if c["overrides"]],
           "source": "measured", "device": "host", "clock": "thread-cpu" if clock == "thread" else "wall"}
    print(f"# {name} {precision} {resolution}px: tune {cold['seconds']:.1f} s ({cold['timed']}/{cold['kernels']} "
          f"timed, {cold['changed']} changed), re-tune {warm['seconds']:.1f} s; default {default_ms:.3f} ms, "
          f"knob {tuned_ms:.3f} ms ({default_ms / tuned_ms:.3f}x; best rounds {default_best:.3f} vs "
          f"{tuned_best:.3f} ms)", file=sys.stderr)
    return rec


def main(argv: list[str] | None = None) -> int:
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.profile import MeasureConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--precisions", nargs="+", choices=["float32", "int8-qdq"], default=["float32", "int8-qdq"])
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds timed per round and build")
    ap.add_argument("--rounds", type=int, default=7, help="alternating default/knob measurement rounds")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="thread")
    ap.add_argument("--cache-dir", help="knob cache folder (default: a fresh temporary one, so the first "
                                        "tune is cold)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=5)
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="apq-knob-bench-") as tmp:
        work = Path(tmp)
        os.environ["APQ_CACHE_DIR"] = args.cache_dir or str(work / "cache")
        for r in args.resolutions:
            fp = mobilenetv2_onnx(work / f"mbv2_{r}.onnx", resolution=r, width=args.width,
                                  classes=1000 if r >= 224 else 10)
            models = {"float32": fp}
            if "int8-qdq" in args.precisions:
                models["int8-qdq"] = quantize_qdq(fp, work / f"mbv2_{r}_int8.onnx", per_channel=True)
            for precision in args.precisions:
                records.append(bench_model("mobilenetv2-style", precision, r, models[precision], work, cfg,
                                           args.clock, args.rounds))
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{'precision':<10} {'res':>4} {'tune_s':>7} {'timed':>5} {'changed':>7} {'retune_s':>8} "
              f"{'default_ms':>10} {'knob_ms':>8} {'speedup':>7}")
        for rec in records:
            print(f"{rec['precision']:<10} {rec['resolution']:>4} {rec['knob_tune_s']:>7.1f} {rec['kernels_timed']:>5} "
                  f"{rec['kernels_changed']:>7} {rec['second_tune_s']:>8.1f} {rec['default_ms']:>10.3f} "
                  f"{rec['knob_ms']:>8.3f} {rec['speedup']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
