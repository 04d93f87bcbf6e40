"""Packets as files in a shared folder: the embedded default (NFS/SMB share, USB stick, rsync target).

Layout: ``<root>/<fleet>/<task>/<agent_id>-<seq>.skp`` (task and agent id percent-encoded where
they hold characters unsafe in file names, see ``base.encode_segment``).  A writer never leaves a half-written
``.skp`` behind: it writes a hidden temp file in the same folder, fsyncs it, renames it into
place and fsyncs the folder.  A reader still tolerates files copied in by other tools (``cp``
onto a stick): a file whose size or mtime changes while it is read is skipped and read again
on a later scan; hidden and ``*.tmp`` files are ignored.

Delivery state: a file is recorded as delivered (in ``state_file``, rewritten atomically) only
when the caller acks it, i.e. after the bank stored, rejected or quarantined it; a file that
was offered when the device died is offered again by the next run.  Each record keeps the
file's (size, mtime) and the ack's ``hold``, if any, so a rewritten file is offered again and
so is one whose hold is released.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from skill_edge.runtime.atomic import write_atomically

from .base import ReceivedPacket, Transport, TransportError, check_name, decode_segment, encode_segment

log = logging.getLogger(__name__)

PACKET_SUFFIX = ".skp"
_FILE_NAME = re.compile(r"^(?P<agent>.+)-(?P<seq>\d+)\.skp$")

FileSignature = tuple[int, int]  # (size, mtime_ns): changes whenever the file is rewritten


@dataclass(frozen=True)
class Delivered:
    """One acked file: the version that was handled, and the hold it was acked with (if any)."""

    signature: FileSignature
    hold: str | None = None


def packet_path(root: Path, fleet: str, task: str, agent_id: str, seq: int) -> Path:
    """Where the packet of ``agent_id`` for ``task`` (version ``seq``) lives under ``root``."""
    check_name("fleet", fleet)
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    return (Path(root) / fleet / encode_segment("task", task)
            / f"{encode_segment('agent_id', agent_id)}-{int(seq)}{PACKET_SUFFIX}")


class DirectoryTransport(Transport):
    """Publish into and scan ``<root>/<fleet>/`` for packet files.

    ``state_file`` (optional) remembers which files were already delivered (acked), so a later
    run (a one-shot ``skill-edge sync``) does not hand the same files to the receiver again.
    """

    def __init__(
        self,
        root: str | Path,
        fleet: str,
        *,
        state_file: str | Path | None = None,
        scan_interval: float = 0.2,
        max_packet_bytes: int = 256 * 1024 * 1024,
        retry_delay: float = 30.0,
    ) -> None:
        self.root = Path(root)
        self.fleet = check_name("fleet", fleet)
        self.scan_interval = scan_interval
        self.max_packet_bytes = max_packet_bytes
        self.retry_delay = retry_delay
        self._retry_at: dict[str, float] = {}  # forgotten files: not before this monotonic time
        self.state_file = Path(state_file) if state_file else None
        self._seen: dict[str, Delivered] = self._load_state()  # acked files (persisted)
        self._offered: dict[str, FileSignature] = {}  # polled, not yet acked (this object only)
        self._warned: set[str] = set()
        self._faults = 0  # packet files skipped as oversized or unreadable
        try:
            (self.root / self.fleet).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create packet folder {self.root / self.fleet}: {exc}") from exc

    # ------------------------------------------------------------------ publish
    def publish(self, packet_bytes: bytes, *, fleet: str, task: str, agent_id: str, seq: int) -> None:
        self._check_open()
        path = packet_path(self.root, fleet, task, agent_id, seq)
        data = bytes(packet_bytes)
        try:
            if not _holds(path, data):  # an identical file stays: rewriting it would re-offer it to every peer
                write_atomically(path, data)
        except OSError as exc:
            raise TransportError(f"cannot write packet {path}: {exc}") from exc
        if fleet == self.fleet:  # our own packet: never hand it back to ourselves
            self._seen[self._key(path)] = Delivered(_signature(path.stat()))
            self._save_state()

    # ------------------------------------------------------------------ receive
    def poll(self, timeout: float = 0.0) -> list[ReceivedPacket]:
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            found = self._scan()
            if found:
                self.last_activity = time.monotonic()
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            time.sleep(min(self.scan_interval, remaining))

    def _scan(self) -> list[ReceivedPacket]:
        out: list[ReceivedPacket] = []
        fleet_dir = self.root / self.fleet
        for path in sorted(fleet_dir.glob(f"*/*{PACKET_SUFFIX}")):
            if path.name.startswith(".") or path.parent.name.startswith("."):
                continue
            m = _FILE_NAME.match(path.name)
            if m is None:
                self._warn_once(path, "name is not <agent>-<seq>.skp; ignored")
                continue
            key = self._key(path)
            if key in self._retry_at:
                if time.monotonic() < self._retry_at[key]:
                    continue
                del self._retry_at[key]
            try:
                before = _signature(path.stat())
                done = self._seen.get(key)
                if (done is not None and done.signature == before) or self._offered.get(key) == before:
                    continue
                if before[0] == 0:
                    continue  # being created by a non-atomic writer
                if before[0] > self.max_packet_bytes:
                    self._warn_once(path, f"{before[0]} bytes is over the {self.max_packet_bytes}-byte limit",
                                    fault=True)
                    continue
                data = path.read_bytes()
                after = _signature(path.stat())
            except FileNotFoundError:
                continue  # renamed or removed between listing and reading
            except OSError as exc:
                self._warn_once(path, f"unreadable: {exc}", fault=True)
                continue
            if after != before or len(data) != after[0]:
                continue  # still being written: read it on a later scan
            self._offered[key] = after
            out.append(ReceivedPacket(data=data, fleet=self.fleet, task=decode_segment(path.parent.name),
                                      agent_id=decode_segment(m["agent"]), seq=int(m["seq"]), origin=str(path)))
        return out

    def ack(self, packet: ReceivedPacket, *, hold: str | None = None) -> None:
        """Record the file as delivered, durably (fsynced) before returning."""
        key = self._key_of(packet)
        if key is None or key not in self._offered:
            return  # not a file of this transport, or acked already
        self._seen[key] = Delivered(self._offered.pop(key), hold)
        self._save_state()

    def release_holds(self, current: str) -> None:
        released = [k for k, d in self._seen.items() if d.hold is not None and d.hold != current]
        for key in released:
            del self._seen[key]
        if released:
            log.info("offering %d held packet file(s) again", len(released))
            self._save_state()

    def reoffer(self, task: str, agent_id: str) -> None:
        folder, agent = encode_segment("task", task), encode_segment("agent_id", agent_id)
        again = [k for k in self._seen if _parts_of(k) == (self.fleet, folder, agent)]
        for key in again:
            del self._seen[key]
        if again:
            self._save_state()

    def forget(self, packet: ReceivedPacket) -> None:
        """Deliver this file again, ``retry_delay`` s from now (so a lasting failure does not spin)."""
        key = self._key_of(packet)
        if key is None:
            return
        self._offered.pop(key, None)
        if self._seen.pop(key, None) is not None:
            self._save_state()
        self._retry_at[key] = time.monotonic() + self.retry_delay

    def faults(self) -> int:
        return self._faults

    # ------------------------------------------------------------------ bookkeeping
    def close(self) -> None:
        if not self.closed:
            self._save_state()
            self.closed = True

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _key_of(self, packet: ReceivedPacket) -> str | None:
        try:
            return self._key(Path(packet.origin))
        except ValueError:
            return None  # not a file of this transport

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError("directory transport is closed")

    def _warn_once(self, path: Path, why: str, *, fault: bool = False) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            self._faults += fault
            log.warning("skipping %s: %s", path, why)

    def _load_state(self) -> dict[str, Delivered]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            raw = json.loads(self.state_file.read_text())
            if raw.get("root") != str(self.root):
                return {}  # state of another shared folder: start fresh
            # [size, mtime_ns] or [size, mtime_ns, hold]: files written before holds existed still load
            return {str(k): Delivered((int(v[0]), int(v[1])), str(v[2]) if len(v) > 2 and v[2] is not None else None)
                    for k, v in raw["seen"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignoring unreadable transport state %s (%s); rescanning everything",
                        self.state_file, exc)
            return {}

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        seen = {k: [*d.signature, d.hold] if d.hold is not None else list(d.signature) for k, d in self._seen.items()}
        payload = json.dumps({"root": str(self.root), "seen": seen}, sort_keys=True)
        try:
            write_atomically(self.state_file, payload.encode())
        except OSError as exc:
            raise TransportError(f"cannot record delivered packets in {self.state_file}: {exc}") from exc


def _parts_of(key: str) -> tuple[str, str, str] | None:
    """(fleet, task folder, agent) of a state key ``<fleet>/<task>/<agent>-<seq>.skp``, encoded as on disk."""
    parts = key.split("/")
    m = _FILE_NAME.match(parts[-1])
    return (parts[0], parts[1], m["agent"]) if len(parts) == 3 and m else None


def _holds(path: Path, data: bytes) -> bool:
    """Whether ``path`` already holds exactly ``data``.

    A device that restarts publishes its stored packets again under the same names.  Peers know a
    delivered file by its size and mtime, so a byte-identical rewrite would still be read again by each
    of them (wire bytes and a duplicate verdict for nothing); leaving the file alone avoids that."""
    try:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    except FileNotFoundError:
        return False


def _signature(st: os.stat_result) -> FileSignature:
    return (int(st.st_size), int(st.st_mtime_ns))
