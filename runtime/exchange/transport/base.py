"""What every packet transport offers: publish opaque packet bytes, poll for new ones, close.

A transport moves *bytes*.  It never decodes or verifies a packet: that is the receiver's job
(``runtime.exchange.receive``), so a transport can be swapped (shared folder, USB stick, MQTT broker)
without touching the trust logic.  The addressing it carries (fleet, task, agent, seq) comes
from file names or topics and is only a *hint* for routing and logging; the signed packet
header is the truth.
"""

from __future__ import annotations

import re
import time
from urllib.parse import quote, unquote
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass


class TransportError(RuntimeError):
    """A transport could not do what was asked (unreachable broker, unwritable folder, ...)."""


class TransportAuthError(TransportError):
    """The other side refused our credentials (bad username/password, certificate, ACL)."""


# One path segment / one topic level: no separators, no MQTT wildcards, no hidden or relative names.
_NAME = re.compile(r"^[A-Za-z0-9_.:@=-]{1,128}$")


def check_name(kind: str, value: str) -> str:
    """Return ``value`` if it is safe as one folder name and one MQTT topic level, else raise."""
    if not isinstance(value, str) or not _NAME.match(value) or value.startswith("."):
        raise ValueError(
            f"{kind} {value!r} cannot be used in a path or topic: use 1-128 characters from "
            "A-Z a-z 0-9 _ . : @ = - and do not start with '.'"
        )
    return value


MAX_SEGMENT = 200


def encode_segment(kind: str, value: str) -> str:
    """Task names and agent ids as one folder name / topic level: anything outside
    ``A-Z a-z 0-9 _ . : @ = - ~`` is percent-encoded (so "traffic signs" -> "traffic%20signs",
    and ``/ + #`` can never change the layout); ``decode_segment`` is the inverse."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{kind} must be a non-empty string, got {value!r}")
    enc = quote(value, safe="_.:@=-")
    if enc.startswith("."):
        enc = "%2E" + enc[1:]  # no hidden files, no '.' / '..'
    if len(enc) > MAX_SEGMENT:
        raise ValueError(f"{kind} {value[:40]!r}... is too long for a path or topic ({len(enc)} > {MAX_SEGMENT} "
                         "characters once encoded)")
    return enc


def decode_segment(segment: str) -> str:
    return unquote(segment)


@dataclass(frozen=True)
class ReceivedPacket:
    """One packet as it came off a transport, with the (untrusted) address it came under."""

    data: bytes
    fleet: str
    task: str  # decoded (``encode_segment`` undone)
    agent_id: str
    seq: int
    origin: str  # where it came from, for logs: a file path or an MQTT topic


class Transport(ABC):
    """Publish packet bytes to a fleet and poll for packets other devices published.

    The receive contract: ``poll`` offers a packet; the caller decides (stores, rejects or
    quarantines it) and only then calls ``ack``.  A transport that remembers deliveries across
    runs (the folder transport's state file) records a packet as delivered at ``ack``, never at
    ``poll``, so a device killed between the two is offered the packet again on its next run
    instead of losing it.  ``forget`` is the opposite of ``ack``: not handled, offer it again.
    Within one transport object a packet offered and not yet acked is not offered twice.

    ``ack(packet, hold=TOKEN)`` marks a decision that depended on something that can change
    (a packet rejected because its signer was not trusted *yet*); ``release_holds(TOKEN2)``
    offers again every packet acked with a hold other than ``TOKEN2`` (the trust store changed).
    """

    #: monotonic time of the last incoming activity (a packet, a chunk); drives ``drain``.
    last_activity: float = 0.0
    closed: bool = False

    @abstractmethod
    def publish(self, packet_bytes: bytes, *, fleet: str, task: str, agent_id: str, seq: int) -> None:
        """Make ``packet_bytes`` available to every device of ``fleet``; return once it is durable."""

    @abstractmethod
    def poll(self, timeout: float = 0.0) -> list[ReceivedPacket]:
        """Return packets that arrived since the last call, waiting up to ``timeout`` s for at least one."""

    def ack(self, packet: ReceivedPacket, *, hold: str | None = None) -> None:
        """``packet`` was stored, rejected or quarantined: never offer it again (see the class
        docstring for ``hold``).  Transports that keep nothing across runs need do nothing."""

    def release_holds(self, current: str) -> None:
        """Offer again the packets acked with a ``hold`` other than ``current``."""

    def reoffer(self, task: str, agent_id: str) -> None:
        """Offer again the acked packets of ``agent_id`` for ``task`` (the bank no longer holds that task)."""

    def forget(self, packet: ReceivedPacket) -> None:
        """Deliver ``packet`` again when it next shows up (e.g. storing it failed: nothing is lost)."""

    def faults(self) -> int:
        """Messages this transport dropped itself since it was opened, because they arrived damaged
        (a corrupt chunk or manifest, a reassembled packet failing its sha256, an unreadable file)."""
        return 0

    def pending(self) -> int:
        """Transfers started but not complete (e.g. chunked packets still missing chunks)."""
        return 0

    @abstractmethod
    def close(self) -> None:
        """Release connections and files; the transport cannot be used afterwards."""

    # ------------------------------------------------------------------ helpers built on poll
    def drain(self, idle: float = 1.0, timeout: float = 30.0) -> Iterator[ReceivedPacket]:
        """Yield packets until nothing new arrived for ``idle`` s (or ``timeout`` s passed).

        A transfer still in progress (``pending() > 0``) keeps the drain going as long as its
        pieces keep arriving, so a large chunked packet is not cut off by a short idle window.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            got = self.poll(timeout=min(idle, remaining))
            yield from got
            if got:
                continue
            quiet_for = time.monotonic() - self.last_activity
            if quiet_for >= idle:
                return

    def packets(self, timeout: float | None = None) -> Iterator[ReceivedPacket]:
        """Yield packets as they arrive, for ``timeout`` s (``None``: until ``close``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.closed:
            remaining = 1.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return
            yield from self.poll(timeout=min(1.0, remaining))

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
