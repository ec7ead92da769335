"""The artifact's integrity checks and the CLI's one-line errors for bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from apq.toolchain.artifact import open_artifact
from apq.toolchain.cli import compile_main, main
from apq.toolchain.errors import ArtifactError


def _rewrite(src: Path, dst: Path, mutate) -> Path:
    """Copy an artifact tar, letting ``mutate(name, data) -> (name, data) | None`` edit members."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            out = mutate(m.name, tin.extractfile(m).read())
            if out is None:
                continue
            name, data = out
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tout.addfile(info, io.BytesIO(data))
    return dst


def test_manifest_describes_the_artifact(mbv2_host_artifact):
    art = open_artifact(mbv2_host_artifact, expect_target="host")
    m = art.manifest
    for key in ("format_version", "target", "inputs", "outputs", "files", "layers", "versions"):
        assert key in m
    assert m["inputs"] == [{"name": "input", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert m["outputs"][0]["shape"] == [1, 10]
    assert set(m["files"]) == {"model.so"}
    assert {"name", "op", "kernel", "weight_bits", "activation_bits"} <= set(m["layers"][0])
    assert m["versions"]["tvm"].startswith("0.27")


def test_tampered_library_is_refused(tmp_path, mbv2_host_artifact):
    bad = _rewrite(mbv2_host_artifact, tmp_path / "bad.apq",
                   lambda n, d: (n, d[:-1] + bytes([d[-1] ^ 1])) if n == "model.so" else (n, d))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        open_artifact(bad)


def test_wrong_target_is_refused(mbv2_host_artifact):
    with pytest.raises(ArtifactError, match="built for target 'host'"):
        open_artifact(mbv2_host_artifact, expect_target="raspberry-pi/4b-aarch64")


def test_path_traversal_is_refused(tmp_path, mbv2_host_artifact):
    def add_evil(name, data):
        return ("../evil.so", data) if name == "model.so" else (name, data)

    bad = _rewrite(mbv2_host_artifact, tmp_path / "evil.apq", add_evil)
    with pytest.raises(ArtifactError, match="unsafe"):
        open_artifact(bad)
    assert not (tmp_path.parent / "evil.so").exists()


def test_unlisted_member_is_refused(tmp_path, mbv2_host_artifact):
    src = tmp_path / "x.apq"
    _rewrite(mbv2_host_artifact, src, lambda n, d: (n, d))
    with tarfile.open(src, "a") as t:
        info = tarfile.TarInfo("extra.so")
        info.size = 3
        t.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        open_artifact(src)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys, mbv2_float, mbv2_host_artifact):
    assert compile_main([str(tmp_path / "missing.onnx"), "--json"]) == 2
    assert "no such file" in _err_line(capsys)

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    assert compile_main([str(junk), "--json"]) == 2
    assert "not an ONNX model" in _err_line(capsys)

    assert compile_main([str(mbv2_float), "--target", "nope", "--json"]) == 2
    line = _err_line(capsys)
    assert "unknown target 'nope'" in line and "raspberry-pi/4b-aarch64" in line and "host" in line

    assert compile_main([str(mbv2_float), "--input-shape", "input:1x3", "--json"]) == 2
    assert "rank" in _err_line(capsys)

    assert main(["run", str(tmp_path / "nothing.apq")]) == 2
    assert "no such file" in _err_line(capsys)

    notar = tmp_path / "notar.apq"
    notar.write_text("hello")
    assert main(["run", str(notar)]) == 2
    assert "not an apq artifact" in _err_line(capsys)

    assert main(["run", str(mbv2_host_artifact), "--target", "raspberry-pi/5"]) == 2
    assert "built for target" in _err_line(capsys)

    assert main(["devices", "--rpc-tracker", "not-a-tracker"]) == 2
    _err_line(capsys)


def test_unsupported_ops_are_named(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("FancyOp", ["x"], ["y"], domain="com.example"),],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    p = tmp_path / "custom.onnx"
    onnx.save(m, p)
    assert compile_main([str(p)]) == 2
    assert "unsupported ONNX op(s): com.example.FancyOp" in _err_line(capsys)


def test_dynamic_dims_need_input_shape(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, "H", "W"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    p = tmp_path / "dyn.onnx"
    onnx.save(m, p)
    assert compile_main([str(p), "-o", str(tmp_path / "d.apq")]) == 2
    assert "--input-shape x:" in _err_line(capsys)
    # with the shape given it compiles, and the batch dim defaulted to 1 is kept
    assert compile_main([str(p), "-o", str(tmp_path / "d.apq"), "--input-shape", "x:2x3x4x4", "--verify",
                         "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"][0]["shape"] == [2, 3, 4, 4] and report["verify"]["passed"]


def test_run_writes_outputs_npz(tmp_path, capsys, mbv2_host_artifact):
    x = np.random.default_rng(5).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.savez(tmp_path / "x.npz", input=x)
    assert main(["run", str(mbv2_host_artifact), "--inputs", str(tmp_path / "x.npz"),
                 "--outputs", str(tmp_path / "y.npz"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    y = np.load(tmp_path / "y.npz")["logits"]
    assert y.shape == (1, 10) and out["outputs"][0]["argmax"] == int(np.argmax(y))


def test_console_script_prints_no_traceback(tmp_path):
    """The installed entry point (not just main()) keeps errors to one line."""
    proc = subprocess.run([sys.executable, "-m", "apq.toolchain.cli", "compile", str(tmp_path / "none.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("apq: error:")
