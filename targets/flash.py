"""Deploy an artifact to a board over TVM RPC and prove it arrived intact and runs.

Why each check: an artifact is native code travelling over a network to a machine we do not
see, so "flash" means (1) refuse what cannot belong on a board (a simulator target, a library
whose architecture contradicts its manifest), (2) upload ``model.so`` and read it *back* from
the board and compare its sha256 with the manifest, not just trust the upload, (3) load it and
run one inference on seeded random inputs, checking shapes and finiteness, and (4) when this
host can run the same binary, compare the board's outputs with a local run.

What "flash" cannot do with the stock TVM RPC server: install permanently. The library lives in
the server's per-session workspace and is removed when the session ends; timing
(``apq profile --rpc-...``) re-uploads it. The report says so (``persistent: false``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apq.targets.registry import get_target
from apq.targets.rpc import (
    DEFAULT_TIMEOUT_S,
    local_reference,
    max_abs_diff,
    on_board,
    outputs_close,
    remote_device_name,
    run_remote,
)
from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.artifact import sha256_bytes, sha256_file
from apq.toolchain.profile import elf_arch, host_arch


@dataclass
class FlashReport:
    """What was deployed where, and what the board proved."""

    artifact: str
    target: str
    board: str
    remote_path: str
    sha256: str
    bytes: int
    hash_ok: bool  # sha256 of the bytes read back from the board == the manifest's
    outputs: list[dict[str, Any]] = field(default_factory=list)  # name, shape, dtype, finite, shape_ok
    reference: str = "none"  # "local" or why there was no local reference
    max_abs_diff: float | None = None
    smoke_s: float = 0.0  # wall time of the smoke inference incl. RPC transfers (not a latency figure)
    persistent: bool = False  # the stock RPC server deletes uploads when the session ends
    ok: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if d["max_abs_diff"] is not None and not math.isfinite(d["max_abs_diff"]):
            d["max_abs_diff"] = str(d["max_abs_diff"])
        return d


def check_flashable(target_name: str, lib_path: Path) -> None:
    """Refuse targets with no board behind them and libraries that contradict their target."""
    spec = get_target(target_name)
    if spec.executor == "simulator":
        raise ArtifactError(f"target {spec.name!r} is a simulated accelerator; there is no board to flash "
                            "(its figures come from the analytic model)")
    arch = elf_arch(lib_path)
    if arch != spec.arch:
        raise ArtifactError(f"{lib_path.name} is built for {arch}, but its target {spec.name!r} is {spec.arch}")


def flash_library(lib_path: str | Path, expected_sha256: str, target_name: str, inputs: Sequence[np.ndarray],
                  host: str, port: int, key: str, output_specs: Sequence[dict[str, Any]] | None = None,
                  timeout: float = DEFAULT_TIMEOUT_S, atol: float = 1e-5, rtol: float = 1e-5,
                  label: str | None = None) -> FlashReport:
    """Upload, read back, hash-check and smoke-run one library on a board (see module docstring).

    A corrupted upload raises ArtifactError; a failed smoke test returns ``ok=False`` with the
    evidence, so the caller can print it.
    """
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InvalidInputError(f"{lib_path}: no such library")
    check_flashable(target_name, lib_path)
    local_sha = sha256_file(lib_path)
    if local_sha != expected_sha256:
        raise ArtifactError(f"{lib_path.name}: sha256 {local_sha[:12]}... does not match the manifest "
                            f"({expected_sha256[:12]}...); refusing to flash")
    remote_name = f"apq-{expected_sha256[:16]}.so"
    reference = local_reference(lib_path, inputs) if get_target(target_name).arch == host_arch() else None

    def work(remote: Any) -> tuple[str, str, int, list[np.ndarray], float]:
        remote.upload(str(lib_path), remote_name)
        back = bytes(remote.download(remote_name))
        back_sha = sha256_bytes(back)
        try:
            where = str(remote.get_function("tvm.rpc.server.workpath")(remote_name))
        except Exception:  # a minimal (C++) RPC server may not expose it; the name is enough
            where = remote_name
        if back_sha != expected_sha256:
            return where, back_sha, len(back), [], 0.0
        t0 = time.perf_counter()
        outs = run_remote(remote, lib_path, inputs, remote_name=remote_name)
        return where, back_sha, len(back), outs, time.perf_counter() - t0

    where, back_sha, nbytes, outs, smoke_s = on_board(host, port, key, work, timeout)
    if back_sha != expected_sha256:
        raise ArtifactError(f"upload to board {key!r} corrupted: read back sha256 {back_sha[:12]}... "
                            f"({nbytes} bytes) != manifest {expected_sha256[:12]}...")

    rows = []
    for i, o in enumerate(outs):
        spec = output_specs[i] if output_specs and i < len(output_specs) else None
        rows.append({"name": spec["name"] if spec else f"output_{i}", "shape": list(o.shape), "dtype": str(o.dtype),
                     "finite": bool(np.all(np.isfinite(o))) if o.dtype.kind in "fc" else True,
                     "shape_ok": (list(spec["shape"]) == list(o.shape)) if spec else True})
    ok = bool(outs) and all(r["finite"] and r["shape_ok"] for r in rows)
    if output_specs is not None and len(output_specs) != len(outs):
        ok = False
    err: float | None = None
    if reference is not None:
        err = max_abs_diff(outs, reference)
        ok = ok and outputs_close(outs, reference, atol, rtol)
        ref_note = "local"
    else:
        ref_note = f"none: library is {elf_arch(lib_path)}, this host is {host_arch()}"
    return FlashReport(artifact=label or str(lib_path), target=target_name, board=remote_device_name(key, host, port),
                       remote_path=where, sha256=back_sha, bytes=nbytes, hash_ok=True, outputs=rows,
                       reference=ref_note, max_abs_diff=err, smoke_s=smoke_s, ok=ok)


def flash_artifact(artifact_path: str | Path, host: str, port: int, key: str,
                   timeout: float = DEFAULT_TIMEOUT_S, seed: int = 0) -> FlashReport:
    """Open (and verify) a `.apq` artifact, then :func:`flash_library` its model.so to the board."""
    from apq.toolchain.artifact import LIBRARY, open_artifact

    art = open_artifact(artifact_path)
    return flash_library(art.lib_path, art.sha256(LIBRARY), art.target, art.random_inputs(seed), host, port, key,
                         output_specs=art.manifest.get("outputs"), timeout=timeout, label=str(artifact_path))
