"""Running a verified artifact: in-process on the host, or under qemu for ARM builds.

Executors are a registry keyed by the target's ``executor`` field, so a new way of running
(e.g. a board over RPC) is one entry, not another branch in every command.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from apq.targets.registry import get_target
from apq.toolchain.artifact import LoadedArtifact
from apq.toolchain.errors import ApqError

Executor = Callable[[LoadedArtifact, list[np.ndarray]], list[np.ndarray]]
_EXECUTORS: dict[str, Executor] = {}


def register_executor(name: str) -> Callable[[Executor], Executor]:
    def deco(fn: Executor) -> Executor:
        _EXECUTORS[name] = fn
        return fn

    return deco


def load_vm(lib_path, device=None):
    """Load an exported Relax executable library into a VirtualMachine on the CPU."""
    import tvm
    from tvm import relax

    lib = tvm.runtime.load_module(str(lib_path))
    return relax.VirtualMachine(lib, device or tvm.cpu())


def vm_outputs(result) -> list[np.ndarray]:
    """Flatten a VM result (a tensor or a nested tuple of tensors) into numpy arrays."""
    if hasattr(result, "numpy"):
        return [result.numpy()]
    out: list[np.ndarray] = []
    for item in result:
        out.extend(vm_outputs(item))
    return out


@register_executor("local")
@register_executor("simulator")  # the simulated accelerator's kernels run on the host CPU
def run_local(art: LoadedArtifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    import tvm

    vm = load_vm(art.lib_path)
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
    return vm_outputs(vm["main"](*args))


@register_executor("qemu")
def run_qemu(art: LoadedArtifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    from apq.targets.qemu import run_under_qemu

    return run_under_qemu(art.lib_path, inputs)


def run_artifact(art: LoadedArtifact, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run on whatever this machine can run the artifact's target with (never timed here)."""
    spec = get_target(art.target)
    executor = _EXECUTORS.get(spec.executor)
    if executor is None:
        raise ApqError(f"no way to run target {spec.name!r} on this machine (executor {spec.executor!r})")
    if len(inputs) != len(art.input_specs):
        raise ApqError(f"artifact takes {len(art.input_specs)} input(s), got {len(inputs)}")
    return executor(art, inputs)
