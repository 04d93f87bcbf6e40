"""Receive-side acceptance policy: which packets may teach this device.

A packet is accepted only if, in this order:

1. it parses (``PacketCodec.decode``), is signed, its signer is in the trust store and the
   signature verifies (checked before anything inside the packet is interpreted);
2. its ROM fingerprint is this device's: knowledge learned on another backbone is meaningless here;
3. it is new: the same bytes accepted before are a no-op ("duplicate"); an older sequence number
   than one already accepted for the same (agent, task) is a rollback and rejected (as TUF does
   for metadata versions); the same sequence number with different bytes is an equivocating
   sender and rejected too.  "Already accepted" is what the state file says *or* what the bank
   holds for that (agent, task) (``bank=``): the bank record carries its seq, so deleting the
   state file does not re-open rollbacks.  A packet accepted before whose task has since left
   the bank (``bank rm``) is accepted again, so a removed task can come back;
4. its agent id belongs to its signer: the first accepted packet of an agent id binds that id to
   the signing key (trust on first use, kept in the state file), and a packet naming that agent
   but signed by another trusted key is rejected ("agent-key-mismatch"), so one trusted peer
   cannot replace another peer's tasks by claiming its agent id;
5. the optional ``plausibility`` check (hijack detection) passes, else it is "quarantined".

The (agent, task) -> newest sequence number state lives in one small JSON file, rewritten
atomically (tmp + fsync + rename) under a lock, so a crash or a second process never
loses or corrupts it.  The bank is not touched here: pass ``on_accept`` to store the
knowledge; the state is only committed after it returns, so a failed store is retried
the next time the packet arrives instead of being swallowed as a duplicate.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from skill_edge.runtime.atomic import write_atomically
from skill_edge.runtime.exchange.keys import TrustStore
from skill_edge.runtime.knowledge.records import KnowledgeError, RomShape, TaskKnowledge
from skill_edge.runtime.exchange.packet import MAX_PACKET_BYTES, Packet, PacketCodec, PacketError

log = logging.getLogger(__name__)

STATE_FILE = "receive_state.json"
STATE_VERSION = 1
REMEMBERED_DIGESTS = 16  # per (agent, task): how many accepted packets are still recognised as duplicates

Status = Literal["accepted", "duplicate", "rejected", "quarantined"]
Plausibility = Callable[[TaskKnowledge], tuple[bool, str]]


class _BankEntryLike(Protocol):
    task: str
    agent: str
    seq: int
    content_hash: str


class BankIndex(Protocol):
    """What the receiver reads of the bank: its index (``KnowledgeBank.entries``)."""

    def entries(self) -> list[_BankEntryLike]: ...


@dataclass(frozen=True)
class HeldVersion:
    """The version of one (agent, task) the bank holds: a rollback floor that lives with the knowledge."""

    seq: int
    content_hash: str
    packet_sha256: str = ""  # "" for records stored without their packet bytes

    def is_packet(self, packet: Packet) -> bool:
        if self.seq != packet.seq:
            return False
        if self.packet_sha256:
            return self.packet_sha256 == packet.sha256
        return self.content_hash == packet.knowledge.content_hash()


class ReceiveStateError(RuntimeError):
    """The state file is unreadable; it is never silently reset, since that would re-open rollbacks."""


@dataclass(frozen=True)
class ReceiveResult:
    status: Status
    reason: str
    packet: Packet | None = None  # None when the bytes did not even decode
    code: str = ""  # PacketError code or policy code ("rollback", "wrong-rom", ...)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"


@dataclass
class StreamState:
    """What has been accepted for one (agent, task)."""

    seq: int
    digests: list[str]  # sha256 of accepted packets, newest last
    signer: str = ""  # hex key id that signed them: binds the agent id to a key ("" in files before it)


class ReceiveState:
    """The (agent, task) -> newest accepted sequence number file, in ``directory``."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / STATE_FILE

    @contextmanager
    def locked(self) -> Iterator[dict[tuple[str, str], StreamState]]:
        """Read-modify-write under an exclusive lock; changes to the yielded dict are saved on exit."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / (STATE_FILE + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                streams = self.load()
                before = json.dumps(self._to_json(streams), sort_keys=True)
                yield streams
                if json.dumps(self._to_json(streams), sort_keys=True) != before:
                    self._save(streams)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> dict[tuple[str, str], StreamState]:
        if not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
            return {(s["agent"], s["task"]): StreamState(int(s["seq"]), [str(d) for d in s["digests"]],
                                                         str(s.get("signer", "")))
                    for s in raw["streams"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReceiveStateError(
                f"receive state {self.path} is unreadable ({type(exc).__name__}: {exc}); fix or restore it. "
                f"Deleting it forgets every accepted sequence number and so re-allows rollbacks") from exc

    @staticmethod
    def _to_json(streams: dict[tuple[str, str], StreamState]) -> dict:
        return {"version": STATE_VERSION,
                "streams": [{"agent": a, "task": t, "seq": s.seq, "digests": s.digests,
                             **({"signer": s.signer} if s.signer else {})}
                            for (a, t), s in sorted(streams.items())]}

    def _save(self, streams: dict[tuple[str, str], StreamState]) -> None:
        data = json.dumps(self._to_json(streams), indent=1, sort_keys=True).encode()
        write_atomically(self.path, data)

    def latest(self, agent_id: str, task: str) -> int | None:
        s = self.load().get((agent_id, task))
        return s.seq if s else None


class PacketReceiver:
    """Applies the acceptance policy above to incoming packet bytes."""

    def __init__(self, trust: TrustStore, rom_fingerprint: str, state: ReceiveState | str | Path,
                 plausibility: Plausibility | None = None, codec: PacketCodec | None = None,
                 rom_shape: RomShape | None = None, bank: BankIndex | None = None) -> None:
        if rom_shape is not None and rom_shape.fingerprint != rom_fingerprint:
            raise ValueError("rom_shape is of another ROM than rom_fingerprint")
        self.rom_shape = rom_shape  # the device's own widths (RomShape.from_manifest); None: not checked
        self.trust = trust
        self.rom_fingerprint = rom_fingerprint
        self.state = state if isinstance(state, ReceiveState) else ReceiveState(state)
        self.plausibility = plausibility
        self.codec = codec or PacketCodec()
        self.bank = bank  # the bank this receiver feeds: its records are the second rollback floor

    def receive(self, data: bytes, on_accept: Callable[[Packet, bytes], None] | None = None) -> ReceiveResult:
        """Decide what to do with one packet.  ``on_accept(packet, data)`` (e.g. storing into the bank)
        runs before the acceptance is recorded; if it raises, nothing is recorded and the error propagates."""
        if len(data) > MAX_PACKET_BYTES:
            return self._reject(f"oversized: {len(data)} bytes, the limit is {MAX_PACKET_BYTES}", "oversized")
        try:
            packet = self.codec.decode(data, trust=self.trust)
        except PacketError as exc:
            return self._reject(exc.reason, exc.code)
        who = f"task {packet.task!r} seq {packet.seq} from agent {packet.agent_id!r} (signed by {packet.verified_by})"
        if packet.rom_fingerprint != self.rom_fingerprint:
            return self._reject(f"{who}: learned on ROM {packet.rom_fingerprint[:16]}..., this device runs "
                                f"{self.rom_fingerprint[:16]}...; its features would not match", "wrong-rom", packet)
        try:
            if self.rom_shape is not None:
                packet.knowledge.check_rom_shape(self.rom_shape)
        except KnowledgeError as exc:
            return self._reject(f"{who}: {exc}", "wrong-shape", packet)
        with self.state.locked() as streams:
            stream = streams.get((packet.agent_id, packet.task))
            held = self._held(packet)
            known = stream is not None and packet.sha256 in stream.digests
            if held is not None and held.is_packet(packet):
                if not known:  # stored, then the state write was cut short (or the state file was lost)
                    streams[(packet.agent_id, packet.task)] = _with(stream, packet)
                log.info("duplicate %s: the bank holds it", who)
                return ReceiveResult("duplicate", f"{who}: already accepted (the bank holds it)", packet,
                                     "duplicate")
            stale = stream is not None and packet.seq < stream.seq
            if known and (self.bank is None or stale or (held is not None and held.seq >= packet.seq)):
                log.info("duplicate %s: already accepted", who)
                return ReceiveResult("duplicate", f"{who}: already accepted", packet, "duplicate")
            # known here: the newest accepted packet, but the bank no longer holds it (bank rm): take it again
            floors = [(stream.seq, "was already accepted")] if stream is not None else []
            floors += [(held.seq, "is in the bank")] if held is not None else []
            floor, where = max(floors, default=(-1, ""))
            if packet.seq < floor:
                return self._reject(f"{who}: rollback, seq {floor} {where} for this agent and task", "rollback",
                                    packet)
            if packet.seq == floor and not known:
                return self._reject(f"{who}: a different packet with the same seq {where} "
                                    f"(the sender must increase seq for every new version)", "equivocation",
                                    packet)
            bound = {st.signer for (agent, _), st in streams.items() if agent == packet.agent_id and st.signer}
            if bound and packet.signer not in bound:
                return self._reject(f"{who}: agent {packet.agent_id!r} is bound to key "
                                    f"{', '.join(sorted(k[:16] for k in bound))}, not {(packet.signer or '')[:16]}; "
                                    f"a peer may not speak for another agent", "agent-key-mismatch", packet)
            if self.plausibility is not None:
                ok, why = self.plausibility(packet.knowledge)
                if not ok:
                    log.info("quarantined %s: %s", who, why)
                    return ReceiveResult("quarantined", f"{who}: {why}", packet, "implausible")
            if on_accept is not None:
                on_accept(packet, data)
            streams[(packet.agent_id, packet.task)] = _with(stream, packet)
        log.info("accepted %s", who)
        return ReceiveResult("accepted", f"{who}: accepted", packet, "accepted")

    def _held(self, packet: Packet) -> HeldVersion | None:
        """What the bank holds for the packet's (agent, task), if this receiver has a bank."""
        if self.bank is None:
            return None
        for e in self.bank.entries():
            if e.agent == packet.agent_id and e.task == packet.task:
                return HeldVersion(int(e.seq), e.content_hash, getattr(e, "packet_sha256", "") or "")
        return None

    @staticmethod
    def _reject(reason: str, code: str, packet: Packet | None = None) -> ReceiveResult:
        # INFO: the caller reports the decision (SyncService as one event); a warning here printed it twice
        log.info("rejected packet: %s", reason)
        return ReceiveResult("rejected", reason, packet, code)


def _with(stream: StreamState | None, packet: Packet) -> StreamState:
    """The stream after accepting ``packet``: its digest remembered (the newest few), its seq the floor
    unless the stream already knew a newer one."""
    digests = [d for d in (stream.digests if stream else []) if d != packet.sha256] + [packet.sha256]
    return StreamState(max(packet.seq, stream.seq if stream else -1), digests[-REMEMBERED_DIGESTS:],
                       (stream.signer if stream and stream.signer else "") or (packet.signer or ""))
