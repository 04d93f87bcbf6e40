"""Lifelong-learning curves in the paper's terms, from an accuracy matrix.

``acc[t][j]`` is the accuracy on task ``j`` after ``t + 1`` tasks have been learned (``j <= t``).
From it come the three curves the paper plots:

* Fig. 4: accuracy on task 1 as more tasks are learned (``acc[t][0]``);
* Fig. 6: average *normalized* accuracy over the tasks learned so far, each task divided by its
  accuracy right after it was learned, with a fitted line and where it reaches zero;
* Fig. 8: average absolute accuracy over the tasks learned so far.

For SKILL the matrix comes from replaying the bank in task order: a mapper over the first
``t + 1`` tasks, then no-oracle classification of each of those tasks' test sets.  The same
replay over several random task orders (``order_curves``) gives the spread of those curves and
one line fitted through all of them (``pooled_fit``); ``plot_degradation`` draws them beside the
paper's line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from skill_edge.runtime.knowledge.records import TaskKnowledge
from skill_edge.runtime.mapping.mapper import build_mapper

# the paper's Fig. 6 line for GMMC (section 4): y = -0.0005 T + 0.978, zero at T = 1,956; Mahalanobis reaches
# zero at T = 2,445 (no slope given)
PAPER_FIT = {"gmmc": {"slope": -0.0005, "intercept": 0.978, "zero_crossing": 1956.0},
             "maha": {"slope": None, "intercept": None, "zero_crossing": 2445.0}}
FLAT_SLOPE = 1e-4  # |slope| per task below this: the line is flat, its zero crossing meaningless


@dataclass
class Curves:
    name: str
    acc: list[list[float]]  # lower-triangular accuracy matrix
    task_names: list[str] | None = None  # the order the tasks were learned in
    task_id: list[list[float]] | None = None  # same shape: fraction of each task's images mapped to it

    @property
    def tasks(self) -> int:
        return len(self.acc)

    @property
    def first_task(self) -> list[float]:
        return [row[0] for row in self.acc]

    @property
    def mean_absolute(self) -> list[float]:
        return [float(np.mean(row[: t + 1])) for t, row in enumerate(self.acc)]

    @property
    def mean_normalized(self) -> list[float]:
        out = []
        for t, row in enumerate(self.acc):
            vals = [row[j] / self.acc[j][j] for j in range(t + 1) if self.acc[j][j] > 0]
            out.append(float(np.mean(vals)) if vals else float("nan"))
        return out

    def normalized_fit(self) -> tuple[float, float, float]:
        """Least-squares line ``y = slope * n + intercept`` over n = 1..T, and where it hits zero."""
        return line_fit(np.arange(1, self.tasks + 1), np.asarray(self.mean_normalized))

    def mean_task_id(self, select: Sequence[bool] | None = None) -> list[float]:
        """Mean task-ID accuracy over the tasks learned so far (only those with ``select[j]``), per step."""
        if self.task_id is None:
            return []
        out = []
        for t, row in enumerate(self.task_id):
            vals = [row[j] for j in range(t + 1) if select is None or select[j]]
            out.append(float(np.mean(vals)) if vals else float("nan"))
        return out

    def to_dict(self) -> dict:
        slope, intercept, zero = self.normalized_fit()
        return {"name": self.name, "acc_matrix": self.acc, "first_task": self.first_task,
                "task_names": self.task_names, "task_id_matrix": self.task_id,
                "mean_absolute": self.mean_absolute, "mean_normalized": self.mean_normalized,
                "normalized_fit": fit_dict(slope, intercept, zero)}


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least squares ``y = slope x + intercept`` over the finite points, and the x where it reaches zero
    (``inf`` when the line does not fall)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(y)
    if ok.sum() < 2:
        return 0.0, float(y[ok][0]) if ok.any() else float("nan"), float("inf")
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    zero = -intercept / slope if slope < 0 else float("inf")
    return float(slope), float(intercept), float(zero)


def fit_dict(slope: float, intercept: float, zero: float) -> dict:
    """JSON-safe fit: ``zero_at_tasks`` is None (and ``flat`` true) when the line has no meaningful zero."""
    flat = not slope < -FLAT_SLOPE
    return {"slope": slope, "intercept": intercept, "zero_at_tasks": None if flat or not np.isfinite(zero) else zero,
            "flat": flat}


def fit_label(slope: float, intercept: float, zero: float | None, *, var: str = "T") -> str:
    """``y = -0.0031 T + 0.982, zero at T = 317`` or ``..., flat: no zero crossing``."""
    text = f"y = {slope:+.4f} {var} + {intercept:.3f}".replace("= +", "= ")
    if zero is None or not np.isfinite(zero) or slope >= -FLAT_SLOPE:
        return text + ", flat: no zero crossing"
    if zero > 1e5:
        return text + ", zero beyond 100,000 tasks"
    return text + f", zero at {var} = {zero:,.0f}"


def skill_curves(knowledge: Sequence[TaskKnowledge],
                 test_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                 mapper: str, *, name: str | None = None, incremental: bool = False,
                 head_inputs: dict[str, np.ndarray] | None = None) -> Curves:
    """Replay learning in ``knowledge`` order: after each new task, classify all seen test sets.

    ``test_sets`` maps task -> (features, labels, trunk statistics or None).  Features are the
    ROM's plain features, which the mapper reads; ``head_inputs`` maps a BB task to what its head reads
    on its own test rows (its BB pass, ``report.bb_head_inputs``), else the plain features feed the head.
    ``incremental`` (Mahalanobis only, see ``_prefix_covariances``) grows the tied covariance's scatter
    task by task instead of recomputing it at every step.
    """
    head_inputs = head_inputs or {}
    order = list(knowledge)
    acc: list[list[float]] = []
    tid: list[list[float]] = []
    covariances = _prefix_covariances(mapper, order) if incremental else None
    for t in range(len(order)):
        seen = order[: t + 1]
        mp = build_mapper(mapper, seen, covariance=next(covariances)) if covariances else build_mapper(mapper, seen)
        row, trow = [], []
        for j, k in enumerate(seen):
            x, y, stats = test_sets[k.task]
            res = mp.predict(x, stats, open_set=False)  # closed-set curves: the open-set tests would be wasted
            right = res.task_index == j
            logits = head_inputs.get(k.task, x) @ k.head_weight.T + k.head_bias
            correct = right & (logits.argmax(1) == y)
            row.append(float(correct.mean()) if len(y) else float("nan"))
            trow.append(float(right.mean()) if len(y) else float("nan"))
        acc.append(row)
        tid.append(trow)
    return Curves(name or f"SKILL ({mapper})", acc, [k.task for k in order], tid)


def _prefix_covariances(mapper: str, order: Sequence[TaskKnowledge]):
    """The Mahalanobis tied covariance after each step of ``order``: the exemplar scatter is summed task
    by task (``ScatterStats.add``, as ``exemplar_scatter`` sums it), then shrunk as the mapper does."""
    from skill_edge.runtime.mapping.mapper import ScatterStats

    if mapper != "maha":
        raise ValueError(f"incremental covariances are for the Mahalanobis mapper, not {mapper!r}")
    stats = None
    for k in order:
        a = k.maha
        if stats is None:
            stats = ScatterStats.empty(int(a.class_means.shape[1]))
        stats.add(a.exemplars.astype(np.float64) - a.class_means.astype(np.float64)[a.exemplar_labels.astype(np.int64)])
        yield stats.shrunk("ledoit_wolf")[0]


def incremental_matches(mapper: str, knowledge: Sequence[TaskKnowledge], test_sets) -> bool:
    """Whether ``_prefix_covariances`` gives the mapper ``build_mapper`` builds (same choices on a test set,
    at the first steps and with the whole bank); False for any other mapper or a changed recipe."""
    ks = list(knowledge)
    if mapper != "maha" or not ks:
        return False
    covs = _prefix_covariances(mapper, ks)
    checks = {min(2, len(ks)), len(ks)}
    for t in range(1, len(ks) + 1):
        cov = next(covs)
        if t not in checks:
            continue
        x, _, stats = test_sets[ks[t - 1].task]
        want = build_mapper(mapper, ks[:t]).predict(x, stats, open_set=False)
        got = build_mapper(mapper, ks[:t], covariance=cov).predict(x, stats, open_set=False)
        if not (np.array_equal(want.task_index, got.task_index) and np.allclose(want.scores, got.scores, rtol=1e-3,
                                                                                 atol=1e-2)):
            return False
    return True


def task_orders(n: int, count: int, seed: int = 0) -> list[list[int]]:
    """``count`` task orders over ``n`` tasks: the given order first, then seeded random permutations."""
    rng = np.random.default_rng(seed)
    return [list(range(n))] + [rng.permutation(n).tolist() for _ in range(max(count - 1, 0))]


def order_curves(knowledge: Sequence[TaskKnowledge],
                 test_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], mapper: str,
                 orders: Sequence[Sequence[int]], *, name: str | None = None,
                 incremental: bool = False, head_inputs: dict[str, np.ndarray] | None = None) -> list[Curves]:
    """``skill_curves`` once per task order (indices into ``knowledge``)."""
    ks = list(knowledge)
    return [skill_curves([ks[i] for i in order], test_sets, mapper, name=name, incremental=incremental,
                         head_inputs=head_inputs)
            for order in orders]


def _scores_by_task(mp, knowledge: Sequence[TaskKnowledge], test_sets) -> dict[str, np.ndarray]:
    return {k.task: mp.predict(test_sets[k.task][0], test_sets[k.task][2], open_set=False).scores for k in knowledge}


def scores_are_per_task(mapper: str, knowledge: Sequence[TaskKnowledge], test_sets, *, subsets: int = 3,
                        seed: int = 0) -> tuple[bool, dict[str, np.ndarray]]:
    """Whether this mapper scores each task independently of the others it holds (GMMC: each task's own
    mixture), checked on random subsets of the bank: then a mapper over any subset chooses, for every
    image, the best of the whole bank's scores over that subset, and a replay needs one scoring pass.
    Returns the verdict and the whole bank's scores per test set."""
    ks = list(knowledge)
    full = _scores_by_task(build_mapper(mapper, ks), ks, test_sets)
    rng = np.random.default_rng(seed)
    for _ in range(subsets if len(ks) > 2 else 0):
        pick = np.sort(rng.choice(len(ks), size=min(len(ks) - 1, max(2, len(ks) // 3)), replace=False))
        sub = build_mapper(mapper, [ks[i] for i in pick])
        for i in pick[:4]:
            got = sub.predict(test_sets[ks[i].task][0], test_sets[ks[i].task][2], open_set=False).scores
            want = full[ks[i].task][:, pick]
            # the same scores up to float32 rounding (blocks of another size round differently: 0.009 on scores of
            # 11,000 at 71 tasks), and the same decisions
            close = np.abs(got - want).max(initial=0.0) <= 1e-5 * np.abs(want).max(initial=0.0) + 1e-6
            if not close or np.mean(got.argmax(1) == want.argmax(1)) < 0.999:
                return False, full
    return True, full


def replay_from_scores(knowledge: Sequence[TaskKnowledge], test_sets, scores: dict[str, np.ndarray],
                       orders: Sequence[Sequence[int]], *, name: str,
                       head_inputs: dict[str, np.ndarray] | None = None) -> list[Curves]:
    """``skill_curves`` for every order from one scoring pass (only for per-task scores, see above).

    An image of task j is mapped right after step t when its own task's score beats every other task
    learned so far; on a tie the task learned first wins, as ``argmax`` does."""
    ks = list(knowledge)
    head_inputs = head_inputs or {}
    head_ok = {}
    for k in ks:
        x, y, _ = test_sets[k.task]
        head_ok[k.task] = (head_inputs.get(k.task, x) @ k.head_weight.T + k.head_bias).argmax(1) == y
    out = []
    for order in orders:
        n = len(order)
        acc = [[0.0] * (t + 1) for t in range(n)]
        tid = [[0.0] * (t + 1) for t in range(n)]
        for pj, j in enumerate(order):
            s = scores[ks[j].task]
            own = s[:, j]
            if len(own) == 0:
                for t in range(pj, n):
                    acc[t][pj] = tid[t][pj] = float("nan")
                continue
            before = s[:, list(order[:pj])].max(1) if pj else np.full(len(own), -np.inf)
            right = own > before
            for t in range(pj, n):
                if t > pj:
                    right &= own >= s[:, order[t]]
                acc[t][pj] = float((right & head_ok[ks[j].task]).mean())
                tid[t][pj] = float(right.mean())
        out.append(Curves(name, acc, [ks[i].task for i in order], tid))
    return out


def pooled_fit(curves: Sequence[Curves]) -> dict:
    """One line through every order's normalized-accuracy points, plus the spread of the per-order lines."""
    xs = np.concatenate([np.arange(1, c.tasks + 1) for c in curves])
    ys = np.concatenate([np.asarray(c.mean_normalized) for c in curves])
    slope, intercept, zero = line_fit(xs, ys)
    per = [c.normalized_fit() for c in curves]
    slopes = np.array([p[0] for p in per])
    final = np.array([c.mean_normalized[-1] for c in curves])
    final_abs = np.array([c.mean_absolute[-1] for c in curves])
    fit = fit_dict(slope, intercept, zero)
    return {**fit, "zero_crossing": fit["zero_at_tasks"], "orders": len(curves), "tasks": max(c.tasks for c in curves),
            "per_order_slopes": slopes.tolist(), "slope_std": float(slopes.std(ddof=1)) if len(slopes) > 1 else 0.0,
            "slope_min": float(slopes.min()), "slope_max": float(slopes.max()),
            "final_normalized_mean": float(final.mean()), "final_absolute_mean": float(final_abs.mean()),
            "predicted_at": {str(t): float(slope * t + intercept) for t in (102, 1000)}}


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    return plt, MaxNLocator


def _task_axis(ax, n: int, names: Sequence[str] | None, MaxNLocator) -> None:
    """Whole numbers of tasks on the bottom axis; with ``names``, the task added at each step above it."""
    ax.set_xlim(0.5, n + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=min(n, 5)))
    ax.set_xlabel("number of tasks learned, T")
    if names:
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(1, n + 1), [f"{i}. {t}" for i, t in enumerate(names, 1)], rotation=90,
                       fontsize=max(6.5, min(8.0, 500 / max(n, 1))))
        top.set_xlabel("task added at step T (the run's fixed order)")


def plot_curves(curves: Sequence[Curves], out_dir, *, title_suffix: str = "",
                task_names: Sequence[str] | None = None) -> dict[str, str]:
    """Write fig4_first_task.png, fig6_normalized.png and fig8_absolute.png; returns their paths.

    ``task_names``: the learning order, named along the task axis (and in Fig. 4's first task)."""
    from pathlib import Path

    plt, MaxNLocator = _mpl()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    styles = {True: dict(lw=2.4), False: dict(lw=1.3, ls="--")}
    n_max = max((c.tasks for c in curves), default=1)
    first = task_names[0] if task_names else None

    def draw(key: str, fname: str, ylabel: str, title: str, fit: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(max(8.0, 0.2 * n_max + 3), 7 if task_names else 5))
        for c in curves:
            y = getattr(c, key)
            x = np.arange(1, len(y) + 1)
            is_skill = c.name.startswith("SKILL")
            (line,) = ax.plot(x, y, marker="o", ms=3 if n_max <= 30 else 1.5, label=c.name, **styles[is_skill])
            if fit and is_skill and len(y) >= 2:
                f = fit_dict(*c.normalized_fit())
                ax.plot(x, f["slope"] * x + f["intercept"], color=line.get_color(), lw=0.8, ls=":",
                        label="  fit " + fit_label(f["slope"], f["intercept"], f["zero_at_tasks"]))
        _task_axis(ax, n_max, task_names, MaxNLocator)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.set_title(title + title_suffix)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left", ncol=2 if len(curves) > 5 else 1)
        p = out / fname
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths[key] = str(p)

    draw("first_task", "fig4_first_task.png",
         f"accuracy on the first task{f' ({first})' if first else ''}, no task oracle",
         f"Accuracy on the first task{f', {first},' if first else ''} as more tasks are learned (paper Fig. 4)")
    draw("mean_normalized", "fig6_normalized.png", "average normalized accuracy",
         "Average normalized accuracy over tasks learned so far (paper Fig. 6)", fit=True)
    draw("mean_absolute", "fig8_absolute.png", "average absolute accuracy",
         "Average absolute accuracy over tasks learned so far (paper Fig. 8)")
    return paths


def plot_degradation(by_mapper: dict[str, list[Curves]], fits: dict[str, dict], out_dir, *,
                     labels: dict[str, str] | None = None, family_of=None, title_suffix: str = "") -> dict[str, str]:
    """Fig. 6 and Fig. 8 over several task orders: per mapper the mean over orders, the min-max band,
    the line fitted through every order's points and, for GMMC, the paper's line.  With ``family_of``
    (task name -> family) also task-ID accuracy against T for the largest family and for the rest."""
    from pathlib import Path

    plt, MaxNLocator = _mpl()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = labels or {}
    paths: dict[str, str] = {}
    n = max(c.tasks for cs in by_mapper.values() for c in cs)
    orders = max(len(cs) for cs in by_mapper.values())

    def band(ax, key_fn, fit: bool) -> None:
        for mp, cs in by_mapper.items():
            ys = np.array([key_fn(c) for c in cs], float)
            x = np.arange(1, ys.shape[1] + 1)
            mean = np.nanmean(ys, 0)
            (line,) = ax.plot(x, mean, lw=2, label=f"{labels.get(mp, mp)}: mean of {len(cs)} orders")
            ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.18,
                            label=f"{labels.get(mp, mp)}: min-max over orders")
            if fit and mp in fits:
                f = fits[mp]
                ax.plot(x, f["slope"] * x + f["intercept"], color=line.get_color(), lw=1, ls="--",
                        label=f"{labels.get(mp, mp)} fit " + fit_label(f["slope"], f["intercept"], f["zero_at_tasks"]))
                paper = PAPER_FIT.get(mp)
                if paper and paper["slope"] is not None:
                    ax.plot(x, paper["slope"] * x + paper["intercept"], color=line.get_color(), lw=1, ls=":",
                            label=f"paper {labels.get(mp, mp)} (102 tasks) " +
                                  fit_label(paper["slope"], paper["intercept"], paper["zero_crossing"]))

    def finish(ax, ylabel: str, title: str, fname: str, key: str) -> None:
        ax.set_xlim(0.5, n + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"number of tasks learned, T (each order a different random sequence of the {n} tasks)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.set_title(title + title_suffix)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        p = out / fname
        ax.figure.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(ax.figure)
        paths[key] = str(p)

    fig, ax = plt.subplots(figsize=(10, 6))
    band(ax, lambda c: c.mean_normalized, fit=True)
    finish(ax, "average normalized accuracy", f"Normalized accuracy against T over up to {orders} task orders "
           "(paper Fig. 6)", "fig6_orders.png", "orders_normalized")
    fig, ax = plt.subplots(figsize=(10, 6))
    band(ax, lambda c: c.mean_absolute, fit=False)
    finish(ax, "average absolute accuracy (no task oracle)",
           f"Absolute accuracy against T over up to {orders} task orders (paper Fig. 8)", "fig8_orders.png",
           "orders_absolute")
    if family_of is not None and all(c.task_id is not None for cs in by_mapper.values() for c in cs):
        fams = [family_of(t) for t in next(iter(by_mapper.values()))[0].task_names]
        big = max(set(fams), key=fams.count)
        fig, ax = plt.subplots(figsize=(10, 6))
        for mp, cs in by_mapper.items():
            for sel_name, in_fam, ls in ((f"{big} family", True, "-"), ("all other tasks", False, "--")):
                ys = np.array([c.mean_task_id([(family_of(t) == big) == in_fam for t in c.task_names]) for c in cs])
                x = np.arange(1, ys.shape[1] + 1)
                mean = np.nanmean(ys, 0)
                ax.plot(x, mean, ls=ls, lw=2, label=f"{labels.get(mp, mp)}, {sel_name} (mean of {len(cs)} orders)")
        finish(ax, "mean task-ID accuracy of the tasks learned so far",
               f"Task-ID accuracy against T: the {big} family ({fams.count(big)} look-alike tasks) and the rest",
               "task_id_by_family.png", "task_id_by_family")
    return paths


def plot_task_confusion(names: Sequence[str], counts: dict[str, np.ndarray], path, *, title: str,
                        family_of=None) -> None:
    """One heat map per mapper: row = true task, column = task the mapper chose, as fractions of the row.

    ``counts`` maps a panel label (e.g. "GMMC") to a [T, T] matrix of image counts.  The cells are
    sized so that every task is named and every printed number is legible at 71 tasks: a cell holds
    its percentage when it is at least 5 % (the diagonal too), on a log colour scale; with
    ``family_of`` the tasks are grouped by family (rows and columns in the same order) and the
    families outlined.  More than 30 tasks put the panels under each other instead of side by side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    names = list(names)
    order = list(range(len(names)))
    fams = None
    if family_of is not None:
        fams = [family_of(t) for t in names]
        first = {f: i for i, f in reversed(list(enumerate(fams)))}
        order = sorted(order, key=lambda i: (first[fams[i]], i))
    shown = [names[i] for i in order]
    n = len(names)
    cell = 0.26 if n > 30 else 0.4
    side = max(6.0, cell * n + 2.5)
    rows, cols = (len(counts), 1) if n > 30 else (1, len(counts))
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1.5, side * rows), layout="constrained",
                             squeeze=False)
    axes = axes.ravel()
    font = 6.5 if n > 30 else 8
    im = None
    for ax, (label, m) in zip(axes, counts.items()):
        m = np.asarray(m, float)[np.ix_(order, order)]
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        im = ax.imshow(np.where(norm > 0, norm, np.nan), cmap="viridis", norm=LogNorm(vmin=0.01, vmax=1))
        ax.set_facecolor("#f2f2f2")
        ax.set_xticks(range(n), shown, rotation=90, fontsize=font)
        ax.set_yticks(range(n), shown, fontsize=font)
        ax.set_xlabel("task chosen by the mapper")
        ax.set_ylabel("true task of the test image")
        ax.set_title(f"{label}: task-ID accuracy {np.trace(m) / max(m.sum(), 1):.3f} (image-weighted)")
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.05:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7 if n > 30 else 7.5,
                            color="black" if norm[i, j] > 0.3 else "white")
        if fams is not None:
            f_shown = [fams[i] for i in order]
            start = 0
            for k in range(1, n + 1):
                if k == n or f_shown[k] != f_shown[start]:
                    if k - start > 1:
                        ax.add_patch(Rectangle((start - 0.5, start - 0.5), k - start, k - start, fill=False,
                                               ec="red", lw=1.2))
                    start = k
    fig.colorbar(im, ax=axes.tolist(), shrink=0.5, label="fraction of the true task's test images (log scale; "
                 "numbers in cells: percent, shown from 5 %)")
    fig.suptitle(title + (" - families outlined in red" if fams is not None else ""))
    fig.savefig(path, dpi=110)
    plt.close(fig)
