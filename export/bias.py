"""Beneficial biases (paper eq. 1-2) as per-sample inputs of a frozen backbone.

Eq. 1 adds a learnable bias ``B`` to every conv output.  Every conv in our backbones
feeds a BatchNorm (or, inside a separable conv, a pointwise conv that feeds one), so
``BN(conv(x) + B) = BN(conv(x)) + gamma / sqrt(var + eps) * B``: the bias is exactly an
additive per-channel bias after the BN (derivation in docs/BENEFICIAL_BIASES.md).  We
therefore insert one bias slot after every BN, before its activation, and feed all
slots from one ``bb[N, B]`` tensor, so different rows of a batch can carry different
tasks' biases and ``bb = 0`` is the plain backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class BiasSlot:
    layer: str  # the BN module's path inside the stage list, e.g. "7.0.bn3"
    channels: int
    offset: int


@dataclass(frozen=True)
class BiasLayout:
    """The ordered bias slots of a (sub)network; ``total`` is the paper's B."""

    slots: tuple[BiasSlot, ...]

    @property
    def total(self) -> int:
        return sum(s.channels for s in self.slots)

    def to_list(self) -> list[list]:
        return [[s.layer, s.channels] for s in self.slots]

    @classmethod
    def from_list(cls, items: list) -> "BiasLayout":
        slots, off = [], 0
        for layer, ch in items:
            slots.append(BiasSlot(str(layer), int(ch), off))
            off += int(ch)
        return cls(tuple(slots))

    def suffix(self, n_tail: int) -> "BiasLayout":
        """The layout of the last ``n_tail`` bias values, re-based at offset 0."""
        start = self.total - n_tail
        return BiasLayout.from_list([[s.layer, s.channels] for s in self.slots if s.offset >= start])


class _Bus:
    """Holds the current ``bb`` tensor while a forward pass runs (tracing-friendly)."""

    def __init__(self) -> None:
        self.bb: torch.Tensor | None = None


class BiasedNorm(nn.Module):
    """A frozen BN (optionally timm's fused BN+act) followed by a per-sample bias slice."""

    def __init__(self, norm: nn.Module, bus: _Bus, offset: int, channels: int) -> None:
        super().__init__()
        self.norm, self.bus, self.offset, self.channels = norm, bus, offset, channels
        # timm's BatchNormAct2d = BN -> drop -> act; the bias must go between BN and act.
        self.fused_act = hasattr(norm, "act") and hasattr(norm, "drop")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        if self.fused_act:
            y = F.batch_norm(x, n.running_mean, n.running_var, n.weight, n.bias, False, 0.0, n.eps)
        else:
            y = n(x)
        bb = self.bus.bb
        if bb is not None:
            y = y + bb[:, self.offset : self.offset + self.channels].unsqueeze(-1).unsqueeze(-1)
        if self.fused_act:
            y = n.act(n.drop(y))
        return y


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.BatchNorm2d)  # timm's BatchNormAct2d subclasses BatchNorm2d


class BiasedStages(nn.Module):
    """Wraps a sequence of frozen stages so ``forward(x, bb)`` adds ``bb`` after every BN.

    The wrapped stages are modified in place (BNs replaced by ``BiasedNorm``); build a
    fresh backbone for each wrapper.
    """

    def __init__(self, stages: list[nn.Module], pool: nn.Module | None = None, first_stage: int = 0) -> None:
        super().__init__()
        self.body = nn.Sequential(*stages)
        self.pool = pool
        self.bus = _Bus()
        slots: list[BiasSlot] = []
        offset = 0
        for name, parent in list(self.body.named_modules()):
            for child_name, child in list(parent.named_children()):
                if _is_bn(child):
                    path = _global_path(f"{name}.{child_name}" if name else child_name, first_stage)
                    slots.append(BiasSlot(path, child.num_features, offset))
                    setattr(parent, child_name, BiasedNorm(child, self.bus, offset, child.num_features))
                    offset += child.num_features
        self.layout = BiasLayout(tuple(slots))

    def forward(self, x: torch.Tensor, bb: torch.Tensor | None = None) -> torch.Tensor:
        self.bus.bb = bb
        try:
            y = self.body(x)
            return self.pool(y) if self.pool is not None else y
        finally:
            self.bus.bb = None


def _global_path(path: str, first_stage: int) -> str:
    head, _, rest = path.partition(".")
    return f"{int(head) + first_stage}.{rest}" if rest else str(int(head) + first_stage)


def layout_of(stages: list[nn.Module]) -> BiasLayout:
    """The bias layout a ``BiasedStages`` over these stages would have, without modifying them."""
    slots, offset = [], 0
    body = nn.Sequential(*stages)
    for name, m in body.named_modules():
        if _is_bn(m) and not isinstance(m, BiasedNorm):
            slots.append(BiasSlot(name, m.num_features, offset))
            offset += m.num_features
    return BiasLayout(tuple(slots))
