"""BB input augmentation (split 0 only): label-preserving shifts and, where allowed, flips."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from skill_edge.runtime.learn.bb import BBRecipe, augment_images  # noqa: E402


def _images(n=6, h=32, w=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, h, w, generator=g)


def test_shift_is_a_translation_of_each_image():
    x = _images()
    out = augment_images(x, "shift", torch.Generator().manual_seed(1))
    assert out.shape == x.shape
    pad = 32 // 16
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")
    for i in range(len(x)):  # every output is some crop of its own padded image, never another's
        crops = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)]
        assert any(torch.equal(out[i], c) for c in crops)
        assert not any(torch.equal(out[i], padded[(i + 1) % len(x), :, dy:dy + 32, dx:dx + 32])
                       for dy in range(2 * pad + 1) for dx in range(2 * pad + 1))
    # and it moves something: not every image comes back unshifted
    assert not torch.equal(out, x)


def test_flip_only_when_asked():
    x = _images(n=64)
    g = torch.Generator().manual_seed(2)
    flipped = augment_images(x, "shift+flip", g)
    pad = 2
    padded = torch.nn.functional.pad(x, (pad,) * 4, mode="replicate")

    def is_flipped(i):
        return any(torch.equal(flipped[i], padded[i, :, dy:dy + 32, dx:dx + 32].flip(-1))
                   for dy in range(5) for dx in range(5))
    n_flipped = sum(is_flipped(i) for i in range(64))
    assert 16 <= n_flipped <= 48  # about half
    shifted = augment_images(x, "shift", torch.Generator().manual_seed(2))
    assert not any(torch.equal(shifted[i], x[i].flip(-1)) for i in range(64))


def test_unknown_augmentation_and_recipe_record():
    with pytest.raises(ValueError, match="unknown BB augmentation"):
        augment_images(_images(), "rotate", torch.Generator())
    assert "augment" not in BBRecipe().to_dict()  # records of recipes without it are unchanged
    assert BBRecipe(augment="shift").to_dict()["augment"] == "shift"


def test_augmentation_needs_split_zero(tmp_path):
    from skill_edge.runtime.learn.bb import train_bb
    from skill_edge.runtime.learn.head import HeadFit

    head = HeadFit(np.zeros((2, 4), np.float32), np.zeros(2, np.float32), 0.5, 1e-4, {})

    class Suffix:  # never reached: the recipe is refused before any training
        layout = type("L", (), {"total": 4})()

    with pytest.raises(ValueError, match="split 0"):
        train_bb(tmp_path, np.zeros((4, 8), np.float32), np.array([0, 1, 0, 1]), 2, head, split=5,
                 recipe=BBRecipe(augment="shift"), suffix=Suffix())
