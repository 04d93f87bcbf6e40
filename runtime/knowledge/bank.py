"""The on-device knowledge bank: every task a device knows, stored so that a crash cannot corrupt it.

A record is exactly the pair a knowledge packet carries -- ``TaskKnowledge.metadata()`` as JSON and
``TaskKnowledge.tensors()`` as one safetensors file -- plus, optionally, the raw packet bytes it was
decoded from.  Nothing is ever pickled.

Tasks are keyed by their fleet-wide identity ``TaskKey(task, agent)`` (``runtime.knowledge.identity``): the
origin agent plus the name.  Two agents' ``cifar`` are two entries; a newer version from the same
origin replaces the older one; and a task the device learned itself (``own``) is never replaced by
anyone else's packet.  An own task's record also holds the signed packet the device broadcasts for
it, written in the same atomic step as the task, so publishing is a function of the bank.

On-disk layout (``root`` is e.g. ``~/.skill-edge/bank``)::

    lock                    flock()ed by the single writer; holds its pid for error messages
    index.json              current generation: a list of (task, agent) -> record hash + summary
                            entries, and the newest seq of each removed task (``RemovedTask``);
                            sha256 of itself inside.  Format /1 (keyed by task name alone)
                            is still read, and rewritten as /2 by the next writer
    index.prev.json         previous generation; used when index.json fails its checksum
    index.json.corrupt      the last index.json that failed its checksum (kept for forensics)
    records/<sha256>/       one immutable record per directory, named by the sha256 of its record.json:
        record.json         manifest: task, content hash, sha256 + size of every other file
        metadata.json       TaskKnowledge.metadata()
        tensors.safetensors TaskKnowledge.tensors()
        packet.bin          the packet bytes the task came from (optional)
    quarantine/<sha256>/    suspicious records: same files, manifest also holds the reason; never loaded
    staging/                half-written records and indexes; emptied whenever a writer starts

Why this is crash-safe: a record is written in ``staging/``, every file fsynced, then renamed into
``records/`` (atomic), and only then does the index change, itself via temp file + fsync + rename.
Each task therefore flips from its old record to its new one in the single ``rename`` of
``index.json``; a crash at any earlier point leaves the old index pointing at old, intact records,
and the unreferenced leftovers are deleted by the next writer.  Records referenced by
``index.prev.json`` are kept too, so falling back to it never finds a missing record.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from skill_edge.runtime.atomic import fsync_dir
from skill_edge.runtime.knowledge.identity import TaskKey, display_names, match, short_agent
from skill_edge.runtime.knowledge.records import KnowledgeError, TaskKnowledge

_T = TypeVar("_T")

INDEX_FORMAT = "skill-edge-bank-index/2"
LEGACY_INDEX_FORMAT = "skill-edge-bank-index/1"  # keyed by task name; read, never written
RECORD_FORMAT = "skill-edge-bank-record/1"
MANIFEST = "record.json"
METADATA = "metadata.json"
TENSORS = "tensors.safetensors"
PACKET = "packet.bin"


class BankError(RuntimeError):
    """Something the bank cannot do; the message says what and where.  The bank stays consistent."""


class BankQuotaError(BankError):
    """Storing this would take the bank over its byte quota; nothing was written."""


class BankCorruptError(BankError):
    """Bytes on disk no longer match their recorded sha256 (or an index is unreadable)."""


class BankLockedError(BankError):
    """Another process holds the bank's writer lock for longer than ``lock_timeout``."""


class UnknownTaskError(BankError):
    """The bank holds no task (or quarantined item) of that name."""


class AmbiguousTaskError(BankError):
    """A bare task name that several agents' tasks share; the message lists them as ``task@agent``."""

    def __init__(self, message: str, candidates: list[TaskKey]) -> None:
        super().__init__(message)
        self.candidates = candidates


class OwnTaskError(BankError):
    """Another agent's knowledge would replace a task this device learned itself; nothing was written."""


@dataclass(frozen=True)
class BankEntry:
    """Summary of one stored task, kept in the index so listing never reads the records."""

    task: str
    classes: int
    bytes: int  # on-disk size of the record's files, manifest included
    seq: int
    agent: str
    source: str
    created: float
    stored: float  # when this bank stored it (time.time())
    content_hash: str  # TaskKnowledge.content_hash(): equal knowledge, equal hash
    record: str  # sha256 of the record's manifest = its directory name under records/
    has_bb: bool
    anchors: tuple[str, ...]  # subset of ("gmmc", "maha")
    has_packet: bool
    own: bool = False  # learned by this device (never replaced by another agent's packet)
    packet_sha256: str = ""  # sha256 of the stored packet bytes ("" without them)

    @property
    def key(self) -> TaskKey:
        """The task's fleet-wide identity: origin agent + name."""
        return TaskKey(self.task, self.agent)


@dataclass(frozen=True)
class RemovedTask:
    """The newest seq of a task that was removed from the bank.

    A seq names one version fleet-wide: peers that kept the removed version refuse a different
    packet under the same seq, so a device that learns one of its removed tasks again must start
    above it (``Device`` reads this).  Kept in the index, a few bytes a task."""

    task: str
    agent: str
    seq: int
    own: bool  # it was learned by this device

    @property
    def key(self) -> TaskKey:
        return TaskKey(self.task, self.agent)


@dataclass(frozen=True)
class QuarantineEntry:
    """One quarantined item: kept for inspection, never activated."""

    id: str  # sha256 of its manifest = its directory name under quarantine/
    task: str | None
    reason: str
    quarantined_at: float
    bytes: int
    has_knowledge: bool
    has_packet: bool


@dataclass
class QuarantinedItem:
    """The raw parts of a quarantined item, unvalidated (it was quarantined for a reason)."""

    entry: QuarantineEntry
    metadata: dict[str, Any] | None
    tensors: dict[str, np.ndarray] | None
    packet_bytes: bytes | None


@dataclass
class VerifyReport:
    """Result of ``KnowledgeBank.verify``; ``ok`` is False when anything is wrong or was repaired."""

    index_file: str  # the index generation in use: "index.json", "index.prev.json" or "(empty)"
    tasks_checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # one line each, naming task and file
    repaired: list[str] = field(default_factory=list)  # corruption this bank object found and repaired
    orphans: list[str] = field(default_factory=list)  # record dirs no index references (crash leftovers)
    staging_leftovers: list[str] = field(default_factory=list)
    quarantined: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems and not self.repaired


@dataclass
class _Index:
    generation: int
    tasks: dict[TaskKey, BankEntry]
    legacy: bool = False  # read from a format /1 index: own flags inferred, packet digests not yet known
    removed: dict[TaskKey, RemovedTask] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = {"format": INDEX_FORMAT, "generation": self.generation,
                "tasks": [asdict(e) for _, e in sorted(self.tasks.items())]}
        if self.removed:  # absent until a task is removed: indexes written before it read the same
            body["removed"] = [asdict(r) for _, r in sorted(self.removed.items())]
        return json.dumps({**body, "sha256": _index_digest(body)}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "_Index":
        """Parse and check the embedded sha256; raises ``ValueError`` on any mismatch."""
        doc = json.loads(data)
        fmt = doc.get("format") if isinstance(doc, dict) else None
        if fmt not in (INDEX_FORMAT, LEGACY_INDEX_FORMAT):
            raise ValueError("not a skill-edge bank index")
        claimed = doc.pop("sha256", None)
        if claimed != _index_digest(doc):
            raise ValueError("checksum mismatch")
        removed = [RemovedTask(**r) for r in doc.get("removed", [])]
        if fmt == INDEX_FORMAT:
            entries = [BankEntry(**{**e, "anchors": tuple(e["anchors"])}) for e in doc["tasks"]]
        else:  # /1 had no own flag: what a device stored from a packet has source "packet:<sha256>"
            entries = [BankEntry(**{**e, "anchors": tuple(e["anchors"]),
                                    "own": not str(e["source"]).startswith("packet:")})
                       for e in doc["tasks"].values()]
        return cls(int(doc["generation"]), {e.key: e for e in entries}, legacy=fmt != INDEX_FORMAT,
                   removed={r.key: r for r in removed})

    def records(self) -> set[str]:
        return {e.record for e in self.tasks.values()}


def _what(entry: BankEntry) -> str:
    """How error messages name a stored task: its name and origin."""
    return f"task {entry.task!r} from agent {short_agent(entry.agent)}"


def _index_digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _is_hash_name(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (must not exist), write all of ``data`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_record(kind: str, files: dict[str, bytes], **fields: Any) -> tuple[bytes, str]:
    """The manifest bytes for ``files`` and the record id (sha256 of the manifest)."""
    manifest = {"format": RECORD_FORMAT, "kind": kind, **fields,
                "files": {n: {"sha256": _sha256(b), "bytes": len(b)} for n, b in sorted(files.items())}}
    data = json.dumps(manifest, sort_keys=True, indent=1).encode()
    return data, _sha256(data)


class KnowledgeBank:
    """A directory of task records with atomic replace, hash-checked reads and one writer at a time.

    Every mutating call takes the writer lock (``fcntl.flock`` on ``root/lock``) for its own duration,
    so a sync daemon and ``skill-edge learn`` can share a bank.  Reads take no lock: ``index.json``
    is only ever replaced by ``rename``, so a reader always sees one whole generation.
    """

    def __init__(self, root: Path | str, quota_bytes: int | None = None, *, lock_timeout: float = 10.0):
        self.root = Path(root)
        self.quota_bytes = quota_bytes
        self.lock_timeout = lock_timeout
        self.records_dir = self.root / "records"
        self.quarantine_dir = self.root / "quarantine"
        self.staging_dir = self.root / "staging"
        self._repaired: list[str] = []
        for d in (self.root, self.records_dir, self.quarantine_dir, self.staging_dir):
            d.mkdir(parents=True, exist_ok=True)
        try:  # clean up after a crashed writer now if nobody is writing; else that writer will
            with self._locked(timeout=0):
                self._recover()
        except BankLockedError:
            pass

    # ------------------------------------------------------------------ reading
    def entries(self) -> list[BankEntry]:
        """Every stored task, sorted by name, then origin agent (from the index alone)."""
        index, _ = self._read_index()
        return [index.tasks[k] for k in sorted(index.tasks)]

    def __contains__(self, ref: str | TaskKey) -> bool:
        try:
            self.resolve(ref)
        except UnknownTaskError:
            return False
        return True

    def resolve(self, ref: str | TaskKey) -> BankEntry:
        """The one entry ``ref`` names: a ``TaskKey``, a task name that only one agent taught, or
        ``TASK@AGENT`` with the agent id or a prefix of it.

        Raises ``UnknownTaskError`` when nothing matches and ``AmbiguousTaskError`` (listing the
        candidates as ``task@agent``) when several do.
        """
        return self._resolve(self._read_index()[0], ref)

    def get(self, ref: str | TaskKey) -> TaskKnowledge:
        """The task's knowledge, every byte checked against its sha256 first (``ref`` as for ``resolve``)."""
        entry, files = self._read_live(ref)
        return self._knowledge_from(entry, files)

    def packet_bytes(self, ref: str | TaskKey) -> bytes | None:
        """The packet bytes the task was stored with, or None."""
        _, files = self._read_live(ref)
        return files.get(PACKET)

    def load_all(self) -> list[TaskKnowledge]:
        """Every task, from one consistent index generation, in ``entries()`` order; raises on the first
        corrupt record."""
        return self._each_live(lambda e: self._knowledge_from(e, self._read_record(self.records_dir, e.record,
                                                                                   _what(e))))

    def rom_fingerprints(self) -> set[str]:
        """The ROM fingerprints the stored tasks were learned on, from each record's checked
        ``metadata.json`` alone: ``sync`` asks this to know its ROM, and reading every tensor for
        it cost a second per 70 tasks on a small board."""
        metas = self._each_live(lambda e: self._read_record(self.records_dir, e.record, _what(e),
                                                            only=METADATA)[METADATA])
        try:
            return {str(json.loads(m)["meta"].get("rom_fingerprint", "")) for m in metas}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BankCorruptError(f"a record's metadata in {self.root} has no ROM fingerprint ({exc})") from exc

    def _each_live(self, read: Callable[[BankEntry], _T]) -> list[_T]:
        """``read`` of every task of one consistent index generation, in ``entries()`` order; a record a
        concurrent writer collected mid-way makes it start again on the new generation."""
        for _ in range(5):
            index, _ = self._read_index()
            try:
                return [read(e) for _, e in sorted(index.tasks.items())]
            except FileNotFoundError:
                if self._read_index()[0].generation == index.generation:
                    raise BankCorruptError(f"a record listed in {self.root / 'index.json'} is missing")
        raise BankError(f"the bank at {self.root} kept changing while loading; try again")

    def removed(self) -> list[RemovedTask]:
        """The newest seq of every task removed from this bank and not stored again since."""
        index, _ = self._read_index()
        return [index.removed[k] for k in sorted(index.removed)]

    def used_bytes(self) -> int:
        """Bytes the quota counts: live records plus quarantined items (file sizes, not disk blocks)."""
        index, _ = self._read_index()
        return sum(e.bytes for e in index.tasks.values()) + sum(q.bytes for q in self.quarantined())

    # ------------------------------------------------------------------ writing
    def put(self, knowledge: TaskKnowledge, *, packet_bytes: bytes | None = None, own: bool = False) -> BankEntry:
        """Store ``knowledge`` under its identity ``(task, meta.agent_id)``, atomically.

        ``own=True`` means this device learned it (pass the signed packet it broadcasts as
        ``packet_bytes``, so the two are stored together): it replaces the device's previous own
        version(s) of that name, whatever agent id they were learned under, and any copy of the
        task that came back from the fleet.  ``own=False`` means it came from a packet: it replaces
        an earlier version from the same origin and sits beside other agents' tasks of the same
        name.  It never replaces an own task: an identical copy is a no-op that returns the stored
        entry, anything else raises ``OwnTaskError``.
        """
        knowledge.validate()
        task = knowledge.task
        key = TaskKey(task, knowledge.meta.agent_id)
        files = {METADATA: json.dumps(knowledge.metadata(), sort_keys=True, indent=1).encode(),
                 TENSORS: save_safetensors(knowledge.tensors())}
        if packet_bytes is not None:
            files[PACKET] = bytes(packet_bytes)
        content_hash = knowledge.content_hash()
        manifest, record = _build_record("task", files, task=task, content_hash=content_hash)
        size = len(manifest) + sum(len(b) for b in files.values())
        entry = BankEntry(
            task=task, classes=knowledge.num_classes, bytes=size, seq=int(knowledge.meta.seq),
            agent=knowledge.meta.agent_id, source=knowledge.meta.source, created=float(knowledge.meta.created),
            stored=time.time(), content_hash=content_hash, record=record, has_bb=knowledge.bb is not None,
            anchors=tuple(a for a in ("gmmc", "maha") if getattr(knowledge, a) is not None),
            has_packet=packet_bytes is not None, own=own,
            packet_sha256=_sha256(files[PACKET]) if packet_bytes is not None else "")
        what = f"task {task!r} from agent {short_agent(key.agent)}"
        with self._locked():
            index = self._recover()
            old = index.tasks.get(key)
            if old is not None and old.own and not own:
                if old.content_hash == content_hash:
                    return old  # this device's own task, come back from the fleet
                raise OwnTaskError(
                    f"{what} (seq {entry.seq}) would replace the task this device learned itself (seq "
                    f"{old.seq}); refused. A device's own tasks change only when it learns them again")
            replaced = {key} | ({k for k, e in index.tasks.items() if e.own and e.task == task} if own else set())
            replaced &= set(index.tasks)
            self._check_quota(what, size, freed=sum(index.tasks[k].bytes for k in replaced))
            created = False
            try:
                created = self._store_record(self.records_dir, record, files, manifest)
                kept = {k: e for k, e in index.tasks.items() if k not in replaced}
                gone = index.removed.get(key)
                removed = {k: r for k, r in index.removed.items() if not (k == key and entry.seq >= gone.seq)}
                self._commit(index, {**kept, key: entry}, removed)
            except OSError as exc:
                if created:
                    with contextlib.suppress(OSError):
                        self._delete_dir(self.records_dir / record)
                raise self._write_error(f"storing {what} ({size:,} bytes)", exc) from exc
            self._collect_garbage()
        return entry

    def remove(self, ref: str | TaskKey) -> BankEntry:
        """Forget a task (atomically) and return its entry; ``ref`` as for ``resolve``.  Its seq is
        kept (``removed``): peers may still hold that version."""
        with self._locked():
            index = self._recover()
            entry = self._resolve(index, ref)
            gone = index.removed.get(entry.key)
            seq = max(int(entry.seq), gone.seq if gone is not None else 0)
            removed = {**index.removed, entry.key: RemovedTask(entry.task, entry.agent, seq, entry.own)}
            try:
                self._commit(index, {k: e for k, e in index.tasks.items() if k != entry.key}, removed)
            except OSError as exc:
                raise self._write_error(f"removing {_what(entry)}", exc) from exc
            self._collect_garbage()
        return entry

    # ------------------------------------------------------------------ quarantine
    def quarantine(self, knowledge: TaskKnowledge | None, reason: str, packet_bytes: bytes | None = None
                   ) -> QuarantineEntry:
        """Keep a suspicious record (or just its packet bytes) aside, where it is never activated."""
        files: dict[str, bytes] = {}
        if knowledge is not None:
            files[METADATA] = json.dumps(knowledge.metadata(), sort_keys=True, indent=1).encode()
            files[TENSORS] = save_safetensors(knowledge.tensors())
        if packet_bytes is not None:
            files[PACKET] = bytes(packet_bytes)
        if not files:
            raise ValueError("quarantine needs the knowledge, its packet bytes, or both")
        with self._locked():
            self._recover()
            return self._quarantine_files(files, knowledge.task if knowledge else None, reason)

    def quarantined(self) -> list[QuarantineEntry]:
        """Quarantined items whose manifest checks out, oldest first (``verify`` reports the others)."""
        out = []
        for d in self.quarantine_dir.iterdir():
            try:
                data = (d / MANIFEST).read_bytes()
            except OSError:
                continue
            if _is_hash_name(d.name) and _sha256(data) == d.name:
                out.append(self._quarantine_entry(d.name, data))
        return sorted(out, key=lambda q: (q.quarantined_at, q.id))

    def get_quarantined(self, qid: str) -> QuarantinedItem:
        """The raw parts of one quarantined item, hash-checked but not validated as knowledge."""
        files = self._read_record(self.quarantine_dir, qid, f"quarantined item {qid[:12]}", missing_ok=False)
        entry = self._quarantine_entry(qid, (self.quarantine_dir / qid / MANIFEST).read_bytes())
        tensors = load_safetensors(files[TENSORS]) if TENSORS in files else None
        metadata = json.loads(files[METADATA]) if METADATA in files else None
        return QuarantinedItem(entry, metadata, tensors, files.get(PACKET))

    def remove_quarantined(self, qid: str) -> None:
        with self._locked():
            if not _is_hash_name(qid) or not (self.quarantine_dir / qid).is_dir():
                raise UnknownTaskError(f"no quarantined item {qid!r} in the bank at {self.root}")
            self._delete_dir(self.quarantine_dir / qid)

    # ------------------------------------------------------------------ checking
    def verify(self) -> VerifyReport:
        """Check every index, record and quarantined item against its sha256; change nothing."""
        with self._locked():
            report = VerifyReport(index_file="(empty)", repaired=list(self._repaired))
            current = prev = None
            for name in ("index.json", "index.prev.json"):
                try:
                    idx = _Index.from_bytes((self.root / name).read_bytes())
                except FileNotFoundError:
                    continue
                except (ValueError, KeyError, TypeError) as exc:
                    report.problems.append(f"{self.root / name} is unreadable ({exc})")
                    continue
                if name == "index.json":
                    current = idx
                else:
                    prev = idx
                if report.index_file == "(empty)":
                    report.index_file = name
            live = current or prev
            if live is not None:
                keys = sorted(live.tasks)
                for key, label in zip(keys, display_names(keys)):
                    entry = live.tasks[key]
                    try:
                        self._knowledge_from(entry, self._read_record(self.records_dir, entry.record, _what(entry),
                                                                      missing_ok=False))
                        report.tasks_checked.append(label)
                    except BankError as exc:
                        report.problems.append(str(exc))
            referenced = (current.records() if current else set()) | (prev.records() if prev else set())
            report.orphans = sorted(d.name for d in self.records_dir.iterdir() if d.name not in referenced)
            report.staging_leftovers = sorted(p.name for p in self.staging_dir.iterdir())
            for d in sorted(self.quarantine_dir.iterdir()):
                report.quarantined += 1
                try:
                    self._read_record(self.quarantine_dir, d.name, f"quarantined item {d.name[:12]}",
                                      missing_ok=False)
                except BankError as exc:
                    report.problems.append(str(exc))
            return report

    # ------------------------------------------------------------------ internals: reading
    def _read_index(self) -> tuple[_Index, str]:
        """The newest index generation whose checksum holds, and which file it came from."""
        errors = []
        for name in ("index.json", "index.prev.json"):
            try:
                return _Index.from_bytes((self.root / name).read_bytes()), name
            except FileNotFoundError:
                errors.append(f"{name} is missing")
            except (ValueError, KeyError, TypeError) as exc:
                errors.append(f"{name} fails its check ({exc})")
        if all(e.endswith("is missing") for e in errors):
            return _Index(0, {}), "(empty)"
        raise BankCorruptError(
            f"no usable index in {self.root}: {'; '.join(errors)}. The records under {self.records_dir} are "
            "untouched; move the bank aside and re-import them, or restore index.json from a backup")

    def _resolve(self, index: _Index, ref: str | TaskKey) -> BankEntry:
        if isinstance(ref, TaskKey):
            if ref in index.tasks:
                return index.tasks[ref]
            raise UnknownTaskError(f"no task {ref.task!r} from agent {ref.agent!r} in the bank at {self.root}")
        hits = sorted(match(ref, index.tasks))
        if len(hits) == 1:
            return index.tasks[hits[0]]
        if not hits:
            raise UnknownTaskError(f"no task {ref!r} in the bank at {self.root}")
        listed = ", ".join(f"{label} ({'own' if index.tasks[k].own else 'received'})"
                           for k, label in zip(hits, display_names(hits)))
        raise AmbiguousTaskError(f"{len(hits)} tasks match {ref!r}: {listed}; name one as TASK@AGENT "
                                 "(an agent id prefix is enough)", hits)

    def _read_live(self, ref: str | TaskKey) -> tuple[BankEntry, dict[str, bytes]]:
        """Index entry + checked files; re-reads the index if a writer replaced the record meanwhile."""
        for _ in range(5):
            index, _ = self._read_index()
            entry = self._resolve(index, ref)
            try:
                return entry, self._read_record(self.records_dir, entry.record, _what(entry))
            except FileNotFoundError:
                if self._read_index()[0].generation == index.generation:
                    raise BankCorruptError(
                        f"{_what(entry)}: record directory {self.records_dir / entry.record} is missing") from None
        raise BankError(f"task {ref!r} kept changing while being read from {self.root}; try again")

    def _read_record(self, area: Path, record: str, what: str, *, missing_ok: bool = True,
                     only: str | None = None) -> dict[str, bytes]:
        """All files of one record (or the file ``only``), each checked against the manifest, the
        manifest against ``record``.

        Raises ``FileNotFoundError`` for a missing manifest when ``missing_ok`` (a concurrent writer
        may have just garbage-collected it) and ``BankCorruptError`` naming the file otherwise.
        """
        rec_dir = area / record
        path = rec_dir / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if missing_ok:
                raise
            raise BankCorruptError(f"{what}: {path} is missing") from None
        if _sha256(data) != record:
            raise BankCorruptError(f"{what}: {path} fails its sha256 (expected {record[:12]}…); the record "
                                   "is corrupt on disk")
        try:
            manifest = json.loads(data)
            listed = dict(manifest["files"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BankCorruptError(f"{what}: {path} is not a record manifest ({exc})") from exc
        if only is not None:
            if only not in listed:
                raise BankCorruptError(f"{what}: {path} lists no {only}")
            listed = {only: listed[only]}
        files = {}
        for name, info in listed.items():
            fpath = rec_dir / name
            try:
                blob = fpath.read_bytes()
            except FileNotFoundError:
                if missing_ok and not path.exists():
                    raise  # the whole record vanished under us: a writer collected it
                raise BankCorruptError(f"{what}: {fpath} is missing") from None
            if len(blob) != info["bytes"] or _sha256(blob) != info["sha256"]:
                raise BankCorruptError(f"{what}: {fpath} fails its sha256/size check ({len(blob):,} bytes on "
                                       f"disk, {info['bytes']:,} recorded); the record is corrupt on disk")
            files[name] = blob
        return files

    def _knowledge_from(self, entry: BankEntry, files: dict[str, bytes]) -> TaskKnowledge:
        try:
            knowledge = TaskKnowledge.from_parts(json.loads(files[METADATA]), load_safetensors(files[TENSORS]))
        except (KnowledgeError, KeyError, ValueError) as exc:
            raise BankCorruptError(f"{_what(entry)}: record {entry.record[:12]} does not decode: {exc}") from exc
        if (knowledge.task, knowledge.meta.agent_id) != (entry.task, entry.agent) \
                or entry.content_hash not in (knowledge.content_hash(),
                                              knowledge.content_hash(explicit_bb_split=True)):
            raise BankCorruptError(f"{_what(entry)}: record {entry.record[:12]} holds different knowledge "
                                   "than the index says")
        return knowledge

    def _quarantine_entry(self, qid: str, manifest_bytes: bytes) -> QuarantineEntry:
        m = json.loads(manifest_bytes)
        return QuarantineEntry(
            id=qid, task=m.get("task"), reason=str(m.get("reason", "")),
            quarantined_at=float(m.get("quarantined_at", 0.0)),
            bytes=len(manifest_bytes) + sum(int(f["bytes"]) for f in m["files"].values()),
            has_knowledge=TENSORS in m["files"], has_packet=PACKET in m["files"])

    # ------------------------------------------------------------------ internals: writing (lock held)
    @contextmanager
    def _locked(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the bank's writer lock; raise ``BankLockedError`` after ``timeout`` seconds of waiting."""
        lock_path = self.root / "lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise self._write_error("opening the bank's lock file", exc) from None
        try:
            wait = self.lock_timeout if timeout is None else timeout
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = lock_path.read_text().strip() or "unknown"
                        raise BankLockedError(
                            f"the bank at {self.root} is locked by another writer (pid {holder}) and stayed "
                            f"locked for {wait:.1f}s; retry when it has finished") from None
                    time.sleep(0.01)
            try:  # the pid only names the holder in error messages: a full disk must not stop the lock
                os.pwrite(fd, f"{os.getpid():<12}\n".encode(), 0)  # fixed width: no truncate, no block churn
            except OSError:
                pass
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _recover(self) -> _Index:
        """Bring the bank to a clean state after any crash; returns the index in force."""
        for leftover in self.staging_dir.iterdir():
            self._delete_now(leftover)
        index, source = self._read_index()
        try:
            if source == "index.prev.json":
                self._repair_index(index)
            elif source == "(empty)":
                self._write_index_file("index.json", index.to_bytes())
            if index.legacy:
                index = self._migrate(index)
        except OSError as exc:
            raise self._write_error("repairing the index", exc) from exc
        self._collect_garbage()
        return index

    def _migrate(self, legacy: _Index) -> _Index:
        """Rewrite a format /1 index as /2, taking each packet's sha256 from its record manifest."""
        tasks = {}
        for key, entry in legacy.tasks.items():
            digest = ""
            if entry.has_packet:
                with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                    manifest = json.loads((self.records_dir / entry.record / MANIFEST).read_bytes())
                    digest = str(manifest["files"][PACKET]["sha256"])
            tasks[key] = replace(entry, packet_sha256=digest)
        self._commit(legacy, tasks)
        return _Index(legacy.generation + 1, tasks)

    def _repair_index(self, prev: _Index) -> None:
        """index.json is missing or corrupt: salvage its records into quarantine, then reinstate prev."""
        bad = self.root / "index.json"
        if bad.exists():
            note = (f"{bad} failed its checksum (kept as index.json.corrupt); fell back to index.prev.json "
                    f"(generation {prev.generation})")
            for d in sorted(self.records_dir.iterdir()):  # records only the lost generation referenced
                if d.name in prev.records():
                    continue
                try:
                    files = self._read_record(self.records_dir, d.name, f"orphan record {d.name[:12]}")
                    manifest = json.loads((d / MANIFEST).read_bytes())
                except (OSError, BankError, ValueError):
                    continue  # an incomplete crash leftover: nothing to salvage
                q = self._quarantine_files(files, manifest.get("task"),
                                           f"salvaged after {bad.name} failed its checksum; it may be a newer "
                                           "version the lost index referenced", check_quota=False)
                note += f"; record for task {manifest.get('task')!r} moved to quarantine {q.id[:12]}"
            os.replace(bad, self.root / "index.json.corrupt")
            self._repaired.append(note)
        self._write_index_file("index.json", prev.to_bytes())

    def _store_record(self, area: Path, record: str, files: dict[str, bytes], manifest: bytes) -> bool:
        """Write a record in staging, fsync everything, rename it into ``area/record``.

        Returns False when an intact identical record was already there (nothing written).
        """
        final = area / record
        if final.exists():
            try:
                self._read_record(area, record, "existing copy", missing_ok=False)
                return False
            except BankError:
                self._delete_dir(final)
        tmp = self.staging_dir / f"{record}.{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            for name, data in files.items():
                _write_durably(tmp / name, data)
            _write_durably(tmp / MANIFEST, manifest)
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(area)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def _commit(self, old: _Index, tasks: dict[TaskKey, BankEntry],
                removed: dict[TaskKey, RemovedTask] | None = None) -> None:
        """Make ``tasks`` (and ``removed``, default unchanged) the current generation; the old one
        becomes the fallback."""
        self._write_index_file("index.prev.json", old.to_bytes())
        new = _Index(old.generation + 1, tasks, removed=old.removed if removed is None else removed)
        self._write_index_file("index.json", new.to_bytes())

    def _write_index_file(self, name: str, data: bytes) -> None:
        tmp = self.staging_dir / f"{name}.{secrets.token_hex(4)}"
        try:
            _write_durably(tmp, data)
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def _quarantine_files(self, files: dict[str, bytes], task: str | None, reason: str, *,
                          check_quota: bool = True) -> QuarantineEntry:
        manifest, qid = _build_record("quarantine", files, task=task, reason=reason,
                                      quarantined_at=time.time())
        size = len(manifest) + sum(len(b) for b in files.values())
        if check_quota:
            self._check_quota(f"quarantined item for task {task!r}", size, freed=0)
        try:
            self._store_record(self.quarantine_dir, qid, files, manifest)
        except OSError as exc:
            raise self._write_error(f"quarantining an item for task {task!r} ({size:,} bytes)", exc) from exc
        return self._quarantine_entry(qid, manifest)

    def _collect_garbage(self) -> None:
        """Delete record dirs neither index generation references (best effort: leftovers wait)."""
        keep: set[str] = set()
        for name in ("index.json", "index.prev.json"):
            try:
                keep |= _Index.from_bytes((self.root / name).read_bytes()).records()
            except (OSError, ValueError, KeyError, TypeError):
                pass
        for d in self.records_dir.iterdir():
            if d.name not in keep:
                try:
                    self._delete_dir(d)
                except OSError:
                    pass

    def _delete_dir(self, path: Path) -> None:
        """Remove a record dir so that no half-deleted copy stays under its real name."""
        trash = self.staging_dir / f"trash.{path.name}.{secrets.token_hex(4)}"
        os.rename(path, trash)
        self._delete_now(trash)

    @staticmethod
    def _delete_now(path: Path) -> None:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _check_quota(self, what: str, size: int, *, freed: int) -> None:
        if self.quota_bytes is None:
            return
        used = self.used_bytes()
        if used - freed + size > self.quota_bytes:
            raise BankQuotaError(
                f"storing {what} needs {size:,} bytes, but the bank at {self.root} already uses {used:,} of its "
                f"{self.quota_bytes:,}-byte quota ({freed:,} would be freed by the replaced version); remove "
                "tasks or quarantined items, or raise the quota")

    def _write_error(self, what: str, exc: OSError) -> BankError:
        if exc.errno == errno.ENOSPC:
            return BankError(f"disk full while {what} in {self.root}: {exc}. The bank is unchanged; free "
                             "some space and retry")
        return BankError(f"I/O error while {what} in {self.root}: {exc}. The bank is unchanged")
