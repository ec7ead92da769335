"""bench/supernet_figures.py (issue #4's figures) and bench/train_step.py on the checked-in
checkpoint, with tiny settings: the record is complete and its numbers are real measurements."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apq.toolchain.errors import InvalidInputError
from apq.toolchain.supernet.space import SubnetConfig

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "apq_namespace" / "checkpoints" / "fmnist_supernet.pt"
needs_data = pytest.mark.skipif(
    not CHECKPOINT.is_file() or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs the checked-in checkpoint and Fashion-MNIST (apt-get install dataset-fashion-mnist)")


def _load(name: str):
    path = REPO / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"apq_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up in sys.modules
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def figs():
    return _load("supernet_figures")


TINY = ["--subnets", "largest,smallest", "--policies", "float,W2A2", "--qat-steps", "1", "--random", "2",
        "--test-subset", "64", "--calib-batches", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def run(figs, tmp_path_factory):
    out = tmp_path_factory.mktemp("figs")
    argv = ["--checkpoint", str(CHECKPOINT), *TINY, "--json", "--out", str(out / "f.json"), "--plot", str(out / "f.png")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = figs.main(argv)
    return rc, out, printed.getvalue()


def _arch(config_string: str) -> str:
    """The architecture part of a config string (bit-widths dropped)."""
    cfg = SubnetConfig.from_string(config_string)
    return SubnetConfig(cfg.depths, tuple(b.__class__(b.kernel, b.expand, None, None, None, None)
                                          for b in cfg.blocks)).to_string()


@needs_data
def test_figures_record_is_complete_and_measured(run, figs) -> None:
    from apq.toolchain.supernet.supernet import file_sha256, load_checkpoint
    from apq.toolchain.supernet.space import SearchSpace

    rc, out, stdout = run
    assert rc == 0
    fig = json.loads((out / "f.json").read_text())
    assert fig["source"] == "measured" and fig["figures_version"] == figs.FIGURES_VERSION
    assert fig["checkpoint"]["sha256"] == file_sha256(CHECKPOINT) and fig["dataset"]
    assert figs.FiguresConfig.from_dict(fig["config"]).to_dict() == fig["config"]  # round-trips
    assert fig["wall_time_s"] > 0 and fig["cpu_time_s"] > 0

    rows = fig["fixed"]
    assert [(r["name"], r["policy"], r["stage"]) for r in rows] == [
        (n, p, s) for n in ("largest", "smallest") for p in ("float", "W2A2") for s in ("calibrated", "qat")]
    space = SearchSpace()
    for r in rows:
        assert r["source"] == "measured" and r["split"] == "test" and r["samples"] == 64
        assert 0.0 <= r["top1"] <= 1.0 and r["macs"] > 0 and r["params"] > 0 and r["seconds"] > 0
        want = getattr(space, r["name"])(bits=None if r["policy"] == "float" else 2)
        assert r["config_string"] == want.to_string()
        if r["stage"] == "qat":
            assert r["qat_steps"] == 1 and r["weight_change"] > 0  # the fine-tune really moved the weights
        else:
            assert "weight_change" not in r
    by = {(r["name"], r["policy"], r["stage"]): r for r in rows}
    assert by["largest", "float", "calibrated"]["top1"] > 0.5  # a trained net, not chance (10%)
    assert by["largest", "float", "calibrated"]["macs"] > 5 * by["smallest", "float", "calibrated"]["macs"]
    assert by["largest", "W2A2", "calibrated"]["macs"] == by["largest", "float", "calibrated"]["macs"]

    rs = fig["random_spread"]
    assert rs["source"] == "measured" and rs["n_architectures"] == 2 and rs["seed"] == 3
    assert rs["samples_per_subnet"] == 64 and len(rs["rows"]) == 4
    for key in ("mixed_top1", "float_top1", "float_minus_mixed"):
        s = rs[key]
        assert s["n"] == 2 and s["min"] <= s["mean"] <= s["max"] and s["std"] >= 0
    for key in ("mixed_top1", "float_top1"):
        assert 0.0 <= rs[key]["min"] and rs[key]["max"] <= 1.0
    for a in (0, 1):
        pair = {r["policy"]: r for r in rs["rows"] if r["arch"] == a}
        assert set(pair) == {"mixed", "float"} and pair["float"]["bits"] == "float" and pair["mixed"]["bits"] != "float"
        assert _arch(pair["float"]["config_string"]) == _arch(pair["mixed"]["config_string"])

    ck = load_checkpoint(CHECKPOINT)
    assert fig["training"]["source"] == "measured" and fig["training"]["wall_time_s"] == ck["wall_time_s"]
    assert fig["training"]["steps"] == ck["steps"]

    png = (out / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = json.loads(stdout)  # --json prints the same record (plus the plot path)
    assert printed["plot"] == str(out / "f.png") and printed["fixed"] == fig["fixed"]


@needs_data
def test_qat_starts_fresh_and_trains_on_training_images_only() -> None:
    from apq.toolchain.supernet.evaluate import SubnetEvaluator, apply_bits

    ev = SubnetEvaluator(CHECKPOINT, calib_batches=1, eval_subset=64, threads=1)
    shared = {k: v.clone() for k, v in ev.net.state_dict().items()}
    cfg = apply_bits(ev.space.smallest(), "W2A2")
    a, b = ev.evaluate_qat(cfg, 2, "test"), ev.evaluate_qat(cfg, 2, "test")
    # Same fresh weights, same batches -> the same result; the supernet itself is untouched.
    assert a["top1"] == b["top1"] and a["weight_change"] == pytest.approx(b["weight_change"], rel=1e-6)
    assert a["weight_change"] > 0
    assert all(torch.equal(v, ev.net.state_dict()[k]) for k, v in shared.items())

    batches = list(ev.train_batches(3))
    assert len(batches) == 3 and all(x.shape[0] == ev._calib.batch_size == y.shape[0] for x, y in batches)
    assert not torch.equal(batches[0][0], next(iter(ev._calib_iter())))  # not the BN-calibration batch
    ds = ev.ds
    train = {bytes(img) for img in ds.train_images.reshape(ds.num_train, -1)}
    mean, std = torch.as_tensor(ds.mean).view(1, -1, 1, 1), torch.as_tensor(ds.std).view(1, -1, 1, 1)
    for x, _ in batches[:1]:
        pixels = (x * std + mean).mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert all(bytes(p.reshape(-1)) in train for p in pixels)  # NHWC uint8, as stored


def test_spread_matches_numpy(figs) -> None:
    v = [0.5, 0.7, 0.9, 0.6]
    s = figs.spread(v)
    assert s["n"] == 4 and s["min"] == 0.5 and s["max"] == 0.9
    assert s["mean"] == pytest.approx(np.mean(v)) and s["std"] == pytest.approx(np.std(v, ddof=1))
    assert figs.spread([0.3])["std"] == 0.0 and figs.spread([]) == {"n": 0}


def test_bad_settings_are_one_line_errors(figs, capsys) -> None:
    with pytest.raises(InvalidInputError, match="subnets"):
        figs.FiguresConfig(checkpoint="x", subnets=("medium",))
    with pytest.raises(InvalidInputError, match="bit policy"):
        figs.FiguresConfig(checkpoint="x", policies=("W3",))
    with pytest.raises(InvalidInputError, match="unknown figures config"):
        figs.FiguresConfig.from_dict({"checkpoint": "x", "qat_step": 3})
    assert figs.main(["--checkpoint", "/nonexistent/supernet.pt", "--random", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_train_step_bench_times_both_layouts() -> None:
    """One tiny step per layout and phase; no assertion on time, only on what was measured."""
    bench = _load("train_step")
    cfg = bench.StepBenchConfig(threads=(1,), phases=("full", "quant"), steps=1, warmup=0, batch_size=8)
    res = bench.run_benchmark(cfg)
    assert res["source"] == "measured"
    assert {(r["phase"], r["layout"]) for r in res["rows"]} == {(p, lay) for p in ("full", "quant")
                                                               for lay in bench.LAYOUTS}
    assert all(r["median_s"] > 0 and len(r["steps_s"]) == 1 for r in res["rows"])
    assert [(r["phase"], r["threads"]) for r in res["ratios"]] == [("full", 1), ("quant", 1)]
    assert all(r["speedup_channels_last"] > 0 for r in res["ratios"])
