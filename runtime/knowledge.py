"""What one learned task *is*: the unit a device stores in its bank and broadcasts in a packet.

A ``TaskKnowledge`` splits cleanly into JSON-able metadata and a flat dict of named
float32 arrays.  The bank stores exactly that pair on disk; the packet codec encodes
exactly that pair on the wire.  So bank records and packets map one-to-one, and
neither ever needs pickle.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

#: Names of the spaces anchors live in (``TaskMeta.feature_transform``; ``anchors.transform_features``).
FEATURE_TRANSFORMS: tuple[str, ...] = ("raw", "sqrt", "l2", "sqrt_l2", "sqrt_l2_trunk")
#: Anchor spaces that append the ROM's trunk statistics to the features (``runtime.anchors``).
TRUNK_TRANSFORMS: tuple[str, ...] = ("sqrt_l2_trunk",)
#: What devices fit by default (``benchmarks/mapper_ideas.py``).
DEFAULT_TRANSFORM = "sqrt_l2_trunk"


def needs_trunk_stats(transform: str) -> bool:
    """Whether anchors of this feature transform also read ``Extraction.trunk_stats``."""
    return transform in TRUNK_TRANSFORMS


class KnowledgeError(ValueError):
    """A task record whose parts do not fit together (shapes, names, missing pieces)."""


@dataclass
class GmmcAnchor:
    """k diagonal Gaussians over the task's (transformed) training features."""

    means: np.ndarray  # [K, D]
    variances: np.ndarray  # [K, D]
    weights: np.ndarray  # [K], sums to 1

    @property
    def k(self) -> int:
        return int(self.means.shape[0])


@dataclass
class MahalanobisAnchor:
    """Class means plus m exemplar features per class; students pool exemplars into a tied covariance."""

    class_means: np.ndarray  # [C, D]
    exemplars: np.ndarray  # [C*m, D]
    exemplar_labels: np.ndarray  # [C*m] int class indices (stored as float32 on the wire)


@dataclass
class TaskMeta:
    agent_id: str = ""
    seq: int = 0
    created: float = field(default_factory=time.time)
    rom_fingerprint: str = ""
    bb_layout_hash: str = ""  # sha256 of the tail bias layout the bb vector is for ("" when no BB)
    feature_transform: str = "raw"  # the space the anchors live in, see runtime.features.transform_features
    n_train: int = 0
    source: str = ""  # where it came from: "learned:<dir>", "packet:<sha256>", ...
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. val accuracy, with/without BB
    encoding: dict[str, Any] = field(default_factory=dict)  # the packet codec's plan, when decoded from one


@dataclass
class TaskKnowledge:
    task: str
    labels: list[str]
    head_weight: np.ndarray  # [C, D]
    head_bias: np.ndarray  # [C]
    meta: TaskMeta = field(default_factory=TaskMeta)
    bb: np.ndarray | None = None  # [B_tail] beneficial biases for the ROM tail, or None
    gmmc: GmmcAnchor | None = None
    maha: MahalanobisAnchor | None = None
    thresholds: dict[str, float] = field(default_factory=dict)  # open-set score threshold per mapper kind

    # ------------------------------------------------------------------ checks
    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def feature_dim(self) -> int:
        """Width of the ROM features the head reads."""
        return int(self.head_weight.shape[1])

    @property
    def anchor_dim(self) -> int | None:
        """Width of the space the anchors live in (``meta.feature_transform``), None without anchors."""
        a = self.gmmc.means if self.gmmc is not None else self.maha.class_means if self.maha is not None else None
        return int(a.shape[-1]) if a is not None else None

    def _check_anchor_dim(self, d: int) -> int:
        """The width the anchors must have, given the head's ``d`` and the transform (raises if theirs does not fit)."""
        a = self.anchor_dim
        if a is None:
            return d
        if needs_trunk_stats(self.meta.feature_transform):
            if a <= d or (a - d) % 2:
                raise KnowledgeError(f"anchors of transform {self.meta.feature_transform!r} must be wider than the "
                                     f"head's {d} features by 2C trunk statistics, got width {a}")
        elif a != d:
            raise KnowledgeError(f"anchors of transform {self.meta.feature_transform!r} must have the head's "
                                 f"width {d}, got {a}")
        return a

    def validate(self) -> "TaskKnowledge":
        c, d = self.num_classes, self.head_weight.shape[-1] if self.head_weight.ndim == 2 else -1
        if not self.task or "/" in self.task or self.task.startswith("."):
            raise KnowledgeError(f"bad task name {self.task!r}")
        if c < 2:
            raise KnowledgeError(f"task {self.task!r} has {c} class(es); a task needs at least 2")
        if len(set(self.labels)) != c:
            raise KnowledgeError(f"task {self.task!r} has duplicate labels")
        if self.head_weight.shape != (c, d) or self.head_bias.shape != (c,):
            raise KnowledgeError(
                f"head shapes {self.head_weight.shape}/{self.head_bias.shape} do not fit {c} classes"
            )
        a = self._check_anchor_dim(d)  # the anchors' width: d, or d + 2C for trunk transforms
        if self.gmmc is not None:
            g = self.gmmc
            k = g.means.shape[0]
            if g.means.shape != (k, a) or g.variances.shape != (k, a) or g.weights.shape != (k,):
                raise KnowledgeError("GMMC anchor shapes are inconsistent")
            if not np.all(np.isfinite(g.variances)) or np.any(g.variances <= 0):
                raise KnowledgeError("GMMC variances must be finite and positive")
        if self.maha is not None:
            m = self.maha
            if m.class_means.shape != (c, a) or m.exemplars.ndim != 2 or m.exemplars.shape[1] != a:
                raise KnowledgeError("Mahalanobis anchor shapes are inconsistent")
            if m.exemplar_labels.shape != (m.exemplars.shape[0],):
                raise KnowledgeError("Mahalanobis exemplar labels do not match exemplars")
            lab = m.exemplar_labels
            if lab.size and (lab.min() < 0 or lab.max() >= c or np.any(lab != np.round(lab))):
                raise KnowledgeError("Mahalanobis exemplar labels out of range")
        for name, arr in self.tensors().items():
            if not np.all(np.isfinite(arr)):
                raise KnowledgeError(f"tensor {name} holds non-finite values")
        return self

    # ------------------------------------------------------------------ (de)serialisation
    def tensors(self) -> dict[str, np.ndarray]:
        """Flat, named float32 arrays: the payload both the bank and packets store."""
        out = {"head.weight": self.head_weight, "head.bias": self.head_bias}
        if self.bb is not None:
            out["bb"] = self.bb
        if self.gmmc is not None:
            out |= {"gmmc.means": self.gmmc.means, "gmmc.variances": self.gmmc.variances,
                    "gmmc.weights": self.gmmc.weights}
        if self.maha is not None:
            out |= {"maha.class_means": self.maha.class_means, "maha.exemplars": self.maha.exemplars,
                    "maha.exemplar_labels": self.maha.exemplar_labels}
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        """JSON-able description of everything that is not a tensor."""
        return {
            "schema": SCHEMA_VERSION,
            "task": self.task,
            "labels": list(self.labels),
            "thresholds": {k: float(v) for k, v in self.thresholds.items()},
            "meta": asdict(self.meta),
        }

    @classmethod
    def from_parts(cls, metadata: dict[str, Any], tensors: dict[str, np.ndarray]) -> "TaskKnowledge":
        """Inverse of ``metadata()`` + ``tensors()``; raises ``KnowledgeError`` on anything inconsistent."""
        try:
            if metadata.get("schema") != SCHEMA_VERSION:
                raise KnowledgeError(f"unsupported knowledge schema {metadata.get('schema')!r}")
            known = set(TaskMeta.__dataclass_fields__)
            meta = TaskMeta(**{k: v for k, v in dict(metadata.get("meta", {})).items() if k in known})
            t = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
            allowed = {"head.weight", "head.bias", "bb", "gmmc.means", "gmmc.variances", "gmmc.weights",
                       "maha.class_means", "maha.exemplars", "maha.exemplar_labels"}
            extra = set(t) - allowed
            if extra:
                raise KnowledgeError(f"unknown tensors {sorted(extra)}")
            gmmc = maha = None
            if any(k.startswith("gmmc.") for k in t):
                gmmc = GmmcAnchor(t["gmmc.means"], t["gmmc.variances"], t["gmmc.weights"])
            if any(k.startswith("maha.") for k in t):
                maha = MahalanobisAnchor(t["maha.class_means"], t["maha.exemplars"],
                                         t["maha.exemplar_labels"])
            k = cls(
                task=str(metadata["task"]),
                labels=[str(x) for x in metadata["labels"]],
                head_weight=t["head.weight"],
                head_bias=t["head.bias"],
                meta=meta,
                bb=t.get("bb"),
                gmmc=gmmc,
                maha=maha,
                thresholds={str(a): float(b) for a, b in dict(metadata.get("thresholds", {})).items()},
            )
        except KnowledgeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise KnowledgeError(f"incomplete task record: {type(exc).__name__}: {exc}") from exc
        return k.validate()

    def content_hash(self) -> str:
        """sha256 over metadata (minus provenance) and tensors: equal knowledge, equal hash."""
        h = hashlib.sha256()
        md = self.metadata()
        md["meta"] = {k: v for k, v in md["meta"].items() if k not in ("source", "encoding")}
        h.update(json.dumps(md, sort_keys=True).encode())
        for name, arr in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors().values())
