"""Progressive-shrinking training of the elastic, quantization-aware supernet.

Phases (once-for-all, then APQ's quantization-aware stage), each a :class:`PhaseConfig`:

1. ``full``   - the largest subnet alone, float;
2. ``kernel`` - elastic kernel;           3. ``depth`` - + elastic depth;
4. ``width``  - + elastic expand ratio (hidden channels sorted by importance first);
5. ``quant``  - + random bit policies (activation clips calibrated first: 8-bit by percentile,
   each lower bit-width its own clips by MSE, see ``calibrate_bit_clips``).

Elastic phases use the sandwich rule: per step the largest subnet (trained on labels, the
teacher), the smallest and ``random_per_step`` random subnets, whose losses add in-place
distillation from the teacher's logits; one optimiser step per batch.

Resumability: everything random is a pure function of ``(seed, step)`` or ``(seed, epoch)``
(data order, augmentation, sampled subnets), and a checkpoint holds model, optimiser,
scheduler, step counter and the global RNG states. So a run killed at any point and resumed
from its last checkpoint ends with the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from apq.toolchain.data import LoadedDataset, load_dataset, split_train_val
from apq.toolchain.data.transforms import normalize, random_crop_flip
from apq.toolchain.errors import ArtifactError, InvalidInputError
from apq.toolchain.supernet.calibrate import calibrate_bit_clips, calibrate_clips
from apq.toolchain.supernet.space import BlockConfig, SearchSpace, SubnetConfig
from apq.toolchain.supernet.supernet import Supernet

TRAIN_CONFIG_VERSION = 1
STATE_FILE = "train_state.pt"
FINAL_FILE = "supernet.pt"
ELASTIC_DIMS = ("kernel", "depth", "expand", "bits")


@dataclass
class PhaseConfig:
    """One stage of progressive shrinking.

    ``elastic`` names the dimensions sampled in this phase (others stay at their maximum,
    bits stay float unless ``"bits"`` is elastic). ``epochs`` may be fractional.
    """

    name: str
    epochs: float
    lr: float
    elastic: tuple[str, ...] = ()
    sort_channels: bool = False

    def __post_init__(self) -> None:
        self.elastic = tuple(self.elastic)
        bad = set(self.elastic) - set(ELASTIC_DIMS)
        if bad:
            raise InvalidInputError(f"phase {self.name!r}: unknown elastic dimensions {sorted(bad)}; use {ELASTIC_DIMS}")
        if self.epochs < 0 or self.lr <= 0:
            raise InvalidInputError(f"phase {self.name!r}: epochs must be >= 0 and lr > 0")


def default_phases() -> list[PhaseConfig]:
    return [
        PhaseConfig("full", 1.0, 0.1),
        PhaseConfig("kernel", 0.3, 0.03, ("kernel",)),
        PhaseConfig("depth", 0.3, 0.03, ("kernel", "depth")),
        PhaseConfig("width", 0.4, 0.03, ("kernel", "depth", "expand"), sort_channels=True),
        PhaseConfig("quant", 0.6, 0.02, ("kernel", "depth", "expand", "bits")),
    ]


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved beside every checkpoint)."""

    seed: int = 0
    batch_size: int = 128
    phases: list[PhaseConfig] = field(default_factory=default_phases)
    random_per_step: int = 2
    kd_ratio: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 4e-5
    label_smoothing: float = 0.0  # on the largest subnet's hard-label loss only (students learn from its logits)
    grad_clip: float = 1.0  # per student subnet (see _accumulate); 0 = off
    warmup_steps: int = 20
    val_size: int = 5000
    subset: int | None = None
    checkpoint_every: int = 50
    threads: int = 1
    channels_last: bool = True
    calib_samples: int = 512
    space: SearchSpace = field(default_factory=SearchSpace)
    version: int = TRAIN_CONFIG_VERSION

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["space"] = self.space.to_dict()
        d["phases"] = [asdict(p) for p in self.phases]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidInputError(f"unknown train config fields {sorted(unknown)}")
        if "space" in d:
            d["space"] = SearchSpace.from_dict(d["space"])
        if "phases" in d:
            d["phases"] = [PhaseConfig(**p) for p in d["phases"]]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- data


class EpochBatches:
    """Training batches as a pure function of ``(seed, epoch, index)``.

    Why not a DataLoader: its shuffle generator is stateful, so skipping the batches already
    trained on before a resume would need replaying the whole epoch. Here batch ``i`` of
    epoch ``e`` is computed directly (permutation seeded by ``(seed, e)``, augmentation by
    ``(seed, e, i)``).
    """

    def __init__(self, ds: LoadedDataset, train_idx: np.ndarray, batch_size: int, seed: int,
                 augment: bool = True, channels_last: bool = True) -> None:
        if len(train_idx) < batch_size:
            raise InvalidInputError(f"{len(train_idx)} training samples are fewer than one batch of {batch_size}")
        self.ds, self.idx, self.batch_size, self.seed = ds, np.asarray(train_idx), batch_size, seed
        self.augment, self.channels_last = augment, channels_last
        self.steps_per_epoch = len(self.idx) // batch_size  # drop_last: BN needs full batches

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 1, epoch]).permutation(len(self.idx))

    def batch(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self._perm(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        rows = self.idx[pos]
        x = torch.from_numpy(np.take(self.ds.train_images, rows, axis=0))
        if self.augment:
            g = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, 2, epoch, index]).integers(2**62)))
            x = random_crop_flip(x, self.ds.augment, g)
        x = normalize(x, self.ds.mean, self.ds.std)
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        y = torch.from_numpy(np.asarray(self.ds.train_labels[rows], dtype=np.int64))
        return x, y


def resolve_dataset(data: str | LoadedDataset) -> LoadedDataset:
    return data if isinstance(data, LoadedDataset) else load_dataset(data)


def train_indices(ds: LoadedDataset, cfg: TrainConfig) -> np.ndarray:
    """The training split (validation held out by the data package's seeded split), maybe cut."""
    train_idx, _ = split_train_val(ds.num_train, cfg.val_size, cfg.seed)
    return train_idx if cfg.subset is None else train_idx[: cfg.subset]


# --------------------------------------------------------------------------- sampling


def _restrict(space: SearchSpace, phase: PhaseConfig, blk: BlockConfig) -> BlockConfig:
    """Pin the dimensions that are not elastic in ``phase`` to their maximum."""
    return replace(blk,
                   kernel=blk.kernel if "kernel" in phase.elastic else max(space.kernel_choices),
                   expand=blk.expand if "expand" in phase.elastic else max(space.expand_choices))


def sample_for_phase(space: SearchSpace, phase: PhaseConfig, rng: np.random.Generator) -> SubnetConfig:
    """A random subnet where only the phase's elastic dimensions vary."""
    quantized = "bits" in phase.elastic
    if "depth" not in phase.elastic:
        depths = space.largest().depths
        blocks = tuple(space.sample_block(rng, quantized) for _ in range(sum(depths)))
        cfg = SubnetConfig(depths, blocks)
    else:
        cfg = space.sample(rng, quantized)
    return replace(cfg, blocks=tuple(_restrict(space, phase, b) for b in cfg.blocks))


def smallest_for_phase(space: SearchSpace, phase: PhaseConfig) -> SubnetConfig:
    """The smallest subnet the phase can reach (lowest bits only once bits are elastic)."""
    small = space.smallest(bits=min(space.bit_choices) if "bits" in phase.elastic else None)
    depths = small.depths if "depth" in phase.elastic else space.largest().depths
    blk = _restrict(space, phase, small.blocks[0])
    return SubnetConfig(depths, (blk,) * sum(depths))


# --------------------------------------------------------------------------- schedule


class Schedule:
    """Global step -> (phase index, step within phase) and the learning-rate multiplier.

    Per phase: cosine decay from the phase's lr to 1% of it; linear warm-up over the first
    ``warmup_steps`` steps of the run.
    """

    def __init__(self, phases: Sequence[PhaseConfig], steps_per_epoch: int, warmup_steps: int) -> None:
        self.phases = list(phases)
        self.steps = [int(round(p.epochs * steps_per_epoch)) for p in self.phases]
        self.starts = list(np.cumsum([0] + self.steps[:-1]))
        self.total = int(sum(self.steps))
        self.warmup = warmup_steps

    def locate(self, step: int) -> tuple[int, int]:
        for i, (start, n) in enumerate(zip(self.starts, self.steps)):
            if start <= step < start + n:
                return i, step - int(start)
        raise IndexError(step)

    def lr(self, step: int) -> float:
        if step >= self.total:
            return 0.0
        i, k = self.locate(step)
        p, n = self.phases[i], self.steps[i]
        lr = p.lr * (0.01 + 0.99 * 0.5 * (1 + np.cos(np.pi * k / max(n, 1))))
        if step < self.warmup:
            lr *= (step + 1) / self.warmup
        return float(lr)


# --------------------------------------------------------------------------- state


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _make_optimizer(net: Supernet, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov); weight decay on conv/linear weights only, not BN, clips or kernel transforms."""
    decay, no_decay = [], []
    for name, p in net.named_parameters():
        (decay if p.ndim > 1 and "kernel_transforms" not in name else no_decay).append(p)
    return torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=1.0, momentum=cfg.momentum, nesterov=True)


def _soft_ce(logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return -(F.softmax(teacher, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def _phase_start(net: Supernet, phase: PhaseConfig, data: EpochBatches, cfg: TrainConfig) -> None:
    """One-off, deterministic work at a phase boundary (its effect is saved in the weights)."""
    if phase.sort_channels:
        net.sort_channels()
    if "bits" in phase.elastic:
        n = max(1, min(cfg.calib_samples // cfg.batch_size, data.steps_per_epoch))
        xs = torch.cat([data.batch(0, i)[0] for i in range(n)])
        calibrate_clips(net, net.space.largest(), xs)  # 8-bit clips (and the fixed layers): percentile
        calibrate_bit_clips(net, xs)  # each low bit-width its own MSE-optimal clips (2-bit needs them)


def _accumulate(params: list[torch.nn.Parameter], loss: torch.Tensor, clip: float) -> float:
    """Add ``loss``'s gradient to ``.grad``, its norm clipped to ``clip`` first (0 = no clip).

    Why per subnet: a deep 2-bit subnet's gradient (BN normalising near-constant quantized
    outputs) measured 30-40x the float one's; summed unclipped it overwrites the shared
    weights and the float teacher collapsed within a few steps. Clipping each subnet's
    share keeps every member of the sandwich from dominating the update.
    """
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = float(torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads if g is not None)))
    if not np.isfinite(norm):  # an overflowing subnet contributes nothing rather than NaNs
        return norm
    scale = min(1.0, clip / (norm + 1e-6)) if clip > 0 else 1.0
    for p, g in zip(params, grads):
        if g is None:
            continue
        if p.grad is None:
            p.grad = g * scale
        else:
            p.grad.add_(g, alpha=scale)
    return norm


def train_step(net: Supernet, phase: PhaseConfig, x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator,
               cfg: TrainConfig) -> dict[str, float]:
    """Sandwich step: the teacher's gradient plus the (norm-clipped) gradients of the smallest
    and random subnets, accumulated in ``.grad`` for one optimiser step."""
    space = net.space
    params = [p for p in net.parameters() if p.requires_grad]
    net.set_active(space.largest(bits=None))
    logits = net(x)
    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
    out = {"loss": loss.item(), "acc": (logits.argmax(1) == y).float().mean().item(),
           "grad_norm": _accumulate(params, loss, 0.0)}  # the float teacher is never clipped
    if not phase.elastic:
        return out
    teacher = logits.detach()
    students = [smallest_for_phase(space, phase)]
    students += [sample_for_phase(space, phase, rng) for _ in range(cfg.random_per_step)]
    norms = []
    for sub in students:
        net.set_active(sub)
        s_logits = net(x)
        s_loss = F.cross_entropy(s_logits, y) + cfg.kd_ratio * _soft_ce(s_logits, teacher)
        norms.append(_accumulate(params, s_loss, cfg.grad_clip))
    out["student_loss"] = s_loss.item()
    out["student_grad_norm_max"] = max(norms)
    return out


def train_supernet(data: str | LoadedDataset, out: Path, config: TrainConfig | None = None, resume: bool = True,
                   halt_after: int | None = None, progress: bool = True) -> Path:
    """Train (or resume) a supernet into the directory ``out``; returns the final checkpoint.

    ``out/train_state.pt`` is the resumable state (every ``checkpoint_every`` steps);
    ``out/supernet.pt`` the weights-only result (space, weights, config, wall time).
    ``halt_after`` stops the run after that global step without saving, as a kill would
    (a test hook for resumption).
    """
    cfg = config or TrainConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    ds = resolve_dataset(data)
    data_name = data if isinstance(data, str) else ds.spec.to_string()
    space = cfg.space
    if (ds.channels, ds.image_shape[0], ds.num_classes) != (space.in_channels, space.image_size, space.num_classes):
        raise InvalidInputError(
            f"dataset {ds.name} has {ds.channels} channels, {ds.image_shape[0]} px, {ds.num_classes} classes but the "
            f"search space expects {space.in_channels}, {space.image_size}, {space.num_classes}")
    batches = EpochBatches(ds, train_indices(ds, cfg), cfg.batch_size, cfg.seed, channels_last=cfg.channels_last)
    sched = Schedule(cfg.phases, batches.steps_per_epoch, cfg.warmup_steps)

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    net = Supernet(space)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = _make_optimizer(net, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr)
    step, wall = 0, 0.0
    state_path = out / STATE_FILE
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        if st.get("config") != cfg.to_dict():
            raise ArtifactError(f"{state_path} was written by a different training config; use a new --out or --no-resume")
        net.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
        step, wall = int(st["step"]), float(st["wall_time_s"])
    (out / "train_config.json").write_text(cfg.to_json())

    def save_state() -> None:
        _atomic_save({"config": cfg.to_dict(), "model": net.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": scheduler.state_dict(), "rng": _rng_state(), "step": step,
                      "wall_time_s": wall + time.perf_counter() - t0}, state_path)

    t0 = time.perf_counter()
    net.train()
    bar = tqdm(total=sched.total, initial=step, desc="supernet", disable=not progress, dynamic_ncols=True)
    log = open(out / "log.jsonl", "a")
    try:
        while step < sched.total:
            pi, k = sched.locate(step)
            phase = cfg.phases[pi]
            if k == 0:
                _phase_start(net, phase, batches, cfg)
            epoch, index = divmod(step, batches.steps_per_epoch)
            x, y = batches.batch(epoch, index)
            opt.zero_grad(set_to_none=True)
            stats = train_step(net, phase, x, y, np.random.default_rng([cfg.seed, 3, step]), cfg)
            opt.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(phase=phase.name, loss=f"{stats['loss']:.3f}", acc=f"{stats['acc']:.2f}")
            log.write(json.dumps({"step": step, "phase": phase.name, "lr": sched.lr(step - 1), **stats}) + "\n")
            if halt_after is not None and step >= halt_after:
                return state_path
            if step % cfg.checkpoint_every == 0 or step == sched.total:
                save_state()
    finally:
        bar.close()
        log.close()
    wall_total = wall + time.perf_counter() - t0
    final = out / FINAL_FILE
    net = net.to(memory_format=torch.contiguous_format)
    _atomic_save(net.checkpoint_dict(train_config=cfg.to_dict(), data=data_name, seed=cfg.seed, val_size=cfg.val_size,
                                     steps=sched.total, wall_time_s=wall_total), final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m apq.toolchain.supernet.train --data fashion-mnist --out DIR [--config cfg.json]``."""
    import argparse

    ap = argparse.ArgumentParser(description="train the elastic quantization-aware supernet")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", type=Path, help="TrainConfig JSON (default: TrainConfig())")
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args(argv)
    cfg = TrainConfig.from_json(args.config.read_text()) if args.config else TrainConfig()
    print(train_supernet(args.data, args.out, cfg, resume=not args.no_resume))
    return 0


__all__ = ["PhaseConfig", "TrainConfig", "default_phases", "EpochBatches", "Schedule", "train_supernet",
           "train_step", "sample_for_phase", "smallest_for_phase", "resolve_dataset", "train_indices"]


if __name__ == "__main__":
    raise SystemExit(main())
