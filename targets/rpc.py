"""Boards behind a TVM RPC tracker: list them, reserve one, time a library on it.

Why not just ``rpc.connect_tracker(...).request(key)``: the stock client retries a refused
tracker for 60 s and waits *forever* for a key nobody serves or a board that stays busy, which
turns a typo into a hung command. Here every step has a deadline and every failure is one
:class:`DeviceUnreachableError` line that says which of the three it was (tracker down, no such
key, board busy). The tracker protocol itself (magic, JSON frames, SUMMARY/REQUEST codes) is
TVM's, spoken through ``tvm.rpc.base`` on a socket we own so it can carry a timeout.

Remote timing uses the board's own ``time_evaluator`` (the clock runs on the board, not across
the network) with the same protocol as local measurement: warm-up, then enough repeats to fill
``min_time_s``, median and spread.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import socket
import struct
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from apq.toolchain.errors import ArtifactError, DeviceUnreachableError, InvalidInputError
from apq.toolchain.profile import LatencyStats, MeasureConfig, elf_arch, host_arch

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 10.0
# The server kills a session older than this, so a crashed client never keeps a board busy.
DEFAULT_SESSION_TIMEOUT_S = 600.0


def parse_tracker(text: str) -> tuple[str, int]:
    """'HOST:PORT' (or '[v6addr]:PORT') -> (host, port); InvalidInputError on anything else."""
    if not isinstance(text, str) or ":" not in text:
        raise InvalidInputError(f"RPC tracker must be HOST:PORT, got {text!r}")
    host, _, port_s = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or any(c.isspace() for c in host) or "/" in host:
        raise InvalidInputError(f"RPC tracker must be HOST:PORT, got {text!r}")
    try:
        port = int(port_s)
    except ValueError:
        raise InvalidInputError(f"RPC tracker port must be a number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise InvalidInputError(f"RPC tracker port must be in 1..65535, got {port}")
    return host, port


@dataclass
class DeviceInfo:
    """One key at the tracker: how many boards serve it, how many are free, how many waiters."""

    key: str
    total: int
    free: int
    pending: int
    addresses: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- tracker protocol


# TVM's tracker wire protocol (tvm/rpc/base.py), restated so that listing devices or failing
# fast on a dead tracker does not pay for `import tvm` (seconds). A test pins them to TVM's.
TRACKER_MAGIC = 0x2F271
CODE_SUCCESS = 0
CODE_REQUEST = 4
CODE_SUMMARY = 6
MAX_REPLY_BYTES = 1 << 24


def _recvall(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 65536))
        if not chunk:
            raise ConnectionResetError("connection closed by peer")
        buf += chunk
    return bytes(buf)


class _Tracker:
    """A tracker connection with a deadline on every operation."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.where = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        except socket.timeout:
            raise DeviceUnreachableError(
                f"RPC tracker {self.where} unreachable: no answer within {timeout:g}s") from None
        except OSError as e:
            raise DeviceUnreachableError(f"RPC tracker {self.where} unreachable: {e.strerror or e}") from None
        try:
            self.sock.sendall(struct.pack("<i", TRACKER_MAGIC))
            magic = struct.unpack("<i", _recvall(self.sock, 4))[0]
        except socket.timeout:
            self.close()
            raise DeviceUnreachableError(f"{self.where} did not answer the RPC tracker handshake "
                                         f"within {timeout:g}s") from None
        except OSError as e:
            self.close()
            raise DeviceUnreachableError(f"{self.where} is not answering as an RPC tracker ({e})") from None
        if magic != TRACKER_MAGIC:
            self.close()
            raise DeviceUnreachableError(f"{self.where} is not an RPC tracker (bad handshake)")

    def call(self, msg: list[Any], timeout: float) -> Any:
        """One length-prefixed JSON request and its reply."""
        self.sock.settimeout(timeout)
        data = json.dumps(msg).encode("utf-8")
        self.sock.sendall(struct.pack("<i", len(data)) + data)
        size = struct.unpack("<i", _recvall(self.sock, 4))[0]
        if not 0 < size <= MAX_REPLY_BYTES:
            raise ConnectionError(f"bad reply size {size}")
        return json.loads(_recvall(self.sock, size).decode("utf-8"))

    def summary(self, timeout: float) -> dict[str, Any]:
        try:
            value = self.call([CODE_SUMMARY], timeout)
        except socket.timeout:
            raise DeviceUnreachableError(f"RPC tracker {self.where} did not answer within {timeout:g}s") from None
        except (OSError, ValueError) as e:
            raise DeviceUnreachableError(f"RPC tracker {self.where} dropped the connection ({e})") from None
        if not (isinstance(value, list) and len(value) == 2 and value[0] == CODE_SUCCESS
                and isinstance(value[1], dict)):
            raise DeviceUnreachableError(f"RPC tracker {self.where} sent an invalid summary")
        return value[1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def devices_from_summary(summary: dict[str, Any]) -> list[DeviceInfo]:
    """Parse the tracker's SUMMARY reply (queue_info + server_info) into one row per key."""
    addrs: dict[str, list[str]] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", ""))
        if not key.startswith("server:"):
            continue
        addr = item.get("addr") or ["?", "?"]
        addrs.setdefault(key[len("server:"):], []).append(":".join(str(a) for a in addr))
    queue = summary.get("queue_info", {})
    out = []
    for key in sorted(set(addrs) | set(queue)):
        q = queue.get(key, {})
        total = len(addrs.get(key, []))
        if total or q.get("pending", 0):
            out.append(DeviceInfo(key, total, int(q.get("free", 0)), int(q.get("pending", 0)),
                                  sorted(addrs.get(key, []))))
    return out


def query_devices(host: str, port: int, timeout: float = DEFAULT_TIMEOUT_S) -> list[DeviceInfo]:
    """Keys registered at the tracker with total/free/pending counts."""
    tr = _Tracker(host, port, timeout)
    try:
        return devices_from_summary(tr.summary(timeout))
    finally:
        tr.close()


def connect(host: str, port: int, key: str, timeout: float = DEFAULT_TIMEOUT_S,
            session_timeout: float = DEFAULT_SESSION_TIMEOUT_S) -> Any:
    """Reserve a board with ``key`` through the tracker and open an RPC session to it.

    Raises DeviceUnreachableError when the tracker is down, no board serves the key, or all
    boards with the key stay busy for ``timeout`` seconds.
    """
    tr = _Tracker(host, port, timeout)
    try:
        devs = {d.key: d for d in devices_from_summary(tr.summary(timeout))}
        dev = devs.get(key)
        if dev is None or dev.total == 0:
            known = ", ".join(k for k, d in devs.items() if d.total) or "none"
            raise DeviceUnreachableError(f"no board with key {key!r} at tracker {host}:{port} (keys: {known})")
        try:
            value = tr.call([CODE_REQUEST, key, "", 1], timeout)
        except socket.timeout:
            raise DeviceUnreachableError(
                f"board {key!r} busy: none of {dev.total} free within {timeout:g}s "
                f"({dev.pending} request(s) already queued)") from None
        except (OSError, ValueError) as e:
            raise DeviceUnreachableError(f"RPC tracker {host}:{port} dropped the request ({e})") from None
    finally:
        tr.close()  # closing also withdraws a request the tracker has not served yet
    if not (isinstance(value, list) and len(value) == 2 and value[0] == CODE_SUCCESS):
        raise DeviceUnreachableError(f"RPC tracker {host}:{port} refused the request for {key!r}")
    url, bport, matchkey = value[1]
    from tvm import rpc

    try:
        return rpc.connect(url, bport, matchkey, session_timeout=session_timeout)
    except Exception as e:  # TVM raises plain RuntimeError/TVMError for socket failures
        msg = " ".join(str(e).split())[:160]
        raise DeviceUnreachableError(f"board {key!r} at {url}:{bport} refused the session: {msg}") from None


def on_board(host: str, port: int, key: str, work: Callable[[Any], T], timeout: float = DEFAULT_TIMEOUT_S,
             session_timeout: float = DEFAULT_SESSION_TIMEOUT_S) -> T:
    """Run ``work(remote)`` in a fresh session and close the session before returning.

    Why a callback and not a context manager: the session (and the board's "busy" state) lives
    as long as any remote handle (session, module, tensor, device) is referenced; a ``with ...
    as remote`` binding would outlive the block. ``work`` must return local data only.
    """
    remote = connect(host, port, key, timeout, session_timeout)
    try:
        return work(remote)
    finally:
        del remote
        gc.collect()


# --------------------------------------------------------------------------- remote execution


def remote_device_name(key: str, host: str, port: int) -> str:
    """What we can honestly say about a board: its key at its tracker (the board is not asked)."""
    return f"rpc:{key}@{host}:{port}"


def _remote_threads(remote: Any, threads: int | None) -> int:
    """Configure the board's TVM thread pool (None: leave the board's default); return it."""
    if threads is not None:
        remote.get_function("runtime.config_threadpool")(1, int(threads))
    return int(remote.get_function("runtime.NumThreads")())


def _upload_and_load(remote: Any, lib_path: Path, remote_name: str) -> Any:
    remote.upload(str(lib_path), remote_name)
    try:
        return remote.load_module(remote_name)
    except Exception as e:
        msg = " ".join(str(e).split())[:160]
        raise ArtifactError(
            f"{lib_path.name} (built for {elf_arch(lib_path)}) does not load on the board: {msg}") from None


def _to_remote(inputs: Sequence[np.ndarray], dev: Any) -> list[Any]:
    import tvm

    return [tvm.runtime.tensor(np.ascontiguousarray(x), device=dev) for x in inputs]


def _outputs(result: Any) -> list[np.ndarray]:
    from apq.toolchain.runtime import vm_outputs

    return vm_outputs(result)


def run_remote(remote: Any, lib_path: str | Path, inputs: Sequence[np.ndarray],
               remote_name: str = "apq_model.so") -> list[np.ndarray]:
    """One inference of an exported Relax library on an open session; outputs copied back."""
    from tvm import relax

    lib_path = Path(lib_path)
    rlib = _upload_and_load(remote, lib_path, remote_name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(rlib, dev)
    return _outputs(vm["main"](*_to_remote(inputs, dev)))


def local_reference(lib_path: str | Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray] | None:
    """Outputs of the same library run in-process, or None when this host cannot load it."""
    if elf_arch(lib_path) != host_arch():
        return None
    from apq.toolchain.runtime import load_vm
    import tvm

    vm = load_vm(lib_path)
    return _outputs(vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]))


def outputs_close(a: Sequence[np.ndarray], b: Sequence[np.ndarray], atol: float = 1e-5, rtol: float = 1e-5) -> bool:
    """Same count, shapes and values up to ``atol + rtol * max|b|`` (b is the reference)."""
    err = max_abs_diff(a, b)
    scale = max((float(np.max(np.abs(y))) for y in b if y.size), default=0.0)
    return err <= atol + rtol * scale


def max_abs_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Largest elementwise difference; inf when shapes or counts differ."""
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if x.size:
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))))
    return worst


def remote_profile(lib_path: str | Path, inputs: Sequence[np.ndarray], host: str, port: int, key: str,
                   cfg: MeasureConfig | None = None, threads: int | None = None,
                   timeout: float = DEFAULT_TIMEOUT_S, check_outputs: bool = True,
                   atol: float = 1e-5, rtol: float = 1e-5) -> LatencyStats:
    """Time an exported Relax library on a board, by the measurement protocol, on the board's clock.

    With ``check_outputs`` the board's outputs are compared with an in-process run when this host
    can load the library (same architecture); a mismatch raises ArtifactError.
    """
    from tvm import relax

    cfg = cfg or MeasureConfig()
    lib_path = Path(lib_path)
    if not lib_path.is_file():
        raise InvalidInputError(f"{lib_path}: no such library")
    reference = local_reference(lib_path, inputs) if check_outputs else None

    def work(remote: Any) -> tuple[list[np.ndarray], list[float], int]:
        used = _remote_threads(remote, threads)
        rlib = _upload_and_load(remote, lib_path, "apq_model.so")
        dev = remote.cpu()
        vm = relax.VirtualMachine(rlib, dev)
        args = _to_remote(inputs, dev)
        outputs = _outputs(vm["main"](*args))
        vm.set_input("main", *args)  # stateful call: time_evaluator cannot return tuples over RPC
        probe = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=max(cfg.warmup, 1))("main")
        per_call = max(float(np.median(probe.results)), 1e-9)  # doubles as the warm-up
        repeats = min(cfg.max_repeats, max(cfg.min_repeats, math.ceil(cfg.min_time_s / per_call)))
        res = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=repeats)("main")
        return outputs, [float(t) for t in res.results], used

    outputs, samples, used = on_board(host, port, key, work, timeout)
    if reference is not None and not outputs_close(outputs, reference, atol, rtol):
        raise ArtifactError(f"board {key!r} output differs from the local run of the same library "
                            f"(max abs diff {max_abs_diff(outputs, reference):.3g})")
    return LatencyStats.from_samples(samples, used, remote_device_name(key, host, port), governor=None)


def wait_for_key(host: str, port: int, key: str, timeout: float) -> DeviceInfo:
    """Poll the tracker until a free board with ``key`` is listed (for scripts and tests)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            for d in query_devices(host, port, timeout=min(2.0, timeout)):
                if d.key == key and d.free > 0:
                    return d
        except DeviceUnreachableError as e:
            last = e
        time.sleep(0.2)
    raise DeviceUnreachableError(f"no free board {key!r} at {host}:{port} after {timeout:g}s"
                                 + (f" ({last})" if last else ""))


def remote_run(lib_path: str | Path, inputs: Sequence[np.ndarray], host: str, port: int, key: str,
               timeout: float = DEFAULT_TIMEOUT_S) -> list[np.ndarray]:
    """One inference on a board in its own session (correctness checks, not timing)."""
    return on_board(host, port, key, lambda remote: run_remote(remote, lib_path, inputs), timeout)
