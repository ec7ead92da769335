"""Per-layer kernel benchmark: float32 vs int8 vs bit-serial on MobileNetV2 layer shapes.

    python bench/kernels.py [--json] [--threads N] [--target host] [--mode unipolar|bipolar] [--quick]

Every kernel is compiled from apq's kernel registry for the target, checked bit-exact (float:
allclose) against the NumPy reference, then timed with TVM's ``time_evaluator`` (one warm-up call,
then ``rounds`` runs of at least ``min_repeat_ms`` each; the median is reported with min/max).
All precisions of a layer are measured side by side, interleaved round by round, so the ratios
are what to trust on a shared machine. The "int8" baseline is a plain uint8 x int8 -> int32 direct conv with the
same simple schedule template as the bit-serial kernels: NOT a tuned kernel. For pointwise convs on a host with
AVX-512 VNNI, apq's best int8 kernel (the compile pipeline's vpdpbusd path, kernels/x86_int8.py) is timed too
("int8-vnni"), and every record carries ``speedup_vs_best_int8`` against the faster of the two: that is the
margin that matters.

Achieved GOPS against the CPU's peak: before timing, the instruction ceilings of this core are measured
once with bench/isa_peak.py's assembly loops (x86 with AVX-512 VNNI; elsewhere the fields are null).
Each record gets ``peak_gops`` for its kernel family times the TVM threads (float32: ``vfmadd231ps``;
int8: ``vpdpbusd``; a ``wb x ab``-bit bit-serial kernel: the AND+popcount binary rate divided by
``wb * ab`` bit-plane pairs), ``peak_instruction`` and ``fraction_of_peak`` (``gops / peak_gops``). The
peak is a ceiling of arithmetic alone (operands in registers), so the fraction says how much of the
gap is loads, packing and epilogues. AMX, where present, is not counted: apq's kernels do not use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layer:
    name: str
    op: str  # "conv2d" | "depthwise_conv2d"
    hw: int
    cin: int
    cout: int
    kernel: int
    stride: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2

    @property
    def out_hw(self) -> int:
        return (self.hw + 2 * self.padding - self.kernel) // self.stride + 1

    def macs(self) -> int:
        per_out = self.kernel * self.kernel * (1 if self.op == "depthwise_conv2d" else self.cin)
        return self.out_hw * self.out_hw * self.cout * per_out

    def shape_str(self) -> str:
        return f"{self.hw}x{self.hw}x{self.cin}->{self.cout} k{self.kernel} s{self.stride}"


@dataclass(frozen=True)
class Precision:
    label: str
    a_bits: int  # 32 = float32
    w_bits: int


@dataclass(frozen=True)
class MeasureConfig:
    """``rounds`` interleaved rounds over all precisions of a layer; in each round every kernel runs
    for at least ``min_repeat_ms`` (TVM picks the call count). Interleaving exposes all precisions
    to the same load on a shared machine, so their ratios stay meaningful."""

    rounds: int = 7
    min_repeat_ms: int = 20

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# MobileNetV2 inverted-residual shapes at 128 px input (stages at 16x16 and 8x8).
LAYERS = (
    Layer("pw_expand_64_384_16", "conv2d", 16, 64, 384, 1),
    Layer("pw_expand_96_576_16", "conv2d", 16, 96, 576, 1),
    Layer("pw_expand_64_384_8", "conv2d", 8, 64, 384, 1),
    Layer("pw_expand_96_576_8", "conv2d", 8, 96, 576, 1),
    Layer("dw3x3_384_16", "depthwise_conv2d", 16, 384, 384, 3),
    Layer("dw3x3_576_8", "depthwise_conv2d", 8, 576, 576, 3),
)
PRECISIONS = (
    Precision("float32", 32, 32),
    Precision("int8", 8, 8),
    Precision("W4A4", 4, 4),
    Precision("W2A2", 2, 2),
    Precision("W1A1", 1, 1),
    Precision("W2A8", 8, 2),
)


def _make_case(layer: Layer, prec: Precision, mode: str, target, arch: str, rng: np.random.Generator):
    """(PrimFunc, input arrays, output shape/dtype, reference output) for one layer x precision."""
    from apq.kernels import bitpack, bitserial, reference, registry

    dw = layer.op == "depthwise_conv2d"
    spec = registry.find_kernel(layer.op, prec.a_bits, prec.w_bits, arch)
    x_shape = (1, layer.hw, layer.hw, layer.cin)
    w_shape = (layer.kernel, layer.kernel, layer.cin) if dw else (layer.kernel, layer.kernel, layer.cin, layer.cout)
    out_shape = (1, layer.out_hw, layer.out_hw, layer.cout)
    if prec.a_bits == 32:
        x = rng.standard_normal(x_shape).astype("float32")
        w = rng.standard_normal(w_shape).astype("float32")
        func = spec.builder(x_shape, w_shape, stride=layer.stride, padding=layer.padding, target=target)
        wi = w[:, :, None, :] if dw else w
        return spec, func, [x, w], (out_shape, "float32"), _float_ref(x, wi, layer)
    a_top = (1 << prec.a_bits) - 1
    x = rng.integers(0, a_top + 1, x_shape).astype("uint8")
    if "bit-serial" not in spec.tags:  # an int8 kernel taking plain (unpacked) int8 weights
        w = rng.integers(-128, 128, w_shape).astype("int8")
        func = spec.builder(x_shape, w_shape, stride=layer.stride, padding=layer.padding, target=target)
        wp = w
    else:
        lo, hi = bitpack.weight_range(prec.w_bits, mode)
        w = rng.integers(lo, hi + 1, w_shape)
        if mode == "bipolar":
            w = np.clip(w | 1, lo, hi)
        cfg = bitserial.BitserialConfig(prec.a_bits, prec.w_bits, mode, layer.stride, layer.padding)
        wp = (bitpack.pack_depthwise_weights(w, prec.w_bits, mode) if dw
              else bitpack.pack_conv_weights_hwio(w, prec.w_bits, mode, cfg.word_bits))
        func = spec.builder(x_shape, wp.shape, cfg=cfg, kernel_size=layer.kernel, target=target)
    ref = (reference.depthwise_conv2d_nhwc_int(x, w, layer.stride, layer.padding) if dw
           else reference.conv2d_nhwc_int(x, w, layer.stride, layer.padding))
    return spec, func, [x, wp], (out_shape, "int32"), ref


def _float_ref(x: np.ndarray, w: np.ndarray, layer: Layer) -> np.ndarray:
    """float64 NHWC conv (w HWIO; depthwise (K, K, 1, C)) for the float32 parity check."""
    groups = layer.cin if layer.op == "depthwise_conv2d" else 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (layer.padding,) * 2, (layer.padding,) * 2, (0, 0)))
    out = np.zeros((1, layer.out_hw, layer.out_hw, layer.cout))
    k, s = layer.kernel, layer.stride
    for y in range(k):
        for xx in range(k):
            patch = xp[:, y:y + s * (layer.out_hw - 1) + 1:s, xx:xx + s * (layer.out_hw - 1) + 1:s, :]
            if groups == 1:
                out += patch @ w[y, xx].astype(np.float64)
            else:
                out += patch * w[y, xx, 0].astype(np.float64)
    return out


def _environment(threads: int, target_name: str) -> dict[str, Any]:
    from apq.targets.registry import get_target, read_cpu_model

    gov = "unknown"
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor", encoding="utf-8") as f:
            gov = f.read().strip()
    except OSError:
        pass
    import tvm

    num_threads = tvm.get_global_func("runtime.NumThreads", allow_missing=True)
    actual = int(num_threads()) if num_threads is not None else threads
    return {"cpu": read_cpu_model(), "threads": actual, "governor": gov, "target": target_name,
            "tvm_target": get_target(target_name).tvm_target, "load_avg_1m": os.getloadavg()[0]}


def isa_peaks(seconds: float = 0.3) -> dict[str, float]:
    """This core's measured MAC rates (bench/isa_peak.py), or {} where they cannot be measured."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("isa_peak.py")
    spec = importlib.util.spec_from_file_location("apq_bench_isa_peak", path)
    peak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peak)
    if peak.REQUIRED_FLAGS - peak.cpu_flags():
        return {}
    try:
        return peak.measure(seconds)
    except peak.MeasureError:
        return {}


def peak_of(w_bits: int, a_bits: int, peaks: dict[str, float], threads: int) -> tuple[float | None, str | None]:
    """(peak GOPS, instruction) of the kernel family for these bit-widths on ``threads`` cores."""
    if not peaks:
        return None, None
    if a_bits == 32:
        macs, what = peaks["fma_f32_macs_per_s"], "vfmadd231ps zmm"
    elif w_bits == 8 and a_bits == 8:
        macs, what = peaks["vnni_int8_macs_per_s"], "vpdpbusd zmm"
    else:
        binary = max(peaks["and_popcnt512_binary_macs_per_s"], peaks["and_popcnt256_binary_macs_per_s"])
        macs, what = binary / (w_bits * a_bits), f"vpandq+vpopcntq+vpaddq / {w_bits * a_bits} bit-plane pairs"
    return 2 * macs * max(1, threads) / 1e9, what


def run_benchmark(layers=LAYERS, precisions=PRECISIONS, mode: str = "unipolar", target_name: str = "host",
                  measure: MeasureConfig = MeasureConfig(), threads: int = 0, progress: bool = True,
                  peaks: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Compile, verify and time every layer x precision; returns the records (one per pair).

    ``peaks``: per-core MAC rates as :func:`isa_peaks` returns them (None: measure them here)."""
    import tvm
    from tqdm import tqdm

    from apq.kernels import bitserial
    from apq.targets.registry import get_target

    tspec = get_target(target_name)
    if tspec.executor == "qemu":
        raise SystemExit("kernels can only be timed on a local target (qemu runs are never timed)")
    target = tspec.tvm()
    env = _environment(threads, target_name)
    peaks = isa_peaks() if peaks is None else peaks
    rng = np.random.default_rng(0)
    dev = tvm.cpu()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(layers) * len(precisions), desc="kernels", disable=not progress, file=sys.stderr)
    for layer in layers:
        cases = {}
        for prec in precisions:
            cases[prec.label] = _make_case(layer, prec, mode, target, tspec.arch, rng)
        t0 = time.perf_counter()
        mod = bitserial.build_many({f"k_{lab}": c[1] for lab, c in cases.items()}, target)
        build_s = time.perf_counter() - t0
        runs, exact = {}, {}
        for prec in precisions:
            spec, _, arrays, (oshape, odt), ref = cases[prec.label]
            args = [tvm.runtime.tensor(a) for a in arrays] + [tvm.runtime.empty(oshape, odt)]
            mod[f"k_{prec.label}"](*args)  # warm-up and correctness
            got = args[-1].numpy()
            exact[prec.label] = (bool(np.allclose(got, ref, rtol=1e-4, atol=1e-3)) if odt == "float32"
                                 else bool((got == ref).all()))
            timer = mod.time_evaluator(f"k_{prec.label}", dev, number=1, repeat=1,
                                       min_repeat_ms=int(measure.min_repeat_ms))
            runs[prec.label] = (timer, args, [])
        for _ in range(measure.rounds):
            for timer, args, times in runs.values():
                times.append(timer(*args).mean * 1e3)
        layer_recs = []
        for prec in precisions:
            spec = cases[prec.label][0]
            res = np.array(runs[prec.label][2])
            ms = float(np.median(res))
            layer_recs.append({
                "op": layer.op, "layer": layer.name, "shape": layer.shape_str(),
                "precision": prec.label, "w_bits": prec.w_bits, "a_bits": prec.a_bits,
                "mode": mode if "bit-serial" in spec.tags else None, "kernel": spec.name,
                "ms": round(ms, 5), "ms_min": round(float(res.min()), 5), "ms_max": round(float(res.max()), 5),
                "gops": round(2 * layer.macs() / (ms * 1e-3) / 1e9, 2), "exact": exact[prec.label],
                "build_s_layer": round(build_s, 2), "source": "measured", "measure": measure.to_json(), **env,
            })
            bar.update(1)
        int8_ms = next((r["ms"] for r in layer_recs if r["precision"] == "int8"), None)
        vnni = _vnni_record(layer, tspec, measure, rng, env)
        if vnni is not None:
            layer_recs.append(vnni)
        best = min([r["ms"] for r in layer_recs if r["precision"] in ("int8", "int8-vnni")], default=None)
        for r in layer_recs:
            r["speedup_vs_int8"] = round(int8_ms / r["ms"], 3) if int8_ms else None
            r["speedup_vs_best_int8"] = round(best / r["ms"], 3) if best else None
            peak, what = peak_of(r["w_bits"], r["a_bits"], peaks, env["threads"])
            r["peak_gops"] = round(peak, 1) if peak else None
            r["peak_instruction"] = what
            r["fraction_of_peak"] = round(r["gops"] / peak, 3) if peak else None
        records.extend(layer_recs)
    bar.close()
    return records


def _vnni_record(layer: Layer, tspec, measure: MeasureConfig, rng: np.random.Generator,
                 env: dict[str, Any]) -> dict[str, Any] | None:
    """apq's VNNI int8 pointwise conv (NCHW, as the compile pipeline runs it), verified and timed."""
    if layer.op != "conv2d" or layer.kernel != 1 or layer.stride != 1 or "avx512vnni" not in tspec.features:
        return None
    import tvm
    from tvm import relax

    from apq.kernels.pipeline import compile_relax

    x = rng.integers(0, 256, (1, layer.cin, layer.hw, layer.hw)).astype("uint8")
    w = rng.integers(-128, 128, (layer.cout, layer.cin, 1, 1)).astype("int8")
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType(list(x.shape), "uint8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(xv, relax.const(w), out_dtype="int32")))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(compile_relax(bb.get(), tspec.tvm()), tvm.cpu())
    arg = tvm.runtime.tensor(x)
    got = vm["main"](arg).numpy()
    ref = np.einsum("oc,nchw->nohw", w[:, :, 0, 0].astype(np.int64), x.astype(np.int64))
    timer = vm.time_evaluator("main", tvm.cpu(), number=1, repeat=measure.rounds,
                              min_repeat_ms=int(measure.min_repeat_ms))
    res = np.array(timer(arg).results) * 1e3
    ms = float(np.median(res))
    return {"op": layer.op, "layer": layer.name, "shape": layer.shape_str(), "precision": "int8-vnni",
            "w_bits": 8, "a_bits": 8, "mode": None, "kernel": "conv2d.uint8xint8->int32 (vpdpbusd)",
            "ms": round(ms, 5), "ms_min": round(float(res.min()), 5), "ms_max": round(float(res.max()), 5),
            "gops": round(2 * layer.macs() / (ms * 1e-3) / 1e9, 2), "exact": bool((got == ref).all()),
            "source": "measured", "measure": measure.to_json(), **env}


def _table(records: list[dict[str, Any]]) -> str:
    lines = [f"{'layer':24s} {'prec':9s} {'ms':>9s} {'min':>9s} {'x int8':>7s} {'x best8':>7s} {'GOPS':>8s} "
             f"{'of peak':>7s} exact"]
    for r in records:
        frac = f"{100 * r['fraction_of_peak']:6.1f}%" if r.get("fraction_of_peak") is not None else f"{'-':>7s}"
        lines.append(f"{r['layer']:24s} {r['precision']:9s} {r['ms']:9.4f} {r['ms_min']:9.4f} "
                     f"{r['speedup_vs_int8']:7.2f} {r['speedup_vs_best_int8']:7.2f} {r['gops']:8.1f} {frac} {r['exact']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON list of records")
    ap.add_argument("--threads", type=int, default=0, help="TVM worker threads (0 = TVM default)")
    ap.add_argument("--target", default="host")
    ap.add_argument("--mode", default="unipolar", choices=("unipolar", "signed", "bipolar"),
                    help="bit-serial weight encoding (see apq.kernels.bitpack)")
    ap.add_argument("--quick", action="store_true", help="first layer only, short timing (smoke test)")
    args = ap.parse_args(argv)
    if args.threads:
        os.environ["TVM_NUM_THREADS"] = str(args.threads)  # must be set before TVM's thread pool starts
    layers = LAYERS[:1] if args.quick else LAYERS
    measure = MeasureConfig(rounds=3, min_repeat_ms=5) if args.quick else MeasureConfig()
    records = run_benchmark(layers, PRECISIONS, args.mode, args.target, measure, args.threads)
    print(json.dumps(records, indent=1) if args.json else _table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
