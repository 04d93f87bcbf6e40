"""The fleet at scale: several task roots in one fixed order, cached features, per-mapper packet budgets,
fits and plots that stay readable at 71 tasks (issue 18).  Fast: no ROM, no device processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skill_edge.firmware_sim.agent import compose_steps, load_feature_task
from skill_edge.firmware_sim.curves import Curves, fit_dict, fit_label, plot_curves, plot_task_confusion, pooled_fit
from skill_edge.firmware_sim.tasks import TaskRootError, discover_tasks, family, feature_task_files


def _root(path: Path, tasks: list[str], listed: bool = True) -> Path:
    for t in tasks:
        (path / t / "train" / "a").mkdir(parents=True)
    if listed:
        (path / "tasks.json").write_text(json.dumps([{"task": t} for t in tasks]))
    return path


def test_several_roots_give_one_fixed_order_and_a_shared_name_is_refused(tmp_path: Path) -> None:
    a = _root(tmp_path / "bench", ["mnist", "cifar", "omniglot-greek"])  # tasks.json order, not sorted
    b = _root(tmp_path / "more", ["zeta", "alpha"], listed=False)  # no tasks.json: sorted folders
    tasks = discover_tasks([a, b])
    assert [t.name for t in tasks] == ["mnist", "cifar", "omniglot-greek", "alpha", "zeta"]
    assert [t.root for t in tasks] == [a, a, a, b, b] and tasks[0].path == a / "mnist"
    assert [t.name for t in discover_tasks([b, a])][:2] == ["alpha", "zeta"]  # roots in the order given
    c = _root(tmp_path / "clash", ["cifar"])
    with pytest.raises(TaskRootError, match="'cifar' is in both"):
        discover_tasks([a, c])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskRootError, match="no task folders"):
        discover_tasks([tmp_path / "empty"])
    assert family("omniglot-greek") == "omniglot" and family("mnist") == "mnist"


def _npz(root: Path, task: str, classes: int, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / task).mkdir(parents=True)
    for split in ("train", "test"):
        y = np.repeat(np.arange(classes), per_class)
        np.savez(root / task / f"{split}.npz", features=rng.normal(size=(len(y), 6)).astype(np.float32), labels=y,
                 classes=np.array([f"c{i}" for i in range(classes)]),
                 trunk_stats=rng.normal(size=(len(y), 4)).astype(np.float32))


def test_cached_features_become_feature_tasks_from_the_first_root_that_has_them(tmp_path: Path) -> None:
    f1, f2 = tmp_path / "f1", tmp_path / "f2"
    _npz(f1, "mnist", 3, 4, 0)
    _npz(f2, "omniglot-greek", 5, 2, 1)
    _npz(f2, "mnist", 2, 2, 2)  # shadowed by f1's
    files = feature_task_files([f1, f2], ["omniglot-greek", "mnist"], "fp", tmp_path / "out")
    assert list(files) == ["omniglot-greek", "mnist"]
    ft = load_feature_task(files["mnist"])
    assert ft.classes == ["c0", "c1", "c2"] and ft.train_features.shape == (12, 6)
    assert ft.train_trunk_stats.shape == (12, 4) and ft.rom_fingerprint == "fp"
    src = np.load(f1 / "mnist" / "test.npz")
    np.testing.assert_array_equal(ft.test_features, src["features"])
    # a resumed run reuses the files it made (same bytes, not rewritten)
    before = files["mnist"].stat().st_mtime_ns
    assert feature_task_files([f1, f2], ["mnist"], "fp", tmp_path / "out")["mnist"].stat().st_mtime_ns == before
    # shares of classes, labels renumbered inside each share; a lone trailing class joins the last share
    shares = feature_task_files([f2], ["omniglot-greek"], "fp", tmp_path / "shares", classes_per_share=2)
    assert list(shares) == ["omniglot-greek-part01", "omniglot-greek-part02"]
    last = load_feature_task(shares["omniglot-greek-part02"])
    assert last.classes == ["c2", "c3", "c4"] and sorted(set(last.train_labels.tolist())) == [0, 1, 2]
    with pytest.raises(TaskRootError, match="no cached features for task 'fashion'"):
        feature_task_files([f1], ["fashion"], "fp", tmp_path / "out")


def test_composed_step_is_at_least_as_lossy_as_each_mapper_needs() -> None:
    assert compose_steps(["int4+gmmc_k=20", "int8+exemplars=2"]) == "int4+gmmc_k=20+exemplars=2"
    assert compose_steps(["fp16", "int3+exemplars=1+head_int2"]) == "int3+exemplars=1+head_int2"
    assert compose_steps(["int3+gmmc_k=7", "int3+gmmc_k=12+bb_int8"]) == "int3+gmmc_k=7+bb_int8"
    assert compose_steps(["fp32"]) == "fp32"
    with pytest.raises(ValueError, match="unknown precision"):
        compose_steps(["int9"])


def test_a_flat_fit_has_no_zero_crossing_and_a_falling_one_says_where() -> None:
    flat = fit_dict(-4e-9, 0.97, 0.97 / 4e-9)  # the fault: "zero at N = 242,500,000"
    assert flat["flat"] and flat["zero_at_tasks"] is None
    assert fit_label(-4e-9, 0.97, 0.97 / 4e-9) == "y = -0.0000 T + 0.970, flat: no zero crossing"
    assert fit_label(0.002, 0.9, float("inf")).endswith("flat: no zero crossing")
    assert fit_label(-0.0005, 0.978, 1956.0) == "y = -0.0005 T + 0.978, zero at T = 1,956"
    json.dumps(flat, allow_nan=False)  # the result file stays strict JSON


def _curve(slope: float, n: int, noise: float, seed: int) -> Curves:
    """A lower-triangular accuracy matrix whose normalized mean falls by ``slope`` per task."""
    rng = np.random.default_rng(seed)
    acc = [[min(1.0, 0.9 * (1 + slope * (t - j)) + noise * rng.normal()) for j in range(t + 1)] for t in range(n)]
    return Curves("SKILL (GMMC)", acc, [f"task-{i}" for i in range(n)])


def test_pooled_fit_over_orders_reports_the_spread_and_predictions() -> None:
    curves = [_curve(-0.004, 30, 0.01, s) for s in range(5)]
    f = pooled_fit(curves)
    assert f["orders"] == 5 and f["tasks"] == 30 and len(f["per_order_slopes"]) == 5
    assert -0.004 < f["slope"] < -0.001 and f["slope_min"] <= f["slope"] <= f["slope_max"] and f["slope_std"] > 0
    assert f["zero_at_tasks"] == pytest.approx(-f["intercept"] / f["slope"])
    assert f["predicted_at"]["102"] == pytest.approx(f["slope"] * 102 + f["intercept"])


def test_task_axes_are_whole_numbers_named_by_task(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from skill_edge.firmware_sim.curves import _task_axis

    names = [f"omniglot-alphabet-{i}" for i in range(71)]
    for n in (4, 71):
        fig, ax = plt.subplots()
        ax.plot(range(1, n + 1), np.linspace(1, 0.5, n))
        _task_axis(ax, n, names[:n], MaxNLocator)
        fig.canvas.draw()
        ticks = [t for t in ax.get_xticks() if 0.5 <= t <= n + 0.5]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks  # never "1.25 tasks"
        top = [c for c in ax.get_children() if type(c).__name__ == "SecondaryAxis"][0]
        labels = [t.get_text() for t in top.get_xticklabels()]
        assert labels[0] == f"1. {names[0]}" and labels[-1] == f"{n}. {names[n - 1]}"
        plt.close(fig)
    paths = plot_curves([_curve(-0.003, 71, 0.0, 0)], tmp_path, task_names=names)
    assert {"first_task", "mean_normalized", "mean_absolute"} <= set(paths)


def test_task_confusion_at_71_tasks_has_legible_cells(tmp_path: Path) -> None:
    n = 71
    names = [f"omniglot-a{i}" if i % 3 else f"dom{i}-x" for i in range(n)]
    m = np.eye(n) * 90 + np.random.default_rng(0).integers(0, 4, size=(n, n))
    path = tmp_path / "conf.png"
    plot_task_confusion(names, {"GMMC": m, "Mahalanobis": m.T}, path, title="t", family_of=family)
    w, h = Image.open(path).size
    # panels under each other at this size; at 110 dpi a cell is about 26 px, a 6.5 pt label about 10 px
    assert w / n >= 20 and h / (2 * n) >= 20, (w, h)


def test_fast_replays_give_exactly_the_curves_of_rebuilding_the_mapper_at_every_step() -> None:
    from test_mapper import knowledge_for, make_task

    from skill_edge.firmware_sim.curves import (incremental_matches, order_curves, replay_from_scores,
                                                scores_are_per_task, task_orders)

    rng = np.random.default_rng(7)
    ks, test_sets = [], {}
    for i in range(6):  # overlapping tasks, so the mappers make mistakes that depend on the order
        x, y, xt, yt = make_task(rng, n_classes=2 + i % 3, n=240, shift=0.6)
        ks.append(knowledge_for(f"task{i}", x, y, "raw", seed=i))
        test_sets[f"task{i}"] = (xt, yt, None)
    orders = task_orders(len(ks), 4, seed=3)
    assert orders[0] == list(range(6)) and len({tuple(o) for o in orders}) == 4
    per_task, scores = scores_are_per_task("gmmc", ks, test_sets)
    assert per_task  # a GMMC task's score is its own mixture's likelihood
    fast = replay_from_scores(ks, test_sets, scores, orders, name="SKILL (GMMC)")
    slow = order_curves(ks, test_sets, "gmmc", orders, name="SKILL (GMMC)")
    for f, s in zip(fast, slow):
        assert f.task_names == s.task_names
        np.testing.assert_allclose(np.concatenate(f.acc), np.concatenate(s.acc))
        np.testing.assert_allclose(np.concatenate(f.task_id), np.concatenate(s.task_id))
    assert min(np.concatenate(slow[0].task_id)) < 1.0  # the check means something: some images go astray
    # Mahalanobis shares one covariance across tasks: no single pass, but its scatter can grow task by task
    assert not scores_are_per_task("maha", ks, test_sets)[0]
    assert incremental_matches("maha", ks, test_sets)
    grown = order_curves(ks, test_sets, "maha", orders[:2], incremental=True)
    plain = order_curves(ks, test_sets, "maha", orders[:2])
    for g, p in zip(grown, plain):
        np.testing.assert_allclose(np.concatenate(g.acc), np.concatenate(p.acc))


def test_a_device_reports_its_own_peak_memory_not_its_launchers() -> None:
    import resource
    import subprocess
    import sys

    ballast = np.ones(60_000_000)  # 480 MB in the launcher, like a fleet driver holding every task's features
    code = ("import resource; from skill_edge.firmware_sim.agent import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    assert float(ballast.sum()) == 60_000_000
    assert own < 200 < 400 < inherited  # ru_maxrss carries the launcher's high-water mark across exec
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 400


def test_replayed_curves_score_a_bb_head_on_its_bb_pass() -> None:
    """A BB task's head reads its BB pass, not the plain features the mapper reads: both replays (one
    scoring pass, and the mapper rebuilt at every step) score it on ``head_inputs``.  Fed the plain
    features instead, a head trained on BB features scored near zero and the fleet report's Fig. 8 fell
    from 0.93 to 0.26 over 6 tasks."""
    import dataclasses

    from test_mapper import knowledge_for, make_task

    from skill_edge.firmware_sim.curves import order_curves, replay_from_scores, scores_are_per_task
    from skill_edge.runtime.learn.head import train_head

    rng = np.random.default_rng(3)
    ks, test_sets = [], {}
    for i in range(3):
        x, y, xt, yt = make_task(rng, n_classes=3, n=240, shift=3.0)  # well separated: the mapper is right
        head = train_head(x, y, 3)
        ks.append(dataclasses.replace(knowledge_for(f"task{i}", x, y, "raw", seed=i), head_weight=head.weight,
                                      head_bias=head.bias))
        test_sets[f"task{i}"] = (xt, yt, None)
    # task1's "BB pass": a fixed permutation of the features; its head is rewritten to read that space
    perm = rng.permutation(test_sets["task1"][0].shape[1])
    bb_head = ks[1].head_weight[:, perm]  # reads x[:, perm] as the plain head reads x
    ks[1] = dataclasses.replace(ks[1], head_weight=bb_head)
    head_inputs = {"task1": test_sets["task1"][0][:, perm]}
    _, scores = scores_are_per_task("gmmc", ks, test_sets)
    orders = [[0, 1, 2]]
    for curves in (replay_from_scores(ks, test_sets, scores, orders, name="g", head_inputs=head_inputs),
                   order_curves(ks, test_sets, "gmmc", orders, head_inputs=head_inputs)):
        final = curves[0].acc[-1]
        assert final[1] >= 0.9, final  # the BB head on its BB pass
    blind = order_curves(ks, test_sets, "gmmc", orders)[0].acc[-1]
    assert blind[1] < 0.7 and blind[0] == pytest.approx(final[0]), blind  # plain features: the head misreads
