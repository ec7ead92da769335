"""TVM RPC: a real tracker and board server on loopback ports (apq.targets.rpc / flash).

The "board" is TVM's own ``rpc_server`` on this machine, registered at a real tracker under
the key ``apq-test``; everything goes through the same sockets and protocol as a device farm.
Both processes run in their own process group and are always killed at the end.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from apq.targets.rpc import (
    connect,
    devices_from_summary,
    parse_tracker,
    query_devices,
    remote_profile,
    remote_run,
    wait_for_key,
)
from apq.toolchain.errors import ArtifactError, DeviceUnreachableError, InvalidInputError
from apq.toolchain.profile import MeasureConfig

KEY = "apq-test"
STARTUP_S = 90.0  # `import tvm` alone can take >10 s on a loaded 2-core machine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # own group: its session workers die with it


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=10)


def _wait_listening(port: int, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tracker exited: {log.read_text()[-500:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("tracker did not start")


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """(host, port) of a tracker with one free board registered under KEY."""
    logs = tmp_path_factory.mktemp("rpc")
    tport, sport = _free_port(), _free_port()
    # Started together: each spends most of its start-up in `import tvm`; a server that finds
    # the tracker not yet listening retries after 5 s, still cheaper than starting in sequence.
    tracker = _spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tport),
                      "--port-end", str(tport + 1), "--silent"], logs / "tracker.log")
    server = _spawn(["tvm.exec.rpc_server", "--tracker", f"127.0.0.1:{tport}", "--key", KEY,
                     "--host", "127.0.0.1", "--port", str(sport), "--port-end", str(sport + 1)],
                    logs / "server.log")
    try:
        _wait_listening(tport, tracker, logs / "tracker.log")
        wait_for_key("127.0.0.1", tport, KEY, STARTUP_S)
        yield "127.0.0.1", tport
    finally:
        _kill(server)
        _kill(tracker)


@pytest.fixture(scope="module")
def tiny_lib(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    """A small conv net compiled for this host and exported as a Relax VM library."""
    import onnx
    import tvm
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w", (8, 3, 3, 3)), ("b", (8,)), ("g", (10, 8))]]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "g"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    mod = relax.transform.DecomposeOpsForInference()(from_onnx(model, shape_dict={"x": [1, 3, 16, 16]}))
    d = tmp_path_factory.mktemp("tiny")
    tvm.compile(mod, tvm.target.Target({"kind": "llvm"})).export_library(str(d / "model.so"))
    onnx.save(model, str(d / "tiny.onnx"))
    return d / "model.so", [rng.standard_normal((1, 3, 16, 16)).astype(np.float32)]


# --------------------------------------------------------------------------- no server needed


@pytest.mark.parametrize("text,expected", [("127.0.0.1:9190", ("127.0.0.1", 9190)),
                                           ("farm.lab:1", ("farm.lab", 1)), ("[::1]:9190", ("::1", 9190))])
def test_parse_tracker(text, expected):
    assert parse_tracker(text) == expected


@pytest.mark.parametrize("junk", ["", "9190", "host:", ":9190", "host:port", "host:0", "host:70000", "a b:1"])
def test_parse_tracker_rejects_junk(junk):
    with pytest.raises(InvalidInputError):
        parse_tracker(junk)


def test_devices_from_summary_counts_boards_per_key():
    summary = {"queue_info": {"rpi4": {"free": 1, "pending": 2}, "gone": {"free": 0, "pending": 0}},
               "server_info": [{"key": "server:rpi4", "addr": ["10.0.0.2", 9090]},
                               {"key": "server:rpi4", "addr": ["10.0.0.3", 9090]},
                               {"key": "client-without-key"}]}
    devs = devices_from_summary(summary)
    assert [(d.key, d.total, d.free, d.pending) for d in devs] == [("rpi4", 2, 1, 2)]
    assert devs[0].addresses == ["10.0.0.2:9090", "10.0.0.3:9090"]


def test_dead_tracker_is_unreachable_quickly():
    port = _free_port()  # nothing listens here
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachableError, match="unreachable"):
        query_devices("127.0.0.1", port, timeout=2)
    with pytest.raises(DeviceUnreachableError, match="unreachable"):
        connect("127.0.0.1", port, KEY, timeout=2)
    assert time.monotonic() - t0 < 5


def test_silent_listener_times_out():
    with socket.socket() as s:  # accepts TCP but never answers the tracker handshake
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachableError):
            query_devices("127.0.0.1", s.getsockname()[1], timeout=1)
        assert time.monotonic() - t0 < 4


# --------------------------------------------------------------------------- against a live tracker


def test_query_devices_lists_the_board(board):
    devs = {d.key: d for d in query_devices(*board, timeout=5)}
    assert KEY in devs
    assert devs[KEY].total == 1 and devs[KEY].free == 1


def test_wrong_key_is_refused_quickly(board):
    t0 = time.monotonic()
    with pytest.raises(DeviceUnreachableError, match="no board with key 'no-such-board'.*apq-test"):
        connect(*board, "no-such-board", timeout=5)
    assert time.monotonic() - t0 < 3


def test_busy_board_times_out(board, tiny_lib):
    remote = connect(*board, KEY, timeout=5)  # hold the only board
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceUnreachableError, match="busy"):
            connect(*board, KEY, timeout=2)
        assert time.monotonic() - t0 < 8  # bounded: two tracker round trips of <= 2 s each
    finally:
        del remote
    wait_for_key(*board, KEY, timeout=30)  # released again once the session is dropped


def test_remote_run_matches_local(board, tiny_lib):
    from apq.targets.rpc import local_reference

    lib, inputs = tiny_lib
    remote_out = remote_run(lib, inputs, *board, KEY, timeout=10)
    local_out = local_reference(lib, inputs)
    assert len(remote_out) == len(local_out) == 1 and remote_out[0].shape == (1, 10)
    np.testing.assert_array_equal(remote_out[0], local_out[0])  # same binary, same CPU: bit-identical


def test_remote_profile_measures_on_the_board(board, tiny_lib):
    lib, inputs = tiny_lib
    cfg = MeasureConfig(warmup=2, min_repeats=5, min_time_s=0.01, max_repeats=50)
    st = remote_profile(lib, inputs, *board, KEY, cfg=cfg, threads=1, timeout=10)
    assert st.median_ms > 0 and st.min_ms <= st.median_ms <= st.p90_ms
    assert 5 <= st.repeats <= 50
    assert st.threads == 1 and st.source == "measured" and st.device == f"rpc:{KEY}@{board[0]}:{board[1]}"
    wait_for_key(*board, KEY, timeout=30)  # the session was closed: the board is free again


def test_flash_library_checks_hash_and_smoke_runs(board, tiny_lib):
    from apq.targets.flash import flash_library

    lib, inputs = tiny_lib
    sha = hashlib.sha256(lib.read_bytes()).hexdigest()
    rep = flash_library(lib, sha, "host", inputs, *board, KEY,
                        output_specs=[{"name": "y", "shape": [1, 10], "dtype": "float32"}], timeout=10)
    d = rep.to_json()
    assert d["ok"] and d["hash_ok"] and d["sha256"] == sha and d["bytes"] == lib.stat().st_size
    assert d["reference"] == "local" and d["max_abs_diff"] == 0.0
    assert d["outputs"] == [{"name": "y", "shape": [1, 10], "dtype": "float32", "finite": True, "shape_ok": True}]
    assert d["remote_path"].endswith(f"apq-{sha[:16]}.so") and d["persistent"] is False

    bad = flash_library(lib, sha, "host", inputs, *board, KEY,
                        output_specs=[{"name": "y", "shape": [1, 11], "dtype": "float32"}], timeout=10)
    assert not bad.ok and bad.hash_ok and bad.outputs[0]["shape_ok"] is False  # smoke test caught it

    with pytest.raises(ArtifactError, match="does not match the manifest"):
        flash_library(lib, "0" * 64, "host", inputs, *board, KEY, timeout=10)
    with pytest.raises(ArtifactError, match="simulated"):
        flash_library(lib, sha, "bitfusion", inputs, *board, KEY, timeout=10)
    with pytest.raises(ArtifactError, match="built for x86_64"):
        flash_library(lib, sha, "raspberry-pi/4b-aarch64", inputs, *board, KEY, timeout=10)
    wait_for_key(*board, KEY, timeout=30)


def test_flash_artifact_end_to_end(board, tiny_lib, tmp_path):
    """The same through a real `.apq` artifact from apq-compile."""
    compile_mod = pytest.importorskip("apq.toolchain.compile")
    from apq.targets.flash import flash_artifact

    onnx_path = tiny_lib[0].parent / "tiny.onnx"
    res = compile_mod.compile_onnx(onnx_path, "host", out_path=tmp_path / "tiny.apq")
    rep = flash_artifact(res.artifact_path, *board, KEY, timeout=10)
    assert rep.ok and rep.hash_ok and rep.reference == "local" and rep.target == "host"
    assert rep.outputs[0]["shape_ok"] and rep.outputs[0]["name"] == "y"


def test_tracker_protocol_constants_match_tvm():
    from tvm.rpc import base

    from apq.targets import rpc

    assert rpc.TRACKER_MAGIC == base.RPC_TRACKER_MAGIC
    assert (rpc.CODE_SUCCESS, rpc.CODE_REQUEST, rpc.CODE_SUMMARY) == (
        base.TrackerCode.SUCCESS, base.TrackerCode.REQUEST, base.TrackerCode.SUMMARY)
