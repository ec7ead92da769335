"""Bit-serial vs int8, per MobileNetV2 layer shape: what ``apq compile --bitserial measured`` sees.

For each layer and bit pair this runs the measurement the compiler's kernel choice runs
(kernels/kernel_choice.py ``time_layer``): the bit-serial kernel the lowering would emit and the
int8 kernel(s) apq would run instead, built for the target, the bit-serial output checked against
the exact NumPy result, both timed as standalone kernels in interleaved rounds (1 thread, best
repeat). Here (host target) by default, or on a board over TVM RPC (``--target`` of the board,
``--rpc-tracker HOST:PORT --rpc-key KEY``). No cache: every figure is timed in this run.

Records: {op, shape, kernel, stride, w_bits, a_bits, mode, bitserial_ms, int8_ms,
int8_over_bitserial (> 1: bit-serial faster), exact, chosen, device, source}.

Usage: python bench/kernel_choice.py --json [--ops pointwise depthwise] [--bits 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

#: (op, H = W, in channels, out channels, kernel, stride, padding): MobileNetV2 layers at 224 px.
LAYERS = [
    ("pointwise", 112, 16, 64, 1, 1, 0), ("pointwise", 56, 24, 96, 1, 1, 0), ("pointwise", 56, 96, 24, 1, 1, 0),
    ("pointwise", 28, 32, 128, 1, 1, 0), ("pointwise", 28, 128, 32, 1, 1, 0), ("pointwise", 14, 64, 256, 1, 1, 0),
    ("pointwise", 14, 256, 64, 1, 1, 0), ("pointwise", 7, 320, 1280, 1, 1, 0),
    ("depthwise", 112, 32, 32, 3, 1, 1), ("depthwise", 112, 64, 64, 3, 2, 1), ("depthwise", 56, 96, 96, 3, 1, 1),
    ("depthwise", 56, 96, 96, 3, 2, 1), ("depthwise", 28, 128, 128, 3, 1, 1), ("depthwise", 14, 384, 384, 3, 1, 1),
]
#: bits -> weight mode: apq's 1-bit weights are binary {-1, +1} (bipolar), wider ones two's complement
MODES = {1: "bipolar", 2: "signed", 3: "signed", 4: "signed"}


def run(ops: list[str], bits: list[int], target: str, board: Any = None) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from apq.kernels.kernel_choice import ConvLayer, time_layer
    from apq.targets.registry import get_target

    spec = get_target(target)
    nhwc = "avx512vnni" in spec.features
    jobs = [(layer, b) for layer in LAYERS if layer[0] in ops for b in bits]
    records = []
    for (op, hw, cin, cout, k, s, p), b in tqdm(jobs, desc="kernel-choice bench", unit="layer", leave=False):
        layer = ConvLayer(op, hw, hw, cin, cout, k, s, p, b, b, MODES[b])
        t = time_layer(layer, spec, nhwc, board=board)
        ratio = t.int8_ms / t.bitserial_ms if t.int8_ms and t.bitserial_ms else None
        records.append({"op": op, "shape": f"{hw}x{hw}x{cin}->{cout}", "kernel": k, "stride": s, "w_bits": b,
                        "a_bits": b, "mode": MODES[b], "bitserial_ms": t.bitserial_ms, "int8_ms": t.int8_ms,
                        "int8_over_bitserial": None if ratio is None else round(ratio, 3), "exact": t.exact,
                        "chosen": t.kernel, "device": t.device, "target": target, "source": "measured"})
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", nargs="+", choices=["pointwise", "depthwise"], default=["pointwise", "depthwise"])
    ap.add_argument("--bits", type=int, nargs="+", choices=sorted(MODES), default=[1, 2, 4],
                    help="bit-widths (weights = activations)")
    ap.add_argument("--target", default="host")
    ap.add_argument("--rpc-tracker", metavar="HOST:PORT", help="time on a board behind this TVM RPC tracker")
    ap.add_argument("--rpc-key", metavar="KEY")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    board = None
    if args.rpc_tracker or args.rpc_key:
        from apq.kernels.kernel_choice import Board
        from apq.targets.rpc import parse_tracker

        if not (args.rpc_tracker and args.rpc_key):
            ap.error("a board needs both --rpc-tracker and --rpc-key")
        board = Board(*parse_tracker(args.rpc_tracker), args.rpc_key)
    records = run(args.ops, args.bits, args.target, board)
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    print(f"{'op':<10} {'shape':<16} {'s':>1} {'bits':>4} {'bit-serial us':>13} {'int8 us':>8} {'int8/bs':>7} {'chosen':>9}")
    for r in records:
        bs = "n/a" if r["bitserial_ms"] is None else f"{r['bitserial_ms'] * 1e3:.1f}"
        i8 = "n/a" if r["int8_ms"] is None else f"{r['int8_ms'] * 1e3:.1f}"
        ratio = "n/a" if r["int8_over_bitserial"] is None else f"{r['int8_over_bitserial']:.2f}"
        print(f"{r['op']:<10} {r['shape']:<16} {r['stride']:>1} W{r['w_bits']}A{r['a_bits']} {bs:>13} {i8:>8} "
              f"{ratio:>7} {r['chosen']:>9}{'' if r['exact'] else ' (NOT EXACT)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
