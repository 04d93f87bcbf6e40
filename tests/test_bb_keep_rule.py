"""BB's safety rule (issue 16): biases are kept only when they beat the plain head on validation by
more than noise, judged by a paired test on the images the two disagree on."""

from __future__ import annotations

import numpy as np

from skill_edge.runtime.learn.bb import DEFAULT_BB_RECIPE, beats_by_more_than_noise


def _pairs(wins: int, losses: int, same: int = 20) -> tuple[np.ndarray, np.ndarray]:
    bb = np.array([True] * wins + [False] * losses + [True] * same)
    plain = np.array([False] * wins + [True] * losses + [True] * same)
    return bb, plain


def test_a_gain_of_two_images_out_of_thirty_is_noise():
    assert not beats_by_more_than_noise(*_pairs(3, 1), z=1.645)  # +2 images: what bb_gain kept and lost on
    assert not beats_by_more_than_noise(*_pairs(0, 0), z=1.645)  # no disagreement, no gain


def test_a_consistent_gain_is_kept():
    assert beats_by_more_than_noise(*_pairs(12, 2), z=1.645)  # 10 > 1.645 * sqrt(14) = 6.2
    assert not beats_by_more_than_noise(*_pairs(8, 3), z=1.645)  # 5 < 1.645 * sqrt(11) = 5.5


def test_no_test_keeps_whatever_won_and_the_default_recipe_tests():
    assert beats_by_more_than_noise(*_pairs(1, 0), z=None)
    assert DEFAULT_BB_RECIPE.min_val_z is not None and DEFAULT_BB_RECIPE.to_dict()["min_val_z"] == DEFAULT_BB_RECIPE.min_val_z
