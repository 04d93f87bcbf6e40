"""Reject task anchors that would hijack the mapper, before they enter the bank.

A signature proves who sent a packet, not that its anchor is sane.  A trusted but buggy or
compromised teacher can ship an anchor that captures other tasks' inputs: a Gaussian
centred on the data with enormous or needle-thin variances, mixture weights that do not
sum to one, a copy of another task's anchor, or Mahalanobis exemplars that warp the tied
covariance every student computes.  Once such an anchor is in the mapper, every input
it captures is sent to the wrong head.

``PlausibilityCheck`` tests a newcomer against what the device itself knows:

1. structure: same feature space and size as the bank, weights that form a distribution;
2. scale: GMMC variances and Mahalanobis exemplar scatter within a generous factor of the
   range seen in the device's own data and stored anchors;
3. capture: the device's reference points (its own tasks' features, plus points drawn from
   the stored anchors, each labelled with its task) are mapped with and without the
   newcomer; if more than ``max_capture`` of any one task's points would move to another
   task, the newcomer is refused.

It is called as ``check(knowledge) -> (ok, reason)`` (or just ``check(knowledge)``) and is
meant to be handed to the packet receiver as ``plausibility=``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from skill_edge.runtime.mapping.anchors import DEFAULT_TRANSFORM, transform_features
from skill_edge.runtime.knowledge.identity import TaskKey, display_names
from skill_edge.runtime.knowledge.records import KnowledgeError, TaskKnowledge
from skill_edge.runtime.mapping.mapper import MahalanobisMapper, OwnExemplarMetric, ScatterStats

#: Default largest fraction of one known task's reference points a newcomer may take over.
#: On the 21 real benchmark tasks a legitimate newcomer took at most ~12 % of any other
#: task's held-out features (CIFAR-10 siblings), while over-fits of a victim's data and
#: over-fine class means took 18-66 % (benchmarks/results/mapper_tuning.md).  A re-learned
#: duplicate of a known task under a new name is mostly refused too, as it should be.
DEFAULT_MAX_CAPTURE = 0.2
#: Default factor by which a newcomer's variance scale may leave the range seen (each way).
DEFAULT_SCALE_SLACK = 20.0


@dataclass
class CaptureReport:
    """How a newcomer would change the mapping of the device's reference points, per known task."""

    kind: str
    moved: dict[str, float] = field(default_factory=dict)  # fraction of the task's points that change task

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.moved.items(), key=lambda kv: kv[1]) if self.moved else ("", 0.0)


class PlausibilityCheck:
    """Refuses anchors that are out of scale or would capture the device's own tasks' inputs.

    ``reference_features`` maps task name (standing for every stored task of that name) or
    ``TaskKey`` -> *raw* features the device trusts for that task,
    as an array or, for transforms that read trunk statistics, a ``(features, trunk_stats)`` pair;
    best its own *held-out* features (e.g. the threshold-calibration split): an anchor fits
    its own training features better than new inputs, which understates capture.  200 per
    task are plenty.  ``existing`` is the
    bank's knowledge.  For a stored task without reference features, its anchors stand in:
    they are generative models of the task's features, so ``synthetic_per_task`` points are
    drawn from each (the GMMC mixture; the class means plus the task's own-exemplar
    covariance).  A device with no raw features of its own still has something to test against.
    """

    def __init__(
        self,
        reference_features: Mapping[str, np.ndarray | tuple[np.ndarray, np.ndarray]],
        existing: Sequence[TaskKnowledge],
        *,
        feature_transform: str | None = None,
        max_capture: float = DEFAULT_MAX_CAPTURE,
        scale_slack: float = DEFAULT_SCALE_SLACK,
        max_points_per_task: int = 200,
        synthetic_per_task: int = 100,
        seed: int = 0,
    ) -> None:
        if not 0.0 < max_capture <= 1.0:
            raise ValueError(f"max_capture must be in (0, 1], got {max_capture}")
        if scale_slack <= 1.0:
            raise ValueError(f"scale_slack must be > 1, got {scale_slack}")
        self.existing = list(existing)
        transforms = {k.meta.feature_transform for k in self.existing}
        if len(transforms) > 1:
            raise ValueError(f"the bank mixes feature transforms {sorted(transforms)}; fix the bank first")
        self.feature_transform = transforms.pop() if transforms else (feature_transform or DEFAULT_TRANSFORM)
        self.max_capture = max_capture
        self.log_slack = float(np.log(scale_slack))
        pairs = {t: v if isinstance(v, tuple) else (v, None) for t, v in reference_features.items()}
        dims = {int(np.shape(f)[-1]) for f, _ in pairs.values()} | {k.feature_dim for k in self.existing}
        if len(dims) > 1:
            raise ValueError(f"reference features and bank disagree on the feature size: {sorted(dims)}")
        self.feature_dim = dims.pop() if dims else None
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.synthetic_per_task = synthetic_per_task
        self._raw: dict[str | TaskKey, tuple[np.ndarray, np.ndarray | None]] = {}  # the chosen rows, raw
        for task, (feats, stats) in pairs.items():
            feats = np.asarray(feats, dtype=np.float32)
            if feats.shape[0] > max_points_per_task:
                rows = np.sort(rng.choice(feats.shape[0], max_points_per_task, replace=False))
                feats, stats = feats[rows], None if stats is None else np.asarray(stats)[rows]
            self._raw[task] = (feats, stats)
        self._ref: dict[str | TaskKey, np.ndarray] = {}  # transformed reference points, by name or TaskKey
        self._transform_reference()
        widths = {x.shape[1] for x in self._ref.values()} | {k.anchor_dim for k in self.existing
                                                             if k.anchor_dim is not None}
        if len(widths) > 1:
            raise ValueError(f"reference features and bank disagree on the anchor width: {sorted(widths)}")
        self.anchor_dim = widths.pop() if widths else None
        # Incremental state, kept per stored task so that a bank change costs work for the changed
        # task only (``add`` / ``remove``), and a check costs work linear in the stored tasks.
        self.points: dict[TaskKey, np.ndarray] = {}  # every stored task's reference points
        self._tasks: dict[TaskKey, TaskKnowledge] = {}
        self._gmmc_scale: dict[TaskKey, np.ndarray] = {}  # log mean variance per component
        self._maha_scale: dict[TaskKey, float] = {}
        self._maha_stats: ScatterStats | None = None  # exemplar scatter of every stored task
        self._ids: dict[TaskKey, int] = {}
        self._next_id = 0
        self._gmmc_top: dict[TaskKey, _Top2] = {}  # per point owner: best two stored GMMC tasks per point
        self._before: tuple | None = None  # Mahalanobis choices of the bank's mapper, per point owner
        self._after: tuple | None = None  # the choices of the last check's new mapper (bank + newcomer)
        self._content: dict[TaskKey, str] = {}  # content hash per stored task
        self.existing = []
        for k in existing:
            self.add(k)

    def _transform_reference(self) -> None:
        self._ref = {t: transform_features(f, self.feature_transform, st) for t, (f, st) in self._raw.items()}

    # ------------------------------------------------------------------ the bank changes
    def add(self, knowledge: TaskKnowledge) -> None:
        """Take a stored task into the check (replacing an older version of the same identity).

        Costs the new task's own points scored against every stored GMMC task, and every stored
        task's points scored against the new one: linear in the number of stored tasks."""
        key = _identity(knowledge)
        if key in self._tasks:
            self.remove(key)
        if not self._tasks and knowledge.meta.feature_transform != self.feature_transform:
            self.feature_transform = knowledge.meta.feature_transform  # the space of the bank's tasks
            self._transform_reference()
        self._tasks[key] = knowledge
        self._content[key] = knowledge.content_hash()
        self.existing = list(self._tasks.values())
        self._ids[key] = self._next_id  # ids follow the stored order, as a mapper's columns do (ties)
        self._next_id += 1
        if self.feature_dim is None:
            self.feature_dim = knowledge.feature_dim
        if self.anchor_dim is None:
            self.anchor_dim = knowledge.anchor_dim
        ref = self._ref.get(key, self._ref.get(knowledge.task))
        if ref is not None:  # real features beat synthetic ones (draws from an anchor favour it)
            self.points[key] = ref
        else:  # no features of this task here: its anchors are generative models, draw from them
            rng = _task_rng(self.seed, key)
            extra = [x for x in (_sample_gmmc(knowledge, self.synthetic_per_task, rng),
                                 _sample_maha(knowledge, self.synthetic_per_task, rng)) if x is not None]
            if extra:
                self.points[key] = np.concatenate(extra).astype(np.float32)
        if knowledge.gmmc is not None:
            self._gmmc_scale[key] = _log_mean_variance(knowledge.gmmc.variances)
            mine = self._ids[key]
            for owner, top in self._gmmc_top.items():
                top.offer(mine, _gmmc_scores(knowledge, self.points[owner]))
            if key in self.points:
                top = _Top2(self.points[key].shape[0])
                for other, k in self._tasks.items():
                    if k.gmmc is not None:
                        top.offer(self._ids[other], _gmmc_scores(k, self.points[key]))
                self._gmmc_top[key] = top
        if knowledge.maha is not None:
            s = _exemplar_log_scatter(knowledge)
            if s is not None:
                self._maha_scale[key] = s
            if self._maha_stats is None:
                self._maha_stats = ScatterStats.empty(int(knowledge.maha.class_means.shape[1]))
            self._maha_stats.add(_centred_exemplars(knowledge))
        self._before = None

    def remove(self, key: TaskKey) -> None:
        """Drop a stored task (removed from the bank, or about to be replaced by a newer version)."""
        k = self._tasks.pop(key, None)
        if k is None:
            return
        self._content.pop(key, None)
        self.existing = list(self._tasks.values())
        self.points.pop(key, None)
        self._gmmc_scale.pop(key, None)
        self._maha_scale.pop(key, None)
        self._gmmc_top.pop(key, None)
        if k.gmmc is not None:
            gone = self._ids[key]
            scorers = [(self._ids[o], t) for o, t in self._tasks.items() if t.gmmc is not None]
            for owner, top in self._gmmc_top.items():
                top.forget(gone, lambda rows, x=self.points[owner]: [(i, _gmmc_scores(t, x[rows]))
                                                                      for i, t in scorers])
        if k.maha is not None:
            self._maha_stats = (_without(self._maha_stats, _centred_exemplars(k))
                                if any(t.maha is not None for t in self.existing) else None)
        self._before = None

    # ------------------------------------------------------------------ public
    def __call__(self, knowledge: TaskKnowledge) -> tuple[bool, str]:
        return self.check(knowledge)

    def check(self, knowledge: TaskKnowledge) -> tuple[bool, str]:
        """``(True, "ok: ...")`` or ``(False, why)`` for a received task record.

        It is judged against every stored task but an older version of itself (same identity)."""
        try:
            knowledge.validate()
        except KnowledgeError as exc:
            return False, f"malformed: {exc}"
        for test in (self._structure, self._scale):
            problem = test(knowledge)
            if problem:
                return False, problem
        reports = self.capture(knowledge)
        for rep in reports:
            task, frac = rep.worst
            if frac > self.max_capture:
                return False, (f"{rep.kind} anchor would take {frac:.0%} of known task {task!r}'s reference "
                               f"inputs (limit {self.max_capture:.0%})")
        summary = ", ".join(f"{r.kind} max {r.worst[1]:.0%} of {r.worst[0]!r}" for r in reports if r.moved)
        return True, f"ok: {summary}" if summary else "ok: no reference points to test capture against"

    def capture(self, knowledge: TaskKnowledge) -> list[CaptureReport]:
        """Fraction of each known task's reference points that change task once ``knowledge`` joins."""
        me = _identity(knowledge)  # the same (task, agent) is an update and replaces it; another agent's
        others = [k for k in self.existing if _identity(k) != me]  # same-name task is judged like any other
        shown = display_names([_identity(k) for k in others])
        self._shown = dict(zip([_identity(k) for k in others], shown))  # "task", or "task@agent" where names repeat
        reports = []
        if knowledge.gmmc is not None:
            reports.append(self._gmmc_capture(knowledge, [k for k in others if k.gmmc is not None]))
        if knowledge.maha is not None:
            reports.append(self._maha_capture(knowledge, [k for k in others if k.maha is not None]))
        return reports

    # ------------------------------------------------------------------ 1. structure
    def _structure(self, k: TaskKnowledge) -> str:
        if any(key != _identity(k) for key in self._tasks) and k.meta.feature_transform != self.feature_transform:
            return (f"feature transform {k.meta.feature_transform!r} differs from the bank's "
                    f"{self.feature_transform!r}")
        if self.feature_dim is not None and k.feature_dim != self.feature_dim:
            return f"feature size {k.feature_dim} differs from the device's {self.feature_dim}"
        if self.anchor_dim is not None and k.anchor_dim is not None and k.anchor_dim != self.anchor_dim:
            return f"anchor width {k.anchor_dim} differs from the device's {self.anchor_dim}"
        if k.gmmc is not None:
            w = k.gmmc.weights.astype(np.float64)
            if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-3:
                return f"GMMC weights must be a distribution (>= 0, sum 1); they sum to {w.sum():.6g}"
        for kind, thr in k.thresholds.items():
            if not np.isfinite(thr):
                return f"open-set threshold for {kind!r} is not finite ({thr})"
        return ""

    # ------------------------------------------------------------------ 2. scale
    def _seen_gmmc_log_scale(self, me: TaskKey | None = None) -> tuple[float, float] | None:
        """Range of log mean variance: per stored GMMC component, and of each reference task's raw data."""
        vals = [v for key, v in self._gmmc_scale.items() if key != me]
        vals += [_log_mean_variance(x.var(axis=0, dtype=np.float64)[None]) for x in self._ref.values() if x.shape[0] > 1]
        if not vals:
            return None
        v = np.concatenate(vals)
        return float(v.min()), float(v.max())

    def _seen_maha_log_scale(self, me: TaskKey | None = None) -> tuple[float, float] | None:
        """Range of per-task log mean exemplar scatter (variance around class means)."""
        vals = [v for key, v in self._maha_scale.items() if key != me]
        return (min(vals), max(vals)) if vals else None

    def _scale(self, k: TaskKnowledge) -> str:
        gmmc_range, maha_range = self._seen_gmmc_log_scale(_identity(k)), self._seen_maha_log_scale(_identity(k))
        if k.gmmc is not None and gmmc_range is not None:
            lo, hi = gmmc_range
            comp = _log_mean_variance(k.gmmc.variances)
            bad = comp[(comp < lo - self.log_slack) | (comp > hi + self.log_slack)]
            if bad.size:
                return (f"GMMC variances out of range: a component's typical variance is {np.exp(bad[0]):.3g}, "
                        f"the device has seen {np.exp(lo):.3g} .. {np.exp(hi):.3g} "
                        f"(slack x{np.exp(self.log_slack):.0f})")
        if k.maha is not None and maha_range is not None:
            lo, hi = maha_range
            s = _exemplar_log_scatter(k)
            if s is not None and not (lo - self.log_slack <= s <= hi + self.log_slack):
                return (f"Mahalanobis exemplar scatter {np.exp(s):.3g} is outside the range seen "
                        f"{np.exp(lo):.3g} .. {np.exp(hi):.3g} (slack x{np.exp(self.log_slack):.0f})")
        return ""

    # ------------------------------------------------------------------ 3. capture
    def _labelled_points(self, exclude: TaskKey) -> list[tuple[TaskKey, np.ndarray]]:
        return [(t, x) for t, x in self.points.items() if t != exclude and x.shape[0]]

    def _gmmc_capture(self, k: TaskKnowledge, others: list[TaskKnowledge]) -> CaptureReport:
        """GMMC scores are per task, so the newcomer only has to reach each point's current winner.

        Each point's best stored task (and the runner-up, for when the best is an older version of
        the newcomer) is kept from ``add``; a check scores the points against the newcomer's
        mixture alone, so it costs one pass over the points: linear in the stored tasks.  Every
        task is scored by the same function of its own anchor, so an exact copy of a known anchor
        gets exactly the known task's scores; such a tie counts as a capture (``_captured``).
        """
        rep = CaptureReport("gmmc")
        if not others:
            return rep
        me = self._ids.get(_identity(k), -1)
        for task, key, x in self._known_points(k, others):
            top = self._gmmc_top[key]
            best, best_id = top.best_without(me)
            new = _gmmc_scores(k, x)
            ties = new >= best - TIE_RTOL * np.maximum(np.abs(best), 1.0)
            rep.moved[task] = float(np.mean((best_id == self._ids[key]) & ties)) if len(x) else 0.0
        return rep

    def _maha_capture(self, k: TaskKnowledge, others: list[TaskKnowledge]) -> CaptureReport:
        """The newcomer's exemplars change the tied covariance, so the stored tasks are re-scored.

        Re-scoring every point against every class would cost points x classes, both growing with the
        stored tasks: quadratic.  A point can only be lost to the newcomer or to a task that already
        scored close to it, so each point owner keeps its *rivals*: the tasks among its points' best
        ``MAHA_RIVALS_PER_POINT`` others when the owner was first scored against the whole bank, plus
        every later newcomer that reached that rank for one of its points (at most ``MAHA_MAX_RIVALS``,
        the most frequent).  A check scores each point against its own task, its owner's rivals and the
        newcomer only (``MahalanobisMapper.task_scores_of``): linear in the stored tasks.

        The old mapper's choices are kept from the last check while the bank changes only by taking
        in the task last checked (the same tasks, the same scatter sums); after any other change (a
        task removed, a task stored without a check) every owner is scored against the whole bank
        once again.  The scatter statistics are running sums."""
        rep = CaptureReport("maha")
        if not others:
            return rep
        me = _identity(k)
        base = self._maha_stats
        if me in self._tasks and self._tasks[me].maha is not None:
            base = _without(base, _centred_exemplars(self._tasks[me]))
        stats = ScatterStats(base.n, base.sxx.copy(), base.sum_norm4)
        stats.add(_centred_exemplars(k))
        known = self._known_points(k, others)
        index = {_identity(o): i for i, o in enumerate(others)}
        key = tuple((_identity(o), self._content[_identity(o)]) for o in others)
        if self._before is None or self._before[0] != key:
            kept = self._after is not None and self._after[0] == key
            choices = dict(self._after[1]) if kept else {}
            rivals = dict(self._after[2]) if kept else {}
            missing = [(t, x) for _, t, x in known if t not in choices]
            if missing:  # owners new to this bank: scored once against every stored task
                old = MahalanobisMapper.from_knowledge(others, covariance=base.shrunk()[0])
                keys = [_identity(o) for o in others]
                for t, x in missing:
                    scores = old.task_scores(x)
                    choices[t] = scores.argmax(axis=1)  # indices into ``others``
                    rivals[t] = _top_rivals(scores, index[t], keys)
            self._before = (key, choices, rivals)
        before, rivals = self._before[1], self._before[2]
        new = MahalanobisMapper.from_knowledge(others + [k], covariance=stats.shrunk()[0])
        newcomer = len(others)
        after, rivals_after = {}, {}
        for task, t, x in known:
            own = index[t]
            cand = [own] + [index[r] for r in rivals.get(t, ()) if r in index and r != t] + [newcomer]
            scores = new.task_scores_of(x, cand)
            local = np.asarray(cand)[scores.argmax(axis=1)]
            after[t] = local
            rep.moved[task] = _captured(scores, 0, np.where(before[t] == own, 0, -1))
            rivals_after[t] = _with_newcomer(rivals.get(t, ()), scores, me)
        # the bank's choices and rivals if k is taken in next (indices into ``others + [k]``)
        self._after = (key + ((me, k.content_hash()),), after, rivals_after)
        return rep

    def _known_points(self, newcomer: TaskKnowledge,
                      others: list[TaskKnowledge]) -> list[tuple[str, TaskKey, np.ndarray]]:
        """``(task as shown, its identity, its reference points)`` for the tasks this mapper holds.

        A task without this kind of anchor (a GMMC-only task, for the Mahalanobis mapper) is never
        chosen by that mapper, so none of its points is "correct" and none can be captured:
        counting them as correct would quarantine every honest newcomer near them.
        """
        index = {_identity(o) for o in others}
        return [(self._shown.get(t, t.task), t, x) for t, x in self._labelled_points(_identity(newcomer))
                if t in index]


#: A point owner's rivals: the tasks among each of its points' best this-many other tasks ...
MAHA_RIVALS_PER_POINT = 3
#: ... keeping the most frequent this-many (an owner's points rarely have more close tasks).
MAHA_MAX_RIVALS = 16


def _top_rivals(scores: np.ndarray, own: int, keys: list[TaskKey]) -> dict[TaskKey, int]:
    """``{task: how many of the owner's points have it among their best others}``, the most frequent
    ``MAHA_MAX_RIVALS``, from scores [n, tasks] against every stored task."""
    s = scores.astype(np.float64).copy()
    s[:, own] = -np.inf
    r = min(MAHA_RIVALS_PER_POINT, s.shape[1] - 1)
    if r < 1:
        return {}
    top = np.argpartition(-s, r - 1, axis=1)[:, :r]
    ids, counts = np.unique(top, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:MAHA_MAX_RIVALS]
    return {keys[int(ids[i])]: int(counts[i]) for i in order}


def _with_newcomer(rivals: dict[TaskKey, int], scores: np.ndarray, me: TaskKey) -> dict[TaskKey, int]:
    """The owner's rivals once the newcomer (the last column of ``scores`` [n, own + rivals + newcomer])
    is stored: it joins them when it is among a point's best ``MAHA_RIVALS_PER_POINT`` others."""
    out = dict(rivals)
    others = scores[:, 1:].astype(np.float64)
    rank = (others > others[:, -1:]).sum(axis=1)  # how many other candidates beat the newcomer
    hits = int(np.sum(rank < MAHA_RIVALS_PER_POINT))
    if hits:
        out[me] = hits
        if len(out) > MAHA_MAX_RIVALS:
            out.pop(min(out, key=out.get))
    return out


class _Top2:
    """Per reference point: the best two stored tasks' scores and ids (``-1``: none yet)."""

    def __init__(self, n: int) -> None:
        self.s1 = np.full(n, -np.inf)
        self.s2 = np.full(n, -np.inf)
        self.i1 = np.full(n, -1, dtype=np.int64)
        self.i2 = np.full(n, -1, dtype=np.int64)

    def offer(self, task_id: int, scores: np.ndarray, rows: np.ndarray | None = None) -> None:
        """Fold in one task's scores (ties keep the earlier task, as ``argmax`` over stored order does)."""
        r = slice(None) if rows is None else rows
        s1, s2, i1, i2 = self.s1[r], self.s2[r], self.i1[r], self.i2[r]
        first = (scores > s1) | ((scores == s1) & (task_id < i1))
        second = ~first & ((scores > s2) | ((scores == s2) & (task_id < i2)))
        s2 = np.where(first, s1, np.where(second, scores, s2))
        i2 = np.where(first, i1, np.where(second, task_id, i2))
        s1 = np.where(first, scores, s1)
        i1 = np.where(first, task_id, i1)
        self.s1[r], self.s2[r], self.i1[r], self.i2[r] = s1, s2, i1, i2

    def forget(self, task_id: int, rescore) -> None:
        """Drop a task: points that had it among their best two are scored again against all tasks
        (``rescore(rows) -> [(task id, scores)]``)."""
        rows = np.flatnonzero((self.i1 == task_id) | (self.i2 == task_id))
        if not len(rows):
            return
        self.s1[rows] = self.s2[rows] = -np.inf
        self.i1[rows] = self.i2[rows] = -1
        for i, sc in rescore(rows):
            self.offer(i, sc, rows)

    def best_without(self, task_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(best score, its task id) per point, leaving out ``task_id``."""
        use2 = self.i1 == task_id
        return np.where(use2, self.s2, self.s1), np.where(use2, self.i2, self.i1)


def _gmmc_scores(k: TaskKnowledge, x: np.ndarray) -> np.ndarray:
    """log p(x | task) under one task's GMMC mixture, in float64, for transformed points [N, D] -> [N].

    A function of the task's anchor and the points alone, whatever else is stored, so that scores
    kept from an earlier bank are exactly those a fresh check would compute."""
    g = k.gmmc
    var = g.variances.astype(np.float64)
    center = g.means.astype(np.float64).mean(axis=0)
    mu = g.means.astype(np.float64) - center
    inv = 1.0 / var
    const = (np.log(np.maximum(g.weights.astype(np.float64), 1e-300))
             - 0.5 * ((mu * mu * inv).sum(axis=1) + np.log(var).sum(axis=1) + var.shape[1] * np.log(2 * np.pi)))
    xc = np.asarray(x, dtype=np.float64) - center
    s = (xc * xc) @ (-0.5 * inv).T + xc @ (mu * inv).T + const
    mx = s.max(axis=1, keepdims=True)
    return np.log(np.exp(s - mx).sum(axis=1)) + mx[:, 0]


def _centred_exemplars(k: TaskKnowledge) -> np.ndarray:
    lab = k.maha.exemplar_labels.astype(np.int64)
    return k.maha.exemplars.astype(np.float64) - k.maha.class_means.astype(np.float64)[lab]


def _without(stats: ScatterStats, centred: np.ndarray) -> ScatterStats:
    """The scatter statistics minus one task's centred exemplars."""
    return ScatterStats(stats.n - centred.shape[0], stats.sxx - centred.T @ centred,
                        stats.sum_norm4 - float(((centred * centred).sum(axis=1) ** 2).sum()))


def _task_rng(seed: int, key: TaskKey) -> np.random.Generator:
    """The random draws of one task's synthetic points, fixed by the seed and the task's identity
    (not by which tasks were stored before it)."""
    digest = hashlib.sha256(f"{key.task}\0{key.agent}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _identity(k: TaskKnowledge) -> TaskKey:
    """A task's fleet-wide identity (``runtime.knowledge.identity``): its name and its origin agent."""
    return TaskKey(k.task, k.meta.agent_id)


#: Scores within this relative distance of each other are a tie (float32 rounding of equal anchors).
TIE_RTOL = 1e-5


def _captured(scores: np.ndarray, own: int, before: np.ndarray) -> float:
    """Fraction of one task's points that the mapper chose correctly before (``before == own``) and
    now loses: to the newcomer (the last column) when it scores at least as high as every old
    task, ties included, since a mapper breaks ties by task order, which the newcomer's name
    chooses; or to another old task (the newcomer's exemplars moved the covariance)."""
    old, newcomer = scores[:, :-1].astype(np.float64), scores[:, -1].astype(np.float64)
    best = old.max(axis=1)
    ties = newcomer >= best - TIE_RTOL * np.maximum(np.abs(best), 1.0)
    lost = ties | (old.argmax(axis=1) != own)
    return float(np.mean((before == own) & lost)) if len(scores) else 0.0


def _sample_gmmc(k: TaskKnowledge, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """``n`` draws from the task's GMMC mixture (transformed space)."""
    g = k.gmmc
    if g is None or n < 1:
        return None
    w = np.maximum(g.weights.astype(np.float64), 0)
    comp = rng.choice(g.k, size=n, p=w / w.sum())
    return g.means[comp] + rng.standard_normal((n, g.means.shape[1])) * np.sqrt(g.variances[comp])


def _sample_maha(k: TaskKnowledge, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """``n`` draws from N(class mean, the task's own-exemplar covariance), classes in turn."""
    if k.maha is None or n < 1 or k.maha.exemplars.shape[0] < 2:
        return None
    return OwnExemplarMetric.from_anchor(k.maha).sample(n, rng)


def _log_mean_variance(variances: np.ndarray) -> np.ndarray:
    """log of the mean over dimensions of each row's variances (the row's overall spread)."""
    return np.log(np.maximum(np.asarray(variances, dtype=np.float64).mean(axis=1), 1e-300))


def _exemplar_log_scatter(k: TaskKnowledge) -> float | None:
    """log of the mean per-dimension variance of a task's exemplars around their class means."""
    m = k.maha
    lab = m.exemplar_labels.astype(np.int64)
    if m.exemplars.shape[0] < 2:
        return None
    c = m.exemplars.astype(np.float64) - m.class_means.astype(np.float64)[lab]
    return float(np.log(max(float((c * c).mean()), 1e-30)))
