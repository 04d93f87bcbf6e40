"""Diagonal-covariance Gaussian mixtures by EM, in numpy: the GMMC anchor's fit on the device.

This is scikit-learn's ``GaussianMixture(covariance_type="diag", init_params="kmeans",
n_init=1)`` written out (k-means++ seeding, Lloyd's k-means, then EM to a 1e-3 change in the
mean log-likelihood), so a device can fit GMMC anchors without importing scikit-learn (1.1 s
of imports and about 60 MB on every verb).  The seeding draws from ``np.random.RandomState(seed)``
in the same order as scikit-learn, so both start from the same centres;
``benchmarks/device_footprint.py`` compares the two fits on skill-bench in one run.

The variance floor ``reg_covar`` is added inside every M-step, exactly as scikit-learn does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

EM_TOL = 1e-3  # scikit-learn's default: change in the mean log-likelihood per sample
KMEANS_TOL = 1e-4  # scikit-learn's default, relative to the mean per-dimension variance
KMEANS_MAX_ITER = 300


@dataclass
class DiagMixture:
    """``k`` diagonal Gaussians: means and variances ``[k, D]``, weights ``[k]`` (sum 1)."""

    means: np.ndarray
    variances: np.ndarray
    weights: np.ndarray
    converged: bool
    iterations: int


def _sq_dist(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances ``[len(a), len(b)]`` (clipped at 0 against rounding)."""
    d = (a * a).sum(1)[:, None] - 2.0 * (a @ b.T) + b_sq[None, :]
    return np.maximum(d, 0.0)


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """k-means++ seeding with ``2 + log k`` greedy local trials per centre (Arthur & Vassilvitskii)."""
    n = x.shape[0]
    x_sq = (x * x).sum(1)
    trials = 2 + int(np.log(k))
    centers = np.empty((k, x.shape[1]))
    centers[0] = x[rng.choice(n, p=np.full(n, 1.0 / n))]  # drawn as scikit-learn draws it (unit weights)
    closest = _sq_dist(centers[:1], x, x_sq)[0]
    potential = closest.sum()
    for c in range(1, k):
        draws = rng.uniform(size=trials) * potential
        ids = np.minimum(np.searchsorted(np.cumsum(closest), draws), n - 1)
        cand = np.minimum(closest, _sq_dist(x[ids], x, x_sq))
        pots = cand.sum(1)
        best = int(np.argmin(pots))
        potential, closest = pots[best], cand[best]
        centers[c] = x[ids[best]]
    return centers


def kmeans_labels(x: np.ndarray, k: int, rng: np.random.RandomState) -> np.ndarray:
    """Lloyd's k-means from k-means++ seeds; an emptied cluster takes the point farthest from its centre."""
    centers = kmeans_plusplus(x, k, rng)
    x_sq = (x * x).sum(1)
    tol = KMEANS_TOL * float(np.mean(np.var(x, axis=0)))
    labels = np.zeros(x.shape[0], np.int64)
    for _ in range(KMEANS_MAX_ITER):
        dist = _sq_dist(x, centers, (centers * centers).sum(1))
        labels = dist.argmin(1)
        onehot = np.zeros((len(x), k))
        onehot[np.arange(len(x)), labels] = 1.0
        new = onehot.T @ x  # per-cluster sums as one product (np.add.at is 10x slower here)
        counts = onehot.sum(0)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            far = np.argsort(-dist[np.arange(len(x)), labels])
            for j, c in enumerate(empty):
                new[c], counts[c] = x[far[j]], 1
        new /= counts[:, None]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    return _sq_dist(x, centers, (centers * centers).sum(1)).argmin(1) if len(x) else labels


def _m_step(x: np.ndarray, x2: np.ndarray, resp: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nk = resp.sum(0) + 10 * np.finfo(resp.dtype).eps
    means = resp.T @ x / nk[:, None]
    variances = resp.T @ x2 / nk[:, None] - means ** 2 + reg
    return nk / x.shape[0], means, np.maximum(variances, reg)


def _weighted_log_prob(x: np.ndarray, x2: np.ndarray, weights: np.ndarray, means: np.ndarray,
                       variances: np.ndarray) -> np.ndarray:
    prec = 1.0 / variances
    maha = (means ** 2 * prec).sum(1)[None, :] - 2.0 * (x @ (means * prec).T) + x2 @ prec.T
    return -0.5 * (x.shape[1] * np.log(2 * np.pi) + maha) - 0.5 * np.log(variances).sum(1) + np.log(weights)


def fit_diag_mixture(x: np.ndarray, k: int, *, reg_covar: float, seed: int = 0, max_iter: int = 100) -> DiagMixture:
    """EM for ``k`` diagonal Gaussians on ``x`` ``[N, D]``, started from k-means labels (``N >= k``)."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"need a [N, D] array with N >= k = {k}, got shape {x.shape}")
    rng = np.random.RandomState(seed)
    resp = np.zeros((x.shape[0], k))
    resp[np.arange(x.shape[0]), kmeans_labels(x, k, rng)] = 1.0
    x2 = x * x
    weights, means, variances = _m_step(x, x2, resp, reg_covar)
    lower, converged, it = -np.inf, False, 0
    for it in range(1, max_iter + 1):
        wlp = _weighted_log_prob(x, x2, weights, means, variances)
        top = wlp.max(1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(wlp - top).sum(1))
        resp = np.exp(wlp - norm[:, None])
        weights, means, variances = _m_step(x, x2, resp, reg_covar)
        prev, lower = lower, float(norm.mean())
        if abs(lower - prev) < EM_TOL:
            converged = True
            break
    return DiagMixture(means, variances, weights, converged, it)
