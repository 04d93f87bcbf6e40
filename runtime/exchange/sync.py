"""Keep a device's bank in step with its fleet: publish its own packets, take in everyone else's.

``SyncService`` glues three parts that know nothing of each other:

* a ``Transport`` (shared folder or MQTT broker) that moves opaque packet bytes;
* a ``PacketReceiver`` that decides, per packet, "accepted" / "duplicate" / "rejected" /
  "quarantined" (signature, ROM, rollback, plausibility);
* the ``KnowledgeBank`` that stores what was accepted (atomically, via the receiver's
  ``on_accept`` hook, so the receiver only records a packet as seen once it is stored).

Outgoing packets come from the bank: every task the device learned itself (``own``) is
stored with its signed packet, and ``sync_once`` / ``run`` publish those (a broker restarted
empty is refilled by the next sync; a ``learn`` killed before it wrote its outbox file loses
nothing).  An *outbox* folder is still honoured: any ``*.skp`` file put there is published
and, once the transport holds it durably, moved to ``outbox/sent/``.  The device's own
packets that come back from the transport (their sha256 is an own bank task's packet, is in
``sent/`` or was published by this service) are skipped, and the bank never lets another
agent's packet replace an own task (``OwnTaskError``: reported as "rejected").

The receive order: the transport offers a packet, the receiver decides, the bank stores it
(accepted) or keeps it aside (quarantined), or it is rejected; only *then* is the packet acked
to the transport (``Transport.ack``), which records it as delivered.  A device killed anywhere
in between is offered the packet again by its next run, and the receiver's duplicate check
makes the second look harmless.  A packet that could not be stored is not acked but
``forget``-ed (offered again later).  A packet rejected because its signer is not trusted is
acked with a *hold* on the trust store's fingerprint: once ``keys add`` changes the trust
store, it is offered again.

Quarantine is not final.  The plausibility check measures capture against the tasks the
device knows *now*; early in a sync it knows few, and its Mahalanobis tied covariance, pooled
from few exemplars, makes an honest sibling task (CIFAR-10 deer/dog next to bird/cat) look
like a hijack.  So whenever the bank has changed, quarantined packets get another look
(``recheck_quarantine``): one that passes is accepted and leaves quarantine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from skill_edge.runtime.knowledge.bank import BankError, KnowledgeBank, OwnTaskError
from skill_edge.runtime.exchange.keys import DeviceKey, KeyStoreError
from skill_edge.runtime.knowledge.records import TaskKnowledge
from skill_edge.runtime.exchange.packet import MAX_PACKET_BYTES, PacketCodec, PacketError
from skill_edge.runtime.exchange.receive import PacketReceiver, ReceiveStateError
from skill_edge.runtime.exchange.seq_ledger import SeqLedger
from skill_edge.runtime.exchange.transport import ReceivedPacket, Transport, TransportError

log = logging.getLogger(__name__)

#: Rejections that the trust store decided; such packets are offered again once it changes.
TRUST_CODES = frozenset({"unknown-signer"})
EventKind = Literal["published", "accepted", "released", "duplicate", "rejected", "quarantined", "own", "resigned",
                    "error"]
SENT_DIR = "sent"


@dataclass(frozen=True)
class SyncEvent:
    """One thing that happened to one packet; what the live view and the logs show."""

    kind: EventKind
    task: str
    agent_id: str
    seq: int
    size: int
    reason: str = ""
    origin: str = ""
    at: float = field(default_factory=time.time)


@dataclass
class SyncStats:
    published: int = 0
    arrived: int = 0  # packets the transport delivered (own ones included)
    accepted: int = 0
    duplicate: int = 0
    rejected: int = 0
    quarantined: int = 0
    released: int = 0  # quarantined packets accepted on a later look, once the bank had changed
    own: int = 0  # our own packets coming back: skipped
    resigned: int = 0  # own tasks signed again past a newer seq their key signed before (republish_outdated)
    errors: int = 0  # could not publish or store; the packet is retried later
    corrupt: int = 0  # messages the transport dropped as damaged (corrupt chunk, bad manifest, unreadable file)

    @property
    def failed(self) -> int:
        """Things that went wrong and are retried: publish / store errors plus damaged transfers."""
        return self.errors + self.corrupt

    @property
    def refused(self) -> int:
        """Packets the receiver turned down for good: rejected, or quarantined and not released later."""
        return self.rejected + max(0, self.quarantined - self.released)

    def count(self, kind: EventKind) -> None:
        attr = {"error": "errors"}.get(kind, kind)
        setattr(self, attr, getattr(self, attr) + 1)


class SyncService:
    """Publish the outbox and store what the fleet sends, through any ``Transport``."""

    def __init__(
        self,
        transport: Transport,
        bank: KnowledgeBank,
        receiver: PacketReceiver,
        *,
        fleet: str,
        outbox: str | Path | None = None,
        on_event: Callable[[SyncEvent], None] | None = None,
        signed_seqs: SeqLedger | None = None,
        republish_key: DeviceKey | None = None,
    ) -> None:
        """``signed_seqs``: the device key's seq ledger; an own task's version that comes back signed by
        this device with a newer seq than the bank's raises its floor there, so the next ``learn`` goes
        past it.  ``republish_key`` (the ``DeviceKey``; ``sync --republish-own``): such an own task is
        also signed again past that seq, from the bank's packet, and published (``republish_outdated``)."""
        self.transport = transport
        self.signed_seqs = signed_seqs
        self.republish_key = republish_key
        self.bank = bank
        self.receiver = receiver
        if receiver.bank is None:  # the bank's records are the receiver's second rollback floor
            receiver.bank = bank
        self.fleet = fleet
        self.outbox = Path(outbox) if outbox is not None else None
        self.on_event = on_event
        self.stats = SyncStats()
        self.events: list[SyncEvent] = []
        self._own: set[str] = set()  # sha256 of packets this device published
        self._published: set[str] = set()  # sha256 of packets this service published in this session
        self._codec = PacketCodec()
        self._checked_state: tuple | None = None  # the bank as quarantine was last rechecked against
        self._reoffered: set[tuple[str, str]] = set()  # (agent, task) received, not in the bank, re-offered
        self._trust_token: str | None = None  # the trust store's fingerprint as holds were last released
        self._faults_before = transport.faults()  # stats.corrupt counts this service's share only
        if self.outbox is not None:
            (self.outbox / SENT_DIR).mkdir(parents=True, exist_ok=True)
            for f in (self.outbox / SENT_DIR).glob("*.skp"):
                self._own.add(_sha256_file(f))

    # ------------------------------------------------------------------ outgoing
    def publish(self, data: bytes, origin: str = "") -> SyncEvent:
        """Publish one packet, addressed by its own (signed) header; raises on a bad packet or transport."""
        try:
            packet = self._codec.decode(data)  # header only matters here; peers verify the signature
        except PacketError as exc:
            raise PacketError(f"refusing to publish {origin or 'packet'}: {exc.reason}", exc.code) from None
        self.transport.publish(data, fleet=self.fleet, task=packet.task, agent_id=packet.agent_id, seq=packet.seq)
        self._own.add(packet.sha256)
        self._published.add(packet.sha256)
        return self._emit(SyncEvent("published", packet.task, packet.agent_id, packet.seq, len(data),
                                    "published", origin))

    def publish_outbox(self) -> list[SyncEvent]:
        """Publish every ``*.skp`` in the outbox, moving each to ``outbox/sent/`` once it is durable.

        A file that is not a valid packet, or that the transport cannot take right now, stays
        in the outbox (reported as an "error" event) and is tried again on the next call.
        """
        if self.outbox is None:
            return []
        out = []
        for path in sorted(self.outbox.glob("*.skp")):
            try:
                data = _read_packet_file(path)
                event = self.publish(data, origin=str(path))
            except (OSError, PacketError, TransportError, ValueError) as exc:
                out.append(self._emit(SyncEvent("error", path.stem, "", -1, 0, f"cannot publish: {exc}",
                                                str(path))))
                continue
            os.replace(path, self.outbox / SENT_DIR / path.name)
            out.append(event)
        return out

    def publish_bank(self, agent_id: str | None = None) -> list[SyncEvent]:
        """Publish stored packets straight from the bank.

        With ``agent_id``: every stored packet of that agent's tasks, each time (to refill a broker
        that restarted empty).  Without: this device's own tasks whose packet this service has not
        published yet in this session (what ``sync_once`` and ``run`` do).  A packet that cannot be
        published is reported as an "error" event and tried again on the next call.
        """
        out = []
        for entry in self.bank.entries():
            if not entry.has_packet:
                continue
            if agent_id is None and (not entry.own or entry.packet_sha256 in self._published):
                continue
            if agent_id is not None and entry.agent != agent_id:
                continue
            origin = f"bank:{entry.key.short}"
            try:
                data = self.bank.packet_bytes(entry.key)
                if data is not None:
                    out.append(self.publish(data, origin=origin))
            except (BankError, PacketError, TransportError) as exc:
                out.append(self._emit(SyncEvent("error", entry.task, entry.agent, entry.seq, 0,
                                                f"cannot publish: {exc}", origin)))
        return out

    def _own_packets(self) -> set[str]:
        """sha256 of every packet this device sent or holds as an own task's packet."""
        return self._own | {e.packet_sha256 for e in self.bank.entries() if e.own and e.packet_sha256}

    # ------------------------------------------------------------------ incoming
    def handle(self, incoming: ReceivedPacket) -> SyncEvent:
        """Run one arrived packet through the receiver and store / quarantine / log it."""
        data = incoming.data
        where = dict(task=incoming.task, agent_id=incoming.agent_id, seq=incoming.seq, size=len(data),
                     origin=incoming.origin)
        self.stats.arrived += 1
        if hashlib.sha256(data).hexdigest() in self._own_packets():
            return self._acked(incoming, SyncEvent("own", reason="this device's own packet", **where))

        try:
            result = self.receiver.receive(data, on_accept=self._store)
        except OwnTaskError as exc:  # final: the same packet meets the same own task next time
            return self._acked(incoming, SyncEvent("rejected", reason=str(exc), **where))
        except (BankError, ReceiveStateError, OSError) as exc:
            self.transport.forget(incoming)  # not stored, not recorded: take it again later
            return self._emit(SyncEvent("error", reason=f"could not store: {exc}", **where))
        except Exception as exc:  # noqa: BLE001 - e.g. a failing plausibility check: one packet must not stop sync
            log.exception("receiving a packet from %s failed", incoming.origin)
            self.transport.forget(incoming)
            return self._emit(SyncEvent("error", reason=f"receive failed: {type(exc).__name__}: {exc}", **where))
        if result.code == "equivocation" and result.packet is not None:  # perhaps our own key's, from before a restore
            try:
                why = self._own_version_elsewhere(result.packet)
            except OSError as exc:
                self.transport.forget(incoming)
                return self._emit(SyncEvent("error", reason=f"could not record the seq: {exc}", **where))
            if why:
                result = replace(result, reason=why)
        if result.packet is not None:  # the signed header is the truth, not the topic / file name
            p = result.packet
            where.update(task=p.task, agent_id=p.agent_id, seq=p.seq)
        if result.status == "quarantined":
            try:
                self.bank.quarantine(result.packet.knowledge if result.packet else None, result.reason,
                                     packet_bytes=data)
            except (BankError, OSError) as exc:
                self.transport.forget(incoming)
                return self._emit(SyncEvent("error", reason=f"could not quarantine ({result.reason}): {exc}",
                                            **where))
        # decided (stored, kept aside or refused): only now is it marked delivered
        hold = None
        if result.code in TRUST_CODES:  # trusting the signer later (keys add) must bring it back
            hold = self._trust_token if self._trust_token is not None else self._trust_fingerprint()
        return self._acked(incoming, SyncEvent(result.status, reason=result.reason, **where), hold=hold)

    def _acked(self, incoming: ReceivedPacket, event: SyncEvent, hold: str | None = None) -> SyncEvent:
        """Mark the packet delivered and report ``event``; if the mark cannot be written (a full disk),
        report an error instead: the packet is offered again next time, and what the bank stored makes
        it a duplicate then, so nothing is lost either way."""
        try:
            self.transport.ack(incoming, hold=hold)
        except TransportError as exc:
            self.transport.forget(incoming)
            return self._emit(replace(event, kind="error",
                                      reason=f"{event.kind}, but not marked delivered (offered again later): {exc}"))
        return self._emit(event)

    def receive_available(self, timeout: float = 0.0) -> list[SyncEvent]:
        """Handle whatever the transport has now (waiting up to ``timeout`` s for something)."""
        self.reoffer_changed()
        events = [self.handle(p) for p in self.transport.poll(timeout)]
        self.stats.corrupt = self.transport.faults() - self._faults_before
        return events + self.recheck_quarantine()

    def drain(self, idle: float = 1.0, timeout: float = 60.0) -> list[SyncEvent]:
        """Handle packets until the transport has been quiet for ``idle`` s (or ``timeout`` passed)."""
        self.reoffer_changed()
        events = [self.handle(p) for p in self.transport.drain(idle=idle, timeout=timeout)]
        self.stats.corrupt = self.transport.faults() - self._faults_before
        return events + self.recheck_quarantine()

    def reoffer_changed(self) -> None:
        """Ask the transport again for what an earlier decision no longer covers.

        * the trust store changed (``keys add``): packets rejected for their signer come back;
        * a received task is no longer in the bank (``bank rm``): its packets come back, and
          the receiver, which checks the bank, takes the newest one again.
        """
        token = self._trust_fingerprint()
        if token != self._trust_token:
            self._trust_token = token
            self.transport.release_holds(token)
        held = {(e.agent, e.task) for e in self.bank.entries()}
        try:
            streams = self.receiver.state.load()
        except ReceiveStateError as exc:
            log.warning("not re-offering removed tasks: %s", exc)
            return
        missing = set(streams) - held
        for agent, task in sorted(missing - self._reoffered):  # once each time a task goes missing
            self.transport.reoffer(task, agent)
        self._reoffered = missing

    def _trust_fingerprint(self) -> str:
        """A digest of the trusted key ids: changes whenever ``keys add`` / ``keys rm`` did something."""
        try:
            ids = sorted(k.key_id for k in self.receiver.trust.keys())
        except (KeyStoreError, OSError) as exc:  # a malformed key file: keep the last token, say why
            log.warning("cannot read the trust store: %s", exc)
            return self._trust_token or ""
        return hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]

    def recheck_quarantine(self) -> list[SyncEvent]:
        """Run quarantined packets through the receiver again if the bank changed since the last look.

        Repeats until nothing more is released (one release changes the bank too).  A packet that
        still fails stays in quarantine as it is; one that passes is stored and its quarantine
        entry removed.
        """
        events: list[SyncEvent] = []
        while True:
            state = self._bank_state()
            if state == self._checked_state:
                return events
            self._checked_state = state
            for entry in self.bank.quarantined():
                item = self.bank.get_quarantined(entry.id)
                if item.packet_bytes is None:
                    continue
                try:
                    result = self.receiver.receive(item.packet_bytes, on_accept=self._store)
                except (BankError, ReceiveStateError, OSError) as exc:
                    events.append(self._emit(SyncEvent("error", task=entry.task or "?", agent_id="?", seq=-1,
                                                       size=len(item.packet_bytes), reason=f"recheck: {exc}")))
                    continue
                if result.status != "accepted":
                    continue
                self.bank.remove_quarantined(entry.id)
                p = result.packet
                events.append(self._emit(SyncEvent(
                    "released", task=p.task, agent_id=p.agent_id, seq=p.seq, size=len(item.packet_bytes),
                    reason=f"passed on a second look (quarantined for: {entry.reason})", origin="quarantine")))

    def _bank_state(self) -> tuple:
        return tuple((e.task, e.content_hash) for e in self.bank.entries())

    def _store(self, packet, raw: bytes) -> None:
        try:
            self.bank.put(packet.knowledge, packet_bytes=raw)
        except OwnTaskError as exc:
            why = self._own_version_elsewhere(packet)
            raise (OwnTaskError(why) if why else exc) from None

    def _own_version_elsewhere(self, packet) -> str | None:
        """None when ``packet`` is another agent's, or an older own version.  When this device's own key
        signed it with a newer seq than the bank's own version, or the same seq with other bytes (the
        bank, or the ledger with it, was restored from a backup), the ledger's floor rises past it and the
        returned reason says what to do: peers keep that version, and refuse the bank's, until the device
        signs a higher seq."""
        own = next((e for e in self.bank.entries() if e.own and e.task == packet.task), None)
        if own is None or packet.agent_id != own.agent or packet.seq < own.seq:
            return None
        mine = self.signed_seqs is not None and packet.signer == self.signed_seqs.agent_id
        if not mine:  # the key is not ours (a peer claiming our agent id): it must not move our seqs
            return None
        # Same seq, other bytes (learned again after the restore, before this sync): that seq is taken too,
        # so the floor goes one past it.  Seqs need not be consecutive, only rising.
        floor = packet.seq if packet.seq > own.seq else packet.seq + 1
        self.signed_seqs.record(packet.task, floor)  # OSError: not acked, offered again later
        then = (f"this bank's version is signed again as seq {floor + 1} and published"
                if self.republish_key is not None else
                f"publish this bank's version over it with `skill-edge sync --republish-own`, or learn the task "
                f"again (signed as seq {floor + 1})")
        held = ("newer than the version this bank keeps" if packet.seq > own.seq else
                "other bytes under the seq of the version this bank keeps")
        refused = "a rollback" if packet.seq > own.seq else "equivocation"
        return (f"the fleet holds seq {packet.seq} of this device's own task {packet.task!r}, signed by its key: "
                f"{held} (seq {own.seq}; was the bank restored from a backup?). Peers keep seq {packet.seq} and "
                f"refuse seq {own.seq} as {refused}; {then}")

    def republish_outdated(self) -> list[SyncEvent]:
        """With ``republish_key``: every own task whose key signed a newer seq than the bank's version (the
        ledger says so) is signed again as the next seq, payload unchanged (``PacketCodec.resign``), and
        stored; ``publish_bank`` then sends it.  The device's own version wins at every peer, as it does
        in its own bank.  Failures are "error" events, tried again on the next call."""
        if self.republish_key is None or self.signed_seqs is None:
            return []
        out, floors = [], self.signed_seqs.seqs()  # one read per call: ``run`` calls this every poll
        for e in self.bank.entries():
            if not (e.own and e.has_packet and e.agent == self.signed_seqs.agent_id):
                continue
            floor = floors.get(e.task, 0)
            if floor <= e.seq:
                continue
            seq, origin = floor + 1, f"bank:{e.key.short}"
            try:
                data = self._codec.resign(self.bank.packet_bytes(e.key) or b"", self.republish_key, seq)
                k = self.bank.get(e.key)
                self.signed_seqs.record(e.task, seq)  # before it can leave the device, as learn does
                self.bank.put(replace(k, meta=replace(k.meta, seq=seq)), packet_bytes=data, own=True)
            except (BankError, PacketError, OSError, ValueError) as exc:
                out.append(self._emit(SyncEvent("error", e.task, e.agent, e.seq, 0, f"cannot sign again: {exc}",
                                                origin)))
                continue
            out.append(self._emit(SyncEvent("resigned", e.task, e.agent, seq, len(data),
                                            f"seq {e.seq} signed again as seq {seq}, past seq {floor} that peers "
                                            "hold from this device's key", origin)))
        return out

    # ------------------------------------------------------------------ modes
    def sync_once(self, idle: float = 1.0, timeout: float = 60.0) -> SyncStats:
        """Publish the outbox and the own tasks' packets, take in everything the fleet has, return the counts."""
        self.publish_outbox()
        self.republish_outdated()
        self.publish_bank()
        self.drain(idle=idle, timeout=timeout)
        if self.republish_outdated():  # a newer own version came back while draining
            self.publish_bank()
        return self.stats

    def run(self, stop: threading.Event, poll: float = 1.0) -> SyncStats:
        """Keep syncing until ``stop`` is set: new outbox files are published, arrivals handled."""
        while not stop.is_set():
            self.publish_outbox()
            self.republish_outdated()
            self.publish_bank()
            self.receive_available(timeout=poll)
        return self.stats

    def _emit(self, event: SyncEvent) -> SyncEvent:
        self.stats.count(event.kind)
        self.events.append(event)
        if len(self.events) > 1000:
            del self.events[:-500]
        # Warn only when nobody else shows the event: with on_event (the CLI) it would be printed twice.
        warn = event.kind in ("rejected", "quarantined", "error") and self.on_event is None
        level = logging.WARNING if warn else logging.INFO
        log.log(level, "%s %s/%s seq %s (%d bytes): %s", event.kind, event.task, event.agent_id, event.seq,
                event.size, event.reason)
        if self.on_event is not None:
            self.on_event(event)
        return event


class BankPlausibility:
    """A ``PlausibilityCheck`` that follows the bank: a task the bank took in, replaced or dropped
    since the last packet is added to or removed from the check, and only that task's record is read.

    The receiver asks it about every new packet; after an accept the bank holds one more task, so
    the next check must test against that too.  Updating costs work for the changed task alone
    (``PlausibilityCheck.add``), so a packet's check grows linearly with the stored tasks instead
    of rebuilding (every record read, every task's points drawn and scored) each time.
    """

    def __init__(self, bank: KnowledgeBank,
                 reference_features: dict[str, np.ndarray | tuple[np.ndarray, np.ndarray | None]] | None = None
                 ) -> None:
        """``reference_features``: as for ``PlausibilityCheck`` (task -> features, or (features, trunk_stats))."""
        self.bank = bank
        self.reference_features = reference_features or {}
        self._held: dict = {}  # TaskKey -> content hash the check holds
        self._check = None

    def __call__(self, knowledge: TaskKnowledge) -> tuple[bool, str]:
        from skill_edge.runtime.mapping.plausibility import PlausibilityCheck

        entries = {e.key: e.content_hash for e in self.bank.entries()}
        if self._check is None:
            self._check = PlausibilityCheck(self.reference_features, [self.bank.get(k) for k in entries])
            self._held = dict(entries)
        else:
            for key in [k for k in self._held if entries.get(k) != self._held[k]]:
                self._check.remove(key)
                del self._held[key]
            for key, content in entries.items():
                if key not in self._held:
                    self._check.add(self.bank.get(key))
                    self._held[key] = content
        return self._check(knowledge)  # judged against every stored task but an older version of itself


def _read_packet_file(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_PACKET_BYTES:
        raise ValueError(f"{path} is {size} bytes, over the {MAX_PACKET_BYTES}-byte packet limit")
    return path.read_bytes()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
