"""The pieces needed to run apq's ARM64 model libraries: TVM's aarch64 runtime and apq-run.

A cross-compiled ``model.so`` needs, on the board (or under qemu-aarch64 here), the TVM
runtime built for aarch64 and a small program that loads the library and calls ``main``.
Nothing of that is installed on an x86 host, so this module

- fetches ``libtvm_runtime.so`` and ``libtvm_ffi.so`` from the official aarch64 wheels of the
  exact TVM / tvm-ffi versions installed here (``pip download --platform manylinux_2_28_aarch64``;
  a model compiled by TVM X must run on runtime X), and
- builds ``apq-run`` (``runner/apq_run.cc``) with CMake, natively or with the aarch64 cross
  toolchain (``cmake/aarch64-linux-gnu.cmake``).

Both results live in apq's cache (apq.toolchain.cache_dir: ``$APQ_CACHE_DIR``, ``$XDG_CACHE_HOME/apq`` or ``~/.cache/apq``), keyed by versions
and by a hash of the runner sources, so only the first call pays (~5 s download, ~20 s per
build on 2 cores). Cache entries are populated in a temporary folder under a file lock and
renamed into place, so concurrent processes (pytest-xdist, several apq commands) never see a
half-written entry.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from apq.toolchain.cache_dir import cache_root
from apq.toolchain.errors import ApqError, DeviceUnreachableError

RUNTIME_LIBS: tuple[str, ...] = ("libtvm_runtime.so", "libtvm_ffi.so")
RUNNER_NAME = "apq-run"
AARCH64_WHEEL_PLATFORM = "manylinux_2_28_aarch64"
_STAMP = "apq-cache.json"

# The wheels that carry each runtime library, as (distribution, path inside the wheel).
_WHEEL_MEMBERS: dict[str, tuple[str, str]] = {
    "libtvm_runtime.so": ("apache-tvm", "tvm/lib/libtvm_runtime.so"),
    "libtvm_ffi.so": ("apache-tvm-ffi", "tvm_ffi/lib/libtvm_ffi.so"),
}


# --------------------------------------------------------------------------- cache plumbing


def populate_once(final: Path, populate: Callable[[Path], None], required: tuple[str, ...]) -> Path:
    """Create cache entry ``final`` exactly once, even with concurrent callers.

    ``populate(tmp)`` fills a fresh temporary folder next to ``final``; the folder is renamed
    to ``final`` (atomic on one file system) while holding an exclusive ``flock`` on
    ``final.parent/.lock``. An entry missing any of ``required`` is treated as corrupt and
    rebuilt. Why a lock and not only the rename: without it two processes would both spend
    the download/build time, and the loser's rename would fail on a non-empty target.
    """
    if all((final / r).exists() for r in required):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if all((final / r).exists() for r in required):
                return final  # another process finished it while we waited
            if final.exists():
                shutil.rmtree(final)
            tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
            try:
                populate(tmp)
                missing = [r for r in required if not (tmp / r).exists()]
                if missing:
                    raise ApqError(f"cache entry {final} is incomplete after populating: missing {missing}")
                tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final


def _installed_version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        raise ApqError(f"{dist} is not installed; apq needs it to match the aarch64 runtime") from None


def runtime_versions() -> dict[str, str]:
    """Versions of the installed TVM wheels; the aarch64 runtime must be the same."""
    return {dist: _installed_version(dist) for dist in ("apache-tvm", "apache-tvm-ffi")}


# --------------------------------------------------------------------------- aarch64 runtime


def _download_wheels(dest: Path, versions: dict[str, str]) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", AARCH64_WHEEL_PLATFORM, "-d", str(dest)]
    cmd += [f"{dist}=={ver}" for dist, ver in versions.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        raise ApqError(f"cannot download the aarch64 TVM runtime wheels with pip: {last}")
    return sorted(dest.glob("*.whl"))


def _extract_runtime(wheels: list[Path], dest: Path) -> None:
    for lib, (dist, member) in _WHEEL_MEMBERS.items():
        prefix = dist.replace("-", "_") + "-"
        matches = [w for w in wheels if w.name.startswith(prefix)]
        if not matches:
            raise ApqError(f"pip downloaded no {dist} wheel for {AARCH64_WHEEL_PLATFORM}")
        with zipfile.ZipFile(matches[0]) as zf:
            try:
                data = zf.read(member)
            except KeyError:
                raise ApqError(f"{matches[0].name} has no {member}; cannot build the aarch64 runtime") from None
        out = dest / lib
        out.write_bytes(data)
        out.chmod(0o755)


def ensure_aarch64_runtime(cache_dir: Path | None = None) -> Path:
    """Folder holding the aarch64 ``libtvm_runtime.so`` and ``libtvm_ffi.so`` (downloaded once).

    Returns ``<cache>/aarch64-runtime/<tvm version>-ffi<tvm-ffi version>/``. Raises
    :class:`ApqError` when pip cannot fetch the wheels (e.g. offline with an empty pip cache).
    """
    versions = runtime_versions()
    key = f"{versions['apache-tvm']}-ffi{versions['apache-tvm-ffi']}"
    final = cache_root(cache_dir) / "aarch64-runtime" / key

    def populate(tmp: Path) -> None:
        with tqdm(total=2, desc="aarch64 TVM runtime", unit="step", leave=False) as bar:
            wheels_dir = tmp / "wheels"
            wheels_dir.mkdir()
            bar.set_postfix_str("pip download")
            wheels = _download_wheels(wheels_dir, versions)
            bar.update()
            bar.set_postfix_str("extract")
            _extract_runtime(wheels, tmp)
            shutil.rmtree(wheels_dir)  # ~100 MB of wheels; only two libraries are needed
            bar.update()
        (tmp / _STAMP).write_text(json.dumps({"platform": AARCH64_WHEEL_PLATFORM, **versions}, indent=2))

    return populate_once(final, populate, RUNTIME_LIBS + (_STAMP,))


# --------------------------------------------------------------------------- runner build


def repo_root() -> Path:
    """The source tree holding CMakeLists.txt and runner/ (this file lives in <root>/targets/)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "CMakeLists.txt").is_file() or not (root / "runner" / "apq_run.cc").is_file():
        raise ApqError(f"apq-run sources not found under {root} (needs CMakeLists.txt and runner/)")
    return root


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


@dataclass(frozen=True)
class RunnerBuild:
    """How to build apq-run for one architecture on this host."""

    arch: str
    compiler: str  # the C++ compiler that must exist on PATH
    toolchain_file: str | None  # relative to the source root; None = native build
    runtime_dir: Callable[[Path | None], Path] | None  # None = the installed x86 wheels (CMake default)


def _native_build(arch: str) -> RunnerBuild:
    return RunnerBuild(arch, os.environ.get("CXX", "c++"), None, None)


# Cross builds from this host; a native build of the host's own arch is always available.
CROSS_BUILDS: dict[str, RunnerBuild] = {
    "aarch64": RunnerBuild("aarch64", "aarch64-linux-gnu-g++", "cmake/aarch64-linux-gnu.cmake",
                           ensure_aarch64_runtime),
}


def runner_build(arch: str) -> RunnerBuild:
    arch = host_arch() if arch in ("host", "native") else arch
    if arch == host_arch():
        return _native_build(arch)
    try:
        return CROSS_BUILDS[arch]
    except KeyError:
        raise ApqError(f"no apq-run build for arch {arch!r} on this {host_arch()} host; "
                       f"known: {', '.join(sorted({host_arch(), *CROSS_BUILDS}))}") from None


def missing_build_tools(arch: str = "aarch64") -> list[str]:
    """Executables needed to build apq-run for ``arch`` that are not on PATH."""
    build = runner_build(arch)
    return [tool for tool in ("cmake", build.compiler) if shutil.which(tool) is None]


def _sources_hash(root: Path, build: RunnerBuild, extra: dict[str, str]) -> str:
    h = hashlib.sha256()
    files = [root / "CMakeLists.txt", *sorted((root / "runner").glob("*"))]
    if build.toolchain_file:
        files.append(root / build.toolchain_file)
    for f in files:
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _run_step(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stderr + proc.stdout).strip().splitlines()
        errors = [ln for ln in out if "error" in ln.lower()] or out or [f"exit code {proc.returncode}"]
        raise ApqError(f"{what} of apq-run failed: {errors[0].strip()}")


def ensure_runner(arch: str = "aarch64", cache_dir: Path | None = None) -> Path:
    """Path of an ``apq-run`` binary for ``arch`` ("aarch64", "x86_64" or "host"), built once.

    The binary is cached under ``<cache>/runner/<arch>-<hash>/`` where the hash covers the
    runner sources, the TVM versions and the runtime folder, so editing the runner rebuilds
    it. Raises :class:`DeviceUnreachableError` when cmake or the (cross) compiler is missing.
    """
    build = runner_build(arch)
    missing = missing_build_tools(build.arch)
    if missing:
        raise DeviceUnreachableError(
            f"cannot build apq-run for {build.arch}: missing {', '.join(missing)} "
            f"(Debian/Ubuntu: apt-get install cmake g++-aarch64-linux-gnu qemu-user)")
    root = repo_root()
    cmake_args = [f"-DPython3_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"]
    runtime = build.runtime_dir(cache_dir) if build.runtime_dir else None
    if build.toolchain_file:
        cmake_args.append(f"-DCMAKE_TOOLCHAIN_FILE={root / build.toolchain_file}")
    if runtime is not None:
        cmake_args.append(f"-DAPQ_TVM_RUNTIME_DIR={runtime}")
    key = _sources_hash(root, build, {**runtime_versions(), "runtime": str(runtime), "arch": build.arch})
    final = cache_root(cache_dir) / "runner" / f"{build.arch}-{key}"

    def populate(tmp: Path) -> None:
        bdir = tmp / "build"
        with tqdm(total=2, desc=f"build apq-run ({build.arch})", unit="step", leave=False) as bar:
            _run_step(["cmake", "-S", str(root), "-B", str(bdir), *cmake_args], "cmake configure")
            bar.update()
            _run_step(["cmake", "--build", str(bdir), "--parallel", "2"], "cmake build")
            bar.update()
        shutil.copy2(bdir / RUNNER_NAME, tmp / RUNNER_NAME)
        shutil.rmtree(bdir)
        (tmp / _STAMP).write_text(json.dumps({"arch": build.arch, "runtime": str(runtime),
                                              "cmake_args": cmake_args}, indent=2))

    return populate_once(final, populate, (RUNNER_NAME, _STAMP)) / RUNNER_NAME
