"""Regenerate an APQ-style BitFusion latency/energy lookup table (JSON and/or CSV).

APQ's released code downloads a latency table but never shipped the code that built it; this
script rebuilds one from the analytic BitFusion model for any layer list, so the table is
reproducible from its own contents (config + layers are stored in the JSON).

    python bench/bitfusion_lut.py --json lut.json --csv lut.csv            # MobileNetV2-224
    python bench/bitfusion_lut.py --layers layers.json --bits 2 4 8 --json lut.json
    python bench/bitfusion_lut.py --summary                                 # ratios vs W8A8

``--layers`` takes a JSON list of LayerShape objects (see apq.targets.layers); ``--config``
a BitFusionConfig JSON (or ``--preset edge|paper-eyeriss``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from apq.targets.bitfusion import (LUT_CSV_COLUMNS, PRESETS, BitFusionConfig, lookup_table, lookup_table_rows,
                                   preset, save_lookup_table, simulate_network)
from apq.targets.layers import layers_from_json, mobilenet_v2_layers
from apq.toolchain.errors import ApqError, InvalidInputError


def _read_json(path: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"cannot read JSON from {path}: {exc}") from None


def summary(layers, config: BitFusionConfig, bits: list[int]) -> list[dict[str, float]]:
    """Whole-network latency/energy for each uniform W=A bit-width, relative to W8A8."""
    ref = simulate_network([l.with_bits(8, 8) for l in layers], config)
    rows = []
    for b in bits:
        cost = simulate_network([l.with_bits(b, b) for l in layers], config)
        rows.append({"bits": b, "latency_ms": cost.latency_ms, "energy_uj": cost.energy_uj,
                     "latency_ratio": cost.latency_ms / ref.latency_ms, "energy_ratio": cost.energy_uj / ref.energy_uj})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", help="JSON list of LayerShape objects (default: MobileNetV2)")
    ap.add_argument("--resolution", type=int, default=224, help="MobileNetV2 input size when --layers is absent")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 6, 8], help="bit choices; every (w, a) pair")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--config", help="BitFusionConfig JSON file")
    src.add_argument("--preset", choices=sorted(PRESETS), default="edge")
    ap.add_argument("--json", help="write the table as JSON here")
    ap.add_argument("--csv", help="write the table as CSV here")
    ap.add_argument("--summary", action="store_true", help="print whole-network ratios vs W8A8")
    args = ap.parse_args(argv)
    try:
        config = BitFusionConfig.from_json(_read_json(args.config)) if args.config else preset(args.preset)
        if args.layers:
            data = _read_json(args.layers)
            if not isinstance(data, list):
                raise InvalidInputError(f"{args.layers} must hold a JSON list of layers")
            layers = layers_from_json(data)
        else:
            layers = mobilenet_v2_layers(args.resolution)
        table = lookup_table(layers, args.bits, config, progress=True)
        if args.json:
            save_lookup_table(table, args.json)
        if args.csv:
            with open(args.csv, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=list(LUT_CSV_COLUMNS))
                writer.writeheader()
                writer.writerows(lookup_table_rows(table))
        print(f"{len(table['entries'])} entries ({len(table['shapes'])} shapes x {len(table['bit_choices'])} bit pairs)"
              f", source=simulated, model={table['model']}")
        if args.summary:
            for row in summary(layers, config, sorted(set(args.bits) | {2, 4, 6, 8})):
                print(f"W{row['bits']}A{row['bits']}: {row['latency_ms']:.3f} ms ({row['latency_ratio']:.3f}x), "
                      f"{row['energy_uj']:.1f} uJ ({row['energy_ratio']:.3f}x)")
    except ApqError as exc:
        print(f"apq: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
