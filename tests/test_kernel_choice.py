"""Measured kernel choice (kernels/kernel_choice.py, ``--bitserial measured``): a low-bit pointwise
layer runs bit-serial only where its bit-serial kernel was timed faster than the int8 one.

What is checked: the rule; a real measurement builds both kernels and finds them exact against
each other; the per-target cache (a second chooser times nothing); the lowering obeys the
choices layer by layer and stays bit-identical to the int8 build, with the timings in the
manifest; targets whose kernels cannot run here get a one-line refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
torch = pytest.importorskip("torch")

from apq.kernels import kernel_choice  # noqa: E402
from apq.kernels.kernel_choice import KernelChooser, KernelTiming, ConvLayer, choose  # noqa: E402
from apq.targets.registry import get_target  # noqa: E402
from apq.toolchain.bitserial_lowering import BitserialPolicy  # noqa: E402
from apq.toolchain.errors import InvalidInputError  # noqa: E402
from test_rpc import board  # noqa: E402,F401  (the loopback tracker + board fixture)


def test_choose_needs_an_exact_and_clearly_faster_bitserial_kernel() -> None:
    assert choose(0.5, 1.0, True) == "bitserial"
    assert choose(0.99, 1.0, True) == "int8"  # within the margin: the simpler int8 path
    assert choose(2.0, 1.0, True) == "int8"
    assert choose(0.1, 1.0, False) == "int8"  # not the exact result
    assert choose(None, 1.0, True) == "int8"
    assert choose(0.1, None, True) == "bitserial"


@pytest.mark.parametrize("layer", [
    ConvLayer("pointwise", 6, 6, 64, 32, 1, 1, 0, 1, 1, "bipolar"),
    ConvLayer("pointwise", 8, 8, 48, 24, 1, 1, 0, 2, 2, "signed"),
    ConvLayer("depthwise", 9, 9, 32, 32, 3, 2, 1, 2, 2, "signed"),
    ConvLayer("depthwise", 8, 8, 16, 16, 3, 1, 1, 1, 1, "bipolar"),
])
def test_real_measurement_builds_both_kernels_and_they_agree(layer: ConvLayer) -> None:
    spec = get_target("host")
    nhwc = "avx512vnni" in spec.features
    t = kernel_choice.time_layer(layer, spec, nhwc)
    assert t.exact, t
    assert t.bitserial_ms is not None and t.bitserial_ms > 0 and t.int8_ms is not None and t.int8_ms > 0
    assert t.kernel == choose(t.bitserial_ms, t.int8_ms, True)
    assert t.to_json()["source"] == "measured"


def test_both_kernels_are_timed_with_the_requantize_epilogue_they_run_with() -> None:
    """What is timed writes uint8, as in a model: a stride-1 pointwise bit-serial kernel with the
    epilogue fused in (one PrimFunc), the same for the int8 kernel; not int32 accumulators."""
    from tvm import s_tir

    spec = get_target("host")
    target = spec.tvm()
    layer = ConvLayer("pointwise", 8, 8, 16, 32, 1, 1, 0, 2, 2, "signed")
    _, w = kernel_choice._random_operands(layer)
    with target:
        bs = kernel_choice._bitserial_kernels(layer, kernel_choice._bitserial_layer(layer, w, target, spec.arch), target)
        i8 = kernel_choice._int8_kernels(layer, w, "avx512vnni" in spec.features, target)
    assert len(bs) == 1  # the conv, its packing and its epilogue in one kernel
    s_tir.Schedule(bs[0][0]).get_sblock("bsconv_update")  # the register-tile reduction (raises if absent)
    assert str(bs[0][0].params[-1].dtype) == "uint8" and str(i8[-1][0].params[-1].dtype) == "uint8"


def test_chooser_caches_timings_per_target(tmp_path: Path) -> None:
    calls: list[ConvLayer] = []

    def fake(layer: ConvLayer, spec, nhwc: bool, **_) -> KernelTiming:
        calls.append(layer)
        return KernelTiming(1.0, 2.0, True, "bitserial")

    spec = get_target("host")
    layer = ConvLayer("pointwise", 14, 14, 256, 64, 1, 1, 0, 1, 1, "bipolar")
    first = KernelChooser(spec, True, tmp_path, measure=fake)
    assert first.timing(layer).kernel == "bitserial" and first.timed == 1
    assert first.timing(layer).kernel == "bitserial" and first.timed == 1 and first.cached == 1
    second = KernelChooser(spec, True, tmp_path, measure=fake)
    assert second.timing(layer).bitserial_ms == 1.0 and second.timed == 0 and len(calls) == 1
    doc = json.loads(first.path.read_text())
    assert doc["version"] == kernel_choice.CACHE_VERSION and first.path.parent.name == "kernel_choice"
    assert all(e["source"] == "measured" for e in doc["entries"].values())
    # another int8 path (NCHW int8 layout) is another comparison: timed again
    KernelChooser(spec, False, tmp_path, measure=fake).timing(layer)
    assert len(calls) == 2
    assert doc["kernels"] == kernel_choice.kernels_fingerprint()


def test_timings_of_other_kernels_are_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edited kernel source or another TVM changes the fingerprint: the file's timings go."""
    calls: list[ConvLayer] = []

    def fake(layer: ConvLayer, spec, nhwc: bool, **_) -> KernelTiming:
        calls.append(layer)
        return KernelTiming(1.0, 2.0, True, "bitserial")

    spec, layer = get_target("host"), ConvLayer("pointwise", 7, 7, 64, 64, 1, 1, 0, 1, 1, "bipolar")
    KernelChooser(spec, True, tmp_path, measure=fake).timing(layer)
    KernelChooser(spec, True, tmp_path, measure=fake).timing(layer)
    assert len(calls) == 1
    monkeypatch.setattr(kernel_choice, "kernels_fingerprint", lambda: "another build")
    KernelChooser(spec, True, tmp_path, measure=fake).timing(layer)
    assert len(calls) == 2


def test_a_kernel_that_fails_keeps_the_layer_int8_and_says_why(tmp_path: Path) -> None:
    def broken(layer: ConvLayer, spec, nhwc: bool, **_) -> KernelTiming:
        raise RuntimeError("LLVM said no\n  at line 3")

    t = KernelChooser(get_target("host"), True, tmp_path, measure=broken).timing(
        ConvLayer("pointwise", 7, 7, 64, 64, 1, 1, 0, 2, 2, "signed"))
    assert t.kernel == "int8" and t.bitserial_ms is None and "LLVM said no at line 3" in t.summary()
    assert KernelTiming.from_json(t.to_json()) == t


def test_policy_select_is_validated() -> None:
    assert BitserialPolicy.from_json({"select": "measured"}).select == "measured"
    with pytest.raises(InvalidInputError, match="select"):
        BitserialPolicy(select="fastest")


@pytest.fixture(scope="module")
def mixed_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_bitserial_lowering import SHAPE, _mixed_net

    from apq.toolchain.supernet.qlayers import export_onnx

    return export_onnx(_mixed_net(), tmp_path_factory.mktemp("kc") / "mixed.onnx", SHAPE)


def test_measured_policy_follows_the_timings_and_stays_bit_identical(mixed_onnx: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With timings that favour bit-serial for 2-bit pointwise weights only, exactly those layers
    run bit-serial, the 2-bit depthwise layer the rules admit goes back to int8, and the logits
    equal the int8 build's."""
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.runtime import run_artifact

    seen: list[ConvLayer] = []

    def fake(layer: ConvLayer, spec, nhwc: bool, **_) -> KernelTiming:
        seen.append(layer)
        fast = layer.w_bits == 2 and layer.op == "pointwise"
        return KernelTiming(0.5 if fast else 2.0, 1.0, True, "bitserial" if fast else "int8")

    monkeypatch.setattr(kernel_choice, "time_layer", fake)
    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    res = compile_onnx(mixed_onnx, "host", tmp_path / "m.apq",
                       options=CompileOptions(bitserial=BitserialPolicy(select="measured")))
    kernels = {lay["name"]: lay["kernel"] for lay in res.manifest["layers"]}
    assert kernels["blocks.1.expand.weight_q"] == "bitserial_conv2d_a4w2"
    assert kernels["blocks.1.project.weight_q"] == "bitserial_conv2d_a4w2"
    for name in ("blocks.0.expand", "blocks.0.depthwise", "blocks.0.project", "blocks.2.expand", "blocks.2.project"):
        assert not kernels[f"{name}.weight_q"].startswith("bitserial"), name
    report = {c["layer"]: c for c in res.manifest["compile"]["kernel_choice"]}
    pointwise = {f"blocks.{i}.{k}.weight_q" for i in range(3) for k in ("expand", "project")}
    assert set(report) == pointwise | {"blocks.0.depthwise.weight_q"}
    assert report["blocks.0.depthwise.weight_q"]["op"] == "depthwise"
    assert {k: c["kernel"] for k, c in report.items()} == {
        k: ("bitserial" if k.startswith("blocks.1.") else "int8") for k in report}
    assert all(c["source"] == "measured" for c in report.values())
    dw = next(s for s in seen if s.op == "depthwise")
    assert (dw.kernel, dw.stride, dw.padding, dw.in_channels) == (3, 1, 1, dw.out_channels)
    assert len(seen) == len(set(seen))  # each layer shape timed once for both plans

    ref = compile_onnx(mixed_onnx, "host", tmp_path / "i8.apq")
    art, art_ref = open_artifact(res.artifact_path), open_artifact(ref.artifact_path)
    for seed in range(2):
        x = art.random_inputs(seed)
        np.testing.assert_array_equal(run_artifact(art, x)[0], run_artifact(art_ref, x)[0])


def test_measured_choice_refuses_targets_it_cannot_time(mixed_onnx: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from apq.toolchain.cli import main

    rc = main(["compile", str(mixed_onnx), "--target", "raspberry-pi/4b-aarch64", "--bitserial", "measured",
               "-o", str(tmp_path / "pi.apq")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "host target" in err and "Traceback" not in err


def test_rpc_options_need_the_measured_choice_and_both_halves(mixed_onnx: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from apq.toolchain.cli import main

    for extra in (["--rpc-tracker", "127.0.0.1:9190", "--rpc-key", "pi"], ["--bitserial", "measured", "--rpc-key", "pi"]):
        rc = main(["compile", str(mixed_onnx), "-o", str(tmp_path / "x.apq"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and len(err.splitlines()) == 1 and "rpc" in err.lower() and "Traceback" not in err


def test_an_unreachable_board_stops_the_compile_with_one_line(mixed_onnx: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from test_rpc import _free_port

    from apq.toolchain.cli import main

    monkeypatch.setenv("APQ_CACHE_DIR", str(tmp_path / "cache"))
    rc = main(["compile", str(mixed_onnx), "-o", str(tmp_path / "x.apq"), "--target", "raspberry-pi/4b-aarch64",
               "--bitserial", "measured", "--rpc-tracker", f"127.0.0.1:{_free_port()}", "--rpc-key", "pi"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "tracker" in err and "Traceback" not in err
    assert not (tmp_path / "x.apq").exists()
    assert not list((tmp_path / "cache").rglob("*.json"))  # nothing cached for an unreachable board


def test_kernels_are_timed_on_a_board_over_rpc(board, tmp_path: Path) -> None:  # noqa: F811 (fixture)
    """The same measurement on a TVM RPC board (here a real tracker + server on loopback): both
    kernels uploaded and timed there, the bit-serial output exact, the device named, and the
    cache keyed by the board."""
    from test_rpc import KEY

    from apq.kernels.kernel_choice import Board

    spec = get_target("host")
    remote = Board(*board, KEY)
    layer = ConvLayer("pointwise", 8, 8, 64, 32, 1, 1, 0, 1, 1, "bipolar")
    t = kernel_choice.time_layer(layer, spec, "avx512vnni" in spec.features, board=remote)
    assert t.exact and t.device == f"rpc:{KEY}@{board[0]}:{board[1]}", t
    assert t.bitserial_ms > 0 and t.int8_ms > 0 and t.kernel == choose(t.bitserial_ms, t.int8_ms, True)
    chooser = KernelChooser(get_target("raspberry-pi/4b-aarch64"), False, tmp_path, board=remote,
                            measure=lambda *a, **k: t)
    assert chooser.timing(layer).device == t.device
    assert all(key.endswith(f"on {t.device}") for key in json.loads(chooser.path.read_text())["entries"])


def test_a_board_target_gets_its_own_kernels_cross_compiled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """For a Raspberry Pi the comparison is between the Pi's kernels (the AArch64 bit-serial
    kernel, the ARM int8 path), exported as aarch64 libraries for the board; what the board
    would time is intercepted here (no board in this test)."""
    from apq.kernels.kernel_choice import Board, _export
    from apq.toolchain.profile import elf_arch

    pi = get_target("raspberry-pi/4b-aarch64")
    seen: dict[str, list] = {}

    def fake_board(kernels, check, spec, remote, cfg):
        seen.update(kernels, check=[check])
        for kind, entries in seen.items():
            for i, (func, _) in enumerate(entries):
                path = tmp_path / f"{kind}{i}.so"
                _export(func, spec, path)
                assert elf_arch(path) == "aarch64", (kind, i)
        return {"bitserial": 1.0, "int8": 2.0}, None  # no output came back: cannot be called exact

    monkeypatch.setattr(kernel_choice, "_time_on_board", fake_board)
    t = kernel_choice.time_layer(ConvLayer("depthwise", 8, 8, 16, 16, 3, 1, 1, 2, 2, "signed"), pi, False,
                                 board=Board("127.0.0.1", 9190, "pi"))
    assert set(seen) == {"bitserial", "int8", "check"} and seen["int8"]
    # the depthwise bit-serial kernel is opaque: its requantize epilogue is a kernel of its own
    assert len(seen["bitserial"]) == 2
    assert not t.exact and t.kernel == "int8" and t.device == "rpc:pi@127.0.0.1:9190"


def test_the_bench_records_both_kernels_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/kernel_choice.py on one small layer set: one record per layer and bit-width, with
    both measured times and the choice."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "kernel_choice.py"
    spec = importlib.util.spec_from_file_location("apq_bench_kernel_choice", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(bench, "LAYERS", [("pointwise", 8, 32, 16, 1, 1, 0), ("depthwise", 8, 16, 16, 3, 2, 1)])
    records = bench.run(["pointwise", "depthwise"], [1, 2], "host")
    assert [(r["op"], r["w_bits"]) for r in records] == [("pointwise", 1), ("pointwise", 2), ("depthwise", 1),
                                                          ("depthwise", 2)]
    for r in records:
        assert r["exact"] and r["bitserial_ms"] > 0 and r["int8_ms"] > 0 and r["source"] == "measured"
        assert r["chosen"] == choose(r["bitserial_ms"], r["int8_ms"], True)
