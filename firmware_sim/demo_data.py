"""The demo's embedded default data: six small real tasks that install from Debian and PyPI.

* Fashion-MNIST (Debian ``dataset-fashion-mnist``, ``/usr/share/datasets/fashion-mnist``) split
  into five 2-class tasks: t-shirt/trouser, pullover/dress, coat/sandal, shirt/sneaker,
  bag/ankle-boot.  Training images come from the official train split, test images from the
  official test split.
* scikit-learn's bundled ``digits`` (8x8 handwritten digits, 10 classes) as a sixth task.

Everything is written as ImageFolder PNGs so the devices learn from files exactly as they would
from a camera capture.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle-boot"]
FASHION_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]


class DemoDataError(RuntimeError):
    """The embedded data is not installed."""


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DemoDataError(f"{path} is truncated: header says {dims}, found {arr.size} values")
    return arr.reshape(dims)


def load_fashion_mnist(root: Path = FASHION_DIR) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    files = {k: root / f"{k}-idx{3 if 'images' in k else 1}-ubyte.gz"
             for k in ("train-images", "train-labels", "t10k-images", "t10k-labels")}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise DemoDataError(f"Fashion-MNIST is not installed ({missing[0]} missing): apt-get install "
                            f"dataset-fashion-mnist, or run bash scripts/setup.sh")
    return (_read_idx(files["train-images"]), _read_idx(files["train-labels"]),
            _read_idx(files["t10k-images"]), _read_idx(files["t10k-labels"]))


def _save(img: np.ndarray, path: Path, size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(img)
    if im.size[0] != size:
        im = im.resize((size, size), Image.NEAREST if img.shape[0] <= 8 else Image.BILINEAR)
    im.save(path)


def build_demo_tasks(out: Path, *, train_per_class: int = 300, test_per_class: int = 100, seed: int = 0) -> list[Path]:
    """Write the six tasks under ``out/<task>/{train,test}/<class>/*.png``; returns the task dirs (idempotent)."""
    out = Path(out)
    done = out / ".complete"
    names = [f"fashion-{FASHION_CLASSES[a]}-{FASHION_CLASSES[b]}" for a, b in FASHION_PAIRS] + ["digits"]
    stamp = f"{train_per_class},{test_per_class},{seed}"
    if done.exists() and done.read_text() == stamp:
        return [out / n for n in names]
    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = load_fashion_mnist()
    for (a, b), name in zip(FASHION_PAIRS, names):
        for c in (a, b):
            for split, x, y, n in (("train", xtr, ytr, train_per_class), ("test", xte, yte, test_per_class)):
                idx = rng.permutation(np.flatnonzero(y == c))[:n]
                for i in idx:
                    _save(x[i], out / name / split / FASHION_CLASSES[c] / f"{i:05d}.png", 28)
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images * (255.0 / 16.0)).astype(np.uint8)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        n_test = max(1, len(idx) // 5)
        for j, i in enumerate(idx):
            split = "test" if j < n_test else "train"
            _save(imgs[i], out / "digits" / split / str(c) / f"{i:04d}.png", 32)
    done.write_text(stamp)
    return [out / n for n in names]
