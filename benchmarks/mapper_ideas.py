"""Ideas for a better task mapper, each measured against one baseline so nobody has to guess.

The baseline is the recipe before trunk statistics: Mahalanobis on sqrt_l2 features, class
means plus >= 64 principal exemplar rows per task, one Ledoit-Wolf tied covariance, task = its
best class; about 0.925x the oracle on validation.  Each variant below changes one thing, is
scored on the validation split carved from train (anchors and heads fitted on the other 80 %),
and then on test (refitted on all of train), against the baseline in the same run:

* **trunk statistics** (shipped as ``sqrt_l2_trunk``): the per-channel mean, or mean and standard
  deviation, of the ROM's trunk activation map, each square-rooted and L2-normalised on its own,
  appended to the features; for both mappers (GMMC rows compare against GMMC on features alone);
* tied covariance with a fixed shrinkage instead of Ledoit-Wolf's;
* every task weighted equally in the tied covariance (instead of by exemplar rows);
* regularised discriminant analysis: each task's own shrunk covariance blended into the tied
  one (``(1 - beta) S_tied + beta S_task``), with its log-determinant;
* several k-means centroids per class (from all training features; the packet would carry them)
  instead of one mean;
* a stronger or weaker power transform than the square root before L2;
* fusing the heads' outputs into the task choice: ``+ w log max softmax`` or ``+ w logsumexp``
  of each task head's logits.

    python benchmarks/extract_features.py --out /work/cache/features
    python benchmarks/mapper_ideas.py --features /work/cache/features
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
from scipy.special import log_softmax, logsumexp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mapper_tuning as mt  # noqa: E402
from _common import md_table, update_readme, write_result  # noqa: E402
from skill_edge.runtime.machine import portable_path  # noqa: E402

from skill_edge.runtime.mapping.anchors import fit_gmmc, fit_mahalanobis, transform_features  # noqa: E402
from skill_edge.runtime.mapping.mapper import GmmcMapper, MahalanobisMapper, ScatterStats, exemplar_scatter  # noqa: E402

SHIPPED = mt.MahaRecipe(transform="sqrt_l2", m=5, exemplars="principal", min_rows=64)
BASELINE = "baseline: features only (sqrt_l2)"
GMMC_BASELINE = "GMMC, features only (sqrt_l2)"


def power_l2(x: np.ndarray, power: float) -> np.ndarray:
    """``sign(x)|x|^power`` then L2; power 0.5 is the shipped ``sqrt_l2`` (computed by the runtime itself)."""
    if power == 0.5:
        return transform_features(x, "sqrt_l2")
    y = np.sign(x) * np.abs(x) ** power
    return (y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)).astype(np.float32)


class Study:
    """One split pair (fit -> scored): anchors of the shipped recipe (in features raised to
    ``power``), the benchmark's heads (raw features), and the score bookkeeping."""

    def __init__(self, tasks: dict[str, mt.TaskData], fit: str, split: str, power: float = 0.5,
                 heads: dict[str, mt.Head] | None = None) -> None:
        self.tasks, self.fit, self.split, self.power = tasks, fit, split, power
        self.names = list(tasks)
        self.heads = heads if heads is not None else mt.fit_heads(tasks, fit)
        if power == 0.5:
            self.anchors = [mt.maha_anchor(SHIPPED, tasks[n], fit) for n in self.names]
        else:
            self.anchors = [fit_mahalanobis(power_l2(getattr(tasks[n], fit).x, power), getattr(tasks[n], fit).y,
                                            m=SHIPPED.m, seed=0, exemplars=SHIPPED.exemplars,
                                            min_rows=SHIPPED.min_rows) for n in self.names]
        xs = [power_l2(getattr(tasks[n], split).x, power).astype(np.float64) for n in self.names]
        self.x = np.concatenate(xs)
        self.truth = np.concatenate([np.full(len(x), i) for i, x in enumerate(xs)])
        self.raw = np.concatenate([getattr(tasks[n], split).x for n in self.names])

    def score(self, label: str, scores: np.ndarray) -> dict:
        ev = mt.Evaluation(self.names, scores, self.truth, np.zeros(0))
        pred = ev.predictions()
        task_id = mt.summary(ev.per_task(pred))
        system = mt.system_accuracy(ev, pred, self.heads, self.tasks, self.split)
        mt.log(f"{self.split:5s} {label:45s} task-id {task_id['mean']:.4f} ratio {system['ratio']:.4f}")
        return {"variant": label, "split": self.split, "task_id": task_id, "ratio": system["ratio"],
                "no_oracle_mean": system["no_oracle_mean"], "oracle_mean": system["oracle_mean"]}

    def mapper_scores(self, covariance: np.ndarray | None = None) -> np.ndarray:
        m = MahalanobisMapper(self.names, self.anchors, feature_transform="sqrt_l2", covariance=covariance)
        return m.task_scores(self.x.astype(np.float32))

    def empirical_tied(self, weight: Callable[[int], float] = lambda n: 1.0) -> np.ndarray:
        """The exemplars' scatter around their class means, each task's rows weighted by ``weight(rows)``."""
        total, count = 0.0, 0.0
        for a in self.anchors:
            e = a.exemplars.astype(np.float64) - a.class_means[a.exemplar_labels.astype(int)]
            w = weight(len(e))
            total = total + w * (e.T @ e)
            count += w * len(e)
        return total / count

    def rda_scores(self, beta: float) -> np.ndarray:
        tied, _ = exemplar_scatter(self.anchors).shrunk("ledoit_wolf")
        out = np.empty((len(self.x), len(self.names)))
        for t, a in enumerate(self.anchors):
            own = ScatterStats.empty(tied.shape[0])
            own.add(a.exemplars.astype(np.float64) - a.class_means[a.exemplar_labels.astype(int)])
            chol = np.linalg.cholesky((1 - beta) * tied + beta * own.shrunk("ledoit_wolf")[0])
            z = np.linalg.solve(chol, self.x.T).T
            m = np.linalg.solve(chol, a.class_means.astype(np.float64).T).T
            d = (z * z).sum(1)[:, None] - 2 * z @ m.T + (m * m).sum(1)[None]
            out[:, t] = -0.5 * d.min(1) - np.log(np.diag(chol)).sum()
        return out

    def centroid_scores(self, k: int) -> np.ndarray:
        from sklearn.cluster import KMeans

        ref = MahalanobisMapper(self.names, self.anchors, feature_transform="sqrt_l2")
        w = ref.whiten_t.T.astype(np.float64)
        z = (self.x - ref.center) @ w
        out = np.empty((len(self.x), len(self.names)))
        for t, n in enumerate(self.names):
            s = getattr(self.tasks[n], self.fit)
            x = power_l2(s.x, self.power).astype(np.float64)
            cents = [KMeans(min(k, max(1, int((s.y == c).sum()) // 10)), n_init=2, random_state=0)
                     .fit(x[s.y == c]).cluster_centers_ for c in np.unique(s.y)]
            m = (np.concatenate(cents) - ref.center) @ w
            out[:, t] = -0.5 * ((z * z).sum(1)[:, None] - 2 * z @ m.T + (m * m).sum(1)[None]).min(1)
        return out

    def space(self, split: str, trunk: str) -> list[np.ndarray]:
        """Each task's ``split`` in an anchor space: ``""`` features only (sqrt_l2), ``"mean"`` plus
        the trunk means, ``"mean+std"`` the shipped ``sqrt_l2_trunk``."""
        out = []
        for n in self.names:
            s = getattr(self.tasks[n], split)
            if trunk == "mean+std":
                out.append(transform_features(s.x, "sqrt_l2_trunk", s.stats))
            elif trunk == "mean":
                c = s.stats.shape[1] // 2
                out.append(np.concatenate([transform_features(s.x, "sqrt_l2"),
                                           transform_features(s.stats[:, :c], "sqrt_l2")], axis=1))
            else:
                out.append(transform_features(s.x, "sqrt_l2"))
        return out

    def trunk_scores(self, kind: str, trunk: str) -> np.ndarray:
        """Task scores of a Mahalanobis (shipped recipe) or GMMC (k = 25 per class, floor 0.1) mapper
        fitted in ``space(trunk)``."""
        fit = self.space(self.fit, trunk)
        ys = [getattr(self.tasks[n], self.fit).y for n in self.names]
        if kind == "maha":
            anchors = [fit_mahalanobis(x, y, m=SHIPPED.m, seed=0, exemplars=SHIPPED.exemplars,
                                       min_rows=SHIPPED.min_rows) for x, y in zip(fit, ys)]
            mapper = MahalanobisMapper(self.names, anchors)
        else:
            mapper = GmmcMapper(self.names, [fit_gmmc(x, 25, 0, var_floor=0.1, labels=y) for x, y in zip(fit, ys)])
        return np.concatenate([mapper.task_scores(x) for x in self.space(self.split, trunk)])

    def head_logits(self) -> list[np.ndarray]:
        out = []
        for n in self.names:
            h = self.heads[n]
            d = h.clf.decision_function(h.scaler.transform(self.raw))
            out.append(np.stack([np.zeros_like(d), d], 1) if d.ndim == 1 else d)
        return out


def run(tasks: dict[str, mt.TaskData], fit: str, split: str) -> list[dict]:
    s = Study(tasks, fit, split)
    rows = [s.score(BASELINE, s.mapper_scores())]
    if all(getattr(t, fit).stats is not None for t in tasks.values()):
        rows.append(s.score("+ trunk means", s.trunk_scores("maha", "mean")))
        rows.append(s.score("+ trunk means and std (shipped: sqrt_l2_trunk)", s.trunk_scores("maha", "mean+std")))
        rows.append(s.score(GMMC_BASELINE, s.trunk_scores("gmmc", "")))
        rows.append(s.score("GMMC + trunk means and std (shipped: sqrt_l2_trunk)",
                            s.trunk_scores("gmmc", "mean+std")))
    else:
        mt.log("no trunk_stats in the features files: rerun extract_features.py for the trunk-statistics rows")
    emp = s.empirical_tied()
    mu = np.trace(emp) / emp.shape[0]
    for a in (0.05, 0.1, 0.2, 0.3):
        rows.append(s.score(f"tied, fixed shrinkage {a}", s.mapper_scores((1 - a) * emp + a * mu * np.eye(len(emp)))))
    eq = s.empirical_tied(lambda n: 1.0 / n)
    _, lw = exemplar_scatter(s.anchors).shrunk("ledoit_wolf")
    rows.append(s.score("tied, tasks weighted equally",
                        s.mapper_scores((1 - lw) * eq + lw * np.trace(eq) / len(eq) * np.eye(len(eq)))))
    for beta in (0.1, 0.25):
        rows.append(s.score(f"RDA: own covariance beta={beta}, log-det", s.rda_scores(beta)))
    for k in (2, 4):
        rows.append(s.score(f"{k} k-means centroids per class", s.centroid_scores(k)))
    base = s.mapper_scores().astype(np.float64)
    post = base - logsumexp(base, axis=1, keepdims=True)
    logits = s.head_logits()
    msp = np.stack([log_softmax(lg, axis=1).max(1) for lg in logits], 1)
    energy = np.stack([logsumexp(lg, axis=1) for lg in logits], 1)
    for w in (1.0, 3.0):
        rows.append(s.score(f"+ {w} x head log max-softmax", post + w * msp))
    rows.append(s.score("+ 0.1 x head logsumexp (energy)", post + 0.1 * energy))
    for power in (0.3, 0.4):
        other = Study(tasks, fit, split, power, heads=s.heads)
        rows.append(other.score(f"power {power} then L2 (baseline: 0.5)", other.mapper_scores()))
    return rows


def main() -> None:
    t0 = time.time()
    args, tasks = mt.tasks_from_command_line(__doc__.split("\n")[0])
    rows = run(tasks, "fit", "val") + run(tasks, "train", "test")
    write_result("mapper_ideas", {"features": portable_path(args.features, "features"), "tasks": len(tasks), "rows": rows,
                                  "seconds": time.time() - t0})
    write_readme(rows)


def write_readme(rows: list[dict]) -> None:
    """The README section; each row against its own mapper's features-only row."""
    val = {r["variant"]: r for r in rows if r["split"] == "val"}
    test = {r["variant"]: r for r in rows if r["split"] == "test"}

    def delta(split: dict, v: str) -> str:
        ref = GMMC_BASELINE if v.startswith("GMMC") else BASELINE
        return f"{split[v]['ratio'] - split[ref]['ratio']:+.4f}"

    table = md_table(
        ["variant", "val task-ID", "val ratio", "val vs baseline", "test task-ID", "test ratio", "test vs baseline"],
        [[v, f"{val[v]['task_id']['mean']:.4f}", f"{val[v]['ratio']:.4f}", delta(val, v),
          f"{test[v]['task_id']['mean']:.4f}", f"{test[v]['ratio']:.4f}", delta(test, v)] for v in val])
    update_readme("mapper_ideas", f"""### Mapper ideas against one baseline (`benchmarks/mapper_ideas.py`)

Ratio: no-oracle over oracle accuracy, mean over the 21 tasks (heads are the benchmark's
logistic regressions, as in `mapper_tuning`, so figures differ slightly from `skill_bench`).
Each row changes one thing against the baseline, Mahalanobis on sqrt_l2 features alone (the
recipe before trunk statistics), in the same run; GMMC rows compare with GMMC on features alone.
Only the trunk statistics gain clearly on validation (and hold on test), for both mappers;
they are what the runtime ships (`sqrt_l2_trunk`, chosen on validation).  Every other idea
gains a few thousandths at most, about the size of a choice among many on one split, and none
is shipped.  Results: [`results/mapper_ideas.json`](results/mapper_ideas.json).

{table}
""")


if __name__ == "__main__":
    main()
