"""Beneficial biases: learn one bias per BN channel of a ROM *suffix*, jointly with the head (the ``[bb]`` extra).

BB training reruns a suffix of the ROM's stages in torch (built from the ROM's own, fingerprinted
weights) on activations cached at the *split point*: everything before the split is frozen and
bias-free, so it runs once per image, never per epoch.  The split point is the index of the first
stage whose biases are learned (``export.manifest.RomManifest.stage_count``):

* the tail split (``stage_count - tail_blocks``) is what ``tail.onnx`` reruns; its cached inputs are
  the trunk activations the ROM computes anyway;
* an earlier stage (Lite0: 5 = from the 80-channel blocks, 6 = from the 112-channel blocks) learns
  many more biases (16,912 of Lite0's 21,008 from stage 5); its inputs come from a torch pass over
  ``stages[:split]`` (``prefix_activations``), stored as float16;
* stage 0 is the whole network (every BN slot, what ``full.onnx`` takes).

Classify-time reruns need no torch: the device runs ``tail.onnx`` or ``full.onnx`` with the biases
bound (``runtime/rom/engine.py``).  This is the one learning step that needs torch and timm, so it
lives apart from ``learn.py`` and is imported only when a task is learned with ``--bb``;
``require_bb`` says what to install before any work starts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from skill_edge.runtime.learn.head import HeadFit, stratified_split, train_head

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


@dataclass(frozen=True)
class BBRecipe:
    """How biases and head are trained (chosen on validation splits: benchmarks/bb_gain.py).

    ``optimizer``: ``"adam"`` for both, or ``"sign"``: the paper's sign-gradient step on the biases
    (``bb -= lr * sign(grad)``) with Adam on the head.  Training stops after ``patience`` epochs
    without a better validation accuracy; the best epoch is kept."""

    optimizer: str = "adam"
    lr: float = 1e-2  # biases
    lr_head: float = 1e-3
    epochs: int = 8
    batch_size: int = 64
    patience: int | None = None
    min_val_gain: float | None = 0.0  # BB kept only when it beats the plain head on validation by more (None: always)
    #: ... and only when that gain is more than validation noise: a one-sided paired (McNemar) test on
    #: the validation images the two models disagree on, ``wins - losses > z * sqrt(wins + losses)``.
    #: With ~30 validation images a gain of one or two images is noise, and BB kept on it lost up to
    #: 9.5 test points (benchmarks/results/bb_gain.json); None: no test.
    min_val_z: float | None = 1.645
    #: Input augmentation per training batch, only for the whole network (split 0, whose cached inputs are
    #: the preprocessed images): ``"shift"`` (a random translation of up to 1/16 of the side, edge
    #: pixels repeated) or ``"shift+flip"`` (and a random horizontal flip: not for characters or signs).
    augment: str | None = None
    #: Where the head that trains with the biases starts.  ``"plain"``: the plain head fitted on the
    #: fitting part, so epoch 0 is exactly "no BB".  That head already fits the few hundred training
    #: images perfectly (train accuracy 1.0), so the cross-entropy gives the biases almost no gradient and
    #: they barely move (mean |bias| 0.01 after 12 epochs on gtsrb).  ``"fresh"``: the head starts at zero
    #: and learns with the biases, so the biases are shaped while the classes are still being separated
    #: (TinyTL trains its classifier from scratch beside the biases the same way); each epoch is then
    #: judged by the head the device would ship, a plain head refitted through the biases on the
    #: fitting part, since the jointly trained head is never shipped.
    head_start: str = "plain"

    def to_dict(self) -> dict:
        d = {"optimizer": self.optimizer, "lr": self.lr, "lr_head": self.lr_head, "epochs": self.epochs,
             "batch_size": self.batch_size, "patience": self.patience, "min_val_gain": self.min_val_gain,
             "min_val_z": self.min_val_z}
        if self.augment:
            d["augment"] = self.augment
        if self.head_start != "plain":
            d["head_start"] = self.head_start
        return d


AUGMENTATIONS = ("shift", "shift+flip")
HEAD_STARTS = ("plain", "fresh")


def augment_images(x, kind: str, generator):
    """A random translation (and horizontal flip for ``"shift+flip"``) of each image in ``x`` [n, 3, H, W]:
    the cheap, label-preserving augmentation TinyTL-style bias tuning trains with."""
    import torch
    import torch.nn.functional as F

    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown BB augmentation {kind!r} (one of {', '.join(AUGMENTATIONS)})")
    n, _, h, w = x.shape
    pad = max(1, min(h, w) // 16)
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if kind == "shift+flip":
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


def beats_by_more_than_noise(bb_correct: np.ndarray, plain_correct: np.ndarray, z: float | None) -> bool:
    """One-sided paired test on the same validation images: BB right where the plain head is wrong
    (wins) against the reverse (losses); True when ``wins - losses > z * sqrt(wins + losses)``."""
    if z is None:
        return True
    wins = int(np.sum(bb_correct & ~plain_correct))
    losses = int(np.sum(plain_correct & ~bb_correct))
    return wins - losses > z * math.sqrt(wins + losses) if wins + losses else False


#: The recipe the device used before issue 16: tail only, Adam 1e-2 / 1e-3, 8 epochs.
TAIL_RECIPE_V1 = BBRecipe(min_val_z=None)  # kept on any validation gain, as then
#: The device's recipe, chosen on validation splits (benchmarks/results/bb_gain.json).
DEFAULT_BB_RECIPE = BBRecipe("adam", 1e-2, 1e-2, epochs=12, batch_size=32, patience=4, min_val_gain=0.01,
                             head_start="fresh")
#: Split points ``learn --bb`` tries by default (``--bb-split auto``): the tail and stage 5 (Lite0: the
#: 80-channel blocks on, 16,912 of 21,008 biases); the one best on validation is kept.
DEFAULT_BB_SPLITS: tuple[str | int, ...] = ("tail", 5)


@dataclass
class BBFit:
    bb: np.ndarray  # [B_split]: the biases of stages[split:], in layout order
    head: HeadFit
    val_accuracy: float
    val_accuracy_without_bb: float
    epochs_run: int
    split: int = -1  # first stage whose biases were learned
    seconds: float = 0.0
    history: list[float] = field(default_factory=list)  # validation accuracy per epoch
    tried: dict[int, float] = field(default_factory=dict)  # split -> validation accuracy, when several were tried
    #: multiply-accumulates this training spent in the suffix: every training row's forward and backward
    #: and every forward-only row (the plain pass, the per-epoch judge, the refit), each priced by one
    #: row measured with torch's FLOP counter (MACs are linear in the batch); the head is negligible
    train_macs: int = 0

    @property
    def kept(self) -> bool:
        """Whether the biases beat the plain head on validation (the safety rule)."""
        return self.head.history.get("bb_best_epoch", 0) > 0


def _rom(rom_dir: Path):
    from skill_edge.export.backbone import build_backbone
    from skill_edge.export.manifest import RomManifest

    m = RomManifest.read(rom_dir)
    return m, build_backbone(m.backbone, weights=Path(rom_dir) / m.weights_file)


def build_torch_suffix(rom_dir: Path, split: int | None = None):
    """``stages[split:]`` + pool as a differentiable torch module (``forward(act, bb)``), from the ROM's
    own weights; ``split=None`` is the ROM's tail."""
    from skill_edge.export.backbone import GlobalPool
    from skill_edge.export.bias import BiasedStages

    m, bk = _rom(rom_dir)
    split = m.tail_split if split is None else int(split)
    if not 0 <= split < len(bk.stages):
        raise ValueError(f"BB split must be a stage in 0..{len(bk.stages) - 1}, got {split}")
    mod = BiasedStages(bk.stages[split:], GlobalPool(), first_stage=split).eval()
    if mod.layout.total != m.bias_suffix_total(split):
        raise RuntimeError(f"bias layout mismatch from stage {split}: torch has {mod.layout.total}, "
                           f"the ROM says {m.bias_suffix_total(split)}")
    for p in mod.parameters():
        p.requires_grad_(False)
    return mod


def build_torch_tail(rom_dir: Path):
    """The ROM tail as a differentiable torch module."""
    return build_torch_suffix(rom_dir, None)


def prefix_activations(rom_dir: Path, batches: Iterable[np.ndarray], splits: Iterable[int],
                       dtype=np.float16, backbone=None) -> dict[int, np.ndarray]:
    """Plain (bias-free) activations entering each stage in ``splits``, for preprocessed image batches
    ``[n, 3, H, W]``: what BB training from those splits caches.  Key ``-1`` holds the pooled features."""
    import torch

    from skill_edge.export.backbone import GlobalPool

    bk = _rom(rom_dir)[1] if backbone is None else backbone
    want = sorted({int(s) for s in splits})
    out: dict[int, list[np.ndarray]] = {s: [] for s in [*want, -1]}
    pool = GlobalPool()
    with torch.no_grad():
        for x in batches:
            a = torch.from_numpy(np.ascontiguousarray(x, np.float32))
            for i, stage in enumerate(bk.stages):
                if i in out:
                    out[i].append(a.numpy().astype(dtype))
                a = stage(a)
            out[-1].append(pool(a).numpy().astype(np.float32))
    return {s: np.concatenate(v) if v else np.zeros((0,)) for s, v in out.items()}


def train_bb(rom_dir: Path, acts: np.ndarray, labels: np.ndarray, num_classes: int, head: HeadFit, *,
             split: int | None = None, recipe: BBRecipe | None = None, epochs: int | None = None,
             lr: float | None = None, batch_size: int | None = None, val_fraction: float = 0.15, seed: int = 0,
             weight_decay: float | None = None, plain_features: np.ndarray | None = None, suffix=None,
             progress: Callable[[int, int, float], None] | None = None, refit_head: bool = True) -> BBFit:
    """Learn the biases of ``stages[split:]`` + head jointly (backbone weights frozen), keeping the best
    validation epoch.  ``acts`` are the plain activations entering stage ``split`` (the trunk
    activations for the tail split), float32 or float16.  ``suffix`` may pass the module
    ``build_torch_suffix(rom_dir, split)`` built (it is not modified, so runs can share it).

    The head starts from a plain head fitted on the fitting part, so epoch 0 is exactly "no BB";
    BB is only kept if it beats that on validation.  A kept BB's head is then refitted on all of
    train through the chosen biases (``refit_head``), as the plain head is.
    """
    import torch
    import torch.nn.functional as F

    t0 = time.perf_counter()
    r = recipe or TAIL_RECIPE_V1
    r = BBRecipe(r.optimizer, r.lr if lr is None else lr, r.lr_head if lr is None else lr * 0.1,
                 r.epochs if epochs is None else int(epochs), r.batch_size if batch_size is None else int(batch_size),
                 r.patience, r.min_val_gain, r.min_val_z, r.augment, r.head_start)
    if r.optimizer not in ("adam", "sign"):
        raise ValueError(f"unknown BB optimizer {r.optimizer!r} (adam or sign)")
    if r.head_start not in HEAD_STARTS:
        raise ValueError(f"unknown BB head start {r.head_start!r} (one of {', '.join(HEAD_STARTS)})")
    fresh = r.head_start == "fresh"
    torch.manual_seed(seed)
    suffix = build_torch_suffix(rom_dir, split) if suffix is None else suffix
    split_used = int(split) if split is not None else _rom_tail_split(rom_dir)
    if r.augment and split_used != 0:
        raise ValueError(f"BB augmentation needs the input images (split 0); split {split_used} caches "
                         "activations, which cannot be cropped or flipped")
    aug_gen = torch.Generator().manual_seed(seed)
    y = np.asarray(labels, np.int64)
    keep, held = stratified_split(y, val_fraction, seed)
    acts_t = torch.from_numpy(np.asarray(acts))
    yt = torch.from_numpy(y)
    rows_run = {"forward": 0, "train": 0}  # suffix rows run without and with a backward pass (train_macs)

    def rows(j: torch.Tensor) -> torch.Tensor:
        return acts_t[j].float()

    # The plain head passed in was refit on *all* of train, validation part included, so it cannot
    # judge BB.  Start from a plain head fitted on the fitting part only (same weight decay): epoch 0
    # is then exactly "no BB", scored on data neither model has seen.
    if plain_features is None:
        with torch.no_grad():
            plain = torch.cat([suffix(acts_t[i:i + 128].float()) for i in range(0, len(acts_t), 128)]).numpy()
        rows_run["forward"] += len(acts_t)
    else:
        plain = np.asarray(plain_features, np.float32)
    wd = head.weight_decay if weight_decay is None else weight_decay
    start = train_head(plain[keep], y[keep], num_classes, val_fraction=0.0, weight_decays=(wd,), seed=seed)
    bb = torch.zeros(suffix.layout.total, requires_grad=True)
    w = torch.tensor(start.weight if not fresh else np.zeros_like(start.weight), requires_grad=True)
    b = torch.tensor(start.bias if not fresh else np.zeros_like(start.bias), requires_grad=True)
    if r.optimizer == "adam":
        opt = torch.optim.Adam([{"params": [bb], "lr": r.lr}, {"params": [w, b], "lr": r.lr_head}])
    else:
        opt = torch.optim.Adam([w, b], lr=r.lr_head)

    def correct(idx: np.ndarray, use_bb: bool, state=None) -> np.ndarray:
        """Per image of ``idx``: whether the head (with the biases, or plain) names it right; ``state``
        (bb, w, b) defaults to the current parameters."""
        bbv, wv, bv = state if state is not None else (bb.detach(), w.detach(), b.detach())
        if not use_bb:
            return (plain[idx] @ wv.numpy().T + bv.numpy()).argmax(1) == y[idx]
        out = []
        with torch.no_grad():
            for i in range(0, len(idx), 128):
                j = torch.from_numpy(idx[i:i + 128])
                f = suffix(rows(j), bbv.expand(len(j), -1))
                rows_run["forward"] += len(j)
                out.append(((f @ wv.T + bv).argmax(1) == yt[j]).numpy())
        return np.concatenate(out) if out else np.zeros(0, bool)

    def evaluate(idx: np.ndarray, use_bb: bool) -> float:
        return float(correct(idx, use_bb).mean()) if len(idx) else float("nan")

    def features_through(bbv: torch.Tensor) -> np.ndarray:
        """Pooled features of every training row through the suffix with biases ``bbv``."""
        rows_run["forward"] += len(y)
        with torch.no_grad():
            return torch.cat([suffix(rows(torch.from_numpy(np.arange(i, min(i + 128, len(y))))),
                                     bbv.expand(min(128, len(y) - i), -1))
                              for i in range(0, len(y), 128)]).numpy()

    def judged_state() -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(validation accuracy, biases, head) of this epoch: the joint head, or for a fresh head the
        plain head refitted through the biases on the fitting part (what would ship)."""
        bbv = bb.detach().clone()
        if not fresh:
            return evaluate(held, use_bb=True), bbv, w.detach().clone(), b.detach().clone()
        feats = features_through(bbv)  # every row once: the fitting part refits, the held part scores
        refit = train_head(feats[keep], y[keep], num_classes, val_fraction=0.0, weight_decays=(wd,), seed=seed)
        hits = (feats[held] @ refit.weight.T + refit.bias).argmax(1) == y[held]
        acc = float(hits.mean()) if len(held) else float("nan")
        return acc, bbv, torch.from_numpy(refit.weight), torch.from_numpy(refit.bias)

    start_w, start_b = torch.from_numpy(start.weight), torch.from_numpy(start.bias)
    base = float(correct(held, False, (None, start_w, start_b)).mean()) if len(held) else float("nan")
    plain_state = (base, torch.zeros_like(bb), start_w.clone(), start_b.clone(), 0)
    best_bb = None  # the best epoch >= 1
    rng = np.random.default_rng(seed)
    steps_per_epoch = max(1, math.ceil(len(keep) / r.batch_size))
    history, since_best, ran = [], 0, 0
    for epoch in range(1, r.epochs + 1):
        order = rng.permutation(keep)
        total = 0.0
        for s in range(steps_per_epoch):
            j = torch.from_numpy(order[s * r.batch_size:(s + 1) * r.batch_size])
            if len(j) == 0:
                continue
            x = rows(j)
            if r.augment:
                x = augment_images(x, r.augment, aug_gen)
            f = suffix(x, bb.expand(len(j), -1))
            rows_run["train"] += len(j)
            loss = F.cross_entropy(f @ w.T + b, yt[j]) + 0.5 * wd * (w * w).sum() / len(keep)
            opt.zero_grad()
            if bb.grad is not None:
                bb.grad = None
            loss.backward()
            opt.step()
            if r.optimizer == "sign":
                with torch.no_grad():
                    bb -= r.lr * torch.sign(bb.grad)
            total += float(loss.detach()) * len(j)
        ran = epoch
        acc, *state = judged_state()
        history.append(acc)
        if progress:
            progress(epoch, r.epochs, acc)
        log.info("BB split %d epoch %d loss %.4f val acc %.4f", split_used, epoch, total / len(keep), acc)
        if best_bb is None or acc > best_bb[0] + 1e-9:
            # a fresh head starts below the plain one, so its patience counts from its own best epoch
            improved = acc > max(-1.0 if fresh else base, best_bb[0] if best_bb else -1.0) + 1e-9
            best_bb = (acc, *state, epoch)
            if improved:
                since_best = 0
                continue
        since_best += 1
        if r.patience is not None and since_best >= r.patience:
            break
    # the safety rule: BB is kept only when it beats the plain head on validation by more than the margin
    # (``min_val_gain=None`` keeps the best epoch regardless: for tests and experiments)
    keep_bb = best_bb is not None and (r.min_val_gain is None or best_bb[0] > base + r.min_val_gain + 1e-9)
    if keep_bb and r.min_val_gain is not None and len(held):
        keep_bb = beats_by_more_than_noise(correct(held, True, best_bb[1:4]),
                                           correct(held, False, plain_state[1:4]), r.min_val_z)
        if not keep_bb:
            log.info("BB split %d: validation %.4f against plain %.4f is within noise (paired test, z=%s); "
                     "not kept", split_used, best_bb[0], base, r.min_val_z)
    best = best_bb if keep_bb else plain_state
    acc, bb_best, w_best, b_best, ep = best
    weight, bias = w_best.numpy().astype(np.float32), b_best.numpy().astype(np.float32)
    if keep_bb and refit_head:
        # The biases are chosen; now the head sees all of train, validation part included, as the plain
        # head does (``Device`` refits it on everything after choosing its weight decay).  Otherwise a
        # kept BB task ships a head fitted on 85 % of the images against a plain head fitted on 100 %,
        # which costs the few-shot tasks (flowers102: 6 images a class) more than BB gains.
        full = train_head(features_through(bb_best), y, num_classes, val_fraction=0.0, weight_decays=(wd,), seed=seed)
        weight, bias = full.weight.astype(np.float32), full.bias.astype(np.float32)
    fitted = HeadFit(weight, bias, acc, wd, {"bb_best_epoch": ep})
    fwd, step = suffix_macs_per_row(suffix, rows(torch.arange(min(1, len(y)))), bb)
    macs = rows_run["forward"] * fwd + rows_run["train"] * step
    return BBFit(bb_best.numpy().astype(np.float32), fitted, acc, base, ran, split_used,
                 time.perf_counter() - t0, history, train_macs=int(macs))


def suffix_macs_per_row(suffix, row, bb) -> tuple[int, int]:
    """(forward, forward + backward) multiply-accumulates of one row through ``suffix`` with biases, measured
    with torch's FLOP counter on a single row.  Counting a whole training run under the counter instead
    held on to every traced pass: it doubled a BB device's peak memory (1.7 -> 3.8 GB in 3 epochs at
    Lite0 stage 5), which is what got fleet devices OOM-killed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    if len(row) == 0:
        return 0, 0
    probe = torch.zeros_like(bb, requires_grad=True)
    with FlopCounterMode(display=False) as fwd_mode, torch.no_grad():
        suffix(row, probe.detach().expand(1, -1))
    with FlopCounterMode(display=False) as step_mode:
        suffix(row, probe.expand(1, -1)).sum().backward()
    return int(fwd_mode.get_total_flops() // 2), int(step_mode.get_total_flops() // 2)


def _rom_tail_split(rom_dir: Path) -> int:
    from skill_edge.export.manifest import RomManifest

    return RomManifest.read(rom_dir).tail_split
