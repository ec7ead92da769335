#!/usr/bin/env python3
"""Pointwise conv (MobileNetV2 shapes) with a requantize epilogue: float32 vs apq's int8 schedules.

Paths, all compiled by apq's pipeline (kernels/pipeline.py) and timed side by side in one run:
- float32: conv2d float + ReLU6;
- int8-16bit: uint8 x int8 -> int32 with the generic tiling (LLVM emits vpmaddwd/vpdpwssd);
- int8-vnni: the same computation tensorized with apq's own AVX-512 VNNI (vpdpbusd) intrinsic
  (kernels/x86_int8.py), only where the host has avx512vnni.
Prints one JSON list with --json: {op, shape, path, ms, speedup_vs_int8_16bit, gops}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np

SHAPES = [(96, 576, 16, 16), (64, 384, 8, 8), (16, 96, 32, 32), (320, 1280, 4, 4)]


def _module(ic: int, oc: int, h: int, w: int, dtype: str, rng):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, ic, h, w], dtype))
    with bb.function("main", [x]):
        with bb.dataflow():
            if dtype == "float32":
                wt = rng.standard_normal((oc, ic, 1, 1)).astype("float32")
                y = bb.emit(relax.op.clip(relax.op.nn.conv2d(x, relax.const(wt)), 0.0, 6.0))
            else:
                wt = rng.integers(-128, 128, (oc, ic, 1, 1)).astype("int8")
                y = relax.op.nn.conv2d(x, relax.const(wt), out_dtype="int32")
                y = relax.op.multiply(relax.op.astype(y, "float32"), relax.const(np.float32(1e-3)))
                y = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(y), 0.0, 255.0), "uint8"))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    return bb.get()


def main(argv: list[str] | None = None) -> int:
    import tvm
    from tvm import relax

    from apq.kernels.cpu_schedules import CpuScheduleConfig
    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target
    from apq.toolchain.profile import MeasureConfig, measure, set_runtime_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    threads = set_runtime_threads(args.threads)
    spec = get_target("host")
    target = spec.tvm()
    cfg = CpuScheduleConfig.for_target(target)
    paths = {"float32": ("float32", cfg), "int8-16bit": ("uint8", dataclasses.replace(cfg, int8_dot=""))}
    if cfg.int8_dot:
        paths["int8-vnni"] = ("uint8", cfg)
    mcfg = MeasureConfig(min_time_s=args.min_time, min_repeats=20)
    records = []
    for ic, oc, h, w in SHAPES:
        ms = {}
        for name, (dtype, c) in paths.items():
            rng = np.random.default_rng(0)
            vm = relax.VirtualMachine(compile_relax(_module(ic, oc, h, w, dtype, rng), target, cfg=c), tvm.cpu())
            x = rng.integers(0, 256, (1, ic, h, w)).astype(dtype) if dtype == "uint8" else \
                rng.standard_normal((1, ic, h, w)).astype(dtype)
            arg = tvm.runtime.tensor(x)
            vm.save_function("main", "timed", arg)
            ms[name] = measure(vm["timed"], mcfg, threads=threads).median_ms
        for name, t in ms.items():
            ops = 2 * ic * oc * h * w
            records.append({"op": "conv2d_1x1", "shape": [ic, oc, h, w], "path": name, "threads": threads,
                            "ms": round(t, 5), "speedup_vs_int8_16bit": round(ms["int8-16bit"] / t, 3),
                            "gops": round(ops / (t * 1e-3) / 1e9, 2), "source": "measured"})
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            print(f"{str(r['shape']):<22} {r['path']:<11} {r['ms']:>9.4f} ms  x{r['speedup_vs_int8_16bit']:<6} "
                  f"{r['gops']:>8.1f} GOPS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
