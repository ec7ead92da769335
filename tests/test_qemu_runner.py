"""apq-run, the on-device runner: native build vs relax.VirtualMachine, ARM64 build under
qemu-aarch64 vs onnxruntime, .npy dtypes, and its error handling.

The first run downloads the aarch64 TVM runtime and builds two runners into apq's cache
(~1 min on 2 busy cores); later runs reuse them (~15 s for this file).
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from apq.targets.aarch64_runtime import ensure_aarch64_runtime, ensure_runner, populate_once
from apq.targets.qemu import (
    AARCH64_SYSROOT,
    QEMU_BINARY,
    elf_arch,
    qemu_available,
    run_under_qemu,
    run_with_runner,
)
from apq.toolchain.errors import ApqError, DeviceUnreachableError, InvalidInputError

RNG = np.random.default_rng(0)


# --------------------------------------------------------------------------- tiny ONNX models


def conv_relu_gemm_model() -> onnx.ModelProto:
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = RNG.standard_normal(4).astype(np.float32)
    g = RNG.standard_normal((10, 4 * 6 * 6)).astype(np.float32)
    gb = RNG.standard_normal(10).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "G", "GB"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "conv_relu_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w, "W"), (b, "B"), (g, "G"), (gb, "GB"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def two_input_model() -> onnx.ModelProto:
    """y = relu(a @ b + bias); input order a, b matters (non-square shapes catch a swap)."""
    bias = RNG.standard_normal(3).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "two_inputs",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 5]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [5, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def integer_model() -> onnx.ModelProto:
    """int8 + uint8 inputs, int32 and int64 outputs: exercises the runner's .npy dtype table
    and a tuple return value."""
    nodes = [
        helper.make_node("Cast", ["q"], ["q32"], to=TensorProto.INT32),
        helper.make_node("Cast", ["u"], ["u32"], to=TensorProto.INT32),
        helper.make_node("Mul", ["q32", "u32"], ["s"]),
        helper.make_node("ArgMax", ["s"], ["idx"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "integers",
        [helper.make_tensor_value_info("q", TensorProto.INT8, [3, 7]),
         helper.make_tensor_value_info("u", TensorProto.UINT8, [3, 7])],
        [helper.make_tensor_value_info("s", TensorProto.INT32, [3, 7]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [3])], [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def onnxruntime_outputs(model: onnx.ModelProto, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, inputs)))


def compile_model(model: onnx.ModelProto, target_name: str, path: Path):
    """ONNX -> Relax -> tvm.compile for a registry target -> model.so; returns the executable."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from apq.targets.registry import get_target

    onnx.checker.check_model(model)
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model))
    target = get_target(target_name)
    ex = tvm.compile(mod, target.tvm())
    if target.cross_compiler:
        ex.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(target.cross_compiler))
    else:
        ex.export_library(str(path))
    return ex


def make_inputs(model: onnx.ModelProto) -> list[np.ndarray]:
    out = []
    for vi in model.graph.input:
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            out.append(RNG.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype))
        else:
            out.append(RNG.standard_normal(shape).astype(dtype))
    return out


MODELS = {"conv_relu_gemm": conv_relu_gemm_model, "two_inputs": two_input_model, "integers": integer_model}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def native_runner() -> Path:
    try:
        return ensure_runner("host")
    except DeviceUnreachableError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def arm_runner() -> Path:
    ok, reason = qemu_available()
    if not ok:
        pytest.skip(reason)
    try:
        ensure_aarch64_runtime()
    except ApqError as e:  # offline with an empty pip cache: not a bug of apq
        pytest.skip(str(e))
    return ensure_runner("aarch64")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], tuple[Path, object, onnx.ModelProto]]:
    """Lazily compiled (model, target) pairs shared by the tests of this module."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("libs")

    def get(name: str, target: str) -> tuple[Path, object, onnx.ModelProto]:
        if (name, target) not in cache:
            model = MODELS[name]()
            path = root / f"{name}-{target.replace('/', '_')}.so"
            cache[(name, target)] = (path, compile_model(model, target, path), model)
        return cache[(name, target)]

    return get


def relax_vm_outputs(ex, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(ex, tvm.cpu())
    res = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    items = res if isinstance(res, (list, tuple)) or type(res).__name__ == "Array" else [res]
    return [r.numpy() for r in items]


# --------------------------------------------------------------------------- cache


def test_populate_once_builds_once_under_concurrent_callers(tmp_path: Path) -> None:
    calls = []

    def populate(tmp: Path) -> None:
        calls.append(tmp)
        time.sleep(0.3)  # long enough that both threads are inside populate_once together
        (tmp / "lib.so").write_text("x")

    final = tmp_path / "entry"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(populate_once(final, populate, ("lib.so",))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [final, final]
    assert (final / "lib.so").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".entry.")] == []  # no temp left


def test_populate_once_rebuilds_an_incomplete_entry(tmp_path: Path) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "stale").write_text("half-written")
    populate_once(final, lambda tmp: (tmp / "lib.so").write_text("y"), ("lib.so",))
    assert sorted(p.name for p in final.iterdir()) == ["lib.so"]


# --------------------------------------------------------------------------- native runner


@pytest.mark.parametrize("name", ["conv_relu_gemm", "integers"])
def test_native_runner_matches_relax_vm(native_runner: Path, compiled, name: str) -> None:
    lib, ex, model = compiled(name, "host")
    inputs = make_inputs(model)
    got = run_with_runner(native_runner, lib, inputs)
    want = relax_vm_outputs(ex, inputs)
    assert len(got) == len(want) == len(model.graph.output)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)  # same machine code, same runtime: bit-identical
    for g, w in zip(got, onnxruntime_outputs(model, inputs)):
        np.testing.assert_allclose(g, w, atol=1e-4)


def test_native_runner_repeat_reports_per_run_wall_times(native_runner: Path, compiled, tmp_path: Path) -> None:
    lib, _, model = compiled("conv_relu_gemm", "host")
    np.save(tmp_path / "x.npy", make_inputs(model)[0])
    proc = subprocess.run([str(native_runner), str(lib), "--input", str(tmp_path / "x.npy"),
                           "--output-dir", str(tmp_path / "o"), "--repeat", "4"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["outputs"] == [{"file": "out0.npy", "shape": [1, 10], "dtype": "float32"}]
    assert summary["repeat"] == 4 and len(summary["run_ms"]) == 4
    assert all(t > 0 for t in summary["run_ms"])


def _run(runner: Path, *args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(runner), *args], capture_output=True, text=True, timeout=120)


def test_native_runner_rejects_bad_inputs(native_runner: Path, compiled, tmp_path: Path) -> None:
    lib, _, model = compiled("conv_relu_gemm", "host")
    good = tmp_path / "x.npy"
    np.save(good, make_inputs(model)[0])
    out = str(tmp_path / "o")
    cases = {
        "missing input": ((str(lib), "--input", str(tmp_path / "nope.npy"), "--output-dir", out),
                          2, "cannot open input file"),
        "missing model": ((str(tmp_path / "nope.so"), "--input", str(good), "--output-dir", out),
                          2, "model library not found"),
        "no output dir": ((str(lib), "--input", str(good)), 2, "--output-dir is required"),
        "unknown flag": ((str(lib), "--bogus"), 2, "unknown option --bogus"),
        "too many inputs": ((str(lib), "--input", str(good), "--input", str(good), "--output-dir", out),
                            2, "takes 1 input(s), got 2"),
    }
    not_npy = tmp_path / "text.npy"
    not_npy.write_text("hello")
    cases["not npy"] = ((str(lib), "--input", str(not_npy), "--output-dir", out), 2, "not a .npy file")
    np.save(tmp_path / "complex.npy", np.zeros((1, 3, 8, 8), np.complex64))
    cases["bad dtype"] = ((str(lib), "--input", str(tmp_path / "complex.npy"), "--output-dir", out),
                          2, "unsupported dtype '<c8'")
    np.save(tmp_path / "shape.npy", np.zeros((1, 3, 9, 9), np.float32))
    cases["wrong shape"] = ((str(lib), "--input", str(tmp_path / "shape.npy"), "--output-dir", out), 3, "")
    for what, (args, rc, message) in cases.items():
        proc = _run(native_runner, *args)
        assert proc.returncode == rc, (what, proc.returncode, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("apq-run: error: "), (what, proc.stderr)
        assert message in lines[0], (what, lines[0])
        assert proc.stdout == "", what
    assert not Path(out).exists()  # no output written on failure


def test_run_with_runner_maps_exit_codes_to_apq_errors(native_runner: Path, compiled) -> None:
    lib, _, model = compiled("two_inputs", "host")
    a, b = make_inputs(model)
    with pytest.raises(InvalidInputError, match="takes 2 input"):
        run_with_runner(native_runner, lib, [a])
    with pytest.raises(ApqError, match="running main failed"):
        run_with_runner(native_runner, lib, [b, a])  # swapped: shapes do not match
    with pytest.raises(InvalidInputError, match="dtype complex64"):
        run_with_runner(native_runner, lib, [a.astype(np.complex64), b])


# --------------------------------------------------------------------------- ARM64 under qemu


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["conv_relu_gemm", "two_inputs", "integers"])
def test_qemu_runner_matches_onnxruntime(arm_runner: Path, compiled, name: str) -> None:
    lib, _, model = compiled(name, "raspberry-pi/4b-aarch64")
    assert elf_arch(lib) == "aarch64"
    inputs = make_inputs(model)
    got = run_under_qemu(lib, inputs)
    want = onnxruntime_outputs(model, inputs)
    assert len(got) == len(want) == len(model.graph.output)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=1e-4)


@pytest.mark.qemu
def test_qemu_runner_reports_bad_input_with_exit_code(arm_runner: Path, compiled, tmp_path: Path) -> None:
    lib, _, _ = compiled("conv_relu_gemm", "raspberry-pi/4b-aarch64")
    proc = _run(arm_runner, str(lib), "--input", str(tmp_path / "missing.npy"), "--output-dir", str(tmp_path),
                launcher=(QEMU_BINARY, "-L", str(AARCH64_SYSROOT)))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"apq-run: error: cannot open input file {tmp_path / 'missing.npy'}"


@pytest.mark.qemu
def test_run_under_qemu_refuses_wrong_libraries(arm_runner: Path, compiled, tmp_path: Path) -> None:
    host_lib, _, model = compiled("conv_relu_gemm", "host")
    with pytest.raises(InvalidInputError, match="built for x86_64"):
        run_under_qemu(host_lib, make_inputs(model))
    with pytest.raises(InvalidInputError, match="model library not found"):
        run_under_qemu(tmp_path / "missing.so", make_inputs(model))
    arm_lib, _, _ = compiled("conv_relu_gemm", "raspberry-pi/4b-aarch64")
    with pytest.raises(InvalidInputError, match="takes 1 input"):
        run_under_qemu(arm_lib, make_inputs(model) * 2)
