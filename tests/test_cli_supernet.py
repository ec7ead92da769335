"""`apq eval-subnet` / `apq export-subnet` on the checked-in checkpoint, and their errors."""

from __future__ import annotations

import json

import pytest

from apq.toolchain.cli import main
from apq.toolchain.supernet.deploy import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(
    not DEFAULT_CHECKPOINT.is_file() or not __import__("os").path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="needs the checked-in checkpoint and Fashion-MNIST (apt-get install dataset-fashion-mnist)")


def test_eval_subnet_json_interface(capsys):
    assert main(["eval-subnet", "--config", "largest", "--bits", "W8A8", "--split", "test",
                 "--eval-subset", "300", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert {"top1", "split", "config", "bits", "checkpoint"} <= set(rep)
    assert rep["split"] == "test" and rep["bits"] == "W8A8" and rep["samples"] == 300
    assert rep["source"] == "measured"
    assert 0.5 < rep["top1"] <= 1.0  # a trained network, far above chance (0.1)
    assert len(rep["checkpoint"]) == 64


def test_export_subnet_compiles_and_verifies(tmp_path, capsys):
    onnx_path = tmp_path / "sub.onnx"
    assert main(["export-subnet", "--config", "smallest", "--bits", "W4A4", "--eval-subset", "200",
                 "-o", str(onnx_path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bits"] == "W4A4" and onnx_path.is_file()
    assert main(["compile", str(onnx_path), "-o", str(tmp_path / "sub.apq"), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verify"]["passed"]
    assert sum(1 for lay in out["layers"] if (lay["weight_bits"], lay["activation_bits"]) == (4, 4)) >= 6


def test_bad_subnet_arguments_are_one_line_errors(capsys):
    assert main(["eval-subnet", "--config", "nonsense"]) == 2
    assert "bad subnet config" in capsys.readouterr().err
    assert main(["eval-subnet", "--bits", "W9A9"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
