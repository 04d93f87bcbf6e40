"""The simulated radio between devices: bandwidth, latency, seeded loss and one interface per device.

Packets really move through a transport (a shared folder or an MQTT broker), which on one
machine is practically instant.  This module adds what a real link would cost, as
*accounting*: every packet a device sends or receives is charged

    per attempt:  latency + size / bandwidth            (seconds)
                  size                                  (bytes on the wire)
    lost attempt: the same, plus one more latency (the sender notices the missing ack),
                  then the whole packet is sent again

with losses drawn from a generator seeded by ``(seed, receiver, sender, task, delivery no.)``,
so a run is reproducible whatever order packets happen to arrive in.

A device has one network interface (paper, appendix A.6 and Fig. 9: "a communication bottleneck
at the receiver ... received serially, over a single networking interface"), so its receive
time is the *sum* of its transfers, not the maximum.  ``throttle`` > 0 additionally sleeps
``simulated seconds x throttle`` per transfer, to watch a slow fleet in real time; the default 0
only keeps the books.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

#: A transfer that needs more attempts than this is reported as an error instead of looping.
MAX_ATTEMPTS = 10_000


class LinkError(ValueError):
    """Link parameters that describe no usable link, or a transfer that cannot complete."""


@dataclass(frozen=True)
class LinkModel:
    """One device's link: the same for every device of a simulated fleet."""

    bandwidth_bps: float = 1_000_000.0  # bytes per second
    latency_s: float = 0.02  # one-way latency per attempt
    loss: float = 0.0  # probability that one attempt is lost (then retransmitted)
    seed: int = 0
    throttle: float = 0.0  # 0: accounting only; > 0: also sleep simulated seconds x throttle

    def __post_init__(self) -> None:
        if not self.bandwidth_bps > 0:
            raise LinkError(f"bandwidth_bps must be > 0 bytes/s, got {self.bandwidth_bps}")
        if self.latency_s < 0:
            raise LinkError(f"latency_s must be >= 0, got {self.latency_s}")
        if not 0.0 <= self.loss < 1.0:
            raise LinkError(f"loss must be a probability in [0, 1), got {self.loss} (1 would never deliver)")
        if self.throttle < 0:
            raise LinkError(f"throttle must be >= 0 (0 = accounting only), got {self.throttle}")

    def attempt_seconds(self, size: int) -> float:
        return self.latency_s + size / self.bandwidth_bps

    def transfer(self, size: int, *, receiver: str, sender: str, task: str, delivery: int = 0) -> "Transfer":
        """The cost of getting ``size`` bytes from ``sender`` to ``receiver`` (deterministic per arguments)."""
        if size < 0:
            raise LinkError(f"a packet cannot have {size} bytes")
        rng = np.random.default_rng([self.seed, _h(receiver), _h(sender), _h(task), delivery])
        attempts = 1
        while self.loss > 0 and rng.random() < self.loss:
            attempts += 1
            if attempts > MAX_ATTEMPTS:
                raise LinkError(f"{task!r} from {sender} to {receiver}: no attempt out of {MAX_ATTEMPTS} got "
                                f"through at loss {self.loss}; lower the loss")
        lost = attempts - 1
        seconds = attempts * self.attempt_seconds(size) + lost * self.latency_s
        return Transfer(task=task, sender=sender, receiver=receiver, size=size, attempts=attempts,
                        wire_bytes=attempts * size, seconds=seconds)


def _h(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


@dataclass(frozen=True)
class Transfer:
    """One packet over the link: how many attempts it took and what they cost."""

    task: str
    sender: str
    receiver: str
    size: int  # packet bytes
    attempts: int  # 1 + retransmissions
    wire_bytes: int  # size x attempts
    seconds: float  # simulated time on the interface

    @property
    def retransmissions(self) -> int:
        return self.attempts - 1


@dataclass
class LinkTotals:
    packets: int = 0
    packet_bytes: int = 0
    wire_bytes: int = 0
    seconds: float = 0.0
    retransmissions: int = 0

    def add(self, t: Transfer) -> None:
        self.packets += 1
        self.packet_bytes += t.size
        self.wire_bytes += t.wire_bytes
        self.seconds += t.seconds
        self.retransmissions += t.retransmissions


@dataclass
class DeviceInterface:
    """One device's single network interface: everything it sends and receives, one after another."""

    device: str
    model: LinkModel
    sent: LinkTotals = field(default_factory=LinkTotals)
    received: LinkTotals = field(default_factory=LinkTotals)
    transfers_in: list[Transfer] = field(default_factory=list)
    transfers_out: list[Transfer] = field(default_factory=list)
    _deliveries: dict[tuple[str, str, str], int] = field(default_factory=dict)

    def send(self, size: int, task: str, to: str = "*") -> Transfer:
        """Upload one packet (to the broker / shared folder; a broadcast costs one upload)."""
        t = self._transfer(size, receiver=to, sender=self.device, task=task)
        self.record(t, "out")
        return t

    def receive(self, size: int, task: str, sender: str) -> Transfer:
        """Download one packet; the interface is busy for the whole transfer (serial bottleneck)."""
        t = self._transfer(size, receiver=self.device, sender=sender, task=task)
        self.record(t, "in")
        return t

    def record(self, t: Transfer, direction: str) -> None:
        """Book a transfer; also used to replay the journal of an earlier boot of the same device."""
        if direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', got {direction!r}")
        (self.received if direction == "in" else self.sent).add(t)
        (self.transfers_in if direction == "in" else self.transfers_out).append(t)
        key = (t.receiver, t.sender, t.task)
        self._deliveries[key] = self._deliveries.get(key, 0) + 1

    def _transfer(self, size: int, *, receiver: str, sender: str, task: str) -> Transfer:
        n = self._deliveries.get((receiver, sender, task), 0)
        t = self.model.transfer(size, receiver=receiver, sender=sender, task=task, delivery=n)
        if self.model.throttle > 0:
            time.sleep(t.seconds * self.model.throttle)
        return t

    def to_dict(self) -> dict:
        return {"device": self.device, "sent": asdict(self.sent), "received": asdict(self.received),
                "transfers_in": [asdict(t) for t in self.transfers_in],
                "transfers_out": [asdict(t) for t in self.transfers_out]}


def serial_receive_seconds(model: LinkModel, sizes: list[int]) -> float:
    """Time one receiver needs for ``sizes`` over its single interface with no loss (the A.6 bottleneck)."""
    return float(sum(model.attempt_seconds(s) for s in sizes))
