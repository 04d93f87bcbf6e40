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

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from .anchors import DEFAULT_TRANSFORM, transform_features
from .identity import TaskKey, display_names
from .knowledge import KnowledgeError, TaskKnowledge
from .mapper import GmmcMapper, MahalanobisMapper, OwnExemplarMetric, ScatterStats, exemplar_scatter

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
        keys = [_identity(k) for k in self.existing]
        self._shown = dict(zip(keys, display_names(keys)))  # "task", or "task@agent" where names repeat
        same_name: dict[str, list[TaskKey]] = {}
        for key in keys:
            same_name.setdefault(key.task, []).append(key)
        self.points: dict[TaskKey, np.ndarray] = {}
        for task, (feats, stats) in pairs.items():
            x = transform_features(np.asarray(feats, dtype=np.float32), self.feature_transform, stats)
            if x.shape[0] > max_points_per_task:
                x = x[np.sort(rng.choice(x.shape[0], max_points_per_task, replace=False))]
            # a name stands for every stored task of that name (the device's own and a peer's alike)
            for key in [task] if isinstance(task, TaskKey) else same_name.get(task, [TaskKey(task, "")]):
                self.points[key] = x
        self.reference = dict(self.points)  # raw reference only, before anchors' points are added
        widths = {x.shape[1] for x in self.points.values()} | {k.anchor_dim for k in self.existing
                                                               if k.anchor_dim is not None}
        if len(widths) > 1:
            raise ValueError(f"reference features and bank disagree on the anchor width: {sorted(widths)}")
        self.anchor_dim = widths.pop() if widths else None
        for k in self.existing:
            if _identity(k) in self.points:  # real features beat synthetic ones (draws from an anchor favour it)
                continue
            # no features of this task here: its anchors are generative models, draw from them
            extra = [x for x in (_sample_gmmc(k, synthetic_per_task, rng), _sample_maha(k, synthetic_per_task, rng))
                     if x is not None]
            if extra:
                self.points[_identity(k)] = np.concatenate(extra).astype(np.float32)
        self._gmmc_range = self._seen_gmmc_log_scale()
        self._maha_range = self._seen_maha_log_scale()

    # ------------------------------------------------------------------ public
    def __call__(self, knowledge: TaskKnowledge) -> tuple[bool, str]:
        return self.check(knowledge)

    def check(self, knowledge: TaskKnowledge) -> tuple[bool, str]:
        """``(True, "ok: ...")`` or ``(False, why)`` for a received task record."""
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
        reports = []
        if knowledge.gmmc is not None:
            reports.append(self._gmmc_capture(knowledge, [k for k in others if k.gmmc is not None]))
        if knowledge.maha is not None:
            reports.append(self._maha_capture(knowledge, [k for k in others if k.maha is not None]))
        return reports

    # ------------------------------------------------------------------ 1. structure
    def _structure(self, k: TaskKnowledge) -> str:
        if self.existing and k.meta.feature_transform != self.feature_transform:
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
    def _seen_gmmc_log_scale(self) -> tuple[float, float] | None:
        """Range of log mean variance: per stored GMMC component, and of each reference task's raw data."""
        vals = [_log_mean_variance(k.gmmc.variances) for k in self.existing if k.gmmc is not None]
        vals += [_log_mean_variance(x.var(axis=0, dtype=np.float64)[None])
                 for x in self.reference.values() if x.shape[0] > 1]
        if not vals:
            return None
        v = np.concatenate(vals)
        return float(v.min()), float(v.max())

    def _seen_maha_log_scale(self) -> tuple[float, float] | None:
        """Range of per-task log mean exemplar scatter (variance around class means)."""
        vals = [_exemplar_log_scatter(k) for k in self.existing if k.maha is not None]
        vals = [v for v in vals if v is not None]
        return (min(vals), max(vals)) if vals else None

    def _scale(self, k: TaskKnowledge) -> str:
        if k.gmmc is not None and self._gmmc_range is not None:
            lo, hi = self._gmmc_range
            comp = _log_mean_variance(k.gmmc.variances)
            bad = comp[(comp < lo - self.log_slack) | (comp > hi + self.log_slack)]
            if bad.size:
                return (f"GMMC variances out of range: a component's typical variance is {np.exp(bad[0]):.3g}, "
                        f"the device has seen {np.exp(lo):.3g} .. {np.exp(hi):.3g} "
                        f"(slack x{np.exp(self.log_slack):.0f})")
        if k.maha is not None and self._maha_range is not None:
            lo, hi = self._maha_range
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

        Old tasks and newcomer are scored by one mapper, so an exact copy of a known anchor gets
        exactly the known task's scores; such a tie counts as a capture (``_captured``).
        """
        rep = CaptureReport("gmmc")
        if not others:
            return rep
        mapper = GmmcMapper.from_knowledge(others + [k])
        for task, own, x in self._known_points(k, others):
            scores = mapper.task_scores(x)
            rep.moved[task] = _captured(scores, own, scores[:, :-1].argmax(axis=1))
        return rep

    def _maha_capture(self, k: TaskKnowledge, others: list[TaskKnowledge]) -> CaptureReport:
        """The newcomer's exemplars change the tied covariance, so every task is re-scored."""
        rep = CaptureReport("maha")
        if not others:
            return rep
        base = self._scatter(others)
        stats = ScatterStats(base.n, base.sxx.copy(), base.sum_norm4)
        lab = k.maha.exemplar_labels.astype(np.int64)
        stats.add(k.maha.exemplars.astype(np.float64) - k.maha.class_means.astype(np.float64)[lab])
        old = MahalanobisMapper.from_knowledge(others, covariance=base.shrunk()[0])
        new = MahalanobisMapper.from_knowledge(others + [k], covariance=stats.shrunk()[0])
        for task, own, x in self._known_points(k, others):
            rep.moved[task] = _captured(new.task_scores(x), own, old.task_scores(x).argmax(axis=1))
        return rep

    def _known_points(self, newcomer: TaskKnowledge,
                      others: list[TaskKnowledge]) -> list[tuple[str, int, np.ndarray]]:
        """``(task as shown, its index in others, its reference points)`` for the tasks this mapper holds.

        A task without this kind of anchor (a GMMC-only task, for the Mahalanobis mapper) is never
        chosen by that mapper, so none of its points is "correct" and none can be captured:
        counting them as correct would quarantine every honest newcomer near them.
        """
        index = {_identity(o): i for i, o in enumerate(others)}
        return [(self._shown.get(t, t.task), index[t], x) for t, x in self._labelled_points(_identity(newcomer))
                if t in index]

    def _scatter(self, others: list[TaskKnowledge]) -> ScatterStats:
        key = tuple(_identity(o) for o in others)
        cached = getattr(self, "_scatter_cache", None)
        if cached is None or cached[0] != key:
            self._scatter_cache = (key, exemplar_scatter([o.maha for o in others]))
        return self._scatter_cache[1]  # callers copy before adding to it


def _identity(k: TaskKnowledge) -> TaskKey:
    """A task's fleet-wide identity (``runtime.identity``): its name and its origin agent."""
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
    metric = OwnExemplarMetric.from_anchor(k.maha)
    cls = np.arange(n) % metric.class_means.shape[0]
    low_rank = rng.standard_normal((n, metric.u.shape[1])) @ metric.u.T
    return metric.class_means[cls] + low_rank + np.sqrt(metric.a) * rng.standard_normal((n, metric.u.shape[0]))


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
