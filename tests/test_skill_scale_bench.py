"""The degradation study's bookkeeping (benchmarks/skill_scale.py) on small synthetic tasks:
zero crossings, the per-T metrics, the shortcut for mappers whose task scores are separable, and
the simulation's moved tasks.  The study itself needs the 71 tasks' cached features."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from bench_modules import load_benchmark
from skill_edge.runtime.learn.head import train_head

from test_mapper import knowledge_for, make_task

ss = load_benchmark("skill_scale")
TRANSFORM = "sqrt_l2"


def test_zero_crossing_only_for_a_falling_line():
    assert ss.zero_crossing(-0.0005, 0.978) == pytest.approx(1956)
    for slope in (0.0, 1e-9, -1e-9, 0.002):  # flat or rising: never "zero at 44,425,869,123,073,504"
        assert ss.zero_crossing(slope, 0.9) is None
    assert ss.fmt_zero(None) == "no zero crossing"
    assert ss.fmt_zero(1956.2) == "1,956"
    fit = ss.fit_line(np.arange(1, 11, dtype=float), 1.0 - 0.01 * np.arange(1, 11))
    assert fit["slope"] == pytest.approx(-0.01) and fit["zero_at"] == pytest.approx(100)
    assert ss.predict(fit, 1000) == 0.0  # clipped, not negative accuracy


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    tasks, knowledge = [], []
    for i in range(6):
        x, y, xt, yt = make_task(rng, n_classes=2 + i % 3, n=200, shift=0.15)  # overlapping tasks
        name = f"omniglot-a{i}" if i < 3 else f"domain{i}"
        tasks.append(ss.Task(name, [f"c{j}" for j in range(int(y.max()) + 1)], x, y, None, xt, yt, None))
        head = train_head(x, y, int(y.max()) + 1)
        knowledge.append(dataclasses.replace(knowledge_for(name, x, y, TRANSFORM, seed=i),
                                             head_weight=head.weight, head_bias=head.bias))
    rows = ss.eval_rows(tasks, knowledge, max_test=80, seed=0)
    omni = np.array([t.omniglot for t in tasks])
    return tasks, knowledge, rows, omni


def test_one_task_is_always_found_and_metrics_are_per_task_means(small):
    _, knowledge, rows, omni = small
    orders = [np.random.default_rng(o).permutation(6) for o in range(2)]
    note = {}
    for kind in ("gmmc", "maha"):
        c = ss.curves(kind, knowledge, rows, orders, list(range(1, 7)), omni, 0, note)
        assert np.all(c["normalized"][:, 0] == 1.0) and np.all(c["task_id"][:, 0] == 1.0)
        # the oracle column is the same heads whatever the mapper, averaged over the tasks held
        assert np.all((c["oracle"] > 0.5) & (c["oracle"] <= 1.0))
        assert np.all(c["absolute"] <= c["oracle"] + 1e-12)
        # with every task held, the family split covers both families and averages to the whole
        fam, rest = c["task_id_omniglot"][:, -1], c["task_id_rest"][:, -1]
        assert np.allclose((3 * fam + 3 * rest) / 6, c["task_id"][:, -1])
        assert np.allclose(c["normalized"][0, -1], c["normalized"][1, -1])  # same tasks, any order
    assert c["task_id"][0, -1] < 1.0  # the tasks overlap: the mapper has something to get wrong
    assert note == {"gmmc": "one score matrix, columns per T", "maha": "mapper rebuilt for every T"}


def test_separable_shortcut_decides_as_a_rebuilt_mapper(small, monkeypatch):
    _, knowledge, rows, omni = small
    orders = [np.random.default_rng(5).permutation(6)]
    fast = ss.curves("gmmc", knowledge, rows, orders, list(range(1, 7)), omni, 0)
    monkeypatch.setattr(ss, "separable", lambda *a, **k: (False, None))
    slow = ss.curves("gmmc", knowledge, rows, orders, list(range(1, 7)), omni, 0)
    for m in ("normalized", "task_id"):
        np.testing.assert_allclose(fast[m], slow[m], atol=1e-3)


def test_a_synthetic_task_is_its_parent_moved(small):
    from skill_edge.runtime.mapping.mapper import build_mapper

    _, knowledge, rows, omni = small
    syn, srows, parents = ss.synthetic(knowledge, rows, omni, n=8, per_task=30, seed=1)
    assert len(syn) == 8 and len({k.task for k in syn}) == 8
    for s, p in enumerate(parents):
        k, parent = syn[s], knowledge[p]
        delta = k.gmmc.means[0] - parent.gmmc.means[0]
        assert np.linalg.norm(delta) > 0
        np.testing.assert_allclose(k.maha.class_means - parent.maha.class_means, np.tile(delta, (parent.num_classes, 1)),
                                   atol=1e-5)
        # scores are translation invariant: the moved task scores its moved rows as the parent its own
        x = srows.z[srows.task == s]
        a = build_mapper("gmmc", [k]).task_scores(x)[:, 0]
        b = build_mapper("gmmc", [parent]).task_scores(x - delta)[:, 0]
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-2)
        assert omni[p] == omni[parents[s]]
    # the offsets come from the parent's own family: an Omniglot child moves by an Omniglot spread
    assert dataclasses.is_dataclass(srows)


def test_simulation_is_calibrated_on_the_real_curve_and_runs_past_it(small):
    import types

    _, knowledge, rows, omni = small
    orders = [np.random.default_rng(o).permutation(6) for o in range(2)]
    real = {k: {"curves": {m: ss.summary(v) for m, v in ss.curves(k, knowledge, rows, orders, list(range(1, 7)),
                                                                   omni, 0).items()}} for k in ("gmmc", "maha")}
    args = types.SimpleNamespace(sim_tasks=12, sim_test=10, sim_orders=2, sim_grid=[1, 3, 6, 9, 12],
                                 sim_scales=[0.5, 1.0], seed=0)
    sim = ss.simulate(["gmmc", "maha"], knowledge, rows, omni, args, real)
    assert sim["t"] == [1, 3, 6, 9, 12] and sim["calibration_t"] == [1, 3, 6]
    for kind, r in sim["kinds"].items():
        assert r["scale"] in (0.5, 1.0) and r["scale"] == min(r["calibration_rms"], key=r["calibration_rms"].get)
        assert r["normalized"]["mean"][0] == 1.0 and len(r["normalized"]["mean"]) == 5
        assert ("uncalibrated" in r) == (r["scale"] != 1.0)
