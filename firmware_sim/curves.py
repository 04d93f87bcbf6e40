"""Lifelong-learning curves in the paper's terms, from an accuracy matrix.

``acc[t][j]`` is the accuracy on task ``j`` after ``t + 1`` tasks have been learned (``j <= t``).
From it come the three curves the paper plots:

* Fig. 4: accuracy on task 1 as more tasks are learned (``acc[t][0]``);
* Fig. 6: average *normalized* accuracy over the tasks learned so far, each task divided by its
  accuracy right after it was learned, with a fitted line and where it reaches zero;
* Fig. 8: average absolute accuracy over the tasks learned so far.

For SKILL the matrix comes from replaying the bank in task order: a mapper over the first
``t + 1`` tasks, then no-oracle classification of each of those tasks' test sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from skill_edge.runtime.device import Device
from skill_edge.runtime.knowledge import TaskKnowledge
from skill_edge.runtime.mapper import build_mapper


@dataclass
class Curves:
    name: str
    acc: list[list[float]]  # lower-triangular accuracy matrix

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
        y = np.asarray(self.mean_normalized)
        x = np.arange(1, len(y) + 1, dtype=float)
        ok = np.isfinite(y)
        if ok.sum() < 2:
            return 0.0, float(y[ok][0]) if ok.any() else float("nan"), float("inf")
        slope, intercept = np.polyfit(x[ok], y[ok], 1)
        zero = -intercept / slope if slope < 0 else float("inf")
        return float(slope), float(intercept), float(zero)

    def to_dict(self) -> dict:
        slope, intercept, zero = self.normalized_fit()
        return {"name": self.name, "acc_matrix": self.acc, "first_task": self.first_task,
                "mean_absolute": self.mean_absolute, "mean_normalized": self.mean_normalized,
                "normalized_fit": {"slope": slope, "intercept": intercept, "zero_at_tasks": zero}}


def skill_curves(knowledge: Sequence[TaskKnowledge],
                 test_sets: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                 mapper: str, *, name: str | None = None, device: Device | None = None) -> Curves:
    """Replay learning in ``knowledge`` order: after each new task, classify all seen test sets.

    ``test_sets`` maps task -> (features, labels, trunk statistics or None).  Features are the
    ROM's plain features; a task with BB needs its tail rerun, which
    ``device`` (holding the ROM) does when given trunk activations; without them the plain
    features feed that task's head.
    """
    order = list(knowledge)
    acc: list[list[float]] = []
    for t in range(len(order)):
        seen = order[: t + 1]
        mp = build_mapper(mapper, seen)
        row = []
        for j, k in enumerate(seen):
            x, y, stats = test_sets[k.task]
            res = mp.predict(x, stats)
            right = res.task_index == j
            logits = x @ k.head_weight.T + k.head_bias
            correct = right & (logits.argmax(1) == y)
            row.append(float(correct.mean()) if len(y) else float("nan"))
        acc.append(row)
    return Curves(name or f"SKILL ({mapper})", acc)


def plot_curves(curves: Sequence[Curves], out_dir, *, title_suffix: str = "") -> dict[str, str]:
    """Write fig4_first_task.png, fig6_normalized.png and fig8_absolute.png; returns their paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    styles = {True: dict(lw=2.4), False: dict(lw=1.3, ls="--")}

    def draw(key: str, fname: str, ylabel: str, title: str, fit: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(8, 5))
        for c in curves:
            y = getattr(c, key)
            x = np.arange(1, len(y) + 1)
            is_skill = c.name.startswith("SKILL")
            (line,) = ax.plot(x, y, marker="o", ms=3, label=c.name, **styles[is_skill])
            if fit and is_skill and len(y) >= 2:
                slope, intercept, zero = c.normalized_fit()
                ax.plot(x, slope * x + intercept, color=line.get_color(), lw=0.8, ls=":",
                        label=f"  fit y = {slope:.4f} x + {intercept:.3f}" +
                              (f", zero at N = {zero:,.0f}" if np.isfinite(zero) else ", no decline"))
        ax.set_xlabel("number of tasks learned")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.05)
        ax.set_title(title + title_suffix)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
        p = out / fname
        fig.savefig(p, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths[key] = str(p)

    draw("first_task", "fig4_first_task.png", "accuracy on task 1 (no task oracle)",
         "Task-1 accuracy as more tasks are learned (paper Fig. 4)")
    draw("mean_normalized", "fig6_normalized.png", "average normalized accuracy",
         "Average normalized accuracy over tasks learned so far (paper Fig. 6)", fit=True)
    draw("mean_absolute", "fig8_absolute.png", "average absolute accuracy",
         "Average absolute accuracy over tasks learned so far (paper Fig. 8)")
    return paths


def plot_task_confusion(names: Sequence[str], counts: dict[str, np.ndarray], path, *, title: str) -> None:
    """One heat map per mapper: row = true task, column = task the mapper chose, as fractions of the row.

    ``counts`` maps a panel label (e.g. "GMMC") to a [T, T] matrix of image counts.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names)
    fig, axes = plt.subplots(1, len(counts), figsize=(9 * len(counts), 8.5), layout="constrained", squeeze=False)
    axes = axes[0]
    for ax, (label, m) in zip(axes, counts.items()):
        norm = m / np.maximum(m.sum(1, keepdims=True), 1)
        im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [], fontsize=7)
        ax.set_xlabel("task chosen by the mapper")
        if ax is axes[0]:
            ax.set_ylabel("true task of the test image")
        ax.set_title(f"{label}: task-ID accuracy {np.trace(m) / max(m.sum(), 1):.3f} (image-weighted)")
        for i in range(len(names)):
            for j in range(len(names)):
                if norm[i, j] >= 0.02:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=5,
                            color="black" if norm[i, j] > 0.5 else "white")
    fig.colorbar(im, ax=axes.tolist(), shrink=0.6, label="fraction of the true task's test images")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)

