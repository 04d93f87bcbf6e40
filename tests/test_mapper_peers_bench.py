"""The arithmetic behind ``benchmarks/mapper_peers.py`` (issue 17), on small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from bench_modules import load_benchmark

mp = load_benchmark("mapper_peers")


def _pooled(seed: int = 0, dim: int = 6, classes: int = 4, per_class: int = 5) -> "mp.Pooled":
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (classes, dim))
    parts, counts = [], []
    for t in range(2):  # two tasks of two classes each
        y = np.repeat(np.arange(2), per_class)
        x = np.abs(means[2 * t + y] + rng.normal(0, 1, (len(y), dim))).astype(np.float32)
        parts.append((x, y))
        counts.append(2)
    return mp.pooled(parts, counts)


def test_auroc_counts_pairs_and_halves_ties():
    pos, neg = np.array([3.0, 2.0, 2.0, 0.5]), np.array([2.0, 1.0, 0.0])
    want = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert mp.auroc(pos, neg) == pytest.approx(want)
    assert mp.auroc(np.array([5.0, 6.0]), np.array([1.0, 2.0])) == 1.0


def test_temperature_undoes_overconfident_scores():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 5))
    truth = np.array([rng.choice(5, p=np.exp(r) / np.exp(r).sum()) for r in logits])
    cal = mp.calibration(10.0 * logits, truth)  # scores ten times too sharp
    assert 7.0 < cal["temperature"] < 14.0
    assert cal["ece_after"] < 0.03 < cal["ece_before"]


def test_fecam_woodbury_equals_the_dense_formula():
    d = _pooled()
    fe = mp.FeCAM().fit(d)
    x = d.x[:7]
    got = fe.scores(x)
    xn = d.x / np.linalg.norm(d.x, axis=1, keepdims=True)
    xt = x / np.linalg.norm(x, axis=1, keepdims=True)
    p = d.x.shape[1]
    for c in range(d.num_classes):
        xc = xn[d.y == c].astype(np.float64)
        s = np.cov(xc, rowvar=False)
        v1, v2 = np.mean(np.diag(s)), (s.sum() - np.trace(s)) / (p * p - p)
        s = s + v1 * np.eye(p) + v2 * (np.ones((p, p)) - np.eye(p))  # FeCAM's shrinkage, gamma = 1
        sd = np.sqrt(np.diag(s))
        r = s / np.outer(sd, sd)  # normalised to a correlation matrix
        v = xt - xc.mean(0)
        want = -np.einsum("ij,jk,ik->i", v, np.linalg.inv(r), v)
        np.testing.assert_allclose(got[:, c], want, rtol=1e-3, atol=1e-3)


def test_ranpac_statistics_are_sums_that_merge_in_any_order():
    d = _pooled(dim=8, per_class=12)
    fit_idx, val_idx = mp.val_split(d.y)
    part = lambda idx: mp.Pooled(d.x[idx], d.y[idx], d.task[idx], d.owner, d.class_counts)  # noqa: E731
    rp = mp.RanPAC(64)
    g_all, q_all = rp.stats(d)
    g_a, q_a = rp.stats(part(fit_idx))
    g_b, q_b = rp.stats(part(val_idx))
    np.testing.assert_allclose(g_a + g_b, g_all, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(q_b + q_a, q_all, rtol=1e-5, atol=1e-4)
    assert mp.mean_task_id(mp.task_accuracy(rp.solve(g_all, q_all, 1e-3).scores(d.x), d), d) > 0.9


def test_leave_one_out_flags_the_absent_task_when_scores_separate():
    d = _pooled()
    # per-task scores: high for the image's own task, low elsewhere
    scores = np.where(d.task[:, None] == np.arange(2)[None], 5.0, -5.0) + np.random.default_rng(1).normal(0, .1, (len(d.y), 2))
    out = mp.leave_one_out(scores, None, d)
    assert out["auroc"] > 0.99 and out["operating_point"]["known_called_unknown"] <= 0.05
    out = mp.leave_one_out(scores, scores, d, relative_to_threshold=True)
    assert out["at_thresholds"]["absent_called_unknown"] == 1.0 and out["at_thresholds"]["known_called_unknown"] == 0.0


def _without_task(d: "mp.Pooled", t: int) -> "mp.Pooled":
    keep = d.task != t
    return mp.Pooled(d.x[keep], d.y[keep], d.task[keep], d.owner, d.class_counts)


def test_open_set_refits_forget_the_absent_task_exactly():
    """Leave-one-task-out must refit shared statistics without t's rows: the refit from sums
    equals a fit on the data that never held t (the absent task may not leak into the scores)."""
    d = _pooled(dim=8, per_class=12)
    other = d.owner != 1
    # RanPAC: the Gram matrix minus task 1's share
    rp = mp.RanPAC(64)
    g, q = rp.stats(d)
    got = rp.solve(g - rp.gram_of(d.x[d.task == 1]), q, 1e-3).scores(d.x)[:, other]
    g0, q0 = mp.RanPAC(64).stats(_without_task(d, 1))
    want = mp.RanPAC(64).with_w(rp.w).solve(g0, q0, 1e-3).scores(d.x)[:, other]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    full = rp.solve(g, q, 1e-3).scores(d.x)[:, other]
    assert np.abs(full - want).max() > 1e-2  # the rows of task 1 did shape the full fit
    # KLDA: task 1's classes and its share of the pooled covariance taken out
    kl = mp.KLDA(32, 3.0).fit(d)
    got = kl.take_out(d, 1).scores(d.x)
    want = mp.KLDA(32, 3.0).fit(_without_task(d, 1)).scores(d.x)
    np.testing.assert_allclose(got[:, other], want[:, other], rtol=1e-3, atol=1e-3)
    assert np.all(np.isneginf(got[:, ~other]))
    # relative Mahalanobis: the background of the other task only
    rm = mp.RelativeMahalanobis().fit(d)
    got = rm.background(1).background_scores(d.x)
    x0 = d.x[d.task == 0].astype(np.float64)
    cov = np.cov(x0, rowvar=False, bias=True)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    v = d.x - x0.mean(0)
    want = (-0.5 * np.einsum("ij,jk,ik->i", v, np.linalg.inv(cov), v)
            - 0.5 * np.linalg.slogdet(cov)[1])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_leave_one_out_scores_each_absent_task_with_its_refit():
    d = _pooled()
    leaky = np.where(d.task[:, None] == np.arange(2)[None], 5.0, -5.0)  # column-dropped scores separate
    calls = []

    def without(t: int) -> np.ndarray:  # a refit that no longer tells the absent task apart
        calls.append(t)
        return np.zeros_like(leaky) + np.random.default_rng(t).normal(0, 1, leaky.shape)

    assert mp.leave_one_out(leaky, None, d)["auroc"] > 0.99
    out = mp.leave_one_out(leaky, None, d, without=without)
    assert calls == [0, 1] and out["auroc"] < 0.8


def test_features_of_another_rom_are_refused(tmp_path):
    """Lite0 and Lite2 features are both 1,280 wide, so only the ROM record tells them apart: a
    feature folder keeps the ROM that made it, and a run that names another ROM stops with both named."""
    common, extract = load_benchmark("_common"), load_benchmark("extract_features")
    lite0 = {"backbone": "efficientnet_lite0", "fingerprint": "0" * 64}
    lite2 = {"backbone": "efficientnet_lite2", "fingerprint": "2" * 64}
    a, b, legacy = tmp_path / "a", tmp_path / "b", tmp_path / "legacy"
    extract.record_rom(a, lite0)
    extract.record_rom(a, lite0)  # more tasks from the same ROM: fine
    with pytest.raises(SystemExit, match=r"features already in .*efficientnet_lite0.*--rom is .*efficientnet_lite2"):
        extract.record_rom(a, lite2)
    assert common.features_rom([a]) == lite0  # the refused call left the record alone
    extract.record_rom(b, lite2)
    with pytest.raises(SystemExit, match="different ROMs cannot be mixed"):
        common.features_rom([a, b])
    legacy.mkdir()
    assert common.features_rom([legacy]) is None  # extracted before the record: nothing to check
    with pytest.raises(SystemExit, match="record no ROM"):
        common.features_rom([a, legacy])
    common.check_same_rom(common.features_rom([a]), lite0, "the features")
    with pytest.raises(SystemExit, match=r"heads .* came from ROM 222222222222, but --rom is ROM 000000000000"):
        common.check_same_rom({"fingerprint": lite2["fingerprint"]}, lite0, "the heads of 't'")


def test_mlp_probe_routes_separable_tasks_and_is_seeded():
    d = _pooled(seed=3, per_class=30)
    a = mp.mlp_probe(d, wd=1e-4, dropout=0.3, epochs=30)
    b = mp.mlp_probe(d, wd=1e-4, dropout=0.3, epochs=30)
    scores = a(d.x)
    assert scores.shape == (len(d.x), d.num_classes)
    np.testing.assert_array_equal(scores, b(d.x))  # same seed, same net
    assert np.mean(scores.argmax(1) == d.y) > 0.95
    assert mp.mean_task_id(mp.task_accuracy(scores, d), d) > 0.95


def test_run_history_keeps_the_full_run_and_each_distinct_update_once():
    full = "python benchmarks/mapper_peers.py --features F --cache C"
    ours, both = full + " --update ours", full + " --update ours ours56"
    assert mp.run_history([full]) == {"command": full}
    # an older file's chained command, split, plus three more updates
    got = mp.run_history([full, both, both, ours, both, ours])
    assert got == {"command": full, "updated_by": [both, ours]}


def _nearest_mean(d: "mp.Pooled"):
    """A probe: nearest class mean of the rows it was trained on."""
    means = np.stack([d.x[d.y == c].mean(0) for c in range(d.num_classes)])
    return lambda z: -((z[:, None, :] - means[None]) ** 2).sum(-1)


def _always_first_class(d: "mp.Pooled"):
    return lambda z: np.tile(np.arange(d.num_classes, 0, -1, dtype=float), (len(z), 1))


def test_family_bound_routes_families_by_oracle_and_look_alikes_by_the_best_probe():
    rng = np.random.default_rng(5)
    names = ["cifar10-a", "cifar10-b", "solo"]
    means = rng.normal(0, 4, (6, 8))  # two classes per task, all apart
    parts = []
    for t in range(3):
        y = np.repeat(np.arange(2), 40)
        parts.append(((means[2 * t + y] + rng.normal(0, 0.3, (len(y), 8))).astype(np.float32), y))
    data = mp.pooled(parts, [2, 2, 2])
    fit_idx, val_idx = mp.val_split(data.y)
    fit = mp.Pooled(data.x[fit_idx], data.y[fit_idx], data.task[fit_idx], data.owner, [2, 2, 2])
    val = mp.Pooled(data.x[val_idx], data.y[val_idx], data.task[val_idx], data.owner, [2, 2, 2])

    fam = mp.restrict(data, [0, 1])
    assert fam.num_classes == 4 and set(fam.task) == {0, 1} and list(fam.owner) == [0, 0, 1, 1]
    np.testing.assert_array_equal(fam.y, data.y[data.task < 2])  # the family's classes come first here

    pred, val_acc, detail = mp.family_bound(names, fit, val, data, data,
                                            {"useless": _always_first_class, "means": _nearest_mean})
    assert list(detail) == ["CIFAR-10 pairs"]  # Omniglot has no tasks here; solo is a family of one
    assert detail["CIFAR-10 pairs"]["probe"] == "means, trained on family"  # the useless probe loses on validation
    assert detail["CIFAR-10 pairs"]["test_routing_acc"] == 1.0 and val_acc == 1.0
    np.testing.assert_array_equal(pred, data.task)

    # with only the useless probe, every family image goes to the family's first task, never to "solo"
    pred, _, detail = mp.family_bound(names, fit, val, data, data, {"useless": _always_first_class})
    np.testing.assert_array_equal(pred[data.task < 2], 0)
    np.testing.assert_array_equal(pred[data.task == 2], 2)  # the oracle between families
    assert detail["CIFAR-10 pairs"]["test_routing_acc"] == 0.5
