"""The `.apq` artifact: a tar holding the compiled library and a manifest that describes it.

Why a tar with hashes: an artifact travels (to boards, between machines) and is loaded as
native code, so it must be self-describing (target, I/O, per-layer precision, provenance)
and tamper-evident: `open_artifact` refuses unlisted members, path traversal, links, hash
mismatches and artifacts built for another target.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.onnx_import import TensorSpec, random_inputs

#: Bumped only when a reader of the previous version would misread or fail on a new artifact
#: (a field removed, renamed or changing meaning). New optional fields keep it: readers look
#: fields up by key, ignore the rest, and treat a missing optional field as unknown (e.g.
#: ``layers[*].impl``, the instruction path each layer runs, added within version 1).
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_artifact(out_path: str | Path, files: dict[str, Path], manifest: dict[str, Any]) -> Path:
    """Write the tar: every file plus manifest.json with ``files`` = {name: sha256}."""
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = {name: sha256_file(p) for name, p in sorted(files.items())}
    tmp = out.with_name(out.name + ".partial")
    with tarfile.open(tmp, "w") as tar:
        for name, p in sorted(files.items()):
            tar.add(p, arcname=name, recursive=False)
        blob = json.dumps(manifest, indent=2, sort_keys=True).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(blob)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(blob))
    tmp.replace(out)  # atomic: an interrupted compile never leaves a half-written artifact
    return out


@dataclass
class LoadedArtifact:
    """An artifact extracted into a private temporary directory and verified."""

    path: Path
    root: Path
    manifest: dict[str, Any]
    _tmp: Any = field(default=None, repr=False)

    @property
    def lib_path(self) -> Path:
        return self.root / LIBRARY

    @property
    def target(self) -> str:
        return str(self.manifest["target"])

    @property
    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(d) for d in self.manifest["inputs"]]

    @property
    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec.from_json(d) for d in self.manifest["outputs"]]

    def sha256(self, name: str) -> str:
        return str(self.manifest["files"][name])

    def random_inputs(self, seed: int = 0) -> list[np.ndarray]:
        return random_inputs(self.input_specs, seed)


def _safe_member(m: tarfile.TarInfo) -> bool:
    name = m.name
    if not m.isfile():
        return False
    if name.startswith("/") or "\\" in name:
        return False
    parts = Path(name).parts
    return ".." not in parts and len(parts) == 1


def open_artifact(path: str | Path, expect_target: str | None = None,
                  extract_to: str | Path | None = None) -> LoadedArtifact:
    """Open, check and extract an artifact (see module docstring for what is refused)."""
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file")
    try:
        tar = tarfile.open(p, "r:*")
    except (tarfile.TarError, OSError):
        raise ArtifactError(f"{p}: not an apq artifact (not a tar archive)") from None
    with tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError):
            raise ArtifactError(f"{p}: corrupt artifact (truncated tar)") from None
        unsafe = [m.name for m in members if not _safe_member(m)]
        if unsafe:
            raise ArtifactError(f"{p}: refusing unsafe entries {unsafe[:3]} (paths must be plain file names)")
        names = [m.name for m in members]
        if len(set(names)) != len(names):
            raise ArtifactError(f"{p}: duplicate entries in artifact")
        if MANIFEST not in names:
            raise ArtifactError(f"{p}: not an apq artifact (no {MANIFEST})")
        try:
            manifest = json.loads(tar.extractfile(MANIFEST).read())
        except (ValueError, UnicodeDecodeError):
            raise ArtifactError(f"{p}: {MANIFEST} is not valid JSON") from None
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            got = manifest.get("format_version") if isinstance(manifest, dict) else None
            raise ArtifactError(f"{p}: unsupported artifact format version {got!r} (this apq reads {FORMAT_VERSION})")
        listed = manifest.get("files") or {}
        extra = sorted(set(names) - set(listed) - {MANIFEST})
        missing = sorted(set(listed) - set(names))
        if extra or missing:
            raise ArtifactError(f"{p}: contents do not match the manifest (extra {extra}, missing {missing})")
        if LIBRARY not in listed:
            raise ArtifactError(f"{p}: artifact has no {LIBRARY}")
        if expect_target is not None and manifest.get("target") != expect_target:
            raise ArtifactError(f"{p}: built for target {manifest.get('target')!r}, not {expect_target!r}")
        tmp = None
        if extract_to is None:
            tmp = tempfile.TemporaryDirectory(prefix="apq-artifact-")
            root = Path(tmp.name)
        else:
            root = Path(extract_to)
            root.mkdir(parents=True, exist_ok=True)
        for m in members:
            if m.name == MANIFEST:
                continue
            data = tar.extractfile(m).read()
            if sha256_bytes(data) != listed[m.name]:
                raise ArtifactError(f"{p}: sha256 mismatch for {m.name} (artifact modified or corrupt)")
            (root / m.name).write_bytes(data)
        (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return LoadedArtifact(p, root, manifest, tmp)
