"""Small, seeded example CNNs as ONNX (MobileNetV2- and ResNet-style), float and QDQ int8.

Why they exist: the compile path, the benchmarks and the tests need realistic models without
downloads. They are built directly with onnx.helper (BatchNorm already folded, as exporters
emit for inference) and quantized with onnxruntime's own ``quantize_static`` so the QDQ
files are exactly what users get from the standard tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class _GraphBuilder:
    rng: np.random.Generator
    nodes: list
    inits: list
    n: int = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, prefix: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        nm = self.name(prefix)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float32), nm))
        return nm

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1,
             act: str | None = "relu6") -> str:
        from onnx import helper

        fan_in = cin // groups * k * k
        w = self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        b = self.rng.standard_normal(cout) * 0.05
        y = self.name("conv")
        self.nodes.append(helper.make_node(
            "Conv", [x, self.const("w", w), self.const("b", b)], [y], kernel_shape=[k, k],
            strides=[stride, stride], pads=[k // 2] * 4, group=groups, name=y))
        return self.act(y, act)

    def act(self, x: str, act: str | None) -> str:
        from onnx import helper

        if act is None:
            return x
        y = self.name(act)
        if act == "relu6":
            self.nodes.append(helper.make_node("Clip", [x, self.const("lo", np.array(0.0)),
                                                        self.const("hi", np.array(6.0))], [y], name=y))
        else:
            self.nodes.append(helper.make_node("Relu", [x], [y], name=y))
        return y

    def add(self, a: str, b: str) -> str:
        from onnx import helper

        y = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [y], name=y))
        return y

    def head(self, x: str, cin: int, classes: int) -> str:
        from onnx import helper

        p, f = self.name("gap"), self.name("flat")
        self.nodes.append(helper.make_node("GlobalAveragePool", [x], [p], name=p))
        self.nodes.append(helper.make_node("Flatten", [p], [f], axis=1, name=f))
        w = self.rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin)
        self.nodes.append(helper.make_node("Gemm", [f, self.const("fc_w", w), self.const("fc_b", np.zeros(classes))],
                                           ["logits"], transB=1, name="classifier"))
        return "logits"


# (expand ratio, out channels, repeats, stride) per stage, MobileNetV2's table scaled down.
MBV2_STAGES = [(1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2), (4, 96, 1, 1)]


def mobilenetv2_onnx(path: str | Path, resolution: int = 32, channels: int = 3, classes: int = 10,
                     width: float = 1.0, seed: int = 0) -> Path:
    """A MobileNetV2-style float model (inverted residuals, depthwise 3x3, ReLU6)."""
    g = _GraphBuilder(np.random.default_rng(seed), [], [])
    c = int(32 * width)
    x = g.conv("input", channels, c, 3, stride=1 if resolution <= 64 else 2)
    for t, cout, n, s in MBV2_STAGES:
        cout = int(cout * width)
        for i in range(n):
            stride = s if i == 0 else 1
            mid = c * t
            y = g.conv(x, c, mid, 1) if t != 1 else x
            y = g.conv(y, mid, mid, 3, stride, groups=mid)
            y = g.conv(y, mid, cout, 1, act=None)
            x = g.add(x, y) if stride == 1 and c == cout else y
            c = cout
    x = g.conv(x, c, 320, 1)
    g.head(x, 320, classes)
    return _save(g, path, "apq-example-mobilenetv2", channels, resolution, classes)


def resnet_onnx(path: str | Path, resolution: int = 32, channels: int = 3, classes: int = 10,
                seed: int = 0) -> Path:
    """A small ResNet-style float model (basic blocks, 1x1 projection shortcuts)."""
    g = _GraphBuilder(np.random.default_rng(seed), [], [])
    x, c = g.conv("input", channels, 16, 3, act="relu"), 16
    for cout, stride in [(16, 1), (32, 2), (64, 2)]:
        y = g.conv(x, c, cout, 3, stride, act="relu")
        y = g.conv(y, cout, cout, 3, act=None)
        sc = x if stride == 1 and c == cout else g.conv(x, c, cout, 1, stride, act=None)
        x, c = g.act(g.add(sc, y), "relu"), cout
    g.head(x, c, classes)
    return _save(g, path, "apq-example-resnet", channels, resolution, classes)


def _save(g: _GraphBuilder, path, name: str, channels: int, resolution: int, classes: int) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        g.nodes, name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, channels, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, classes])], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="apq")
    model.ir_version = 8
    onnx.checker.check_model(model)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(p))
    return p


def quantize_qdq(float_path: str | Path, out_path: str | Path, per_channel: bool = True,
                 activation_type: str = "QUInt8", calib_samples: int = 8, seed: int = 0) -> Path:
    """int8 QDQ version of a float model via onnxruntime.quantization.quantize_static."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(float_path))
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{inp.name: rng.standard_normal(shape).astype(np.float32)}
                             for _ in range(calib_samples)])

        def get_next(self):
            return next(self._it, None)

    quantize_static(str(float_path), str(out_path), _Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=getattr(QuantType, activation_type),
                    weight_type=QuantType.QInt8)
    return Path(out_path)
