"""Run cross-compiled ARM64 model libraries on this x86 host under qemu-aarch64.

This is how apq checks that what it built for a board computes the right numbers without
the board: the real aarch64 machine code of ``model.so``, the real aarch64 TVM runtime and
the same ``apq-run`` a board would use, executed by user-mode qemu. It is a correctness
check only. Emulation speed says nothing about a Cortex-A72, so nothing here measures or
returns time; latencies come from real boards over TVM RPC.

The same file/subprocess protocol (``.npy`` in, ``.npy`` + one JSON line out) also drives a
native build of the runner (:func:`run_with_runner`), which is how the runner itself is
tested against ``relax.VirtualMachine``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from apq.toolchain.profile import elf_arch

from apq.targets.aarch64_runtime import (
    ensure_aarch64_runtime,
    ensure_runner,
    missing_build_tools,
)
from apq.toolchain.errors import ApqError, DeviceUnreachableError, InvalidInputError

QEMU_BINARY = os.environ.get("APQ_QEMU_AARCH64", "qemu-aarch64")
AARCH64_SYSROOT = Path(os.environ.get("APQ_AARCH64_SYSROOT", "/usr/aarch64-linux-gnu"))

# dtypes apq-run reads and writes (runner/npy.h keeps the same table).
RUNNER_DTYPES: frozenset[str] = frozenset(
    {"float32", "float16", "float64", "int8", "uint8", "int32", "int64", "bool"})

# ELF e_machine values, to refuse a library built for the wrong CPU with a clear message.

# apq-run exit codes (runner/apq_run.cc) -> the error a user sees.
_EXIT_ERRORS: dict[int, type[ApqError]] = {2: InvalidInputError, 3: ApqError}


def qemu_available() -> tuple[bool, str]:
    """Whether ARM64 libraries can be run here; the reason when not (used as a skip reason)."""
    if shutil.which(QEMU_BINARY) is None:
        return False, f"{QEMU_BINARY} not found (apt-get install qemu-user)"
    loader = AARCH64_SYSROOT / "lib" / "ld-linux-aarch64.so.1"
    if not loader.exists():
        return False, f"no aarch64 sysroot at {AARCH64_SYSROOT} (apt-get install libc6-arm64-cross)"
    missing = missing_build_tools("aarch64")
    if missing:
        return False, f"missing {', '.join(missing)} to build apq-run (apt-get install cmake g++-aarch64-linux-gnu)"
    return True, f"{QEMU_BINARY} with sysroot {AARCH64_SYSROOT}"


def _write_inputs(inputs: Sequence[np.ndarray], folder: Path) -> list[Path]:
    paths = []
    for i, arr in enumerate(inputs):
        arr = np.asarray(arr)
        if arr.dtype.name not in RUNNER_DTYPES:
            raise InvalidInputError(
                f"input {i} has dtype {arr.dtype.name}; apq-run supports {', '.join(sorted(RUNNER_DTYPES))}")
        p = folder / f"in{i}.npy"
        # apq-run reads little-endian C-order arrays only.
        np.save(p, np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)))
        paths.append(p)
    return paths


def run_with_runner(runner: Path, lib_path: Path, inputs: Sequence[np.ndarray], *,
                    launcher: Sequence[str] = (), env: dict[str, str] | None = None,
                    timeout_s: float = 300) -> list[np.ndarray]:
    """Run ``model.so`` through an ``apq-run`` binary (optionally via ``launcher``, e.g. qemu).

    Returns the model's outputs in order. No timing is requested or returned: callers that
    need latency measure on real hardware.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InvalidInputError(f"model library not found: {lib_path}")
    with tempfile.TemporaryDirectory(prefix="apq-run-") as tmp:
        tmpdir = Path(tmp)
        in_paths = _write_inputs(inputs, tmpdir)
        out_dir = tmpdir / "out"
        cmd = [*launcher, str(runner), str(lib_path.resolve())]
        for p in in_paths:
            cmd += ["--input", str(p)]
        cmd += ["--output-dir", str(out_dir)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                                  env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            raise DeviceUnreachableError(
                f"apq-run on {lib_path.name} did not finish within {timeout_s:g} s") from None
        if proc.returncode != 0:
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else f"apq-run exited with code {proc.returncode}"
            raise _EXIT_ERRORS.get(proc.returncode, ApqError)(msg.removeprefix("apq-run: error: "))
        try:
            summary = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            raise ApqError(f"apq-run printed no JSON summary: {proc.stdout.strip()[:200]!r}") from None
        return [np.load(out_dir / o["file"]) for o in summary["outputs"]]


def run_under_qemu(lib_path: Path, inputs: list[np.ndarray], timeout_s: float = 300) -> list[np.ndarray]:
    """Run an aarch64 ``model.so`` (a Relax VM executable) on ``inputs`` under qemu-aarch64.

    Inputs are in the model's input order; returns its outputs as NumPy arrays. For
    correctness checks only: never returns or implies timings.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InvalidInputError(f"model library not found: {lib_path}")
    arch = elf_arch(lib_path)
    if arch != "aarch64":
        raise InvalidInputError(
            f"{lib_path} is {'not an ELF library' if arch is None else 'built for ' + arch}; "
            "qemu runs aarch64 libraries (compile for an ARM target)")
    ok, reason = qemu_available()
    if not ok:
        raise DeviceUnreachableError(f"cannot run under qemu: {reason}")
    runtime = ensure_aarch64_runtime()
    runner = ensure_runner("aarch64")
    # -E sets the variable for the emulated program only (not for the x86 qemu process).
    launcher = [QEMU_BINARY, "-L", str(AARCH64_SYSROOT), "-E", f"LD_LIBRARY_PATH={runtime}"]
    return run_with_runner(runner, lib_path, inputs, launcher=launcher, timeout_s=timeout_s)
