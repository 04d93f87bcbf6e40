"""Teacher side of the task mapper: turn one task's training features into shareable task anchors.

A *task anchor* is the small summary of a task's training data that lets any other device
recognise inputs of that task without a task oracle (paper, section 4):

* GMMC: ``k`` diagonal Gaussians fitted to the task's features (``fit_gmmc``).
* Mahalanobis: class means plus ``m`` exemplar *features* per class (``fit_mahalanobis``;
  random as in the paper, or synthetic rows along the principal axes, the default); students
  pool all received exemplars into one tied covariance.

Anchors live in a transformed feature space (``transform_features``): pooled post-ReLU CNN
activations are skewed and their norms vary a lot between domains, and a square root plus
L2 normalisation makes them much closer to Gaussian.  The default, ``sqrt_l2_trunk``, appends
the ROM's trunk statistics (per-channel mean and std of the mid-level activation map, each
block square-rooted and L2-normalised on its own): sibling tasks whose final features overlap
differ in them, and on the skill-bench validation split they raised Mahalanobis task-ID from
0.917 to 0.927 and GMMC's from 0.876 to 0.887 (benchmarks/mapper_ideas.py).  Teacher and
student must apply the same transform, so its name travels in
``TaskKnowledge.meta.feature_transform``.

Each anchor also comes with an open-set threshold (``calibrate_thresholds``): a low
percentile of the task's own held-out scores, which students use to say "unknown" for
inputs that fit no stored task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

import numpy as np

from skill_edge.runtime.mapping.gmm import fit_diag_mixture
from skill_edge.runtime.knowledge.records import DEFAULT_TRANSFORM, FEATURE_TRANSFORMS, GmmcAnchor, MahalanobisAnchor, needs_trunk_stats

#: Threshold percentile: 1 means 99 % of the task's own held-out features score above it.
DEFAULT_THRESHOLD_PERCENTILE = 1.0
#: Fewest principal exemplar rows a task sends, however few classes it has.  A 2-class task
#: with m = 5 would send 10 rows (5 axes), so siblings such as the CIFAR-10 pairs barely shape
#: the student's tied covariance; 64 rows raised their validation task-ID 0.749 -> 0.787
#: (benchmarks/results/maha_rows.md).
DEFAULT_MIN_EXEMPLAR_ROWS = 64
#: Fewest held-out rows the open-set thresholds are calibrated on.  A task with 7 images a class
#: holds out one a class, and the 1st percentile of 20-50 rows is their minimum: on the 71 tasks
#: the Mahalanobis test called 2.3 % of the tasks' own test images unknown (14 % at worst) where
#: 1 % was meant.  Pooling disjoint hold-outs (each scored under anchors fitted without it) to 100
#: rows: 1.5 % (7.0 % at worst).  Larger tasks hold out 100+ rows at once and fit a single fold.
MIN_CALIBRATION_ROWS = 100
MAX_CALIBRATION_FOLDS = 5


class AnchorError(ValueError):
    """Features or labels that cannot give a task anchor (empty, wrong shape, non-finite)."""


# ---------------------------------------------------------------------------- transforms
def transform_features(x: np.ndarray, kind: str, trunk_stats: np.ndarray | None = None) -> np.ndarray:
    """Map raw pooled backbone features (and trunk statistics) into the space anchors live in.

    ``raw``: unchanged.  ``sqrt``: signed square root (``sign(x) * sqrt(|x|)``), which
    tames the heavy right tail of ReLU activations.  ``l2``: divide each row by its L2 norm,
    which removes per-domain brightness/contrast scale.  ``sqrt_l2``: both, in that order.
    ``sqrt_l2_trunk``: ``sqrt_l2`` of the features, of the trunk means and of the trunk
    standard deviations, side by side (``[N, D + 2C]``); needs ``trunk_stats`` ``[N, 2C]``.
    Returns a new float32 array; the inputs are never modified.
    """
    if kind not in FEATURE_TRANSFORMS:
        raise AnchorError(f"unknown feature transform {kind!r}; choose one of {FEATURE_TRANSFORMS}")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise AnchorError(f"features must be a 2-D [N, D] array, got shape {x.shape}")
    if needs_trunk_stats(kind):
        if trunk_stats is None:
            raise AnchorError(f"feature transform {kind!r} needs the ROM's trunk statistics beside the features "
                              "(Extraction.trunk_stats); features alone only fit 'sqrt_l2'")
        t = np.asarray(trunk_stats, dtype=np.float32)
        if t.ndim != 2 or t.shape[0] != x.shape[0] or t.shape[1] == 0 or t.shape[1] % 2:
            raise AnchorError(f"trunk statistics must be [{x.shape[0]}, 2C] beside features {list(x.shape)}, "
                              f"got shape {list(t.shape)}")
        c = t.shape[1] // 2
        return np.concatenate([transform_features(x, "sqrt_l2"), transform_features(t[:, :c], "sqrt_l2"),
                               transform_features(t[:, c:], "sqrt_l2")], axis=1)
    if kind in ("sqrt", "sqrt_l2"):
        x = np.sign(x) * np.sqrt(np.abs(x))
    else:
        x = x.copy()
    if kind in ("l2", "sqrt_l2"):
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x /= np.maximum(norms, 1e-12)
    return x


def _check_features(features: np.ndarray, what: str = "features") -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise AnchorError(f"{what} must be a non-empty [N, D] array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise AnchorError(f"{what} hold NaN or inf values; check the feature extractor")
    return x


# ---------------------------------------------------------------------------- GMMC
def fit_gmmc(
    features: np.ndarray,
    k: int = 25,
    seed: int = 0,
    *,
    var_floor: float = 0.1,
    labels: np.ndarray | None = None,
    max_iter: int = 100,
) -> GmmcAnchor:
    """Fit ``k`` diagonal Gaussians to one task's (already transformed) features.

    ``var_floor`` is relative: every variance gets ``var_floor * mean_d(Var[x_d])`` added
    (scikit-learn's ``reg_covar``, applied inside EM; ``gmm.py`` is that EM in numpy).  It keeps
    clusters of near-duplicate images from collapsing to needle-sharp Gaussians that overfit the teacher's samples,
    and it is scaled by the task's own spread so it means the same in every feature space.

    With ``labels`` the components are split over classes in proportion to class size
    (at least one per class, so a task with more than ``k`` classes gets one per class),
    which keeps small classes from being absorbed by large ones.

    With fewer than ``2 * k`` samples ``k`` shrinks to ``N // 2`` (at least 1); a single
    sample gives one component at that sample with the floor variance.
    """
    x = _check_features(features)
    if k < 1:
        raise AnchorError(f"k must be >= 1, got {k}")
    if var_floor <= 0:
        raise AnchorError(f"var_floor must be > 0, got {var_floor}")
    floor = _absolute_floor(x, var_floor)
    if labels is None:
        means, variances, weights = _fit_diag_mixture(x, k, seed, floor, max_iter)
    else:
        y = _check_labels(labels, x.shape[0])
        classes, counts = np.unique(y, return_counts=True)
        per_class = _apportion(k, counts)
        parts = [
            _fit_diag_mixture(x[y == c], int(kc), seed + int(i), floor, max_iter)
            for i, (c, kc) in enumerate(zip(classes, per_class))
        ]
        means = np.concatenate([p[0] for p in parts])
        variances = np.concatenate([p[1] for p in parts])
        weights = np.concatenate([p[2] * (n / counts.sum()) for p, n in zip(parts, counts)])
    weights = weights / weights.sum()
    return GmmcAnchor(
        means=means.astype(np.float32),
        variances=variances.astype(np.float32),
        weights=weights.astype(np.float32),
    )


def _apportion(k: int, counts: np.ndarray) -> np.ndarray:
    """Split ``k`` components over classes by size, at least one each, summing to ``k``.

    Largest-remainder apportionment (Hamilton's method); only a task with more classes than
    ``k`` gets more than ``k`` components in total (one per class).
    """
    if len(counts) >= k:
        return np.ones(len(counts), dtype=int)
    spare = k - len(counts)  # one per class is given; share the rest by class size
    quota = spare * counts / counts.sum()
    out = 1 + np.floor(quota).astype(int)
    rest = k - int(out.sum())
    out[np.argsort(-(quota - np.floor(quota)), kind="stable")[:rest]] += 1
    return out


def _absolute_floor(x: np.ndarray, var_floor: float) -> float:
    """``var_floor`` times the task's mean per-dimension variance (tiny fallback for constant data)."""
    spread = float(np.mean(np.var(x.astype(np.float64), axis=0))) if x.shape[0] > 1 else 0.0
    if spread <= 0:
        spread = float(np.mean(x.astype(np.float64) ** 2)) or 1.0
    return var_floor * spread


def _fit_diag_mixture(
    x: np.ndarray, k: int, seed: int, floor: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = x.shape[0]
    k_eff = max(1, min(k, n // 2))
    if k_eff == 1 or n < 2:
        mean = x.mean(axis=0, keepdims=True)
        var = (x.var(axis=0, keepdims=True) if n > 1 else np.zeros_like(mean)) + floor
        return mean, var, np.ones(1)
    mix = fit_diag_mixture(x, k_eff, reg_covar=floor, seed=seed, max_iter=max_iter)
    return mix.means, mix.variances, mix.weights


# ---------------------------------------------------------------------------- Mahalanobis
def fit_mahalanobis(
    features: np.ndarray,
    labels: np.ndarray,
    m: int = 5,
    seed: int = 0,
    *,
    num_classes: int | None = None,
    exemplars: Literal["random", "principal"] = "random",
    min_rows: int = 0,
) -> MahalanobisAnchor:
    """Class means from all training features plus ``m`` exemplar features per class.

    ``random`` (the paper): exemplars are drawn uniformly without replacement (seeded); a
    class with fewer than ``m`` samples contributes all of them.  ``principal``: the same
    number of rows, but synthetic: pairs ``mean_c +/- a_i v_i`` along the top principal axes
    ``v_i`` of the task's within-class scatter (all training features), scaled so that the
    rows' scatter around their class means is the rank-r part of that scatter.  A student's
    tied covariance then gets the task's main directions of variation exactly instead of a
    5-sample estimate of them; students need no change.  ``min_rows`` (principal only) raises
    the row count of few-class tasks, capped at a quarter of the task's sample count (the student
    weighs each row as one sample) and at twice the rank the data can have.

    Labels must be ``0 .. C-1``; every class needs at least one sample (``num_classes`` lets
    the caller insist on C).
    """
    x = _check_features(features)
    y = _check_labels(labels, x.shape[0])
    if m < 1:
        raise AnchorError(f"m must be >= 1, got {m}")
    if min_rows < 0:
        raise AnchorError(f"min_rows must be >= 0, got {min_rows}")
    c = int(num_classes) if num_classes is not None else int(y.max()) + 1
    if y.max() >= c:
        raise AnchorError(f"label {int(y.max())} out of range for {c} classes")
    rng = np.random.default_rng(seed)
    means = _class_means(x, y, c)
    if exemplars == "principal":
        n_rows = int(sum(min(m, int(np.sum(y == cls))) for cls in range(c)))
        # The floor asks for one row per 4 samples at most: the student weighs each row as one
        # sample in its pooled covariance, and the trailing axes of a small sample are noise.
        n_rows = max(n_rows, min(min_rows, x.shape[0] // 4, 2 * min(x.shape[0] - c, x.shape[1])))
        ex, lab = _principal_exemplars(x, y, means, n_rows)
        return MahalanobisAnchor(means.astype(np.float32), ex.astype(np.float32), lab.astype(np.float32))
    if exemplars != "random":
        raise AnchorError(f"exemplars must be 'random' or 'principal', got {exemplars!r}")
    picked_x, picked_y = [], []
    for cls in range(c):
        idx = np.flatnonzero(y == cls)
        chosen = rng.choice(idx, size=min(m, idx.size), replace=False)
        picked_x.append(x[np.sort(chosen)])
        picked_y.append(np.full(chosen.size, cls))
    return MahalanobisAnchor(
        class_means=means.astype(np.float32),
        exemplars=np.concatenate(picked_x).astype(np.float32),
        exemplar_labels=np.concatenate(picked_y).astype(np.float32),
    )


def _principal_exemplars(x: np.ndarray, y: np.ndarray, means: np.ndarray, n_rows: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``n_rows`` rows whose scatter around their class means is the top of the within-class scatter.

    With ``r = n_rows // 2`` axes of variances ``lam_i``, rows ``+/- sqrt(n_rows lam_i / 2) v_i``
    have ``sum e e^T / n_rows = sum_i lam_i v_i v_i^T``: the same per-row scatter a student
    would expect from ``n_rows`` random exemplars, minus its noisy tail.
    """
    centred = x.astype(np.float64) - means[y]
    _, sing, vt = np.linalg.svd(centred, full_matrices=False)
    r = min(n_rows // 2, vt.shape[0])
    scale = np.sqrt(n_rows * (sing[:r] ** 2 / x.shape[0]) / 2.0)
    rows = np.concatenate([scale[:, None] * vt[:r], -scale[:, None] * vt[:r]])
    pad = n_rows - rows.shape[0]  # odd budget (or rank-deficient data): class means, zero scatter
    rows = np.concatenate([rows, np.zeros((pad, x.shape[1]))])
    labels = np.arange(n_rows) % means.shape[0]  # classes take turns: m rows each
    return rows + means[labels], labels


def _class_means(x: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    means = np.zeros((c, x.shape[1]), dtype=np.float64)
    for cls in range(c):
        idx = np.flatnonzero(y == cls)
        if idx.size == 0:
            raise AnchorError(f"class {cls} has no training features; every class needs at least one")
        means[cls] = x[idx].astype(np.float64).mean(axis=0)
    return means


def _check_labels(labels: np.ndarray, n: int) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != (n,):
        raise AnchorError(f"labels must have shape ({n},), got {y.shape}")
    if y.size and (np.any(y < 0) or np.any(y != np.round(y))):
        raise AnchorError("labels must be non-negative integers (class indices)")
    return y.astype(np.int64)


# ---------------------------------------------------------------------------- everything for one task
@dataclass(frozen=True)
class CalibrationFold:
    """Held-out features of one task and its Mahalanobis anchor fitted without them."""

    held_out: np.ndarray  # [n, A] float32, transformed features
    maha: MahalanobisAnchor  # fitted on the task's other features: class means and exemplars


@dataclass(frozen=True)
class ThresholdCalibration:
    """What the teacher calibrated its Mahalanobis threshold on: disjoint hold-outs, each scored under
    the anchor fitted without it, pooled, and a low ``percentile`` of them taken.

    Teacher-private: never stored, never sent.  A budget packet may merge class means, thin
    exemplars or code them in 3-4 bits, and the threshold then has to be set again for the
    anchor a receiver restores; with this record the encoder reduces every fold's anchor as it
    reduces the sent one and takes the same percentile (``codec.recalibrate_maha_threshold``),
    instead of carrying the threshold over seeded draws.
    """

    folds: tuple[CalibrationFold, ...]
    percentile: float = DEFAULT_THRESHOLD_PERCENTILE

    def maha_threshold(self, reduce: Callable[[MahalanobisAnchor], MahalanobisAnchor] | None = None) -> float:
        """The percentile of every fold's held-out scores under its anchor (``reduce``d, e.g. as a plan sends it)."""
        from skill_edge.runtime.mapping.mapper import mahalanobis_task_score  # scoring lives with the student

        scores = [mahalanobis_task_score(reduce(f.maha) if reduce else f.maha, f.held_out) for f in self.folds]
        return float(np.percentile(np.concatenate(scores), self.percentile))


@dataclass
class TaskAnchors:
    """What a teacher adds to its ``TaskKnowledge``: anchors, thresholds and the transform used,
    and (not part of the knowledge) what the thresholds were calibrated on."""

    feature_transform: str
    gmmc: GmmcAnchor | None = None
    maha: MahalanobisAnchor | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    calibration: ThresholdCalibration | None = None


def calibrate_thresholds(
    anchors: TaskAnchors, held_out: np.ndarray, percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
) -> dict[str, float]:
    """Open-set thresholds: the ``percentile``-th percentile of the task's own held-out scores.

    ``held_out`` are transformed features the anchors were *not* fitted on (training scores
    are optimistic).  Both scores depend on the task's own anchor alone, so a student computes
    exactly the same numbers: the GMMC mixture log-likelihood, and for Mahalanobis the distance
    under the Ledoit-Wolf covariance of the task's own exemplars (``OwnExemplarMetric``; the
    student's tied covariance, which depends on every task it holds, is used only to choose).
    """
    from skill_edge.runtime.mapping.mapper import gmmc_task_loglik, mahalanobis_task_score  # scoring lives with the student

    x = _check_features(held_out, "held-out features")
    out: dict[str, float] = {}
    if anchors.gmmc is not None:
        out["gmmc"] = float(np.percentile(gmmc_task_loglik(anchors.gmmc, x), percentile))
    if anchors.maha is not None:
        out["maha"] = float(np.percentile(mahalanobis_task_score(anchors.maha, x), percentile))
    return out


def fit_task_anchors(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    trunk_stats: np.ndarray | None = None,
    transform: str = DEFAULT_TRANSFORM,
    kinds: tuple[str, ...] = ("gmmc", "maha"),
    k: int = 25,
    m: int = 5,
    seed: int = 0,
    var_floor: float = 0.1,
    gmmc_per_class: bool = True,
    exemplars: Literal["random", "principal"] = "principal",
    min_exemplar_rows: int = DEFAULT_MIN_EXEMPLAR_ROWS,
    calibration_fraction: float = 0.2,
    percentile: float = DEFAULT_THRESHOLD_PERCENTILE,
    min_calibration_rows: int = MIN_CALIBRATION_ROWS,
) -> TaskAnchors:
    """Transform raw features, fit the requested anchors and calibrate their thresholds.

    Defaults are the recipe measured best on the real benchmark's validation split
    (benchmarks/results/mapper_tuning.md, mapper_ideas.md): sqrt + L2 features beside the trunk
    statistics (``trunk_stats``, which the default transform needs), GMMC components split over
    classes with a 0.1 relative variance floor, principal-axis Mahalanobis exemplars, at least
    ``min_exemplar_rows`` of them per task (benchmarks/results/maha_rows.md).

    Thresholds are calibrated on a seeded ``calibration_fraction`` hold-out, each with anchors
    fitted on the rest only.  The GMMC anchor returned is refitted on all features; the
    Mahalanobis anchor returned keeps the fitting part's exemplars (no held-out input is its own
    exemplar) and takes its class means from all features.  Where the hold-out is small, both
    thresholds pool further disjoint hold-outs, up to ``min_calibration_rows`` rows (0: the first only).
    ``calibration`` keeps the hold-outs and their anchors, so that a budget packet's encoder can
    set the Mahalanobis threshold again for the anchor it sends.
    """
    unknown = set(kinds) - {"gmmc", "maha"}
    if unknown or not kinds:
        raise AnchorError(f"kinds must be a non-empty subset of ('gmmc', 'maha'), got {kinds}")
    x = transform_features(_check_features(features), transform, trunk_stats)
    y = _check_labels(labels, x.shape[0])

    n_classes = int(y.max()) + 1
    # a small first hold-out is pooled with further disjoint ones, each scored under anchors fitted without it
    folds = _calibration_folds(y, calibration_fraction, seed, min_rows=min_calibration_rows)
    held_out = folds[0][1].size > 0
    if not held_out:  # too little data to hold any out: fall back to (optimistic) training scores
        folds = [(np.arange(y.size), np.arange(y.size))]
    out = TaskAnchors(feature_transform=transform)
    if "gmmc" in kinds:
        from skill_edge.runtime.mapping.mapper import gmmc_task_loglik  # scoring lives with the student

        def gmmc(idx: np.ndarray) -> GmmcAnchor:
            return fit_gmmc(x[idx], k, seed, var_floor=var_floor, labels=y[idx] if gmmc_per_class else None)

        held_scores = [gmmc_task_loglik(gmmc(fit), x[held]) for fit, held in folds]
        out.thresholds["gmmc"] = float(np.percentile(np.concatenate(held_scores), percentile))
        out.gmmc = gmmc(np.arange(y.size))  # refitted on everything; the mixture barely moves
    if "maha" in kinds:
        # Calibrated on anchors fitted without the held-out part, class means included: a
        # held-out input inside its own class mean sits (1 - 1/n) / (1 + 1/n) closer to it than a
        # new input does, which at 7 images a class put the threshold above 40-97 % of the task's
        # own test images (benchmarks/results/mapper_peers71.json before this fix).  The deployed
        # anchor keeps the first fold's exemplars and takes its class means from every input.
        def part(idx: np.ndarray) -> MahalanobisAnchor:
            return fit_mahalanobis(x[idx], y[idx], m, seed, num_classes=n_classes, exemplars=exemplars,
                                   min_rows=min_exemplar_rows)

        calibration = ThresholdCalibration(tuple(
            CalibrationFold(np.ascontiguousarray(x[held], dtype=np.float32), part(fit)) for fit, held in folds),
            percentile)
        out.thresholds["maha"] = calibration.maha_threshold()
        out.calibration = calibration if held_out else None  # training scores recalibrate nothing
        first = calibration.folds[0].maha
        out.maha = MahalanobisAnchor(_class_means(x, y, n_classes).astype(np.float32), first.exemplars,
                                     first.exemplar_labels)
    return out


def _calibration_folds(y: np.ndarray, fraction: float, seed: int, *, min_rows: int,
                       max_folds: int = MAX_CALIBRATION_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """Disjoint stratified hold-outs of ``fraction`` of each class, as ``(fit, held)`` index pairs: the
    first is the task's seeded split, and more follow (up to ``max_folds``) until ``min_rows`` are held
    out in all.  Every class keeps at least one fitting sample in every fold."""
    rng = np.random.default_rng(seed + 7919)
    order = {int(c): rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)}
    n_cal = {c: min(int(round(fraction * idx.size)), idx.size - 1) for c, idx in order.items()}
    first = sum(n_cal.values())
    n_folds = 1 if first == 0 or first >= min_rows else min(max_folds, -(-min_rows // first))
    out = []
    for f in range(n_folds):
        held = [idx[f * n_cal[c]:(f + 1) * n_cal[c]] for c, idx in order.items()]
        held = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
        if f and held.size == 0:
            break
        out.append((np.setdiff1d(np.arange(y.size), held), held))
    return out
