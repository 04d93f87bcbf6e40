"""Knowledge packets, format v1: one signed, self-describing file per learned task.

Byte layout (all integers little-endian; full description in docs/PACKET.md)::

    offset  size  field
    0       4     magic b"SKPK"
    4       1     format version = 1
    5       1     flags: bit0 payload is zstd-compressed, bit1 packet is signed; other bits 0
    6       2     reserved = 0
    8       4     M = metadata length (uint32)
    12      4     P = payload length on the wire (uint32)
    16      4     R = payload length after decompression (uint32; == P when not compressed)
    20      M     metadata: UTF-8 JSON, ``TaskKnowledge.metadata()`` with ``meta.encoding`` = the plan
    20+M    P     payload: safetensors bytes (zstd frame of them when bit0 is set)
    if signed:
    20+M+P  8     signer key id (first 8 bytes of sha256 of the raw Ed25519 public key)
    28+M+P  64    Ed25519 signature over bytes [0, 28+M+P)

Everything from the wire is hostile until proven otherwise: every length is checked
against the bytes present and against the MAX_* limits before anything is sliced,
decompressed or parsed; the signature is verified (when a trust store is given) before
the metadata or payload is interpreted; the safetensors header is parsed and checked
here before the ``safetensors`` package sees it.  Every defect raises ``PacketError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from skill_edge.runtime.exchange.codec import (
    TENSOR_NDIM,
    EncodingPlan,
    PlanError,
    TaskReductions,
    ThresholdCalibration,
    apply_plan,
    carry_thresholds,
    format_size,
    parse_size,
    plan_for_step,
    plan_ladder,
    restore_tensors,
    side_shape,
)
from skill_edge.runtime.exchange.keys import KEY_ID_BYTES, DeviceKey, TrustStore, TrustedKey
from skill_edge.runtime.knowledge.records import (
    CREATED_RANGE,
    FEATURE_TRANSFORMS,
    MAX_ABS_SCORE,
    MAX_CLASSES,
    MAX_COUNT,
    SCHEMA_VERSION,
    KnowledgeError,
    TaskKnowledge,
    TaskMeta,
    bounded_number,
    validate_name,
)

MAGIC = b"SKPK"
FORMAT_VERSION = 1
FLAG_ZSTD = 0x01
FLAG_SIGNED = 0x02
_KNOWN_FLAGS = FLAG_ZSTD | FLAG_SIGNED
HEADER = struct.Struct("<4sBBHIII")  # magic, version, flags, reserved, M, P, R
HEADER_BYTES = HEADER.size  # 20
SIGNATURE_BYTES = 64
TRAILER_BYTES = KEY_ID_BYTES + SIGNATURE_BYTES  # 72

#: How much a packet sized with the teacher's open-set thresholds may exceed the budget and still be
#: re-encoded with the carried ones: a threshold is a JSON float (up to 24 characters), and zstd
#: may spend a few bytes more on other digits.
THRESHOLD_DIGITS_SLACK = 64
MAX_PACKET_BYTES = 64 * 1024 * 1024  # a 300-class Mahalanobis task at fp32 is ~17 MB
MAX_META_BYTES = 1024 * 1024
MAX_PAYLOAD_BYTES = 128 * 1024 * 1024  # decompressed safetensors bytes
MAX_TENSOR_HEADER_BYTES = 64 * 1024  # the safetensors JSON header
MAX_TENSOR_RANK = 4
ZSTD_DEFAULT_LEVEL = 9

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_LAYOUT_HASH = re.compile(r"^[0-9a-f]{32}(?:[0-9a-f]{32})?$")  # RomManifest.tail_layout_hash() is 32 hex digits
_ST_ITEMSIZE = {"F32": 4, "F16": 2, "I8": 1}


class PacketError(ValueError):
    """A packet that cannot be trusted or understood.  ``code`` is a short machine-readable
    category (e.g. "truncated", "bad-signature", "unknown-signer"); ``str(err)`` says what to do."""

    def __init__(self, reason: str, code: str = "malformed") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class BudgetError(PacketError):
    """No plan fits the byte budget; ``smallest_bytes`` is the best the ladder can do."""

    def __init__(self, budget_bytes: int, smallest_bytes: int, smallest_step: str) -> None:
        super().__init__(
            f"cannot fit the task into {budget_bytes} bytes ({format_size(budget_bytes)}): the smallest "
            f"encoding ({smallest_step!r}) is {smallest_bytes} bytes ({format_size(smallest_bytes)}); "
            f"raise the budget to at least that", code="over-budget")
        self.budget_bytes = budget_bytes
        self.smallest_bytes = smallest_bytes
        self.smallest_step = smallest_step


# ---------------------------------------------------------------------------- data records


@dataclass(frozen=True)
class WireTensor:
    """One safetensors entry as it travelled (for inspection)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class Frame:
    """The raw sections of a packet, lengths checked, contents not yet interpreted."""

    version: int
    flags: int
    metadata: bytes
    payload: bytes
    payload_raw_len: int
    signed_part: bytes  # bytes the signature covers (header .. key id)
    key_id: bytes | None
    signature: bytes | None

    @property
    def compressed(self) -> bool:
        return bool(self.flags & FLAG_ZSTD)

    @property
    def signed(self) -> bool:
        return bool(self.flags & FLAG_SIGNED)


@dataclass(frozen=True)
class Packet:
    """A decoded packet: its header fields, the knowledge it carries and who signed it."""

    version: int
    task: str
    labels: list[str]
    agent_id: str
    seq: int
    created: float
    rom_fingerprint: str
    bb_layout_hash: str
    plan: EncodingPlan
    knowledge: TaskKnowledge
    signer: str | None  # key id (16 hex chars) from the trailer; None when unsigned
    signature: bytes | None
    verified_by: str | None  # trust-store name whose key verified the signature; None when not checked
    raw_size: int
    sha256: str  # of the whole packet: the identity used for duplicate detection
    metadata_bytes: int
    payload_bytes: int  # on the wire
    payload_raw_bytes: int  # after decompression
    wire_tensors: tuple[WireTensor, ...]

    @property
    def compressed(self) -> bool:
        return self.plan.compression == "zstd"


# ---------------------------------------------------------------------------- framing


def parse_frame(data: bytes) -> Frame:
    """Split a packet into its sections, checking every length before slicing."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PacketError(f"a packet is bytes, got {type(data).__name__}", "malformed")
    data = bytes(data)
    n = len(data)
    if n > MAX_PACKET_BYTES:
        raise PacketError(f"oversized: packet is {n} bytes, the limit is {MAX_PACKET_BYTES}", "oversized")
    if n < HEADER_BYTES:
        raise PacketError(f"truncated: {n} bytes is shorter than the {HEADER_BYTES}-byte header", "truncated")
    magic, version, flags, reserved, m_len, p_len, r_len = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise PacketError(f"not a skill-edge packet: magic is {magic!r}, expected {MAGIC!r}", "bad-magic")
    if version != FORMAT_VERSION:
        raise PacketError(f"unsupported packet format version {version}; this device reads version "
                          f"{FORMAT_VERSION} (update skill-edge or ask the sender for v{FORMAT_VERSION})",
                          "bad-version")
    if flags & ~_KNOWN_FLAGS:
        raise PacketError(f"unknown header flags 0x{flags:02x} (known: 0x{_KNOWN_FLAGS:02x})", "malformed")
    if reserved != 0:
        raise PacketError(f"reserved header bytes are 0x{reserved:04x}, must be 0", "malformed")
    if m_len > MAX_META_BYTES:
        raise PacketError(f"oversized: header declares {m_len} bytes of metadata, the limit is "
                          f"{MAX_META_BYTES}", "oversized")
    if p_len > MAX_PACKET_BYTES:
        raise PacketError(f"oversized: header declares {p_len} bytes of payload, the limit is "
                          f"{MAX_PACKET_BYTES}", "oversized")
    if r_len > MAX_PAYLOAD_BYTES:
        raise PacketError(f"oversized: header declares {r_len} bytes of decompressed payload, the limit is "
                          f"{MAX_PAYLOAD_BYTES}", "oversized")
    if not flags & FLAG_ZSTD and r_len != p_len:
        raise PacketError(f"uncompressed payload but header says {p_len} bytes on the wire and {r_len} "
                          f"decompressed", "malformed")
    pos = HEADER_BYTES
    if m_len > n - pos:
        raise PacketError(f"truncated: header says {m_len} bytes of metadata, {n - pos} remain", "truncated")
    metadata = data[pos:pos + m_len]
    pos += m_len
    if p_len > n - pos:
        raise PacketError(f"truncated: header says {p_len} bytes of payload, {n - pos} remain", "truncated")
    payload = data[pos:pos + p_len]
    pos += p_len
    key_id = signature = None
    signed_part = data[:pos]
    if flags & FLAG_SIGNED:
        if TRAILER_BYTES > n - pos:
            raise PacketError(f"truncated: the signature block needs {TRAILER_BYTES} bytes, {n - pos} remain",
                              "truncated")
        key_id = data[pos:pos + KEY_ID_BYTES]
        signed_part = data[:pos + KEY_ID_BYTES]
        signature = data[pos + KEY_ID_BYTES:pos + TRAILER_BYTES]
        pos += TRAILER_BYTES
    if pos != n:
        raise PacketError(f"trailing bytes: the packet ends at byte {pos} but {n - pos} more follow "
                          f"(corrupted or concatenated)", "malformed")
    return Frame(version, flags, metadata, payload, r_len, signed_part, key_id, signature)


def check_signature(frame: Frame, trust: TrustStore) -> TrustedKey:
    """The trusted key that signed this frame, or ``PacketError`` saying why there is none."""
    if not frame.signed:
        raise PacketError("unsigned: the packet carries no signature, and only signed packets are accepted",
                          "unsigned")
    kid = frame.key_id.hex()
    signer = trust.get(kid)
    if signer is None:
        raise PacketError(f"unknown signer: key {kid} is not in the trust store {trust.directory} "
                          f"(add it with: skill-edge keys add NAME PUBKEY)", "unknown-signer")
    if not signer.verify(frame.signature, frame.signed_part):
        raise PacketError(f"signature does not verify against trusted key {signer.name!r} ({kid}): "
                          f"the packet was modified after signing", "bad-signature")
    return signer


# ---------------------------------------------------------------------------- strict JSON


def _strict_json(raw: bytes, what: str, code: str = "bad-metadata") -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PacketError(f"{what} is not valid JSON: {type(exc).__name__}: {str(exc)[:200]}", code) from None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_score(v: Any) -> bool:
    """A finite number within +-MAX_ABS_SCORE (huge JSON integers included: no OverflowError)."""
    return bounded_number(v, -MAX_ABS_SCORE, MAX_ABS_SCORE)


def _is_name(v: Any) -> bool:
    try:
        validate_name(v)
    except KnowledgeError:
        return False
    return True


# ---------------------------------------------------------------------------- metadata


_META_TYPES: dict[str, Any] = {  # TaskMeta field -> check
    "agent_id": _is_name,
    "seq": lambda v: _is_int(v) and 0 <= v < 2**63,
    "created": lambda v: bounded_number(v, *CREATED_RANGE),
    "rom_fingerprint": lambda v: isinstance(v, str) and bool(_HEX64.match(v)),
    "bb_layout_hash": lambda v: isinstance(v, str) and (v == "" or bool(_LAYOUT_HASH.match(v))),
    "bb_split": lambda v: _is_int(v) and -1 <= v <= 4096,
    "feature_transform": lambda v: v in FEATURE_TRANSFORMS,
    "n_train": lambda v: _is_int(v) and 0 <= v <= MAX_COUNT,
    "source": lambda v: isinstance(v, str) and len(v) <= 4096,
    "metrics": lambda v: isinstance(v, dict) and all(_is_name(k) and _is_score(x) for k, x in v.items()),
    "encoding": lambda v: isinstance(v, dict),
}
_META_HINT = {
    "agent_id": "a printable name of 1-200 characters for the sending device (see docs/PACKET.md)",
    "seq": "an integer >= 0 that the sender increases with every new version of the task",
    "created": f"a unix time within [{CREATED_RANGE[0]:.0f}, {CREATED_RANGE[1]:.0f}]",
    "rom_fingerprint": "the 64-hex-digit sha256 fingerprint of the sender's ROM",
    "bb_layout_hash": "'' or the 32 (or 64) hex digits of the ROM's tail layout hash",
    "bb_split": "an integer within [-1, 4096]: the first ROM stage the biases are for, -1 without BB",
    "feature_transform": f"one of {', '.join(FEATURE_TRANSFORMS)}",
    "n_train": f"an integer within [0, {MAX_COUNT}]",
    "metrics": f"an object of printable names to finite numbers within +-{MAX_ABS_SCORE:g}",
}
assert set(_META_TYPES) == set(TaskMeta.__dataclass_fields__), "keep _META_TYPES in step with TaskMeta"
#: Fields a packet may leave out: those added after packets were first sent (their default applies).
_META_OPTIONAL = {"bb_split"}


def check_metadata(md: Any) -> EncodingPlan:
    """Validate untrusted packet metadata; returns its encoding plan."""
    if not isinstance(md, dict):
        raise PacketError(f"metadata must be a JSON object, got {type(md).__name__}", "bad-metadata")
    expected = {"schema", "task", "labels", "thresholds", "meta"}
    if set(md) != expected:
        raise PacketError(f"metadata fields {sorted(md)} != expected {sorted(expected)}", "bad-metadata")
    if md["schema"] != SCHEMA_VERSION or not _is_int(md["schema"]):
        raise PacketError(f"knowledge schema {md['schema']!r} unsupported (this device reads {SCHEMA_VERSION})",
                          "bad-metadata")
    labels = md["labels"]
    if not isinstance(labels, list) or not 2 <= len(labels) <= MAX_CLASSES:
        raise PacketError(f"metadata 'labels' must be a list of 2 to {MAX_CLASSES} class labels", "bad-metadata")
    try:
        validate_name(md["task"])
        for label in labels:
            validate_name(label, "class label")
    except KnowledgeError as exc:
        raise PacketError(f"metadata: {exc}", "bad-name") from None
    th = md["thresholds"]
    if not isinstance(th, dict) or not all(_is_name(k) and _is_score(v) for k, v in th.items()):
        raise PacketError(f"metadata 'thresholds' must map mapper kinds to finite numbers within "
                          f"+-{MAX_ABS_SCORE:g}", "bad-metadata")
    meta = md["meta"]
    if not isinstance(meta, dict):
        raise PacketError("metadata 'meta' must be a JSON object", "bad-metadata")
    missing = set(_META_TYPES) - set(meta) - _META_OPTIONAL
    extra = set(meta) - set(_META_TYPES)
    if missing or extra:
        raise PacketError(f"metadata 'meta' is missing {sorted(missing)} / has unknown {sorted(extra)}",
                          "bad-metadata")
    for key, ok in _META_TYPES.items():
        if key in _META_OPTIONAL and key not in meta:
            continue
        if not ok(meta[key]):
            hint = _META_HINT.get(key, "see docs/PACKET.md")
            raise PacketError(f"metadata meta.{key} = {ascii(_preview(meta[key]))} is invalid: must be {hint}",
                              "bad-metadata")
    try:
        return EncodingPlan.from_dict(meta["encoding"])
    except PlanError as exc:
        raise PacketError(f"metadata meta.encoding: {exc}", "bad-metadata") from None


def _preview(v: Any) -> str:
    """The start of a value for an error message; a 400-digit integer is not printed (nor converted) whole."""
    if _is_int(v) and v.bit_length() > 64:
        return f"<integer of {v.bit_length()} bits>"
    return str(v)[:80]


# ---------------------------------------------------------------------------- payload


def _decompress(frame: Frame) -> bytes:
    if not frame.compressed:
        return frame.payload
    try:
        params = zstandard.get_frame_parameters(frame.payload)
    except zstandard.ZstdError as exc:
        raise PacketError(f"payload is not a zstd frame: {exc}", "bad-payload") from None
    if params.content_size != frame.payload_raw_len:
        raise PacketError(f"zstd frame declares {params.content_size} decompressed bytes, the packet header "
                          f"{frame.payload_raw_len}", "bad-payload")
    dobj = zstandard.ZstdDecompressor().decompressobj()
    try:  # the frame's declared content size bounds the output buffer (a lying frame errors out)
        raw = dobj.decompress(frame.payload)
    except zstandard.ZstdError as exc:
        raise PacketError(f"payload does not decompress: {exc}", "bad-payload") from None
    if not dobj.eof or dobj.unused_data or len(raw) != frame.payload_raw_len:
        raise PacketError(f"payload decompresses to {len(raw)} bytes (frame complete: {dobj.eof}, "
                          f"{len(dobj.unused_data)} bytes after it); header says {frame.payload_raw_len}",
                          "bad-payload")
    return raw


def check_safetensors_header(payload: bytes, plan: EncodingPlan) -> list[WireTensor]:
    """Parse and check the (attacker-controlled) safetensors header before handing off."""
    if len(payload) < 8:
        raise PacketError(f"payload of {len(payload)} bytes is too short for a safetensors header", "bad-payload")
    (h_len,) = struct.unpack_from("<Q", payload, 0)
    if h_len > MAX_TENSOR_HEADER_BYTES:
        raise PacketError(f"safetensors header claims {h_len} bytes, the limit is {MAX_TENSOR_HEADER_BYTES}",
                          "bad-payload")
    if h_len > len(payload) - 8:
        raise PacketError(f"truncated: safetensors header says {h_len} bytes, {len(payload) - 8} remain",
                          "bad-payload")
    header = _strict_json(payload[8:8 + h_len], "safetensors header", "bad-payload")
    buffer_len = len(payload) - 8 - h_len
    if not isinstance(header, dict):
        raise PacketError("safetensors header must be a JSON object", "bad-payload")
    if "__metadata__" in header:
        raise PacketError("safetensors header carries __metadata__; v1 packets keep metadata in the packet "
                          "metadata section only", "bad-payload")
    expected = plan.wire_names()
    if set(header) != set(expected):
        unexpected = sorted(set(header) - set(expected))
        missing = sorted(set(expected) - set(header))
        raise PacketError(f"payload tensors do not match the plan: unexpected {unexpected}, missing {missing}",
                          "bad-payload")
    spans, out = [], []
    for name in sorted(header):
        e = header[name]
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise PacketError(f"safetensors entry {name!r} must have exactly dtype, shape, data_offsets",
                              "bad-payload")
        if e["dtype"] != expected[name]:
            raise PacketError(f"tensor {name} has dtype {e['dtype']!r}, the plan needs {expected[name]}",
                              "bad-payload")
        shape, offs = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not 0 < len(shape) <= MAX_TENSOR_RANK or \
                not all(_is_int(d) and 0 <= d <= MAX_PAYLOAD_BYTES for d in shape):
            raise PacketError(f"tensor {name} has an invalid shape {str(shape)[:80]}", "bad-payload")
        if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs) or \
                not 0 <= offs[0] <= offs[1] <= buffer_len:
            raise PacketError(f"tensor {name} data_offsets {str(offs)[:80]} lie outside the "
                              f"{buffer_len}-byte data buffer", "bad-payload")
        nbytes = math.prod(shape) * _ST_ITEMSIZE[e["dtype"]]
        if offs[1] - offs[0] != nbytes:
            raise PacketError(f"tensor {name}: shape {shape} x {e['dtype']} is {nbytes} bytes but its "
                              f"data_offsets span {offs[1] - offs[0]}", "bad-payload")
        spans.append((offs[0], offs[1], name))
        out.append(WireTensor(name, e["dtype"], tuple(shape), nbytes))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else f"leaves a gap of {begin - end} bytes"
            raise PacketError(f"tensor {name} starts at byte {begin}: {what}", "bad-payload")
        end = stop
    if end != buffer_len:
        raise PacketError(f"tensors cover {end} of the {buffer_len} data bytes; the rest is unaccounted for",
                          "bad-payload")
    shapes = {t.name: t.shape for t in out}
    for name in plan.tensors:
        if len(shapes[name]) != TENSOR_NDIM[name]:
            raise PacketError(f"tensor {name} has rank {len(shapes[name])}, a task record needs "
                              f"{TENSOR_NDIM[name]}", "bad-payload")
        for side in (n for n in expected if n.startswith(name + ".") and n != name):
            want = side_shape(plan.tensors[name], shapes[name])
            if shapes[side] != want:
                raise PacketError(f"tensor {side} has shape {shapes[side]}, {name} needs {want}", "bad-payload")
    return out


def _load_tensors(payload: bytes, plan: EncodingPlan) -> tuple[dict[str, np.ndarray], list[WireTensor]]:
    wire = check_safetensors_header(payload, plan)
    try:
        arrays = st_load(payload)
    except (SafetensorError, ValueError) as exc:
        raise PacketError(f"safetensors refused the payload: {exc}", "bad-payload") from None
    for t in wire:  # guard against any disagreement between our reading and the library's
        a = arrays.get(t.name)
        if a is None or tuple(a.shape) != t.shape or a.nbytes != t.nbytes:
            raise PacketError(f"safetensors read tensor {t.name} differently from its header", "bad-payload")
    return arrays, wire


# ---------------------------------------------------------------------------- the codec


class PacketCodec:
    """Encode ``TaskKnowledge`` into v1 packets (within an optional byte budget) and decode them.

    ``budget_bytes``: int or a size string ("64KB", "1.5MiB"; see ``parse_size``), or None for
    lossless fp32.  ``compression``: "auto" (zstd when it makes the packet smaller), "zstd" or "none".
    """

    def __init__(self, budget_bytes: int | str | None = None, compression: str = "auto",
                 zstd_level: int = ZSTD_DEFAULT_LEVEL) -> None:
        if compression not in ("auto", "zstd", "none"):
            raise ValueError(f"compression must be 'auto', 'zstd' or 'none', got {compression!r}")
        self.budget_bytes = parse_size(budget_bytes) if budget_bytes is not None else None
        self.compression = compression
        self.zstd_level = zstd_level

    # -- encode
    def plans(self, knowledge: TaskKnowledge) -> list[EncodingPlan]:
        """The ladder of plans ``encode`` considers for this task, least lossy first."""
        return plan_ladder(knowledge, entropy_coded=self.compression != "none")

    def encode(self, knowledge: TaskKnowledge, key: DeviceKey | Ed25519PrivateKey | None,
               plan: EncodingPlan | str | None = None, *,
               calibration: ThresholdCalibration | None = None) -> bytes:
        """Signed packet bytes (unsigned when ``key`` is None: receivers reject those).

        With ``plan`` (an ``EncodingPlan`` or a step name, see ``plan_for_step``) exactly that plan is
        used and the budget is not applied; otherwise the first ladder step whose real packet fits the budget.
        ``calibration`` (the teacher's, from ``fit_task_anchors``; never sent) sets the Mahalanobis
        threshold of a reduced anchor on the teacher's held-out images instead of carrying it.
        """
        knowledge.validate()
        if isinstance(key, Ed25519PrivateKey):
            key = DeviceKey(key)
        if plan is not None:
            if isinstance(plan, str):
                plan = plan_for_step(knowledge, plan)  # PlanError (a ValueError) names what does not fit
            return self._encode_best_compression(knowledge, key, plan, calibration=calibration)
        ladder = self.plans(knowledge)
        if self.budget_bytes is None:
            return self._encode_best_compression(knowledge, key, ladder[0], calibration=calibration)
        smallest: tuple[int, str] | None = None
        reductions = TaskReductions(knowledge)  # merge paths and threshold draws, once for every rung
        for p in ladder:
            # sized with the teacher's thresholds; the carried ones are computed for a rung that fits
            reduced, wire = apply_plan(knowledge, p, reductions, carry=False)
            data = self._encode_best_compression(knowledge, key, p, applied=(reduced, wire))
            if len(data) <= self.budget_bytes + THRESHOLD_DIGITS_SLACK:
                carried = carry_thresholds(knowledge, p, reduced, wire, reductions, calibration)
                data = self._encode_best_compression(knowledge, key, p, applied=(carried, wire))
                if len(data) <= self.budget_bytes:
                    return data
            if smallest is None or len(data) < smallest[0]:
                smallest = (len(data), p.step)
        # unsigned packets are 72 bytes smaller, but the receivers reject them: report what the caller asked for
        raise BudgetError(self.budget_bytes, smallest[0], smallest[1])

    def _encode_best_compression(self, knowledge: TaskKnowledge, key: DeviceKey | None, plan: EncodingPlan, *,
                                 applied: tuple[TaskKnowledge, dict[str, np.ndarray]] | None = None,
                                 calibration: ThresholdCalibration | None = None) -> bytes:
        options = {"auto": ("none", "zstd"), "zstd": ("zstd",), "none": ("none",)}[self.compression]
        if applied is None:  # the same tensors whichever compression wins
            applied = apply_plan(knowledge, plan, calibration=calibration)
        candidates = [self.encode_exact(knowledge, key, replace(plan, compression=c), applied=applied)
                      for c in options]
        return min(candidates, key=len)

    def encode_exact(self, knowledge: TaskKnowledge, key: DeviceKey | None, plan: EncodingPlan, *,
                     applied: tuple[TaskKnowledge, dict[str, np.ndarray]] | None = None) -> bytes:
        """The packet for exactly this plan (including its compression setting).  ``applied``: what
        ``apply_plan`` returned for this knowledge and plan, when the caller has it already."""
        reduced, wire = applied if applied is not None else apply_plan(knowledge, plan)
        md = reduced.metadata()
        md["meta"]["encoding"] = plan.to_dict()
        md["meta"]["source"] = ""  # local provenance (e.g. a training folder) is not broadcast; receivers set their own
        try:
            meta_bytes = _metadata_bytes(md)
        except (TypeError, ValueError) as exc:
            raise PacketError(f"cannot encode metadata of task {knowledge.task!r} as JSON: {exc} "
                              f"(metrics and thresholds must be finite Python numbers)", "encode") from None
        try:
            check_metadata(json.loads(meta_bytes))
        except PacketError as exc:
            raise PacketError(f"task {knowledge.task!r} is not ready to send: {exc.reason}", "encode") from None
        _check_bb_layout(reduced, "encode")
        raw = st_save(wire)
        payload = raw
        flags = FLAG_SIGNED if key is not None else 0
        if plan.compression == "zstd":
            payload = zstandard.ZstdCompressor(level=self.zstd_level, write_content_size=True).compress(raw)
            flags |= FLAG_ZSTD
        if len(meta_bytes) > MAX_META_BYTES or len(raw) > MAX_PAYLOAD_BYTES:
            raise PacketError(f"task {knowledge.task!r} is too large for a packet: {len(meta_bytes)} bytes of "
                              f"metadata (limit {MAX_META_BYTES}), {len(raw)} bytes of tensors (limit "
                              f"{MAX_PAYLOAD_BYTES}); send a smaller plan", "oversized")
        body = _sealed(flags, meta_bytes, payload, len(raw), key)
        if len(body) > MAX_PACKET_BYTES:
            raise PacketError(f"packet for task {knowledge.task!r} would be {len(body)} bytes, over the "
                              f"{MAX_PACKET_BYTES}-byte limit; send a smaller plan", "oversized")
        return body

    def resign(self, data: bytes, key: DeviceKey, seq: int) -> bytes:
        """``data``, a packet ``key`` signed, as version ``seq`` of the same task: the payload byte for
        byte (so the same budget rung), the metadata with only ``meta.seq`` changed, signed again.

        For a device whose peers hold a newer version signed by its own key than the one its bank
        keeps (a bank restored from a backup, or the seq ledger lost with it): its bank's version
        can only reach them with a higher seq (``SyncService.republish_outdated``).  Raises
        ``PacketError`` if ``data`` is malformed or was not signed by ``key``, ``ValueError`` if
        ``seq`` does not exceed the packet's own."""
        frame = parse_frame(data)
        if not frame.signed or frame.key_id.hex() != key.key_id:
            raise PacketError(f"only this device's own packets can be signed again (key {key.key_id}); this one "
                              f"is {'unsigned' if not frame.signed else 'signed by key ' + frame.key_id.hex()}",
                              "encode")
        try:
            key.public_key.verify(frame.signature, frame.signed_part)
        except Exception:  # noqa: BLE001 - cryptography's InvalidSignature
            raise PacketError("bad signature: the packet was changed after this device signed it", "bad-signature") \
                from None
        md = _strict_json(frame.metadata, "metadata")
        check_metadata(md)
        if int(seq) <= int(md["meta"]["seq"]):
            raise ValueError(f"a new version needs a higher seq than {md['meta']['seq']}, got {seq}")
        md["meta"]["seq"] = int(seq)
        return _sealed(frame.flags, _metadata_bytes(md), frame.payload, frame.payload_raw_len, key)

    # -- decode
    def decode(self, data: bytes, trust: TrustStore | None = None) -> Packet:
        """Parse and check a packet.  With ``trust`` the signature must come from a trusted key and
        verify (checked before anything inside the packet is interpreted); without, it is not checked
        and ``Packet.verified_by`` is None."""
        frame = parse_frame(data)
        verified_by = check_signature(frame, trust).name if trust is not None else None
        md = _strict_json(frame.metadata, "metadata")
        plan = check_metadata(md)
        if (plan.compression == "zstd") != frame.compressed:
            raise PacketError(f"plan says compression {plan.compression!r} but the header flag says "
                              f"{'zstd' if frame.compressed else 'none'}", "bad-metadata")
        raw = _decompress(frame)
        arrays, wire = _load_tensors(raw, plan)
        tensors = restore_tensors(arrays, plan)
        try:
            knowledge = TaskKnowledge.from_parts(md, tensors)
        except KnowledgeError as exc:
            raise PacketError(f"packet carries an inconsistent task record: {exc}", "bad-knowledge") from None
        _check_plan_matches(knowledge, plan)
        _check_bb_layout(knowledge, "bad-knowledge")
        digest = hashlib.sha256(bytes(data)).hexdigest()
        knowledge.meta.source = f"packet:{digest}"
        m = knowledge.meta
        return Packet(version=frame.version, task=knowledge.task, labels=list(knowledge.labels),
                      agent_id=m.agent_id, seq=m.seq, created=m.created, rom_fingerprint=m.rom_fingerprint,
                      bb_layout_hash=m.bb_layout_hash, plan=plan, knowledge=knowledge,
                      signer=frame.key_id.hex() if frame.key_id is not None else None,
                      signature=frame.signature, verified_by=verified_by, raw_size=len(data), sha256=digest,
                      metadata_bytes=len(frame.metadata), payload_bytes=len(frame.payload),
                      payload_raw_bytes=len(raw), wire_tensors=tuple(wire))


def _metadata_bytes(md: dict) -> bytes:
    """The metadata section as every packet writes it: canonical, compact UTF-8 JSON."""
    return json.dumps(md, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode("utf-8")


def _sealed(flags: int, meta_bytes: bytes, payload: bytes, raw_len: int, key: DeviceKey | None) -> bytes:
    """Header, metadata and payload, then (with ``key``) the signer's key id and the signature over all of it."""
    body = HEADER.pack(MAGIC, FORMAT_VERSION, flags, 0, len(meta_bytes), len(payload), raw_len) + meta_bytes + payload
    if key is None:
        return body
    body += bytes.fromhex(key.key_id)
    return body + key.sign(body)


def _check_plan_matches(k: TaskKnowledge, plan: EncodingPlan) -> None:
    if k.gmmc is not None and k.gmmc.k != plan.gmmc_k:
        raise PacketError(f"plan says {plan.gmmc_k} GMMC components, the payload has {k.gmmc.k}", "bad-knowledge")
    if k.maha is not None:
        rows = k.maha.class_means.shape[0]  # at most one per class (validate)
        expected = plan.maha_means if plan.maha_means is not None else k.num_classes
        if rows != expected:
            raise PacketError(f"plan says {expected} Mahalanobis mean rows ({k.num_classes} classes), the payload "
                              f"has {rows}", "bad-knowledge")
    if k.maha is not None and k.maha.exemplar_labels.size:
        per_class = int(np.bincount(k.maha.exemplar_labels.astype(np.int64)).max())
        if per_class > plan.exemplars_per_class:
            raise PacketError(f"plan says at most {plan.exemplars_per_class} exemplars per class, the payload "
                              f"has {per_class}", "bad-knowledge")


def _check_bb_layout(k: TaskKnowledge, code: str) -> None:
    if (k.bb is not None) != bool(k.meta.bb_layout_hash):
        raise PacketError("beneficial biases and meta.bb_layout_hash must come together: a receiver cannot "
                          "apply BB without knowing the tail layout they were learned for", code)
