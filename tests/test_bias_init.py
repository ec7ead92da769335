"""Float accumulators start at their bias (kernels/bias_init.py): the rewrite fires on a conv +
bias PrimFunc and only there; float models still match onnxruntime; the exact float-accumulated
int8 convs stay bit-identical; the manifest still names their integer path."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402


def _conv_bias_module(extra_reader: bool = False, int32: bool = False):
    """conv2d (NHWC) + per-channel bias [+ a second use of the conv output]."""
    dtype = "int32" if int32 else "float32"
    x = relax.Var("x", relax.TensorType((1, 6, 6, 8), "int8" if int32 else "float32"))
    rng = np.random.default_rng(0)
    w = rng.integers(-3, 4, (3, 3, 8, 16)).astype("int8") if int32 else rng.standard_normal((3, 3, 8, 16)).astype("float32")
    b = np.arange(16, dtype=dtype).reshape(1, 1, 1, 16)
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=1, data_layout="NHWC", kernel_layout="HWIO",
                                              out_dtype=dtype))
            out = relax.op.add(conv, relax.const(b))
            if extra_reader:
                out = relax.op.multiply(bb.emit(out), conv)
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get(), w, b


def _fused_primfuncs(mod, with_bias_init: bool):
    from apq.kernels import pipeline
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    passes = pipeline.prepare_passes(target)
    [bias] = [p for p in passes if "BiasInto" in str(p.info.name)]  # the build runs it after FuseTIR
    with target:
        fused = tvm.transform.Sequential(passes if with_bias_init else [p for p in passes if p is not bias])(mod)
    return [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_bias_moves_into_the_accumulator_init_and_the_add_becomes_a_copy():
    from apq.kernels.bias_init import fold_bias_into_init

    mod, _, _ = _conv_bias_module()
    [func] = _fused_primfuncs(mod, with_bias_init=False)
    folded, count = fold_bias_into_init(func)
    assert count == 1
    text = folded.script()
    init = text[text.index("T.init()"):].splitlines()[1]
    assert "= param_" in init or "= p" in init, init  # the accumulator starts at a parameter (the bias)
    assert "T.float32(0.0)" not in init
    add = text[text.index('T.sblock("T_add")'):]
    assert " + " not in add.split("T.writes")[1], add  # out = acc: nothing added any more
    assert fold_bias_into_init(folded)[1] == 0  # idempotent: nothing left to fold


@pytest.mark.parametrize("extra_reader,int32", [(True, False), (False, True)])
def test_no_fold_when_the_accumulator_has_two_readers_or_is_integer(extra_reader, int32):
    from apq.kernels.bias_init import fold_bias_into_init

    mod, _, _ = _conv_bias_module(extra_reader=extra_reader, int32=int32)
    funcs = _fused_primfuncs(mod, with_bias_init=False)
    assert funcs and all(fold_bias_into_init(f)[1] == 0 for f in funcs)


def test_float_conv_with_bias_init_matches_numpy():
    from apq.kernels.pipeline import compile_relax
    from apq.targets.registry import get_target

    mod, w, b = _conv_bias_module()
    x = np.random.default_rng(1).standard_normal((1, 6, 6, 8)).astype("float32")
    got = relax.VirtualMachine(compile_relax(mod, get_target("host").tvm()), tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = sum(np.einsum("nhwc,cf->nhwf", xp[:, ky:ky + 6, kx:kx + 6], w[ky, kx].astype(np.float64))
               for ky in range(3) for kx in range(3)) + b
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_int8_float_accumulated_model_is_bit_identical_with_and_without_it(tmp_path, mbv2_qdq, monkeypatch):
    """The float-accumulated int8 convs add integer offsets below 2^24 (qdq_lowering's bound):
    starting at the offset changes no bit. Their manifest layers still say int-fp32acc. (NCHW
    int8 layout: on a VNNI host the NHWC default runs the depthwise convs on vpdpbusd instead.)"""
    from apq.kernels import bias_init
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import CompileOptions, compile_onnx
    from apq.toolchain.runtime import run_local

    x = None
    outs = []
    for enabled in (True, False):
        if not enabled:
            monkeypatch.setattr(bias_init, "fold_bias_into_init", lambda func: (func, 0))
        res = compile_onnx(mbv2_qdq, "host", tmp_path / f"m{enabled}.apq",
                           options=CompileOptions(target="host", int8_layout="NCHW"))
        art = open_artifact(res.artifact_path, "host")
        x = art.random_inputs(0) if x is None else x
        outs.append(run_local(art, x)[0])
        if enabled:
            impls = {layer["impl"] for layer in art.manifest["layers"]}
            assert "int-fp32acc" in impls and "float" not in impls, impls
    np.testing.assert_array_equal(outs[0], outs[1])
    assert np.abs(outs[0]).max() > 0
