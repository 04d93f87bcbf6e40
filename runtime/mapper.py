"""Student side of the task mapper: pick which stored task an input belongs to, with no oracle.

Every stored task is scored in one vectorised pass over the batch:

* ``GmmcMapper``: each task is a mixture of diagonal Gaussians.  The log-density of every
  component is one matrix product, ``[x**2, x] @ [-0.5/var, mu/var].T + const``; a task's
  score is the logsumexp (or max) over its own components.
* ``MahalanobisMapper``: one tied covariance, shrunk (Ledoit-Wolf or OAS) and estimated by
  the student from all received exemplars centred by their class means; every class mean is
  scored with one matrix product in the whitened metric, and a task's score is its best class.

Both report, per input, the best task, its posterior over tasks (softmax of the per-task
log-likelihoods), the full score matrix, and ``unknown`` when the best task's own
log-likelihood falls below that task's calibrated open-set threshold.

Inputs are *raw* pooled backbone features; the mapper applies the feature transform its
tasks were fitted in (``TaskKnowledge.meta.feature_transform``) and refuses to mix tasks
fitted in different spaces, since their scores would not be comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from .anchors import FEATURE_TRANSFORMS, transform_features
from .knowledge import GmmcAnchor, MahalanobisAnchor, TaskKnowledge

LOG_2PI = float(np.log(2 * np.pi))

#: Largest ``batch x components`` score block computed at once (float32 elements, 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


class MapperError(ValueError):
    """Tasks that cannot be put into one mapper (missing anchors, mixed transforms, shapes)."""


@dataclass
class MapperResult:
    """The mapper's answer for a batch of N inputs over T stored tasks."""

    task_index: np.ndarray  # [N] int, index into task_names
    task_names: list[str]  # [T]
    confidence: np.ndarray  # [N] posterior of the chosen task (softmax over per-task scores)
    scores: np.ndarray  # [N, T] per-task scores used for the choice (higher = more likely)
    unknown: np.ndarray  # [N] bool, the best task's score is below its open-set threshold

    @property
    def tasks(self) -> list[str]:
        """The chosen task's name per input."""
        return [self.task_names[i] for i in self.task_index]


# ---------------------------------------------------------------------------- helpers
def _softmax_max(scores: np.ndarray) -> np.ndarray:
    """Largest softmax probability per row, computed stably."""
    s = scores - scores.max(axis=1, keepdims=True)
    return 1.0 / np.exp(s).sum(axis=1)


def _segment_starts(counts: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)


def _segment_max(s: np.ndarray, starts: np.ndarray, uniform: int | None) -> np.ndarray:
    if uniform:
        return s.reshape(s.shape[0], -1, uniform).max(axis=2)
    return np.maximum.reduceat(s, starts, axis=1)


def _segment_logsumexp(s: np.ndarray, starts: np.ndarray, counts: np.ndarray, uniform: int | None) -> np.ndarray:
    if uniform:
        s3 = s.reshape(s.shape[0], -1, uniform)
        mx = s3.max(axis=2, keepdims=True)
        return (np.log(np.exp(s3 - mx).sum(axis=2, keepdims=True)) + mx)[..., 0]
    mx = np.maximum.reduceat(s, starts, axis=1)
    total = np.add.reduceat(np.exp(s - np.repeat(mx, counts, axis=1)), starts, axis=1)
    return np.log(total) + mx


def _common_transform(knowledge: Sequence[TaskKnowledge]) -> str:
    kinds = {k.meta.feature_transform for k in knowledge}
    if len(kinds) != 1:
        by_kind = {t: [k.task for k in knowledge if k.meta.feature_transform == t] for t in sorted(kinds)}
        raise MapperError(
            f"tasks were fitted in different feature spaces {by_kind}; their scores are not "
            "comparable. Refit the odd ones with the fleet's transform"
        )
    kind = kinds.pop()
    if kind not in FEATURE_TRANSFORMS:
        raise MapperError(f"unknown feature transform {kind!r}; this device knows {FEATURE_TRANSFORMS}")
    return kind


def _check_names(names: Sequence[str]) -> None:
    if not names:
        raise MapperError("a mapper needs at least one task")
    dupes = sorted({n for n in names if list(names).count(n) > 1})
    if dupes:
        raise MapperError(f"duplicate task names {dupes}; keep one record per task")


def _thresholds(knowledge: Sequence[TaskKnowledge], kind: str) -> np.ndarray:
    """Per-task open-set thresholds; a task without one never reports unknown (-inf)."""
    return np.array([k.thresholds.get(kind, -np.inf) for k in knowledge], dtype=np.float64)


class TaskMapper:
    """Shared plumbing: transform, block-wise scoring, decision and open-set test."""

    kind: str = ""
    task_names: list[str]
    feature_transform: str
    thresholds: np.ndarray  # [T]
    feature_dim: int

    def task_scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(selection scores [N, T], open-set scores [N, T]) for already transformed features."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes held by the mapper's arrays (what a device must keep in RAM)."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def prepare(self, features: np.ndarray) -> np.ndarray:
        x = np.asarray(features, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise MapperError(f"features must be [N, {self.feature_dim}], got shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise MapperError("features hold NaN or inf values")
        return transform_features(x, self.feature_transform)

    def predict(self, features: np.ndarray) -> MapperResult:
        """Choose a task for each row of raw ``features`` [N, D]."""
        sel, openset = self.task_scores(self.prepare(features))
        best = sel.argmax(axis=1)
        rows = np.arange(sel.shape[0])
        unknown = openset[rows, best] < self.thresholds[best]
        return MapperResult(
            task_index=best,
            task_names=list(self.task_names),
            confidence=_softmax_max(sel).astype(np.float32),
            scores=sel,
            unknown=unknown,
        )

    def __len__(self) -> int:
        return len(self.task_names)


# ---------------------------------------------------------------------------- GMMC
class GmmcMapper(TaskMapper):
    """All tasks' diagonal Gaussians stacked into one ``[M, 2D]`` matrix; one matmul per block.

    The quadratic is expanded around a shared centre (the mean of all component means), which
    keeps float32 cancellation small: without it ``x**2/var`` and ``mu**2/var`` are huge
    numbers whose difference is the answer.
    """

    kind = "gmmc"

    def __init__(
        self,
        names: Sequence[str],
        anchors: Sequence[GmmcAnchor],
        *,
        feature_transform: str = "raw",
        thresholds: np.ndarray | None = None,
        reduce: Literal["logsumexp", "max"] = "logsumexp",
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        _check_names(names)
        if len(names) != len(anchors):
            raise MapperError(f"{len(names)} names but {len(anchors)} anchors")
        if reduce not in ("logsumexp", "max"):
            raise MapperError(f"reduce must be 'logsumexp' or 'max', got {reduce!r}")
        dims = {int(a.means.shape[1]) for a in anchors}
        if len(dims) != 1:
            raise MapperError(f"GMMC anchors have different feature sizes {sorted(dims)}")
        self.task_names = list(names)
        self.feature_transform = feature_transform
        self.feature_dim = dims.pop()
        self.reduce = reduce
        self.block_elements = int(block_elements)
        counts = np.array([a.k for a in anchors], dtype=np.intp)
        self.counts = counts
        self.thresholds = (np.full(len(names), -np.inf) if thresholds is None
                           else np.asarray(thresholds, dtype=np.float64))
        m, d = int(counts.sum()), self.feature_dim
        self.center = np.mean([a.means.astype(np.float64).mean(axis=0) for a in anchors], axis=0).astype(np.float32)
        # A = [-0.5/var, mu/var] row per component, filled task by task to keep peak memory at one copy.
        self.coef = np.empty((m, 2 * d), dtype=np.float32)
        self.const = np.empty(m, dtype=np.float32)
        row = 0
        for a in anchors:
            var = a.variances.astype(np.float64)
            if not np.all(np.isfinite(var)) or np.any(var <= 0):
                raise MapperError("GMMC variances must be finite and positive")
            mu = a.means.astype(np.float64) - self.center
            w = np.maximum(a.weights.astype(np.float64), 1e-300)
            inv = 1.0 / var
            self.coef[row:row + a.k, :d] = -0.5 * inv
            self.coef[row:row + a.k, d:] = mu * inv
            self.const[row:row + a.k] = (np.log(w) - 0.5 * ((mu * mu * inv).sum(axis=1)
                                                            + np.log(var).sum(axis=1) + d * LOG_2PI))
            row += a.k
        # Blocks of whole tasks, each holding at most block_elements / batch components.
        self.uniform_k = int(counts[0]) if np.all(counts == counts[0]) else None

    @classmethod
    def from_knowledge(cls, knowledge: Sequence[TaskKnowledge], **kwargs) -> "GmmcMapper":
        """Build from received task records; every record needs a GMMC anchor and the same transform."""
        knowledge = list(knowledge)
        if not knowledge:
            raise MapperError("a mapper needs at least one task")
        missing = [k.task for k in knowledge if k.gmmc is None]
        if missing:
            raise MapperError(f"tasks {missing} carry no GMMC anchor; use the Mahalanobis mapper or refit them")
        return cls([k.task for k in knowledge], [k.gmmc for k in knowledge],
                   feature_transform=_common_transform(knowledge), thresholds=_thresholds(knowledge, "gmmc"),
                   **kwargs)

    def _blocks(self, n: int) -> list[tuple[int, int, int, int]]:
        """(first task, last task, first row, last row) blocks bounded by ``block_elements``."""
        per_block = max(1, self.block_elements // max(n, 1))
        out, t0, r0 = [], 0, 0
        ends = np.cumsum(self.counts)
        while t0 < len(self.counts):
            t1 = int(np.searchsorted(ends, r0 + per_block, side="right"))
            t1 = max(t1, t0 + 1)
            out.append((t0, t1, r0, int(ends[t1 - 1])))
            t0, r0 = t1, int(ends[t1 - 1])
        return out

    def component_loglik(self, x: np.ndarray) -> np.ndarray:
        """log(w_m N(x | mu_m, var_m)) for every component, [N, M] (transformed features)."""
        xc = x - self.center
        return np.concatenate([xc * xc, xc], axis=1) @ self.coef.T + self.const

    def task_scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xc = x - self.center
        design = np.concatenate([xc * xc, xc], axis=1)
        n, t = x.shape[0], len(self.counts)
        lse = np.empty((n, t), dtype=np.float32)
        best = np.empty((n, t), dtype=np.float32) if self.reduce == "max" else lse
        for t0, t1, r0, r1 in self._blocks(n):
            s = design @ self.coef[r0:r1].T
            s += self.const[r0:r1]
            counts = self.counts[t0:t1]
            starts = _segment_starts(counts)
            lse[:, t0:t1] = _segment_logsumexp(s, starts, counts, self.uniform_k)
            if self.reduce == "max":
                best[:, t0:t1] = _segment_max(s, starts, self.uniform_k)
        return best, lse


def gmmc_task_loglik(anchor: GmmcAnchor, x: np.ndarray) -> np.ndarray:
    """log p(x | task) under one task's mixture, for transformed features [N, D] -> [N]."""
    _, lse = GmmcMapper(["task"], [anchor]).task_scores(np.asarray(x, dtype=np.float32))
    return lse[:, 0].astype(np.float64)


# ---------------------------------------------------------------------------- tied covariance
@dataclass
class ScatterStats:
    """Sufficient statistics of centred samples for Ledoit-Wolf / OAS shrinkage.

    Kept as sums so a student can fold in each received task's exemplars as it arrives,
    without stacking every exemplar ever received (10,000 tasks x 50 exemplars x 2048 floats
    would be 4 GB).  ``shrunk()`` reproduces ``sklearn.covariance.ledoit_wolf`` / ``oas`` with
    ``assume_centered=True`` exactly (tested).
    """

    n: int
    sxx: np.ndarray  # [D, D] float64, sum of x x^T
    sum_norm4: float  # sum of ||x||^4 (Ledoit-Wolf needs it)

    @classmethod
    def empty(cls, dim: int) -> "ScatterStats":
        return cls(0, np.zeros((dim, dim)), 0.0)

    def add(self, centred: np.ndarray) -> None:
        c = np.asarray(centred, dtype=np.float64)
        self.n += c.shape[0]
        self.sxx += c.T @ c
        self.sum_norm4 += float(((c * c).sum(axis=1) ** 2).sum())

    def shrunk(self, method: Literal["ledoit_wolf", "oas"] = "ledoit_wolf") -> tuple[np.ndarray, float]:
        """(shrunk covariance, shrinkage in [0, 1]) towards ``trace/D * I``."""
        if self.n < 1:
            raise MapperError("no exemplars to estimate a covariance from")
        p, n = self.sxx.shape[0], self.n
        s = self.sxx / n
        mu = float(np.trace(s)) / p
        fro2 = float((s * s).sum())
        if method == "ledoit_wolf":
            beta = (self.sum_norm4 / n - fro2) / (p * n)
            delta = (fro2 - 2.0 * mu * np.trace(s) + p * mu * mu) / p
            shrinkage = 0.0 if beta <= 0 or delta <= 0 else min(beta, delta) / delta
        elif method == "oas":
            alpha = fro2 / (p * p)
            den = (n + 1) * (alpha - mu * mu / p)
            shrinkage = 1.0 if den == 0 else min((alpha + mu * mu) / den, 1.0)
        else:
            raise MapperError(f"unknown shrinkage {method!r}; use 'ledoit_wolf' or 'oas'")
        cov = (1.0 - shrinkage) * s
        cov.flat[:: p + 1] += shrinkage * mu
        return cov, float(shrinkage)


def exemplar_scatter(anchors: Sequence[MahalanobisAnchor]) -> ScatterStats:
    """Scatter of all exemplars around their own class means (the paper's tied covariance)."""
    stats = ScatterStats.empty(int(anchors[0].class_means.shape[1]))
    for a in anchors:
        lab = a.exemplar_labels.astype(np.int64)
        stats.add(a.exemplars.astype(np.float64) - a.class_means.astype(np.float64)[lab])
    return stats


# ---------------------------------------------------------------------------- Mahalanobis
class MahalanobisMapper(TaskMapper):
    """Class means of all tasks under one shrunk tied covariance; task score = its best class.

    Per-class score is the Gaussian log-likelihood up to a constant shared by all classes,
    ``-0.5 * (x - mu_c)^T S^-1 (x - mu_c)``, so the softmax over tasks is a posterior and
    scores are comparable with the teacher's threshold scale.
    """

    kind = "maha"

    def __init__(
        self,
        names: Sequence[str],
        anchors: Sequence[MahalanobisAnchor],
        *,
        feature_transform: str = "raw",
        thresholds: np.ndarray | None = None,
        shrinkage: Literal["ledoit_wolf", "oas"] = "ledoit_wolf",
        covariance: np.ndarray | None = None,
        block_elements: int = DEFAULT_BLOCK_ELEMENTS,
    ) -> None:
        _check_names(names)
        if len(names) != len(anchors):
            raise MapperError(f"{len(names)} names but {len(anchors)} anchors")
        dims = {int(a.class_means.shape[1]) for a in anchors}
        if len(dims) != 1:
            raise MapperError(f"Mahalanobis anchors have different feature sizes {sorted(dims)}")
        self.task_names = list(names)
        self.feature_transform = feature_transform
        self.feature_dim = d = dims.pop()
        self.block_elements = int(block_elements)
        self.thresholds = (np.full(len(names), -np.inf) if thresholds is None
                           else np.asarray(thresholds, dtype=np.float64))
        self.counts = np.array([a.class_means.shape[0] for a in anchors], dtype=np.intp)
        if covariance is None:
            covariance, self.shrinkage = exemplar_scatter(anchors).shrunk(shrinkage)
        else:
            self.shrinkage = float("nan")
        covariance = np.asarray(covariance, dtype=np.float64)
        if covariance.shape != (d, d):
            raise MapperError(f"covariance must be [{d}, {d}], got {covariance.shape}")
        try:
            chol = np.linalg.cholesky(covariance)
        except np.linalg.LinAlgError as exc:
            raise MapperError("tied covariance is not positive definite; use a shrinkage estimator") from exc
        # whiten: z = (x - center) @ W with W W^T = S^-1;  W = inv(L)^T
        w = np.linalg.solve(chol, np.eye(d)).T
        self.center = np.mean(
            np.concatenate([a.class_means for a in anchors]).astype(np.float64), axis=0
        ).astype(np.float32)
        self.whiten = w.astype(np.float32)  # [D, D]
        zc = (np.concatenate([a.class_means for a in anchors]).astype(np.float64) - self.center) @ w
        self.means_t = np.ascontiguousarray(zc.T.astype(np.float32))  # [D, C]
        self.half_sq_norm = (0.5 * (zc * zc).sum(axis=1)).astype(np.float32)  # [C]
        self.uniform_c = int(self.counts[0]) if np.all(self.counts == self.counts[0]) else None

    @classmethod
    def from_knowledge(cls, knowledge: Sequence[TaskKnowledge], **kwargs) -> "MahalanobisMapper":
        """Build from received task records; every record needs a Mahalanobis anchor and the same transform."""
        knowledge = list(knowledge)
        if not knowledge:
            raise MapperError("a mapper needs at least one task")
        missing = [k.task for k in knowledge if k.maha is None]
        if missing:
            raise MapperError(f"tasks {missing} carry no Mahalanobis anchor; use the GMMC mapper or refit them")
        return cls([k.task for k in knowledge], [k.maha for k in knowledge],
                   feature_transform=_common_transform(knowledge), thresholds=_thresholds(knowledge, "maha"),
                   **kwargs)

    def class_scores(self, x: np.ndarray) -> np.ndarray:
        """-0.5 * squared Mahalanobis distance to every class mean, [N, C] (transformed features)."""
        z = (x - self.center) @ self.whiten
        return z @ self.means_t - self.half_sq_norm - 0.5 * (z * z).sum(axis=1, keepdims=True)

    def task_scores(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = (x - self.center) @ self.whiten
        half_z2 = 0.5 * (z * z).sum(axis=1, keepdims=True)
        n, t = x.shape[0], len(self.counts)
        out = np.empty((n, t), dtype=np.float32)
        per_block = max(1, self.block_elements // max(n, 1))
        ends = np.cumsum(self.counts)
        t0 = 0
        while t0 < t:
            r0 = int(ends[t0 - 1]) if t0 else 0
            t1 = max(int(np.searchsorted(ends, r0 + per_block, side="right")), t0 + 1)
            r1 = int(ends[t1 - 1])
            s = z @ self.means_t[:, r0:r1]
            s -= self.half_sq_norm[r0:r1]
            s -= half_z2
            out[:, t0:t1] = _segment_max(s, _segment_starts(self.counts[t0:t1]), self.uniform_c)
            t0 = t1
        return out, out


def mahalanobis_task_score(anchor: MahalanobisAnchor, x: np.ndarray) -> np.ndarray:
    """Teacher's view of one task's Mahalanobis score (covariance from its own exemplars), [N]."""
    _, s = MahalanobisMapper(["task"], [anchor]).task_scores(np.asarray(x, dtype=np.float32))
    return s[:, 0].astype(np.float64)


def build_mapper(kind: Literal["gmmc", "maha"], knowledge: Sequence[TaskKnowledge], **kwargs) -> TaskMapper:
    """``GmmcMapper`` or ``MahalanobisMapper`` from received task records, by kind name."""
    if kind == "gmmc":
        return GmmcMapper.from_knowledge(knowledge, **kwargs)
    if kind == "maha":
        return MahalanobisMapper.from_knowledge(knowledge, **kwargs)
    raise MapperError(f"unknown mapper kind {kind!r}; use 'gmmc' or 'maha'")
