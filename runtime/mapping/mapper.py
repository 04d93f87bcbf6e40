"""Student side of the task mapper: pick which stored task an input belongs to, with no oracle.

Every stored task is scored in one vectorised pass over the batch:

* ``GmmcMapper``: each task is a mixture of diagonal Gaussians.  The log-density of every
  component is one matrix product, ``[x**2, x] @ [-0.5/var, mu/var].T + const``; a task's
  score is the logsumexp (or max) over its own components.
* ``MahalanobisMapper``: one tied covariance, shrunk (Ledoit-Wolf or OAS) and estimated by
  the student from all received exemplars centred by their class means; every class mean is
  scored with one matrix product in the whitened metric, and a task's score is its best class.

Both report, per input, the best task, its posterior over tasks (softmax of the per-task
log-likelihoods), the full score matrix, and ``unknown`` when the chosen task's open-set
score falls below the threshold its teacher calibrated, under any anchor its record carries
(``AnchorTests``), even after adding the chosen task's lead over the runner-up task
(``open_set_margins``).  Each anchor's score depends on that task's anchor alone (GMMC: its
mixture log-likelihood; Mahalanobis: the distance under its own exemplars' covariance,
``OwnExemplarMetric``), so it means on every student exactly what it meant on the teacher,
however many other tasks the student holds; the lead, which depends on the bank, only ever
clears an input, never rejects one.

Inputs are *raw* pooled backbone features, plus the ROM's trunk statistics for the default
``sqrt_l2_trunk`` transform; the mapper applies the feature transform its tasks were fitted in
(``TaskKnowledge.meta.feature_transform``) and refuses to mix tasks fitted in different spaces,
since their scores would not be comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from skill_edge.runtime.mapping.anchors import FEATURE_TRANSFORMS, AnchorError, transform_features
from skill_edge.runtime.knowledge.identity import TaskKey, display_names
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge

LOG_2PI = float(np.log(2 * np.pi))

#: Largest ``batch x rows`` score block computed at once (float32 elements, 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24
#: Most rows (components or classes) in one block of whole tasks.
DEFAULT_BLOCK_ROWS = 1 << 16


class MapperError(ValueError):
    """Tasks that cannot be put into one mapper (missing anchors, mixed transforms, shapes)."""


@dataclass
class MapperResult:
    """The mapper's answer for a batch of N inputs over T stored tasks."""

    task_index: np.ndarray  # [N] int, index into task_names
    task_names: list[str]  # [T]
    confidence: np.ndarray  # [N] calibrated posterior of the chosen task (softmax of scores / temperature)
    scores: np.ndarray  # [N, T] per-task scores used for the choice (higher = more likely)
    unknown: np.ndarray  # [N] bool, the best task rejects the input: below an open-set threshold its record carries

    @property
    def tasks(self) -> list[str]:
        """The chosen task's name per input."""
        return [self.task_names[i] for i in self.task_index]


# ---------------------------------------------------------------------------- helpers
def matmul_nt(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b.T`` for float32 arrays (numpy's BLAS; the device path imports no torch)."""
    return a @ b.T


def lower_triangular_inverse(low: np.ndarray, block: int = 128) -> np.ndarray:
    """``inv(L)`` of a lower-triangular ``L`` with a positive diagonal, by recursive 2x2 blocks.

    ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``: the work is matrix products
    (BLAS-3), a third of a general inverse, in numpy alone (LAPACK's ``dtrtri`` lives in scipy,
    which a device install leaves out).  At D = 1664 it matches ``dtrtri`` to 1e-15 relative."""
    n = low.shape[0]
    if n <= block:
        return np.tril(np.linalg.inv(low))
    h = n // 2
    a = lower_triangular_inverse(low[:h, :h], block)
    d = lower_triangular_inverse(low[h:, h:], block)
    out = np.zeros_like(low)
    out[:h, :h] = a
    out[h:, h:] = d
    out[h:, :h] = -(d @ (low[h:, :h] @ a))
    return out


def runner_up_gap(selection: np.ndarray, task_index: np.ndarray) -> np.ndarray:
    """[N]: each input's score under ``task_index`` minus its best score under any other task (0 with a
    single task, or where the others' scores are not finite)."""
    n, t = selection.shape
    if t < 2:
        return np.zeros(n)
    s = np.array(selection, dtype=np.float64)
    rows = np.arange(n)
    chosen = s[rows, task_index].copy()
    s[rows, task_index] = -np.inf
    gap = chosen - s.max(axis=1)
    return np.where(np.isfinite(gap), gap, 0.0)


def _softmax_max(scores: np.ndarray) -> np.ndarray:
    """Largest softmax probability per row, computed stably."""
    s = scores - scores.max(axis=1, keepdims=True)
    return 1.0 / np.exp(s).sum(axis=1)


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
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dupes = sorted({n for n in names if n in seen or seen.add(n)})
        raise MapperError(f"duplicate task names {dupes}; keep one record per task")


def _thresholds(knowledge: Sequence[TaskKnowledge], kind: str) -> np.ndarray:
    """Per-task open-set thresholds; a task without one never reports unknown (-inf)."""
    return np.array([k.thresholds.get(kind, -np.inf) for k in knowledge], dtype=np.float64)


@dataclass(frozen=True)
class _Block:
    t0: int  # first task
    t1: int  # one past the last task
    r0: int  # first row
    r1: int  # one past the last row
    k: int | None  # rows per task when the block is stored component-major, else None


class TaskLayout:
    """Where each task's rows (GMMC components, Mahalanobis classes) sit in one stacked matrix.

    Tasks are grouped into blocks of whole tasks (at most ``block_rows`` rows each, so the
    per-batch score block stays bounded however many tasks there are).  In a block whose
    tasks all have the same row count ``k`` the rows are stored component-major (row 0 of
    every task, then row 1 of every task, ...): the per-task max/logsumexp then runs over
    ``k`` contiguous ``[N, tasks]`` slices, which numpy does many times faster than a reduction
    over a short trailing axis.  Other blocks are task-major and reduced with ``reduceat``.
    Row ``j`` of task ``t`` is at ``first_row[t] + j * stride[t]``.
    """

    def __init__(self, counts: Sequence[int], block_rows: int) -> None:
        self.counts = np.asarray(counts, dtype=np.intp)
        if np.any(self.counts < 1):
            raise MapperError("every task needs at least one component/class")
        self.first_row = np.empty(len(self.counts), dtype=np.intp)
        self.stride = np.ones(len(self.counts), dtype=np.intp)
        self.blocks: list[_Block] = []
        t0 = r0 = 0
        while t0 < len(self.counts):
            t1, rows = t0, 0
            while t1 < len(self.counts) and (t1 == t0 or rows + self.counts[t1] <= block_rows):
                rows += int(self.counts[t1])
                t1 += 1
            c = self.counts[t0:t1]
            k = int(c[0]) if np.all(c == c[0]) else None
            if k is not None:
                self.first_row[t0:t1] = r0 + np.arange(t1 - t0)
                self.stride[t0:t1] = t1 - t0
            else:
                self.first_row[t0:t1] = r0 + np.concatenate([[0], np.cumsum(c)[:-1]])
            self.blocks.append(_Block(t0, t1, r0, r0 + rows, k))
            t0, r0 = t1, r0 + rows
        self.rows = r0

    def positions(self, t: int) -> np.ndarray:
        return self.first_row[t] + np.arange(self.counts[t]) * self.stride[t]

    def reduce(self, s: np.ndarray, b: _Block, how: str) -> np.ndarray:
        """Per-task max or logsumexp of a block's scores ``s`` [N, rows] -> [N, tasks]; ``s`` is clobbered."""
        if b.k is not None:
            s3 = s.reshape(s.shape[0], b.k, b.t1 - b.t0)
            mx = s3.max(axis=1)
            if how == "max":
                return mx
            s3 -= mx[:, None, :]
            np.exp(s3, out=s3)
            return np.log(s3.sum(axis=1)) + mx
        counts = self.counts[b.t0:b.t1]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.intp)
        mx = np.maximum.reduceat(s, starts, axis=1)
        if how == "max":
            return mx
        s -= np.repeat(mx, counts, axis=1)
        np.exp(s, out=s)
        return np.log(np.add.reduceat(s, starts, axis=1)) + mx


_ANCHOR_NAMES = {"gmmc": "GMMC", "maha": "Mahalanobis"}


class TaskMapper:
    """Shared plumbing: transform, block-wise scoring, decision and open-set test."""

    kind: str = ""  # the TaskKnowledge anchor attribute and thresholds key this mapper reads
    #: Softmax temperature per dimension of the anchors' space; ``temperature`` is this times
    #: ``feature_dim``.  The raw scores are log-likelihoods, sums over ~1,700 (Lite0) to ~3,500
    #: (Xception) coordinates that are far from independent, so their plain softmax says 1.000 for
    #: nearly every input, and the gap between two tasks' scores grows with the width.  The
    #: temperature is fitted by likelihood on held-out images (benchmarks/mapper_peers.py,
    #: ``calibration``); on the same 13 tasks it was 2.2x (GMMC) and 1.8x (Mahalanobis) higher on
    #: Xception (3,504 wide) than on Lite0 (1,664), and a fixed Lite0 value left an Xception
    #: device's task confidence with an ECE of 0.11 (benchmarks/results/mapper_peers_siblings_xception.json).
    temperature_per_dim: float = 1.0 / 1664
    #: Weight of the chosen task's lead over the runner-up in the open-set test (``open_set_margins``);
    #: 0 is the test of the chosen task's anchors alone.
    runner_up_weight: float = 1.0
    _temperature: float | None = None  # an explicit override (set ``temperature``)

    @property
    def temperature(self) -> float:
        """Softmax temperature that turns per-task scores into a calibrated posterior (``confidence``)."""
        return self._temperature if self._temperature is not None else self._temperature_per_dim() * self.feature_dim

    def _temperature_per_dim(self) -> float:
        return self.temperature_per_dim

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not value > 0:
            raise MapperError(f"temperature must be > 0, got {value}")
        self._temperature = float(value)

    @classmethod
    def from_knowledge(cls, knowledge: Sequence[TaskKnowledge], *,
                       open_set: Literal["every_anchor", "own_anchor"] = "every_anchor", **kwargs):
        """Build from received task records; every record needs this mapper's anchor and the same transform.
        ``open_set``: whether a task also rejects inputs with the other anchor kind its record carries."""
        knowledge = list(knowledge)
        if not knowledge:
            raise MapperError("a mapper needs at least one task")
        missing = [k.task for k in knowledge if getattr(k, cls.kind) is None]
        if missing:
            other = next(v for k, v in _ANCHOR_NAMES.items() if k != cls.kind)
            raise MapperError(f"tasks {missing} carry no {_ANCHOR_NAMES[cls.kind]} anchor; "
                              f"use the {other} mapper or refit them")
        # two agents may teach one name: their tasks are named task@agent here (runtime.knowledge.identity)
        names = display_names([TaskKey(k.task, k.meta.agent_id) for k in knowledge])
        if open_set not in ("every_anchor", "own_anchor"):
            raise MapperError(f"open_set must be 'every_anchor' or 'own_anchor', got {open_set!r}")
        mapper = cls(names, [getattr(k, cls.kind) for k in knowledge],
                     feature_transform=_common_transform(knowledge), thresholds=_thresholds(knowledge, cls.kind),
                     **kwargs)
        mapper._note_reduced(knowledge)
        if open_set == "every_anchor":
            other = next(k for k in _ANCHOR_NAMES if k != cls.kind)
            if any(getattr(k, other) is not None and other in k.thresholds for k in knowledge):
                mapper.other_tests = AnchorTests(other, [getattr(k, other) for k in knowledge],
                                                 _thresholds(knowledge, other))
        return mapper
    task_names: list[str]
    feature_transform: str
    thresholds: np.ndarray  # [T]
    other_tests: "AnchorTests | None" = None  # the other anchor kind's open-set tests (``from_knowledge``)
    feature_dim: int  # width of the anchors' space (ROM features, plus trunk statistics for trunk transforms)
    layout: TaskLayout
    block_elements: int

    def _note_reduced(self, knowledge: Sequence[TaskKnowledge]) -> None:
        """Hook for what the records' packet plans tell the mapper (``MahalanobisMapper``); none by default."""

    def _block_scores(self, x: np.ndarray, b: _Block) -> np.ndarray:
        """Row scores [N, b.r1 - b.r0] of one block for prepared inputs."""
        raise NotImplementedError

    def _prepare_batch(self, x: np.ndarray) -> np.ndarray:
        """Per-batch work shared by all blocks (e.g. whitening); identity by default."""
        return x

    def _reduce_how(self) -> str:
        return "max"

    def task_scores(self, x: np.ndarray) -> np.ndarray:
        """Per-task selection scores [N, T] for already *transformed* features (higher = more likely)."""
        x = np.asarray(x, dtype=np.float32)
        p = self._prepare_batch(x)
        out = np.empty((x.shape[0], len(self.task_names)), dtype=np.float32)
        for b in self.layout.blocks:
            rows = max(1, self.block_elements // max(b.r1 - b.r0, 1))  # bound the [N, rows] block
            for i in range(0, x.shape[0], rows):
                out[i:i + rows, b.t0:b.t1] = self.layout.reduce(self._block_scores(p[i:i + rows], b), b,
                                                                 self._reduce_how())
        return out

    def open_set_scores(self, x: np.ndarray, task_index: np.ndarray, selection: np.ndarray) -> np.ndarray:
        """The calibrated score of the chosen task per input (what thresholds compare against)."""
        return selection[np.arange(len(task_index)), task_index]

    def anchor_margins(self, x: np.ndarray, task_index: np.ndarray, selection: np.ndarray) -> np.ndarray:
        """Per input, how far it clears its chosen task's own tests: the smallest of score minus
        threshold over this mapper's anchor and, where the record carries it, the other kind's
        (``other_tests``); each in its own test's units (log-likelihoods)."""
        margin = self.open_set_scores(x, task_index, selection) - self.thresholds[task_index]
        if self.other_tests is not None:
            margin = np.minimum(margin, self.other_tests.margins(x, task_index))
        return margin

    def open_set_margins(self, x: np.ndarray, task_index: np.ndarray, selection: np.ndarray) -> np.ndarray:
        """``anchor_margins`` plus ``runner_up_weight`` times the chosen task's lead over the next best
        task (``runner_up_gap``).  Below 0 is ``unknown``.

        The lead is a log-likelihood ratio between two known tasks: an image of a task the bank lacks
        usually falls *between* its known look-alikes (a missing Omniglot alphabet between the
        others), while a known task's image is clearly its own task's.  Adding it took the
        leave-one-task-out AUROC from 0.881 to 0.904 at 21 tasks and 0.798 to 0.853 at 71, with the
        weight 1 best at both (benchmarks/mapper_peers.py).  The lead is never negative for the chosen
        task, so it only ever clears inputs: the share of a task's own images its teacher's
        thresholds reject stays an upper bound on every student."""
        margin = self.anchor_margins(x, task_index, selection)
        if self.runner_up_weight:
            margin = margin + self.runner_up_weight * runner_up_gap(selection, task_index)
        return margin

    def nbytes(self) -> int:
        """Bytes held by the mapper's arrays (what a device must keep in RAM)."""
        arrays = [v for v in vars(self).values() if isinstance(v, np.ndarray)]
        arrays += [self.layout.counts, self.layout.first_row, self.layout.stride]
        return sum(a.nbytes for a in arrays)

    def prepare(self, features: np.ndarray, trunk_stats: np.ndarray | None = None) -> np.ndarray:
        """Validate raw features [N, D] (or [D]), plus trunk statistics [N, 2C] where the transform
        reads them, and move them into the anchors' space (``feature_dim`` wide)."""
        x = np.asarray(features, dtype=np.float32)
        t = None if trunk_stats is None else np.asarray(trunk_stats, dtype=np.float32)
        if x.ndim == 1:
            x = x[None]
            t = t[None] if t is not None and t.ndim == 1 else t
        if x.ndim != 2 or (t is not None and t.ndim != 2):
            raise MapperError(f"features must be [N, D], got shape {x.shape}")
        if not np.all(np.isfinite(x)) or (t is not None and not np.all(np.isfinite(t))):
            raise MapperError("features hold NaN or inf values")
        try:
            z = transform_features(x, self.feature_transform, t)
        except AnchorError as exc:
            raise MapperError(str(exc)) from exc
        if z.shape[1] != self.feature_dim:
            raise MapperError(f"features give width {z.shape[1]} under transform {self.feature_transform!r}, "
                              f"but the anchors are {self.feature_dim} wide (another ROM?)")
        return z

    def predict(self, features: np.ndarray, trunk_stats: np.ndarray | None = None, *,
                open_set: bool = True) -> MapperResult:
        """Choose a task for each row of raw ``features`` [N, D] (and ``trunk_stats`` for trunk transforms);
        ``open_set=False`` skips the open-set tests (``unknown`` is all False)."""
        x = self.prepare(features, trunk_stats)
        sel = self.task_scores(x)
        best = sel.argmax(axis=1)
        unknown = self.open_set_margins(x, best, sel) < 0 if open_set else np.zeros(len(best), dtype=bool)
        return MapperResult(
            task_index=best,
            task_names=list(self.task_names),
            confidence=_softmax_max(sel / self.temperature).astype(np.float32),
            scores=sel,
            unknown=unknown,
        )

    def __len__(self) -> int:
        return len(self.task_names)


# ---------------------------------------------------------------------------- GMMC
class GmmcMapper(TaskMapper):
    """All tasks' diagonal Gaussians stacked into one ``[M, 2D]`` matrix; one matmul per block.

    The quadratic is expanded around a shared centre (the mean of all component means), which
    keeps float32 cancellation small: without it ``x**2/var`` and ``mu**2/var`` are large
    numbers whose difference is the answer.

    ``reduce`` picks how a task's components make its selection score: ``logsumexp`` (the
    task's mixture log-likelihood) or ``max`` (its best component, the paper's rule).  The
    open-set test always uses the mixture log-likelihood, which is what teachers calibrate.
    """

    kind = "gmmc"
    #: 56 at Lite0's 1,664 (``sqrt_l2_trunk``), fitted on the 21 skill-bench tasks: ECE of the task
    #: confidence 0.120 -> 0.008 (benchmarks/results/mapper_peers.json, ``calibration``).
    temperature_per_dim = 56.0 / 1664

    def __init__(
        self,
        names: Sequence[str],
        anchors: Sequence[GmmcAnchor],
        *,
        feature_transform: str = "raw",
        thresholds: np.ndarray | None = None,
        reduce: Literal["logsumexp", "max"] = "logsumexp",
        block_rows: int = DEFAULT_BLOCK_ROWS,
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
        self.feature_dim = d = dims.pop()
        self.reduce = reduce
        self.block_elements = int(block_elements)
        self.thresholds = (np.full(len(names), -np.inf) if thresholds is None
                           else np.asarray(thresholds, dtype=np.float64))
        self.layout = TaskLayout([a.k for a in anchors], block_rows)
        self.center = np.mean([a.means.astype(np.float64).mean(axis=0) for a in anchors], axis=0).astype(np.float32)
        # row m: [-0.5/var, mu/var] and const log w - 0.5 (sum mu^2/var + sum log var + D log 2 pi),
        # written task by task so peak memory is one copy of the stacked matrix.
        self.coef = np.empty((self.layout.rows, 2 * d), dtype=np.float32)
        self.const = np.empty(self.layout.rows, dtype=np.float32)
        for t, a in enumerate(anchors):
            var = a.variances.astype(np.float64)
            if not np.all(np.isfinite(var)) or np.any(var <= 0):
                raise MapperError(f"GMMC variances of task {names[t]!r} must be finite and positive")
            mu = a.means.astype(np.float64) - self.center
            inv = 1.0 / var
            rows = self.layout.positions(t)
            self.coef[rows, :d] = -0.5 * inv
            self.coef[rows, d:] = mu * inv
            self.const[rows] = (np.log(np.maximum(a.weights.astype(np.float64), 1e-300))
                                - 0.5 * ((mu * mu * inv).sum(axis=1) + np.log(var).sum(axis=1) + d * LOG_2PI))

    def _prepare_batch(self, x: np.ndarray) -> np.ndarray:
        xc = x - self.center
        return np.concatenate([xc * xc, xc], axis=1)

    def _block_scores(self, design: np.ndarray, b: _Block) -> np.ndarray:
        s = matmul_nt(design, self.coef[b.r0:b.r1])
        s += self.const[b.r0:b.r1]
        return s

    def _reduce_how(self) -> str:
        return self.reduce

    def open_set_scores(self, x: np.ndarray, task_index: np.ndarray, selection: np.ndarray) -> np.ndarray:
        if self.reduce == "logsumexp":
            return super().open_set_scores(x, task_index, selection)
        # max selection: the chosen task's mixture log-likelihood, from its own rows only
        design = self._prepare_batch(x)
        out = np.empty(len(task_index), dtype=np.float64)
        for t in np.unique(task_index):
            sel = task_index == t
            rows = self.layout.positions(int(t))
            s = matmul_nt(design[sel], self.coef[rows]) + self.const[rows]
            mx = s.max(axis=1, keepdims=True)
            out[sel] = (np.log(np.exp(s - mx).sum(axis=1)) + mx[:, 0])
        return out


def gmmc_task_loglik(anchor: GmmcAnchor, x: np.ndarray) -> np.ndarray:
    """log p(x | task) under one task's mixture, for transformed features [N, D] -> [N]."""
    return GmmcMapper(["task"], [anchor]).task_scores(np.asarray(x, dtype=np.float32))[:, 0].astype(np.float64)


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
        s = self.sxx / n  # becomes the result in place: a cold classify builds this on a small board
        mu = float(np.trace(s)) / p
        fro2 = float(np.vdot(s, s))  # no [D, D] temporary
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
        s *= 1.0 - shrinkage
        s.flat[:: p + 1] += shrinkage * mu
        return s, float(shrinkage)


def exemplar_scatter(anchors: Sequence[MahalanobisAnchor], chunk_rows: int = 1024) -> ScatterStats:
    """Scatter of all exemplars around their own class means (the paper's tied covariance).

    Deviations are written into one ``[chunk_rows, D]`` buffer, so each update is one large
    product instead of one small product per task, and the working memory stays one buffer (at
    Lite0's D = 1,664, 14 MB; gathering per-task copies took 70 MB on 21 tasks, most of a cold
    ``classify``'s peak after a bank change).
    """
    d = int(anchors[0].class_means.shape[1])
    stats = ScatterStats.empty(d)
    buf = np.empty((chunk_rows, d), dtype=np.float64)
    rows = 0
    for a in anchors:
        lab = a.exemplar_labels.astype(np.int64)
        for start in range(0, len(lab), chunk_rows):
            part = lab[start:start + chunk_rows]
            if rows + len(part) > chunk_rows:
                stats.add(buf[:rows])
                rows = 0
            out = buf[rows:rows + len(part)]
            np.subtract(a.exemplars[start:start + len(part)], a.class_means[part], out=out, dtype=np.float64)
            rows += len(part)
    if rows:
        stats.add(buf[:rows])
    return stats


# ---------------------------------------------------------------------------- Mahalanobis
class MahalanobisMapper(TaskMapper):
    """Class means of all tasks under one shrunk tied covariance; task score = its best class.

    Per-class score is the Gaussian log-likelihood up to a constant shared by all classes,
    ``-0.5 * (x - mu_c)^T S^-1 (x - mu_c)``, so the softmax over tasks is a posterior.  The
    input is whitened once per batch (``z = (x - centre) @ W`` with ``W W^T = S^-1``) and the
    class means are stored whitened, so scoring every class is one matrix product.
    """

    kind = "maha"
    #: 32 at Lite0's 1,664 (``sqrt_l2_trunk``), fitted on the 21 skill-bench tasks: ECE of the task
    #: confidence 0.086 -> 0.009 (benchmarks/results/mapper_peers.json, ``calibration``).
    temperature_per_dim = 32.0 / 1664
    #: 22 at 1,664 for anchors that came in reduced packets (exemplars quantized to a few bits or
    #: thinned, class means merged: the 56 KB budget), fitted the same way on the same tasks.  Their
    #: exemplars carry the quantization noise and are fewer, so the tied covariance comes out wider
    #: and the scores' gaps narrower: at 32 the task confidence of a 56 KB bank had an ECE of 0.049.
    reduced_temperature_per_dim = 22.0 / 1664
    #: Share of the tied scatter's exemplar rows that came from reduced packets (``from_knowledge``).
    reduced_share: float = 0.0

    def _note_reduced(self, knowledge: Sequence[TaskKnowledge]) -> None:
        rows = np.array([k.maha.exemplars.shape[0] for k in knowledge], dtype=np.float64)
        reduced = np.array([maha_was_reduced(k) for k in knowledge])
        self.reduced_share = float(rows[reduced].sum() / rows.sum()) if rows.sum() else 0.0

    def _temperature_per_dim(self) -> float:
        """Between the lossless and the reduced value, by the share of exemplar rows from reduced packets."""
        s = self.reduced_share
        return (1.0 - s) * self.temperature_per_dim + s * self.reduced_temperature_per_dim

    def __init__(
        self,
        names: Sequence[str],
        anchors: Sequence[MahalanobisAnchor],
        *,
        feature_transform: str = "raw",
        thresholds: np.ndarray | None = None,
        shrinkage: Literal["ledoit_wolf", "oas"] = "ledoit_wolf",
        covariance: np.ndarray | None = None,
        state: dict[str, np.ndarray] | None = None,
        block_rows: int = DEFAULT_BLOCK_ROWS,
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
        self.layout = TaskLayout([a.class_means.shape[0] for a in anchors], block_rows)
        self._own_tests = AnchorTests("maha", anchors, self.thresholds)  # the open-set metric, per task
        if state is not None:
            self._set_state(state)
            return
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
        # W = inv(L)^T, so W W^T = inv(S).  A triangular inverse does a sixth of the work of a
        # general solve against the identity; students and the plausibility check build this on
        # every bank change.
        if not np.all(np.diag(chol) > 0):
            raise MapperError("tied covariance is singular; use a shrinkage estimator")
        del covariance  # [D, D] float64 each: a cold process holds as few at once as it can
        inv_l = lower_triangular_inverse(chol)
        del chol
        w = inv_l.T
        self.whiten_t = np.ascontiguousarray(inv_l, dtype=np.float32)  # [D, D], W transposed for matmul_nt
        self.center = np.mean([a.class_means.astype(np.float64).mean(axis=0) for a in anchors],
                              axis=0).astype(np.float32)
        self.means_w = np.empty((self.layout.rows, d), dtype=np.float32)  # whitened class means
        self.half_sq_norm = np.empty(self.layout.rows, dtype=np.float32)
        for start in range(0, len(anchors), 256):  # whiten 256 tasks' means per product
            group = range(start, min(start + 256, len(anchors)))
            z = (np.concatenate([anchors[t].class_means for t in group]).astype(np.float64) - self.center) @ w
            rows = np.concatenate([self.layout.positions(t) for t in group])
            self.means_w[rows] = z
            self.half_sq_norm[rows] = 0.5 * (z * z).sum(axis=1)

    #: What ``state()`` holds and how it is computed; a saved state of another version is not taken.
    STATE_VERSION = 1

    def state(self) -> dict[str, np.ndarray]:
        """The arrays the student derived from all its tasks: the tied covariance's whitening and the
        whitened class means.  Computing them is O(D^3) plus a pass over every exemplar (0.26 s of a
        cold ``classify`` on 21 Lite0 tasks); ``Device`` keeps them per bank state and passes them
        back as ``state=`` to a cold process holding the same tasks."""
        return {"whiten_t": self.whiten_t, "center": self.center, "means_w": self.means_w,
                "half_sq_norm": self.half_sq_norm, "shrinkage": np.array([self.shrinkage], np.float64)}

    def _set_state(self, state: dict[str, np.ndarray]) -> None:
        d, rows = self.feature_dim, self.layout.rows
        want = {"whiten_t": (d, d), "center": (d,), "means_w": (rows, d), "half_sq_norm": (rows,), "shrinkage": (1,)}
        for name, shape in want.items():
            a = state.get(name)
            if a is None or a.shape != shape or (name != "shrinkage" and not np.all(np.isfinite(a))):
                raise MapperError(f"saved mapper state: {name} is missing, not {shape} or not finite")
        self.whiten_t = np.ascontiguousarray(state["whiten_t"], dtype=np.float32)
        self.center = np.asarray(state["center"], dtype=np.float32)
        self.means_w = np.ascontiguousarray(state["means_w"], dtype=np.float32)
        self.half_sq_norm = np.asarray(state["half_sq_norm"], dtype=np.float32)
        self.shrinkage = float(state["shrinkage"][0])

    def _prepare_batch(self, x: np.ndarray) -> np.ndarray:
        z = matmul_nt(np.ascontiguousarray(x - self.center), self.whiten_t)
        return np.concatenate([z, 0.5 * (z * z).sum(axis=1, keepdims=True)], axis=1)

    def _block_scores(self, zz: np.ndarray, b: _Block) -> np.ndarray:
        s = matmul_nt(zz[:, :-1], self.means_w[b.r0:b.r1])
        s -= self.half_sq_norm[b.r0:b.r1]
        s -= zz[:, -1:]
        return s

    def open_set_scores(self, x: np.ndarray, task_index: np.ndarray, selection: np.ndarray) -> np.ndarray:
        """The chosen task's own-exemplar score (``OwnExemplarMetric``), the quantity teachers calibrate."""
        return self._own_tests.scores(x, task_index)

    def task_scores_of(self, x: np.ndarray, tasks: Sequence[int]) -> np.ndarray:
        """``task_scores(x)[:, tasks]`` computed from those tasks' classes only, [N, len(tasks)]: what a
        caller that knows which tasks can matter pays, instead of every class (the plausibility check
        scores each reference point against its own task, its rivals and a newcomer)."""
        zz = self._prepare_batch(np.asarray(x, dtype=np.float32))
        rows = [self.layout.positions(int(t)) for t in tasks]
        flat = np.concatenate(rows)
        s = matmul_nt(zz[:, :-1], self.means_w[flat])
        s -= self.half_sq_norm[flat]
        s -= zz[:, -1:]
        starts = np.cumsum([0] + [len(r) for r in rows[:-1]])
        return np.maximum.reduceat(s, starts, axis=1)

    def class_scores(self, x: np.ndarray) -> np.ndarray:
        """-0.5 * squared Mahalanobis distance to every class, [N, C] in task order (transformed features)."""
        zz = self._prepare_batch(np.asarray(x, dtype=np.float32))
        s = zz[:, :-1] @ self.means_w.T - self.half_sq_norm - zz[:, -1:]
        order = np.concatenate([self.layout.positions(t) for t in range(len(self.task_names))])
        return s[:, order]


@dataclass
class OwnExemplarMetric:
    """One task's Mahalanobis metric from its *own* exemplars alone, kept low-rank.

    The open-set test needs a score whose scale the teacher can calibrate, but the tied
    covariance a student uses depends on every task it has received.  This metric depends on
    the task's anchor only: Ledoit-Wolf shrinkage of the task's exemplars (centred by their
    class means), ``S = a I + U U^T`` with ``U`` [D, n].  Woodbury's identity gives
    ``(x - mu)^T S^-1 (x - mu) = (|v|^2 - w^T (a I + U^T U)^-1 w) / a`` with ``v = x - mu`` and
    ``w = U^T v``, so scoring costs O(n D) per input and stores nothing beyond the exemplars.
    """

    class_means: np.ndarray  # [C, D] float64
    a: float  # isotropic part
    u: np.ndarray  # [D, n] low-rank part
    k_inv: np.ndarray  # [n, n] inverse of (a I + U^T U)
    means_u: np.ndarray  # [C, n] U^T mu_c
    means_sq: np.ndarray  # [C] |mu_c|^2
    means_quad: np.ndarray  # [C] (U^T mu_c)^T K (U^T mu_c), the per-class constant of the Woodbury term

    @classmethod
    def from_anchor(cls, anchor: MahalanobisAnchor) -> "OwnExemplarMetric":
        means = anchor.class_means.astype(np.float64)
        e = anchor.exemplars.astype(np.float64) - means[anchor.exemplar_labels.astype(np.int64)]
        n, p = e.shape
        gram = e @ e.T  # [n, n]; everything Ledoit-Wolf needs, without forming the D x D matrix
        mu = float(np.trace(gram)) / (n * p)
        fro2 = float((gram * gram).sum()) / n**2  # ||E^T E / n||_F^2
        norm4 = float((np.diag(gram) ** 2).sum())
        beta = (norm4 / n - fro2) / (p * n)
        delta = (fro2 - 2.0 * mu * mu * p + p * mu * mu) / p
        shrink = 0.0 if beta <= 0 or delta <= 0 else min(beta, delta) / delta
        a = max(shrink * mu, 1e-12 * max(mu, 1e-30))
        u = np.ascontiguousarray(e.T * np.sqrt((1.0 - shrink) / n))
        k_inv = np.linalg.inv(a * np.eye(n) + u.T @ u)
        means_u = means @ u
        return cls(means, a, u, k_inv, means_u, (means * means).sum(axis=1),
                   ((means_u @ k_inv) * means_u).sum(axis=1))

    def scores(self, x: np.ndarray) -> np.ndarray:
        """max over the task's classes of -0.5 * squared distance, [N]."""
        x = np.asarray(x, dtype=np.float64)
        sq = (x * x).sum(axis=1)[:, None] - 2.0 * x @ self.class_means.T + self.means_sq  # [N, C]
        # w_c = U^T x - U^T mu_c; w_c^T K w_c expanded, so no [N, C, n] tensor is formed
        # (a 102-class task with 510 exemplar rows would need 5 GB for 13,000 inputs).
        a = x @ self.u  # [N, n]
        ak = a @ self.k_inv
        quad = (ak * a).sum(axis=1)[:, None] - 2.0 * ak @ self.means_u.T + self.means_quad
        return (-0.5 * (sq - quad) / self.a).max(axis=1)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` draws from N(mean row, ``S``), the rows in turn: the task as its own anchor models it."""
        rows = np.arange(n) % self.class_means.shape[0]
        low_rank = rng.standard_normal((n, self.u.shape[1])) @ self.u.T
        return self.class_means[rows] + low_rank + np.sqrt(self.a) * rng.standard_normal((n, self.u.shape[0]))


def mahalanobis_task_score(anchor: MahalanobisAnchor, x: np.ndarray) -> np.ndarray:
    """Open-set score of one task: its own-exemplar Mahalanobis score (teacher and student agree), [N]."""
    return OwnExemplarMetric.from_anchor(anchor).scores(x)


class AnchorTests:
    """One anchor kind's open-set test per task: the score that depends on the task's anchor alone
    (GMMC: its mixture log-likelihood; Mahalanobis: ``OwnExemplarMetric``), against its threshold.

    ``MahalanobisMapper`` scores its own open set with one; ``from_knowledge`` gives every mapper one
    of the *other* kind (``TaskMapper.other_tests``).  A task learned with both anchors carries both
    thresholds, each set so that about 1 % of its held-out images fall below it, so rejecting when
    either fails calls at most about 2 % of its own images unknown.  The two fail on different
    families: leaving one of the 21 skill-bench tasks out of the bank, GMMC separates an absent
    Omniglot alphabet's images from the known tasks' with an AUROC of 0.52-0.72 and the Mahalanobis
    own-exemplar metric with 0.84-0.96, while on the CIFAR-10 pairs it is the other way round
    (0.78-0.89 against 0.50-0.75; benchmarks/results/mapper_peers.json, ``open_set_own_anchor``).
    A task without the anchor, or without its threshold, passes.  Scorers are built per task on
    first use, since an input batch usually reaches few tasks.
    """

    def __init__(self, kind: str, anchors: Sequence[GmmcAnchor | MahalanobisAnchor | None],
                 thresholds: np.ndarray) -> None:
        if kind not in _ANCHOR_NAMES:
            raise MapperError(f"unknown anchor kind {kind!r}")
        self.kind = kind
        self._anchors = list(anchors)  # the bank's arrays, referenced (not copied)
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self._scorers: dict[int, GmmcMapper | OwnExemplarMetric] = {}

    def _score(self, t: int, x: np.ndarray) -> np.ndarray:
        if t not in self._scorers:
            a = self._anchors[t]
            self._scorers[t] = GmmcMapper(["task"], [a]) if self.kind == "gmmc" else OwnExemplarMetric.from_anchor(a)
        scorer = self._scorers[t]
        return scorer.task_scores(x)[:, 0].astype(np.float64) if self.kind == "gmmc" else scorer.scores(x)

    def scores(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """Each input's score under its chosen task's anchor, [N]; -inf where that task has none."""
        out = np.full(len(task_index), -np.inf)
        for t in np.unique(task_index):
            t = int(t)
            if self._anchors[t] is not None:
                sel = task_index == t
                out[sel] = self._score(t, x[sel])
        return out

    def margins(self, x: np.ndarray, task_index: np.ndarray) -> np.ndarray:
        """Score minus threshold of each input's chosen task, [N]; +inf where that task has no test."""
        tested = np.array([self._anchors[int(t)] is not None for t in task_index], bool) & np.isfinite(
            self.thresholds[task_index])
        out = np.full(len(task_index), np.inf)
        out[tested] = self.scores(x[tested], task_index[tested]) - self.thresholds[task_index[tested]]
        return out


def maha_was_reduced(knowledge: TaskKnowledge) -> bool:
    """Whether this record's Mahalanobis anchor came in a packet that reduced it: exemplars at 4 bits
    or fewer, fewer exemplars than the teacher kept, or merged class means.  Own records (learned
    here, no packet) and fp32, fp16 or 8-bit packets are not."""
    enc = knowledge.meta.encoding or {}
    if not enc:
        return False
    quantized = enc.get("tensors", {}).get("maha.exemplars", "f32") not in ("f32", "f16", "i8r", "i8c")
    thinned = (enc.get("exemplars_per_class") or 0) < (enc.get("exemplars_per_class_original") or 0)
    return bool(quantized or thinned or enc.get("maha_means") is not None)


def build_mapper(kind: Literal["gmmc", "maha"], knowledge: Sequence[TaskKnowledge], **kwargs) -> TaskMapper:
    """``GmmcMapper`` or ``MahalanobisMapper`` from received task records, by kind name."""
    if kind == "gmmc":
        return GmmcMapper.from_knowledge(knowledge, **kwargs)
    if kind == "maha":
        return MahalanobisMapper.from_knowledge(knowledge, **kwargs)
    raise MapperError(f"unknown mapper kind {kind!r}; use 'gmmc' or 'maha'")
