#!/usr/bin/env python3
"""Mixed precision (bit-serial 2-4 bit pointwise blocks) vs int8 vs float: apq-compiled vs onnxruntime.

One MobileNetV2-style StaticNet (random weights, BN statistics randomised, activation clips
calibrated on random inputs) is exported three ways on the same weights: ``int8`` (apq QDQ
convention, every layer 8 bits), ``mixed`` (pointwise convs of the inner blocks at 2-4 bits, which
apq-compile lowers to bit-serial kernels; depthwise, stem, head and classifier 8 bits; one file per
policy of :data:`MIXED_POLICIES`) and ``float``. Each ONNX file is compiled by apq for the host and
run by onnxruntime (all graph optimizations: QDQ fused into its int8 kernels where it can), same
threads, batch 1. Everything is built first, then every build and session is timed in
``--rounds`` interleaved rounds by the same protocol (apq.toolchain.profile: warm-up, repeat until
a minimum time, median; bench/compile_vs_ort.py's ``time_rounds``), and every ratio is the median
of per-round ratios, so ratios are meaningful on a loaded machine and absolute numbers are not.

Records: {model, precision, threads, apq_ms, ort_ms, speedup (= ort_ms / apq_ms), ...}; each mixed
model also gets ``policy``, ``pointwise_bits``, ``speedup_vs_ort_int8`` (ort on the all-int8 file /
apq on the mixed file: the question "is apq's mixed model faster than what onnxruntime runs for an
int8 model?") and ``apq_int8_path_ms`` (apq on the mixed file with the bit-serial pass disabled:
what the bit-serial kernels themselves buy; ``int8_path_vs_bitserial`` is the per-round ratio
mixed / int8 path), ``apq_measured_ms`` / ``measured_speedup_vs_ort_int8`` /
``measured_bitserial_layers`` (``--bitserial measured``: per pointwise or depthwise layer the
faster of its bit-serial and int8 kernels, timed on this machine, kernels/kernel_choice.py); the
first policy also ``apq_transposing_ms`` / ``apq_nchw_depthwise_ms`` (the
bit-serial build without the NHWC-run layout pass / with it but int8 depthwise convs left NCHW, see
toolchain/layout.py) and ``apq_opaque_epilogues_ms`` (pointwise bit-serial kernels opaque, each
requantize epilogue a kernel of its own: BitserialPolicy.fuse_epilogues off). ``--transposes``
adds the per-kernel share of the NCHW<->NHWC transposes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compile_vs_ort import CLOCKS, _apq_runner, round_ratio, time_rounds  # the sibling bench (bench/ is path[0])


#: (expand ratio, out channels, repeats, stride): examples.MBV2_STAGES with deeper middle stages (10 blocks).
STAGES = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 2), (4, 96, 2, 1)]
STEM_CH, HEAD_CH = 32, 320


#: The mixed policies: pointwise bits (weights = activations) of the first and last block, then of
#: the inner blocks. Depthwise convs stay 8-bit in all of them (bench/kernels.py: bit-serial
#: depthwise only wins at 1-2 bits *and* loses accuracy fastest there).
#: ``w4-ends``: 4-bit at the ends, closest to the 8-bit stem and head (this bench's policy since it
#: was written). ``int8-ends``: the ends stay 8-bit, as APQ keeps the layers next to the stem and
#: head; on a CPU whose 4-bit bit-serial kernels are slower than its int8 ones (W4A4 here: 0.18x
#: of VNNI, bench/isa_peak.py) it is also what a latency-aware search would choose.
#: ``binary-inner`` (not built by default): the inner pointwise convs W1A1 (binary {-1, +1} weights,
#: 1-bit activations), the one bit-width at which a bit-serial kernel can beat VNNI int8 on some
#: layers (docs/bitserial_limits.md), so ``--bitserial measured`` has something to choose.
MIXED_POLICIES: dict[str, tuple[int, int]] = {"w4-ends": (4, 2), "int8-ends": (8, 2), "binary-inner": (8, 1)}
DEFAULT_POLICY = "w4-ends"
DEFAULT_POLICIES = ("w4-ends", "int8-ends")


def block_bits(i: int, n: int, precision: str, policy: str = DEFAULT_POLICY) -> tuple[int | None, ...]:
    """(pw_w, pw_a, dw_w, dw_a) of block ``i`` of ``n`` (:data:`MIXED_POLICIES` for "mixed")."""
    if precision == "float":
        return (None,) * 4
    if precision == "int8":
        return (8, 8, 8, 8)
    ends, inner = MIXED_POLICIES[policy]
    pw = ends if i in (0, n - 1) else inner
    return (pw, pw, 8, 8)


def make_net(precision: str, resolution: int, classes: int = 10, seed: int = 0, policy: str = DEFAULT_POLICY):
    """The benchmark StaticNet at ``precision`` (same weights for every precision and policy with the
    same seed)."""
    import torch

    from apq.toolchain.supernet.qlayers import (InvertedResidual, QConvBNAct, QLinear, StaticNet, calibrate_net,
                                                randomize_batchnorm)

    torch.manual_seed(seed)
    q8 = None if precision == "float" else 8
    n = sum(r for _, _, r, _ in STAGES)
    stem = QConvBNAct(3, STEM_CH, 3, 1 if resolution <= 64 else 2, in_signed=True, w_bits=q8, a_bits=q8)
    blocks, c = [], STEM_CH
    for t, cout, reps, s in STAGES:
        for r in range(reps):
            pw_w, pw_a, dw_w, dw_a = block_bits(len(blocks), n, precision, policy)
            blocks.append(InvertedResidual(c, c * t, cout, 3, s if r == 0 else 1, pw_w, pw_a, dw_w, dw_a))
            c = cout
    head = QConvBNAct(c, HEAD_CH, 1, in_signed=True, w_bits=q8, a_bits=q8)
    net = StaticNet(stem, blocks, head, QLinear(HEAD_CH, classes, w_bits=q8, a_bits=q8))
    g = torch.Generator().manual_seed(seed)
    randomize_batchnorm(net, g)
    net.eval()
    calibrate_net(net, torch.randn(8, 3, resolution, resolution, generator=g))
    return net


def export(precision: str, resolution: int, work: Path, policy: str = DEFAULT_POLICY) -> Path:
    from apq.toolchain.supernet.qlayers import export_onnx

    net = make_net(precision, resolution, policy=policy)
    tag = f"mixed-{policy}" if precision == "mixed" else precision
    return export_onnx(net, work / f"mbv2_{tag}_{resolution}.onnx", (1, 3, resolution, resolution),
                       quantized=precision != "float")


def build_apq(onnx_path: Path, out: Path, options=None) -> tuple[Any, float]:
    """(loaded artifact, compile seconds) of apq-compiling ``onnx_path`` for the host."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx

    res = compile_onnx(onnx_path, "host", out, options=options)
    return open_artifact(res.artifact_path), res.compile_s


def ort_runner(onnx_path: Path, x: Any, threads: int):
    from apq.toolchain.verify import ort_session

    sess = ort_session(onnx_path, threads)
    feed = {sess.get_inputs()[0].name: x}
    return lambda: sess.run(None, feed)


#: per-kernel groups of the --transposes table: (group, test on the kernel name), first match wins
KERNEL_GROUPS: tuple[tuple[str, Any], ...] = (
    ("bitserial_ms", lambda n: n.startswith("bitserial") or n.startswith("fused_bitserial")),  # + fused epilogues
    ("standalone_transpose_ms", lambda n: n.startswith("transpose")),  # could not fuse (after an int8 conv)
    ("epilogue_with_transpose_ms", lambda n: n.startswith("fused_transpose")),  # NHWC->NCHW + requantize
    ("int8_conv_ms", lambda n: n.startswith("fused_conv2d") or n.startswith("fused_matmul")),
    ("vm_builtins_ms", lambda n: n.startswith("(")),
    ("other_ms", lambda n: True),  # with NHWC runs: mostly the bit-serial layers' epilogues (contiguous)
)


def kernel_groups(art, threads: int, cfg) -> dict[str, float]:
    """Instrumented per-kernel ms of an artifact, summed by :data:`KERNEL_GROUPS` (where the time goes,
    in particular what the NCHW<->NHWC transposes around the bit-serial kernels cost)."""
    from apq.toolchain.profile import profile_library

    rep = profile_library(art.lib_path, art.random_inputs(0), threads, cfg, per_layer=True)
    groups = {name: 0.0 for name, _ in KERNEL_GROUPS}
    for row in rep.layers:
        groups[next(g for g, match in KERNEL_GROUPS if match(row.name))] += row.total_ms
    groups["instrumented_total_ms"] = rep.instrumented_ms
    return {k: round(v, 4) for k, v in groups.items()}


#: The mixed file's apq builds besides the default bit-serial one: record key -> policy arguments
#: (None: bit-serial lowering off, the layers on the int8 kernels).
MIXED_VARIANTS: dict[str, dict[str, Any] | None] = {
    "apq_int8_path_ms": None,  # what the bit-serial kernels themselves buy
    # per pointwise or depthwise layer the faster of its bit-serial and int8 kernels, timed on this machine
    # (apq compile --bitserial measured, kernels/kernel_choice.py)
    "apq_measured_ms": {"select": "measured"},
    "apq_transposing_ms": {"nhwc_runs": False},  # transposes around every bit-serial kernel
    "apq_nchw_depthwise_ms": {"nhwc_depthwise": False},  # NHWC runs, int8 depthwise convs NCHW
    "apq_opaque_epilogues_ms": {"fuse_epilogues": False},  # requantize epilogues as kernels of their own
}
#: the variants built for every policy (the others for the first policy only)
PER_POLICY_VARIANTS = ("apq_int8_path_ms", "apq_measured_ms")


def _variant_options(v: dict[str, Any] | None):
    from apq.toolchain.bitserial_lowering import BitserialPolicy
    from apq.toolchain.compile import CompileOptions

    return CompileOptions(bitserial=BitserialPolicy.disabled() if v is None else BitserialPolicy(**v))
PRECISIONS = ("float", "int8", "mixed")


def run(resolution: int, threads: int, cfg, work: Path, transposes: bool = False, rounds: int = 5,
        clock: str = "thread", policies: tuple[str, ...] = DEFAULT_POLICIES) -> list[dict[str, Any]]:
    """Build everything first, then time every build and onnxruntime session in ``rounds``
    interleaved rounds (bench/compile_vs_ort.py's protocol): every ratio, above all
    ``speedup_vs_ort_int8`` (onnxruntime on one file, apq on another), is a median of per-round
    ratios of figures taken seconds apart. Timed one after the other, the host's speed moved
    between them: one sequential run read 2.72x for a build that measures 1.43-1.58x interleaved.

    One mixed file per policy in ``policies`` (:data:`MIXED_POLICIES`), each built bit-serial and
    on the int8 path; the other ablations (:data:`MIXED_VARIANTS`) for the first policy only."""
    from tqdm import tqdm

    from apq.toolchain.bitserial_lowering import BitserialPolicy
    from apq.toolchain.compile import CompileOptions

    bitserial = CompileOptions(bitserial=BitserialPolicy())
    paths = {p: export(p, resolution, work) for p in PRECISIONS if p != "mixed"}
    paths.update({f"mixed:{pol}": export("mixed", resolution, work, pol) for pol in policies})
    jobs = [(p, paths[p], bitserial if p.startswith("mixed") else None) for p in paths]
    jobs += [(f"{key}:{pol}", paths[f"mixed:{pol}"], _variant_options(v))
             for key, v in MIXED_VARIANTS.items()
             for pol in (policies if key in PER_POLICY_VARIANTS else policies[:1])]
    builds: dict[str, tuple[Any, float]] = {}
    for key, path, opts in tqdm(jobs, desc="mixed-precision bench: compile", leave=False):
        builds[key] = build_apq(path, work / f"{key.replace(':', '_')}.apq", opts)
    x = builds["int8"][0].random_inputs(0)
    fns = {f"apq:{key}": _apq_runner(art.lib_path, x, threads) for key, (art, _) in builds.items()}
    fns.update({f"ort:{p}": ort_runner(path, x[0], threads) for p, path in paths.items()})
    used = clock if threads == 1 else "wall"
    ms, last = time_rounds(fns, cfg, threads, CLOCKS[used], rounds)

    def med(name: str) -> float:
        return round(float(np.median(ms[name])), 4)

    records: list[dict[str, Any]] = []
    for p in paths:
        art, compile_s = builds[p]
        layers, apq = art.manifest["layers"], last[f"apq:{p}"]
        precision, _, policy = p.partition(":")
        rec: dict[str, Any] = {
            "model": f"mobilenetv2-style-{len(STAGES)}stages", "precision": precision, "resolution": resolution,
            "threads": threads, "batch": 1, "apq_ms": med(f"apq:{p}"), "ort_ms": med(f"ort:{p}"),
            "speedup": round(round_ratio(ms, f"ort:{p}", f"apq:{p}"), 3), "compile_s": round(compile_s, 2),
            "bitserial_layers": sum(1 for lay in layers if lay["kernel"].startswith("bitserial")),
            "layers": len(layers), "apq_p10_p90_ms": [round(apq.p10_ms, 4), round(apq.p90_ms, 4)],
            "rounds": rounds, "clock": "thread-cpu" if used == "thread" else "wall",
            "source": "measured", "device": apq.device}
        if policy:
            ends, inner = MIXED_POLICIES[policy]
            rec.update(policy=policy, pointwise_bits={"first_last_blocks": ends, "inner_blocks": inner})
            rec["speedup_vs_ort_int8"] = round(round_ratio(ms, "ort:int8", f"apq:{p}"), 3)
            rec.update({key: med(f"apq:{key}:{policy}") for key in MIXED_VARIANTS if f"apq:{key}:{policy}" in ms})
            rec["int8_path_vs_bitserial"] = round(round_ratio(ms, f"apq:{p}", f"apq:apq_int8_path_ms:{policy}"), 3)
            measured = f"apq:apq_measured_ms:{policy}"
            rec["measured_speedup_vs_ort_int8"] = round(round_ratio(ms, "ort:int8", measured), 3)
            rec["measured_bitserial_layers"] = sum(
                1 for lay in builds[f"apq_measured_ms:{policy}"][0].manifest["layers"]
                if lay["kernel"].startswith("bitserial"))
            if transposes:
                rec["kernel_groups"] = kernel_groups(art, threads, cfg)
        records.append(rec)
        extra = (f", vs onnxruntime int8 {rec['speedup_vs_ort_int8']:.2f} (measured kernel choice: "
                 f"{rec['measured_speedup_vs_ort_int8']:.2f}, {rec['measured_bitserial_layers']} bit-serial layers)"
                 if policy else "")
        print(f"# {p}: apq {rec['apq_ms']:.3f} ms, ort {rec['ort_ms']:.3f} ms, speedup {rec['speedup']:.2f}{extra} "
              f"({rounds} interleaved rounds, {rec['clock']} clock)", file=sys.stderr)
    return records


def main(argv: list[str] | None = None) -> int:
    from apq.toolchain.profile import MeasureConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of timed calls per figure and round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds over all builds and sessions")
    ap.add_argument("--clock", choices=["thread", "wall"], default="thread",
                    help="clock for 1-thread runs (bench/compile_vs_ort.py); more threads always use wall time")
    ap.add_argument("--transposes", action="store_true", help="also profile per kernel (transpose cost)")
    ap.add_argument("--policies", nargs="+", choices=sorted(MIXED_POLICIES), default=list(DEFAULT_POLICIES),
                    help="mixed policies to build (MIXED_POLICIES; ablations for the first one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    cfg = MeasureConfig(min_time_s=args.min_time, min_repeats=10)
    with tempfile.TemporaryDirectory(prefix="apq-mixed-") as tmp:
        records = run(args.resolution, args.threads, cfg, Path(tmp), args.transposes, args.rounds, args.clock,
                      tuple(dict.fromkeys(args.policies)))
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{'precision':<19} {'thr':>3} {'apq_ms':>8} {'ort_ms':>8} {'speedup':>8} {'vs ort int8':>11} "
          f"{'bit-serial':>10}")
    for r in records:
        name = r["precision"] + (f":{r['policy']}" if "policy" in r else "")
        vs_int8 = f"{r['speedup_vs_ort_int8']:>11.2f}" if "policy" in r else f"{'':>11}"
        print(f"{name:<19} {r['threads']:>3} {r['apq_ms']:>8.3f} {r['ort_ms']:>8.3f} {r['speedup']:>8.2f} {vs_int8} "
              f"{r['bitserial_layers']:>4}/{r['layers']:<5}")
    first = next(r for r in records if "policy" in r)
    print(f"mixed:{first['policy']}: apq {first['apq_ms']:.3f} ms (same file, bit-serial off: "
          f"{first['apq_int8_path_ms']:.3f} ms; transposes around every bit-serial kernel: "
          f"{first['apq_transposing_ms']:.3f} ms; NCHW depthwise: {first['apq_nchw_depthwise_ms']:.3f} ms; "
          f"epilogues as kernels of their own: {first['apq_opaque_epilogues_ms']:.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
