"""Beneficial biases: learn one bias per ROM-tail channel, jointly with the head (the ``[bb]`` extra).

BB training reruns only the ROM *tail* in torch (built from the ROM's own, fingerprinted
weights), on cached trunk activations: the trunk is frozen and bias-free, so it never needs
rerunning.  This is the one learning step that needs torch and timm, so it lives apart from
``learn.py`` and is imported only when a task is learned with ``--bb``; ``require_bb`` says what
to install before any work starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .learn import HeadFit, stratified_split, train_head

log = logging.getLogger(__name__)

BB_EXTRA_HINT = "pip install 'skill-edge[bb]'"


class BBUnavailable(RuntimeError):
    """This install cannot learn beneficial biases (torch or timm is missing)."""


def require_bb() -> None:
    """Raise ``BBUnavailable`` naming the install command unless torch and timm can be imported."""
    missing = [m for m in ("torch", "timm") if importlib.util.find_spec(m) is None]
    if missing:
        raise BBUnavailable(f"learning beneficial biases needs {' and '.join(missing)}, which this device "
                            f"install leaves out; install them with: {BB_EXTRA_HINT}")


@dataclass
class BBFit:
    bb: np.ndarray  # [B_tail]
    head: HeadFit
    val_accuracy: float
    val_accuracy_without_bb: float
    epochs_run: int


def build_torch_tail(rom_dir: Path):
    """The ROM tail as a differentiable torch module, from the ROM's own (fingerprinted) weights."""
    from skill_edge.export.backbone import GlobalPool, build_backbone
    from skill_edge.export.bias import BiasedStages
    from skill_edge.export.manifest import RomManifest

    m = RomManifest.read(rom_dir)
    bk = build_backbone(m.backbone, weights=Path(rom_dir) / m.weights_file)
    split = len(bk.stages) - m.tail_blocks
    tail = BiasedStages(bk.stages[split:], GlobalPool(), first_stage=split).eval()
    if tail.layout.total != m.tail_bias_total:
        raise RuntimeError(f"tail layout mismatch: torch has {tail.layout.total}, ROM says {m.tail_bias_total}")
    for p in tail.parameters():
        p.requires_grad_(False)
    return tail


def train_bb(rom_dir: Path, trunk_acts: np.ndarray, labels: np.ndarray, num_classes: int, head: HeadFit, *,
             epochs: int = 8, lr: float = 1e-2, batch_size: int = 64, val_fraction: float = 0.15, seed: int = 0,
             weight_decay: float | None = None,
             progress: Callable[[int, int, float], None] | None = None) -> BBFit:
    """Learn tail biases + head jointly (backbone weights frozen), keeping the best validation epoch.

    The head starts from the plain-feature head, so epoch 0 is exactly "no BB"; BB is only
    kept if it beats that on validation.
    """
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    tail = build_torch_tail(rom_dir)
    y = np.asarray(labels, np.int64)
    keep, held = stratified_split(y, val_fraction, seed)
    acts = torch.from_numpy(np.asarray(trunk_acts, np.float32))
    yt = torch.from_numpy(y)
    # The plain head passed in was refit on *all* of train, validation part included, so it cannot
    # judge BB.  Start from a plain head fitted on the fitting part only (same weight decay): epoch 0
    # is then exactly "no BB", scored on data neither model has seen.
    with torch.no_grad():
        plain = torch.cat([tail(acts[i:i + 256]) for i in range(0, len(acts), 256)]).numpy()
    wd = head.weight_decay if weight_decay is None else weight_decay
    start = train_head(plain[keep], y[keep], num_classes, val_fraction=0.0, weight_decays=(wd,), seed=seed)
    bb = torch.zeros(tail.layout.total, requires_grad=True)
    w = torch.tensor(start.weight, requires_grad=True)
    b = torch.tensor(start.bias, requires_grad=True)
    opt = torch.optim.Adam([{"params": [bb], "lr": lr}, {"params": [w, b], "lr": lr * 0.1}])

    def evaluate(idx: np.ndarray, use_bb: bool) -> float:
        if len(idx) == 0:
            return float("nan")
        correct = 0
        with torch.no_grad():
            for i in range(0, len(idx), 256):
                j = torch.from_numpy(idx[i:i + 256])
                f = tail(acts[j], bb.detach().expand(len(j), -1) if use_bb else None)
                correct += int(((f @ w.T + b).argmax(1) == yt[j]).sum())
        return correct / len(idx)

    base = evaluate(held, use_bb=False)
    best = (base, bb.detach().clone(), w.detach().clone(), b.detach().clone(), 0)
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, math.ceil(len(keep) / batch_size))
    for epoch in range(1, epochs + 1):
        order = rng.permutation(keep)
        total = 0.0
        for s in range(steps_per_epoch):
            j = torch.from_numpy(order[s * batch_size:(s + 1) * batch_size])
            if len(j) == 0:
                continue
            f = tail(acts[j], bb.expand(len(j), -1))
            loss = F.cross_entropy(f @ w.T + b, yt[j]) + 0.5 * wd * (w * w).sum() / len(keep)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(j)
        acc = evaluate(held, use_bb=True)
        if progress:
            progress(epoch, epochs, acc)
        log.info("BB epoch %d loss %.4f val acc %.4f", epoch, total / len(keep), acc)
        if acc > best[0] + 1e-9:
            best = (acc, bb.detach().clone(), w.detach().clone(), b.detach().clone(), epoch)
    acc, bb_best, w_best, b_best, ep = best
    fitted = HeadFit(w_best.numpy().astype(np.float32), b_best.numpy().astype(np.float32), acc, wd,
                     {"bb_best_epoch": ep})
    return BBFit(bb_best.numpy().astype(np.float32), fitted, acc, base, epochs)
