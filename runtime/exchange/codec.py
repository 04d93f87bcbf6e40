"""How a ``TaskKnowledge`` is squeezed into a byte budget: per-tensor encodings and the plan ladder.

A packet's payload is not always the float32 tensors: a device with a small radio budget
sends a cheaper *plan*.  The ladder below lists plans in order of increasing loss; the
packet codec (runtime/exchange/packet.py) walks it and keeps the first plan whose real, signed,
compressed packet fits.  Every decision is recorded in ``meta.encoding`` so a receiver
knows exactly what it got.

Encodings of one tensor (``x`` is the float32 original, ``x'`` what the receiver restores):

* ``f32``      exact.
* ``f16``      IEEE half: ``|x' - x| <= max(2**-11 * |x|, 2**-25)`` for ``|x| <= 65504``.
* ``f16_log``  half precision of ``log(x)`` (variances, which are > 0 and span decades):
               ``|log x' - log x| <= max(2**-11 * |log x|, 2**-25)``.
* ``i8r``      symmetric int8 with one float32 scale per row (rows of 2-D tensors; blocks of
               ``I8_BLOCK`` values for 1-D tensors): ``s = max|row| / 127``, ``q = round(x / s)``,
               so ``|x' - x| <= s / 2 = max|row| / 254`` (plus float32 rounding).
* ``i8r_log``, ``i4r_log``  int8 codes of ``log(x)`` in ``[-L, L]`` (L = 127, 7) with a per-row
               scale *and* centre (log-variances sit far from zero, so a symmetric code would
               waste half its range): ``|log x' - log x| <= (max - min of the row's log x) / (4 L)``.
* ``i8c``, ``i4c``, ``i3c``, ``i2c``  symmetric codes in ``[-L, L]`` (L = 127, 7, 3, 1) with one
               scale per *column* (2-D tensors only), stored as float16 and rounded up so no code
               is clipped: ``|x' - x| <= s_j / 2`` with ``s_j >= max|column j| / L``.

Column scales exist because feature dimensions live on very different scales.  A head is
fitted on standardised features and folded back to raw ones (``W / sigma``), so a column of a
near-constant feature carries weights hundreds of times larger than the rest; a per-row scale
then rounds every other weight of the row to zero (on skill-bench an ``i8r`` head loses 25
points of accuracy, an ``i8c`` head none).  Anchor means have the same per-dimension spread.

Codes narrower than 8 bits are still stored one per int8: the packet's zstd stage entropy-codes
them (about 0.45 byte per value at 4 bits, 0.33 at 3, 0.2 at 2 on real features), which beats
nibble packing without a new wire type.  So the int4/int3 rungs only pay off with compression
("auto", the default, or "zstd").

Beyond precision the ladder also *reduces* the task: GMMC components are merged pairwise
(moment matching, cheapest pair by Runnalls' weighted KL bound, so mass and spread are
kept rather than dropped), Mahalanobis exemplars are thinned per class and, last, a
Mahalanobis task's class means are merged into fewer centroids (Ward's criterion; a task with
102 classes cannot otherwise send its means and head in 56 KB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from skill_edge.runtime.knowledge.records import MAX_ABS_SCORE, GmmcAnchor, MahalanobisAnchor, TaskKnowledge
from skill_edge.runtime.mapping.anchors import ThresholdCalibration
from skill_edge.runtime.mapping.mapper import OwnExemplarMetric, gmmc_task_loglik

I8_BLOCK = 64  # a 1-D tensor is quantised in blocks of this many values, each with its own scale


@dataclass(frozen=True)
class Quantizer:
    """An integer code: ``bits`` wide, one scale per row or per column; log codes (per row only)
    code ``log(x)`` around a per-row centre."""

    bits: int
    axis: str  # "row" (2-D rows, 1-D blocks) or "col" (2-D columns)
    log: bool = False

    @property
    def levels(self) -> int:
        """Codes run from -levels to +levels."""
        return 2 ** (self.bits - 1) - 1

    @property
    def side_dtype(self) -> str:
        """Row scales are few and stay float32; column scales (one per feature) are float16."""
        return "F32" if self.axis == "row" else "F16"


QUANTIZERS: dict[str, Quantizer] = {
    "i8r": Quantizer(8, "row"), "i8r_log": Quantizer(8, "row", log=True),
    "i4r_log": Quantizer(4, "row", log=True),
    "i8c": Quantizer(8, "col"), "i4c": Quantizer(4, "col"), "i3c": Quantizer(3, "col"), "i2c": Quantizer(2, "col"),
}
ENCODINGS = ("f32", "f16", "f16_log", *QUANTIZERS)
_COL = ("i8c", "i4c", "i3c", "i2c")
# which encodings each tensor may use; log encodings only for strictly positive tensors
ALLOWED_ENCODINGS: dict[str, tuple[str, ...]] = {
    "head.weight": ("f32", "f16", "i8r", *_COL),
    "head.bias": ("f32",),
    "bb": ("f32", "f16", "i8r"),
    "gmmc.means": ("f32", "f16", "i8r", *_COL),
    "gmmc.variances": ("f32", "f16_log", "i8r_log", "i4r_log"),
    "gmmc.weights": ("f32",),
    "maha.class_means": ("f32", "f16", "i8r", *_COL),
    "maha.exemplars": ("f32", "f16", "i8r", *_COL),
    "maha.exemplar_labels": ("f32",),
}
KNOWN_TENSORS = frozenset(ALLOWED_ENCODINGS)
# the rank every knowledge tensor must have (checked before TaskKnowledge sees it)
TENSOR_NDIM = {"head.weight": 2, "head.bias": 1, "bb": 1, "gmmc.means": 2, "gmmc.variances": 2,
               "gmmc.weights": 1, "maha.class_means": 2, "maha.exemplars": 2, "maha.exemplar_labels": 1}
# wire dtype (safetensors name) of the main tensor per encoding; side tensors: Quantizer.side_dtype
WIRE_DTYPE = {"f32": "F32", "f16": "F16", "f16_log": "F16", **{name: "I8" for name in QUANTIZERS}}
SCALE_SUFFIX = ".scale"
OFFSET_SUFFIX = ".offset"
PLAN_FORMAT = 1


class PlanError(ValueError):
    """An encoding plan that is malformed or does not fit the tensors it describes."""


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class EncodingPlan:
    """Everything a receiver needs to know about how a packet's tensors were encoded."""

    step: str  # ladder step name, e.g. "fp32", "int8", "int8+gmmc_k=12"
    tensors: dict[str, str]  # knowledge tensor name -> encoding (one of ENCODINGS)
    compression: str = "none"  # "zstd" or "none": how the safetensors payload is wrapped
    gmmc_k: int | None = None  # GMMC components sent (None: no GMMC)
    gmmc_k_original: int | None = None  # components the sender had before merging
    exemplars_per_class: int | None = None  # Mahalanobis exemplars per mean row sent (None: no maha)
    exemplars_per_class_original: int | None = None
    #: Mahalanobis mean rows sent when the class means were merged (``merge_class_means``); None: one
    #: per class.  Written to the wire only when set, so packets of earlier plans keep their bytes.
    maha_means: int | None = None

    @property
    def lossless(self) -> bool:
        return (all(e == "f32" for e in self.tensors.values())
                and self.gmmc_k == self.gmmc_k_original
                and self.exemplars_per_class == self.exemplars_per_class_original
                and self.maha_means is None)

    def to_dict(self) -> dict[str, Any]:
        d = {"format": PLAN_FORMAT, "step": self.step, "tensors": dict(sorted(self.tensors.items())),
             "compression": self.compression, "gmmc_k": self.gmmc_k,
             "gmmc_k_original": self.gmmc_k_original, "exemplars_per_class": self.exemplars_per_class,
             "exemplars_per_class_original": self.exemplars_per_class_original}
        if self.maha_means is not None:
            d["maha_means"] = self.maha_means
        return d

    @classmethod
    def from_dict(cls, d: Any) -> "EncodingPlan":
        """Parse an *untrusted* plan; raises ``PlanError`` naming the first bad field."""
        if not isinstance(d, dict):
            raise PlanError(f"encoding plan must be a JSON object, got {type(d).__name__}")
        expected = {"format", "step", "tensors", "compression", "gmmc_k", "gmmc_k_original",
                    "exemplars_per_class", "exemplars_per_class_original"}
        if set(d) - {"maha_means"} != expected:
            raise PlanError(f"encoding plan fields {sorted(d)} != expected {sorted(expected)} "
                            f"(plus maha_means when the class means were merged)")
        if d["format"] != PLAN_FORMAT or isinstance(d["format"], bool):
            raise PlanError(f"encoding plan format {d['format']!r} unsupported (this build reads {PLAN_FORMAT})")
        if not isinstance(d["step"], str) or not _STEP_CHARS.fullmatch(d["step"]):
            raise PlanError("encoding plan step must be a short step name (letters, digits and _+=.-; "
                            "it is shown by `packet inspect`, so nothing that could reach a terminal raw)")
        if d["compression"] not in ("zstd", "none"):
            raise PlanError(f"encoding plan compression {d['compression']!r} is not 'zstd' or 'none'")
        tensors = d["tensors"]
        if not isinstance(tensors, dict) or not tensors:
            raise PlanError("encoding plan 'tensors' must be a non-empty object")
        for name, enc in tensors.items():
            if name not in ALLOWED_ENCODINGS:
                raise PlanError(f"encoding plan names tensor {name!r}, which is not part of a task record")
            if enc not in ALLOWED_ENCODINGS[name]:
                raise PlanError(f"encoding {enc!r} is not allowed for {name} (allowed: {ALLOWED_ENCODINGS[name]})")
        counts = {}
        for key in ("gmmc_k", "gmmc_k_original", "exemplars_per_class", "exemplars_per_class_original"):
            v = d[key]
            least = 1 if key.startswith("gmmc") else 0  # a Mahalanobis anchor may carry no exemplars
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not least <= v <= 1_000_000):
                raise PlanError(f"encoding plan {key} must be null or an integer >= {least}, got {v!r}")
            counts[key] = v
        has_gmmc = "gmmc.means" in tensors
        has_maha = "maha.exemplars" in tensors
        if (counts["gmmc_k"] is None) == has_gmmc or (counts["gmmc_k_original"] is None) == has_gmmc:
            raise PlanError("encoding plan gmmc_k fields do not match whether GMMC tensors are sent")
        if (counts["exemplars_per_class"] is None) == has_maha or \
                (counts["exemplars_per_class_original"] is None) == has_maha:
            raise PlanError("encoding plan exemplar fields do not match whether Mahalanobis tensors are sent")
        if has_gmmc and counts["gmmc_k"] > counts["gmmc_k_original"]:
            raise PlanError("encoding plan claims more GMMC components than the original had")
        means = d.get("maha_means")
        if means is not None:
            if not has_maha or not isinstance(means, int) or isinstance(means, bool) or not 1 <= means <= 1_000_000:
                raise PlanError(f"encoding plan maha_means must be an integer >= 1 and comes only with "
                                f"Mahalanobis tensors, got {means!r}")
        elif has_maha and counts["exemplars_per_class"] > counts["exemplars_per_class_original"]:
            # (merged means pool their classes' exemplars, so only an unmerged plan is bound by this)
            raise PlanError("encoding plan claims more exemplars per class than the original had")
        return cls(step=d["step"], tensors=dict(tensors), compression=d["compression"], maha_means=means, **counts)

    def wire_names(self) -> dict[str, str]:
        """Every safetensors entry this plan produces -> its safetensors dtype."""
        out: dict[str, str] = {}
        for name, enc in self.tensors.items():
            out[name] = WIRE_DTYPE[enc]
            quant = QUANTIZERS.get(enc)
            if quant is not None:
                out[name + SCALE_SUFFIX] = quant.side_dtype
                if quant.log:
                    out[name + OFFSET_SUFFIX] = quant.side_dtype
        return out


# ---------------------------------------------------------------------------- one tensor


def _rows(x: np.ndarray) -> np.ndarray:
    """View a tensor as quantisation rows: 2-D rows as they are, 1-D in blocks of I8_BLOCK (zero-padded)."""
    if x.ndim == 2:
        return x
    n = x.shape[0]
    pad = (-n) % I8_BLOCK
    return np.concatenate([x, np.zeros(pad, x.dtype)]).reshape(-1, I8_BLOCK)


def n_quant_rows(shape: tuple[int, ...]) -> int:
    """How many scales a per-row (``i<b>r``) tensor of this shape carries."""
    return shape[0] if len(shape) == 2 else -(-shape[0] // I8_BLOCK)


def side_shape(encoding: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the ``.scale`` (and ``.offset``) side tensor an encoding adds to a tensor of ``shape``."""
    quant = QUANTIZERS[encoding]
    return (n_quant_rows(shape),) if quant.axis == "row" else (shape[1],)


def _f16_at_least(x: np.ndarray) -> np.ndarray:
    """float16 values >= x (x >= 0): a scale rounded *up* never pushes a code past the last level."""
    with np.errstate(over="ignore"):
        h = x.astype(np.float16)
    if not np.all(np.isfinite(h)):
        raise PlanError("scales beyond the float16 range")
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def _code_rows(x: np.ndarray, quant: Quantizer) -> np.ndarray:
    """The rows one scale each covers: 2-D rows (1-D blocks) for "row", the columns for "col"."""
    if quant.axis == "col":
        if x.ndim != 2:
            raise PlanError("per-column encodings are only defined for 2-D tensors")
        return x.T
    if quant.log and x.ndim != 2:
        raise PlanError("log encodings are only defined for 2-D tensors")
    return _rows(x)


def _quantize(x: np.ndarray, quant: Quantizer) -> dict[str, np.ndarray]:
    if quant.log and np.any(x <= 0):
        raise PlanError("log encoding needs strictly positive values")
    rows = _code_rows(np.log(x) if quant.log else x, quant)
    levels = quant.levels
    out: dict[str, np.ndarray] = {}
    if quant.log:  # per row (see Quantizer): centre and scale stay float32
        lo, hi = rows.min(axis=1), rows.max(axis=1)
        offset = ((hi + lo) / 2).astype(np.float32)
        scale = ((hi - lo) / (2.0 * levels)).astype(np.float32)
        rows = rows - offset[:, None]
        out[OFFSET_SUFFIX] = offset
    else:
        scale = (np.abs(rows).max(axis=1) / float(levels)).astype(np.float32)
    if quant.side_dtype == "F16":
        scale = _f16_at_least(scale).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(rows / safe), -levels, levels).astype(np.int8)
    q = q.T if quant.axis == "col" else q.reshape(-1)[: x.size].reshape(x.shape)
    out[SCALE_SUFFIX] = scale.astype(np.float16 if quant.side_dtype == "F16" else np.float32)
    return {"": np.ascontiguousarray(q), **out}


def _dequantize(parts: dict[str, np.ndarray], quant: Quantizer) -> np.ndarray:
    q = parts[""]
    scale = parts[SCALE_SUFFIX].astype(np.float32)
    rows = q.astype(np.float32).T if quant.axis == "col" else _rows(q.astype(np.float32))
    out = rows * scale[:, None]
    if quant.log:
        out = out + parts[OFFSET_SUFFIX].astype(np.float32)[:, None]
    out = out.T if quant.axis == "col" else out.reshape(-1)[: q.size].reshape(q.shape)
    return np.exp(out).astype(np.float32) if quant.log else out.astype(np.float32)


def encode_tensor(x: np.ndarray, encoding: str) -> dict[str, np.ndarray]:
    """float32 tensor -> the wire arrays for one encoding (main tensor first, then side tensors)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if encoding == "f32":
        return {"": x}
    if encoding == "f16":
        if np.any(np.abs(x) > np.finfo(np.float16).max):
            raise PlanError("values beyond the float16 range")
        return {"": x.astype(np.float16)}
    if encoding == "f16_log":
        if np.any(x <= 0):
            raise PlanError("log encoding needs strictly positive values")
        return {"": np.log(x).astype(np.float16)}
    if encoding in QUANTIZERS:
        return _quantize(x, QUANTIZERS[encoding])
    raise PlanError(f"unknown encoding {encoding!r}")


def decode_tensor(parts: dict[str, np.ndarray], encoding: str) -> np.ndarray:
    """Inverse of ``encode_tensor``: wire arrays (keys "", ".scale", ".offset") -> float32."""
    main = parts[""]
    with np.errstate(over="ignore", invalid="ignore"):  # non-finite results are rejected by validation
        if encoding in ("f32", "f16"):
            return main.astype(np.float32)
        if encoding == "f16_log":
            return np.exp(main.astype(np.float32))
        if encoding in QUANTIZERS:
            return _dequantize(parts, QUANTIZERS[encoding])
    raise PlanError(f"unknown encoding {encoding!r}")


# ---------------------------------------------------------------------------- reductions


def merge_gmmc(anchor: GmmcAnchor, k: int) -> GmmcAnchor:
    """Reduce a diagonal GMM to ``k`` components by greedy pairwise moment-matched merges.

    The pair merged next is the one with the smallest Runnalls cost
    ``B(i,j) = 0.5 * [(wi+wj) log|S_ij| - wi log|S_i| - wj log|S_j|]`` (an upper bound on the KL
    divergence the merge adds; it weighs both the components' mass and how far apart they are).
    Merged: ``w = wi + wj``, ``mu = (wi mu_i + wj mu_j) / w``, ``var = E[x^2] - mu^2`` written in its
    cancellation-free form ``(wi var_i + wj var_j) / w + wi wj / w^2 (mu_i - mu_j)^2``.
    """
    if not 1 <= k <= anchor.k:
        raise PlanError(f"cannot merge {anchor.k} GMMC components into {k}")
    return merge_path(anchor, k)[k]


def _moment_match(wi: float, mi: np.ndarray, vi: np.ndarray, wj: float, mj: np.ndarray,
                  vj: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    w = wi + wj
    a, b = (wi / w, wj / w) if w > 0 else (0.5, 0.5)
    return w, a * mi + b * mj, a * vi + b * vj + a * b * (mi - mj) ** 2


def merge_path(anchor: GmmcAnchor, k_min: int = 1) -> dict[int, GmmcAnchor]:
    """Every mixture on the greedy merge path from ``anchor.k`` down to ``k_min`` components.

    Greedy merging is nested (the k-1 mixture is the k mixture with one more merge), so the
    budget planner computes the path once and reads each rung from it.
    """
    means = [m.astype(np.float64) for m in anchor.means]
    var = [v.astype(np.float64) for v in anchor.variances]
    w = [float(x) for x in anchor.weights]
    logdet = [float(np.log(v).sum()) for v in var]
    alive = list(range(len(w)))

    def cost(i: int, j: int) -> float:
        wm, _, vm = _moment_match(w[i], means[i], var[i], w[j], means[j], var[j])
        return 0.5 * (wm * float(np.log(vm).sum()) - w[i] * logdet[i] - w[j] * logdet[j])

    costs = {(i, j): cost(i, j) for a, i in enumerate(alive) for j in alive[a + 1:]}

    def snapshot() -> GmmcAnchor:
        return GmmcAnchor(np.array([means[i] for i in alive], np.float32),
                          np.array([var[i] for i in alive], np.float32),
                          np.array([w[i] for i in alive], np.float32))

    path = {len(alive): snapshot()}
    while len(alive) > k_min:
        i, j = min(costs, key=costs.__getitem__)
        wm, mm, vm = _moment_match(w[i], means[i], var[i], w[j], means[j], var[j])
        new = len(w)
        w.append(wm), means.append(mm), var.append(vm), logdet.append(float(np.log(vm).sum()))
        alive = [x for x in alive if x not in (i, j)]
        costs = {p: c for p, c in costs.items() if i not in p and j not in p}
        costs.update({(x, new): cost(x, new) for x in alive})
        alive.append(new)
        path[len(alive)] = snapshot()
    return path


def exemplars_per_class(anchor: MahalanobisAnchor, num_classes: int) -> int:
    """The largest per-class exemplar count (the ladder thins every class to at most this - 1, ...)."""
    if anchor.exemplar_labels.size == 0:
        return 0
    counts = np.bincount(anchor.exemplar_labels.astype(np.int64), minlength=num_classes)
    return int(counts.max())


def thin_exemplars(anchor: MahalanobisAnchor, m: int) -> MahalanobisAnchor:
    """Keep the first ``m`` exemplars of every class (senders store them in random order)."""
    labels = anchor.exemplar_labels.astype(np.int64)
    keep = np.zeros(labels.shape, bool)
    seen: dict[int, int] = {}
    for idx, c in enumerate(labels):
        if seen.get(int(c), 0) < m:
            keep[idx] = True
            seen[int(c)] = seen.get(int(c), 0) + 1
    return MahalanobisAnchor(anchor.class_means, anchor.exemplars[keep], anchor.exemplar_labels[keep])


def class_merge_path(class_means: np.ndarray, k_min: int = 1) -> dict[int, np.ndarray]:
    """Ward's agglomerative path over a task's class means: for every ``K`` from C down to ``k_min``,
    the group (``[C]`` ints ``0..K-1``) each class belongs to.

    Each step merges the two groups whose union adds the least within-group scatter,
    ``n_i n_j / (n_i + n_j) |c_i - c_j|^2`` (every class counts once; the packet does not carry
    class sizes).  The path is nested, so the budget planner computes it once per task.
    """
    means = np.asarray(class_means, dtype=np.float64)
    c = means.shape[0]
    if not 1 <= k_min <= c:
        raise PlanError(f"cannot merge {c} class means into {k_min}")
    cent = means.copy()
    size = np.ones(c)
    group = np.arange(c)  # class -> id of the group holding it (ids are original rows, kept by the survivor)
    alive = np.ones(c, bool)
    sq = (cent * cent).sum(axis=1)
    cost = np.maximum(sq[:, None] + sq[None, :] - 2.0 * cent @ cent.T, 0.0) * 0.5  # n_i n_j/(n_i+n_j) = 1/2
    np.fill_diagonal(cost, np.inf)
    path = {c: np.arange(c)}
    for k in range(c - 1, k_min - 1, -1):
        i, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        i, j = min(i, j), max(i, j)
        n = size[i] + size[j]
        cent[i] = (size[i] * cent[i] + size[j] * cent[j]) / n
        size[i], alive[j] = n, False
        group[group == j] = i
        d2 = ((cent - cent[i]) ** 2).sum(axis=1)
        row = size * n / (size + n) * d2
        row[~alive] = np.inf
        row[i] = np.inf
        cost[i, :], cost[:, i] = row, row
        cost[j, :], cost[:, j] = np.inf, np.inf
        _, path[k] = np.unique(group, return_inverse=True)  # ids renumbered 0..k-1 in class order
    return path


def merge_class_means(anchor: MahalanobisAnchor, group: np.ndarray) -> MahalanobisAnchor:
    """The anchor with one mean row per group of classes (``group``: class -> row, ``0..K-1``).

    A row is the plain average of its classes' means.  Each exemplar moves with its class,
    ``e - mu_class + mu_row``, and is relabelled with its row: its deviation, which is all a
    student pools into the tied covariance, is unchanged.
    """
    group = np.asarray(group, dtype=np.int64)
    k = int(group.max()) + 1
    means = anchor.class_means.astype(np.float64)
    rows = np.zeros((k, means.shape[1]))
    np.add.at(rows, group, means)
    rows /= np.bincount(group, minlength=k)[:, None]
    lab = anchor.exemplar_labels.astype(np.int64)
    moved = anchor.exemplars.astype(np.float64) - means[lab] + rows[group[lab]]
    return MahalanobisAnchor(rows.astype(np.float32), moved.astype(np.float32),
                             group[lab].astype(np.float32))


#: Largest class count whose means the ladder merges (Ward's path keeps a C x C cost matrix:
#: 2,048 classes is 32 MiB); a task with more classes keeps one mean row per class.
MAX_MERGED_CLASSES = 2048


#: Draws from a task's own model that carry its open-set thresholds to a cheaper anchor.
THRESHOLD_DRAWS = 1024


def carry_maha_threshold(original: MahalanobisAnchor, sent: MahalanobisAnchor, threshold: float,
                         reference: tuple[np.ndarray, float] | None = None) -> float:
    """The open-set threshold for the anchor a receiver restores, from the one the teacher calibrated.

    The threshold is on the task's own-exemplar Mahalanobis score (``OwnExemplarMetric``), and
    that metric is estimated from the exemplars: thinned rows, merged means or 3-bit codes give
    a receiver another metric, on which the teacher's number means something else (on
    skill-bench, at 56 KB, 0.1 % of known-task images were called unknown where fp32 packets
    call 1.2 %).  The scores are squared distances, so the threshold is rescaled by
    the ratio of the mean scores, sent over original, of ``THRESHOLD_DRAWS`` draws from the
    original anchor's own Gaussian model (seeded: a packet stays a pure function of its plan).
    Quantiles cannot be matched instead: the teacher's threshold, set on real held-out images,
    lies beyond nearly every draw.  Against the threshold the sent anchor would get from those
    real images, the ratio is 0.72-1.08 of it on the skill-bench tasks at 56 KB, lowest where
    most exemplars were dropped (real deviations are not Gaussian), so a receiver errs on the
    strict side there (``benchmarks/results/packet_budget.json``, ``threshold_carry``,
    ``drawn_over_real_threshold_range``).  An encoder that has the teacher's held-out images uses
    ``recalibrate_maha_threshold`` instead (0.95-1.21); this carry is for one that does not, such as
    a stored record encoded again.  The result is
    kept within the packet's score bound: one exemplar row gives a metric with no isotropic part,
    whose distances (and carried threshold) run past 1e12; such a receiver calls every input
    unknown with either threshold.
    """
    if not np.isfinite(threshold) or original.exemplars.shape[0] < 1 or sent.exemplars.shape[0] < 1:
        return threshold
    draws, before = reference if reference is not None else threshold_reference(original)
    after = float(np.mean(OwnExemplarMetric.from_anchor(sent).scores(draws)))
    if not (before < 0 and after < 0 and np.isfinite(before) and np.isfinite(after)):
        return threshold
    return float(np.clip(threshold * (after / before), -MAX_ABS_SCORE, MAX_ABS_SCORE))


def recalibrate_maha_threshold(plan: EncodingPlan, reductions: TaskReductions,
                               calibration: ThresholdCalibration) -> float:
    """The Mahalanobis open-set threshold for the anchor ``plan`` sends, set as the teacher set its own.

    ``carry_maha_threshold`` works from draws of the anchor's own Gaussian model, and where a packet
    merges class means those draws miss how real images deviate: on skill-bench at 56 KB with both
    anchors it called 3.3 % of the tasks' own images unknown (12 % at worst) where the teacher set 1 %.
    The teacher still holds the images it calibrated on and the anchors fitted without them
    (``ThresholdCalibration``).  The plan reduces each of those anchors as it reduces the sent one
    (the task's merge groups, the same thinning and codes), and the held-out images are scored under
    the result: the same percentile, on the same images, of the anchor the receiver gets.
    Moving the sent anchor's means to the fitting part's would not do: its exemplars' deviations from
    the deployed means carry each held-out image's own offset, and a small task's threshold then
    called 17 % of its own images unknown (71 tasks, fp32).
    """
    def as_sent(anchor: MahalanobisAnchor) -> MahalanobisAnchor:
        reduced = reduce_maha(anchor, plan, reductions)
        arrays = (reduced.class_means, reduced.exemplars, reduced.exemplar_labels)
        return MahalanobisAnchor(*(decode_tensor(encode_tensor(a, plan.tensors[n]), plan.tensors[n])
                                   for n, a in zip(_MAHA_TENSORS, arrays)))

    return float(np.clip(calibration.maha_threshold(as_sent), -MAX_ABS_SCORE, MAX_ABS_SCORE))


def threshold_reference(original: MahalanobisAnchor) -> tuple[np.ndarray, float]:
    """The seeded draws from the original anchor's own model and their mean score under it: what
    ``carry_maha_threshold`` compares every cheaper anchor of the task against (computed once per walk)."""
    full = OwnExemplarMetric.from_anchor(original)
    draws = full.sample(THRESHOLD_DRAWS, np.random.default_rng(0))
    return draws, float(np.mean(full.scores(draws)))


def carry_gmmc_threshold(sent: GmmcAnchor, threshold: float, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """The GMMC open-set threshold for the mixture a receiver restores, from the one the teacher calibrated.

    The threshold is a log-likelihood under the task's own mixture.  A packet whose mixture was
    merged or coded in 3-4 bits gives the receiver another density, on which the teacher's number
    means something else.  It matters most for a record with both anchors: under 56 KB its
    mixture is merged to 1-4 components, and on skill-bench the uncarried thresholds then called
    9.7 % of the tasks' own test images unknown (44 % for one task) where the teacher set 1 %.
    The threshold is shifted by the mean change of log-likelihood, sent minus original, over
    ``THRESHOLD_DRAWS`` seeded draws from the original mixture (``gmmc_threshold_reference``):
    1.0 % of own images called unknown on average there, 3.0 % at worst (benchmarks/results/
    mapper_peers.json, ``own_images_called_unknown_by_anchor``).  Real images lie far
    below the draws, but their change follows the draws' closely enough; a median, or the
    change at the task's exemplars, did no better.  The result is kept within the packet's
    score bound.
    """
    draws, before = reference
    if not np.isfinite(threshold):
        return threshold
    shift = float(np.mean(gmmc_task_loglik(sent, draws) - before))
    if not np.isfinite(shift):
        return threshold
    return float(np.clip(threshold + shift, -MAX_ABS_SCORE, MAX_ABS_SCORE))


def gmmc_threshold_reference(original: GmmcAnchor) -> tuple[np.ndarray, np.ndarray]:
    """Seeded draws from the original mixture (components by weight) and each one's log-likelihood
    under it: what ``carry_gmmc_threshold`` compares every cheaper mixture of the task against."""
    rng = np.random.default_rng(0)
    w = original.weights.astype(np.float64)
    comp = rng.choice(original.k, size=THRESHOLD_DRAWS, p=w / w.sum())
    noise = rng.standard_normal((THRESHOLD_DRAWS, original.means.shape[1]))
    draws = (original.means[comp] + np.sqrt(original.variances[comp]) * noise).astype(np.float32)
    return draws, gmmc_task_loglik(original, draws)


def merged_means_steps(c: int, ratio: float = 0.9) -> list[int]:
    """Mean-row counts the ladder tries below C: about 10 % fewer each rung, down to 1."""
    out, k = [], float(c)
    while True:
        k *= ratio
        nxt = min(int(round(k)), (out[-1] if out else c) - 1)
        if nxt < 1:
            return out
        out.append(nxt)


# ---------------------------------------------------------------------------- the ladder


_FP32 = {n: "f32" for n in ALLOWED_ENCODINGS}
_FP16 = _FP32 | {"head.weight": "f16", "bb": "f16", "gmmc.means": "f16", "gmmc.variances": "f16_log",
                 "maha.class_means": "f16", "maha.exemplars": "f16"}
_INT8 = _FP16 | {"head.weight": "i8c", "gmmc.means": "i8r", "gmmc.variances": "i8r_log",
                 "maha.class_means": "i8r", "maha.exemplars": "i8r"}
_INT4 = _INT8 | {"head.weight": "i4c", "gmmc.means": "i4c", "gmmc.variances": "i4r_log",
                 "maha.class_means": "i4c", "maha.exemplars": "i4c"}
# int3 narrows only what a task's *selection score* does not depend on: its head and its
# exemplars (which the student pools into one covariance for every task).  Anchor means and
# variances stay at int4: their coding error lowers the task's own likelihood (by the KL
# divergence between original and coded component: ~0.5 nats per GMMC component at int8, ~12 at
# int4, ~140 with 3-bit means and ternary variances), and a budget ladder mixes precisions
# across tasks, so a task coded coarser than its neighbours would lose their shared inputs.
_INT3 = _INT4 | {"head.weight": "i3c", "maha.exemplars": "i3c"}
PRECISIONS: dict[str, dict[str, str]] = {"fp32": _FP32, "fp16": _FP16, "int8": _INT8, "int4": _INT4, "int3": _INT3}
"""Ladder precisions: the encoding of every tensor (BB stays f16 below fp32 until ``+bb_int8``)."""

_STEP_CHARS = re.compile(r"[A-Za-z0-9_+=.\-]{1,100}")  # what any step name is made of (EncodingPlan.from_dict)
_STEP_RE = re.compile(r"^(?P<precision>[a-z0-9]+)(?:\+gmmc_k=(?P<k>[1-9][0-9]{0,6}))?(?P<bb>\+bb_int8)?"
                      r"(?:\+exemplars=(?P<m>[1-9][0-9]{0,6}))?(?:\+means=(?P<means>[1-9][0-9]{0,6}))?"
                      r"(?P<head>\+head_int2)?$")


def plan_for_step(knowledge: TaskKnowledge, step: str, compression: str = "none") -> EncodingPlan:
    """The plan a step name describes, e.g. ``"int8"``, ``"int3+gmmc_k=5+exemplars=2"``.

    Grammar: a precision (``fp32``, ``fp16``, ``int8``, ``int4``, ``int3``), then optionally, in
    this order, ``+gmmc_k=K`` (merge GMMC to K < original components), ``+bb_int8``,
    ``+exemplars=M`` (M < original per class; with ``+means``, per merged row), ``+means=K``
    (merge the C Mahalanobis class means into K < C rows, ``merge_class_means``) and
    ``+head_int2`` (ternary head, ``i2c``).
    Every step name has exactly one plan, so ``PacketCodec.encode(plan="...")`` can send any of
    them, on the ladder or not.  Raises ``PlanError`` naming what does not fit this task.
    """
    m = _STEP_RE.match(step)
    if m is None or m["precision"] not in PRECISIONS:
        raise PlanError(f"no step {step!r}: a step is a precision {sorted(PRECISIONS)} optionally followed by "
                        f"+gmmc_k=K, +bb_int8, +exemplars=M, +head_int2 (in that order)")
    tensors = knowledge.tensors()
    k0 = knowledge.gmmc.k if knowledge.gmmc is not None else None
    m0 = exemplars_per_class(knowledge.maha, knowledge.num_classes) if knowledge.maha is not None else None
    k, m_ex = k0, m0
    if m["k"] is not None:
        k = int(m["k"])
        if k0 is None or not k < k0:
            raise PlanError(f"no step {step!r} for task {knowledge.task!r}: gmmc_k must be below its "
                            f"{k0 if k0 is not None else 'missing'} GMMC components")
    means = None
    if m["means"] is not None:
        means = int(m["means"])
        c0 = knowledge.maha.class_means.shape[0] if knowledge.maha is not None else None
        if c0 is None or not means < c0:
            raise PlanError(f"no step {step!r} for task {knowledge.task!r}: means must be below its "
                            f"{c0 if c0 is not None else 'missing'} Mahalanobis mean rows")
    if m["m"] is not None:
        m_ex = int(m["m"])
        if m0 is None or not (m_ex < m0 or means is not None):
            raise PlanError(f"no step {step!r} for task {knowledge.task!r}: exemplars must be below its "
                            f"{m0 if m0 is not None else 'missing'} exemplars per class")
    if m["bb"] and "bb" not in tensors:
        raise PlanError(f"no step {step!r} for task {knowledge.task!r}: it has no beneficial biases")
    enc = dict(PRECISIONS[m["precision"]])
    if m["bb"]:
        enc["bb"] = "i8r"
    if m["head"]:
        enc["head.weight"] = "i2c"
    chosen = {n: _fallback(tensors[n], enc[n]) for n in sorted(tensors)}
    return EncodingPlan(step=step, tensors=chosen, compression=compression, gmmc_k=k, gmmc_k_original=k0,
                        exemplars_per_class=m_ex, exemplars_per_class_original=m0, maha_means=means)


def ladder_steps(knowledge: TaskKnowledge, entropy_coded: bool = True) -> list[str]:
    """The ladder's step names for this task, least lossy first (see ``plan_ladder``)."""
    k0 = knowledge.gmmc.k if knowledge.gmmc is not None else None
    m0 = exemplars_per_class(knowledge.maha, knowledge.num_classes) if knowledge.maha is not None else None
    # without zstd a code narrower than 8 bits still costs a byte (plus float16 column scales)
    steps = list(PRECISIONS) if entropy_coded else ["fp32", "fp16", "int8"]
    base = steps[-1]
    if k0 is not None and k0 > 1:
        steps += [f"{base}+gmmc_k={k}" for k in range(k0 - 1, 0, -1)]
        base = f"{base}+gmmc_k=1"
    if knowledge.bb is not None:
        base += "+bb_int8"
        steps.append(base)
    if m0 is not None and m0 > 1:
        steps += [f"{base}+exemplars={m}" for m in range(m0 - 1, 0, -1)]
        base = f"{base}+exemplars=1"
    if knowledge.maha is not None and 1 < knowledge.maha.class_means.shape[0] <= MAX_MERGED_CLASSES:
        if "+exemplars=" not in base:
            base = f"{base}+exemplars=1"  # one exemplar per merged row
        counts = merged_means_steps(knowledge.maha.class_means.shape[0])
        steps += [f"{base}+means={k}" for k in counts]
        base = f"{base}+means={counts[-1]}"
    if entropy_coded:
        steps.append(base + "+head_int2")
    return steps


def plan_ladder(knowledge: TaskKnowledge, compression: str = "none", *,
                entropy_coded: bool = True) -> list[EncodingPlan]:
    """Every plan for this task, least lossy first.

    fp32 -> fp16 -> int8 (head ``i8c``, anchors ``i8r``, variances ``i8r_log``, BB f16) -> int4
    (head and means ``i4c``, variances ``i4r_log``) -> int3 (head and exemplars ``i3c``) ->
    merge GMMC components K-1, ..., 1 -> int8 BB -> exemplars per class m-1, ..., 1 -> Mahalanobis
    class means merged to about 0.9 C, 0.81 C, ..., 1 rows (one exemplar per row) -> ternary head.
    The order follows measured accuracy per byte on skill-bench (benchmarks/packet_budget.py):
    narrower codes with per-column scales cost almost nothing down to int3, while every merge
    or dropped exemplar costs task-mapper accuracy (see ``_INT3`` for why anchors stop at int4).  Steps that do not apply to this task (no
    BB, no GMMC, ...) are left out.  ``entropy_coded=False`` (packets sent without zstd) drops the
    int4/int3 rungs and the ternary head, which only shrink through zstd, and reduces at int8.
    ``compression`` is only recorded in the plans.
    """
    out: list[EncodingPlan] = []
    for step in ladder_steps(knowledge, entropy_coded):
        p = plan_for_step(knowledge, step, compression)
        # drop a rung identical to its predecessor (guards against degenerate tasks; normally none is)
        if not out or _key(out[-1]) != _key(p):
            out.append(p)
    return out


def _key(p: EncodingPlan) -> tuple:
    return (tuple(sorted(p.tensors.items())), p.gmmc_k, p.exemplars_per_class, p.maha_means)


def _fallback(x: np.ndarray, enc: str) -> str:
    """float16 cannot hold |x| > 65504 (nor a column scale that large): such a tensor stays float32."""
    f16_max = float(np.finfo(np.float16).max)
    if enc == "f16" and np.any(np.abs(x) > f16_max):
        return "f32"
    quant = QUANTIZERS.get(enc)
    if quant is not None and quant.axis == "col" and x.size and float(np.abs(x).max()) / quant.levels > f16_max:
        return "f32"
    return enc


class TaskReductions:
    """What every plan of one task reuses, computed on first need: the GMMC merge path, the class-mean
    merge path and the open-set threshold's reference draws.  A budget walk tries dozens of plans,
    each with and without zstd; without this a 102-class Mahalanobis task took 11 s to fit 56 KB."""

    def __init__(self, knowledge: TaskKnowledge) -> None:
        self.knowledge = knowledge
        self._gmmc_path: dict[int, GmmcAnchor] | None = None
        self._means_path: dict[int, np.ndarray] | None = None
        self._reference: tuple[np.ndarray, float] | None = None
        self._gmmc_reference: tuple[np.ndarray, np.ndarray] | None = None

    def gmmc(self, k: int) -> GmmcAnchor:
        if self._gmmc_path is None:
            self._gmmc_path = merge_path(self.knowledge.gmmc)
        return self._gmmc_path[k]

    def mean_groups(self, k: int) -> np.ndarray:
        """[C]: the mean row (``0..k-1``) each class joins when the task's means are merged to ``k``."""
        if self._means_path is None:
            self._means_path = class_merge_path(self.knowledge.maha.class_means)
        return self._means_path[k]

    def threshold_reference(self) -> tuple[np.ndarray, float]:
        if self._reference is None:
            self._reference = threshold_reference(self.knowledge.maha)
        return self._reference

    def gmmc_threshold_reference(self) -> tuple[np.ndarray, np.ndarray]:
        if self._gmmc_reference is None:
            self._gmmc_reference = gmmc_threshold_reference(self.knowledge.gmmc)
        return self._gmmc_reference


def apply_plan(knowledge: TaskKnowledge, plan: EncodingPlan, reductions: TaskReductions | None = None, *,
               carry: bool = True, calibration: ThresholdCalibration | None = None,
               ) -> tuple[TaskKnowledge, dict[str, np.ndarray]]:
    """The (possibly reduced) knowledge a plan sends, and its wire tensors for safetensors.

    ``carry=False`` leaves the teacher's open-set thresholds as they are: the packet then has the
    size of the real one to within a few bytes of JSON digits (``carry_thresholds`` adds them,
    from ``calibration`` where the teacher gives it).

    ``reductions`` (for this ``knowledge``) saves re-merging when many plans of one task are
    tried.  Class means are merged before exemplars are thinned, so ``exemplars_per_class`` then
    counts per merged row.
    """
    cache = reductions if reductions is not None else TaskReductions(knowledge)
    if cache.knowledge is not knowledge:
        raise PlanError("the reductions given belong to another task record")
    reduced = knowledge
    if knowledge.gmmc is not None and plan.gmmc_k is not None and plan.gmmc_k < knowledge.gmmc.k:
        reduced = replace(reduced, gmmc=cache.gmmc(plan.gmmc_k))
    maha = reduce_maha(knowledge.maha, plan, cache) if knowledge.maha is not None else None
    if maha is not knowledge.maha:
        reduced = replace(reduced, maha=maha)
    wire: dict[str, np.ndarray] = {}
    for name, arr in reduced.tensors().items():
        for suffix, part in encode_tensor(arr, plan.tensors[name]).items():
            wire[name + suffix] = part
    if carry:
        reduced = carry_thresholds(knowledge, plan, reduced, wire, cache, calibration)
    return reduced, wire


def reduce_maha(anchor: MahalanobisAnchor, plan: EncodingPlan, reductions: TaskReductions) -> MahalanobisAnchor:
    """``anchor`` (the task's, or one with its shape) with the plan's merged means and thinned exemplars;
    merge groups come from the task's own means (``reductions``), so a twin is merged as the sent anchor is."""
    if plan.maha_means is not None and plan.maha_means < anchor.class_means.shape[0]:
        anchor = merge_class_means(anchor, reductions.mean_groups(plan.maha_means))
    if plan.exemplars_per_class is not None and (
            plan.maha_means is not None or plan.exemplars_per_class < (plan.exemplars_per_class_original or 0)):
        anchor = thin_exemplars(anchor, plan.exemplars_per_class)
    return anchor


def carry_thresholds(knowledge: TaskKnowledge, plan: EncodingPlan, reduced: TaskKnowledge,
                     wire: dict[str, np.ndarray], reductions: TaskReductions,
                     calibration: ThresholdCalibration | None = None) -> TaskKnowledge:
    """``reduced`` with the open-set thresholds of the anchors a receiver restores from ``wire``
    where the plan changed them: the Mahalanobis one set again on the teacher's held-out images
    when ``calibration`` has them (``recalibrate_maha_threshold``), else carried over draws
    (``carry_maha_threshold``); the GMMC one carried (``carry_gmmc_threshold``).  A budget
    walk calls this for the rung that fits only: scoring the reference draws under every rung's
    anchors made a 16 KB walk 14x slower under qemu (aarch64_check)."""
    def received(kind: str, names: tuple[str, ...], anchor_type: type):
        """The anchor of ``kind`` as the receiver restores it, or None where the plan left it exact."""
        if getattr(knowledge, kind) is None or kind not in knowledge.thresholds:
            return None
        if getattr(reduced, kind) is getattr(knowledge, kind) and all(plan.tensors[n] == "f32" for n in names):
            return None
        restored = restore_tensors({n: v for n, v in wire.items() if n.startswith(kind + ".")},
                                   replace(plan, tensors={n: plan.tensors[n] for n in names}))
        return anchor_type(*(restored[n] for n in names))

    thresholds = dict(reduced.thresholds)
    if (maha := received("maha", _MAHA_TENSORS, MahalanobisAnchor)) is not None:
        if calibration is not None:
            check_calibration(knowledge, calibration)
            thresholds["maha"] = recalibrate_maha_threshold(plan, reductions, calibration)
        else:
            thresholds["maha"] = carry_maha_threshold(knowledge.maha, maha, knowledge.thresholds["maha"],
                                                      reductions.threshold_reference())
    if (gmmc := received("gmmc", _GMMC_TENSORS, GmmcAnchor)) is not None:
        thresholds["gmmc"] = carry_gmmc_threshold(gmmc, knowledge.thresholds["gmmc"],
                                                  reductions.gmmc_threshold_reference())
    return reduced if thresholds == reduced.thresholds else replace(reduced, thresholds=thresholds)


def check_calibration(knowledge: TaskKnowledge, calibration: ThresholdCalibration) -> None:
    """A calibration made for another task (or another anchor space) is a caller's error, not a packet's."""
    means = knowledge.maha.class_means
    for fold in calibration.folds:
        held = np.asarray(fold.held_out)
        if fold.maha.class_means.shape != means.shape or held.ndim != 2 or held.shape[1] != means.shape[1] \
                or held.shape[0] < 1:
            raise PlanError(f"the threshold calibration given for {knowledge.task!r} does not fit its Mahalanobis "
                            f"anchor ({means.shape[0]} classes x {means.shape[1]}): a fold's anchor has "
                            f"{fold.maha.class_means.shape}, its held-out features {held.shape}")
    if not calibration.folds:
        raise PlanError(f"the threshold calibration given for {knowledge.task!r} holds no fold")


_MAHA_TENSORS = ("maha.class_means", "maha.exemplars", "maha.exemplar_labels")
_GMMC_TENSORS = ("gmmc.means", "gmmc.variances", "gmmc.weights")


def restore_tensors(wire: dict[str, np.ndarray], plan: EncodingPlan) -> dict[str, np.ndarray]:
    """Wire tensors (already checked against ``plan.wire_names()``) -> float32 knowledge tensors."""
    out = {}
    for name, enc in plan.tensors.items():
        parts = {"": wire[name]}
        for suffix in (SCALE_SUFFIX, OFFSET_SUFFIX):
            if name + suffix in wire:
                parts[suffix] = wire[name + suffix]
        out[name] = decode_tensor(parts, enc)
    return out


# ---------------------------------------------------------------------------- sizes

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3}


def parse_size(text: str | int) -> int:
    """'64KB' -> 64000, '1.5MB' -> 1500000, '64KiB' -> 65536, '900' -> 900.

    KB/MB/GB are decimal (1000), KiB/MiB/GiB binary (1024), as in IEC 80000-13; case-insensitive.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"size must be positive, got {text}")
        return text
    m = _SIZE_RE.match(str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: use a number with an optional unit "
                         f"B, KB, MB, GB (x1000) or KiB, MiB, GiB (x1024), e.g. '64KB' or '1.5MiB'")
    n = int(round(float(m.group(1)) * _UNITS[unit]))
    if n <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return n


def format_size(n: int) -> str:
    """Bytes in the same decimal units ``parse_size`` reads."""
    for unit, f in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if n >= f:
            return f"{n / f:.2f} {unit}"
    return f"{n} B"
