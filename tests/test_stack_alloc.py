"""kernels/stack_alloc.py: small scratch buffers go on the stack, big ones stay on the heap, and a
parallel register-tiled conv no longer allocates its tile from the workspace per loop iteration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")


def _two_scratch_buffers():
    """A PrimFunc with a 256-float local scratch (1 KiB) and a 4096-float one (16 KiB)."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def func(a: T.Buffer((4096,), "float32"), b: T.Buffer((4096,), "float32")):
        small = T.alloc_buffer((256,), "float32", scope="local")
        big = T.alloc_buffer((4096,), "float32", scope="global")
        for i in range(256):
            small[i] = a[i] * T.float32(2)
        for i in range(4096):
            big[i] = a[i] + small[i % 256]
        for i in range(4096):
            b[i] = big[i]

    return func


def _allocations(func) -> dict[str, dict]:
    import tvm_ffi
    from tvm import tirx

    found: dict[str, dict] = {}

    def on_alloc(alloc):
        found[alloc.buffer.name] = {k: int(v) for k, v in (alloc.annotations or {}).items()}
        return alloc

    tvm_ffi.structural_map(func, (tirx.AllocBuffer, on_alloc))
    return found


def test_small_constant_buffers_are_marked_for_the_stack_big_ones_are_not():
    from apq.kernels.stack_alloc import DISABLE_LOWER_BUILTIN, MAX_STACK_BYTES, constant_bytes, stack_small_allocations

    lowered = _two_scratch_buffers()
    before = _allocations(lowered)
    assert set(before) == {"small", "big"} and not any(before.values()), before
    after = _allocations(stack_small_allocations(lowered))
    assert after["small"] == {DISABLE_LOWER_BUILTIN: 1}
    assert after["big"] == {}  # 16 KiB > MAX_STACK_BYTES: stays a workspace allocation
    assert 1024 <= MAX_STACK_BYTES < 16 * 1024
    # the cap is a parameter: nothing qualifies under 1 KiB here, both under 16 KiB
    assert not any(_allocations(stack_small_allocations(lowered, max_bytes=1023)).values())
    assert all(_allocations(stack_small_allocations(lowered, max_bytes=16 * 1024)).values())
    sizes = {}

    def record(alloc):
        sizes[alloc.buffer.name] = constant_bytes(alloc.buffer)
        return alloc

    import tvm_ffi
    from tvm import tirx

    tvm_ffi.structural_map(lowered, (tirx.AllocBuffer, record))
    assert sizes == {"small": 1024, "big": 16384}


def test_compiled_function_with_stack_scratch_matches_numpy():
    from apq.kernels.stack_alloc import tir_pipeline

    func = _two_scratch_buffers().with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), tvm.target.Target("llvm"), tir_pipeline=tir_pipeline()).mod
    a = np.random.default_rng(0).standard_normal(4096).astype("float32")
    b = tvm.runtime.tensor(np.zeros(4096, "float32"))
    lib["main"](tvm.runtime.tensor(a), b)
    np.testing.assert_array_equal(b.numpy(), a + np.tile(a[:256] * 2, 16))
    ir = lib.inspect_source("ll")
    assert ir.count("@__TVMBackendAllocWorkspace") == 2  # its declaration + the big buffer's one call


def _pointwise_conv_func(target):
    """The float NHWC 56x56 24->96 pointwise conv + ReLU6, fused and scheduled by apq's rules with
    its outer loop parallel (its register tile is a 1 KiB or larger local buffer)."""
    from tvm import relax

    from apq.kernels import knob_tuning
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 1, 24, 96)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, 56, 56, 24], "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.clip(y, 0.0, 6.0))
            y = bb.emit_output(y)
        bb.emit_func_output(y)
    fused = knob_tuning.fused_module(bb.get(), target)
    (func,) = [f for _, f in fused.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    cfg = dataclasses.replace(CpuScheduleConfig.for_target(target), num_cores=2, min_parallel_work=1)
    with target:
        scheduled, rule = knob_tuning.schedule_with(func, target, cfg)
    assert rule == "conv2d-nhwc" and "T.parallel" in scheduled.script()
    return func, scheduled, w


def test_parallel_conv_tile_is_not_a_workspace_allocation_per_iteration():
    """The bug this module fixes: with TVM's default TIR pipeline the parallel closure calls
    TVMBackendAllocWorkspace for its tile on every iteration; apq's build (knob tuning's _build
    uses the same TIR pipeline as the model build) has no workspace call left, same outputs."""
    from apq.kernels import knob_tuning
    from apq.targets.registry import get_target

    target = get_target("host").tvm()
    func, scheduled, w = _pointwise_conv_func(target)
    default = tvm.compile(tvm.IRModule({"main": scheduled.with_attr("global_symbol", "main")}), target).mod
    assert "call ptr %" in default.inspect_source("ll") and "TVMBackendAllocWorkspace" in default.inspect_source("ll")
    apq_lib = knob_tuning._build(scheduled, target)
    ir = apq_lib.inspect_source("ll")
    assert "load ptr, ptr @__TVMBackendAllocWorkspace" not in ir, "tile still allocated from the workspace"
    x = np.random.default_rng(2).standard_normal((1, 56, 56, 24)).astype("float32")
    outs = []
    for lib in (default, apq_lib):
        out = tvm.runtime.tensor(np.zeros((1, 56, 56, 96), "float32"))
        lib["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)  # FuseTIR lifts the weight to a parameter
        outs.append(out.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    ref = np.clip(np.einsum("nhwc,cf->nhwf", x, w[0, 0]), 0, 6)
    np.testing.assert_allclose(outs[1], ref, rtol=1e-5, atol=1e-5)
