"""Tests of the analytic BitFusion model (apq.targets.bitfusion) and its layer records.

Hand-computed cycle counts pin the mapping formulas; property tests check the behaviour the
search relies on (monotone in bits, power-of-two steps); anchor tests compare whole-network
ratios on MobileNetV2 with APQ's published BitFusion figures.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from apq.targets.bitfusion import (BitFusionConfig, LayerCost, NetworkCost, compute_cycles, dram_traffic,
                                   lookup_table, lut_latency_ms, normalize_bit_choices, preset, simulate_layer,
                                   simulate_network)
from apq.targets.layers import LayerShape, layers_from_json, layers_to_json, mobilenet_v2_layers
from apq.toolchain.errors import InvalidInputError

REPO = Path(__file__).resolve().parents[1]
MBV2 = mobilenet_v2_layers()
CFG = BitFusionConfig()


def _net(layers: list[LayerShape], w: int, a: int, config: BitFusionConfig = CFG, pin_ends: bool = False) -> NetworkCost:
    """Whole network at W{w}A{a}; pin_ends keeps first conv, last conv and classifier at 8 bits (APQ)."""
    last = len(layers) - 2
    quantized = [l if pin_ends and (i == 0 or i >= last) else l.with_bits(w, a) for i, l in enumerate(layers)]
    return simulate_network(quantized, config)


# ----------------------------------------------------------------------------- layer records


def test_layer_shape_sizes_and_json_round_trip() -> None:
    layer = LayerShape("conv", 16, 96, 3, 2, 112, 112, 1, 4, 6)
    assert (layer.out_h, layer.out_w) == (56, 56)
    assert layer.macs == 56 * 56 * 96 * 16 * 9
    assert LayerShape.from_json(json.loads(json.dumps(layer.to_json()))) == layer
    assert layers_from_json(layers_to_json(MBV2)) == MBV2


def test_layer_shape_rejects_bad_input() -> None:
    with pytest.raises(InvalidInputError):
        LayerShape("pool", 8, 8, 1, 1, 4, 4, 1, 8, 8)
    with pytest.raises(InvalidInputError):
        LayerShape("dwconv", 8, 8, 3, 1, 4, 4, 1, 8, 8)  # groups must equal in_ch
    with pytest.raises(InvalidInputError):
        LayerShape("conv", 8, 8, 1, 1, 4, 4, 1, 0, 8)
    with pytest.raises(InvalidInputError):
        LayerShape.from_json({"op": "conv", "in_ch": 8, "bogus": 1})


def test_mobilenet_v2_layer_list_is_the_reference_network() -> None:
    assert len(MBV2) == 53 and sum(l.op == "dwconv" for l in MBV2) == 17
    assert sum(l.macs for l in MBV2) == 300_774_272  # ~300 M MACs, as published for MobileNetV2-224
    weights = sum(l.num_weights for l in MBV2)
    bn_and_bias = sum(2 * l.out_ch for l in MBV2 if l.op != "dense") + 1000
    assert weights + bn_and_bias == 3_504_872  # torchvision's mobilenet_v2 parameter count


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip_and_validation() -> None:
    cfg = BitFusionConfig(rows=8, cols=8, dram_bits_per_cycle=128, double_buffered=False)
    assert BitFusionConfig.loads(cfg.dumps()) == cfg
    assert BitFusionConfig.from_json(json.loads(json.dumps(BitFusionConfig().to_json()))) == BitFusionConfig()
    with pytest.raises(InvalidInputError):
        BitFusionConfig.from_json({"rows": 16, "warp_size": 32})
    with pytest.raises(InvalidInputError):
        BitFusionConfig(rows=0)
    with pytest.raises(InvalidInputError):
        BitFusionConfig(max_bits=6, min_bits=2)  # 3 bricks per side is not a fusion
    with pytest.raises(InvalidInputError):
        BitFusionConfig.loads("{not json")
    with pytest.raises(InvalidInputError):
        preset("tpu")
    assert preset("paper-eyeriss").dram_bits_per_cycle == 192


def test_brick_widths_and_mac_energy() -> None:
    assert [CFG.storage_bits(b) for b in (1, 2, 3, 4, 5, 6, 7, 8, 16)] == [2, 2, 4, 4, 8, 8, 8, 8, 16]
    # floor(8 / max(b, 2)) for b <= 8; 16-bit operands take two cycles per operand
    for b in range(1, 9):
        assert CFG.lanes(b) == 8 // max(b, 2)
    assert CFG.lanes(16) == 0.5
    assert CFG.e_mac_pj(8, 8) == pytest.approx(16 * CFG.e_brick_pj + CFG.e_accumulate_pj)
    assert CFG.e_mac_pj(4, 4) == pytest.approx(4 * CFG.e_brick_pj + CFG.e_accumulate_pj)
    assert CFG.e_mac_pj(6, 6) == CFG.e_mac_pj(8, 8)


# ----------------------------------------------------------------------------- compute model


def test_conv_cycles_match_the_direct_formula_when_rows_are_full() -> None:
    # ic = 256 is a multiple of N * lanes for every width, so im2col == direct mapping.
    for bits, lanes in ((8, 1), (4, 4), (2, 16)):
        layer = LayerShape("conv", 256, 64, 3, 1, 14, 14, 1, bits, bits)
        direct = 1 * math.ceil(64 / 32) * 14 * 14 * 3 * 3 * math.ceil(256 / (16 * lanes))
        assert compute_cycles(layer, CFG) == direct
    assert compute_cycles(LayerShape("conv", 256, 64, 3, 1, 14, 14, 1, 8, 8), CFG) == 196 * 2 * 9 * 16


def test_first_layer_uses_im2col() -> None:
    stem = LayerShape("conv", 3, 32, 3, 2, 224, 224, 1, 8, 8)
    # 27-long reduction over 16 rows: 2 cycles per pixel, not 9 as with one tap per cycle.
    assert compute_cycles(stem, CFG) == 112 * 112 * 1 * 2


def test_depthwise_mapping_by_hand() -> None:
    # 32 channels, 3x3: best split is 16 channel groups of 1 row each.
    for bits, per_pixel in ((8, 2 * 9), (4, 2 * 3), (2, 2 * 1)):
        dw = LayerShape("dwconv", 32, 32, 3, 1, 10, 10, 32, bits, bits)
        assert compute_cycles(dw, CFG) == 100 * per_pixel
    # on a 2x2 array, 2 channels x 1 row (ceil(5/2) * 9 = 27) loses to 1 channel x 2 rows (5 * ceil(9/2) = 25)
    tiny = BitFusionConfig(rows=2, cols=2)
    assert compute_cycles(LayerShape("dwconv", 5, 5, 3, 1, 1, 1, 5, 8, 8), tiny) == 25


def test_dense_is_memory_bound_and_tiled() -> None:
    fc = LayerShape("dense", 1280, 1000, 1, 1, 1, 1, 1, 8, 8)
    cost = simulate_layer(fc)
    assert cost.bound == "memory" and cost.tiles > 1
    # weights stream once, the 1280-byte input stays resident, 1000 outputs are written once
    assert cost.memory_bytes == 1280 * 1000 + 1280 + 1000
    assert cost.compute_cycles == math.ceil(1000 / 32) * math.ceil(1280 / 16)


def test_single_tile_layer_pays_compute_plus_memory() -> None:
    layer = LayerShape("conv", 64, 64, 1, 1, 4, 4, 1, 8, 8)
    cost = simulate_layer(layer)
    assert cost.tiles == 1
    array = cost.compute_cycles + CFG.rows + CFG.cols
    assert cost.total_cycles == pytest.approx(array + cost.memory_cycles)
    assert cost.latency_ms == pytest.approx(cost.total_cycles / (CFG.frequency_mhz * 1e3))


def test_smaller_buffers_never_reduce_traffic() -> None:
    small = BitFusionConfig(ibuf_kib=4, wbuf_kib=4, obuf_kib=4)
    for layer in MBV2:
        assert dram_traffic(layer, small).dram_bytes >= dram_traffic(layer, CFG).dram_bytes


# ----------------------------------------------------------------------------- behaviour in bits


def test_latency_and_energy_are_monotone_in_bits() -> None:
    chain = [8, 7, 6, 5, 4, 3, 2, 1]
    for layer in MBV2:
        costs = {(w, a): simulate_layer(layer.with_bits(w, a)) for w in chain for a in chain}
        for fixed in chain:
            for hi, lo in zip(chain, chain[1:]):
                for a, b in (((hi, fixed), (lo, fixed)), ((fixed, hi), (fixed, lo))):
                    assert costs[b].latency_ms <= costs[a].latency_ms, (layer, a, b)
                    assert costs[b].energy_uj <= costs[a].energy_uj, (layer, a, b)
    assert simulate_layer(MBV2[10].with_bits(16, 16)).latency_ms > simulate_layer(MBV2[10]).latency_ms


def test_six_bits_is_a_step_function_equal_to_eight() -> None:
    for layer in MBV2:
        c8 = simulate_layer(layer.with_bits(8, 8))
        for w, a in ((6, 6), (5, 7), (6, 8), (8, 6)):
            assert simulate_layer(layer.with_bits(w, a)) == c8
        assert simulate_layer(layer.with_bits(3, 3)) == simulate_layer(layer.with_bits(4, 4))
    assert _net(MBV2, 4, 4).latency_ms < _net(MBV2, 6, 6).latency_ms


def test_apq_anchor_ratios_on_mobilenet_v2() -> None:
    ref = _net(MBV2, 8, 8, pin_ends=True).latency_ms
    r4 = _net(MBV2, 4, 4, pin_ends=True).latency_ms / ref
    r6 = _net(MBV2, 6, 6, pin_ends=True).latency_ms / ref
    assert r4 == pytest.approx(0.48, rel=0.15), r4
    assert r6 == pytest.approx(0.98, rel=0.15), r6
    # every layer quantized (first/last included) stays within the band too
    r4_all = _net(MBV2, 4, 4).latency_ms / _net(MBV2, 8, 8).latency_ms
    assert r4_all == pytest.approx(0.48, rel=0.15), r4_all


def test_ratio_sits_between_pure_compute_and_pure_memory() -> None:
    c8 = sum(compute_cycles(l, CFG) for l in MBV2)
    c4 = sum(compute_cycles(l.with_bits(4, 4), CFG) for l in MBV2)
    compute_ratio = c4 / c8
    assert 0.25 < compute_ratio < 0.40  # ceil effects and depthwise keep it above 1/4
    edge = _net(MBV2, 4, 4).latency_ms / _net(MBV2, 8, 8).latency_ms
    fast = preset("paper-eyeriss")
    paper = _net(MBV2, 4, 4, fast).latency_ms / _net(MBV2, 8, 8, fast).latency_ms
    assert compute_ratio < paper < edge < 0.5  # slower DRAM -> closer to the 2x of halved traffic


def test_network_cost_is_the_sum_of_labelled_layers() -> None:
    net = simulate_network(MBV2)
    assert len(net.layers) == len(MBV2)
    assert net.latency_ms == pytest.approx(sum(c.latency_ms for c in net.layers))
    assert net.energy_uj == pytest.approx(sum(c.energy_uj for c in net.layers))
    assert all(isinstance(c, LayerCost) and c.source == "simulated" and c.model == net.model for c in net.layers)
    assert json.loads(json.dumps(net.to_json()))["source"] == "simulated"


# ----------------------------------------------------------------------------- lookup table


def test_bit_choice_normalization() -> None:
    assert normalize_bit_choices([8, 4]) == [(4, 4), (4, 8), (8, 4), (8, 8)]
    assert normalize_bit_choices([(4, 8), [2, 2]]) == [(4, 8), (2, 2)]
    with pytest.raises(InvalidInputError):
        normalize_bit_choices([])
    with pytest.raises(InvalidInputError):
        normalize_bit_choices([(4, 8, 2)])


def test_lookup_table_covers_every_layer_and_bit_pair() -> None:
    table = lookup_table(MBV2, [4, 6, 8])
    shapes = {l.shape_key() for l in MBV2}
    assert len(table["shapes"]) == len(shapes)
    assert len(table["entries"]) == len(shapes) * 9
    assert BitFusionConfig.from_json(table["config"]) == CFG
    for layer in MBV2:
        for w in (4, 6, 8):
            for a in (4, 6, 8):
                q = layer.with_bits(w, a)
                assert lut_latency_ms(table, q) == simulate_layer(q).latency_ms
    with pytest.raises(InvalidInputError):
        lut_latency_ms(table, MBV2[0].with_bits(2, 2))
    assert all(e["source"] == "simulated" for e in table["entries"].values())
    json.dumps(table)  # plain JSON


def test_lut_script_regenerates_json_and_csv(tmp_path: Path) -> None:
    layers = [LayerShape("conv", 16, 32, 1, 1, 8, 8, 1, 8, 8), LayerShape("dwconv", 32, 32, 3, 2, 8, 8, 32, 8, 8)]
    (tmp_path / "layers.json").write_text(json.dumps(layers_to_json(layers)))
    out_json, out_csv = tmp_path / "lut.json", tmp_path / "lut.csv"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bitfusion_lut.py"), "--layers",
                           str(tmp_path / "layers.json"), "--bits", "2", "8", "--json", str(out_json), "--csv",
                           str(out_csv)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    table = json.loads(out_json.read_text())
    assert len(table["entries"]) == 2 * 4
    rows = list(csv.DictReader(out_csv.open()))
    assert {r["key"] for r in rows} == set(table["entries"])
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "bitfusion_lut.py"), "--layers", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("apq: error:") and bad.stderr.count("\n") == 1


def test_reduced_config_changes_results() -> None:
    """The config is really used: a quarter-size array is slower on a compute-bound layer."""
    layer = LayerShape("conv", 256, 256, 3, 1, 14, 14, 1, 8, 8)
    small = dataclasses.replace(CFG, rows=8, cols=16)
    assert simulate_layer(layer, small).compute_cycles == 4 * simulate_layer(layer).compute_cycles
