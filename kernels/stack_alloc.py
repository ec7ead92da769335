"""Keep a kernel's small scratch buffers (register-tile accumulators) on the stack.

Why: TVM 0.27's ``LowerTVMBuiltin`` turns every ``local``-scope allocation on a CPU (and every
``global`` one of 1 KiB or more) into a ``TVMBackendAllocWorkspace`` / ``FreeWorkspace`` pair.
apq's conv schedules keep their register tile (e.g. 16 AVX-512 vectors = exactly 1 KiB) in such
a local buffer. In a serial kernel the heap buffer is allocated once per call and LLVM still
keeps most of the tile in registers; but the body of a ``T.parallel`` loop is outlined into a
closure that allocates and frees the buffer *per iteration*, zeroes it with ``memset``, stores
the whole tile to memory and reloads it in the epilogue, because a heap buffer that escapes into
a runtime call cannot be promoted to registers (SROA only promotes ``alloca``).

Measured on the float 112x112 16->64 pointwise conv of MobileNetV2 (1 thread, AVX-512):
serial 194 us, parallel 264 us (the "parallel loops cost even at 1 thread" penalty), parallel
with the tile on the stack 198 us; at 2 threads 196 -> 136 us.

How: a TIR pass, run just before ``LowerTVMBuiltin`` in a TIR pipeline registered under
:data:`PIPELINE_NAME`, sets ``disable_lower_builtin`` (``tir::transform::kDisableLowerTVMBuiltin``)
on every constant-size ``AllocBuffer`` of at most :data:`MAX_STACK_BYTES`; LLVM then gets an
``alloca``. The cap keeps big scratch (padded copies, whole-tensor intermediates) on the heap:
worker threads have finite stacks and those buffers are not register candidates anyway.
"""

from __future__ import annotations

import functools

from typing import Any

#: Largest scratch buffer (bytes) put on the stack: a 32-register AVX-512 tile is 2 KiB; the
#: biggest register-candidate buffer apq's schedules allocate is a 1000-float GEMV row (4 KB).
MAX_STACK_BYTES = 8 * 1024

#: TVM's annotation key that makes ``LowerTVMBuiltin`` leave an allocation alone
#: (``tir::transform::kDisableLowerTVMBuiltin``).
DISABLE_LOWER_BUILTIN = "disable_lower_builtin"

#: Name of apq's TIR pipeline in TVM's pipeline registry (``tvm.tirx.get_tir_pipeline``).
PIPELINE_NAME = "apq-cpu"

_BASE_PIPELINE = "s_tir"  # what tvm.compile's "default" TIR pipeline resolves to in TVM 0.27


def constant_bytes(buffer: Any) -> int | None:
    """Bytes of a buffer with a constant shape (None when any extent is symbolic)."""
    import tvm

    elems = 1
    for extent in buffer.shape:
        if not hasattr(extent, "value"):
            return None
        elems *= int(extent.value)
    dtype = tvm.runtime.DataType(str(buffer.dtype))
    return elems * ((dtype.bits * dtype.lanes + 7) // 8)


def stack_small_allocations(func: Any, max_bytes: int = MAX_STACK_BYTES) -> Any:
    """``func`` with every constant-size ``AllocBuffer`` of <= ``max_bytes`` marked for the stack."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    def on_alloc(alloc: Any) -> Any:
        size = constant_bytes(alloc.buffer)
        annotations = dict(alloc.annotations or {})
        if size is None or size > max_bytes or DISABLE_LOWER_BUILTIN in annotations:
            return alloc
        annotations[DISABLE_LOWER_BUILTIN] = tvm.tirx.IntImm("int32", 1)
        return tirx.AllocBuffer(alloc.buffer, annotations=annotations)

    return tvm_ffi.structural_map(func, (tirx.AllocBuffer, on_alloc))


def stack_alloc_pass(max_bytes: int = MAX_STACK_BYTES) -> Any:
    """The PrimFunc pass form of :func:`stack_small_allocations`."""
    from tvm import tirx

    @tirx.transform.prim_func_pass(opt_level=0, name="ApqStackSmallAllocations")
    def _pass(func: Any, _mod: Any, _ctx: Any) -> Any:
        return stack_small_allocations(func, max_bytes)

    return _pass


@functools.cache
def tir_pipeline() -> str:
    """Register (once per process) and return the name of TVM's default TIR pipeline +
    :func:`stack_alloc_pass`.

    A name, because TVM 0.27's ``tirx.build`` only takes registered pipeline names. The pass runs
    in the host finalization, right before ``LowerTVMBuiltin`` (the pass that would otherwise
    move the buffers to the heap).
    """
    import tvm
    from tvm import tirx

    try:
        tirx.get_tir_pipeline(PIPELINE_NAME)
        return PIPELINE_NAME
    except ValueError:  # not registered yet in this process
        pass

    def factory(**kwargs: Any) -> Any:
        pipeline, finalize_host, finalize_device = tirx.get_tir_pipeline(_BASE_PIPELINE, **kwargs)

        def finalize_host_with_stack() -> Any:
            return tvm.ir.transform.Sequential([stack_alloc_pass(), finalize_host()])

        return pipeline, finalize_host_with_stack, finalize_device

    tirx.register_tir_pipeline(PIPELINE_NAME, factory)
    return PIPELINE_NAME


__all__ = ["DISABLE_LOWER_BUILTIN", "MAX_STACK_BYTES", "PIPELINE_NAME", "constant_bytes", "stack_alloc_pass",
           "stack_small_allocations", "tir_pipeline"]
