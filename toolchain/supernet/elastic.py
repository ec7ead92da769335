"""Weight-sharing (elastic) layers: one weight tensor per layer, sliced per subnet.

Why the forward runs through a static :class:`QConvBNAct` "template" with
``torch.func.functional_call``: the static layer is the single definition of the quantized
conv semantics (input quantizer, fake-quant weights, BN folded in eval mode). Feeding it the
*sliced* shared tensors makes the supernet forward of a subnet and the forward of the
extracted :class:`StaticNet` the same code on the same tensors, so they agree exactly, and a
change to the quantizer in ``qlayers`` can never make them drift apart.

Elastic dimensions, as in once-for-all:

* width: the first ``n`` output channels (channels are kept sorted by importance, see
  :meth:`DynamicBlock.sort_channels`);
* kernel: the centre of the largest kernel, passed through a learned linear transform per
  step down (7 -> 5 -> 3), initialised to the identity, shared by all channels of the layer.

Activation clips are per bit-width (``bit_clips``): the best clip of a 2-bit grid is far
smaller than an 8-bit one (with one shared clip calibrated for 8 bits, a 2-bit signed grid
rounds ~all activations to zero, BN then normalises a near-constant tensor and the gradient
explodes). An extracted layer has one bit-width, so it gets exactly one of these clips.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from apq.toolchain.supernet.qlayers import ActQuant, InvertedResidual, QConvBNAct
from apq.toolchain.supernet.space import BlockConfig


class DynamicConvBNAct(nn.Module):
    """An elastic conv + BN + ReLU6 with an input quantizer; see :class:`QConvBNAct`.

    ``depthwise`` layers have one input channel per group (the active width sets both the
    channel count and the group count).
    """

    def __init__(
        self,
        max_in: int,
        max_out: int,
        kernel_choices: tuple[int, ...],
        stride: int = 1,
        depthwise: bool = False,
        relu6: bool = True,
        in_signed: bool = False,
        clip_bits: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if depthwise and max_in != max_out:
            raise ValueError("a depthwise layer needs max_in == max_out")
        self.max_in, self.max_out = max_in, max_out
        self.kernel_choices = tuple(sorted(kernel_choices))
        self.max_kernel = self.kernel_choices[-1]
        self.stride, self.depthwise, self.relu6 = stride, depthwise, relu6
        k = self.max_kernel
        self.weight = nn.Parameter(torch.empty(max_out, 1 if depthwise else max_in, k, k))
        nn.init.kaiming_normal_(self.weight, mode="fan_out")
        self.bn = nn.BatchNorm2d(max_out)
        self.act_quant = ActQuant(signed=in_signed)
        # Own clips for the low bit-widths; other bit-widths (8) use act_quant.clip.
        self.bit_clips = nn.ParameterDict({f"a{b}": nn.Parameter(torch.tensor(6.0)) for b in sorted(set(clip_bits))})
        # One transform per step down, applied to the flattened centre (OFA's kernel transform).
        self.kernel_transforms = nn.ParameterDict({
            f"{big}to{small}": nn.Parameter(torch.eye(small * small))
            for big, small in zip(self.kernel_choices[::-1], self.kernel_choices[::-1][1:])
        })
        self._templates: dict[tuple[int, int, int], QConvBNAct] = {}
        self._register_load_state_dict_pre_hook(self._fill_missing_bit_clips)

    def _fill_missing_bit_clips(self, state_dict: dict, prefix: str, *args: object) -> None:
        """Checkpoints from before per-bit clips: every bit-width starts from the shared clip,
        which reproduces exactly what such a checkpoint computed."""
        shared = state_dict.get(prefix + "act_quant.clip")
        for key in self.bit_clips:
            name = prefix + "bit_clips." + key
            if name not in state_dict and shared is not None:
                state_dict[name] = shared.clone()

    def clip_param(self, a_bits: int | None) -> nn.Parameter:
        """The learned clip that quantizes this layer's input at ``a_bits``."""
        key = f"a{a_bits}"
        return self.bit_clips[key] if key in self.bit_clips else self.act_quant.clip

    # ------------------------------------------------------------------ active tensors
    def active_weight(self, out_ch: int, in_ch: int, kernel: int) -> Tensor:
        """The shared weight sliced to ``out_ch x in_ch`` and transformed down to ``kernel``."""
        if kernel not in self.kernel_choices:
            raise ValueError(f"kernel {kernel} not in this layer's choices {self.kernel_choices}")
        w = self.weight[:out_ch] if self.depthwise else self.weight[:out_ch, :in_ch]
        size = self.max_kernel
        for small in reversed(self.kernel_choices[:-1]):  # step down one choice at a time
            if small < kernel:
                break
            start = (size - small) // 2
            centre = w[:, :, start:start + small, start:start + small].reshape(-1, small * small)
            w = (centre @ self.kernel_transforms[f"{size}to{small}"].t()).reshape(w.shape[0], w.shape[1], small, small)
            size = small
        return w

    def active_state(self, in_ch: int, out_ch: int, kernel: int, a_bits: int | None = None) -> dict[str, Tensor]:
        """Parameters and buffers of the equivalent :class:`QConvBNAct`, by its state-dict names
        (the activation clip is the one for ``a_bits``)."""
        bn = self.bn
        state = {
            "conv.weight": self.active_weight(out_ch, in_ch, kernel),
            "bn.weight": bn.weight[:out_ch],
            "bn.bias": bn.bias[:out_ch],
            "bn.running_mean": bn.running_mean[:out_ch],
            "bn.running_var": bn.running_var[:out_ch],
            "bn.num_batches_tracked": bn.num_batches_tracked,
        }
        for name, t in self.act_quant.state_dict(keep_vars=True).items():
            state[f"act_quant.{name}"] = t
        state["act_quant.clip"] = self.clip_param(a_bits)
        return state

    def _template(self, in_ch: int, out_ch: int, kernel: int) -> QConvBNAct:
        key = (in_ch, out_ch, kernel)
        t = self._templates.get(key)
        if t is None:
            t = self._new_static(in_ch, out_ch, kernel, None, None)
            t.conv.weight.requires_grad_(False)
            self._templates[key] = t
        return t

    def _new_static(self, in_ch: int, out_ch: int, kernel: int, w_bits: int | None, a_bits: int | None) -> QConvBNAct:
        groups = out_ch if self.depthwise else 1
        return QConvBNAct(in_ch, out_ch, kernel, self.stride, groups, self.relu6, w_bits, a_bits,
                          in_signed=self.act_quant.signed)

    def forward(self, x: Tensor, out_ch: int, kernel: int, w_bits: int | None, a_bits: int | None) -> Tensor:
        in_ch = x.shape[1]
        if self.depthwise and out_ch != in_ch:
            raise ValueError(f"depthwise layer got {in_ch} input channels for {out_ch} outputs")
        t = self._template(in_ch, out_ch, kernel)
        t.w_bits, t.a_bits = w_bits, a_bits
        t.train(self.training)
        bn = self.bn
        t.bn.momentum, t.bn.eps = bn.momentum, bn.eps
        return functional_call(t, self.active_state(in_ch, out_ch, kernel, a_bits), (x,))

    @torch.no_grad()
    def extract(self, in_ch: int, out_ch: int, kernel: int, w_bits: int | None, a_bits: int | None) -> QConvBNAct:
        """A standalone :class:`QConvBNAct` holding copies of the active tensors."""
        layer = self._new_static(in_ch, out_ch, kernel, w_bits, a_bits)
        layer.bn.momentum, layer.bn.eps = self.bn.momentum, self.bn.eps
        state = self.active_state(in_ch, out_ch, kernel, a_bits)
        layer.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return layer.train(self.training)

    def extra_repr(self) -> str:
        return (f"max_in={self.max_in}, max_out={self.max_out}, kernels={self.kernel_choices}, "
                f"stride={self.stride}, depthwise={self.depthwise}, relu6={self.relu6}")


class DynamicBlock(nn.Module):
    """An elastic inverted-residual block (expand 1x1 -> depthwise kxk -> project 1x1)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, kernel_choices: tuple[int, ...],
                 expand_choices: tuple[int, ...], clip_bits: tuple[int, ...] = ()) -> None:
        super().__init__()
        if min(expand_choices) < 2:
            raise ValueError("expand ratios must be >= 2 (an expand-1 block has no expand conv to share)")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
        max_mid = in_ch * max(expand_choices)
        cb = tuple(clip_bits)
        self.expand = DynamicConvBNAct(in_ch, max_mid, (1,), 1, relu6=True, in_signed=True, clip_bits=cb)
        self.depthwise = DynamicConvBNAct(max_mid, max_mid, kernel_choices, stride, depthwise=True, relu6=True,
                                          clip_bits=cb)
        self.project = DynamicConvBNAct(max_mid, out_ch, (1,), 1, relu6=False, in_signed=False, clip_bits=cb)
        self.use_residual = stride == 1 and in_ch == out_ch

    def mid(self, cfg: BlockConfig) -> int:
        return self.in_ch * cfg.expand

    def forward(self, x: Tensor, cfg: BlockConfig) -> Tensor:
        mid = self.mid(cfg)
        y = self.expand(x, mid, 1, cfg.pw_w, cfg.pw_a)
        y = self.depthwise(y, mid, cfg.kernel, cfg.dw_w, cfg.dw_a)
        y = self.project(y, self.out_ch, 1, cfg.pw_w, cfg.pw_a)
        return x + y if self.use_residual else y

    @torch.no_grad()
    def extract(self, cfg: BlockConfig) -> InvertedResidual:
        mid = self.mid(cfg)
        block = InvertedResidual(self.in_ch, mid, self.out_ch, cfg.kernel, self.stride,
                                 cfg.pw_w, cfg.pw_a, cfg.dw_w, cfg.dw_a)
        if block.expand is None or block.use_residual != self.use_residual:
            raise RuntimeError("qlayers.InvertedResidual no longer matches DynamicBlock's structure")
        block.expand = self.expand.extract(self.in_ch, mid, 1, cfg.pw_w, cfg.pw_a)
        block.depthwise = self.depthwise.extract(mid, mid, cfg.kernel, cfg.dw_w, cfg.dw_a)
        block.project = self.project.extract(mid, self.out_ch, 1, cfg.pw_w, cfg.pw_a)
        return block.train(self.training)

    @torch.no_grad()
    def sort_channels(self) -> Tensor:
        """Reorder the hidden channels by importance (L1 norm of their projection weights).

        Why: elastic width keeps the *first* n hidden channels, so the most important ones
        must come first before width becomes elastic (once-for-all's channel sorting). The
        permutation is applied consistently to the expand outputs, the depthwise channels and
        the projection inputs, so the largest subnet computes exactly the same function.
        Returns the permutation.
        """
        importance = self.project.weight.abs().sum(dim=(0, 2, 3))
        order = torch.argsort(importance, descending=True, stable=True)
        for layer in (self.expand, self.depthwise):
            layer.weight.copy_(layer.weight[order])
            for t in (layer.bn.weight, layer.bn.bias, layer.bn.running_mean, layer.bn.running_var):
                t.copy_(t[order])
        self.project.weight.copy_(self.project.weight[:, order])
        return order


__all__ = ["DynamicConvBNAct", "DynamicBlock"]
