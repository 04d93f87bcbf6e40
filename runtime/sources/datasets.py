"""Labelled image folders: the on-disk layout a device learns from.

The layout is jetson-inference camera-capture's: ``DIR/{train,val,test}/<class>/<image>``.
When a folder has no ``test`` (or ``val``) split, a seeded, per-class fraction of ``train``
is held out, so a rerun sees the same split.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A folder that cannot be a classification task (missing, empty class, one class...)."""


@dataclass
class Split:
    paths: list[Path]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageFolderTask:
    root: Path
    classes: list[str]
    train: Split
    val: Split
    test: Split

    @property
    def name(self) -> str:
        return self.root.name


def _list_split(split_dir: Path, classes: list[str]) -> Split:
    paths, labels = [], []
    for ci, cls in enumerate(classes):
        d = split_dir / cls
        if not d.is_dir():
            continue
        for p in sorted(d.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(p)
                labels.append(ci)
    return Split(paths, labels)


def _hold_out(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    """Per-class seeded hold-out, so every class keeps at least one training image."""
    rng = random.Random(seed)
    keep, held = Split([], []), Split([], [])
    by_class: dict[int, list[Path]] = {}
    for p, y in zip(split.paths, split.labels):
        by_class.setdefault(y, []).append(p)
    for y, ps in sorted(by_class.items()):
        ps = ps[:]
        rng.shuffle(ps)
        n_out = int(round(len(ps) * fraction)) if len(ps) > 1 else 0
        n_out = min(n_out, len(ps) - 1)
        for i, p in enumerate(ps):
            target = held if i < n_out else keep
            target.paths.append(p)
            target.labels.append(y)
    return keep, held


def load_image_folder(root: str | Path, *, test_fraction: float = 0.2, val_fraction: float = 0.1,
                      seed: int = 0) -> ImageFolderTask:
    """Read a task folder; classes come from ``train/`` (or from the root when it has no split dirs)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a directory")
    train_dir = root / "train"
    if not train_dir.is_dir():
        # a bare DIR/<class>/* folder: everything is training data, splits are held out
        train_dir = root
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and d.name not in ("train", "val", "test"))
    if len(classes) < 2:
        raise DatasetError(f"{train_dir} has {len(classes)} class folder(s); a task needs at least 2 classes "
                           f"laid out as {root}/train/<class>/<image>")
    train = _list_split(train_dir, classes)
    counts = {c: 0 for c in classes}
    for y in train.labels:
        counts[classes[y]] += 1
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DatasetError(f"class folder(s) {', '.join(empty)} in {train_dir} hold no images "
                           f"(accepted: {', '.join(sorted(IMAGE_SUFFIXES))})")
    test = _list_split(root / "test", classes) if (root / "test").is_dir() else None
    val = _list_split(root / "val", classes) if (root / "val").is_dir() else None
    if test is None or len(test) == 0:
        train, test = _hold_out(train, test_fraction, seed)
    if val is None or len(val) == 0:
        val = Split([], [])  # the learner carves its own validation split out of train
    return ImageFolderTask(root, classes, train, val, test)
