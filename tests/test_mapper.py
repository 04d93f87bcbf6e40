"""Task anchors (teacher) and task mappers (student): correctness against naive references."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.covariance import ledoit_wolf, oas

from skill_edge.runtime.mapping.anchors import (
    DEFAULT_MIN_EXEMPLAR_ROWS,
    AnchorError,
    fit_gmmc,
    fit_mahalanobis,
    fit_task_anchors,
    transform_features,
)
from skill_edge.runtime.knowledge.records import GmmcAnchor, TaskKnowledge, TaskMeta
from skill_edge.runtime.mapping.mapper import (
    GmmcMapper,
    MahalanobisMapper,
    MapperError,
    ScatterStats,
    build_mapper,
    runner_up_gap,
    mahalanobis_task_score,
)

D = 24


def make_task(rng: np.random.Generator, n_classes: int, n: int, shift: float) -> tuple[np.ndarray, ...]:
    """Post-ReLU-like features: class clusters around a task-specific offset, clipped at 0."""
    base = rng.normal(0.0, shift, D)
    centers = base + rng.normal(0.0, 1.0, (n_classes, D))
    y = np.arange(n) % n_classes
    x = np.maximum(centers[y] + rng.normal(0.0, 0.7, (n, D)), 0.0)
    yt = np.arange(n // 3) % n_classes
    xt = np.maximum(centers[yt] + rng.normal(0.0, 0.7, (yt.size, D)), 0.0)
    return x.astype(np.float32), y, xt.astype(np.float32), yt


def knowledge_for(name: str, x: np.ndarray, y: np.ndarray, transform: str, k: int = 6,
                  seed: int = 0, trunk_stats: np.ndarray | None = None) -> TaskKnowledge:
    anchors = fit_task_anchors(x, y, trunk_stats=trunk_stats, transform=transform, k=k, m=5, seed=seed)
    c = int(y.max()) + 1
    return TaskKnowledge(
        task=name, labels=[f"c{i}" for i in range(c)],
        head_weight=np.zeros((c, x.shape[1]), np.float32), head_bias=np.zeros(c, np.float32),
        meta=TaskMeta(feature_transform=transform, n_train=x.shape[0]),
        gmmc=anchors.gmmc, maha=anchors.maha, thresholds=anchors.thresholds,
    ).validate()


@pytest.fixture(scope="module")
def tasks() -> dict[str, tuple[np.ndarray, ...]]:
    rng = np.random.default_rng(42)
    return {f"task{i}": make_task(rng, n_classes=2 + i % 3, n=300, shift=3.0) for i in range(5)}


@pytest.fixture(scope="module", params=["raw", "sqrt_l2"])
def bank(request, tasks) -> tuple[str, list[TaskKnowledge]]:
    transform = request.param
    return transform, [knowledge_for(n, x, y, transform, seed=i) for i, (n, (x, y, _, _)) in enumerate(tasks.items())]


# ---------------------------------------------------------------------------- transforms
def test_transforms_shape_norm_and_names():
    x = np.abs(np.random.default_rng(0).normal(size=(10, 8))).astype(np.float32) * 5
    np.testing.assert_array_equal(transform_features(x, "raw"), x)
    np.testing.assert_allclose(transform_features(x, "sqrt") ** 2, x, rtol=1e-5)
    for kind in ("l2", "sqrt_l2"):
        np.testing.assert_allclose(np.linalg.norm(transform_features(x, kind), axis=1), 1.0, rtol=1e-5)
    zero = np.zeros((2, 8), np.float32)  # an all-zero row must not turn into NaN
    assert np.all(np.isfinite(transform_features(zero, "sqrt_l2")))
    with pytest.raises(AnchorError, match="unknown feature transform"):
        transform_features(x, "pca")


# ---------------------------------------------------------------------------- fitting
def test_fit_gmmc_shapes_weights_and_floor(tasks):
    x = transform_features(tasks["task0"][0], "sqrt_l2")
    g = fit_gmmc(x, k=7, seed=0, var_floor=0.05)
    assert g.means.shape == (7, D) and g.variances.shape == (7, D) and g.weights.shape == (7,)
    assert g.means.dtype == np.float32
    assert abs(float(g.weights.sum()) - 1.0) < 1e-5
    floor = 0.05 * np.var(x.astype(np.float64), axis=0).mean()
    assert g.variances.min() >= floor * 0.999
    # same seed, same anchor
    np.testing.assert_array_equal(fit_gmmc(x, k=7, seed=0, var_floor=0.05).means, g.means)


def test_fit_gmmc_small_n_shrinks_k():
    rng = np.random.default_rng(1)
    assert fit_gmmc(rng.normal(size=(7, 5)), k=25).k == 3
    one = fit_gmmc(np.ones((1, 5), np.float32), k=25)
    assert one.k == 1 and np.all(one.variances > 0)
    np.testing.assert_allclose(one.means[0], 1.0)
    with pytest.raises(AnchorError):
        fit_gmmc(np.zeros((0, 5)), k=3)
    with pytest.raises(AnchorError, match="NaN"):
        fit_gmmc(np.full((4, 5), np.nan), k=2)


def test_fit_gmmc_per_class_covers_every_class():
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(30), 10)
    x = rng.normal(size=(300, 6)) + y[:, None]
    g = fit_gmmc(x, k=10, labels=y)
    assert g.k >= 30  # more classes than k: one component each at least
    assert abs(float(g.weights.sum()) - 1.0) < 1e-5


def test_fit_mahalanobis_means_and_seeded_exemplars():
    rng = np.random.default_rng(3)
    y = np.concatenate([np.zeros(50), np.ones(50), np.full(3, 2)]).astype(int)
    x = (rng.normal(size=(y.size, 4)) + y[:, None]).astype(np.float32)
    a = fit_mahalanobis(x, y, m=5, seed=9)
    for c in range(3):
        np.testing.assert_allclose(a.class_means[c], x[y == c].mean(axis=0), rtol=1e-5, atol=1e-6)
    counts = np.bincount(a.exemplar_labels.astype(int))
    assert counts.tolist() == [5, 5, 3]  # class 2 has only 3 samples: all of them
    for e, lab in zip(a.exemplars, a.exemplar_labels.astype(int)):  # exemplars are real samples of their class
        assert np.any(np.all(x[y == lab] == e, axis=1))
    np.testing.assert_array_equal(fit_mahalanobis(x, y, m=5, seed=9).exemplars, a.exemplars)
    assert not np.array_equal(fit_mahalanobis(x, y, m=5, seed=10).exemplars, a.exemplars)
    with pytest.raises(AnchorError, match="class 1 has no"):
        fit_mahalanobis(x[y != 1], np.where(y[y != 1] == 2, 2, 0), num_classes=3)


def test_principal_exemplars_carry_the_top_within_class_scatter():
    rng = np.random.default_rng(13)
    y = np.arange(400) % 2
    axes = np.diag([5.0, 3.0, 2.0, 0.5, 0.3, 0.2, 0.1, 0.1])
    x = (rng.normal(size=(400, 8)) @ axes + 4.0 * y[:, None]).astype(np.float32)
    a = fit_mahalanobis(x, y, m=3, exemplars="principal")
    assert a.exemplars.shape == (6, 8) and np.bincount(a.exemplar_labels.astype(int)).tolist() == [3, 3]
    np.testing.assert_allclose(a.class_means, fit_mahalanobis(x, y, m=3).class_means)
    e = a.exemplars.astype(np.float64) - a.class_means[a.exemplar_labels.astype(int)]
    means = a.class_means.astype(np.float64)
    w = np.cov((x - means[y]).T, bias=True)
    vals, vecs = np.linalg.eigh(w)
    top = vecs[:, -3:] @ np.diag(vals[-3:]) @ vecs[:, -3:].T  # rank r = 6 // 2 = 3
    np.testing.assert_allclose(e.T @ e / 6, top, atol=1e-4 * vals[-1])
    with pytest.raises(AnchorError, match="exemplars must be"):
        fit_mahalanobis(x, y, exemplars="kmeans")


def test_min_rows_gives_few_class_tasks_more_principal_axes():
    rng = np.random.default_rng(14)
    y = np.arange(600) % 2
    x = (rng.normal(size=(600, 40)) * np.linspace(3.0, 0.1, 40) + 4.0 * y[:, None]).astype(np.float32)
    a = fit_mahalanobis(x, y, m=5, exemplars="principal", min_rows=24)
    assert a.exemplars.shape == (24, 40) and np.bincount(a.exemplar_labels.astype(int)).tolist() == [12, 12]
    e = a.exemplars.astype(np.float64) - a.class_means[a.exemplar_labels.astype(int)]
    vals, vecs = np.linalg.eigh(np.cov((x - a.class_means.astype(np.float64)[y]).T, bias=True))
    top = vecs[:, -12:] @ np.diag(vals[-12:]) @ vecs[:, -12:].T  # rank 24 // 2
    np.testing.assert_allclose(e.T @ e / 24, top, atol=1e-4 * vals[-1])
    # the floor asks for at most one row per 4 samples, and at most twice the rank (2 x 8 dims)
    assert fit_mahalanobis(x[:160], y[:160], m=5, exemplars="principal", min_rows=64).exemplars.shape[0] == 40
    assert fit_mahalanobis(x[:20], y[:20], m=5, exemplars="principal", min_rows=64).exemplars.shape[0] == 10
    assert fit_mahalanobis(x[:, :8], y, m=1, exemplars="principal", min_rows=64).exemplars.shape[0] == 16
    # a task that already sends more rows than the floor is unchanged; random exemplars ignore it
    assert fit_mahalanobis(x, y, m=20, exemplars="principal", min_rows=24).exemplars.shape[0] == 40
    assert fit_mahalanobis(x, y, m=5, min_rows=24).exemplars.shape[0] == 10
    assert fit_task_anchors(x, y, transform="sqrt_l2", k=4).maha.exemplars.shape[0] == DEFAULT_MIN_EXEMPLAR_ROWS
    with pytest.raises(AnchorError, match="min_rows"):
        fit_mahalanobis(x, y, exemplars="principal", min_rows=-1)


def test_thresholds_hold_out_most_own_test_data(tasks):
    x, y, xt, _ = tasks["task1"]
    a = fit_task_anchors(x, y, transform="sqrt_l2", k=6, percentile=1.0)
    assert set(a.thresholds) == {"gmmc", "maha"} and a.feature_transform == "sqrt_l2"
    from skill_edge.runtime.mapping.mapper import gmmc_task_loglik

    own = gmmc_task_loglik(a.gmmc, transform_features(xt, "sqrt_l2"))
    assert np.mean(own < a.thresholds["gmmc"]) < 0.08  # ~1 % expected, small-sample slack


@pytest.mark.parametrize("per_class", [7, 15])
def test_mahalanobis_threshold_holds_for_few_images_a_class(per_class):
    """Omniglot's alphabets have 7 training images a class.  A threshold calibrated on held-out
    images that were inside their own class means called 40-97 % of such a task's new images
    unknown; calibrated on means without them, about the 1 % it is set for."""
    rng = np.random.default_rng(5)
    c, d = 20, 256
    centers = rng.normal(0.0, 1.0, (c, d))
    y = np.repeat(np.arange(c), per_class)
    x = (centers[y] + rng.normal(0.0, 0.5, (y.size, d))).astype(np.float32)
    yt = np.repeat(np.arange(c), 50)
    xt = (centers[yt] + rng.normal(0.0, 0.5, (yt.size, d))).astype(np.float32)
    a = fit_task_anchors(x, y, transform="raw", kinds=("maha",), percentile=1.0)
    called_unknown = np.mean(mahalanobis_task_score(a.maha, xt) < a.thresholds["maha"])
    assert called_unknown < 0.05, called_unknown


# ---------------------------------------------------------------------------- vectorised == naive
def naive_gmmc(anchors: list[GmmcAnchor], x: np.ndarray, reduce: str) -> np.ndarray:
    out = np.zeros((x.shape[0], len(anchors)))
    for t, a in enumerate(anchors):
        comp = np.stack([
            np.log(a.weights[j]) + multivariate_normal(a.means[j].astype(np.float64),
                                                       np.diag(a.variances[j].astype(np.float64))).logpdf(x)
            for j in range(a.k)
        ], axis=1)
        out[:, t] = logsumexp(comp, axis=1) if reduce == "logsumexp" else comp.max(axis=1)
    return out


@pytest.mark.parametrize("reduce", ["logsumexp", "max"])
@pytest.mark.parametrize("uneven", [False, True])  # equal k: component-major blocks; uneven: reduceat
@pytest.mark.parametrize("block_rows,block_elements", [(1 << 16, 1 << 24), (8, 64)])  # small: many blocks
def test_gmmc_scores_equal_naive_loop(tasks, reduce, uneven, block_rows, block_elements):
    anchors = [fit_gmmc(transform_features(x, "sqrt_l2"), k=3 + i if uneven else 4, seed=i)
               for i, (x, *_) in enumerate(tasks.values())]
    xt = transform_features(np.concatenate([v[2][:20] for v in tasks.values()]), "sqrt_l2")
    mapper = GmmcMapper([f"t{i}" for i in range(5)], anchors, reduce=reduce, block_rows=block_rows,
                        block_elements=block_elements)
    assert len(mapper.layout.blocks) == (1 if block_rows > 100 else 4 if uneven else 3)
    sel = mapper.task_scores(xt)
    ref = naive_gmmc(anchors, xt.astype(np.float64), reduce)
    tol = 1e-4 * np.abs(ref).max()
    np.testing.assert_allclose(sel, ref, rtol=1e-4, atol=tol)
    # the open-set score is always the chosen task's mixture log-likelihood
    best = sel.argmax(axis=1)
    lse = naive_gmmc(anchors, xt.astype(np.float64), "logsumexp")[np.arange(len(best)), best]
    np.testing.assert_allclose(mapper.open_set_scores(xt, best, sel), lse, rtol=1e-4, atol=tol)


def test_mahalanobis_scores_equal_naive_loop(bank):
    transform, knowledge = bank
    mapper = MahalanobisMapper.from_knowledge(knowledge)
    rng = np.random.default_rng(5)
    x = transform_features(np.abs(rng.normal(0, 2, (30, D))), transform)
    # naive: pooled exemplars centred by class means -> sklearn Ledoit-Wolf -> distance per class
    centred = np.concatenate([k.maha.exemplars - k.maha.class_means[k.maha.exemplar_labels.astype(int)]
                              for k in knowledge]).astype(np.float64)
    prec = np.linalg.inv(ledoit_wolf(centred, assume_centered=True)[0])
    ref = np.zeros((30, len(knowledge)))
    for t, k in enumerate(knowledge):
        diffs = x[:, None, :].astype(np.float64) - k.maha.class_means[None].astype(np.float64)
        d2 = np.einsum("ncd,de,nce->nc", diffs, prec, diffs)
        ref[:, t] = (-0.5 * d2).max(axis=1)
    sel = mapper.task_scores(x)
    np.testing.assert_allclose(sel, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    small = MahalanobisMapper.from_knowledge(knowledge, block_rows=3, block_elements=20)  # many blocks
    assert len(small.layout.blocks) > 1
    np.testing.assert_allclose(small.task_scores(x), sel, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # class_scores is in task order: task t's best class is its task score
    cls = mapper.class_scores(x)
    ends = np.cumsum([k.num_classes for k in knowledge])
    np.testing.assert_allclose(np.maximum.reduceat(cls, np.r_[0, ends[:-1]], axis=1), sel, rtol=1e-5)


def test_open_set_metric_is_the_tasks_own_exemplar_ledoit_wolf(bank):
    """Students score 'unknown' in the metric the teacher calibrated: the task's own exemplars only."""
    transform, knowledge = bank
    rng = np.random.default_rng(15)
    x = transform_features(np.abs(rng.normal(1, 1, (25, D))), transform)
    for k in knowledge[:2]:
        m = k.maha
        centred = (m.exemplars - m.class_means[m.exemplar_labels.astype(int)]).astype(np.float64)
        prec = np.linalg.inv(ledoit_wolf(centred, assume_centered=True)[0])
        diffs = x[:, None, :].astype(np.float64) - m.class_means[None].astype(np.float64)
        ref = (-0.5 * np.einsum("ncd,de,nce->nc", diffs, prec, diffs)).max(axis=1)
        np.testing.assert_allclose(mahalanobis_task_score(m, x), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    mapper = MahalanobisMapper.from_knowledge(knowledge)
    sel = mapper.task_scores(x)
    best = sel.argmax(axis=1)
    expect = [mahalanobis_task_score(knowledge[b].maha, x[i:i + 1])[0] for i, b in enumerate(best)]
    np.testing.assert_allclose(mapper.open_set_scores(x, best, sel), expect, rtol=1e-6)


def test_scatter_stats_match_sklearn_shrinkage():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(120, 30)) * rng.uniform(0.1, 3.0, 30)
    stats = ScatterStats.empty(30)
    for part in np.array_split(x, 4):  # streaming, as packets arrive
        stats.add(part)
    for method, ref in (("ledoit_wolf", ledoit_wolf), ("oas", oas)):
        cov, shrink = stats.shrunk(method)
        ref_cov, ref_shrink = ref(x, assume_centered=True)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-12)
        assert shrink == pytest.approx(ref_shrink, rel=1e-9)


# ---------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("kind", ["gmmc", "maha"])
def test_mapper_picks_the_right_task(tasks, bank, kind):
    _, knowledge = bank
    mapper = build_mapper(kind, knowledge)
    false_unknown = []
    for t, (name, (_, _, xt, _)) in enumerate(tasks.items()):
        res = mapper.predict(xt)
        assert res.task_names[t] == name
        assert np.mean(res.task_index == t) >= 0.98, (kind, name)
        assert res.scores.shape == (xt.shape[0], 5)
        assert np.all((res.confidence > 0.2) & (res.confidence <= 1.0 + 1e-6))
        false_unknown.append(np.mean(res.unknown))
        assert res.tasks[0] in res.task_names
    # thresholds sit at the 1st percentile of 60 held-out points: ~1-5 % of own test data is "unknown"
    assert max(false_unknown) < 0.15 and np.mean(false_unknown) < 0.07, false_unknown


@pytest.mark.parametrize("kind", ["gmmc", "maha"])
def test_far_away_inputs_are_unknown(tasks, kind):
    knowledge = [knowledge_for(n, x, y, "raw") for n, (x, y, _, _) in tasks.items()]
    mapper = build_mapper(kind, knowledge)
    far = np.abs(np.random.default_rng(7).normal(40.0, 5.0, (50, D))).astype(np.float32)
    assert mapper.predict(far).unknown.all()


def test_confidence_is_task_posterior(bank):
    _, knowledge = bank
    mapper = GmmcMapper.from_knowledge(knowledge)
    res = mapper.predict(np.abs(np.random.default_rng(8).normal(1, 1, (10, D))))
    s = res.scores.astype(np.float64) / mapper.temperature  # the posterior, tempered as calibrated
    p = np.exp(s - logsumexp(s, axis=1, keepdims=True))
    np.testing.assert_allclose(res.confidence, p.max(axis=1), rtol=1e-5)
    assert mapper.temperature == pytest.approx(56.0 / 1664 * D)


@pytest.mark.parametrize("kind, at_lite0", [("gmmc", 56.0), ("maha", 32.0)])
def test_temperature_scales_with_the_anchors_width(kind, at_lite0):
    """Log-likelihood gaps grow with the width of the anchors' space, so the calibrated temperature
    does too: Lite0's 1,664 keeps the value fitted there, Xception's 3,504 gets 3504/1664 of it
    (a fixed Lite0 value left Xception's task confidence with an ECE of 0.11)."""
    rng = np.random.default_rng(3)
    by_width = {}
    for width in (1664, 3504):
        x = np.abs(rng.normal(1, 1, (120, width))).astype(np.float32)
        y = np.repeat([0, 1], 60)
        mp = build_mapper(kind, [knowledge_for("a", x, y, "raw"), knowledge_for("b", x + 1, y, "raw")])
        by_width[width] = mp.temperature
    assert by_width[1664] == pytest.approx(at_lite0)
    assert by_width[3504] == pytest.approx(at_lite0 * 3504 / 1664)
    mp.temperature = 7.0  # an explicit value overrides the rule
    assert mp.temperature == 7.0
    with pytest.raises(MapperError, match="temperature"):
        mp.temperature = 0.0


def test_a_bank_of_reduced_packets_gets_the_reduced_temperature():
    """Anchors that came in 3-bit packets with thinned exemplars score with narrower gaps (a wider tied
    covariance), so the Mahalanobis temperature moves from 32 to 22 at 1,664 wide, in proportion to the
    exemplar rows that came reduced; own records and 8-bit packets keep 32 (GMMC keeps its one value)."""
    from skill_edge.runtime.exchange.keys import DeviceKey
    from skill_edge.runtime.exchange.packet import PacketCodec
    from skill_edge.runtime.mapping.mapper import maha_was_reduced

    rng = np.random.default_rng(5)
    width = 1664
    own = []
    for i in range(3):
        x = np.abs(rng.normal(1, 1, (90, width))).astype(np.float32) + i
        k = knowledge_for(f"t{i}", x, np.repeat([0, 1, 2], 30), "raw")
        own.append(replace(k, meta=replace(k.meta, agent_id="dev-a", rom_fingerprint="ab" * 32)))
    codec, key = PacketCodec(), DeviceKey.generate()

    def sent(k, plan):
        return codec.decode(codec.encode(k, key, plan=plan)).knowledge

    small = [sent(k, "int3+exemplars=2") for k in own]
    assert [maha_was_reduced(k) for k in own + small] == [False] * 3 + [True] * 3
    assert not maha_was_reduced(sent(own[0], "int8")) and not maha_was_reduced(sent(own[0], "fp32"))
    assert build_mapper("maha", own).temperature == pytest.approx(32.0)
    assert build_mapper("maha", [sent(k, "int8") for k in own]).temperature == pytest.approx(32.0)
    assert build_mapper("maha", small).temperature == pytest.approx(22.0)
    mixed = build_mapper("maha", [own[0], *small[1:]])
    rows = [own[0].maha.exemplars.shape[0], *(k.maha.exemplars.shape[0] for k in small[1:])]
    assert rows[0] > rows[1]  # thinned: fewer rows from each reduced packet
    share = sum(rows[1:]) / sum(rows)
    assert mixed.reduced_share == pytest.approx(share)
    assert mixed.temperature == pytest.approx(32.0 * (1 - share) + 22.0 * share)
    assert build_mapper("gmmc", small).temperature == build_mapper("gmmc", own).temperature


def test_transform_mismatch_refused(tasks):
    (n0, (x0, y0, _, _)), (n1, (x1, y1, _, _)) = list(tasks.items())[:2]
    mixed = [knowledge_for(n0, x0, y0, "raw"), knowledge_for(n1, x1, y1, "sqrt_l2")]
    for kind in ("gmmc", "maha"):
        with pytest.raises(MapperError, match="different feature spaces"):
            build_mapper(kind, mixed)


def test_bad_inputs_are_refused(bank):
    _, knowledge = bank
    with pytest.raises(MapperError, match="duplicate task names"):
        GmmcMapper.from_knowledge([knowledge[0], knowledge[0]])
    no_gmmc = TaskKnowledge.from_parts(knowledge[0].metadata(),
                                       {k: v for k, v in knowledge[0].tensors().items() if not k.startswith("gmmc")})
    with pytest.raises(MapperError, match="no GMMC anchor"):
        GmmcMapper.from_knowledge([no_gmmc, knowledge[1]])
    mapper = MahalanobisMapper.from_knowledge(knowledge)
    with pytest.raises(MapperError, match="anchors are 24 wide"):
        mapper.predict(np.zeros((3, D + 1)))
    with pytest.raises(MapperError, match="NaN"):
        mapper.predict(np.full((3, D), np.nan))
    with pytest.raises(MapperError, match="unknown mapper kind"):
        build_mapper("knn", knowledge)


def test_round_trip_through_parts_scores_identically(bank):
    """Anchors survive the bank/packet representation (metadata + float32 tensors)."""
    _, knowledge = bank
    again = [TaskKnowledge.from_parts(k.metadata(), k.tensors()) for k in knowledge]
    x = np.abs(np.random.default_rng(9).normal(1, 1, (16, D)))
    for kind in ("gmmc", "maha"):
        a, b = build_mapper(kind, knowledge).predict(x), build_mapper(kind, again).predict(x)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_mapper_memory_is_linear_in_tasks():
    rng = np.random.default_rng(10)

    def anchors(n: int) -> list[GmmcAnchor]:
        return [GmmcAnchor(rng.normal(size=(4, 16)).astype(np.float32), np.ones((4, 16), np.float32),
                           np.full(4, 0.25, np.float32)) for _ in range(n)]

    small = GmmcMapper([f"t{i}" for i in range(10)], anchors(10)).nbytes()
    large = GmmcMapper([f"t{i}" for i in range(40)], anchors(40)).nbytes()
    per_task = (large - small) / 30
    # coef + const rows, plus threshold, count, first row and stride per task
    assert per_task == pytest.approx(4 * (2 * 16 + 1) * 4 + 4 * 8, rel=0.01)


# ---------------------------------------------------------------------------- trunk statistics
def make_style_tasks(rng: np.random.Generator, n: int = 240) -> dict[str, tuple[np.ndarray, ...]]:
    """Two tasks whose pooled features come from one distribution (same classes, same clusters) but
    whose trunk statistics differ: only the trunk transform can tell them apart."""
    centers = rng.normal(1.0, 1.0, (2, D))
    style = {"pencil": rng.uniform(0.5, 1.5, 16), "ink": rng.uniform(0.5, 1.5, 16)}
    out = {}
    for name, level in style.items():
        rows = []
        for count in (n, n // 3):
            y = np.arange(count) % 2
            x = np.maximum(centers[y] + rng.normal(0.0, 0.8, (count, D)), 0.0).astype(np.float32)
            mean = np.abs(level + rng.normal(0.0, 0.15, (count, 8 * 2)))[:, :8]
            std = np.abs(level[8:] + rng.normal(0.0, 0.15, (count, 8)))
            rows.append((x, y, np.concatenate([mean, std], axis=1).astype(np.float32)))
        out[name] = (*rows[0], *rows[1])
    return out


def test_sqrt_l2_trunk_normalises_each_block_and_needs_trunk_stats():
    rng = np.random.default_rng(3)
    x, t = np.abs(rng.normal(size=(5, D))), np.abs(rng.normal(size=(5, 12)))
    z = transform_features(x, "sqrt_l2_trunk", t)
    assert z.shape == (5, D + 12)
    np.testing.assert_allclose(z[:, :D], transform_features(x, "sqrt_l2"), rtol=1e-6)
    for block in (z[:, :D], z[:, D:D + 6], z[:, D + 6:]):  # features, trunk means, trunk stds
        np.testing.assert_allclose(np.linalg.norm(block, axis=1), 1.0, rtol=1e-5)
    with pytest.raises(AnchorError, match="needs the ROM's trunk statistics"):
        transform_features(x, "sqrt_l2_trunk")
    with pytest.raises(AnchorError, match="trunk statistics must be"):
        transform_features(x, "sqrt_l2_trunk", t[:, :11])  # odd width: not mean | std
    with pytest.raises(AnchorError, match="trunk statistics must be"):
        transform_features(x, "sqrt_l2_trunk", t[:4])


@pytest.mark.parametrize("kind", ["gmmc", "maha"])
def test_trunk_statistics_separate_tasks_whose_features_overlap(kind):
    tasks = make_style_tasks(np.random.default_rng(11))
    acc = {}
    for transform in ("sqrt_l2", "sqrt_l2_trunk"):
        bank = [knowledge_for(n, x, y, transform, k=4, seed=i, trunk_stats=s if transform != "sqrt_l2" else None)
                for i, (n, (x, y, s, _, _, _)) in enumerate(tasks.items())]
        mapper = build_mapper(kind, bank)
        right = [mapper.predict(xt, st if transform != "sqrt_l2" else None).task_index == i
                 for i, (_, _, _, xt, _, st) in enumerate(tasks.values())]
        acc[transform] = float(np.mean(np.concatenate(right)))
    assert acc["sqrt_l2"] < 0.65, acc  # the features alone cannot tell the tasks apart
    assert acc["sqrt_l2_trunk"] > 0.95, acc


def test_trunk_bank_refuses_features_without_trunk_stats_and_mismatched_widths():
    tasks = make_style_tasks(np.random.default_rng(12))
    bank = [knowledge_for(n, x, y, "sqrt_l2_trunk", k=3, trunk_stats=s) for n, (x, y, s, *_) in tasks.items()]
    assert bank[0].anchor_dim == D + 16 and bank[0].feature_dim == D
    xt, st = tasks["ink"][3], tasks["ink"][5]
    mapper = build_mapper("maha", bank)
    with pytest.raises(MapperError, match="needs the ROM's trunk statistics"):
        mapper.predict(xt)
    with pytest.raises(MapperError, match=f"anchors are {D + 16} wide"):
        mapper.predict(xt, np.concatenate([st, st], axis=1))  # another ROM's trunk: wider
    # a record whose anchors do not fit its transform is malformed, whatever sent it
    from skill_edge.runtime.knowledge.records import KnowledgeError

    flat = TaskKnowledge.from_parts(bank[0].metadata(), bank[0].tensors())
    flat.meta.feature_transform = "sqrt_l2"
    with pytest.raises(KnowledgeError, match="must have the head's width"):
        flat.validate()
    narrow = knowledge_for("n", tasks["ink"][0], tasks["ink"][1], "sqrt_l2", k=3)
    narrow.meta.feature_transform = "sqrt_l2_trunk"
    with pytest.raises(KnowledgeError, match="wider than the head"):
        narrow.validate()


def test_mahalanobis_task_scores_of_a_subset_equal_the_full_columns():
    rng = np.random.default_rng(3)
    ks = [knowledge_for(f"t{i}", *make_task(rng, n_classes=2 + i % 3, n=120, shift=1.5)[:2], "raw", seed=i)
          for i in range(5)]
    m = MahalanobisMapper.from_knowledge(ks)
    x = rng.normal(size=(40, ks[0].feature_dim)).astype(np.float32)
    full = m.task_scores(x)
    for tasks in ([4, 0], [2], [1, 3, 4]):
        np.testing.assert_allclose(m.task_scores_of(x, tasks), full[:, tasks], rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- open set over both anchors
@pytest.mark.parametrize("kind", ["gmmc", "maha"])
def test_open_set_rejects_when_either_anchor_of_the_chosen_task_does(tasks, kind):
    """Records with both anchors: the chosen task rejects an input when its GMMC threshold or its
    Mahalanobis one does; ``own_anchor`` keeps the mapper's own test alone, and a record sent with
    one anchor only is tested by that one."""
    knowledge = [knowledge_for(n, x, y, "raw") for n, (x, y, _, _) in tasks.items()]
    rng = np.random.default_rng(11)
    xt = np.concatenate([v[2] for v in tasks.values()]
                        + [np.abs(rng.normal(2.0, 1.5, (200, D))).astype(np.float32)])  # some near, some not
    both = build_mapper(kind, knowledge)
    alone = {k: build_mapper(k, knowledge, open_set="own_anchor") for k in ("gmmc", "maha")}
    x = both.prepare(xt)
    sel = both.task_scores(x)
    best = sel.argmax(1)
    per_kind = {k: m.anchor_margins(x, best, m.task_scores(x)) for k, m in alone.items()}
    np.testing.assert_allclose(per_kind[kind], alone[kind].open_set_scores(x, best, sel) - alone[kind].thresholds[best])
    fused = both.anchor_margins(x, best, sel)
    np.testing.assert_allclose(fused, np.minimum(per_kind["gmmc"], per_kind["maha"]), rtol=1e-5, atol=1e-3)
    lead = runner_up_gap(sel, best)  # the chosen task's lead over the next, added to the anchors' margin
    np.testing.assert_allclose(both.open_set_margins(x, best, sel), fused + lead, rtol=1e-5, atol=1e-3)
    got = both.predict(xt).unknown
    assert np.array_equal(got, np.minimum(per_kind["gmmc"], per_kind["maha"]) + lead < 0)
    # the two tests disagree on some inputs here, so the rule is not one of them in disguise
    assert np.any((per_kind["gmmc"] < 0) != (per_kind["maha"] < 0))
    assert np.array_equal(alone[kind].predict(xt).unknown, per_kind[kind] + lead < 0)
    other = "maha" if kind == "gmmc" else "gmmc"
    one_anchor = [replace(k, **{other: None}, thresholds={kind: k.thresholds[kind]}) for k in knowledge]
    assert build_mapper(kind, one_anchor).other_tests is None
    assert np.array_equal(build_mapper(kind, one_anchor).predict(xt).unknown, per_kind[kind] + lead < 0)
    # a task whose record lacks the other anchor passes that test; the others keep it
    mixed = [one_anchor[0]] + knowledge[1:]
    m = build_mapper(kind, mixed)
    idx = np.zeros(len(x), dtype=np.int64)
    np.testing.assert_allclose(m.anchor_margins(x, idx, sel), per_kind_at(alone[kind], x, idx))
    with pytest.raises(MapperError, match="open_set"):
        build_mapper(kind, knowledge, open_set="sometimes")


def test_runner_up_gap_is_the_lead_over_the_next_task_and_zero_alone():
    sel = np.array([[5.0, 2.0, 4.0], [1.0, 3.0, -np.inf], [0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(runner_up_gap(sel, np.array([0, 1, 2])), [1.0, 2.0, 0.0])
    np.testing.assert_array_equal(runner_up_gap(sel, np.array([2, 0, 0])), [-1.0, -2.0, 0.0])  # not the best: behind
    np.testing.assert_array_equal(runner_up_gap(sel[:, :1], np.zeros(3, np.int64)), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(runner_up_gap(np.array([[1.0, -np.inf]]), np.array([0])), [0.0])  # not finite


def test_the_lead_over_the_runner_up_finds_a_missing_task_between_two_known_ones():
    """Three tasks on a line; the middle one is missing from the bank.  Its images sit between the two
    known tasks, so their lead is small; a known task's own images lead clearly.  The lead only ever
    clears inputs: nothing the anchors alone accept is rejected."""
    rng = np.random.default_rng(3)
    axis = np.zeros(D, np.float32)
    axis[:2] = 1.0

    def task(centre: float, n: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.abs(centre * axis + rng.normal(0, 1.0, (n, D))).astype(np.float32)
        return x, np.repeat([0, 1], n // 2)

    (xa, ya), (xb, yb), (xmid, _) = task(1.0, 240), task(4.0, 240), task(2.5, 120)
    bank = [knowledge_for("left", xa, ya, "raw", seed=0), knowledge_for("right", xb, yb, "raw", seed=1)]
    mp = build_mapper("maha", bank)
    known_x = np.concatenate([task(1.0, 120)[0], task(4.0, 120)[0]])

    def knownness(m, x):
        z = m.prepare(x)
        sel = m.task_scores(z)
        return m.open_set_margins(z, sel.argmax(1), sel)

    def auroc(pos, neg):
        return float(np.mean(pos[:, None] > neg[None, :]) + 0.5 * np.mean(pos[:, None] == neg[None, :]))

    plain = build_mapper("maha", bank)
    plain.runner_up_weight = 0.0
    with_lead, without = (auroc(knownness(m, known_x), knownness(m, xmid)) for m in (mp, plain))
    assert with_lead > 0.8 and without < 0.6, (with_lead, without)  # 0.85 and 0.54 here
    for x in (known_x, xmid):
        assert not np.any(mp.predict(x).unknown & ~plain.predict(x).unknown)


def per_kind_at(mapper, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The mapper's own-anchor margins with every input assigned to task ``idx``."""
    return mapper.open_set_scores(x, idx, mapper.task_scores(x)) - mapper.thresholds[idx]


def test_mahalanobis_state_round_trips_and_bad_state_is_refused(tasks):
    knowledge = [knowledge_for(n, x, y, "raw") for n, (x, y, _, _) in tasks.items()]
    built = build_mapper("maha", knowledge)
    again = build_mapper("maha", knowledge, state=built.state())
    xt = np.concatenate([v[2] for v in tasks.values()])
    np.testing.assert_array_equal(again.task_scores(again.prepare(xt)), built.task_scores(built.prepare(xt)))
    assert np.array_equal(again.predict(xt).unknown, built.predict(xt).unknown)
    for bad in ({**built.state(), "means_w": built.means_w[:-1]},  # another bank's classes
                {k: v for k, v in built.state().items() if k != "whiten_t"},
                {**built.state(), "center": np.full(D, np.nan, np.float32)}):
        with pytest.raises(MapperError, match="saved mapper state"):
            build_mapper("maha", knowledge, state=bad)


def test_predict_without_open_set_runs_no_open_set_test(tasks, monkeypatch):
    knowledge = [knowledge_for(n, x, y, "raw") for n, (x, y, _, _) in tasks.items()]
    mp = build_mapper("gmmc", knowledge)
    far = np.abs(np.random.default_rng(7).normal(40.0, 5.0, (20, D))).astype(np.float32)
    assert mp.predict(far).unknown.all()

    def boom(*a, **k):
        raise AssertionError("an open-set test ran")

    monkeypatch.setattr(mp, "open_set_margins", boom)
    res = mp.predict(far, open_set=False)
    assert not res.unknown.any() and res.task_index.shape == (20,)
