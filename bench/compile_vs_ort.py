#!/usr/bin/env python3
"""apq-compiled vs onnxruntime on the same ONNX file, same precision, same threads, batch 1.

Prints one JSON list of records (with --json) or a table: model, precision, resolution,
threads, apq_ms, ort_ms, speedup (= ort_ms / apq_ms, > 1 means apq is faster), compile_s.
Both sides are timed in this one process by the same protocol (apq.toolchain.profile.measure:
warm-up, repeat until a minimum time, median), so the ratio is meaningful even when the
machine is loaded; absolute numbers are not.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def bench_model(name: str, precision: str, resolution: int, onnx_path: Path, threads_list: list[int],
                cfg, work: Path) -> list[dict]:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.profile import measure, profile_library
    from apq.toolchain.verify import ort_session

    res = compile_onnx(onnx_path, "host", work / f"{onnx_path.stem}.apq")
    art = open_artifact(res.artifact_path)
    x = art.random_inputs(0)
    kernels = sorted({lay["kernel"] for lay in art.manifest["layers"]})
    records = []
    for threads in threads_list:
        apq = profile_library(art.lib_path, x, threads, cfg, per_layer=False).e2e
        sess = ort_session(onnx_path, threads)
        feed = {art.input_specs[0].name: x[0]}
        ort = measure(lambda: sess.run(None, feed), cfg, threads=threads)
        records.append({"model": name, "precision": precision, "resolution": resolution, "threads": threads,
                        "batch": 1, "apq_ms": round(apq.median_ms, 4), "ort_ms": round(ort.median_ms, 4),
                        "speedup": round(ort.median_ms / apq.median_ms, 4), "compile_s": round(res.compile_s, 2),
                        "apq_kernels": kernels, "source": "measured", "device": apq.device})
        print(f"# {name} {precision} {resolution}px {threads}t: apq {apq.median_ms:.3f} ms, "
              f"ort {ort.median_ms:.3f} ms, speedup {ort.median_ms / apq.median_ms:.3f}", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.profile import MeasureConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32, 224])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--width", type=float, default=1.0, help="MobileNetV2 width multiplier")
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=5)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-") as tmp:
        work = Path(tmp)
        for r in args.resolutions:
            fp = mobilenetv2_onnx(work / f"mbv2_{r}.onnx", resolution=r, width=args.width, classes=1000 if r >= 224 else 10)
            q = quantize_qdq(fp, work / f"mbv2_{r}_int8.onnx", per_channel=True)
            records += bench_model("mobilenetv2-style", "float32", r, fp, args.threads, cfg, work)
            records += bench_model("mobilenetv2-style", "int8-qdq", r, q, args.threads, cfg, work)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{'model':<20} {'precision':<10} {'res':>4} {'thr':>3} {'apq_ms':>9} {'ort_ms':>9} {'speedup':>8} {'compile_s':>9}")
        for rec in records:
            print(f"{rec['model']:<20} {rec['precision']:<10} {rec['resolution']:>4} {rec['threads']:>3} "
                  f"{rec['apq_ms']:>9.3f} {rec['ort_ms']:>9.3f} {rec['speedup']:>8.3f} {rec['compile_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
