"""`apq profile` end to end: measured on the host, simulated figures labelled, qemu never timed."""

from __future__ import annotations

import json

from apq.toolchain.cli import main


def test_profile_onnx_on_host_is_measured(capsys, tmp_path, mbv2_float):
    png = tmp_path / "layers.png"
    assert main(["profile", str(mbv2_float), "--target", "host", "--min-time", "0.05", "--threads", "1",
                 "--plot", str(png), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lat = rep["latency"]
    assert lat["source"] == "measured" and lat["median_ms"] > 0 and lat["threads"] == 1
    assert rep["layers"] and all(row["total_ms"] >= 0 for row in rep["layers"])
    assert "simulated" not in rep


def test_profile_bitfusion_adds_labelled_simulation(capsys, tmp_path, mbv2_qdq):
    art = tmp_path / "bf.apq"
    assert main(["compile", str(mbv2_qdq), "--target", "bitfusion", "-o", str(art), "--json"]) == 0
    manifest_layers = json.loads(capsys.readouterr().out)["layers"]
    geo = [layer["geometry"] for layer in manifest_layers]
    assert all(g is not None for g in geo)
    assert {g["op"] for g in geo} == {"conv", "dwconv", "dense"}
    assert geo[0]["in_h"] == 32 and geo[0]["in_ch"] == 3  # the stem, before explicit zero-point padding
    assert main(["profile", str(art), "--min-time", "0.05", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["latency"]["source"] == "measured"
    sim = rep["simulated"]
    assert sim["source"] == "simulated" and sim["latency_ms"] > 0 and sim["energy_uj"] > 0
    assert sim["layers"] == len(manifest_layers) and sim["float_layers_as_16bit"] == 0


def test_profile_refuses_to_time_arm_builds_here(capsys, tmp_path, mbv2_float):
    assert main(["profile", str(mbv2_float), "--target", "raspberry-pi/4b-aarch64", "--json"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "never timed" in err[0] and "--rpc-tracker" in err[0]
