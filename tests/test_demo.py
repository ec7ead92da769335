"""`apq demo` end to end on the host (the ARM half is covered by the qemu tests), and resume."""

from __future__ import annotations

import json

from apq.toolchain.demo import DemoConfig, run_demo


def test_demo_runs_verifies_and_resumes(tmp_path):
    cfg = DemoConfig(out_dir=str(tmp_path / "demo"), skip_arm=True, min_time_s=0.05)
    rep = run_demo(cfg, progress=False)
    assert rep["verify"]["host"]["passed"], rep["verify"]
    assert rep["profile_host"]["e2e"]["source"] == "measured" and rep["profile_host"]["e2e"]["median_ms"] > 0
    layers = rep["layers"]
    assert layers and all(lay["weight_bits"] <= 8 and lay["activation_bits"] <= 8 for lay in layers)
    if rep["model"].get("bits") == "W4A4":  # the supernet subnet: every block layer is 4-bit, also
        # the signed inputs of pointwise convs that lower_qdq re-biases to uint8 for VNNI
        blocks = [lay for lay in layers if lay["weight_bits"] == 4]
        assert len(blocks) >= 12 and all(lay["activation_bits"] == 4 for lay in blocks), layers
    assert (tmp_path / "demo" / "profile_host.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["model"] == rep["model"]
    # Interrupted or finished: a rerun reuses every stage record instead of recomputing it.
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo").glob("stage_*.json")}
    assert {"stage_model.json", "stage_compile_host.json", "stage_verify_host.json"} <= set(stamps)
    run_demo(cfg, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "demo").glob("stage_*.json")} == stamps
