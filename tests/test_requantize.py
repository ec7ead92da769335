"""The division-free requantize (kernels/requantize.py) must equal ONNX's division bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

ROWS, COLS = 48, 1 << 15


def _scales(rng: np.random.Generator) -> np.ndarray:
    """Activation-scale-like values (log-uniform 1e-6..10) plus awkward significands."""
    s = np.exp(rng.uniform(np.log(1e-6), np.log(10.0), ROWS - 6)).astype(np.float32)
    awkward = np.array([1.0, 3.0, 0.1, 1 / 255, np.nextafter(np.float32(2.0), np.float32(0)),
                        np.float32(1.9999999)], np.float32)  # all-ones significands included
    return np.concatenate([s, awkward]).astype(np.float32)


def _dividends(rng: np.random.Generator, scales: np.ndarray) -> np.ndarray:
    """Per row: x near the rounding boundaries (k + 0.5) * s, their float neighbours, and
    typical rescaled accumulators ``acc * m`` (the values a requantize actually sees)."""
    x = np.empty((ROWS, COLS), np.float32)
    for i, s in enumerate(scales):
        k = rng.integers(-300, 300, COLS // 4).astype(np.float32)
        half = ((k + np.float32(0.5)) * s).astype(np.float32)
        up = np.nextafter(half, np.float32(np.inf))
        down = np.nextafter(half, np.float32(-np.inf))
        acc = rng.integers(-(1 << 20), 1 << 20, COLS - 3 * (COLS // 4)).astype(np.float32)
        m = np.float32(s * rng.uniform(1e-4, 1e-2))
        x[i] = np.concatenate([half, up, down, (acc * m).astype(np.float32)])
    return x


def _quotient_kernel():
    """out[i, j] = exact_quotient(x[i, j], s[i], r[i]) compiled for the host CPU."""
    from tvm import te

    from apq.kernels.requantize import exact_quotient
    from apq.targets.registry import get_target

    x = te.placeholder((ROWS, COLS), "float32", name="x")
    s = te.placeholder((ROWS,), "float32", name="s")
    r = te.placeholder((ROWS,), "float32", name="r")
    out = te.compute((ROWS, COLS), lambda i, j: exact_quotient(x[i, j], s[i], r[i]), name="q")
    func = te.create_prim_func([x, s, r, out])
    sch = tvm.s_tir.Schedule(func)
    _, j = sch.get_loops(sch.get_sblock("q"))
    _, inner = sch.split(j, [None, 16])
    sch.vectorize(inner)  # the vector FMAs the real epilogues use
    return tvm.compile(sch.mod, target=tvm.target.Target(get_target("host").tvm_target))


def test_exact_quotient_equals_float32_division_bit_for_bit():
    from apq.kernels.requantize import exact_reciprocal

    rng = np.random.default_rng(7)
    scales = _scales(rng)
    recips = np.array([exact_reciprocal(float(s)) for s in scales], np.float32)
    x = _dividends(rng, scales)
    out = tvm.runtime.tensor(np.zeros_like(x))
    _quotient_kernel()(tvm.runtime.tensor(x), tvm.runtime.tensor(scales), tvm.runtime.tensor(recips), out)
    want = x / scales[:, None]
    got = out.numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (
        f"{np.count_nonzero(got != want)} of {got.size} quotients differ from the division")
    # and the test is not vacuous: a plain multiply by the reciprocal does differ somewhere
    naive = (x * recips[:, None]).astype(np.float32)
    assert np.count_nonzero(np.rint(naive) != np.rint(want)) > 0


def test_exact_reciprocal_refuses_scales_outside_the_proven_range():
    from apq.kernels.requantize import exact_reciprocal

    assert exact_reciprocal(0.05) == float(np.float32(1) / np.float32(0.05))
    for bad in (0.0, float("inf"), float("nan"), 2.0 ** -120, 2.0 ** 110):
        assert exact_reciprocal(bad) is None


def _quantize_module(scale: float, zero_point: int, dtype: str):
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4096], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.quantize(x, relax.const(np.float32(scale)),
                                          relax.const(np.array(zero_point, dtype)), axis=-1, out_dtype=dtype))
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("dtype,zero_point", [("int8", 0), ("uint8", 128), ("int8", -3)])
def test_pipeline_quantize_is_division_free_and_matches_onnx_rounding(dtype, zero_point, monkeypatch):
    from tvm import relax

    from apq.kernels import requantize
    from apq.kernels.pipeline import compile_relax, prepare_passes
    from apq.kernels.requantize import legalize_map
    from apq.targets.registry import get_target

    target = tvm.target.Target(get_target("host").tvm_target)
    scale = 0.0173
    mod = _quantize_module(scale, zero_point, dtype)
    with target:
        legalized = tvm.transform.Sequential(prepare_passes(target))(mod)
    text = legalized.script()
    assert "T.fma" in text and " / " not in text.split("def quantize", 1)[1]
    rng = np.random.default_rng(1)
    k = rng.integers(-200, 200, 2048).astype(np.float32)
    half = ((k + np.float32(0.5)) * np.float32(scale)).astype(np.float32)
    x = np.concatenate([half, (rng.standard_normal(2048) * 3).astype(np.float32)])
    x[:5] = [np.inf, -np.inf, 1e30, -1e30, np.nan]  # saturate like the division does
    x[5:7] = [np.float32(0.0173) * (1 << 24), -np.float32(0.0173) * (1 << 24)]  # at the clamp bound
    got = {}
    for name, overrides in (("apq", legalize_map()), ("division", {})):  # the latter: TVM's own legalization
        monkeypatch.setattr(requantize, "legalize_map", lambda o=overrides: o)
        vm = relax.VirtualMachine(compile_relax(mod, target), tvm.cpu())
        got[name] = vm["main"](tvm.runtime.tensor(x)).numpy()
    info = np.iinfo(dtype)
    finite = np.isfinite(x)
    want = np.clip(np.rint(x[finite] / np.float32(scale)) + zero_point, info.min, info.max).astype(dtype)
    assert np.array_equal(got["apq"][finite], want)
    assert np.array_equal(got["apq"], got["division"])  # inf, -inf and NaN included
