"""Shared fixtures: example models are built once per session (they are seeded, so cheap to
rebuild, but compiling them is not)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep TVM and onnxruntime from oversubscribing the 2-core CI machine during tests.
os.environ.setdefault("TVM_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("examples")


@pytest.fixture(scope="session")
def mbv2_float(example_dir) -> Path:
    from apq.toolchain.examples import mobilenetv2_onnx

    return mobilenetv2_onnx(example_dir / "mbv2.onnx", resolution=32, width=0.5)


@pytest.fixture(scope="session")
def mbv2_qdq(example_dir, mbv2_float) -> Path:
    from apq.toolchain.examples import quantize_qdq

    return quantize_qdq(mbv2_float, example_dir / "mbv2_qdq.onnx", per_channel=True)


@pytest.fixture(scope="session")
def resnet_float(example_dir) -> Path:
    from apq.toolchain.examples import resnet_onnx

    return resnet_onnx(example_dir / "resnet.onnx", resolution=32)


@pytest.fixture(scope="session")
def mbv2_host_artifact(example_dir, mbv2_float) -> Path:
    from apq.toolchain.compile import compile_onnx

    return compile_onnx(mbv2_float, "host", example_dir / "mbv2_host.apq").artifact_path
