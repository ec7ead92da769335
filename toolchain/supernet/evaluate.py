"""Accuracy of subnets of a trained supernet, and short QAT fine-tuning of an extracted one.

Every accuracy is a measurement: the subnet is extracted as a :class:`StaticNet` (the
network that is exported and compiled), its BN statistics re-calibrated on training
batches, and its top-1 counted on a held-out split. Results name the checkpoint by sha256,
so a figure can always be traced to the weights it came from.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from apq.toolchain.data import LoadedDataset, make_loaders
from apq.toolchain.errors import InvalidInputError
from apq.toolchain.supernet.calibrate import calibrate_clips, recalibrate_bn
from apq.toolchain.supernet.qlayers import StaticNet
from apq.toolchain.supernet.space import SearchSpace, SubnetConfig, parse_bits
from apq.toolchain.supernet.supernet import Supernet, file_sha256
from apq.toolchain.supernet.train import EpochBatches, TrainConfig, resolve_dataset, train_indices

DEFAULT_CALIB_BATCHES = 10
SPLITS = ("val", "test")


@torch.no_grad()
def top1(net: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], progress: bool = False) -> tuple[float, int]:
    """(top-1 accuracy, number of samples) of ``net`` in eval mode over ``loader``."""
    net.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc="eval", disable=not progress, leave=False):
        correct += int((net(x).argmax(1) == y).sum())
        total += int(y.numel())
    if total == 0:
        raise InvalidInputError("evaluation split is empty")
    return correct / total, total


def apply_bits(cfg: SubnetConfig, bits: str | tuple[int | None, int | None] | SubnetConfig) -> SubnetConfig:
    """``cfg``'s architecture with a bit policy: uniform ("W4A4", "float", ``(w, a)``) or per
    block (a :class:`SubnetConfig` with as many blocks, whose bits are taken)."""
    if isinstance(bits, SubnetConfig):
        if len(bits.blocks) != len(cfg.blocks):
            raise InvalidInputError(f"bit policy has {len(bits.blocks)} blocks, subnet has {len(cfg.blocks)}")
        return replace(cfg, blocks=tuple(replace(b, pw_w=p.pw_w, pw_a=p.pw_a, dw_w=p.dw_w, dw_a=p.dw_a)
                                         for b, p in zip(cfg.blocks, bits.blocks)))
    w, a = parse_bits(bits) if isinstance(bits, str) else bits
    return cfg.with_bits(w, a)


class SubnetEvaluator:
    """Loads a checkpoint and its dataset once, then measures many subnets.

    ``eval_subset`` limits validation/test to their first K samples (for cheap accuracy
    samples); ``calib_batches`` training batches (training batch size, no augmentation,
    a fixed shuffled order) re-estimate BN statistics of each subnet.
    """

    def __init__(self, checkpoint: str | Path, data: str | LoadedDataset | None = None, batch_size: int = 256,
                 calib_batches: int = DEFAULT_CALIB_BATCHES, eval_subset: int | None = None,
                 calibrate_act_clips: bool = False, threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.checkpoint = Path(checkpoint)
        self.net, ck = Supernet.from_checkpoint(self.checkpoint)
        self.net.eval()
        self.sha256 = file_sha256(self.checkpoint)
        self.space: SearchSpace = self.net.space
        tc = TrainConfig.from_dict(ck["train_config"]) if "train_config" in ck else TrainConfig(space=self.space)
        self.ds = resolve_dataset(data if data is not None else ck.get("data", "fashion-mnist"))
        self.calib_batches, self.calibrate_act_clips = calib_batches, calibrate_act_clips
        # BN statistics are estimated at the training batch size, on un-augmented training images.
        self._calib = EpochBatches(self.ds, train_indices(self.ds, replace(tc, subset=None)), tc.batch_size, tc.seed,
                                   augment=False, channels_last=False)
        loaders = make_loaders(self.ds, batch_size, val_size=tc.val_size, seed=tc.seed, augment=False,
                               eval_subset=eval_subset)
        self.loaders = {"val": loaders.val, "test": loaders.test}
        self.eval_subset = eval_subset

    def _calib_iter(self) -> Iterable[torch.Tensor]:
        for i in range(min(self.calib_batches, self._calib.steps_per_epoch)):
            yield self._calib.batch(0, i)[0]

    def prepare(self, cfg: SubnetConfig) -> StaticNet:
        """Extract ``cfg`` and re-calibrate it (BN statistics; clips if enabled)."""
        try:
            self.space.validate(cfg)
        except ValueError as e:  # a user-given config/bit policy outside the space: one-line error
            raise InvalidInputError(f"subnet {cfg.to_string()} is not in the search space: {e}") from None
        net = self.net.extract(cfg)
        if self.calibrate_act_clips and any(b is not None for blk in cfg.blocks for b in blk.bits):
            calibrate_clips(net, None, torch.cat(list(self._calib_iter())[:2]))
        recalibrate_bn(net, self._calib_iter(), self.calib_batches)
        return net

    def train_batches(self, steps: int, first_epoch: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``steps`` un-augmented training batches for fine-tuning, from epoch ``first_epoch`` on.

        Why epoch 1 by default: epoch 0's first batches are the BN-calibration batches, so a
        fine-tune sees other images in another order; the test and validation splits are never
        touched (the training split excludes the validation images).
        """
        per_epoch = self._calib.steps_per_epoch
        for i in range(steps):
            yield self._calib.batch(first_epoch + i // per_epoch, i % per_epoch)

    def _measure(self, cfg: SubnetConfig, net: StaticNet, split: str, progress: bool, t0: float) -> dict[str, Any]:
        """The result record of an already prepared (and maybe fine-tuned) ``net``."""
        acc, n = top1(net, self.loaders[split], progress)
        return {"top1": acc, "source": "measured", "split": split, "samples": n, "config": cfg.to_dict(),
                "config_string": cfg.to_string(), "bits": bits_label(cfg), "checkpoint": self.sha256,
                "calib_batches": self.calib_batches, "act_clips_calibrated": self.calibrate_act_clips,
                **net_size(net, self.space.input_shape(1)), "seconds": time.perf_counter() - t0}

    def evaluate_qat(self, cfg: SubnetConfig, steps: int, split: str = "test", lr: float = 0.005,
                     teacher: nn.Module | None = None, progress: bool = False) -> dict[str, Any]:
        """Top-1 of ``cfg`` after :meth:`prepare` and a ``steps``-batch :func:`qat_finetune`.

        Every call extracts fresh weights from the supernet, so fine-tunes never leak into each
        other. The record adds ``weight_change`` (relative L2 change of all conv/linear
        weights), which shows the fine-tune really updated the network.
        """
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; use one of {SPLITS}")
        t0 = time.perf_counter()
        net = self.prepare(cfg)
        before = [layer_weight(m).detach().clone() for _, m in net.quant_layers()]
        qat_finetune(net, self.train_batches(steps), steps, lr=lr, teacher=teacher, progress=progress)
        after = [layer_weight(m).detach() for _, m in net.quant_layers()]
        num = sum(float(((a - b) ** 2).sum()) for a, b in zip(after, before))
        den = sum(float((b ** 2).sum()) for b in before)
        rec = self._measure(cfg, net, split, False, t0)
        rec.update(qat_steps=steps, qat_lr=lr, qat_batch_size=self._calib.batch_size, qat_teacher=teacher is not None,
                   qat_data="training split (validation held out), un-augmented, epochs >= 1",
                   weight_change=(num / den) ** 0.5 if den > 0 else 0.0)
        return rec

    def evaluate(self, cfg: SubnetConfig, split: str = "test", progress: bool = False) -> dict[str, Any]:
        if split not in SPLITS:
            raise InvalidInputError(f"unknown split {split!r}; use one of {SPLITS}")
        t0 = time.perf_counter()
        return self._measure(cfg, self.prepare(cfg), split, progress, t0)


def layer_weight(layer: nn.Module) -> torch.Tensor:
    """The trained weight tensor of a :class:`QConvBNAct` or :class:`QLinear`."""
    return layer.conv.weight if hasattr(layer, "conv") else layer.linear.weight


def net_size(net: StaticNet, input_shape: tuple[int, int, int, int]) -> dict[str, int]:
    """``macs`` (multiply-accumulates per image) and ``params`` of an extracted subnet.

    ``params`` counts what is deployed: conv/linear weights plus one bias per output channel
    (BN folds into it), not BN statistics or activation clips, so it matches the exported model.
    """
    macs = params = 0
    for row, (_, layer) in zip(net.describe(input_shape), net.quant_layers()):
        oh, ow = row["out_hw"]
        per_out = row["in_ch"] // row["groups"] * row["kernel"] ** 2
        macs += oh * ow * row["out_ch"] * per_out
        params += layer_weight(layer).numel() + row["out_ch"]
    return {"macs": int(macs), "params": int(params)}


def bits_label(cfg: SubnetConfig) -> str:
    """"float", "W8A8" for a uniform policy, else "mixed"."""
    ws = {b for blk in cfg.blocks for b in (blk.pw_w, blk.dw_w)}
    as_ = {b for blk in cfg.blocks for b in (blk.pw_a, blk.dw_a)}
    if ws == {None} and as_ == {None}:
        return "float"
    if len(ws) == 1 and len(as_) == 1 and None not in ws | as_:
        return f"W{ws.pop()}A{as_.pop()}"
    return "mixed"


def evaluate_subnet(checkpoint: str | Path, config: SubnetConfig, bits: str | SubnetConfig | None = None,
                    split: str = "test", calib_batches: int = DEFAULT_CALIB_BATCHES,
                    eval_subset: int | None = None, data: str | LoadedDataset | None = None) -> dict[str, Any]:
    """Top-1 of one subnet; ``bits`` (if given) overrides the config's own bit policy."""
    ev = SubnetEvaluator(checkpoint, data, calib_batches=calib_batches, eval_subset=eval_subset)
    cfg = apply_bits(config, bits) if bits is not None else config
    return ev.evaluate(cfg, split)


def resolve_config(space: SearchSpace, config: str) -> SubnetConfig:
    """"largest" / "smallest" / a JSON file / a compact string -> a validated config."""
    if config == "largest":
        return space.largest()
    if config == "smallest":
        return space.smallest()
    p = Path(config)
    try:
        cfg = SubnetConfig.load(p) if p.suffix == ".json" else SubnetConfig.from_string(config)
    except FileNotFoundError:
        raise InvalidInputError(f"subnet config file {p} does not exist") from None
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise InvalidInputError(f"bad subnet config {config!r}: {e}") from None
    try:
        return space.validate(cfg)
    except ValueError as e:
        raise InvalidInputError(f"subnet config {config!r} is not in the search space: {e}") from None


def resolve_bits(bits: str) -> str | SubnetConfig:
    """"W8A8" / "float" stay strings; a path.json is a per-block policy (a SubnetConfig)."""
    if bits.endswith(".json"):
        p = Path(bits)
        if not p.is_file():
            raise InvalidInputError(f"bit policy file {p} does not exist")
        try:
            return SubnetConfig.load(p)
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise InvalidInputError(f"bad bit policy file {p}: {e}") from None
    try:
        parse_bits(bits)
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    return bits


def eval_subnet(checkpoint: Path, config: str = "largest", bits: str = "W8A8", split: str = "test",
                calib_batches: int = DEFAULT_CALIB_BATCHES, eval_subset: int | None = None,
                data: str | None = None) -> dict[str, Any]:
    """The ``apq eval-subnet`` entry point: strings in, a JSON-ready dict out."""
    ev = SubnetEvaluator(checkpoint, data, calib_batches=calib_batches, eval_subset=eval_subset)
    cfg = apply_bits(resolve_config(ev.space, config), resolve_bits(bits))
    return ev.evaluate(cfg, split, progress=True)


def qat_finetune(static_net: StaticNet, train_batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int,
                 lr: float = 0.005, teacher: nn.Module | None = None, kd_ratio: float = 1.0,
                 progress: bool = True) -> StaticNet:
    """A short quantization-aware fine-tune of an extracted subnet with its own bit policy.

    SGD with cosine decay over ``steps`` batches (cycling ``train_batches``); with a
    ``teacher`` (e.g. the supernet's largest float subnet), its logits add a distillation
    term. The net is modified in place and returned in eval mode.
    """
    if steps < 1:
        raise InvalidInputError("qat_finetune needs steps >= 1")
    opt = torch.optim.SGD(static_net.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    if teacher is not None:
        teacher.eval()
    static_net.train()
    it = iter(train_batches)
    for _ in tqdm(range(steps), desc="qat", disable=not progress, leave=False):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(train_batches)
            x, y = next(it)
        logits = static_net(x)
        loss = F.cross_entropy(logits, y)
        if teacher is not None:
            with torch.no_grad():
                t = teacher(x)
            loss = loss + kd_ratio * -(F.softmax(t, 1) * F.log_softmax(logits, 1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return static_net.eval()


def random_spread(ev: SubnetEvaluator, n: int, seed: int = 0, split: str = "test",
                  bits: str | None = None, also_bits: Sequence[str] = (), progress: bool = True) -> list[dict[str, Any]]:
    """Accuracy of ``n`` random subnets (random bit policies unless ``bits`` is given).

    ``also_bits`` (e.g. ``("float",)``) also evaluates each sampled architecture under those
    uniform policies, so quantized and float accuracy are compared on the same architectures;
    every row then carries ``arch`` (the sample index) and ``seed``.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n), desc="random subnets", disable=not progress):
        cfg = ev.space.sample(rng, quantized=True)
        for policy in (bits, *also_bits):
            row = ev.evaluate(apply_bits(cfg, policy) if policy is not None else cfg, split)
            if also_bits:
                row.update(arch=i, seed=seed)
            rows.append(row)
    return rows


__all__ = ["SubnetEvaluator", "evaluate_subnet", "eval_subnet", "qat_finetune", "top1", "apply_bits",
           "resolve_config", "resolve_bits", "bits_label", "random_spread", "net_size", "layer_weight"]
