"""The paper's cost accounting (section 2 metrics, section 5 / Fig. 9, appendix A.6) for our fleet runs.

Everything is counted in multiply-accumulates (MACs), and bytes sent are converted at
``alpha`` MACs per byte (paper: 1,000).  For each task mapper (GMMC, Mahalanobis) the table
has two rows, exactly as Fig. 9:

* **single agent**: one agent learns every task in sequence; no communication.
  ``total = sum(teacher MACs of every task) + student MACs``.
* **SKILL**: N agents learn in parallel, then share.  Per agent:
  ``teacher = sum(teacher MACs) / N`` (the average; the paper's 2.2232E+15 / 102 = 2.1797E+13),
  ``comm = alpha x bytes one student receives`` (the packets of the tasks it did not learn,
  one after another over its single interface), ``student`` (below), and
  ``speedup_xN = single total / (SKILL total x N)``: 1.0 is a perfect N-fold speedup.

Where the MACs come from:

* backbone: ROM manifest ``macs_per_image["full"]`` x training images, each pushed through the
  ROM once (features are cached, the backbone is frozen, so nothing runs it twice);
* head (and BB) training: *counted* by the learning code: the head's L-BFGS reports every evaluation
  of every weight-decay candidate (``head_train_gmacs``), and BB training every suffix row it ran,
  forward and backward, of every epoch including the validation passes, each priced by one row
  measured with ``torch.utils.flop_counter.FlopCounterMode`` (``bb_train_gmacs``).  Upper-bound
  formulas (``head_training_macs``, ``bb_training_macs``) are kept next to them for reference;
* GMMC fitting (NumPy/scikit-learn, not countable by torch): EM with ``k`` diagonal
  components costs ~4 n k D MACs per iteration (E-step: two products, M-step: two);
  ``fit_task_anchors`` fits twice (calibration + refit); iterations default to
  scikit-learn's cap of 100, so this is an upper bound;
* Mahalanobis teacher: class means (n D) plus scoring the calibration hold-out against the
  task's own exemplars (n_cal n_ex D);
* students: GMMC students only store what they receive (0, as in the paper); Mahalanobis
  students pool every task's exemplars into one covariance (n_ex D^2), invert it (D^3) and
  whiten every class mean (C D^2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

ALPHA_MACS_PER_BYTE = 1000.0
MAPPERS = ("gmmc", "maha")
MAPPER_TITLES = {"gmmc": "GMMC", "maha": "Mahalanobis"}


@dataclass(frozen=True)
class MacModel:
    """The assumptions that are not measured, in one place."""

    alpha: float = ALPHA_MACS_PER_BYTE  # MACs per byte transmitted
    gmmc_em_iterations: int = 100  # scikit-learn's max_iter in fit_gmmc: an upper bound
    gmmc_fits: int = 2  # fit_task_anchors: one fit for threshold calibration, one refit on all data
    bb_backward_factor: float = 3.0  # forward + backward ~ 3 forwards (the spec's formula)
    gmmc_student_macs: int = 0  # the paper: GMMC students only store what they receive


@dataclass
class TeacherWork:
    """What one teacher did for one task: counts that the MAC formulas turn into MACs (JSON-able)."""

    task: str
    agent: str
    n_train: int  # training images pushed through the backbone
    n_classes: int
    feature_dim: int
    backbone_macs_per_image: int
    tail_macs_per_image: int = 0
    train_macs_measured: int | None = None  # MACs of head (+ BB) training, counted by the learning code
    bb: bool = False
    bb_epochs: int = 0
    gmmc_k: int = 0  # components actually fitted (0: no GMMC anchor)
    maha_exemplars: int = 0  # exemplars shipped (0: no Mahalanobis anchor)
    n_calibration: int = 0  # training samples held out to calibrate open-set thresholds
    lbfgs_max_evaluations: int = 125  # torch LBFGS max_eval = 1.25 x max_iter (100)
    head_fits: int = 4  # learn.train_head: 3 weight-decay candidates + the final fit
    anchor_dim: int = 0  # width of the anchors' space (features + trunk statistics); 0: feature_dim

    @property
    def anchor_width(self) -> int:
        return self.anchor_dim or self.feature_dim

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TeacherWork":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ---------------------------------------------------------------------------- formulas
def backbone_macs(n_images: int, macs_per_image: int) -> int:
    return int(n_images) * int(macs_per_image)


def head_training_macs(n: int, d: int, c: int, evaluations: int) -> int:
    """Full-batch softmax regression: each loss+gradient evaluation is a forward (n d c) and a
    weight-gradient product (n d c); the features are constants, so there is no input gradient."""
    return int(evaluations) * 2 * int(n) * int(d) * int(c)


def bb_training_macs(tail_macs_per_image: int, n_images: int, epochs: int, factor: float = 3.0) -> int:
    """Tail forward + backward per training image per epoch (the trunk is cached, never rerun)."""
    return int(factor * tail_macs_per_image * n_images * epochs)


def gmmc_fit_macs(n: int, d: int, k: int, iterations: int = 100, fits: int = 2) -> int:
    """EM for k diagonal Gaussians: ~4 n k d MACs per iteration (plus the k-means start, same order)."""
    return int(fits) * (int(iterations) + 1) * 4 * int(n) * int(k) * int(d)


def maha_fit_macs(n: int, d: int, n_exemplars: int, n_calibration: int) -> int:
    """Class means over all training features, plus threshold calibration against the own exemplars."""
    return int(n) * int(d) + int(n_calibration) * int(n_exemplars) * int(d)


def maha_student_macs(n_exemplars: int, n_class_means: int, d: int) -> int:
    """Pooled covariance of every received exemplar (n d^2), its inverse (d^3), whitened class means (C d^2)."""
    return (int(n_exemplars) + int(n_class_means)) * int(d) ** 2 + int(d) ** 3


def comm_macs(n_bytes: float, alpha: float = ALPHA_MACS_PER_BYTE) -> float:
    return float(n_bytes) * alpha


def speedup_xn(single_total: float, skill_total_per_agent: float, n_agents: int) -> float:
    """Fig. 9: total MACs of the single agent / (total MACs of one SKILL agent x N)."""
    return float(single_total) / (float(skill_total_per_agent) * int(n_agents))


@dataclass
class TeacherMacs:
    """One task's teacher MACs, split by where they went (for one mapper's anchor)."""

    backbone: int
    training: int  # head (+ BB): measured when available, else the formulas' bound
    anchor: int
    training_source: str  # "measured" or "formula"

    @property
    def total(self) -> int:
        return self.backbone + self.training + self.anchor


def teacher_macs(work: TeacherWork, mapper: str, model: MacModel = MacModel()) -> TeacherMacs:
    """Teacher MACs of one task for the row of ``mapper`` ("gmmc" or "maha")."""
    if mapper not in MAPPERS:
        raise ValueError(f"mapper must be one of {MAPPERS}, got {mapper!r}")
    bb_formula = (bb_training_macs(work.tail_macs_per_image, work.n_train, work.bb_epochs, model.bb_backward_factor)
                  if work.bb else 0)
    if work.train_macs_measured is not None:
        training, source = int(work.train_macs_measured), "measured"
    else:
        training = head_training_macs(work.n_train, work.feature_dim, work.n_classes,
                                      work.head_fits * work.lbfgs_max_evaluations) + bb_formula
        source = "formula"
    if mapper == "gmmc":
        anchor = gmmc_fit_macs(work.n_train, work.anchor_width, work.gmmc_k, model.gmmc_em_iterations,
                               model.gmmc_fits) if work.gmmc_k else 0
    else:
        anchor = maha_fit_macs(work.n_train, work.anchor_width, work.maha_exemplars, work.n_calibration)
    return TeacherMacs(backbone_macs(work.n_train, work.backbone_macs_per_image), training, anchor, source)


# ---------------------------------------------------------------------------- the table
@dataclass
class MacRow:
    """One row of the Fig. 9 table."""

    method: str  # e.g. "SKILL, w/o BB, w/ GMMC"
    setting: str  # "single" or "skill"
    mapper: str  # "gmmc" | "maha"
    bb: bool
    n_agents: int
    n_tasks: int
    teacher_macs: float  # per agent for SKILL rows
    comm_bytes: float  # per agent (what one student receives); 0 for single
    comm_macs: float
    student_macs: float
    total_macs: float
    speedup_xN: float | None = None  # SKILL rows only
    accuracy: float | None = None  # mean no-oracle accuracy of this mapper in the run
    notes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MacRow":
        return cls(**d)


def mac_table(works: Sequence[TeacherWork], *, n_agents: int, student_comm_bytes: dict[str, Sequence[float]],
              n_exemplars: int, n_class_means: int, feature_dim: int, bb: bool,
              accuracy: dict[str, float] | None = None, mappers: Iterable[str] = MAPPERS,
              model: MacModel = MacModel()) -> list[MacRow]:
    """Single-agent and SKILL rows for each mapper.

    ``student_comm_bytes[mapper]``: bytes each student received when packets carry that mapper's
    anchor (one number per student device; the row uses their mean).  ``n_exemplars`` and
    ``n_class_means``: over every task, what a Mahalanobis student pools; ``feature_dim``: the
    width of the space it pools them in (the anchors').
    """
    if n_agents < 1:
        raise ValueError("a fleet needs at least one agent")
    rows: list[MacRow] = []
    bb_txt = "w/ BB" if bb else "w/o BB"
    for mapper in mappers:
        per_task = [teacher_macs(w, mapper, model) for w in works]
        teacher_sum = float(sum(t.total for t in per_task))
        student = float(model.gmmc_student_macs if mapper == "gmmc"
                        else maha_student_macs(n_exemplars, n_class_means, feature_dim))
        single_total = teacher_sum + student
        acc = (accuracy or {}).get(mapper)
        breakdown = {"backbone": sum(t.backbone for t in per_task), "training": sum(t.training for t in per_task),
                     "anchor": sum(t.anchor for t in per_task),
                     "training_source": sorted({t.training_source for t in per_task})}
        rows.append(MacRow(f"single agent, {bb_txt}, w/ {MAPPER_TITLES[mapper]}", "single", mapper, bb, 1,
                           len(works), teacher_sum, 0.0, 0.0, student, single_total, None, acc,
                           {"teacher_breakdown": breakdown}))
        received = [float(b) for b in student_comm_bytes.get(mapper, [])]
        comm_bytes = sum(received) / len(received) if received else 0.0
        teacher = teacher_sum / n_agents
        comm = comm_macs(comm_bytes, model.alpha)
        total = teacher + comm + student
        rows.append(MacRow(f"SKILL, {bb_txt}, w/ {MAPPER_TITLES[mapper]}", "skill", mapper, bb, n_agents,
                           len(works), teacher, comm_bytes, comm, student, total,
                           speedup_xn(single_total, total, n_agents), acc,
                           {"alpha": model.alpha, "comm_bytes_per_student": received,
                            "comm_bytes_max": max(received) if received else 0.0}))
    return rows


def rows_to_dicts(rows: Sequence[MacRow]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
