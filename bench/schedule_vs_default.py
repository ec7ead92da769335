#!/usr/bin/env python3
"""apq's CPU schedules vs TVM 0.27's default (unscheduled) lowering, same Relax module, same threads.

Why this exists: TVM's default CPU pipeline schedules nothing (the issue measured 0.06-0.09x of
onnxruntime on a 32 px MobileNetV2-style net), and apq's rules (kernels/cpu_schedules.py) are
what close that gap. The speed-up is a benchmark, not a test: the tests check that the rules
apply (parallel, vectorized loops) and that scheduled outputs equal the unscheduled ones; the
figure lives here, timed side by side in one process.

Both builds take the same module (apq's ONNX import and QDQ lowering, so the int8 model runs
integer kernels either way) and differ only in ``compile_relax(schedule=...)``. Rounds
alternate the two builds and report medians of each and of the per-round ratio, by
bench/compile_vs_ort.py's ``interleaved`` (imported from it). Records (``--json``): model,
precision, resolution, threads, default_ms, apq_ms, speedup (default_ms / apq_ms), max_abs_diff,
rounds, clock, source.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from compile_vs_ort import CLOCKS, interleaved  # the sibling bench (bench/ is this script's path[0])


def _build(onnx_path: Path, schedule: bool):
    """The compiled VM executable of ``onnx_path`` for the host, with or without apq's schedules."""
    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.compile import CompileOptions, lower_module
    from apq.toolchain.onnx_import import import_to_relax, load_onnx, resolve_input_specs

    spec = get_target("host")
    model = load_onnx(onnx_path)
    specs = resolve_input_specs(model, {})
    mod, _ = lower_module(import_to_relax(model, specs), model, spec, CompileOptions(target="host"))
    return compile_relax(mod, spec.tvm(), schedule=schedule), specs


def _runner(exe, inputs: list[np.ndarray]):
    """(bound call, output fetcher): ``main`` with its inputs saved in the VM (no marshalling)."""
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(exe, tvm.cpu())
    vm.save_function("main", "__bench", *[tvm.runtime.tensor(a) for a in inputs])
    return vm["__bench"], lambda: vm["__bench"]().numpy()


def bench_model(precision: str, resolution: int, onnx_path: Path, threads: int, cfg, clock: str,
                rounds: int) -> dict:
    from apq.toolchain.profile import set_runtime_threads

    set_runtime_threads(threads)
    (apq_exe, specs), (default_exe, _) = _build(onnx_path, True), _build(onnx_path, False)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal([int(d) for d in s.shape]).astype(s.dtype) for s in specs]
    (apq_fn, apq_out), (default_fn, default_out) = _runner(apq_exe, inputs), _runner(default_exe, inputs)
    diff = float(np.max(np.abs(apq_out().astype("float64") - default_out().astype("float64"))))
    used = clock if threads == 1 else "wall"
    # default_ms / apq_ms per round, medians over rounds: compile_vs_ort's protocol, default in ORT's seat
    apq_ms, default_ms, speedup, _ = interleaved(apq_fn, default_fn, cfg, threads, CLOCKS[used], rounds)
    rec = {"model": "mobilenetv2-style", "precision": precision, "resolution": resolution, "threads": threads,
           "default_ms": round(default_ms, 4), "apq_ms": round(apq_ms, 4),
           "speedup": round(speedup, 3), "max_abs_diff": diff, "rounds": rounds,
           "clock": "thread-cpu" if used == "thread" else "wall", "source": "measured"}
    print(f"# {precision} {resolution}px {threads}t: default {rec['default_ms']:.3f} ms, apq {rec['apq_ms']:.3f} ms, "
          f"speedup {rec['speedup']:.2f}x, max |diff| {diff:.2e}", file=sys.stderr)
    return rec


def main(argv: list[str] | None = None) -> int:
    from apq.toolchain.examples import mobilenetv2_onnx, quantize_qdq
    from apq.toolchain.profile import MeasureConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[32])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--min-time", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="thread",
                    help="clock for 1-thread runs (multi-threaded runs always use wall time)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=3)
    records = []
    with tempfile.TemporaryDirectory(prefix="apq-bench-") as tmp:
        for r in args.resolutions:
            fp = mobilenetv2_onnx(Path(tmp) / f"mbv2_{r}.onnx", resolution=r, classes=1000 if r >= 224 else 10)
            q = quantize_qdq(fp, Path(tmp) / f"mbv2_{r}_int8.onnx", per_channel=True)
            for precision, path in (("float32", fp), ("int8-qdq", q)):
                for t in args.threads:
                    records.append(bench_model(precision, r, path, t, cfg, args.clock, args.rounds))
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        print(f"{'precision':<10} {'res':>4} {'thr':>3} {'default_ms':>11} {'apq_ms':>9} {'speedup':>8}")
        for rec in records:
            print(f"{rec['precision']:<10} {rec['resolution']:>4} {rec['threads']:>3} {rec['default_ms']:>11.3f} "
                  f"{rec['apq_ms']:>9.3f} {rec['speedup']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
