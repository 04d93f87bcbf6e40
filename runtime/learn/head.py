"""Teacher-side training of the linear head on ROM features.

Heads are multinomial logistic regression fitted full-batch with L-BFGS (cheap and
deterministic on a CPU), with the weight decay chosen on a validation split carved out of the
training set — never the test set.  Features are standardised for the fit and the
standardisation is folded back into ``W, b``, so the shipped head is a plain linear layer on raw
ROM features.

This module is on the device path, so it imports numpy only (torch was used here
until the device was split from the factory; ``benchmarks/device_footprint.py`` keeps that solver
as the control and shows both give the same oracle accuracy on skill-bench).  Beneficial biases,
which need the ROM tail in torch, live in ``bb_train.py`` behind the ``[bb]`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4)  # strongest first: each fit warm-starts the next


@dataclass
class HeadFit:
    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    val_accuracy: float
    weight_decay: float
    history: dict[str, float] = field(default_factory=dict)
    train_macs: int = 0  # multiply-accumulates spent fitting (the fleet lab's teacher cost, paper Fig. 9)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held) with ``fraction`` of every class held out, at least one kept per class."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n = min(int(round(len(idx) * fraction)), len(idx) - 1)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def backtracking_step(value: Callable[[np.ndarray], float], x: np.ndarray, f: float, slope: float,
                      direction: np.ndarray, *, c1: float = 1e-4, shrink: float = 0.5, tries: int = 30
                      ) -> float | None:
    """The first step in 1, 1/2, 1/4, ... with sufficient decrease (Armijo), or None.

    L-BFGS directions are scaled so that the unit step is accepted almost always (on the
    skill-bench heads, all but a handful of the first iterations), so one evaluation per iteration
    is the norm; pairs that would break the curvature condition are skipped by the caller."""
    step = 1.0
    for _ in range(tries):
        if value(x + step * direction) <= f + c1 * step * slope:
            return step
        step *= shrink
    return None


def lbfgs(fun: Callable[[np.ndarray], tuple[float, np.ndarray]], x0: np.ndarray, *, max_iter: int = 100,
          history: int = 20, tolerance_grad: float = 1e-6, tolerance_change: float = 1e-9) -> tuple[np.ndarray, int]:
    """Minimise ``fun`` (returning value and gradient) from ``x0``; returns ``(x, evaluations)``.

    L-BFGS as torch's ``optim.LBFGS`` runs it for the head: the two-loop recursion over ``history``
    pairs, torch's first step and its stopping rules, here with a backtracking line search, in numpy
    alone (a device install carries no scipy: 143 MB, more than a third of it).  The head's objective
    is smooth and strictly convex, and both reach the same loss to about 1e-7
    (``benchmarks/device_learning.py`` compares the two on skill-bench).
    """
    cache: dict[bytes, tuple[float, np.ndarray]] = {}
    evals = [0]

    def value_and_grad(x: np.ndarray) -> tuple[float, np.ndarray]:
        key = x.tobytes()
        if key not in cache:  # the line search and the next iteration ask for the same point
            cache.clear()
            cache[key] = fun(x)
            evals[0] += 1
        return cache[key]

    x = np.array(x0, dtype=np.float64)
    f, g = value_and_grad(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []  # (s, y, 1 / y.s), oldest first
    for _ in range(max_iter):
        if np.max(np.abs(g)) <= tolerance_grad:
            break
        q = -g
        alphas = []
        for s_k, y_k, rho in reversed(pairs):
            a = rho * float(s_k @ q)
            q = q - a * y_k
            alphas.append(a)
        if pairs:
            s_k, y_k, _ = pairs[-1]
            q = q * (float(s_k @ y_k) / float(y_k @ y_k))
        else:
            q = q * min(1.0, 1.0 / float(np.sum(np.abs(g))))  # torch's first step: lr * min(1, 1/|g|_1)
        for (s_k, y_k, rho), a in zip(pairs, reversed(alphas)):
            q = q + s_k * (a - rho * float(y_k @ q))
        slope = float(g @ q)
        if slope > -tolerance_change:
            break
        step = backtracking_step(lambda z: value_and_grad(z)[0], x, f, slope, q)
        if step is None:  # no decrease along this direction: as good as it gets
            break
        x_new = x + step * q
        f_new, g_new = value_and_grad(x_new)
        s_k, y_k = x_new - x, g_new - g
        ys = float(y_k @ s_k)
        if ys > 1e-10:  # curvature condition: keep only pairs that keep the inverse Hessian positive
            pairs = (pairs + [(s_k, y_k, 1.0 / ys)])[-history:]
        f_prev, x, f, g = f, x_new, f_new, g_new
        if abs(f - f_prev) < tolerance_change or np.max(np.abs(s_k)) <= tolerance_change:
            break
    return x, evals[0]


def fit_logistic_lbfgs(x: np.ndarray, y: np.ndarray, num_classes: int, wd: float, max_iter: int,
                       init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise ``mean CE(x W^T + b, y) + wd/2 ||W||^2`` with L-BFGS; returns ``(W [C, D], b [C], MACs)``.

    The objective is the one the torch head minimised (bias not decayed), with the same
    optimizer (``lbfgs``), iteration budget and curvature memory (20 pairs); the gradient is exact
    and analytic.
    Each evaluation costs two ``N x D x C`` products (logits and the weight gradient): that is
    the MAC count returned.
    """
    n, d = x.shape
    x = np.ascontiguousarray(x, np.float32)  # the products run in float32, as the torch head's did
    onehot = np.zeros((n, num_classes), np.float32)
    onehot[np.arange(n), y] = 1.0

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = theta[:num_classes * d].reshape(num_classes, d)
        b = theta[num_classes * d:]
        logp = _log_softmax(x @ w.T.astype(np.float32) + b.astype(np.float32))
        loss = -float(np.sum(logp * onehot, dtype=np.float64)) / n + 0.5 * wd * float(np.sum(w * w))
        delta = (np.exp(logp) - onehot) / n  # d loss / d logits
        grad_w = (delta.T @ x).astype(np.float64) + wd * w
        return loss, np.concatenate([grad_w.ravel(), delta.sum(0, dtype=np.float64)])

    theta0 = (np.zeros(num_classes * (d + 1)) if init is None
              else np.concatenate([init[0].ravel(), init[1]]).astype(np.float64))
    theta, evals = lbfgs(loss_and_grad, theta0, max_iter=max_iter)
    return theta[:num_classes * d].reshape(num_classes, d), theta[num_classes * d:], 2 * n * d * num_classes * evals


def train_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *, val_fraction: float = 0.15,
               weight_decays: tuple[float, ...] = WEIGHT_DECAYS, max_iter: int = 100, seed: int = 0) -> HeadFit:
    """Fit ``softmax(W x + b)``; model selection over weight decay on a held-out part of train."""
    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    if len(np.unique(y)) < 2:
        raise ValueError("a head needs training images of at least 2 classes")
    mu, sigma = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64) + 1e-6
    xs = ((x - mu) / sigma).astype(np.float32)
    keep, held = stratified_split(y, val_fraction, seed)
    history: dict[str, float] = {}
    best_wd, best_acc = weight_decays[-1], -1.0
    init, macs = None, 0
    if len(held) > 0:
        for wd in weight_decays:
            w, b, spent = fit_logistic_lbfgs(xs[keep], y[keep], num_classes, wd, max_iter, init)
            init, macs = (w, b), macs + spent
            acc = float(np.mean((xs[held] @ w.T + b).argmax(1) == y[held]))
            history[f"val_acc@wd={wd:g}"] = acc
            if acc > best_acc + 1e-9 or (abs(acc - best_acc) <= 1e-9 and wd > best_wd):
                best_wd, best_acc = wd, acc
    w, b, spent = fit_logistic_lbfgs(xs, y, num_classes, best_wd, max_iter)
    # fold the standardisation into the head: W (x - mu) / sigma + b
    w_raw = w / sigma
    b_raw = b - (w * (mu / sigma)).sum(1)
    return HeadFit(w_raw.astype(np.float32), b_raw.astype(np.float32), max(best_acc, 0.0), best_wd, history,
                   macs + spent)


def head_accuracy(weight: np.ndarray, bias: np.ndarray, features: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    return float(((features @ weight.T + bias).argmax(1) == np.asarray(labels)).mean())
