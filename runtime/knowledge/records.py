"""What one learned task *is*: the unit a device stores in its bank and broadcasts in a packet.

A ``TaskKnowledge`` splits cleanly into JSON-able metadata and a flat dict of named
float32 arrays.  The bank stores exactly that pair on disk; the packet codec encodes
exactly that pair on the wire.  So bank records and packets map one-to-one, and
neither ever needs pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol
from urllib.parse import quote

import numpy as np

SCHEMA_VERSION = 1

#: Names of the spaces anchors live in (``TaskMeta.feature_transform``; ``anchors.transform_features``).
FEATURE_TRANSFORMS: tuple[str, ...] = ("raw", "sqrt", "l2", "sqrt_l2", "sqrt_l2_trunk")
#: Anchor spaces that append the ROM's trunk statistics to the features (``runtime.mapping.anchors``).
TRUNK_TRANSFORMS: tuple[str, ...] = ("sqrt_l2_trunk",)
#: What devices fit by default (``benchmarks/mapper_ideas.py``).
DEFAULT_TRANSFORM = "sqrt_l2_trunk"


def needs_trunk_stats(transform: str) -> bool:
    """Whether anchors of this feature transform also read ``Extraction.trunk_stats``."""
    return transform in TRUNK_TRANSFORMS


class KnowledgeError(ValueError):
    """A task record whose parts do not fit together (shapes, names, missing pieces)."""


# ---------------------------------------------------------------------------- names
#: Longest task name, label, agent id or metrics key, in characters, and once percent-encoded
#: the way the transports name a folder or an MQTT topic level (``transport.base.encode_segment``:
#: every byte outside ``A-Z a-z 0-9 _ . : @ = - ~`` becomes ``%XX``, so a non-ASCII character
#: counts 6 to 12).  Both are 200: a name that passes always fits a path segment, and its UTF-8
#: bytes (at most the encoded length) keep ``outbox/<task>-<seq>.skp`` under 255 bytes.
MAX_NAME_CHARS = 200
MAX_NAME_ENCODED = 200
_SEGMENT_SAFE = "_.:@=-"  # what encode_segment leaves as it is, besides letters, digits and ~
#: Unicode categories no name may contain: controls (NUL, ESC and so every ANSI/OSC escape),
#: format characters (bidi overrides such as U+202E, zero-width joiners), lone surrogates,
#: private-use and unassigned code points, and line/paragraph separators.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def validate_name(name: Any, what: str = "task name") -> str:
    """``name`` if it is a safe task name (or label, agent id, ...), else ``KnowledgeError`` saying why.

    One rule, applied where a name enters the device (``Device.learn``) and where it arrives
    (packet decode), so nothing stored can later break a file name, a JSON encoder or a
    terminal: 1-200 characters, also once percent-encoded for a path; printable (no character of
    ``REFUSED_CATEGORIES``); no ``/`` or ``\\``; not starting with ``.`` (so neither ``.``
    nor ``..``) and without leading or trailing white space.
    """
    if not isinstance(name, str):
        raise KnowledgeError(f"{what} must be a string, got {type(name).__name__}")
    shown = ascii(name)[:80]  # never echo the raw name: it may be the escape sequence we refuse
    if not name:
        raise KnowledgeError(f"{what} is empty")
    if len(name) > MAX_NAME_CHARS:
        raise KnowledgeError(f"{what} {shown} has {len(name)} characters; at most {MAX_NAME_CHARS} are allowed")
    try:
        encoded = len(quote(name.encode("utf-8"), safe=_SEGMENT_SAFE))
    except UnicodeEncodeError:
        raise KnowledgeError(f"{what} {shown} is not valid Unicode (it holds a lone surrogate)") from None
    if encoded > MAX_NAME_ENCODED:
        raise KnowledgeError(f"{what} {shown} is {encoded} characters once percent-encoded for a folder or MQTT "
                             f"topic; at most {MAX_NAME_ENCODED} are allowed (each byte of a character outside "
                             f"A-Z a-z 0-9 _.:@=-~ counts 3)")
    bad = next((ch for ch in name if unicodedata.category(ch) in REFUSED_CATEGORIES), None)
    if bad is not None:
        raise KnowledgeError(f"{what} {shown} holds the unprintable character U+{ord(bad):04X} "
                             f"({unicodedata.category(bad)}); control, format (bidi), surrogate, private-use "
                             f"and unassigned characters are refused")
    if "/" in name or "\\" in name:
        raise KnowledgeError(f"{what} {shown} holds a path separator ('/' or '\\')")
    if name.startswith("."):
        raise KnowledgeError(f"{what} {shown} starts with '.'")
    if name != name.strip():
        raise KnowledgeError(f"{what} {shown} starts or ends with white space")
    return name


# ---------------------------------------------------------------------------- the ROM's shape
class _ManifestLike(Protocol):
    feature_dim: int
    trunk_output_shape: list
    tail_bias_total: int
    fingerprint: str

    def tail_layout_hash(self) -> str: ...

    def bb_splits(self) -> dict[int, tuple[int, str]]: ...


@dataclass(frozen=True)
class RomShape:
    """The widths every task record must have on one ROM, read from the device's own manifest.

    A received task is checked against these, never against the bank: an empty bank knows
    no width, and a bank that took one wrong-width task would otherwise refuse every honest
    one after it (``TaskKnowledge.check_rom_shape``).
    """

    fingerprint: str
    feature_dim: int  # pooled ROM features: the head's input width
    trunk_channels: int  # C of the trunk's [N, C, h, w] map: trunk transforms append 2C statistics
    tail_bias_total: int  # length of a BB vector for the tail
    tail_layout_hash: str = ""  # what ``meta.bb_layout_hash`` must say for BB tasks ("" = not checked)
    #: BB split point -> (bias values, layout hash) for every split this ROM can rerun (issue 16);
    #: empty: only the tail (``tail_bias_total`` / ``tail_layout_hash``)
    bb_splits: tuple[tuple[int, int, str], ...] = ()

    @classmethod
    def from_manifest(cls, manifest: _ManifestLike) -> "RomShape":
        """The shape of a ROM (``export.manifest.RomManifest``, e.g. ``RomEngine.manifest``)."""
        splits = getattr(manifest, "bb_splits", None)
        return cls(str(manifest.fingerprint), int(manifest.feature_dim), int(manifest.trunk_output_shape[1]),
                   int(manifest.tail_bias_total), manifest.tail_layout_hash(),
                   tuple((int(s), int(n), str(h)) for s, (n, h) in sorted(splits().items())) if splits else ())

    def bb_slot(self, split: int) -> tuple[int, str] | None:
        """(bias values, layout hash) of a BB split point (-1: the tail, as before issue 16), None if this
        ROM has no such split."""
        if split < 0:
            return self.tail_bias_total, self.tail_layout_hash
        for s, n, h in self.bb_splits:
            if s == split:
                return n, h
        return None

    def anchor_dim(self, transform: str) -> int:
        """Width of the anchors of ``transform`` on this ROM: the features, plus 2C trunk statistics."""
        return self.feature_dim + (2 * self.trunk_channels if needs_trunk_stats(transform) else 0)


# ---------------------------------------------------------------------------- numeric bounds
#: Bounds on what a task record may hold (docs/PACKET.md, "What a receiver refuses").  They are
#: orders of magnitude beyond any honest task (anchors live in L2-normalised or ReLU feature
#: spaces; heads fold a standardisation with std + 1e-6 into W), and tight enough that a mapper's
#: float32 scores and a head's logits stay finite for any input the ROM can produce.
MAX_ABS_ANCHOR = 1e4  # gmmc.means, maha.class_means, maha.exemplars
MAX_ABS_HEAD = 1e12  # head.weight, head.bias
MAX_ABS_BB = 1e4  # beneficial biases
MAX_ABS_GMMC_WEIGHT = 1e12  # gmmc.weights (that they form a distribution is the plausibility check's job)
VARIANCE_RANGE = (1e-20, 1e8)  # gmmc.variances: a needle of 1e-45 overflows 1 / var in float32
MAX_ABS_SCORE = 1e12  # open-set thresholds and metrics
CREATED_RANGE = (0.0, 253402300799.0)  # unix time up to 9999-12-31T23:59:59Z, the last one datetime shows
MAX_COUNT = 10**12  # n_train
MAX_CLASSES = 10_000
MAX_GMMC_COMPONENTS = 10_000
_VALUE_BOUNDS = {"head.weight": MAX_ABS_HEAD, "head.bias": MAX_ABS_HEAD, "bb": MAX_ABS_BB,
                 "gmmc.means": MAX_ABS_ANCHOR, "gmmc.weights": MAX_ABS_GMMC_WEIGHT,
                 "maha.class_means": MAX_ABS_ANCHOR, "maha.exemplars": MAX_ABS_ANCHOR}


def bounded_number(v: Any, lo: float, hi: float) -> bool:
    """Whether ``v`` is a real number (not bool) in ``[lo, hi]``; arbitrarily large ints are compared
    exactly, so a 400-digit JSON integer is refused instead of raising ``OverflowError``."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        return False
    if isinstance(v, (float, np.floating)) and not math.isfinite(v):
        return False
    return bool(lo <= v <= hi)


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
    """Class means plus m exemplar features per class; students pool exemplars into a tied covariance.

    A packet squeezed under a byte budget may carry fewer mean rows than the task has classes
    (``runtime.exchange.codec.merge_class_means``): each row is then the centroid of a group of
    classes, and the exemplars are labelled with their row.  The mapper only needs a task's
    best row; class labels come from the head."""

    class_means: np.ndarray  # [K, D], K = C unless merged (1 <= K <= C)
    exemplars: np.ndarray  # [K*m, D]
    exemplar_labels: np.ndarray  # [K*m] int row indices into class_means (stored as float32 on the wire)


@dataclass
class TaskMeta:
    agent_id: str = ""
    seq: int = 0
    created: float = field(default_factory=time.time)
    rom_fingerprint: str = ""
    bb_layout_hash: str = ""  # sha256 of the tail bias layout the bb vector is for ("" when no BB)
    #: first ROM stage whose biases ``bb`` holds (issue 16): the tail split, an earlier stage, 0 for the
    #: whole network; -1: no BB, or a record from before split points (then ``bb`` is the tail's)
    bb_split: int = -1
    feature_transform: str = "raw"  # the space the anchors live in, see runtime.features.transform_features
    n_train: int = 0
    source: str = ""  # where it came from: "learned:<dir>", "packet:<sha256>", ...
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. val accuracy, with/without BB
    encoding: dict[str, Any] = field(default_factory=dict)  # the packet codec's plan, when decoded from one


def _meta_dict(meta: "TaskMeta") -> dict[str, Any]:
    """``TaskMeta`` as JSON, leaving out fields added after records were first written while they hold
    their default: a bank or packet written before ``bb_split`` existed must keep the exact metadata
    (and so the digest) it was stored under, or an upgraded device would call its own bank corrupt."""
    d = asdict(meta)
    if d.get("bb_split") == -1:
        del d["bb_split"]
    return d


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
        """Check that the parts fit together and stay within the documented bounds; returns ``self``.

        Run on every record a device creates or receives (``from_parts``, so at packet decode
        and bank read), so that nothing in the bank can later crash a mapper, a head or a
        listing: names (``validate_name``), counts, shapes, finite values within ``_VALUE_BOUNDS``,
        variances within ``VARIANCE_RANGE``, thresholds, metrics and ``created`` within their
        ranges.  Widths against the device's own ROM are ``check_rom_shape``.
        """
        c, d = self.num_classes, self.head_weight.shape[-1] if self.head_weight.ndim == 2 else -1
        validate_name(self.task)
        if c < 2:
            raise KnowledgeError(f"task {self.task!r} has {c} class(es); a task needs at least 2")
        if c > MAX_CLASSES:
            raise KnowledgeError(f"task {self.task!r} has {c} classes; at most {MAX_CLASSES} are allowed")
        for label in self.labels:
            validate_name(label, "class label")
        if len(set(self.labels)) != c:
            raise KnowledgeError(f"task {self.task!r} has duplicate labels")
        self._validate_meta()
        if self.head_weight.shape != (c, d) or self.head_bias.shape != (c,):
            raise KnowledgeError(
                f"head shapes {self.head_weight.shape}/{self.head_bias.shape} do not fit {c} classes"
            )
        if d < 1:
            raise KnowledgeError(f"task {self.task!r}: the head reads {d} features")
        if self.bb is not None and (self.bb.ndim != 1 or self.bb.size == 0):
            raise KnowledgeError(f"beneficial biases must be a non-empty vector, got shape {self.bb.shape}")
        if self.bb is None and int(self.meta.bb_split) != -1:
            raise KnowledgeError(f"meta.bb_split is {self.meta.bb_split} but the task carries no beneficial biases")
        a = self._check_anchor_dim(d)  # the anchors' width: d, or d + 2C for trunk transforms
        if self.gmmc is not None:
            g = self.gmmc
            k = g.means.shape[0]
            if g.means.shape != (k, a) or g.variances.shape != (k, a) or g.weights.shape != (k,):
                raise KnowledgeError("GMMC anchor shapes are inconsistent")
            if not 1 <= k <= MAX_GMMC_COMPONENTS:
                raise KnowledgeError(f"a GMMC anchor needs 1 to {MAX_GMMC_COMPONENTS} components, got {k}")
            lo, hi = VARIANCE_RANGE
            v = g.variances
            if not np.all(np.isfinite(v)) or np.any(v < lo) or np.any(v > hi):
                raise KnowledgeError(f"GMMC variances must be finite and within [{lo:g}, {hi:g}]; they span "
                                     f"{np.nanmin(v):.3g} .. {np.nanmax(v):.3g}")
        if self.maha is not None:
            m = self.maha
            rows = m.class_means.shape[0] if m.class_means.ndim == 2 else -1
            if m.class_means.shape != (rows, a) or not 1 <= rows <= c or m.exemplars.ndim != 2 \
                    or m.exemplars.shape[1] != a:
                raise KnowledgeError("Mahalanobis anchor shapes are inconsistent (it needs 1 to C mean rows "
                                     "of the anchors' width)")
            if m.exemplar_labels.shape != (m.exemplars.shape[0],):
                raise KnowledgeError("Mahalanobis exemplar labels do not match exemplars")
            if m.exemplars.shape[0] < 1:
                raise KnowledgeError("a Mahalanobis anchor needs at least one exemplar row: students pool "
                                     "exemplars into their covariance")
            lab = m.exemplar_labels
            if lab.size and (lab.min() < 0 or lab.max() >= rows or np.any(lab != np.round(lab))):
                raise KnowledgeError("Mahalanobis exemplar labels out of range")
        for name, arr in self.tensors().items():
            if not np.all(np.isfinite(arr)):
                raise KnowledgeError(f"tensor {name} holds non-finite values")
            bound = _VALUE_BOUNDS.get(name)
            if bound is not None and arr.size and float(np.abs(arr).max()) > bound:
                raise KnowledgeError(f"tensor {name} holds a value of magnitude {float(np.abs(arr).max()):.3g}; "
                                     f"the limit is {bound:g}")
        return self

    def _validate_meta(self) -> None:
        """Thresholds, metrics, ``created``, counts and identity fields within their documented ranges."""
        m = self.meta
        if m.feature_transform not in FEATURE_TRANSFORMS:
            raise KnowledgeError(f"unknown feature transform {ascii(m.feature_transform)[:60]} "
                                 f"(known: {', '.join(FEATURE_TRANSFORMS)})")
        if m.agent_id:
            validate_name(m.agent_id, "agent id")
        if not bounded_number(m.created, *CREATED_RANGE):
            raise KnowledgeError(f"created = {str(m.created)[:40]} is not a unix time within "
                                 f"[{CREATED_RANGE[0]:.0f}, {CREATED_RANGE[1]:.0f}] (years 1970-9999)")
        if not bounded_number(m.n_train, 0, MAX_COUNT) or int(m.n_train) != m.n_train:
            raise KnowledgeError(f"n_train = {str(m.n_train)[:40]} is not an integer within [0, {MAX_COUNT}]")
        for what, values in (("open-set threshold", self.thresholds), ("metric", m.metrics)):
            for key, v in values.items():
                validate_name(key, f"{what} name")
                # a learned task may note a NaN metric (it is only shown); packets carry finite ones
                nan_ok = what == "metric" and isinstance(v, (float, np.floating)) and math.isnan(v)
                if not nan_ok and not bounded_number(v, -MAX_ABS_SCORE, MAX_ABS_SCORE):
                    raise KnowledgeError(f"{what} {key!r} = {str(v)[:40]} is not a finite number within "
                                         f"+-{MAX_ABS_SCORE:g}")

    def check_rom_shape(self, rom: RomShape) -> "TaskKnowledge":
        """Raise ``KnowledgeError`` unless every width fits the device's ROM (``RomShape``); returns ``self``.

        The head must read ``rom.feature_dim`` features, the anchors must be as wide as
        ``rom.anchor_dim(transform)`` and beneficial biases must fill the tail's
        ``rom.tail_bias_total`` slots, for the layout ``rom.tail_layout_hash`` names.
        """
        if self.feature_dim != rom.feature_dim:
            raise KnowledgeError(f"task {self.task!r}: its head reads {self.feature_dim} features, this "
                                 f"device's ROM gives {rom.feature_dim}")
        want = rom.anchor_dim(self.meta.feature_transform)
        if self.anchor_dim is not None and self.anchor_dim != want:
            raise KnowledgeError(f"task {self.task!r}: its {self.meta.feature_transform!r} anchors are "
                                 f"{self.anchor_dim} wide, on this device's ROM they are {want} wide")
        if self.bb is not None:
            split = int(self.meta.bb_split)
            slot = rom.bb_slot(split)
            where = "tail" if split < 0 else f"stages from split point {split}"
            if slot is None:
                raise KnowledgeError(f"task {self.task!r}: its beneficial biases start at stage {split}, which "
                                     f"this device's ROM has no split point for")
            total, layout_hash = slot
            if self.bb.shape != (total,):
                raise KnowledgeError(f"task {self.task!r}: it carries {self.bb.size} beneficial biases, this "
                                     f"device's ROM {where} has {total} bias slots")
            if layout_hash and self.meta.bb_layout_hash != layout_hash:
                raise KnowledgeError(f"task {self.task!r}: its beneficial biases are for {where} layout "
                                     f"{self.meta.bb_layout_hash[:16]}..., this device's ROM has "
                                     f"{layout_hash[:16]}...")
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
            "meta": _meta_dict(self.meta),
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
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise KnowledgeError(f"incomplete task record: {type(exc).__name__}: {exc}") from exc
        return k.validate()

    def content_hash(self, *, explicit_bb_split: bool = False) -> str:
        """sha256 over metadata (minus provenance) and tensors: equal knowledge, equal hash.

        ``explicit_bb_split``: hash ``bb_split: -1`` as written out, the form records stored between
        commits 9ba21d9 and d71284f were indexed under (``_meta_dict`` leaves the default out, as
        every record before them did); a bank accepts either."""
        h = hashlib.sha256()
        md = self.metadata()
        md["meta"] = {k: v for k, v in md["meta"].items() if k not in ("source", "encoding")}
        if explicit_bb_split:
            md["meta"].setdefault("bb_split", int(self.meta.bb_split))
        h.update(json.dumps(md, sort_keys=True).encode())
        for name, arr in sorted(self.tensors().items()):
            h.update(name.encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tensors().values())
