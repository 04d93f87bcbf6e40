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


def test_a_kept_bb_head_is_refitted_on_all_of_train(tmp_path):
    """Selection happens on a held-out part; the shipped head then sees every training image through the
    chosen biases, as the plain head does (a few-shot task lost 3 test points without it)."""
    torch = __import__("pytest").importorskip("torch")
    from skill_edge.runtime.learn.bb import BBRecipe, train_bb
    from skill_edge.runtime.learn.head import train_head

    class AddBias(torch.nn.Module):  # a suffix whose biases shift the features: enough to train through
        layout = type("Layout", (), {"total": 6})()

        def forward(self, act, bb):
            return act + bb

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    acts = (rng.normal(0, 1, (120, 6)) + np.eye(3, 6)[y] * 2).astype(np.float32)
    plain = train_head(acts, y, 3)
    fit = train_bb(tmp_path, acts, y, 3, plain, split=7, suffix=AddBias(), plain_features=acts,
                   recipe=BBRecipe("adam", 5e-2, 1e-2, epochs=2, batch_size=16, min_val_gain=None, min_val_z=None))
    assert fit.kept
    full = train_head(acts + fit.bb, y, 3, val_fraction=0.0, weight_decays=(plain.weight_decay,))
    np.testing.assert_allclose(fit.head.weight, full.weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit.head.bias, full.bias, rtol=1e-5, atol=1e-6)


def test_a_fresh_head_is_judged_by_the_head_that_would_ship(tmp_path):
    """``head_start="fresh"``: the head learns from zero beside the biases, and each epoch is scored by a
    plain head refitted through that epoch's biases on the fitting part (the joint head never ships)."""
    torch = __import__("pytest").importorskip("torch")
    from skill_edge.runtime.learn.bb import BBRecipe, train_bb
    from skill_edge.runtime.learn.head import stratified_split, train_head

    class CosBias(torch.nn.Module):  # cos(+-0.6) is the same number: without a bias the classes collide
        layout = type("Layout", (), {"total": 2})()

        def forward(self, act, bb):
            return torch.cos(act + bb)

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 60)
    acts = np.stack([np.where(y == 0, -0.6, 0.6) + rng.normal(0, 0.1, 120), rng.normal(0, 1, 120)], 1)
    acts = acts.astype(np.float32)
    plain = train_head(np.cos(acts), y, 2)
    recipe = BBRecipe("adam", 5e-2, 5e-2, epochs=6, batch_size=16, min_val_gain=0.01, head_start="fresh")
    fit = train_bb(tmp_path, acts, y, 2, plain, split=7, suffix=CosBias(), plain_features=np.cos(acts),
                   recipe=recipe, refit_head=False)
    assert fit.val_accuracy_without_bb < 0.6 and fit.kept and fit.val_accuracy >= 0.95
    keep, held = stratified_split(y, 0.15, 0)
    shipped = train_head(np.cos(acts + fit.bb)[keep], y[keep], 2, val_fraction=0.0,
                         weight_decays=(plain.weight_decay,))
    np.testing.assert_allclose(fit.head.weight, shipped.weight, rtol=1e-5, atol=1e-6)
    judged = float(np.mean((np.cos(acts + fit.bb)[held] @ shipped.weight.T + shipped.bias).argmax(1) == y[held]))
    assert fit.val_accuracy == judged == max(fit.history)
    assert recipe.to_dict()["head_start"] == "fresh" and "head_start" not in BBRecipe().to_dict()
    with __import__("pytest").raises(ValueError, match="head start"):
        train_bb(tmp_path, acts, y, 2, plain, split=7, suffix=CosBias(), plain_features=np.cos(acts),
                 recipe=BBRecipe(head_start="warm"))


def test_bb_training_counts_its_macs_row_by_row(tmp_path):
    """``BBFit.train_macs`` prices every suffix row the training ran (forward-only and forward+backward)
    by one row measured with torch's FLOP counter, instead of tracing the whole run under it."""
    torch = __import__("pytest").importorskip("torch")
    from skill_edge.runtime.learn.bb import BBRecipe, suffix_macs_per_row, train_bb
    from skill_edge.runtime.learn.head import train_head

    class LinearBias(torch.nn.Module):  # 6 -> 4 features: 24 MACs a row forward
        layout = type("Layout", (), {"total": 6})()

        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 4, bias=False)
            self.lin.weight.requires_grad_(False)

        def forward(self, act, bb):
            return self.lin(act + bb)

    mod = LinearBias()
    fwd, step = suffix_macs_per_row(mod, torch.zeros(1, 6), torch.zeros(6))
    assert fwd == 24 and step == 48  # backward: the gradient w.r.t. the input (weights are frozen)
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 20)
    acts = rng.normal(0, 1, (40, 6)).astype(np.float32)
    with torch.no_grad():
        plain_f = mod(torch.from_numpy(acts), torch.zeros(40, 6)).numpy()
    plain = train_head(plain_f, y, 2)
    fit = train_bb(tmp_path, acts, y, 2, plain, split=7, suffix=mod, plain_features=plain_f,
                   recipe=BBRecipe("adam", 1e-2, 1e-2, epochs=2, batch_size=8, min_val_gain=None, min_val_z=None))
    # 34 fitting rows trained twice; forward-only: the 6 held rows per epoch, the keep check is skipped
    # (no gain needed), and the kept head's refit over all 40 rows
    assert fit.train_macs == 2 * 34 * step + (2 * 6 + 40) * fwd
