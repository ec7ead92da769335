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


def _accumulator_requantize_module(multiplier: np.ndarray, scale: float, zero_point: int, dtype: str):
    """quantize(astype(acc:int32, f32) * m, s, z): an int8 layer's epilogue, input provably bounded."""
    from tvm import relax

    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType([len(multiplier), 4096], "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            x = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(multiplier[:, None])))
            q = bb.emit(relax.op.quantize(x, relax.const(np.float32(scale)),
                                          relax.const(np.array(zero_point, dtype)), axis=-1, out_dtype=dtype))
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


#: per-row multipliers: up to 1.0 the proven quotient exceeds 2^30 (unclamped, rounded in float);
#: the small ones keep it below (unclamped, rounded straight to int32 with llvm.lrint)
_LARGE_M = (1e-2, 3e-4, 0.0173 * 0.37, 1.0)
_SMALL_M = (3e-4, 1e-4, 0.0173 * 0.0037, 2e-5)


@pytest.mark.parametrize("dtype,zero_point,scale,multipliers,integer_rounding", [
    ("uint8", 128, 0.0173, _LARGE_M, False), ("int8", -3, 0.0173, _LARGE_M, False),
    ("uint8", 0, 1e-9, _LARGE_M, False),  # 1e-9: quotients up to 2^54
    ("uint8", 128, 0.0173, _SMALL_M, True), ("int8", -3, 0.0173, _SMALL_M, True),
    ("int16", 7, 0.0173, _SMALL_M, True)])
def test_proven_bounded_quantize_drops_its_clamp_without_changing_any_output(
        dtype, zero_point, scale, multipliers, integer_rounding, monkeypatch):
    """Extreme int32 accumulators and half-step boundaries: the unclamped requantize equals the
    clamped one and NumPy's float32 division, bit for bit, whichever way it rounds."""
    from tvm import relax

    from apq.kernels import requantize_bounds
    from apq.kernels.pipeline import compile_relax
    from apq.kernels.requantize_bounds import drop_proven_clamps
    from apq.targets.registry import get_target

    target = tvm.target.Target(get_target("host").tvm_target)
    m = np.array(multipliers, np.float32)
    mod = _accumulator_requantize_module(m, scale, zero_point, dtype)
    rewritten, count = drop_proven_clamps(mod)
    assert count == 1
    assert ("llvm.lrint" in rewritten.script()) == integer_rounding  # the path under test was taken
    rng = np.random.default_rng(3)
    acc = rng.integers(-(1 << 31), (1 << 31) - 1, (len(m), 4096), dtype=np.int64).astype(np.int32)
    acc[:, :8] = [[-(1 << 31), (1 << 31) - 1, 0, 1, -1, 1 << 24, -(1 << 24), (1 << 24) + 1]] * len(m)
    for i, mi in enumerate(m):  # accumulators whose rescaled value sits on a rounding boundary
        k = rng.integers(-300, 300, 1024)
        acc[i, 8:1032] = np.rint((k + 0.5) * np.float64(scale) / np.float64(mi)).astype(np.int64).clip(-(1 << 31), (1 << 31) - 1)
        acc[i, 1032:2056] = rng.integers(-(1 << 16), 1 << 16, 1024)
    got = {}
    for name, limit in (("unclamped", requantize_bounds.QUOTIENT_LIMIT), ("clamped", 0.0)):
        monkeypatch.setattr(requantize_bounds, "QUOTIENT_LIMIT", limit)
        vm = relax.VirtualMachine(compile_relax(mod, target), tvm.cpu())
        got[name] = vm["main"](tvm.runtime.tensor(acc)).numpy()
    x = (acc.astype(np.float32) * m[:, None]).astype(np.float32)
    info = np.iinfo(dtype)
    want = np.clip(np.rint(x / np.float32(scale)) + zero_point, info.min, info.max).astype(dtype)
    assert np.array_equal(got["unclamped"], want)
    assert np.array_equal(got["unclamped"], got["clamped"])
    # not vacuous: typical scales give many levels and saturate; the tiny one saturates both ways
    assert len(np.unique(want)) > 20 if scale > 1e-6 else set(np.unique(want)) == {info.min, info.max}
    assert {info.min, info.max} <= set(np.unique(want))


@pytest.mark.parametrize("dtype,zero_point", [("uint8", 128), ("int8", -3), ("uint16", 0), ("int16", 5)])
def test_integer_rounding_equals_rint_then_saturate(dtype, zero_point):
    """round_saturate (llvm.lrint + integer clip) == NumPy's rint + zero point + clip for half
    integers (ties to even), their float neighbours and quotients up to its 2^30 limit."""
    from tvm import te

    from apq.kernels.requantize import INTEGER_ROUNDING_LIMIT, round_saturate
    from apq.targets.registry import get_target

    rng = np.random.default_rng(11)
    half = (rng.integers(-70000, 70000, 4096) + 0.5).astype(np.float32)
    edge = np.float32(INTEGER_ROUNDING_LIMIT)
    q = np.concatenate([half, np.nextafter(half, np.float32(np.inf)), np.nextafter(half, np.float32(-np.inf)),
                        rng.uniform(-300, 300, 4096).astype(np.float32),
                        [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0, np.nextafter(edge, np.float32(0)),
                         -np.nextafter(edge, np.float32(0)), 2.0 ** 24 + 2, -(2.0 ** 24) - 2]]).astype(np.float32)
    x = te.placeholder(q.shape, "float32", name="x")
    out = te.compute(q.shape, lambda i: round_saturate(x[i], zero_point, dtype), name="q")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, out]))
    _, inner = sch.split(sch.get_loops(sch.get_sblock("q"))[0], [None, 16])
    sch.vectorize(inner)
    lib = tvm.compile(sch.mod, target=tvm.target.Target(get_target("host").tvm_target))
    got = tvm.runtime.tensor(np.zeros(q.shape, dtype))
    lib(tvm.runtime.tensor(q), got)
    info = np.iinfo(dtype)
    want = np.clip(np.rint(q.astype(np.float64)) + zero_point, info.min, info.max).astype(dtype)
    assert np.array_equal(got.numpy(), want)
    assert len(np.unique(want)) > 200 and {info.min, info.max} <= set(np.unique(want))


def test_quantize_of_an_unbounded_float_keeps_its_clamp(mbv2_qdq):
    """A float model input can be inf/NaN: its quantize is not rewritten; every layer's is."""
    from tvm import relax

    from apq.kernels.requantize_bounds import drop_proven_clamps
    from test_cpu_schedules import _relax_module

    assert drop_proven_clamps(_quantize_module(0.0173, 0, "int8"))[1] == 0
    mod, _, _ = _relax_module(mbv2_qdq)
    quantizes = []
    relax.analysis.post_order_visit(mod["main"], lambda e: quantizes.append(e) if isinstance(e, relax.Call)
                                    and getattr(e.op, "name", "") == "relax.quantize" else None)
    first_input = [q for q in quantizes if isinstance(q.args[0], relax.Var) and q.args[0].same_as(mod["main"].params[0])]
    _, rewritten = drop_proven_clamps(mod)
    assert len(first_input) == 1 and rewritten == len(quantizes) - 1


def test_conv_of_a_bounded_input_with_constant_weights_is_bounded():
    """``|conv(x, W)| <= max|x| * sum|W|`` (each output sums a subset of the products): the bound
    that lets a float-accumulated integer conv's requantize drop its clamp; an unknown weight
    proves nothing."""
    from tvm import relax

    from apq.kernels.requantize_bounds import value_bound

    w = np.arange(-8, 10, dtype=np.int8).reshape(2, 1, 3, 3)
    x = relax.Var("x", relax.TensorType((1, 2, 5, 5), "uint8"))
    conv = relax.op.nn.conv2d(x, relax.const(w), groups=2, out_dtype="float32")
    bound = value_bound(conv, {})
    assert 255 * np.abs(w.astype(np.int64)).sum() <= bound <= 255 * np.abs(w.astype(np.int64)).sum() * 1.001
    free = relax.Var("w", relax.TensorType((2, 1, 3, 3), "int8"))
    assert value_bound(relax.op.nn.conv2d(x, free, groups=2, out_dtype="float32"), {}) is None


def _relu6_requantize_module(multiplier: float, scale: float, zero_point: int, dtype: str):
    """quantize(minimum(maximum(astype(acc, f32) * m, 0), 6), s, z): an int8 layer's ReLU6 epilogue."""
    from tvm import relax

    bb = relax.BlockBuilder()
    acc = relax.Var("acc", relax.TensorType([8192], "int32"))
    with bb.function("main", [acc]):
        with bb.dataflow():
            x = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(np.float32(multiplier))))
            x = bb.emit(relax.op.minimum(relax.op.maximum(x, relax.const(np.float32(0))), relax.const(np.float32(6))))
            q = bb.emit(relax.op.quantize(x, relax.const(np.float32(scale)), relax.const(np.array(zero_point, dtype)),
                                          axis=-1, out_dtype=dtype))
            out = bb.emit_output(q)
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("dtype,zero_point,scale,absorbed", [
    ("uint8", 0, 6.0 / 255 * 0.4, ("maximum", "minimum")),  # calibrated clip 2.4 < 6: ReLU6 never binds
    ("uint8", 0, 6.0 / 255, ("maximum", "minimum")),  # rint(6 / s) = 255 exactly
    ("uint8", 0, 0.05, ()),  # rint(6 / s) = 120 < 255: the 6 binds, so nothing goes (the chain stops there)
    ("int8", 0, 0.02, ("minimum",)),  # signed output: rint(0 / s) = 0 > -128, the maximum binds
    ("int8", -128, 0.02, ("maximum", "minimum")),  # zero point -128: 0 maps to the lowest level
])
def test_relu6_the_output_saturation_covers_is_dropped_without_changing_any_output(
        dtype, zero_point, scale, absorbed, monkeypatch):
    """A ReLU6 before a requantize whose saturation clamps at least as hard goes (requantize_bounds
    ``_absorbed_clip``); one that binds stays. Either way the outputs equal NumPy's
    clip -> rint(x / s) + z -> saturate, and the build without the rule, bit for bit."""
    from tvm import relax

    from apq.kernels import requantize_bounds
    from apq.kernels.pipeline import compile_relax
    from apq.kernels.requantize_bounds import drop_proven_clamps
    from apq.targets.registry import get_target

    m = 0.0173 * 0.37
    mod = _relu6_requantize_module(m, scale, zero_point, dtype)
    rewritten, count = drop_proven_clamps(mod)
    assert count == 1
    live = relax.transform.DeadCodeElimination()(rewritten).script()
    for op in ("maximum", "minimum"):
        assert (f"R.{op}(" not in live) == (op in absorbed), live
    target = tvm.target.Target(get_target("host").tvm_target)
    rng = np.random.default_rng(5)
    acc = rng.integers(-(1 << 31), (1 << 31) - 1, 8192, dtype=np.int64).astype(np.int32)
    acc[:4096] = rng.integers(-4000, 4000, 4096)  # around the clip limits: x in about [-26, 26]
    acc[4096:4104] = [-(1 << 31), (1 << 31) - 1, 0, 1, -1, 1 << 24, -(1 << 24), int(6 / m)]
    got = {}
    for name, rule in (("rule", requantize_bounds._absorbed_clip), ("no rule", lambda *a: None)):
        monkeypatch.setattr(requantize_bounds, "_absorbed_clip", rule)
        vm = relax.VirtualMachine(compile_relax(mod, target), tvm.cpu())
        got[name] = vm["main"](tvm.runtime.tensor(acc)).numpy()
    x = np.clip((acc.astype(np.float32) * np.float32(m)).astype(np.float32), np.float32(0), np.float32(6))
    info = np.iinfo(dtype)
    want = np.clip(np.rint(x / np.float32(scale)) + zero_point, info.min, info.max).astype(dtype)
    assert np.array_equal(got["rule"], want)
    assert np.array_equal(got["rule"], got["no rule"])
    ends = np.clip(np.rint(np.float32([0, 6]) / np.float32(scale)) + zero_point, info.min, info.max)
    assert [want.min(), want.max()] == list(ends) and len(np.unique(want)) > 50  # both ends reached, many levels
