"""Block-merging thresholds follow the target's L2 (targets/registry.py, CpuScheduleConfig.with_l2_cache)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from apq.targets.registry import get_target, read_l2_per_core


def _cache_dir(root: Path, entries: dict[str, tuple[str, str, str]]) -> Path:
    """A fake ``/sys/devices/system/cpu/cpu0/cache``: index name -> (level, size, shared_cpu_list)."""
    for name, (level, size, shared) in entries.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "level").write_text(level + "\n")
        (d / "size").write_text(size + "\n")
        (d / "shared_cpu_list").write_text(shared + "\n")
    return root


def test_l2_per_core_is_read_from_sysfs(tmp_path):
    l1 = ("1", "48K", "0")
    private = _cache_dir(tmp_path / "a", {"index0": l1, "index2": ("2", "2048K", "0"), "index3": ("3", "300M", "0-1")})
    assert read_l2_per_core(str(private)) == 2 << 20
    shared = _cache_dir(tmp_path / "b", {"index0": l1, "index1": ("2", "1024K", "0-3")})
    assert read_l2_per_core(str(shared)) == 256 << 10  # one core's share
    split = _cache_dir(tmp_path / "c", {"index2": ("2", "1M", "0-1,4-5")})
    assert read_l2_per_core(str(split)) == 256 << 10
    assert read_l2_per_core(str(_cache_dir(tmp_path / "d", {"index0": l1}))) is None  # no L2 listed
    assert read_l2_per_core(str(tmp_path / "missing")) is None


def test_boards_carry_their_datasheet_l2_and_the_host_its_own():
    assert get_target("raspberry-pi/4b-aarch64").l2_cache_bytes == 256 << 10  # 1 MiB shared by 4
    assert get_target("raspberry-pi/5").l2_cache_bytes == 512 << 10
    assert get_target("raspberry-pi/3b-aarch64").l2_cache_bytes == 128 << 10
    assert get_target("aarch64").l2_cache_bytes is None  # a generic board: unknown
    assert get_target("host").l2_cache_bytes == read_l2_per_core()
    assert get_target("bitfusion").l2_cache_bytes == get_target("host").l2_cache_bytes
    assert get_target("raspberry-pi/5").to_json()["l2_cache_bytes"] == 512 << 10


def test_thresholds_follow_the_l2():
    from apq.kernels.cpu_schedules import CpuScheduleConfig

    base = CpuScheduleConfig(vector_bits=512)
    small = base.with_l2_cache(256 << 10)
    assert (small.fuse_dw_pw_min_bytes, small.fuse_pw_dw_min_bytes, small.fuse_block_bytes) == (
        256 << 10, 256 << 10, 128 << 10)
    assert dataclasses.replace(small, fuse_dw_pw_min_bytes=base.fuse_dw_pw_min_bytes,
                               fuse_pw_dw_min_bytes=base.fuse_pw_dw_min_bytes,
                               fuse_block_bytes=base.fuse_block_bytes) == base  # nothing else changes
    assert base.with_l2_cache(None) == base
    pi4 = get_target("raspberry-pi/4b-aarch64")
    assert CpuScheduleConfig.for_spec(pi4) == CpuScheduleConfig.for_target(pi4.tvm()).with_l2_cache(256 << 10)
    # the defaults are this rule applied to the development host's 2 MiB L2 per core
    assert base.with_l2_cache(2 << 20) == base


def test_a_small_l2_target_merges_blocks_the_default_keeps_apart(tmp_path):
    """The 32 px MobileNetV2 (width 1) for a Pi 4 (256 KiB of L2 per core): its 16 px blocks no
    longer fit, so the build merges them; with the development host's thresholds nothing merges."""
    from apq.kernels.fuse_dw_pw import conv_chain
    from apq.kernels.pipeline import fused_module
    from apq.toolchain.compile import CompileOptions, schedule_config
    from apq.toolchain.examples import mobilenetv2_onnx
    from test_cpu_schedules import _relax_module
    from tvm import tirx

    name = "raspberry-pi/4b-aarch64"
    mod, _, spec = _relax_module(mobilenetv2_onnx(tmp_path / "m.onnx", resolution=32, classes=10), name)
    cfg = schedule_config(spec, CompileOptions(target=name))
    assert cfg.fuse_dw_pw_min_bytes == 256 << 10 and cfg.fuse_block_bytes == 128 << 10

    def merged(c) -> list[tuple[str, ...]]:
        fused = fused_module(mod, spec.tvm(), c)
        chains = [conv_chain(f) for _, f in fused.functions_items() if isinstance(f, tirx.PrimFunc)]
        return [ch for ch in chains if len(ch) > 1]

    assert merged(cfg), "no block merged for a 256 KiB L2"
    assert merged(cfg.with_l2_cache(2 << 20)) == []
    off = schedule_config(spec, CompileOptions(target=name, fuse_blocks=False))
    assert off.fuse_dw_pw_min_bytes == cfg.fuse_dw_pw_min_bytes and off.fuse_blocks is False
    assert merged(off) == []


def test_the_manifest_records_the_schedule_config(tmp_path, mbv2_float):
    from apq.toolchain.artifact import open_artifact
    from apq.toolchain.compile import compile_onnx

    art = open_artifact(compile_onnx(mbv2_float, "host", tmp_path / "m.apq").artifact_path, "host")
    recorded = art.manifest["compile"]["schedule_config"]
    l2 = get_target("host").l2_cache_bytes
    if l2 is None:
        pytest.skip("this machine's sysfs does not list an L2")
    assert recorded["fuse_dw_pw_min_bytes"] == l2 and recorded["fuse_block_bytes"] == l2 // 2


def test_apq_targets_shows_the_l2_per_core(capsys):
    import json

    from apq.toolchain.cli import main

    assert main(["targets"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line and not line[0].isspace()}
    assert "l2/core=256KiB" in lines["raspberry-pi/4b-aarch64"] and "l2/core=?" in lines["aarch64"]
    assert main(["targets", "--json"]) == 0
    listed = {t["name"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed["raspberry-pi/5"]["l2_cache_bytes"] == 512 << 10
