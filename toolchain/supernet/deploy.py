"""From a trained supernet to a deployable ONNX file: extract -> calibrate -> (QAT) -> QDQ export.

This is the bridge between the supernet stage and apq-compile: the exported file uses apq's
QDQ convention (docs/qdq_convention.md), so the compiler lowers each layer to the integer or
bit-serial kernel its bit-widths call for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import apq
from apq.toolchain.errors import InvalidInputError

#: The small Fashion-MNIST supernet checked into the repository (trained by apq's own code;
#: its training command, seed and figures are in the JSON beside it).
DEFAULT_CHECKPOINT = Path(apq.__file__).resolve().parent / "checkpoints" / "fmnist_supernet.pt"


def default_checkpoint() -> Path:
    if not DEFAULT_CHECKPOINT.is_file():
        raise InvalidInputError(f"no checked-in supernet checkpoint at {DEFAULT_CHECKPOINT}; "
                                "train one with `apq train-supernet` and pass --checkpoint")
    return DEFAULT_CHECKPOINT


@dataclass
class ExportedSubnet:
    onnx: str
    config: str
    bits: str
    input_shape: list[int]
    qat_steps: int
    top1: float | None  # measured on `split` (None when not evaluated)
    split: str | None
    checkpoint_sha256: str
    qdq_format: str = "apq"  # apq.toolchain.supernet.export.QDQ_FORMATS key

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["top1_source"] = "measured" if self.top1 is not None else None
        return d


def export_subnet(out_path: str | Path, checkpoint: str | Path | None = None, config: str = "largest",
                  bits: str = "W8A8", qat_steps: int = 0, evaluate_split: str | None = "test",
                  eval_subset: int | None = 2000, data: str | None = None,
                  qdq_format: str = "apq") -> ExportedSubnet:
    """Extract ``config`` with ``bits`` from the supernet, calibrate, optionally QAT, export QDQ ONNX.

    ``qdq_format``: ``"apq"`` (8-bit containers, the default) or ``"onnx-int4"`` (opset-21
    INT4/UINT4 tensors for <= 4-bit layers); apq-compile reads both to the same kernels.
    """
    import torch

    from apq.toolchain.supernet.evaluate import (SubnetEvaluator, apply_bits, bits_label, qat_finetune,
                                                 resolve_bits, resolve_config, top1)
    from apq.toolchain.supernet.export import export_onnx, get_qdq_format

    get_qdq_format(qdq_format)  # fail before the expensive steps
    ck = Path(checkpoint) if checkpoint else default_checkpoint()
    ev = SubnetEvaluator(ck, data, eval_subset=eval_subset)
    cfg = apply_bits(resolve_config(ev.space, config), resolve_bits(bits))
    net = ev.prepare(cfg)
    if qat_steps > 0:
        net = qat_finetune(net, ev.train_batches(qat_steps), qat_steps)
    net.eval()
    acc = None
    if evaluate_split:
        with torch.no_grad():
            acc, _ = top1(net, ev.loaders[evaluate_split])
    shape = tuple(ev.space.input_shape(1)) if hasattr(ev.space, "input_shape") else \
        (1, ev.space.in_channels, ev.space.image_size, ev.space.image_size)
    quantized = bits_label(cfg) != "float"
    out = export_onnx(net, out_path, shape, quantized=quantized, qdq_format=qdq_format)
    return ExportedSubnet(str(out), cfg.to_string(), bits_label(cfg), list(shape), qat_steps, acc,
                          evaluate_split, ev.sha256, qdq_format)


def export_demo_subnet(out_dir: Path, seed: int = 0) -> dict[str, Any] | None:
    """The demo's model: a mixed-precision subnet of the checked-in supernet, or None when the
    checkpoint or the dataset is not installed (the demo then falls back to an example model)."""
    if not DEFAULT_CHECKPOINT.is_file():
        return None
    res = export_subnet(out_dir / "model.onnx", DEFAULT_CHECKPOINT, config="largest", bits="W4A4",
                        evaluate_split="test", eval_subset=2000)
    info = res.to_json()
    info["description"] = (f"subnet {res.config} of the checked-in Fashion-MNIST supernet, {res.bits}, "
                      f"top-1 {100 * res.top1:.2f}% on {res.split} (first 2000)")
    (out_dir / "subnet.json").write_text(json.dumps(info, indent=2))
    return info
