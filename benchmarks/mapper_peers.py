"""The task mapper against its published frozen-backbone peers, on the same ROM features (issue 17).

Every method sees the same inputs: each task's pooled ROM features and trunk statistics in the
anchors' space (``sqrt_l2_trunk``, 1,664 wide for Lite0), the same train/test splits, and the
same heads (the device's own, as ``skill_scale.py`` learned and cached them: oracle 0.855 on
skill-bench).  A method only picks the task; the picked task's head then names the class, so
no-oracle accuracy = task right and head right, and ``ratio`` = no-oracle / oracle.

Methods (hyper-parameters chosen on a validation split carved from train, 20 % per class,
never on test; then refitted on all of train):

* ``joint probe`` (ceiling): one softmax classifier over the classes of all tasks, trained on
  the pooled training features of every task; an image goes to the task owning its predicted
  class.  It needs the fleet's pooled data, which SKILL never has, so it is a ceiling only.
* ``pooled MLP probe`` (ceiling): the same, with one hidden layer (1,024 GELU units, dropout; weight
  decay and dropout on validation).  Where it routes better than the linear probe, the linear
  probe is not the ceiling; where it does not, the features are the limit.
* ``family bound`` (ceiling): an oracle routes every image to its family of look-alike tasks
  (the CIFAR-10 pairs, the Omniglot alphabets; any other task is a family of one), and within a
  family the best on validation of those two probes, each trained on the family's pooled data or
  on every task's.
  Every loss left is between look-alikes: to pass it, a mapper would have to route them better
  than classifiers trained on all their pooled data.
* ``NCM`` (SimpleCIL; Zhou et al., "Revisiting class-incremental learning with pre-trained
  models", IJCV 2024): cosine similarity to class prototypes.
* ``FeCAM`` (Goswami et al., NeurIPS 2023): a Mahalanobis distance per class with that class's
  own covariance, shrunk (``S + g1 V1 I + g2 V2 (1 - I)``, V1/V2 the mean diagonal/off-diagonal)
  and normalised to a correlation matrix, on Tukey-transformed (square-rooted), L2-normalised
  features; task of the nearest class.
* ``RanPAC`` (McDonnell et al., NeurIPS 2023): a frozen Gaussian random projection to M
  dimensions with ReLU, then ridge regression onto one-hot labels of all classes from the Gram
  matrix ``G = sum h h^T`` and ``Q = sum h y^T`` (M from 2k to 10k, lambda on validation).
* ``KLDA`` (Momeni et al., AAAI 2025): random Fourier features of an RBF kernel, class means and
  one shared covariance in that space, and the LDA discriminant.
* ``relative Mahalanobis`` (Ren et al., 2021; the likelihood ratio of TPL, Lin et al., ICLR
  2024): each task's own Gaussian (its class means, its own shrunk covariance, log-determinant)
  against a background Gaussian of all tasks; the background cancels in the closed-set choice
  but makes the open-set score comparable between tasks.
* ours: ``Mahalanobis`` (class means + exemplar rows per packet, the student's tied covariance)
  and ``GMMC`` (k = 25 diagonal Gaussians per task), from the packets' own records; and each
  again as a receiver gets it when every packet must fit 56 KB (``ours56``: the codec's budget
  ladder, 3-bit heads, merged GMMC components or Mahalanobis class means, the carried open-set
  thresholds).  Their ``ratio`` is over the fp32 heads' oracle; ``oracle_acc_of_sent_heads`` is
  what the 3-bit heads score with the oracle.

What a device must *send* per task (``bytes_per_task``) follows from each method's statistics:
sums that merge in any order (class sums and counts, Gram or second-moment matrices), fp16.
Ours are the real packet sizes at the default codec (fp32 records, zstd), head included.

Open set, leave-one-task-out: with task t absent from the mapper, t's test images should be
"unknown" and the other tasks' should not.  ``open_set_auroc`` is the AUROC of each method's
known-ness score (ours: the chosen task's open-set score minus its calibrated threshold, plus
its lead over the runner-up known task; for the fp32 rows, the product's rule on records with
both anchors, the smaller margin of the two plus the lead, with ``open_set_own_anchor`` the test of
the row's own anchor alone and ``open_set_anchors_only`` the rule without the lead), pooled over all t; ``operating_point`` is the fraction of absent-task images flagged when the
threshold marks at most 2 % of known-task images unknown.  A method whose statistics are shared
by all tasks (RanPAC's Gram matrix, KLDA's pooled covariance, relative Mahalanobis' background)
is refitted from its sums without t's training rows for each t, as a fleet that never received t
would hold it; ``open_set_column_dropped_only`` keeps the older figure, where t had only lost its
column and its rows still shaped the shared statistics.

    python benchmarks/extract_features.py --out FEATURES_DIR
    python benchmarks/skill_scale.py --features FEATURES_DIR --cache CACHE_DIR   # heads, anchors
    python benchmarks/mapper_peers.py --features FEATURES_DIR --cache CACHE_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from typing import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import check_same_rom, features_rom, md_table, teacher_calibrations, update_readme, write_result  # noqa: E402
from skill_scale import learned, load_tasks, log  # noqa: E402

from skill_edge.runtime.mapping.anchors import fit_task_anchors, transform_features  # noqa: E402
from skill_edge.runtime.exchange.packet import PacketCodec  # noqa: E402
from skill_edge.runtime.exchange.keys import DeviceKey  # noqa: E402
from skill_edge.runtime.mapping.mapper import AnchorTests, build_mapper, exemplar_scatter, runner_up_gap  # noqa: E402

TRANSFORM = "sqrt_l2_trunk"
COMPACT_BYTES = 56_000
FP16 = 2


# ----------------------------------------------------------------------------- data
@dataclass
class Pooled:
    """All tasks' features side by side, with global class ids and the task owning each class."""

    x: np.ndarray  # [N, D] transformed
    y: np.ndarray  # [N] global class id
    task: np.ndarray  # [N] task index
    owner: np.ndarray  # [C] task of each global class
    class_counts: list[int]  # classes per task

    @property
    def num_classes(self) -> int:
        return len(self.owner)


def pooled(parts: list[tuple[np.ndarray, np.ndarray]], class_counts: list[int]) -> Pooled:
    off = np.concatenate([[0], np.cumsum(class_counts)[:-1]])
    x = np.concatenate([p[0] for p in parts]).astype(np.float32)
    y = np.concatenate([p[1] + off[t] for t, p in enumerate(parts)])
    task = np.concatenate([np.full(len(p[1]), t) for t, p in enumerate(parts)])
    owner = np.repeat(np.arange(len(class_counts)), class_counts)
    return Pooled(x, y, task, owner, list(class_counts))


def val_split(y: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """80/20 per class (at least one of each class on both sides when it has two images)."""
    rng = np.random.default_rng(seed)
    fit, val = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = max(1, int(round(0.2 * len(idx)))) if len(idx) > 1 else 0
        val.append(idx[:k])
        fit.append(idx[k:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(val))


def task_accuracy(class_scores: np.ndarray, data: Pooled) -> np.ndarray:
    """Chosen task per image from [N, C] class scores."""
    return data.owner[class_scores.argmax(axis=1)]


def mean_task_id(pred_task: np.ndarray, data: Pooled) -> float:
    return float(np.mean([np.mean(pred_task[data.task == t] == t) for t in range(len(data.class_counts))]))


# ----------------------------------------------------------------------------- peers
def class_means(d: Pooled) -> tuple[np.ndarray, np.ndarray]:
    c = d.num_classes
    sums = np.zeros((c, d.x.shape[1]))
    np.add.at(sums, d.y, d.x)
    counts = np.bincount(d.y, minlength=c).astype(np.float64)
    return sums / counts[:, None], counts


class NCM:
    """SimpleCIL: cosine to class prototypes.  Sends class sums and counts."""

    name = "NCM (SimpleCIL)"

    def fit(self, d: Pooled) -> "NCM":
        mu, _ = class_means(d)
        self.p = (mu / np.linalg.norm(mu, axis=1, keepdims=True)).astype(np.float32)
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ self.p.T

    @staticmethod
    def bytes(c: int, d: int) -> int:
        return c * (d + 1) * FP16


class FeCAM:
    """Per-class shrunk, correlation-normalised covariance (Woodbury: classes hold fewer images than D)."""

    name = "FeCAM"

    def __init__(self, g1: float = 1.0, g2: float = 1.0) -> None:
        self.g1, self.g2 = g1, g2

    def fit(self, d: Pooled) -> "FeCAM":
        x = d.x / np.linalg.norm(d.x, axis=1, keepdims=True)  # FeCAM L2-normalises features and means
        self.models = []
        for c in range(d.num_classes):
            xc = x[d.y == c].astype(np.float64)
            mu = xc.mean(0)
            e = (xc - mu) / np.sqrt(max(len(xc) - 1, 1))  # S = e^T e, rank <= n - 1
            diag = (e * e).sum(0)
            p = len(mu)
            v1 = diag.mean()
            # mean off-diagonal of S: (sum of all entries - trace) / (p^2 - p)
            tot = float((e.sum(1) ** 2).sum())
            v2 = (tot - diag.sum()) / (p * p - p)
            # S_shrunk = S + g1 v1 I + g2 v2 (11^T - I) = (g1 v1 - g2 v2) I + g2 v2 11^T + e^T e
            a = self.g1 * v1 - self.g2 * v2
            full_diag = diag + a + self.g2 * v2
            s = 1.0 / np.sqrt(full_diag)  # correlation normalisation: R = D^-1/2 S D^-1/2
            # R = diag(base) + U^T sign U: e's rows, plus the rank-one g2 v2 11^T whose sign is v2's
            u = np.concatenate([e, np.sqrt(abs(self.g2 * v2)) * np.ones((1, p))]) * s  # [n+1, p]
            sign = np.ones(len(u))
            sign[-1] = 1.0 if v2 >= 0 else -1.0
            base = a * s * s  # diagonal part of R
            inv_base = 1.0 / base
            ub = u * inv_base  # [n+1, p]
            k = np.linalg.inv(np.diag(sign) + ub @ u.T)  # Woodbury with a signed middle (sign^-1 = sign)
            self.models.append((mu.astype(np.float32), inv_base.astype(np.float32), ub.astype(np.float32),
                                k.astype(np.float32)))
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
        out = np.empty((len(x), len(self.models)), np.float32)
        for c, (mu, inv_base, ub, k) in enumerate(self.models):
            v = x - mu
            w = v @ ub.T  # [N, n+1]
            out[:, c] = -((v * v * inv_base).sum(1) - ((w @ k) * w).sum(1))
        return out

    @staticmethod
    def bytes(c: int, d: int) -> int:
        return c * (d + d * (d + 1) // 2 + 1) * FP16


def second_moments(features: Callable[[np.ndarray], np.ndarray], x: np.ndarray, m: int) -> np.ndarray:
    """``sum f(x) f(x)^T`` [m, m] in float64 over the rows of ``x``, 4,096 at a time: one task's share
    of a Gram matrix or a pooled covariance, which the open set takes out to forget that task."""
    g = np.zeros((m, m), np.float64)
    for i in range(0, len(x), 4096):
        f = features(x[i:i + 4096]).astype(np.float64)
        g += f.T @ f
    return g


class RanPAC:
    """Random ReLU projection to M dims, ridge regression over all classes from merged Gram sums."""

    def __init__(self, m: int, seed: int = 0) -> None:
        self.m = m
        self.name = f"RanPAC (M={m})"
        self.seed = seed

    def project(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(x @ self.w, 0.0)

    def with_w(self, w: np.ndarray) -> "RanPAC":
        """Share another instance's projection (the one every device draws from the same seed)."""
        self.w = w
        return self

    def stats(self, d: Pooled) -> tuple[np.ndarray, np.ndarray]:
        self.w = np.random.default_rng(self.seed).standard_normal((d.x.shape[1], self.m)).astype(np.float32)
        g = np.zeros((self.m, self.m), np.float64)
        q = np.zeros((self.m, d.num_classes), np.float64)
        for i in range(0, len(d.x), 4096):
            h = self.project(d.x[i:i + 4096])
            g += (h.T @ h).astype(np.float64)
            np.add.at(q.T, d.y[i:i + 4096], h.astype(np.float64))
        return g, q

    def solve(self, g: np.ndarray, q: np.ndarray, lam: float) -> "RanPAC":
        reg = g.copy()
        reg.flat[:: self.m + 1] += lam * np.trace(g) / self.m
        chol = np.linalg.cholesky(reg)
        self.out = np.linalg.solve(chol.T, np.linalg.solve(chol, q)).astype(np.float32)
        return self

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.project(x[i:i + 4096]) @ self.out for i in range(0, len(x), 4096)])

    def gram_of(self, x: np.ndarray) -> np.ndarray:
        """One task's share of ``G`` (its rows' projected outer products)."""
        return second_moments(self.project, x, self.m)

    def bytes(self, c: int, d: int) -> int:
        return (self.m * (self.m + 1) // 2 + self.m * c) * FP16


class KLDA:
    """Random Fourier features of an RBF kernel; class means and one shared covariance; LDA."""

    def __init__(self, m: int, sigma: float, seed: int = 0) -> None:
        self.m, self.sigma, self.seed = m, sigma, seed
        self.name = f"KLDA (M={m})"

    def phi(self, x: np.ndarray) -> np.ndarray:
        return (np.sqrt(2.0 / self.m) * np.cos(x @ self.w + self.b)).astype(np.float32)

    def fit(self, d: Pooled, ridge: float = 1e-3) -> "KLDA":
        rng = np.random.default_rng(self.seed)
        self.w = (rng.standard_normal((d.x.shape[1], self.m)) / self.sigma).astype(np.float32)
        self.b = rng.uniform(0, 2 * np.pi, self.m).astype(np.float32)
        sums = np.zeros((d.num_classes, self.m))
        sxx = np.zeros((self.m, self.m))
        for i in range(0, len(d.x), 4096):
            f = self.phi(d.x[i:i + 4096]).astype(np.float64)
            np.add.at(sums, d.y[i:i + 4096], f)
            sxx += f.T @ f
        counts = np.bincount(d.y, minlength=d.num_classes).astype(np.float64)
        self.sums, self.sxx, self.counts, self.ridge = sums, sxx, counts, ridge
        return self.solve(counts > 0)  # a class without rows (a task not held) never wins

    def solve(self, classes: np.ndarray, sxx_out: np.ndarray | float = 0.0) -> "KLDA":
        """The discriminant from the sums of the ``classes`` kept (all, or all but one task's);
        ``sxx_out`` is the second-moment share of the rows taken out."""
        n, sums = self.counts[classes], self.sums[classes]
        mu = sums / n[:, None]
        cov = (self.sxx - sxx_out - (mu * n[:, None]).T @ mu) / n.sum()  # pooled within-class scatter
        cov.flat[:: self.m + 1] += self.ridge * np.trace(cov) / self.m
        prec = np.linalg.inv(cov)
        self.coef = np.zeros((len(classes), self.m), np.float32)
        self.const = np.full(len(classes), -np.inf, np.float32)  # a class taken out never wins
        self.coef[classes] = mu @ prec
        self.const[classes] = -0.5 * (self.coef[classes] * mu).sum(1)
        return self

    def take_out(self, d: Pooled, task: int) -> "KLDA":
        """Refit without one task's rows: its classes and its share of the second moments."""
        return self.solve(d.owner != task, second_moments(self.phi, d.x[d.task == task], self.m))

    def scores(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.phi(x[i:i + 4096]) @ self.coef.T + self.const for i in range(0, len(x), 4096)])

    def bytes(self, c: int, d: int) -> int:
        return (self.m * (self.m + 1) // 2 + c * (self.m + 1)) * FP16


class RelativeMahalanobis:
    """Each task's own Gaussian (own shrunk covariance, log-det) over its class means, relative to a
    background Gaussian of all tasks.  Task score = best class's own log-density - background's."""

    name = "relative Mahalanobis (TPL-style)"

    def fit(self, d: Pooled, shrink: float = 0.1) -> "RelativeMahalanobis":
        mu, counts = class_means(d)
        self.tasks = []
        p = d.x.shape[1]
        for t in range(len(d.class_counts)):
            rows = d.task == t
            e = d.x[rows].astype(np.float64) - mu[d.y[rows]]
            s = e.T @ e / len(e)
            s = (1 - shrink) * s + shrink * np.trace(s) / p * np.eye(p)
            chol = np.linalg.cholesky(s)
            wt = np.linalg.inv(chol)  # z = wt @ v
            cls = np.flatnonzero(d.owner == t)
            self.tasks.append((wt.astype(np.float32), (mu[cls] @ wt.T).astype(np.float32),
                               float(np.log(np.diag(chol)).sum())))
        self.shrink = shrink
        self.bg_sums = []  # per task: n, sum x, sum x x^T (so the background can forget a task)
        for t in range(len(d.class_counts)):
            x = d.x[d.task == t].astype(np.float64)
            self.bg_sums.append((len(x), x.sum(0), x.T @ x))
        self.background(None)
        return self

    def background(self, without: int | None) -> "RelativeMahalanobis":
        """The background Gaussian of all tasks, or of all but ``without``."""
        parts = [b for t, b in enumerate(self.bg_sums) if t != without]
        n = sum(b[0] for b in parts)
        mean = sum(b[1] for b in parts) / n
        s = sum(b[2] for b in parts) / n - np.outer(mean, mean)
        p = len(mean)
        s = (1 - self.shrink) * s + self.shrink * np.trace(s) / p * np.eye(p)
        chol = np.linalg.cholesky(s)
        self.bg = (np.linalg.inv(chol).astype(np.float32), mean.astype(np.float32),
                   float(np.log(np.diag(chol)).sum()))
        return self

    def background_scores(self, x: np.ndarray) -> np.ndarray:
        wb, mb, ldb = self.bg
        zb = (x - mb) @ wb.T
        return -0.5 * (zb * zb).sum(1) - ldb

    def own_scores(self, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), len(self.tasks)), np.float32)
        for t, (wt, mw, ld) in enumerate(self.tasks):
            z = x @ wt.T
            d2 = (z * z).sum(1)[:, None] - 2 * z @ mw.T + (mw * mw).sum(1)
            out[:, t] = -0.5 * d2.min(1) - ld
        return out

    def task_scores(self, x: np.ndarray) -> np.ndarray:
        return self.own_scores(x) - self.background_scores(x)[:, None]

    @staticmethod
    def bytes(c: int, d: int) -> int:
        return (c * (d + 1) + d * (d + 1) // 2) * FP16


def joint_probe(d: Pooled, wd: float, max_iter: int):
    """Softmax over all classes of all tasks on pooled, standardised features (torch L-BFGS)."""
    import torch

    torch.set_num_threads(2)
    mu, sd = d.x.mean(0), d.x.std(0) + 1e-6
    x = torch.from_numpy((d.x - mu) / sd)
    y = torch.from_numpy(d.y)
    lin = torch.nn.Linear(x.shape[1], d.num_classes)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=max_iter, history_size=10,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + 0.5 * wd * (lin.weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w, b = lin.weight.detach().numpy(), lin.bias.detach().numpy()
    return lambda z: ((z - mu) / sd) @ w.T + b


#: The pooled MLP probe's settings: one hidden layer; weight decay and dropout are chosen on validation.
MLP_HIDDEN, MLP_EPOCHS, MLP_SETTINGS = 1024, 40, ((5e-2, 0.5), (0.5, 0.5))


def mlp_probe(d: Pooled, wd: float, dropout: float, epochs: int = MLP_EPOCHS, seed: int = 0):
    """A nonlinear ceiling: one hidden layer (``MLP_HIDDEN`` GELU units, dropout) over all classes of all
    tasks, on pooled, standardised features; AdamW with a cosine schedule, batches of 256.  If it routes
    no better than the linear probe and the Gaussian mappers, the features, not the classifier, set the
    limit (the same pooled data a SKILL fleet never has)."""
    import torch

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    mu, sd = d.x.mean(0), d.x.std(0) + 1e-6
    x = torch.from_numpy(((d.x - mu) / sd).astype(np.float32))
    y = torch.from_numpy(d.y)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], MLP_HIDDEN), torch.nn.GELU(), torch.nn.Dropout(dropout),
                              torch.nn.Linear(MLP_HIDDEN, d.num_classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    net.eval()

    def scores(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(((z - mu) / sd).astype(np.float32))).numpy()
    return scores


#: Families of look-alike tasks in skill-bench and skill-bench-more: tasks whose names share a prefix.
FAMILIES = {"CIFAR-10 pairs": "cifar10-", "Omniglot alphabets": "omniglot-"}


def restrict(d: Pooled, members: list[int]) -> Pooled:
    """The rows and classes of tasks ``members`` only, classes renumbered (``owner`` keeps global task ids)."""
    keep_c = np.isin(d.owner, members)
    new_id = np.full(d.num_classes, -1)
    new_id[keep_c] = np.arange(int(keep_c.sum()))
    rows = np.isin(d.task, members)
    return Pooled(d.x[rows], new_id[d.y[rows]], d.task[rows], d.owner[keep_c],
                  [c for t, c in enumerate(d.class_counts) if t in members])


def family_bound(names: list[str], fit: Pooled, val: Pooled, train: Pooled, test: Pooled,
                 probes: dict[str, Callable[[Pooled], Callable[[np.ndarray], np.ndarray]]]):
    """The highest ceiling measured on these features: every image is routed to its own task *family*
    (a lone task is its own family) by an oracle, and within a family of look-alikes (``FAMILIES``) by
    the pooled probe that routes the family's validation images best.  Each of ``probes`` is tried
    twice: trained on the family's pooled training features alone, and on every task's (its scores
    then read over the family's classes only).  The loss left is the look-alikes' alone.

    Returns the chosen task per test image, the mean validation task-ID under the same rule, and per
    family the chosen probe and its routing accuracy on test images."""
    pred, pred_val, detail = test.task.copy(), val.task.copy(), {}
    on_fit_all: dict[str, Callable] = {}  # probe -> trained on every task's fit rows, shared by the families
    on_train_all: dict[str, Callable] = {}  # the same on all of train: only for a probe some family chose

    def fitted_on_all(probe_name: str, rows: Pooled, memo: dict) -> Callable:
        if probe_name not in memo:
            memo[probe_name] = probes[probe_name](rows)
        return memo[probe_name]

    for label, prefix in FAMILIES.items():
        members = [i for i, n in enumerate(names) if n.startswith(prefix)]
        if len(members) < 2:
            continue
        f, v, tr, te = (restrict(d, members) for d in (fit, val, train, test))
        cols = np.isin(train.owner, members)
        best = None
        for probe_name, make in probes.items():
            for scope in ("family", "all tasks"):
                if scope == "family":
                    on_fit, on_train = make(f), (lambda tr=tr, make=make: make(tr))
                else:
                    m = fitted_on_all(probe_name, fit, on_fit_all)
                    on_fit = lambda z, m=m, cols=cols: m(z)[:, cols]  # noqa: E731
                    on_train = (lambda p=probe_name, cols=cols:  # noqa: E731
                                lambda z: fitted_on_all(p, train, on_train_all)(z)[:, cols])
                on_val = task_accuracy(on_fit(v.x), v)
                acc = float(np.mean(on_val == v.task))
                log(f"family bound, {label}: {probe_name} trained on {scope} routes {acc:.4f} of validation images")
                if best is None or acc > best[0]:
                    best = (acc, f"{probe_name}, trained on {scope}", on_val, on_train)
        pred_val[np.isin(val.task, members)] = best[2]
        routed = task_accuracy(best[3]()(te.x), te)
        pred[np.isin(test.task, members)] = routed
        detail[label] = {"tasks": len(members), "probe": best[1], "val_routing_acc": best[0],
                         "test_routing_acc": float(np.mean(routed == te.task))}
    return pred, mean_task_id(pred_val, val), detail


# ----------------------------------------------------------------------------- scoring
def heads_correct(knowledge, raw_test) -> list[np.ndarray]:
    """Per task: whether its own head names each of its test images right (the oracle)."""
    out = []
    for k, (x, y) in zip(knowledge, raw_test):
        out.append((x @ k.head_weight.T + k.head_bias).argmax(1) == y)
    return out


def system(pred_task: np.ndarray, test: Pooled, own_ok: list[np.ndarray]) -> dict:
    tid, no, orc = [], [], []
    for t, ok in enumerate(own_ok):
        rows = test.task == t
        hit = pred_task[rows] == t
        tid.append(float(hit.mean()))
        no.append(float((hit & ok).mean()))
        orc.append(float(ok.mean()))
    o, n = float(np.mean(orc)), float(np.mean(no))
    return {"task_id_acc": float(np.mean(tid)), "no_oracle_acc": n, "oracle_acc": o, "ratio": n / o,
            "per_task_task_id": tid}


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a known-task image > score of an absent-task image), ties halved."""
    s = np.concatenate([pos, neg])
    ranks = np.empty(len(s))
    order = np.argsort(s, kind="mergesort")
    ranks[order] = np.arange(1, len(s) + 1)
    # average ranks of ties
    _, inv, cnt = np.unique(s, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = sums[inv] / cnt[inv]
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def leave_one_out(task_scores: np.ndarray, known: np.ndarray | None, test: Pooled,
                  relative_to_threshold: bool = False,
                  without: Callable[[int], np.ndarray] | None = None, runner_up_weight: float = 0.0) -> dict:
    """Open set from a [N, T] matrix of per-task scores (``known``: [N, T] known-ness of each image
    under each task as its choice; default the selection score).  Leaving task t out = dropping
    its column, which is exact where columns do not depend on each other.

    A method whose scores share statistics across tasks (a Gram matrix, a pooled covariance, a
    background) must also forget t's training rows in them, or the absent task leaks in: a ridge
    regression fitted on t's images has learnt to score them low on every known class.  For such
    methods ``without(t)`` returns the [N, T] scores of the method refitted from its sums minus
    t's (column t is ignored).  ``runner_up_weight``: the product's rule (``TaskMapper.open_set_margins``),
    which adds the chosen task's lead over the next best *known* task, computed without t."""
    pos_all, neg_all = [], []
    per_task = []
    rows = np.arange(len(test.task))
    for t in range(task_scores.shape[1]):
        scores = task_scores if without is None else without(t)
        s = scores.copy()
        s[:, t] = -np.inf
        best = s.argmax(1)
        k = (scores if known is None else known)[rows, best]
        if runner_up_weight:
            k = k + runner_up_weight * runner_up_gap(s, best)
        neg, pos = k[test.task == t], k[test.task != t]
        per_task.append(auroc(pos, neg))
        pos_all.append(pos)
        neg_all.append(neg)
    pos, neg = np.concatenate(pos_all), np.concatenate(neg_all)
    thr = np.quantile(pos, 0.02)  # at most 2 % of known-task images called unknown
    out = {"auroc": auroc(pos, neg), "auroc_per_left_out_task_mean": float(np.mean(per_task)),
           "auroc_per_left_out_task": [float(a) for a in per_task],
           "operating_point": {"known_called_unknown": float(np.mean(pos < thr)),
                               "absent_called_unknown": float(np.mean(neg < thr))}}
    if relative_to_threshold:  # known-ness is the score minus the teacher's threshold: the product's rule
        out["at_thresholds"] = {"known_called_unknown": float(np.mean(pos < 0)),
                                "absent_called_unknown": float(np.mean(neg < 0))}
    return out


def calibration(sel: np.ndarray, truth: np.ndarray, runtime_temperature: float | None = None) -> dict:
    """Fit the softmax temperature of per-task scores by likelihood on half of the test images
    (every other image of each task) and report the expected calibration error (15 bins) of the
    chosen task's confidence on the other half, before and after, and at the temperature the
    runtime uses (what a device reports)."""
    half = np.zeros(len(truth), bool)
    for t in np.unique(truth):
        half[np.flatnonzero(truth == t)[::2]] = True

    def nll(temp: float, rows: np.ndarray) -> float:
        z = sel[rows] / temp
        z = z - z.max(1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(z)), truth[rows]]))

    def ece(temp: float, rows: np.ndarray) -> float:
        z = sel[rows] / temp
        z = z - z.max(1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        conf, hit = p.max(1), p.argmax(1) == truth[rows]
        bins = np.minimum((conf * 15).astype(int), 14)
        return float(sum(abs(conf[bins == b].mean() - hit[bins == b].mean()) * np.mean(bins == b)
                         for b in range(15) if np.any(bins == b)))

    grid = np.exp(np.linspace(np.log(1e-2), np.log(1e4), 121))
    fitted = float(grid[np.argmin([nll(g, np.flatnonzero(half)) for g in grid])])
    ev = np.flatnonzero(~half)
    out = {"temperature": fitted, "ece_before": ece(1.0, ev), "ece_after": ece(fitted, ev),
           "nll_before": nll(1.0, ev), "nll_after": nll(fitted, ev)}
    if runtime_temperature is not None:
        out |= {"runtime_temperature": float(runtime_temperature),
                "ece_runtime": ece(runtime_temperature, ev), "nll_runtime": nll(runtime_temperature, ev)}
    return out | {
        "method": "temperature by NLL on every other test image of each task; ECE (15 bins) on the rest"}


def ms_per_image(score_fn, *, d: int, n: int = 256, reps: int = 3) -> float:
    """Best-of-``reps`` ms per image of ``score_fn`` on ``n`` random unit inputs ``d`` wide (the features' width)."""
    x = np.abs(np.random.default_rng(1).standard_normal((n, d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        score_fn(x)
        best = min(best, time.perf_counter() - t0)
    return 1000 * best / n


# ----------------------------------------------------------------------------- main
#: Every method this benchmark can run (``--methods``).
METHODS = ("ours", "ours56", "ncm", "fecam", "ranpac", "klda", "relmaha", "joint", "mlp", "family")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=Path, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True, help="skill_scale.py's heads and anchors")
    ap.add_argument("--rom", type=Path, default=Path("models/rom/efficientnet_lite0"))
    ap.add_argument("--ranpac-m", type=int, nargs="+", default=[2000, 5000, 10000])
    ap.add_argument("--probe-iter", type=int, default=100)
    ap.add_argument("--name", default="mapper_peers")
    ap.add_argument("--tasks", nargs="*", help="a subset of tasks (smoke runs)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                    help="the methods to run (default all; e.g. 'ours joint' for the ceiling at 71 tasks)")
    ap.add_argument("--joint-wd", type=float, nargs="+", default=[1e-3, 1e-4],
                    help="weight decays the joint probe tries on validation")
    ap.add_argument("--update", nargs="+", choices=[m for m in METHODS if m != "joint"],
                    help="recompute only these rows (after a fix) and keep the others of the last full run")
    args = ap.parse_args()
    t_start = time.time()

    tasks = load_tasks(args.features)
    if args.tasks:
        tasks = [t for t in tasks if t.name in args.tasks]
    names = [t.name for t in tasks]
    rom = rom_identity(args.rom)
    check_same_rom(features_rom(args.features), rom, "the features")
    knowledge = learned(tasks, args.cache, args.rom, ["gmmc", "maha"], newest=True)
    by_name = {k.task: k for k in knowledge}
    knowledge = [by_name[n] for n in names]
    for k in knowledge:  # newest=True takes whatever the cache holds: heads of another ROM would pass silently
        if k.meta.rom_fingerprint:
            check_same_rom({"fingerprint": k.meta.rom_fingerprint}, rom,
                           f"the heads of {k.task!r} cached in {args.cache}")
    counts = [len(t.classes) for t in tasks]
    log(f"{len(tasks)} tasks, {sum(counts)} classes")

    tr = [(transform_features(t.x_train, TRANSFORM, t.s_train), t.y_train) for t in tasks]
    te = [(transform_features(t.x_test, TRANSFORM, t.s_test), t.y_test) for t in tasks]
    train, test = pooled(tr, counts), pooled(te, counts)
    fit_idx, val_idx = val_split(train.y)
    fit = Pooled(train.x[fit_idx], train.y[fit_idx], train.task[fit_idx], train.owner, counts)
    val = Pooled(train.x[val_idx], train.y[val_idx], train.task[val_idx], train.owner, counts)
    own_ok = heads_correct(knowledge, [(t.x_test, t.y_test) for t in tasks])
    dim = train.x.shape[1]
    mean_c = int(round(np.mean(counts)))
    rows: list[dict] = []

    def add(method: str, pred_task: np.ndarray, *, bytes_per_task: int, student_s: float, ms_1000: float,
            in_product: bool, val_task_id: float | None = None, extra: dict | None = None,
            own: list[np.ndarray] | None = None) -> dict:
        """One row; ``own``: the heads a receiver has, when not the fp32 ones (their oracle is
        recorded, and the ratio stays over the fp32 heads' oracle, the issue's reference)."""
        got = system(pred_task, test, own_ok if own is None else own)
        if own is not None:
            got["oracle_acc_of_sent_heads"] = got["oracle_acc"]
            got["oracle_acc"] = float(np.mean([ok.mean() for ok in own_ok]))
            got["ratio"] = got["no_oracle_acc"] / got["oracle_acc"]
        r = {"method": method, **{k: v for k, v in got.items() if k != "per_task_task_id"},
             "bytes_per_task": int(bytes_per_task), "student_s_per_task": student_s,
             "ms_per_image_1000_tasks": ms_1000, "in_product": in_product, "val_task_id_acc": val_task_id,
             **(extra or {})}
        rows.append(r)
        log(f"{method:38s} task-id {r['task_id_acc']:.4f}  no-oracle {r['no_oracle_acc']:.4f}  "
            f"ratio {r['ratio']:.4f}  bytes {bytes_per_task:,}")
        return r

    def best_class_per_task(class_scores: np.ndarray) -> np.ndarray:
        """[N, T]: each task's best class score, the selection score the open-set study drops columns of."""
        return np.stack([class_scores[:, train.owner == t].max(1) for t in range(len(tasks))], 1)

    redo = set(args.update or [])

    def runs(method: str) -> bool:
        """``--update`` redoes only its methods; otherwise ``--methods`` says what runs."""
        return method in redo if redo else method in args.methods
    # --- ours, from the packets' records: as sent at fp32, and as a 56 KB budget sends them
    codec, key = PacketCodec(), DeviceKey.generate()

    def margins(mp, xs: np.ndarray, sel: np.ndarray) -> np.ndarray:
        """[N, T]: each image's anchors' margin under each task as its choice; ``leave_one_out`` adds the
        lead over the runner-up (``runner_up_weight``), which depends on which task is left out."""
        return np.stack([mp.anchor_margins(xs, np.full(len(xs), j), sel) for j in range(len(tasks))], axis=1)

    def own_images_unknown(received: list, controls: dict[str, dict[str, list]]) -> dict:
        """Each task's own test images that its own anchor's test rejects, per anchor kind, with the
        thresholds the packets carry and with each control's (per kind: label -> records whose
        thresholds are used): mean and worst over tasks."""
        prep = build_mapper("maha", received)
        xs = [prep.prepare(t.x_test, t.s_test) for t in tasks]
        out = {}
        for kind in ("maha", "gmmc"):
            for label, records in (("carried", received), *controls[kind].items()):
                tests = AnchorTests(kind, [getattr(r, kind) for r in received],
                                    np.array([r.thresholds[kind] for r in records]))
                rates = [float(np.mean(tests.margins(x, np.full(len(x), j)) < 0)) for j, x in enumerate(xs)]
                out.setdefault(kind, {})[label] = {"mean": float(np.mean(rates)), "max": float(np.max(rates)),
                                                   "worst_task": names[int(np.argmax(rates))]}
        return out

    def compact_extra(packets: list[bytes], received: list) -> dict:
        return {"max_packet_bytes": int(max(len(p) for p in packets)), "budget_bytes": COMPACT_BYTES,
                "steps": {k.task: k.meta.encoding["step"] for k in received}}

    def ours(kind: str, label: str, records: list, nbytes: int, extra: dict, both: list | None = None,
             controls: dict[str, list] | None = None) -> None:
        """One of our rows from the records a receiver holds; ``both``: the same tasks' records with both
        anchors, as ``learn`` sends them by default, whose open-set test rejects when either anchor's does;
        ``controls``: JSON key -> the same records with other thresholds (their unknown rates are kept)."""
        t0 = time.perf_counter()
        mp = build_mapper(kind, records, open_set="own_anchor")
        student = (time.perf_counter() - t0) / len(records)
        # 1,000 tasks: this mapper's arrays replicated to 1,000 tasks, timed per image
        reps = -(-1000 // len(records))
        many = [_renamed(k, i) for i in range(reps) for k in records][:1000]
        big = (build_mapper(kind, many, covariance=exemplar_scatter([k.maha for k in records]).shrunk()[0])
               if kind == "maha" else build_mapper(kind, many))
        ms = ms_per_image(lambda z: big.task_scores(z), d=big.feature_dim)
        del big
        xs = np.concatenate([mp.prepare(t.x_test, t.s_test) for t in tasks])
        sel = mp.task_scores(xs)
        pred = sel.argmax(axis=1)  # what predict() chooses
        # known-ness under each task as the choice: its open-set score(s) minus threshold(s)
        lead = mp.runner_up_weight
        own = leave_one_out(sel, margins(mp, xs, sel), test, relative_to_threshold=True, runner_up_weight=lead)
        open_set = {"open_set": own}
        if both is not None:
            mb = build_mapper(kind, both)
            both_margins = margins(mb, xs, sel)
            open_set = {"open_set": leave_one_out(sel, both_margins, test, relative_to_threshold=True,
                                                  runner_up_weight=lead),
                        "open_set_rule": "either anchor's threshold rejects (records with both anchors, "
                                         f"{int(np.mean([len(codec.encode(k, key)) for k in both])):,} B a packet), "
                                         f"after adding {lead:g} x the chosen task's lead over the runner-up",
                        "open_set_own_anchor": own,
                        "open_set_anchors_only": leave_one_out(sel, both_margins, test, relative_to_threshold=True)}
        for key_name, control in (controls or {}).items():  # thresholds as sent before a fix, at the same anchors
            open_set[key_name] = leave_one_out(
                sel, margins(build_mapper(kind, control), xs, sel), test, relative_to_threshold=True,
                runner_up_weight=lead)["at_thresholds"]
        add(label, pred, bytes_per_task=nbytes, student_s=student, ms_1000=ms, in_product=True,
            extra={"calibration": calibration(sel.astype(np.float64), test.task, mp.temperature),
                   "temperature_in_runtime": mp.temperature, **open_set,
                   "open_set_by_selection_score": leave_one_out(sel, None, test), **extra},
            own=heads_correct(records, [(t.x_test, t.y_test) for t in tasks]))

    teacher_cals: list = []

    def calibrations() -> list:
        """The teachers' held-out calibrations (fitted again from the features, once)."""
        if not teacher_cals:
            log("the teachers' threshold calibrations")
            teacher_cals.extend(teacher_calibrations(tasks, knowledge))
        return teacher_cals

    def drawn(records: list, received: list) -> list:
        """``records`` sent at the steps ``received`` were, as before the teachers' calibration reached the
        encoder: their Mahalanobis thresholds carried over draws of each anchor's own model."""
        return [codec.decode(codec.encode(k, key, plan=r.meta.encoding["step"])).knowledge
                for k, r in zip(records, received)]

    def with_thresholds(received: list, others: list, kind: str) -> list:
        """The received records with ``kind``'s thresholds taken from ``others`` (a control)."""
        return [dataclasses.replace(r, thresholds={**r.thresholds, kind: o.thresholds[kind]})
                for r, o in zip(received, others)]

    for kind, name in (("maha", "Mahalanobis"), ("gmmc", "GMMC")):
        # what this mapper needs sent: the record with this anchor only (and the head)
        sent = [dataclasses.replace(k, **{"gmmc" if kind == "maha" else "maha": None}) for k in knowledge]
        if runs("ours"):
            ours(kind, f"{name} (ours)", sent, int(np.mean([len(codec.encode(k, key)) for k in sent])), {},
                 both=knowledge)
        if runs("ours56"):
            # the receiver's records: every packet under the budget, decoded (3-bit heads included), with the
            # Mahalanobis thresholds the teachers set on their held-out images for the anchors they send
            cals = calibrations()
            packets = [PacketCodec(budget_bytes=COMPACT_BYTES).encode(k, key, calibration=c) for k, c in zip(sent, cals)]
            received = [codec.decode(p).knowledge for p in packets]
            ours(kind, f"{name} (ours, 56 KB packets)", received, int(np.mean([len(p) for p in packets])),
                 compact_extra(packets, received),
                 controls={"open_set_maha_threshold_drawn": with_thresholds(received, drawn(sent, received), "maha")}
                 if kind == "maha" else None)
    if runs("ours"):
        # each task's own test images its own fp32 tests reject, against thresholds set on the first
        # hold-out only (what a small task got before hold-outs were pooled to MIN_CALIBRATION_ROWS)
        log("own images rejected at fp32, with pooled and single hold-outs")
        single = [dataclasses.replace(k, thresholds=fit_task_anchors(
            t.x_train, t.y_train, trunk_stats=t.s_train, transform=k.meta.feature_transform,
            min_calibration_rows=0).thresholds) for t, k in zip(tasks, knowledge)]
        fp32_own = own_images_unknown(knowledge, {kind: {"single_hold_out": single} for kind in ("maha", "gmmc")})
        next(r for r in rows if r["method"] == "Mahalanobis (ours)")["own_images_called_unknown_fp32"] = fp32_own
    if runs("ours56"):
        # what `learn` sends by default under the budget: both anchors share the 56 KB, so each is
        # reduced further, and the receiver's open set rejects when either anchor's test does
        log("56 KB packets with both anchors")
        packets = [PacketCodec(budget_bytes=COMPACT_BYTES).encode(k, key, calibration=c)
                   for k, c in zip(knowledge, calibrations())]
        received = [codec.decode(p).knowledge for p in packets]
        controls = {"open_set_gmmc_threshold_uncarried": with_thresholds(received, knowledge, "gmmc"),
                    "open_set_maha_threshold_drawn": with_thresholds(received, drawn(knowledge, received), "maha")}
        own = own_images_unknown(received, {"maha": {"drawn": controls["open_set_maha_threshold_drawn"],
                                                     "uncarried": knowledge},
                                            "gmmc": {"uncarried": knowledge}})
        for kind, name in (("maha", "Mahalanobis"), ("gmmc", "GMMC")):
            ours(kind, f"{name} (ours, 56 KB packets, both anchors)", received,
                 int(np.mean([len(p) for p in packets])), {**compact_extra(packets, received),
                                                           "own_images_called_unknown_by_anchor": own},
                 both=received, controls=controls)

    # --- NCM
    if runs("ncm"):
        t0 = time.perf_counter()
        ncm = NCM().fit(train)
        student = (time.perf_counter() - t0) / len(tasks)
        s = ncm.scores(test.x)
        task_sel = best_class_per_task(s)
        add(NCM.name, task_accuracy(s, train), bytes_per_task=NCM.bytes(mean_c, dim), student_s=student,
            ms_1000=ms_per_image(lambda z: z @ np.zeros((dim, 1000 * mean_c), np.float32), d=dim), in_product=False,
            val_task_id=mean_task_id(task_accuracy(NCM().fit(fit).scores(val.x), train), val),
            extra={"open_set": leave_one_out(task_sel, None, test)})

    # --- FeCAM
    if runs("fecam"):
        t0 = time.perf_counter()
        fe = FeCAM().fit(train)
        student = (time.perf_counter() - t0) / len(tasks)
        s = fe.scores(test.x)
        task_sel = best_class_per_task(s)
        n_per_class = int(np.mean(np.bincount(train.y)))
        add(FeCAM.name, task_accuracy(s, train), bytes_per_task=FeCAM.bytes(mean_c, dim), student_s=student,
            ms_1000=ms_per_image(lambda z: z @ np.zeros((dim, 8 * (n_per_class + 1)), np.float32), d=dim, n=64)
            * 1000 * mean_c / 8,
            in_product=False, val_task_id=mean_task_id(task_accuracy(FeCAM().fit(fit).scores(val.x), train), val),
            extra={"open_set": leave_one_out(task_sel, None, test),
                   "note": "ms at 1,000 tasks extrapolated from 8 classes' Woodbury products"})

    if runs("ranpac"):
        # --- RanPAC: M and lambda on validation
        best, kept = None, None
        for m in args.ranpac_m:
            rp = RanPAC(m)
            t0 = time.perf_counter()
            g, q = rp.stats(fit)
            gv, qv = rp.stats(val)  # the statistics are sums: all of train = fit + val, merged exactly
            stats_s = time.perf_counter() - t0
            for lam in (1e-4, 1e-3, 1e-2, 1e-1):
                acc = mean_task_id(task_accuracy(rp.solve(g, q, lam).scores(val.x), train), val)
                log(f"RanPAC M={m} lambda={lam:g}: val task-id {acc:.4f}")
                if best is None or acc > best[0]:
                    best, kept = (acc, m, lam), (rp, g + gv, q + qv, stats_s)
            del g, q, gv, qv
        acc_v, m, lam = best
        rp, g, q, stats_s = kept
        t0 = time.perf_counter()
        rp.solve(g, q, lam)
        student = (stats_s + time.perf_counter() - t0) / len(tasks)
        s = rp.scores(test.x)
        task_sel = best_class_per_task(s)
        ms = ms_per_image(lambda z: np.maximum(z @ rp.w, 0) @ np.zeros((m, 1000 * mean_c), np.float32), d=dim, n=64)

        def ranpac_without(t: int) -> np.ndarray:
            log(f"RanPAC open set: refit without task {t + 1}/{len(tasks)}")
            return best_class_per_task(RanPAC(m).with_w(rp.w).solve(g - rp.gram_of(train.x[train.task == t]), q,
                                                                     lam).scores(test.x))
        add(f"RanPAC (M={m}, lambda={lam:g})", task_accuracy(s, train), bytes_per_task=rp.bytes(mean_c, dim),
            student_s=student, in_product=False, val_task_id=acc_v, ms_1000=ms,
            extra={"open_set": leave_one_out(task_sel, None, test, without=ranpac_without),
                   "open_set_column_dropped_only": leave_one_out(task_sel, None, test)})
        del g, q, rp

    if runs("klda"):
        # --- KLDA: sigma on validation
        best = None
        scale = float(np.median(np.linalg.norm(fit.x[:2000] - fit.x[2000:4000], axis=1)))
        for mult in (1.0, 2.0, 4.0):  # searched at M = 2,000 (the M x M scatter dominates), refitted at 5,000
            kl = KLDA(2000, mult * scale).fit(fit)
            acc = mean_task_id(task_accuracy(kl.scores(val.x), train), val)
            log(f"KLDA sigma={mult:g} x median distance: val task-id {acc:.4f}")
            if best is None or acc > best[0]:
                best = (acc, mult)
        t0 = time.perf_counter()
        kl = KLDA(5000, best[1] * scale).fit(train)
        student = (time.perf_counter() - t0) / len(tasks)
        s = kl.scores(test.x)
        task_sel = best_class_per_task(s)
        add(f"KLDA (M=5000, sigma={best[1]:g} x median)", task_accuracy(s, train), bytes_per_task=kl.bytes(mean_c, dim),
            student_s=student, in_product=False, val_task_id=best[0],
            ms_1000=ms_per_image(lambda z: kl.phi(z) @ np.zeros((5000, 1000 * mean_c), np.float32), d=dim, n=64),
            extra={"open_set": leave_one_out(
                       task_sel, None, test,
                       without=lambda t: best_class_per_task(kl.take_out(train, t).scores(test.x))),
                   "open_set_column_dropped_only": leave_one_out(task_sel, None, test)})
        del kl

    if runs("relmaha"):
        # --- relative Mahalanobis
        t0 = time.perf_counter()
        rm = RelativeMahalanobis().fit(train)
        student = (time.perf_counter() - t0) / len(tasks)
        own = rm.own_scores(test.x)
        s = own - rm.background_scores(test.x)[:, None]
        add(RelativeMahalanobis.name, s.argmax(1), bytes_per_task=RelativeMahalanobis.bytes(mean_c, dim),
            student_s=student, in_product=False,
            val_task_id=mean_task_id(RelativeMahalanobis().fit(fit).task_scores(val.x).argmax(1), val),
            ms_1000=ms_per_image(lambda z: z @ np.zeros((dim, dim), np.float32), d=dim, n=64) * 1000,
            extra={"open_set": leave_one_out(
                       s, None, test, without=lambda t: own - rm.background(t).background_scores(test.x)[:, None]),
                   "open_set_column_dropped_only": leave_one_out(s, None, test)})
        del rm

    if runs("joint"):
        # --- the joint probe: the ceiling
        best = None if len(args.joint_wd) > 1 else (None, args.joint_wd[0])  # one given: no search
        for wd in args.joint_wd if best is None else ():
            acc = mean_task_id(task_accuracy(joint_probe(fit, wd, args.probe_iter)(val.x), train), val)
            log(f"joint probe wd={wd:g}: val task-id {acc:.4f}")
            if best is None or acc > best[0]:
                best = (acc, wd)
        probe = joint_probe(train, best[1], args.probe_iter)
        add(f"joint linear probe (ceiling, wd={best[1]:g})", task_accuracy(probe(test.x), train),
            bytes_per_task=int(np.mean([len(t.y_train) for t in tasks])) * dim * FP16, student_s=float("nan"),
            ms_1000=float("nan"), in_product=False, val_task_id=best[0],
            extra={"note": "needs every task's training features in one place; bytes = a task's features, fp16"})

    if runs("mlp"):
        # --- the pooled MLP probe: a nonlinear ceiling
        best = None
        for wd, dropout in MLP_SETTINGS:
            acc = mean_task_id(task_accuracy(mlp_probe(fit, wd, dropout)(val.x), train), val)
            log(f"MLP probe wd={wd:g} dropout={dropout:g}: val task-id {acc:.4f}")
            if best is None or acc > best[0]:
                best = (acc, wd, dropout)
        probe = mlp_probe(train, best[1], best[2])
        add(f"pooled MLP probe (ceiling, {MLP_HIDDEN} hidden, wd={best[1]:g}, dropout={best[2]:g})",
            task_accuracy(probe(test.x), train),
            bytes_per_task=int(np.mean([len(t.y_train) for t in tasks])) * dim * FP16, student_s=float("nan"),
            ms_1000=float("nan"), in_product=False, val_task_id=best[0],
            extra={"note": "needs every task's training features in one place; bytes = a task's features, fp16"})

    if runs("family"):
        # --- the family bound: an oracle between families, the best pooled probe within each
        probes = {f"linear probe wd={wd:g}": (lambda d, wd=wd: joint_probe(d, wd, args.probe_iter)) for wd in args.joint_wd}
        probes.update({f"MLP probe wd={wd:g} dropout={p:g}": (lambda d, wd=wd, p=p: mlp_probe(d, wd, p))
                       for wd, p in MLP_SETTINGS})
        pred, val_acc, detail = family_bound(names, fit, val, train, test, probes)
        add(FAMILY_ROW, pred, bytes_per_task=int(np.mean([len(t.y_train) for t in tasks])) * dim * FP16,
            student_s=float("nan"), ms_1000=float("nan"), in_product=False, val_task_id=val_acc,
            extra={"families": detail, "note": "an oracle routes each image to its family of look-alike tasks; "
                   "within one, the best pooled probe on validation: a bound on any mapper of these features"})

    if redo:  # recompute only some rows (after a fix), keep the others of the last full run
        import json

        from _common import RESULTS

        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        fresh = {r["method"]: r for r in rows}
        merged = [fresh.pop(r["method"], r) for r in old["rows"]] + list(fresh.values())
        return finish(args, names, counts, merged, old["seconds"] + time.time() - t_start,
                      history=old["command"].split("; then ") + old.get("updated_by", []))

    finish(args, names, counts, rows, time.time() - t_start)


FAMILY_ROW = "family bound (ceiling: oracle between task families, pooled probe within)"

#: The row of classify's default mapper: ``auto`` is Mahalanobis on records with both anchors (device.DEFAULT_MAPPER).
DEFAULT_ROW = "Mahalanobis (ours)"


def finish(args, names: list[str], counts: list[int], rows: list[dict], seconds: float,
           history: list[str] | None = None) -> None:
    """Summary, result file and README section (``history``: the commands behind the rows an ``--update``
    kept; see ``run_history``)."""
    rows = sorted(rows, key=lambda r: not r["in_product"])  # ours first, in the order they ran
    oracle = rows[0]["oracle_acc"]
    product = [r for r in rows if r["in_product"]]
    compact = [r for r in product if r.get("max_packet_bytes", r["bytes_per_task"]) <= COMPACT_BYTES]
    default = next(r for r in product if r["method"] == DEFAULT_ROW)  # classify's default (device.DEFAULT_MAPPER)
    summary = {"oracle_acc": oracle, "tasks": len(names), "classes": int(sum(counts)),
               "methods": sorted(args.methods),
               "joint_probe_ratio": next((r["ratio"] for r in rows if r["method"].startswith("joint")), None),
               "mlp_probe_ratio": next((r["ratio"] for r in rows if r["method"].startswith("pooled MLP")), None),
               "family_bound_ratio": next((r["ratio"] for r in rows if r["method"] == FAMILY_ROW), None),
               "best_product_ratio": max(r["ratio"] for r in product),
               "best_compact_product_ratio": max((r["ratio"] for r in compact), default=None),
               "open_set_auroc": default["open_set"]["auroc"], "default_mapper": default["method"],
               "goals": {"best_product_ratio>=0.96": max(r["ratio"] for r in product) >= 0.96,
                         "best_compact_product_ratio>=0.92": bool(compact) and max(r["ratio"] for r in compact) >= 0.92,
                         "open_set_auroc>=0.90": default["open_set"]["auroc"] >= 0.90,
                         "oracle>=0.855": oracle >= 0.855}}
    from _common import command

    path = write_result(args.name, {"tasks": names, "transform": TRANSFORM, "rom": rom_identity(args.rom),
                                    "summary": summary, "rows": rows, "seconds": seconds,
                                    **run_history((history or []) + [command()])})
    scrub(path, args)
    written = json.loads(path.read_text())
    write_readme(args.name, rows, summary, written["command"], written["rom"]["backbone"],
                 written.get("updated_by", []))
    log(f"wrote {path}")


def run_history(commands: list[str]) -> dict:
    """``command``: the full run that made the file; ``updated_by``: each distinct ``--update`` run since,
    in the order it first ran (a row is as its latest ``--update`` left it, and rerunning the full command
    on today's code gives every row again)."""
    later = list(dict.fromkeys(c for c in commands[1:] if c != commands[0]))
    return {"command": commands[0], **({"updated_by": later} if later else {})}


def rom_identity(rom: Path) -> dict:
    """Which backbone made the features (the command names the ROM folder only as ROM_DIR)."""
    from skill_edge.export.manifest import RomManifest

    m = RomManifest.read(rom)
    return {"backbone": m.backbone, "fingerprint": m.fingerprint}


def _renamed(k, i: int):
    """A copy of a task record under another name (for timing a 1,000-task mapper)."""
    import dataclasses

    return dataclasses.replace(k, task=f"{k.task}-{i}")


def scrub(path: Path, args) -> None:
    text = path.read_text()
    for i, f in enumerate(args.features):
        text = text.replace(str(f), "FEATURES_DIR" if len(args.features) == 1 else f"FEATURES_DIR_{i + 1}")
    text = text.replace(str(args.cache), "CACHE_DIR")
    path.write_text(text)


def write_readme(name: str, rows: list[dict], summary: dict, cmd: str, backbone: str = "efficientnet_lite0",
                 updated_by: list[str] = ()) -> None:
    """The README section, from the result rows (``python -c`` can redo it from the JSON)."""
    table = md_table(
        ["method", "task-ID", "no-oracle", "ratio", "val task-ID", "bytes/task", "student s/task",
         "ms/img @1000 tasks", "open-set AUROC", "in product"],
        [[r["method"], f"{r['task_id_acc']:.4f}", f"{r['no_oracle_acc']:.4f}", f"{r['ratio']:.4f}",
          "-" if r.get("val_task_id_acc") is None else f"{r['val_task_id_acc']:.4f}",
          f"{r['bytes_per_task']:,}", _num(r["student_s_per_task"], 3), _num(r["ms_per_image_1000_tasks"], 2),
          f"{r['open_set']['auroc']:.3f}" if "open_set" in r else "-", "yes" if r["in_product"] else "no"]
         for r in rows])
    ours = sorted((r for r in rows if r["in_product"]), key=lambda r: r["method"] != DEFAULT_ROW)
    calib = "; ".join(f"{r['method']}: temperature {c['temperature']:.3g}, ECE "
                      f"{c['ece_before']:.3f} -> {c['ece_after']:.3f}"
                      + (f"; at the runtime's temperature {c['runtime_temperature']:.3g}: ECE {c['ece_runtime']:.3f}"
                         if "ece_runtime" in c else "")
                      for r in ours if (c := r.get("calibration")))
    op = ours[0]["open_set"]
    best_compact = summary["best_compact_product_ratio"]
    compact_text = ("no mapper of ours fits 56 KB per task at the default (fp32) rung; the budgeted rungs are in "
                    "`packet_budget`" if best_compact is None else f"with every packet under 56 KB, {best_compact:.4f}x (goal 0.92)")
    probe, mlp = summary["joint_probe_ratio"], summary.get("mlp_probe_ratio")
    if probe is None:
        probe_text = "The joint linear probe was not run here."
    else:
        ceiling_text = ("above the best mapper here" if probe >= summary["best_product_ratio"] else
                        "below the best mapper here, so not a ceiling at this scale (one softmax over every class, "
                        f"{args_probe_note(rows)}, loses to a Gaussian classifier with a tied covariance)")
        if mlp is None and probe >= summary["best_product_ratio"]:
            ceiling_text = "the ceiling on these features"
        probe_text = (f"The joint linear probe, which needs the fleet's pooled training data, reaches\n  {probe:.4f}x "
                      f"the oracle: {ceiling_text}.")
    if mlp is not None:
        row = next(r for r in rows if r["method"].startswith("pooled MLP"))
        settings = row["method"].split("(ceiling, ", 1)[1].rstrip(")")
        probe_text += (f"\n  A probe with one hidden layer on the same pooled data ({settings}) reaches {mlp:.4f}x "
                       f"(task-ID {row['task_id_acc']:.4f}), {mlp - summary['best_product_ratio']:+.4f} against the "
                       "best mapper in the product" + ("." if any(r["method"] == FAMILY_ROW for r in rows)
                                                     else ": the highest ceiling measured on these features."))
    fam = next((r for r in rows if r["method"] == FAMILY_ROW), None)
    if fam is not None:
        probe_text += (f"\n  **Family bound** {fam['ratio']:.4f}x (task-ID {fam['task_id_acc']:.4f}), the highest ceiling "
                       "measured on these features: an oracle routes every image to its family of look-alikes, and the "
                       "best pooled probe on validation routes it within the family ("
                       + "; ".join(f"{k}: {v['probe']}, {v['test_routing_acc']:.4f} of test images routed right"
                                   for k, v in fam["families"].items())
                       + ").  Every loss left is between look-alikes, so a mapper would have to route them better "
                       "than probes trained on all their pooled data to pass it.")
    at_thr = op.get("at_thresholds")
    thr = ("" if not at_thr else
           f" With the teachers' calibrated thresholds (the product's rule) {at_thr['absent_called_unknown']:.1%} of an "
           f"absent task's images are called unknown and {at_thr['known_called_unknown']:.1%} of known tasks' images.")
    refit = [r for r in rows if "open_set_column_dropped_only" in r]
    refit_note = ("" if not refit else "\n- Open set of the peers whose statistics all tasks share: each is refitted from its sums "
                  "without the absent task's training rows, as a fleet that never received it would hold them. "
                  "Dropping only the task's column let its rows shape the shared statistics and overstated AUROC: "
                  + "; ".join(f"{r['method']} {r['open_set_column_dropped_only']['auroc']:.3f} -> "
                              f"{r['open_set']['auroc']:.3f}" for r in refit) + ".")
    fused = [r for r in rows if "open_set_own_anchor" in r]
    fused_note = ("" if not fused else "\n- Open set under the product's rule, where a task rejects an input when either of its "
                  "anchors' thresholds does (records with both anchors, as `learn` sends them), against the row's own "
                  "anchor alone: " + "; ".join(
                      f"{r['method']} AUROC {r['open_set']['auroc']:.3f} (own anchor {r['open_set_own_anchor']['auroc']:.3f}),"
                      f" at the thresholds {r['open_set']['at_thresholds']['known_called_unknown']:.1%} of known / "
                      f"{r['open_set']['at_thresholds']['absent_called_unknown']:.1%} of absent-task images unknown "
                      f"(own anchor {r['open_set_own_anchor']['at_thresholds']['known_called_unknown']:.1%} / "
                      f"{r['open_set_own_anchor']['at_thresholds']['absent_called_unknown']:.1%})"
                      + (f"; with the teacher's GMMC thresholds uncarried {u['known_called_unknown']:.1%} / "
                         f"{u['absent_called_unknown']:.1%}" if (u := r.get("open_set_gmmc_threshold_uncarried")) else "")
                      for r in fused) + ".")
    lead_rows = [r for r in rows if "open_set_anchors_only" in r]
    lead_note = ("" if not lead_rows else "\n- The open-set test adds the chosen task's lead over the runner-up task to its "
                 "anchors' margin (`TaskMapper.open_set_margins`); the anchors alone give: " + "; ".join(
                     f"{r['method']} AUROC {r['open_set_anchors_only']['auroc']:.3f} -> {r['open_set']['auroc']:.3f}, "
                     f"at the thresholds {r['open_set_anchors_only']['at_thresholds']['known_called_unknown']:.1%} / "
                     f"{r['open_set_anchors_only']['at_thresholds']['absent_called_unknown']:.1%} of known / absent-task "
                     f"images unknown -> {r['open_set']['at_thresholds']['known_called_unknown']:.1%} / "
                     f"{r['open_set']['at_thresholds']['absent_called_unknown']:.1%}" for r in lead_rows) + ".")
    own_rows = [r for r in rows if "own_images_called_unknown_by_anchor" in r][:1]
    control_names = {"drawn": "carried over draws of the anchor's own model (before)",
                     "uncarried": "the teacher's, unchanged",
                     "single_hold_out": "set on the first hold-out only (before small tasks pooled theirs)"}
    own_note = ("" if not own_rows else "\n- Each task's own test images rejected by its own anchor's test in the 56 KB "
                "packets with both anchors (the teachers set 1 %), with the thresholds the packets carry (Mahalanobis: "
                "set on the teacher's held-out images for the sent anchor; GMMC: shifted over draws), against "
                "controls: " + "; ".join(
                    f"{'Mahalanobis' if kind == 'maha' else 'GMMC'} {v['carried']['mean']:.1%} (worst "
                    f"{v['carried']['max']:.1%}, {v['carried']['worst_task']})" + "".join(
                        f", {control_names.get(c, c)} {v[c]['mean']:.1%} (worst {v[c]['max']:.1%}, {v[c]['worst_task']})"
                        for c in v if c != "carried")
                    for kind, v in own_rows[0]["own_images_called_unknown_by_anchor"].items()) + ".")
    fp32_rows = [r for r in rows if "own_images_called_unknown_fp32" in r][:1]
    own_note += ("" if not fp32_rows else "\n- The same at fp32 (records with both anchors, as `learn` sends them "
                 "losslessly), with the thresholds the teachers set on pooled hold-outs, against: " + "; ".join(
                     f"{'Mahalanobis' if kind == 'maha' else 'GMMC'} {v['carried']['mean']:.1%} (worst "
                     f"{v['carried']['max']:.1%}, {v['carried']['worst_task']}), {control_names[c]} "
                     f"{v[c]['mean']:.1%} (worst {v[c]['max']:.1%}, {v[c]['worst_task']})"
                     for kind, v in fp32_rows[0]["own_images_called_unknown_fp32"].items() for c in v if c != "carried")
                 + ".")
    drawn_rows = [r for r in rows if "open_set_maha_threshold_drawn" in r and r["method"].startswith("Mahalanobis")]
    drawn_note = ("" if not drawn_rows else "\n- Known-task / absent-task images called unknown at the thresholds "
                  "the 56 KB packets carry, against the same packets with the Mahalanobis thresholds carried over "
                  "draws (before the teachers' calibration reached the encoder): " + "; ".join(
                      f"{r['method']} {r['open_set']['at_thresholds']['known_called_unknown']:.1%} / "
                      f"{r['open_set']['at_thresholds']['absent_called_unknown']:.1%} against "
                      f"{r['open_set_maha_threshold_drawn']['known_called_unknown']:.1%} / "
                      f"{r['open_set_maha_threshold_drawn']['absent_called_unknown']:.1%}" for r in drawn_rows) + ".")
    timing_note = ("" if not updated_by else """
- Times are those of the run that made each row (an `--update` redoes only its rows), so compare ms and
  student seconds within one run only.""")
    redone = ("" if not updated_by else " (rows redone since by " + ", ".join(
        f"`--update {u.split(' --update ', 1)[1]}`" if u.split(" --update ", 1)[0] == cmd else f"`{u}`"
        for u in updated_by) + ")")  # an update that changed other options is shown whole
    update_readme(name, f"""## Task mapper against its peers, {summary['tasks']} tasks, {backbone} ROM (`results/{name}.json`)

`{cmd}`{redone} ({summary['tasks']} tasks,
{summary['classes']} classes, oracle {summary['oracle_acc']:.4f}, the device's heads for every method);
`results/{name}.json`.  Bytes are what a device must send per task for that method (ours: the real signed
packet at the default fp32 rung with this anchor only and the head; the 56 KB rows: the mean packet when the
codec's budget ladder must fit every packet in 56 KB, 3-bit heads included; "both anchors": what `learn` sends
by default under that budget, one packet with both anchors, each reduced further so the two fit, routed by the
row's mapper, with an open set that rejects when either anchor's test does; peers: their mergeable sums in fp16);
"ms/img @1000 tasks" times the mapper's scoring of one image against 1,000 tasks on this CPU.

{table}

- {probe_text}  The best mapper in the
  product reaches {summary['best_product_ratio']:.4f}x; {compact_text}{timing_note}
- Calibration of the task posterior ({calib}).
- Open set, leave one task out ({ours[0]['method']}, classify's default): AUROC {op['auroc']:.3f}; at the operating point that
  calls {op['operating_point']['known_called_unknown']:.1%} of known-task images unknown, it calls
  {op['operating_point']['absent_called_unknown']:.1%} of an absent task's images unknown.{thr}{lead_note}{fused_note}{drawn_note}{own_note}{refit_note}
""")


def args_probe_note(rows: list[dict]) -> str:
    """How the joint probe was fitted, from its row's method name."""
    name = next(r["method"] for r in rows if r["method"].startswith("joint"))
    return f"fitted with L-BFGS from its settings ({name.split('(', 1)[1].rstrip(')')})"


def _num(v, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
