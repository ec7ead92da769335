#!/usr/bin/env python3
"""What MetaSchedule tuning buys over apq's own schedules, and what it costs (kernels/tuning.py).

For the MobileNetV2-style example model (float, batch 1, this machine): compile with apq's rules
only, then with ``--tune-trials N`` into a fresh database (tune wall time, tasks, records), then
once more to show the cache (zero new trials). All three artifacts and onnxruntime are timed in
this one process by the same protocol (apq.toolchain.profile.measure), so ratios are meaningful
even on a loaded machine; absolute numbers are not. Prints one JSON record with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.examples import mobilenetv2_onnx
    from apq.toolchain.profile import MeasureConfig, measure, profile_library
    from apq.toolchain.verify import verify_artifact

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--trials", type=int, default=32, help="global MetaSchedule trial budget")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--cache-dir", help="tuning cache (default: a fresh temporary one, so the tune is real)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=5)

    with tempfile.TemporaryDirectory(prefix="apq-bench-tune-") as tmp:
        work = Path(tmp)
        os.environ["APQ_CACHE_DIR"] = args.cache_dir or str(work / "cache")
        onnx_path = mobilenetv2_onnx(work / "mbv2.onnx", resolution=args.resolution, width=args.width)
        plain = compile_onnx(onnx_path, "host", work / "plain.apq")
        t0 = time.perf_counter()
        tuned = compile_onnx(onnx_path, "host", work / "tuned.apq", options=CompileOptions(tune_trials=args.trials),
                             progress=not args.json)
        tuned_compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = compile_onnx(onnx_path, "host", work / "again.apq", options=CompileOptions(tune_trials=args.trials))
        recompile_s = time.perf_counter() - t0

        arts = {k: open_artifact(r.artifact_path) for k, r in (("plain", plain), ("tuned", tuned))}
        x = arts["plain"].random_inputs(0)
        ms = {k: profile_library(a.lib_path, x, args.threads, cfg, per_layer=False).e2e for k, a in arts.items()}
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        feed = {arts["plain"].input_specs[0].name: x[0]}
        ort_ms = measure(lambda: sess.run(None, feed), cfg, threads=args.threads).median_ms
        passed = verify_artifact(arts["tuned"], onnx_path).passed

    tuning = tuned.manifest["compile"]["tuning"]
    rec = {"model": "mobilenetv2-style", "precision": "float32", "resolution": args.resolution, "width": args.width,
           "threads": args.threads, "trials": args.trials, "tasks": tuning["tasks"],
           "tuned_functions": len(tuning["tuned_functions"]), "new_records": tuning["new_records"],
           "tune_s": tuning["seconds"], "tuned_compile_s": round(tuned_compile_s, 2),
           "untuned_compile_s": round(plain.compile_s, 2), "recompile_s": round(recompile_s, 2),
           "recompile_new_records": again.manifest["compile"]["tuning"]["new_records"],
           "apq_rules_ms": round(ms["plain"].median_ms, 4), "tuned_ms": round(ms["tuned"].median_ms, 4),
           "ort_ms": round(ort_ms, 4), "tuned_vs_rules": round(ms["plain"].median_ms / ms["tuned"].median_ms, 4),
           "tuned_vs_ort": round(ort_ms / ms["tuned"].median_ms, 4), "tuned_matches_ort": passed,
           "source": "measured", "device": ms["tuned"].device}
    if args.json:
        print(json.dumps(rec, indent=2))
    else:
        for k, v in rec.items():
            print(f"{k:<24} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
