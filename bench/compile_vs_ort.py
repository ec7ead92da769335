#!/usr/bin/env python3
"""apq-compiled vs onnxruntime on the same ONNX file, same precision, same threads, batch 1.

Prints one JSON list of records (with --json) or a table: model, precision, resolution,
threads, layout (CompileOptions.float_layout for the float model, .int8_layout for the int8 one),
apq_ms, ort_ms, speedup (= ort_ms / apq_ms, > 1 means apq is faster), compile_s.
Both sides are timed in this one process by the same protocol (apq.toolchain.profile.measure:
warm-up, repeat until a minimum time, median), so the ratio is meaningful even when the
machine is loaded; absolute numbers are not.

``--clock thread`` times single-threaded runs by the calling thread's CPU time
(``time.thread_time``) instead of wall time. Why: on a shared 2-core machine (other jobs,
a training run) a wall-clock sample includes whole scheduler slices of other processes, and
the two sides are timed one after the other, so the load can change between them (measured:
the same build read 1.09x by wall clock and 0.75x by thread CPU time, minutes apart). Both
apq (TVM runs a 1-thread pool on the calling thread) and onnxruntime (intra-op threads = 1)
compute on the calling thread, so its CPU time is the compute time, preemption excluded.
Multi-threaded runs always use wall time (work on other threads is not in the caller's).

``--rounds N`` interleaves the two sides: N rounds, each timing apq then onnxruntime by the
protocol, and reports the median over rounds of apq_ms, ort_ms and of the per-round ratio.
Why: even by thread CPU time one side's figure moved 2x between runs minutes apart on the
shared 2-vCPU VM (measured: onnxruntime int8 224 px 4.5, 2.8 and 2.1 ms in three runs of the
same build, likely an SMT sibling's load), and a ratio of two figures taken at different
times inherits all of it; a per-round ratio compares figures taken seconds apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


#: name -> clock function for single-threaded runs (see the module docstring).
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _apq_runner(lib_path: Path, inputs: list[np.ndarray], threads: int):
    """The compiled model's ``main`` with its inputs bound (no per-call marshalling), as in
    apq.toolchain.profile.profile_library, so it can be timed with any clock."""
    import tvm
    from tvm import relax

    from apq.toolchain.profile import set_runtime_threads

    set_runtime_threads(threads)
    dev = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), dev)
    vm.save_function("main", "__bench", *[tvm.runtime.tensor(a, dev) for a in inputs])
    return vm["__bench"]


def time_rounds(fns: dict[str, Any], cfg, threads: int, clock, rounds: int) -> tuple[dict[str, list[float]], dict]:
    """Median ms of every callable in ``fns``, round by round: each of ``rounds`` rounds times
    every callable once by the protocol (apq.toolchain.profile.measure), the order reversed every
    other round (kernels/interleaved.py, the tuners' helper). Returns ({name: [ms per round]},
    {name: its last LatencyStats}); ratios of two names are taken per round (:func:`round_ratio`),
    so both figures of a ratio come from seconds apart. A callable that raises stops the bench."""
    from apq.kernels.interleaved import interleaved_samples
    from apq.toolchain.profile import measure

    last: dict[str, Any] = {}
    errors: list[Exception] = []

    def time_one(name: str) -> float:
        try:
            last[name] = measure(fns[name], cfg, threads=threads, clock=clock)
        except Exception as e:  # interleaved_samples skips a failed sample; a benchmark must not
            errors.append(e)
            raise
        return last[name].median_ms

    ms = interleaved_samples(list(fns), rounds, time_one)
    if errors:
        raise errors[0]
    return ms, last


def round_ratio(ms: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``ms[num] / ms[den]`` (e.g. onnxruntime / apq: apq's speedup)."""
    return float(np.median(np.asarray(ms[num]) / np.asarray(ms[den])))


def interleaved(apq_fn, ort_fn, cfg, threads: int, clock, rounds: int) -> tuple[float, float, float, object]:
    """(apq_ms, ort_ms, speedup, last apq stats): medians over ``rounds`` alternating rounds."""
    ms, last = time_rounds({"apq": apq_fn, "ort": ort_fn}, cfg, threads, clock, rounds)
    return float(np.median(ms["apq"])), float(np.median(ms["ort"])), round_ratio(ms, "ort", "apq"), last["apq"]


def bench_model(name: str, precision: str, resolution: int, onnx_path: Path, threads_list: list[int],
                cfg, work: Path, clock: str = "wall", rounds: int = 1, layout: str = "NHWC",
                fuse_blocks: bool = True) -> list[dict]:
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.verify import ort_session

    option = "float_layout" if precision == "float32" else "int8_layout"
    res = compile_onnx(onnx_path, "host", work / f"{onnx_path.stem}_{layout}_{int(fuse_blocks)}.apq",
                       options=CompileOptions(**{option: layout}, fuse_blocks=fuse_blocks))
    variant = layout if fuse_blocks else f"{layout}-unfused"
    art = open_artifact(res.artifact_path)
    x = art.random_inputs(0)
    kernels = sorted({lay["kernel"] for lay in art.manifest["layers"]})
    records = []
    for threads in threads_list:
        used = clock if threads == 1 else "wall"
        run = _apq_runner(art.lib_path, x, threads)
        sess = ort_session(onnx_path, threads)
        feed = {art.input_specs[0].name: x[0]}
        apq_ms, ort_ms, speedup, apq = interleaved(run, lambda: sess.run(None, feed), cfg, threads,
                                                    CLOCKS[used], rounds)
        records.append({"model": name, "precision": precision, "resolution": resolution, "threads": threads,
                        "layout": layout, "fuse_blocks": fuse_blocks, "batch": 1, "apq_ms": round(apq_ms, 4), "ort_ms": round(ort_ms, 4),
                        "speedup": round(speedup, 4), "rounds": rounds, "compile_s": round(res.compile_s, 2),
                        "apq_kernels": kernels, "source": "measured", "device": apq.device,
                        "clock": "thread-cpu" if used == "thread" else "wall"})
        print(f"# {name} {precision} {variant} {resolution}px {threads}t ({used} clock, {rounds} rounds): apq {apq_ms:.3f} ms, "
              f"ort {ort_ms:.3f} ms, speedup {speedup:.3f}", file=sys.stderr)
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
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="clock for 1-thread runs: wall, or the thread's CPU time (robust on a loaded machine)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate apq / onnxruntime this many times; report medians (see the docstring)")
    ap.add_argument("--float-layouts", nargs="+", choices=["NHWC", "NCHW"], default=["NHWC"],
                    help="compile the float model with each of these conv layouts (CompileOptions.float_layout)")
    ap.add_argument("--int8-layouts", nargs="+", choices=["NHWC", "NCHW"], default=["NHWC"],
                    help="compile the int8 model with each of these layouts (CompileOptions.int8_layout)")
    ap.add_argument("--unfused", action="store_true",
                    help="also compile the float model with every conv as its own kernel "
                         "(CompileOptions.fuse_blocks=False), to see what merging depthwise blocks buys")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=5)
    records: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-") as tmp:
        work = Path(tmp)
        for r in args.resolutions:
            fp = mobilenetv2_onnx(work / f"mbv2_{r}.onnx", resolution=r, width=args.width, classes=1000 if r >= 224 else 10)
            q = quantize_qdq(fp, work / f"mbv2_{r}_int8.onnx", per_channel=True)
            for layout in args.float_layouts:
                for fuse in (True, False) if args.unfused else (True,):
                    records += bench_model("mobilenetv2-style", "float32", r, fp, args.threads, cfg, work, args.clock,
                                           args.rounds, layout, fuse)
            for layout in args.int8_layouts:
                records += bench_model("mobilenetv2-style", "int8-qdq", r, q, args.threads, cfg, work, args.clock,
                                       args.rounds, layout)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{'model':<20} {'precision':<22} {'res':>4} {'thr':>3} {'apq_ms':>9} {'ort_ms':>9} {'speedup':>8} {'compile_s':>9}")
        for rec in records:
            tag = rec["layout"] + ("" if rec["fuse_blocks"] else "-unfused")
            print(f"{rec['model']:<20} {rec['precision'] + '/' + tag:<22} {rec['resolution']:>4} {rec['threads']:>3} "
                  f"{rec['apq_ms']:>9.3f} {rec['ort_ms']:>9.3f} {rec['speedup']:>8.3f} {rec['compile_s']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
