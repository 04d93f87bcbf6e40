"""Single-agent lifelong-learning baselines that the fleet report compares SKILL against.

SKILL learns tasks in parallel and never forgets (each task keeps its own head).  The
paper's baselines (section 5, appendix A.6) are the opposite: *one* agent learns the
tasks one after another.  Here they run on frozen-backbone **features** (cheap) in the
class-incremental setting with **no task oracle**:

* the model is one linear head over the union of all classes seen so far; its output
  layer grows when a task arrives.  A class is a (task, class) pair, so two tasks'
  "dog" are different outputs;
* after each task the head is evaluated on the test set of every task seen so far by
  a global argmax over all outputs, giving ``acc_matrix[t][j]`` for accuracy-vs-tasks
  curves (the paper's Fig. 4 is ``[row[0] for row in acc_matrix]``).

Strategies (``BASELINES``):

``naive``    sequential fine-tuning of the shared head; the lower bound.
``ewc``      Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural
             networks" (PNAS): a quadratic penalty weighted by the diagonal Fisher,
             accumulated across tasks (the "online" form of Schwarz et al. 2018).
``er_10pc``  experience replay (Robins 1995; Chaudhry et al. 2019, "On tiny episodic
             memories in continual learning") from an episodic memory that keeps
             10 training samples per class of every finished task (the paper's
             "10 images/class" setting; the memory grows with the tasks).
``er_10k``   the same replay from a 10,000-sample reservoir buffer (Vitter 1985).
``derpp``    DER++ (Buzzega et al. 2020, "Dark experience for general continual
             learning: a strong, simple baseline", NeurIPS): a reservoir buffer that
             also stores the logits; loss = CE + alpha * MSE(logits on buffer, stored
             logits) + beta * CE(buffer labels).
``joint``    not a lifelong learner: retrains on all data seen so far at each task.
             The accuracy ceiling of a single linear head, for reference.

Why not Avalanche: ``avalanche-lib`` 0.6.0 installs beside torch 2.14.1, but its DER
crashes when the output layer grows (the MSE compares a wider output with narrower
stored logits), its DER buffer is class-balanced with logits recorded after the task
rather than Buzzega's reservoir, and it pulls ~50 packages (jax, wandb, tensorboard,
QP solvers) into the runtime's environment.  The strategies here are a few lines each.

MAC accounting (so the report can set these next to SKILL's, cf. the paper's Fig. 9):
for a linear head of width C on D-dimensional frozen features a forward pass costs
D*C MACs per sample, and the backward pass only needs the weight gradient g^T x
(another D*C; the features are constants, so there is no input gradient).  One training
sample therefore costs 2*D*C head MACs.  Replay samples are counted like current ones;
EWC's Fisher estimate and penalty are counted where they are computed.  The backbone is
not run here: every sample forwarded through the head (``samples_processed``) is one
image a device without a feature cache would push through the backbone, and
``backbone_macs_per_image`` adds that cost when the caller gives it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BASELINES",
    "DERpp",
    "EWC",
    "BaselineResult",
    "ClassBalancedMemory",
    "ExperienceReplay",
    "GrowingLinearHead",
    "Joint",
    "MacMeter",
    "Naive",
    "ReservoirBuffer",
    "Strategy",
    "TaskData",
    "run_baseline",
]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class TaskData:
    """One task's frozen-backbone features.  Labels are *local* class indices 0..len(classes)-1."""

    name: str
    train_x: np.ndarray  # [N, D] float32
    train_y: np.ndarray  # [N] int
    test_x: np.ndarray  # [M, D] float32
    test_y: np.ndarray  # [M] int
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        n_classes = len(self.classes)
        if n_classes < 1:
            raise ValueError(f"task {self.name!r}: `classes` is empty; give the class names of this task")
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            x, y = np.asarray(x), np.asarray(y)
            if x.ndim != 2:
                raise ValueError(f"task {self.name!r}: {split}_x must be [N, D] features, got shape {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(
                    f"task {self.name!r}: {split}_y must be 1-D with one label per row of {split}_x "
                    f"({len(x)} rows), got shape {y.shape}"
                )
            if len(x) == 0:
                raise ValueError(f"task {self.name!r}: {split} split is empty")
            if not np.issubdtype(y.dtype, np.integer):
                raise ValueError(f"task {self.name!r}: {split}_y must hold integer class indices, got {y.dtype}")
            if y.min() < 0 or y.max() >= n_classes:
                raise ValueError(
                    f"task {self.name!r}: {split}_y holds labels in [{y.min()}, {y.max()}] but the task has "
                    f"{n_classes} classes; labels must be local indices 0..{n_classes - 1}"
                )
            if not np.all(np.isfinite(x)):
                raise ValueError(f"task {self.name!r}: {split}_x contains NaN or inf")
            object.__setattr__(self, f"{split}_x", np.ascontiguousarray(x, dtype=np.float32))
            object.__setattr__(self, f"{split}_y", y.astype(np.int64))
        if self.train_x.shape[1] != self.test_x.shape[1]:
            raise ValueError(
                f"task {self.name!r}: train features are {self.train_x.shape[1]}-D but test features are "
                f"{self.test_x.shape[1]}-D"
            )

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[1])


@dataclass
class BaselineResult:
    """What one baseline run measured.  Per-task lists have one entry per task, in order."""

    name: str
    task_names: list[str]
    acc_matrix: list[list[float]]  # acc_matrix[t][j]: accuracy on task j after learning tasks 0..t (j <= t)
    oracle_acc_matrix: list[list[float]]  # the same with a task oracle: argmax over task j's own outputs only
    train_macs: list[int]  # head MACs spent learning task t (+ backbone MACs when backbone_macs_per_image > 0)
    eval_macs: list[int]  # MACs of the evaluation after task t
    samples_processed: list[int]  # sample forwards through the head while learning task t (replay included)
    eval_samples: list[int]  # test samples evaluated after task t
    buffer_samples: list[int]  # samples held in the replay buffer after task t (0 without one)
    train_seconds: list[float]
    eval_seconds: list[float]
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    @property
    def mean_acc_curve(self) -> list[float]:
        """Mean accuracy over the tasks seen so far, after each task."""
        return [float(np.mean(row)) for row in self.acc_matrix]

    @property
    def first_task_curve(self) -> list[float]:
        """Accuracy on task 0 after each task (the paper's Fig. 4)."""
        return [row[0] for row in self.acc_matrix]

    @property
    def final_mean_acc(self) -> float:
        return self.mean_acc_curve[-1]

    @property
    def forgetting(self) -> float:
        """Average forgetting (Chaudhry et al. 2018): best-ever minus final accuracy, over all but the last task."""
        t_last = len(self.acc_matrix) - 1
        if t_last == 0:
            return 0.0
        drops = [
            max(self.acc_matrix[t][j] for t in range(j, t_last)) - self.acc_matrix[t_last][j] for j in range(t_last)
        ]
        return float(np.mean(drops))

    @property
    def wall_seconds(self) -> float:
        return float(sum(self.train_seconds) + sum(self.eval_seconds))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record, with the derived curves included for plotting."""
        out = asdict(self)
        out.update(
            mean_acc_curve=self.mean_acc_curve,
            first_task_curve=self.first_task_curve,
            final_mean_acc=self.final_mean_acc,
            forgetting=self.forgetting,
            wall_seconds=self.wall_seconds,
        )
        return out


# --------------------------------------------------------------------------- model


class GrowingLinearHead(torch.nn.Module):
    """A linear classifier whose output layer gains rows as new tasks bring new classes."""

    def __init__(self, dim: int, device: torch.device) -> None:
        super().__init__()
        self.dim = dim
        self.weight = torch.nn.Parameter(torch.empty(0, dim, device=device))
        self.bias = torch.nn.Parameter(torch.empty(0, device=device))

    @property
    def width(self) -> int:
        return int(self.weight.shape[0])

    def grow(self, n_new: int, generator: torch.Generator) -> None:
        """Append n_new outputs, initialised like ``torch.nn.Linear`` (U(-1/sqrt(D), 1/sqrt(D))).

        Replaces the parameters, so build the optimizer after growing.
        """
        bound = 1.0 / math.sqrt(self.dim)
        device = self.weight.device
        new_w = (torch.rand(n_new, self.dim, generator=generator) * 2 - 1) * bound
        new_b = (torch.rand(n_new, generator=generator) * 2 - 1) * bound
        self.weight = torch.nn.Parameter(torch.cat([self.weight.detach(), new_w.to(device)]))
        self.bias = torch.nn.Parameter(torch.cat([self.bias.detach(), new_b.to(device)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MacMeter:
    """Counts head MACs and sample forwards for the task being learned."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.macs = 0
        self.samples = 0

    def train_pass(self, n_samples: int, width: int) -> None:
        """n samples forwarded and back-propagated through a head of `width` outputs: 2*D*C MACs each."""
        self.samples += n_samples
        self.macs += 2 * self.dim * width * n_samples

    def forward_only(self, n_samples: int, width: int) -> None:
        self.samples += n_samples
        self.macs += self.dim * width * n_samples


# --------------------------------------------------------------------------- buffers


class ReservoirBuffer:
    """Fixed-capacity buffer filled by reservoir sampling (Vitter 1985): every sample offered so
    far has the same chance, capacity / offered, of being in it.  Optionally keeps logits
    (for DER++) together with the number of logit columns that existed when they were stored.
    """

    def __init__(self, capacity: int, dim: int, rng: np.random.Generator, store_logits: bool = False) -> None:
        if capacity < 1:
            raise ValueError(f"buffer capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.rng = rng
        self.x = torch.zeros(capacity, dim)
        self.y = torch.zeros(capacity, dtype=torch.long)
        self.store_logits = store_logits
        self.logits = torch.zeros(capacity, 0)
        self.logit_width = torch.zeros(capacity, dtype=torch.long)
        self.size = 0
        self.offered = 0

    def __len__(self) -> int:
        return self.size

    def offer(self, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor | None = None) -> None:
        if self.store_logits and logits is not None and logits.shape[1] > self.logits.shape[1]:
            pad = torch.zeros(self.capacity, logits.shape[1] - self.logits.shape[1])
            self.logits = torch.cat([self.logits, pad], dim=1)
        n = len(x)
        position = self.offered + np.arange(n)  # stream index of each offered sample
        slot = np.where(position < self.capacity, position, -1)
        full = position >= self.capacity
        slot[full] = self.rng.integers(0, position[full] + 1)  # replace a random slot w.p. capacity/(position+1)
        self.offered += n
        self.size = min(self.capacity, self.offered)
        keep = slot < self.capacity
        # when two samples of this batch hit the same slot, the later one wins, as in a sequential loop
        _, last = np.unique(slot[keep][::-1], return_index=True)
        src = np.flatnonzero(keep)[::-1][last]
        src_t, dst_t = torch.from_numpy(src), torch.from_numpy(slot[src])
        self.x[dst_t] = x[src_t].cpu()
        self.y[dst_t] = y[src_t].cpu()
        if self.store_logits and logits is not None:
            self.logits[dst_t] = 0.0
            self.logits[dst_t, : logits.shape[1]] = logits[src_t].cpu()
            self.logit_width[dst_t] = logits.shape[1]

    def sample(self, n: int) -> torch.Tensor:
        """Indices of min(n, size) distinct stored samples."""
        return torch.from_numpy(self.rng.choice(self.size, size=min(n, self.size), replace=False))


class ClassBalancedMemory:
    """Episodic memory that keeps `per_class` random training samples of every class of every
    finished task (the paper's "10 images/class"); it grows by per_class * classes per task."""

    def __init__(self, per_class: int, dim: int, rng: np.random.Generator) -> None:
        if per_class < 1:
            raise ValueError(f"samples per class must be >= 1, got {per_class}")
        self.per_class = per_class
        self.rng = rng
        self.x = torch.zeros(0, dim)
        self.y = torch.zeros(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def add_task(self, x: torch.Tensor, y: torch.Tensor) -> None:
        keep: list[np.ndarray] = []
        y_np = y.cpu().numpy()
        for c in np.unique(y_np):
            idx = np.flatnonzero(y_np == c)
            keep.append(self.rng.choice(idx, size=min(self.per_class, len(idx)), replace=False))
        chosen = torch.from_numpy(np.sort(np.concatenate(keep)))
        self.x = torch.cat([self.x, x[chosen].cpu()])
        self.y = torch.cat([self.y, y[chosen].cpu()])

    def sample(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.choice(len(self), size=min(n, len(self)), replace=False))


# --------------------------------------------------------------------------- strategies


class Strategy:
    """Plain sequential fine-tuning; the other strategies override the hooks they need.

    ``loss`` returns the loss for one minibatch of the current task and records in the
    meter every sample it forwards; ``after_step`` and ``end_task`` update buffers/penalties.
    """

    def __init__(self, *, device: torch.device, dim: int, rng: np.random.Generator) -> None:
        self.device = device
        self.dim = dim
        self.rng = rng
        self._last_logits: torch.Tensor | None = None  # logits of the current minibatch, for DER++'s buffer

    def hparams(self) -> dict[str, Any]:
        return {}

    def training_set(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, y

    def loss(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> torch.Tensor:
        logits = head(x)
        meter.train_pass(len(x), head.width)
        self._last_logits = logits.detach()
        return F.cross_entropy(logits, y)

    def after_step(self, x: torch.Tensor, y: torch.Tensor, last_epoch: bool) -> None:
        pass

    def end_task(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> None:
        pass

    def buffer_samples(self) -> int:
        return 0


class Naive(Strategy):
    """Sequential fine-tuning of one shared head: catastrophic forgetting, the lower bound."""


class Joint(Strategy):
    """Retrain on every training sample seen so far (cumulative); an upper bound, not a lifelong learner."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.seen_x: list[torch.Tensor] = []
        self.seen_y: list[torch.Tensor] = []

    def training_set(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([*self.seen_x, x]), torch.cat([*self.seen_y, y])

    def end_task(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> None:
        self.seen_x.append(x)
        self.seen_y.append(y)


class EWC(Strategy):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017), online/accumulated form.

    After each task the diagonal Fisher F_t of the head's log-likelihood is estimated on
    that task's training data and accumulated, F <- gamma * F + F_t (Schwarz et al. 2018);
    the anchor theta* becomes the current weights.  Later tasks add
    (lambda / 2) * sum F * (theta - theta*)^2 over the outputs that existed at the anchor.

    For a linear softmax head the per-sample gradient is (p - e_y) x^T, so the Fisher has
    a closed form: ``fisher="empirical"`` uses the true labels, mean (p - e_y)^2 x^2;
    ``fisher="true"`` takes the expectation over the model's own prediction y ~ p, which
    is exactly mean p (1 - p) x^2 (Kirkpatrick's definition, without sampling noise).

    The penalty is a stiff quadratic (curvature lambda * F per weight, and F depends on the
    data), on which plain SGD diverges once lr * lambda * F > 2; ``run_baseline`` trains with
    Adam, whose per-parameter step is bounded by lr, so every lambda is stable.  Expect EWC to forget
    almost as much as naive fine-tuning in this class-incremental setting: it anchors the
    old outputs' weights but nothing stops the new outputs from outscoring them on old
    inputs (van de Ven et al. 2022, "Three types of incremental learning").
    """

    def __init__(self, *, ewc_lambda: float = 100.0, gamma: float = 1.0, fisher: str = "true", **kw: Any) -> None:
        super().__init__(**kw)
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher must be 'true' or 'empirical', got {fisher!r}")
        if ewc_lambda < 0 or not 0 <= gamma <= 1:
            raise ValueError(f"need ewc_lambda >= 0 and 0 <= gamma <= 1, got {ewc_lambda}, {gamma}")
        self.ewc_lambda = ewc_lambda
        self.gamma = gamma
        self.fisher = fisher
        self.fisher_w: torch.Tensor | None = None  # [C_old, D]
        self.fisher_b: torch.Tensor | None = None  # [C_old]
        self.anchor_w: torch.Tensor | None = None
        self.anchor_b: torch.Tensor | None = None

    def hparams(self) -> dict[str, Any]:
        return {"ewc_lambda": self.ewc_lambda, "gamma": self.gamma, "fisher": self.fisher}

    def loss(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> torch.Tensor:
        loss = super().loss(head, x, y, meter)
        if self.fisher_w is None:
            return loss
        c_old = self.fisher_w.shape[0]
        penalty = (self.fisher_w * (head.weight[:c_old] - self.anchor_w) ** 2).sum() + (
            self.fisher_b * (head.bias[:c_old] - self.anchor_b) ** 2
        ).sum()
        # forward: square and weight each anchored parameter (2 MACs); backward: 2 F d (1 MAC)
        meter.macs += 3 * c_old * (self.dim + 1)
        return loss + 0.5 * self.ewc_lambda * penalty

    @torch.no_grad()
    def end_task(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> None:
        p = torch.softmax(head(x), dim=1)
        meter.forward_only(len(x), head.width)
        if self.fisher == "true":
            g2 = p * (1 - p)  # E_{y~p}[(p - e_y)^2], per output
        else:
            g2 = (p - F.one_hot(y, head.width).to(p.dtype)) ** 2
        x2 = x * x
        fisher_w = g2.T @ x2 / len(x)
        fisher_b = g2.mean(dim=0)
        meter.macs += len(x) * self.dim + len(x) * self.dim * head.width  # x^2, then g2^T x^2
        if self.fisher_w is not None:
            c_old = self.fisher_w.shape[0]
            fisher_w[:c_old] += self.gamma * self.fisher_w
            fisher_b[:c_old] += self.gamma * self.fisher_b
        self.fisher_w, self.fisher_b = fisher_w, fisher_b
        self.anchor_w, self.anchor_b = head.weight.detach().clone(), head.bias.detach().clone()


class ExperienceReplay(Strategy):
    """Experience replay (Robins 1995; Chaudhry et al. 2019): every current minibatch is
    concatenated with a replay minibatch drawn from the buffer and trained with one CE loss.

    ``buffer="per_class"`` keeps `per_class` samples of each class of each finished task;
    ``buffer="reservoir"`` keeps `buffer_size` samples by reservoir sampling over the stream
    of training samples.  Each sample is offered once, after the step that trained on it in
    the task's last epoch; with one epoch this is exactly the online procedure of the ER/DER
    papers, and with several it keeps the buffer free of duplicates.
    """

    def __init__(
        self,
        *,
        buffer: str = "reservoir",
        buffer_size: int = 10_000,
        per_class: int = 10,
        replay_batch_size: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if buffer not in ("reservoir", "per_class"):
            raise ValueError(f"buffer must be 'reservoir' or 'per_class', got {buffer!r}")
        self.buffer_kind = buffer
        self.replay_batch_size = replay_batch_size
        self.memory: ReservoirBuffer | ClassBalancedMemory
        if buffer == "reservoir":
            self.memory = ReservoirBuffer(buffer_size, self.dim, self.rng)
        else:
            self.memory = ClassBalancedMemory(per_class, self.dim, self.rng)

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"buffer": self.buffer_kind, "replay_batch_size": self.replay_batch_size}
        if isinstance(self.memory, ReservoirBuffer):
            out["buffer_size"] = self.memory.capacity
        else:
            out["per_class"] = self.memory.per_class
        return out

    def loss(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> torch.Tensor:
        if len(self.memory) == 0:
            return super().loss(head, x, y, meter)
        idx = self.memory.sample(self.replay_batch_size or len(x))
        x_all = torch.cat([x, self.memory.x[idx].to(self.device)])
        y_all = torch.cat([y, self.memory.y[idx].to(self.device)])
        logits = head(x_all)
        meter.train_pass(len(x_all), head.width)
        return F.cross_entropy(logits, y_all)

    def after_step(self, x: torch.Tensor, y: torch.Tensor, last_epoch: bool) -> None:
        if isinstance(self.memory, ReservoirBuffer) and last_epoch:
            self.memory.offer(x, y)

    def end_task(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> None:
        if isinstance(self.memory, ClassBalancedMemory):
            self.memory.add_task(x, y)

    def buffer_samples(self) -> int:
        return len(self.memory)


class DERpp(Strategy):
    """DER++ (Buzzega et al. 2020).  A reservoir buffer stores (x, y, logits) with the logits the
    model produced when the sample was presented.  Loss on each step:

        CE(current) + alpha * MSE(head(x'), z') + beta * CE(head(x''), y'')

    with (x', z') and (x'', y'') two independent buffer minibatches.  Samples enter the buffer
    as in ``ExperienceReplay``'s reservoir: once each, during the task's last epoch, with the
    logits of that step's forward pass (so the stored logits come from a trained model).

    Defaults alpha=0.3, beta=1.0 were picked on the 5-task digits split from
    alpha in {0.1, 0.2, 0.3, 0.5, 1} x beta in {0.5, 1}; retune them on real features.  Because the head grows,
    a stored logit vector is shorter than today's output; the MSE compares only the columns
    that existed when it was stored (outputs added later have no target).
    """

    def __init__(
        self,
        *,
        alpha: float = 0.3,
        beta: float = 1.0,
        buffer_size: int = 10_000,
        replay_batch_size: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got {alpha}, {beta}")
        self.alpha = alpha
        self.beta = beta
        self.replay_batch_size = replay_batch_size
        self.memory = ReservoirBuffer(buffer_size, self.dim, self.rng, store_logits=True)

    def hparams(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "buffer_size": self.memory.capacity,
            "replay_batch_size": self.replay_batch_size,
        }

    def loss(self, head: GrowingLinearHead, x: torch.Tensor, y: torch.Tensor, meter: MacMeter) -> torch.Tensor:
        loss = super().loss(head, x, y, meter)
        if len(self.memory) == 0:
            return loss
        n = self.replay_batch_size or len(x)
        idx = self.memory.sample(n)
        out = head(self.memory.x[idx].to(self.device))
        meter.train_pass(len(idx), head.width)
        stored = self.memory.logits[idx].to(self.device)
        widths = self.memory.logit_width[idx].to(self.device)
        cols = min(stored.shape[1], out.shape[1])
        mask = (torch.arange(cols, device=self.device)[None, :] < widths[:, None]).to(out.dtype)
        sq = (out[:, :cols] - stored[:, :cols]) ** 2 * mask
        loss = loss + self.alpha * sq.sum() / mask.sum()
        idx2 = self.memory.sample(n)
        out2 = head(self.memory.x[idx2].to(self.device))
        meter.train_pass(len(idx2), head.width)
        return loss + self.beta * F.cross_entropy(out2, self.memory.y[idx2].to(self.device))

    def after_step(self, x: torch.Tensor, y: torch.Tensor, last_epoch: bool) -> None:
        if last_epoch:
            self.memory.offer(x, y, self._last_logits)

    def buffer_samples(self) -> int:
        return len(self.memory)


def _er_per_class(**kw: Any) -> Strategy:
    return ExperienceReplay(**{"buffer": "per_class", "per_class": 10, **kw})


def _er_reservoir(**kw: Any) -> Strategy:
    return ExperienceReplay(**{"buffer": "reservoir", "buffer_size": 10_000, **kw})


BASELINES: dict[str, Callable[..., Strategy]] = {
    "naive": Naive,
    "ewc": EWC,
    "er_10pc": _er_per_class,
    "er_10k": _er_reservoir,
    "derpp": DERpp,
    "joint": Joint,
}


# --------------------------------------------------------------------------- runner


@torch.no_grad()
def _accuracy(
    head: GrowingLinearHead, x: torch.Tensor, y_global: torch.Tensor, outputs: slice, chunk: int = 8192
) -> tuple[float, float]:
    """(accuracy with a global argmax over all outputs, accuracy with argmax over `outputs` only)."""
    correct = correct_oracle = 0
    for start in range(0, len(x), chunk):
        logits = head(x[start : start + chunk])
        y = y_global[start : start + chunk]
        correct += int((logits.argmax(dim=1) == y).sum())
        correct_oracle += int((logits[:, outputs].argmax(dim=1) + outputs.start == y).sum())
    return correct / len(x), correct_oracle / len(x)


def run_baseline(
    name: str,
    tasks: list[TaskData],
    *,
    epochs: int = 10,
    lr: float = 0.003,
    batch_size: int = 32,
    seed: int = 0,
    backbone_macs_per_image: int = 0,
    device: str = "cpu",
    **hparams: Any,
) -> BaselineResult:
    """Learn `tasks` in order with baseline `name` and evaluate after each one (no task oracle).

    Each task gets a fresh Adam optimizer over the grown head and `epochs` passes over its
    training features in shuffled minibatches.  Adam rather than SGD because frozen
    features differ in scale per dimension and per task (upsampled 8x8 digits vs
    Fashion-MNIST): SGD at one lr either diverges on a stiff loss (EWC's penalty, DER++'s
    logit MSE) or barely fits the next task, and no per-dimension standardisation a
    sequential learner could compute from the first task alone fixes both.  Strategy options go in
    ``hparams`` (e.g. ``ewc_lambda=...``, ``alpha=...``, ``buffer_size=...``).  Results are
    deterministic for a given seed on a given machine.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    if not tasks:
        raise ValueError("no tasks given")
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    dim = tasks[0].dim
    for task in tasks:
        if task.dim != dim:
            raise ValueError(f"task {task.name!r} has {task.dim}-D features, task {tasks[0].name!r} has {dim}-D")

    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    try:
        strategy = BASELINES[name](device=dev, dim=dim, rng=rng, **hparams)
    except TypeError as err:
        raise ValueError(f"baseline {name!r} rejected hyperparameters {sorted(hparams)}: {err}") from err
    head = GrowingLinearHead(dim, dev)

    result = BaselineResult(
        name=name,
        task_names=[t.name for t in tasks],
        acc_matrix=[],
        oracle_acc_matrix=[],
        train_macs=[],
        eval_macs=[],
        samples_processed=[],
        eval_samples=[],
        buffer_samples=[],
        train_seconds=[],
        eval_seconds=[],
        hyperparameters={
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": "adam",
            "seed": seed,
            "backbone_macs_per_image": backbone_macs_per_image,
            "model": "linear head over all classes seen so far",
            **strategy.hparams(),
        },
    )
    offsets: list[int] = []
    test_sets: list[tuple[torch.Tensor, torch.Tensor]] = []
    for task in tasks:
        t0 = time.perf_counter()
        offset = head.width
        offsets.append(offset)
        head.grow(len(task.classes), generator)
        x_task = torch.from_numpy(task.train_x).to(dev)
        y_task = torch.from_numpy(task.train_y).to(dev) + offset
        test_sets.append((torch.from_numpy(task.test_x).to(dev), torch.from_numpy(task.test_y).to(dev) + offset))

        meter = MacMeter(dim)
        optimizer = torch.optim.Adam(head.parameters(), lr=lr)
        x_train, y_train = strategy.training_set(x_task, y_task)
        for epoch in range(epochs):
            order = torch.randperm(len(x_train), generator=generator).to(dev)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                x, y = x_train[idx], y_train[idx]
                loss = strategy.loss(head, x, y, meter)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"{name}: training diverged on task {task.name!r} (loss {loss.item()}); lower lr "
                        f"(now {lr}) or the strategy's loss weights (e.g. ewc_lambda, alpha, beta)"
                    )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                strategy.after_step(x, y, last_epoch=epoch == epochs - 1)
        strategy.end_task(head, x_task, y_task, meter)
        result.train_macs.append(meter.macs + backbone_macs_per_image * meter.samples)
        result.samples_processed.append(meter.samples)
        result.buffer_samples.append(strategy.buffer_samples())
        result.train_seconds.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        accs = [
            _accuracy(head, x, y, slice(offsets[j], offsets[j] + len(tasks[j].classes)))
            for j, (x, y) in enumerate(test_sets)
        ]
        result.acc_matrix.append([a for a, _ in accs])
        result.oracle_acc_matrix.append([a for _, a in accs])
        n_eval = sum(len(y) for _, y in test_sets)
        result.eval_samples.append(n_eval)
        result.eval_macs.append((dim * head.width + backbone_macs_per_image) * n_eval)
        result.eval_seconds.append(time.perf_counter() - t0)
    return result
