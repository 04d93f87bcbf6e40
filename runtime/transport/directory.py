"""Packets as files in a shared folder: the embedded default (NFS/SMB share, USB stick, rsync target).

Layout: ``<root>/<fleet>/<task>/<agent_id>-<seq>.skp`` (task and agent id percent-encoded where
they hold characters unsafe in file names, see ``base.encode_segment``).  A writer never leaves a half-written
``.skp`` behind: it writes a hidden temp file in the same folder, fsyncs it, renames it into
place and fsyncs the folder.  A reader still tolerates files copied in by other tools (``cp``
onto a stick): a file whose size or mtime changes while it is read is skipped and read again
on a later scan; hidden and ``*.tmp`` files are ignored.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from .base import ReceivedPacket, Transport, TransportError, check_name, decode_segment, encode_segment

log = logging.getLogger(__name__)

PACKET_SUFFIX = ".skp"
_FILE_NAME = re.compile(r"^(?P<agent>.+)-(?P<seq>\d+)\.skp$")

FileSignature = tuple[int, int]  # (size, mtime_ns): changes whenever the file is rewritten


def packet_path(root: Path, fleet: str, task: str, agent_id: str, seq: int) -> Path:
    """Where the packet of ``agent_id`` for ``task`` (version ``seq``) lives under ``root``."""
    check_name("fleet", fleet)
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    return (Path(root) / fleet / encode_segment("task", task)
            / f"{encode_segment('agent_id', agent_id)}-{int(seq)}{PACKET_SUFFIX}")


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either nothing or all of it, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DirectoryTransport(Transport):
    """Publish into and scan ``<root>/<fleet>/`` for packet files.

    ``state_file`` (optional) remembers which files were already delivered, so a later run (a
    one-shot ``skill-edge sync``) does not hand the same files to the receiver again.
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
        self._seen: dict[str, FileSignature] = self._load_state()
        self._warned: set[str] = set()
        try:
            (self.root / self.fleet).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TransportError(f"cannot create packet folder {self.root / self.fleet}: {exc}") from exc

    # ------------------------------------------------------------------ publish
    def publish(self, packet_bytes: bytes, *, fleet: str, task: str, agent_id: str, seq: int) -> None:
        self._check_open()
        path = packet_path(self.root, fleet, task, agent_id, seq)
        try:
            write_atomically(path, bytes(packet_bytes))
        except OSError as exc:
            raise TransportError(f"cannot write packet {path}: {exc}") from exc
        if fleet == self.fleet:  # our own packet: never hand it back to ourselves
            self._seen[self._key(path)] = _signature(path.stat())
            self._save_state()

    # ------------------------------------------------------------------ receive
    def poll(self, timeout: float = 0.0) -> list[ReceivedPacket]:
        self._check_open()
        deadline = time.monotonic() + timeout
        while True:
            found = self._scan()
            if found:
                self.last_activity = time.monotonic()
                self._save_state()
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
                if self._seen.get(key) == before:
                    continue
                if before[0] == 0:
                    continue  # being created by a non-atomic writer
                if before[0] > self.max_packet_bytes:
                    self._warn_once(path, f"{before[0]} bytes is over the {self.max_packet_bytes}-byte limit")
                    continue
                data = path.read_bytes()
                after = _signature(path.stat())
            except FileNotFoundError:
                continue  # renamed or removed between listing and reading
            except OSError as exc:
                self._warn_once(path, f"unreadable: {exc}")
                continue
            if after != before or len(data) != after[0]:
                continue  # still being written: read it on a later scan
            self._seen[key] = after
            out.append(ReceivedPacket(data=data, fleet=self.fleet, task=decode_segment(path.parent.name),
                                      agent_id=decode_segment(m["agent"]), seq=int(m["seq"]), origin=str(path)))
        return out

    def forget(self, packet: ReceivedPacket) -> None:
        """Deliver this file again, ``retry_delay`` s from now (so a lasting failure does not spin)."""
        try:
            key = self._key(Path(packet.origin))
        except ValueError:
            return  # not a file of this transport
        self._seen.pop(key, None)
        self._retry_at[key] = time.monotonic() + self.retry_delay
        self._save_state()

    # ------------------------------------------------------------------ bookkeeping
    def close(self) -> None:
        if not self.closed:
            self._save_state()
            self.closed = True

    def _key(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError("directory transport is closed")

    def _warn_once(self, path: Path, why: str) -> None:
        if str(path) not in self._warned:
            self._warned.add(str(path))
            log.warning("skipping %s: %s", path, why)

    def _load_state(self) -> dict[str, FileSignature]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            raw = json.loads(self.state_file.read_text())
            if raw.get("root") != str(self.root):
                return {}  # state of another shared folder: start fresh
            return {str(k): (int(v[0]), int(v[1])) for k, v in raw["seen"].items()}
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            log.warning("ignoring unreadable transport state %s (%s); rescanning everything",
                        self.state_file, exc)
            return {}

    def _save_state(self) -> None:
        if self.state_file is None:
            return
        payload = json.dumps({"root": str(self.root), "seen": self._seen}, sort_keys=True)
        write_atomically(self.state_file, payload.encode())


def _signature(st: os.stat_result) -> FileSignature:
    return (int(st.st_size), int(st.st_mtime_ns))
