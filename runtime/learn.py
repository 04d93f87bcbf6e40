"""Teacher-side training: a linear head on ROM features, and optionally beneficial biases.

Heads are multinomial logistic regression fitted full-batch with L-BFGS (cheap and
deterministic on a CPU), with the weight decay chosen on a validation split carved out
of the training set — never the test set.  Features are standardised for the fit and the
standardisation is folded back into ``W, b``, so the shipped head is a plain linear layer
on raw ROM features.

BB training reruns only the ROM *tail* in torch (built from the ROM's own weights), on
cached trunk activations: the trunk is frozen and bias-free, so it never needs rerunning.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4)  # strongest first: each fit warm-starts the next


@dataclass
class HeadFit:
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    val_accuracy: float
    weight_decay: float
    history: dict[str, float] = field(default_factory=dict)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) with ``fraction`` of every class held out, at least one kept per class."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = min(int(round(len(idx) * fraction)), len(idx) - 1)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _fit_lbfgs(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, max_iter: int,
               init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    d = x.shape[1]
    w = torch.zeros(num_classes, d, dtype=x.dtype) if init is None else init[0].clone()
    b = torch.zeros(num_classes, dtype=x.dtype) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-6, tolerance_change=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def train_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *, val_fraction: float = 0.15,
               weight_decays: tuple[float, ...] = WEIGHT_DECAYS, max_iter: int = 100, seed: int = 0) -> HeadFit:
    """Fit ``softmax(W x + b)``; model selection over weight decay on a held-out part of train."""
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("a head needs training images of at least 2 classes")
    mu, sigma = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64) + 1e-6
    xs = torch.from_numpy(((x - mu) / sigma).astype(np.float32))
    yt = torch.from_numpy(y)
    keep, held = stratified_split(y, val_fraction, seed)
    history: dict[str, float] = {}
    best_wd, best_acc = weight_decays[-1], -1.0
    init = None
    if len(held) > 0:
        for wd in weight_decays:
            w, b = init = _fit_lbfgs(xs[keep], yt[keep], num_classes, wd, max_iter, init)
            acc = float(((xs[held] @ w.T + b).argmax(1) == yt[held]).double().mean())
            history[f"val_acc@wd={wd:g}"] = acc
            if acc > best_acc + 1e-9 or (abs(acc - best_acc) <= 1e-9 and wd > best_wd):
                best_wd, best_acc = wd, acc
    w, b = _fit_lbfgs(xs, yt, num_classes, best_wd, max_iter)
    # fold the standardisation into the head: W (x - mu) / sigma + b
    w64, b64 = w.double(), b.double()
    w_raw = (w64 / torch.from_numpy(sigma)).numpy()
    b_raw = (b64 - (w64 * torch.from_numpy(mu / sigma)).sum(1)).numpy()
    return HeadFit(w_raw.astype(np.float32), b_raw.astype(np.float32), max(best_acc, 0.0), best_wd, history)


def head_accuracy(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(((features @ weight.T + bias).argmax(1) == np.asarray(labels)).mean())


# ----------------------------------------------------------------------------- beneficial biases
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
