"""The on-device knowledge bank: every task a device knows, stored so that a crash cannot corrupt it.

A record is exactly the pair a knowledge packet carries -- ``TaskKnowledge.metadata()`` as JSON and
``TaskKnowledge.tensors()`` as one safetensors file -- plus, optionally, the raw packet bytes it was
decoded from.  Nothing is ever pickled.

On-disk layout (``root`` is e.g. ``~/.skill-edge/bank``)::

    lock                    flock()ed by the single writer; holds its pid for error messages
    index.json              current generation: task -> record hash + summary; sha256 of itself inside
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from skill_edge.runtime.knowledge import KnowledgeError, TaskKnowledge

INDEX_FORMAT = "skill-edge-bank-index/1"
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
    tasks: dict[str, BankEntry]

    def to_bytes(self) -> bytes:
        body = {"format": INDEX_FORMAT, "generation": self.generation,
                "tasks": {t: asdict(e) for t, e in sorted(self.tasks.items())}}
        return json.dumps({**body, "sha256": _index_digest(body)}, sort_keys=True, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "_Index":
        """Parse and check the embedded sha256; raises ``ValueError`` on any mismatch."""
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("format") != INDEX_FORMAT:
            raise ValueError("not a skill-edge bank index")
        claimed = doc.pop("sha256", None)
        if claimed != _index_digest(doc):
            raise ValueError("checksum mismatch")
        tasks = {t: BankEntry(**{**e, "anchors": tuple(e["anchors"])}) for t, e in doc["tasks"].items()}
        return cls(int(doc["generation"]), tasks)

    def records(self) -> set[str]:
        return {e.record for e in self.tasks.values()}


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
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
        """Every stored task, sorted by name (from the index alone)."""
        index, _ = self._read_index()
        return [index.tasks[t] for t in sorted(index.tasks)]

    def __contains__(self, task: str) -> bool:
        return task in self._read_index()[0].tasks

    def get(self, task: str) -> TaskKnowledge:
        """The task's knowledge, every byte checked against its sha256 first."""
        entry, files = self._read_live(task)
        return self._knowledge_from(entry, files)

    def packet_bytes(self, task: str) -> bytes | None:
        """The packet bytes the task was stored with, or None."""
        _, files = self._read_live(task)
        return files.get(PACKET)

    def load_all(self) -> list[TaskKnowledge]:
        """Every task, from one consistent index generation; raises on the first corrupt record."""
        for _ in range(5):
            index, _ = self._read_index()
            try:
                return [self._knowledge_from(e, self._read_record(self.records_dir, e.record, f"task {e.task!r}"))
                        for _, e in sorted(index.tasks.items())]
            except FileNotFoundError:
                if self._read_index()[0].generation == index.generation:
                    raise BankCorruptError(f"a record listed in {self.root / 'index.json'} is missing")
        raise BankError(f"the bank at {self.root} kept changing while loading; try again")

    def used_bytes(self) -> int:
        """Bytes the quota counts: live records plus quarantined items (file sizes, not disk blocks)."""
        index, _ = self._read_index()
        return sum(e.bytes for e in index.tasks.values()) + sum(q.bytes for q in self.quarantined())

    # ------------------------------------------------------------------ writing
    def put(self, knowledge: TaskKnowledge, *, packet_bytes: bytes | None = None) -> BankEntry:
        """Store ``knowledge``, atomically replacing any task of the same name."""
        knowledge.validate()
        task = knowledge.task
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
            has_packet=packet_bytes is not None)
        with self._locked():
            index = self._recover()
            old = index.tasks.get(task)
            self._check_quota(f"task {task!r}", size, freed=old.bytes if old else 0)
            created = False
            try:
                created = self._store_record(self.records_dir, record, files, manifest)
                self._commit(index, {**index.tasks, task: entry})
            except OSError as exc:
                if created:
                    with contextlib.suppress(OSError):
                        self._delete_dir(self.records_dir / record)
                raise self._write_error(f"storing task {task!r} ({size:,} bytes)", exc) from exc
            self._collect_garbage()
        return entry

    def remove(self, task: str) -> None:
        """Forget a task (atomically); raises ``UnknownTaskError`` if there is none."""
        with self._locked():
            index = self._recover()
            if task not in index.tasks:
                raise UnknownTaskError(f"no task {task!r} in the bank at {self.root}")
            try:
                self._commit(index, {t: e for t, e in index.tasks.items() if t != task})
            except OSError as exc:
                raise self._write_error(f"removing task {task!r}", exc) from exc
            self._collect_garbage()

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
                for task, entry in sorted(live.tasks.items()):
                    try:
                        self._knowledge_from(entry, self._read_record(self.records_dir, entry.record, f"task {task!r}",
                                                                      missing_ok=False))
                        report.tasks_checked.append(task)
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

    def _read_live(self, task: str) -> tuple[BankEntry, dict[str, bytes]]:
        """Index entry + checked files; re-reads the index if a writer replaced the record meanwhile."""
        for _ in range(5):
            index, _ = self._read_index()
            if task not in index.tasks:
                raise UnknownTaskError(f"no task {task!r} in the bank at {self.root}")
            entry = index.tasks[task]
            try:
                return entry, self._read_record(self.records_dir, entry.record, f"task {task!r}")
            except FileNotFoundError:
                if self._read_index()[0].generation == index.generation:
                    raise BankCorruptError(
                        f"task {task!r}: record directory {self.records_dir / entry.record} is missing") from None
        raise BankError(f"task {task!r} kept changing while being read from {self.root}; try again")

    def _read_record(self, area: Path, record: str, what: str, *, missing_ok: bool = True) -> dict[str, bytes]:
        """All files of one record, each checked against the manifest, the manifest against ``record``.

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
            raise BankCorruptError(f"task {entry.task!r}: record {entry.record[:12]} does not decode: {exc}") from exc
        if knowledge.task != entry.task or knowledge.content_hash() != entry.content_hash:
            raise BankCorruptError(f"task {entry.task!r}: record {entry.record[:12]} holds different knowledge "
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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
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
            os.pwrite(fd, f"{os.getpid():<12}\n".encode(), 0)  # fixed width: no truncate, no block churn
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
        except OSError as exc:
            raise self._write_error("repairing the index", exc) from exc
        self._collect_garbage()
        return index

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
            _fsync_dir(tmp)
            os.rename(tmp, final)
            _fsync_dir(area)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return True

    def _commit(self, old: _Index, tasks: dict[str, BankEntry]) -> None:
        """Make ``tasks`` the current generation; the old one becomes the fallback."""
        self._write_index_file("index.prev.json", old.to_bytes())
        self._write_index_file("index.json", _Index(old.generation + 1, tasks).to_bytes())

    def _write_index_file(self, name: str, data: bytes) -> None:
        tmp = self.staging_dir / f"{name}.{secrets.token_hex(4)}"
        try:
            _write_durably(tmp, data)
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

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
