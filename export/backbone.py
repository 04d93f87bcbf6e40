"""Build a frozen backbone as an ordered list of stages, so it can be split into trunk and tail.

A backbone here is ``stages[0] -> ... -> stages[-1] -> global average pool``.  The
trunk is every stage but the last ``tail_blocks``; the tail is the rest plus the pool.
Both the ONNX export and the on-device BB trainer use this one definition, so the
split point means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import math

import torch
import torch.nn.functional as F
from torch import nn

from skill_edge.models import BackboneSpec, get_spec

from .weights import load_weights


class GlobalPool(nn.Module):
    """Global average pool to ``[N, C]`` (written out so ONNX gets one ReduceMean)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def _efficientnet_stages(m: nn.Module) -> list[nn.Module]:
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2)]


def _xception_stages(m: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.conv2, m.bn2, m.act2)
    blocks = [getattr(m, f"block{i}") for i in range(1, 13)]
    exit_flow = nn.Sequential(m.conv3, m.bn3, m.act3, m.conv4, m.bn4, m.act4)
    return [stem, *blocks, exit_flow]


class StaticSamePadConv2d(nn.Conv2d):
    """TF "same" padding fixed for one input size (the ROM's), so the graph has no shape arithmetic.

    timm's ``Conv2dSame`` computes its padding from the input shape on every call; for a
    ROM whose input size never changes that is wasted work and clutters the ONNX graph.
    Parameter names stay those of ``nn.Conv2d``, so state dicts are unchanged.
    """

    static_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(F.pad(x, self.static_pad), self.weight, self.bias)


def freeze_same_padding(model: nn.Module, input_size: int) -> None:
    """Replace every ``Conv2dSame`` by a ``StaticSamePadConv2d`` with the pads seen at ``input_size``."""
    from timm.layers.conv2d_same import Conv2dSame, pad_same_arg  # noqa: F401 - import checks timm layout

    targets = [m for m in model.modules() if isinstance(m, Conv2dSame)]
    if not targets:
        return
    seen: dict[int, tuple[int, int, int, int]] = {}

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        ih, iw = inputs[0].shape[-2:]
        kh, kw = mod.weight.shape[-2:]
        sh, sw = mod.stride
        dh, dw = mod.dilation
        ph = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        seen[id(mod)] = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)

    handles = [m.register_forward_pre_hook(hook) for m in targets]
    with torch.no_grad():
        model(torch.zeros(1, 3, input_size, input_size))
    for h in handles:
        h.remove()
    for m in targets:
        m.__class__ = StaticSamePadConv2d
        m.static_pad = seen[id(m)]


def stages_of(model: nn.Module, arch: str) -> list[nn.Module]:
    if arch.startswith("tf_efficientnet") or arch.startswith("efficientnet"):
        return _efficientnet_stages(model)
    if arch == "legacy_xception":
        return _xception_stages(model)
    raise ValueError(f"no stage definition for timm architecture {arch!r}")


@dataclass
class Backbone:
    """A frozen backbone split into stages, with the weights it was built from."""

    spec: BackboneSpec
    classifier_model: nn.Module  # the full timm model, ImageNet classifier included
    stages: list[nn.Module]
    weights_source: str

    def trunk(self, tail_blocks: int | None = None) -> nn.Sequential:
        k = self.spec.tail_blocks if tail_blocks is None else tail_blocks
        return nn.Sequential(*self.stages[: len(self.stages) - k]).eval()

    def tail(self, tail_blocks: int | None = None) -> nn.Sequential:
        k = self.spec.tail_blocks if tail_blocks is None else tail_blocks
        return nn.Sequential(*self.stages[len(self.stages) - k :], GlobalPool()).eval()

    def features(self) -> nn.Sequential:
        return nn.Sequential(*self.stages, GlobalPool()).eval()


def build_backbone(name: str, weights: str | Path | None = None, *, random_init: bool = False) -> Backbone:
    """Create the timm model for ``name`` and load its weights (strictly).

    ``random_init=True`` skips weights entirely; it exists for timing benchmarks and
    tests of graph plumbing, never for a shipped ROM.
    """
    import timm

    spec = get_spec(name)
    model = timm.create_model(spec.timm_arch, pretrained=False)
    source = "random-init" if random_init else load_weights(spec, model, weights)
    model.eval()
    freeze_same_padding(model, spec.input_size)
    for p in model.parameters():
        p.requires_grad_(False)
    return Backbone(spec=spec, classifier_model=model, stages=stages_of(model, spec.timm_arch), weights_source=source)
