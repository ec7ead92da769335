"""The AArch64 sdot (+dotprod) int8 conv path: chosen only for dotprod targets, really emitted
(sdot in the Raspberry Pi 5 assembly, none for the Pi 4), and bit-exact when the cross-compiled
aarch64 code runs under qemu-aarch64: single pointwise convs (int8 and uint8 activations over
the full range, ragged pixel counts, a fused requantize epilogue) against NumPy int32, and the
int8 MobileNetV2 against onnxruntime (exactly). qemu checks correctness, never speed.

~95 s on the 2 loaded cores (~50 s of it the one whole-model cross build), with TVM's aarch64
runtime and apq-run already in apq's cache; a cold cache adds their download/build (~1 min).
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from test_x86_int8 import _asm  # noqa: E402 -- assembly of every LLVM module in a compiled executable

PI5, PI4 = "raspberry-pi/5", "raspberry-pi/4b-aarch64"
REQUANT_SCALE = np.float32(1e-3)

# (activation dtype, in channels, out channels, H, W, requantize epilogue, sdot expected)
CONVS = [
    ("int8", 32, 16, 8, 8, False, True),  # 64 pixels: 4-vector tiles
    ("uint8", 32, 16, 8, 8, False, True),  # u8 x s8 via the top-bit flip + 128*sum(w) correction
    ("int8", 12, 24, 6, 6, False, True),  # 36 pixels: 1-vector tiles (36 = 9 x 4)
    ("uint8", 16, 8, 7, 7, False, True),  # 49 pixels padded to 52
    ("int8", 8, 16, 3, 3, True, True),  # 9 pixels padded to 12, requantize epilogue per tile
    ("uint8", 24, 8, 14, 14, True, True),  # 196 pixels, requantize epilogue
    ("int8", 6, 8, 4, 4, False, False),  # 6 input channels: not a multiple of 4 -> generic path
    ("uint8", 8, 8, 1, 1, False, False),  # 1 pixel: 1 of 4 padded lanes real -> generic path
]


def _target(name: str):
    from apq.targets.registry import get_target

    return get_target(name)


def _conv_module(specs: list[tuple], weights: list[np.ndarray]):
    """One Relax function with one ``conv2d(x, W, out_dtype=int32)`` per spec (the kernel
    qdq_lowering emits), each on its own input, returned as a tuple: one library and one
    qemu run check them all."""
    from tvm import relax

    bb = relax.BlockBuilder()
    xs = [relax.Var(f"x{i}", relax.TensorType([1, ic, h, w], dt)) for i, (dt, ic, _, h, w, _, _) in enumerate(specs)]
    with bb.function("main", xs):
        with bb.dataflow():
            outs = []
            for x, wt, spec in zip(xs, weights, specs):
                y = bb.emit(relax.op.nn.conv2d(x, relax.const(wt), out_dtype="int32"))
                if spec[5]:
                    y = relax.op.multiply(relax.op.astype(y, "float32"), relax.const(REQUANT_SCALE))
                    y = bb.emit(relax.op.astype(relax.op.clip(y, -128.0, 127.0), "int8"))
                outs.append(y)
            out = bb.emit_output(relax.Tuple(outs))
        bb.emit_func_output(out)
    return bb.get()


def _reference(x: np.ndarray, w: np.ndarray, requantize: bool) -> np.ndarray:
    out = np.einsum("nchw,oc->nohw", x.astype(np.int64), w[:, :, 0, 0].astype(np.int64))
    assert np.abs(out).max() < 2**31
    if requantize:
        return np.clip(out.astype(np.int32).astype(np.float32) * REQUANT_SCALE, -128, 127).astype(np.int8)
    return out.astype(np.int32)




#: a function label in LLVM assembly (``name:``) or in objdump output (``0000000000012340 <name>:``)
_LABEL = re.compile(r"^(?:[0-9a-f]+ <)?([A-Za-z_][\w.$@]*)>?:")


def _functions_with(asm: str, mnemonic: str) -> set[str]:
    """Names of the assembly functions (global labels) whose body contains ``mnemonic``."""
    found, current = set(), None
    for line in asm.splitlines():
        m = _LABEL.match(line)
        if m and not m.group(1).startswith((".L", "$")):
            current = m.group(1)
        elif current and re.search(rf"(^|:)\s+{mnemonic}\s", line):  # objdump prefixes an address
            found.add(current)
    return found


def _build(target_name: str, specs: list[tuple], weights: list[np.ndarray], path: Path):
    from apq.kernels.pipeline import compile_relax

    spec = _target(target_name)
    ex = compile_relax(_conv_module(specs, weights), spec.tvm())
    ex.export_library(str(path), fcompile=tvm.support.cc.cross_compiler(spec.cross_compiler))
    return ex


@pytest.fixture(scope="module")
def qemu_ready() -> None:
    import shutil

    from apq.targets.aarch64_runtime import ensure_aarch64_runtime
    from apq.targets.qemu import qemu_available
    from apq.toolchain.errors import ApqError

    ok, reason = qemu_available()
    if not ok:
        pytest.skip(reason)
    if shutil.which(_target(PI5).cross_compiler) is None:
        pytest.skip(f"{_target(PI5).cross_compiler} not found (apt-get install g++-aarch64-linux-gnu)")
    try:
        ensure_aarch64_runtime()
    except ApqError as e:  # offline with an empty pip cache: not a bug of apq
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def convs() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Inputs and weights over the full ranges, with the extreme products in every conv."""
    rng = np.random.default_rng(5)
    xs, ws = [], []
    for dt, ic, oc, h, w, _, _ in CONVS:
        info = np.iinfo(dt)
        x = rng.integers(info.min, info.max, (1, ic, h, w), endpoint=True).astype(dt)
        wt = rng.integers(-128, 127, (oc, ic, 1, 1), endpoint=True).astype(np.int8)
        x[0, :, 0, 0] = info.min  # -128 (int8) or 0 (uint8)
        x[0, :, -1, -1] = info.max
        wt[0] = -128
        wt[-1] = 127
        xs.append(x)
        ws.append(wt)
    return xs, ws


def test_only_dotprod_targets_get_the_sdot_path():
    from apq.kernels.cpu_schedules import INT8_DOT_CONV, CpuScheduleConfig
    from apq.kernels.arm_int8 import schedule_conv2d_dot, sdot_conv_applicable

    assert CpuScheduleConfig.for_target(_target(PI5).tvm()).int8_dot == "dotprod"
    for name in (PI4, "raspberry-pi/3b-aarch64", "aarch64"):
        assert CpuScheduleConfig.for_target(_target(name).tvm()).int8_dot == "", name
    assert INT8_DOT_CONV["dotprod"]() == (sdot_conv_applicable, schedule_conv2d_dot)


def test_sdot_is_emitted_for_pi5_and_not_for_pi4(convs, tmp_path):
    xs, ws = convs
    specs = CONVS[:2]  # one int8 and one uint8 conv
    pi5 = _asm(_build(PI5, specs, ws[:2], tmp_path / "pi5.so"))
    pi4 = _asm(_build(PI4, specs, ws[:2], tmp_path / "pi4.so"))
    assert len(_functions_with(pi5, "sdot")) == 2
    assert "sdot" not in pi4 and "udot" not in pi4


@pytest.mark.qemu
def test_pointwise_convs_are_bit_exact_under_qemu(qemu_ready, convs, tmp_path):
    from apq.targets.qemu import run_under_qemu

    xs, ws = convs
    lib = tmp_path / "convs.so"
    asm = _asm(_build(PI5, CONVS, ws, lib))
    assert len(_functions_with(asm, "sdot")) == sum(c[6] for c in CONVS)
    got = run_under_qemu(lib, xs)
    assert len(got) == len(CONVS)
    for spec, x, wt, g in zip(CONVS, xs, ws, got):
        want = _reference(x, wt, spec[5])
        assert g.dtype == want.dtype, spec
        np.testing.assert_array_equal(g, want, err_msg=str(spec))


@pytest.mark.qemu
def test_int8_mobilenetv2_on_pi5_runs_sdot_and_matches_onnxruntime_exactly(qemu_ready, mbv2_qdq, tmp_path):
    """onnxruntime's QUInt8 x QInt8 MobileNetV2 (uint8 activations: the top-bit-flip variant)
    built for the Pi 5 and run under qemu-aarch64: identical to onnxruntime with the ONNX
    reference semantics (measured max |error| 0.0 for seeds 0-2), and its pointwise convs are
    sdot kernels. (~50 s: one whole-model cross build, most of it LLVM code generation.)"""
    from apq.targets.qemu import run_under_qemu
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx
    from apq.toolchain.verify import onnxruntime_outputs, verify_artifact

    art = open_artifact(compile_onnx(mbv2_qdq, PI5, tmp_path / "pi5.apq").artifact_path)
    rep = verify_artifact(art, mbv2_qdq)  # runs under qemu-aarch64 against onnxruntime
    assert rep.passed and rep.executed_on == "qemu-aarch64", rep.to_json()
    x = art.random_inputs(1)
    got = run_under_qemu(art.lib_path, x)
    want = onnxruntime_outputs(mbv2_qdq, [s.name for s in art.input_specs], x)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)

    dis = subprocess.run(["aarch64-linux-gnu-objdump", "-d", "--no-show-raw-insn", str(art.lib_path)],
                         capture_output=True, text=True, check=True).stdout
    # every distinct shape of sdot-eligible conv (integer, pointwise, stride 1, channels % 4 == 0,
    # at least 2 pixels) needs its own kernel function, and each must contain sdot
    layers = art.manifest["layers"]
    eligible = {(g["in_ch"], g["out_ch"], g["in_h"], g["in_w"]) for g in
                (layer["geometry"] for layer in layers if layer["kernel"] == "conv2d.uint8xint8->int32")
                if g and g["kernel"] == 1 and g["stride"] == 1 and g["in_ch"] % 4 == 0 and g["in_h"] * g["in_w"] >= 2}
    assert len(eligible) >= 5
    assert len(_functions_with(dis, "sdot")) >= len(eligible)
