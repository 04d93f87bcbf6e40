"""Packets through an MQTT broker (Mosquitto), with retained messages, chunking and reconnects.

Topic layout (``<root>`` defaults to ``skill``)::

    <root>/<fleet>/tasks/<task>/<agent_id>      retained, QoS 1: the latest packet of that agent
                                                for that task, or a manifest pointing to chunks
    <root>/<fleet>/chunks/<agent_id>/<sha256>/<i>
                                                retained, QoS 1: chunk i (0-based) of that agent's
                                                packet whose sha256 is <sha256>

Every topic a device writes ends in or contains its agent id, so a broker ACL can pin each
device to its own topics (mosquitto: ``pattern write skill/+/tasks/+/%u`` and
``pattern write skill/+/chunks/%u/#``, ``pattern read skill/#``, with username = agent id).

Task names and agent ids are percent-encoded where they hold characters outside
``A-Z a-z 0-9 _ . : @ = - ~`` (``base.encode_segment``), so ``/ + #`` can never break the layout.

The MQTT 5 content type of a task message says what it carries:

* ``application/vnd.skill-edge.packet`` (or no content type, e.g. ``mosquitto_pub -r -f x.skp``):
  the packet bytes themselves;
* ``application/vnd.skill-edge.manifest+json``: ``{"format", "sha256", "size", "chunk_size",
  "chunks", "seq"}`` for a packet larger than ``chunk_size``.

Why this shape: retained messages make the broker the fleet's memory, so a device that joins
late gets every task's latest packet just by subscribing to ``<root>/<fleet>/tasks/+/+``.
Chunks are published (and acknowledged) *before* their manifest, so a manifest always points
at chunks the broker already holds.  A receiver keeps the chunks it has across reconnects and,
after a reconnect, subscribes only to the chunk topics it still lacks (the broker re-sends
those retained chunks), then checks size and sha256 before handing the packet on.

A manifest is unauthenticated (anyone who may publish to the broker can send one), so what it
can make a receiver hold is bounded: at most ``MAX_CHUNKS`` chunks (``MAX_PACKET_BYTES`` /
``MIN_CHUNK_BYTES``), at most ``max_transfers`` transfers and ``max_inflight_bytes`` claimed
bytes at once, the missing chunks are never listed (only counted and walked lazily), a transfer
is dropped when a new message replaces its manifest or when no new chunk came for
``stall_drop`` s, and a dropped transfer's sha256 is remembered (a bounded set) so its retained
manifest does not start it again.  A manifest refused because the limits were full is fetched
again (the task wildcard is re-subscribed, the broker re-sends its retained messages) once a
transfer ends, so an honest packet that arrived during a flood is delayed, not lost.

Reconnects: paho's network thread reconnects with exponential backoff
(``reconnect_delay_set(min, max)``); the first connection uses the same backoff in our own
loop.  After every reconnect the transport re-subscribes and re-publishes its own retained
messages, so a broker that restarted without persistence is refilled by its devices.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import queue
import re
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from skill_edge.runtime.exchange.packet import MAX_PACKET_BYTES

from .base import (
    ReceivedPacket,
    Transport,
    TransportAuthError,
    TransportError,
    check_name,
    decode_segment,
    encode_segment,
)

log = logging.getLogger(__name__)

PACKET_CONTENT_TYPE = "application/vnd.skill-edge.packet"
MANIFEST_CONTENT_TYPE = "application/vnd.skill-edge.manifest+json"
MANIFEST_FORMAT = "skill-edge-manifest/1"
QOS = 1
# CONNACK reason codes that retrying will not fix: MQTT 5 (134 bad user name or password,
# 135 not authorized, 138 banned, 140 bad auth method) and MQTT 3.1.1 (4, 5).
_AUTH_REFUSALS = {134, 135, 138, 140, 4, 5}
# Above this many missing chunks a resume subscribes to the chunk wildcard instead of each topic.
_MAX_RESUME_TOPICS = 512
#: Smallest chunk a chunked packet may use (its last chunk aside); with MAX_PACKET_BYTES it caps
#: the chunk count of any manifest, so no manifest can claim millions of one-byte chunks.
MIN_CHUNK_BYTES = 512
MAX_CHUNKS = math.ceil(MAX_PACKET_BYTES / MIN_CHUNK_BYTES)
#: A manifest is ~200 bytes of JSON; anything much longer is not one (and is not parsed).
MAX_MANIFEST_BYTES = 1024
#: How many dropped transfers (sha256) are remembered, so their retained manifests stay ignored.
_ABANDONED_MEMORY = 16384


@dataclass
class MqttConfig:
    """Everything needed to reach the broker and lay out topics; see ``from_url``."""

    fleet: str
    host: str = "127.0.0.1"
    port: int = 1883
    topic_root: str = "skill"
    chunk_size: int = 256 * 1024  # MIN_CHUNK_BYTES at least
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_id: str | None = None
    keepalive: int = 30
    reconnect_min_delay: float = 0.5
    reconnect_max_delay: float = 30.0
    connect_timeout: float = 15.0
    publish_timeout: float = 60.0
    max_packet_bytes: int = MAX_PACKET_BYTES
    republish_on_reconnect: bool = True
    stall_rerequest: float = 3.0  # s without a new chunk before asking again for the missing ones
    # (doubling after each fruitless ask, up to 60 s)
    stall_drop: float = 180.0  # s without a new chunk before a transfer is dropped for good
    max_transfers: int = 16  # chunked packets assembled at once; further manifests wait
    max_inflight_bytes: int = MAX_PACKET_BYTES  # sum of the sizes their manifests claim

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        check_name("topic root", self.topic_root)
        if self.chunk_size < MIN_CHUNK_BYTES:
            raise ValueError(f"chunk_size must be >= {MIN_CHUNK_BYTES} bytes, got {self.chunk_size}")
        if not 0 < self.max_packet_bytes <= MAX_PACKET_BYTES:
            raise ValueError(f"max_packet_bytes must be in 1..{MAX_PACKET_BYTES}, got {self.max_packet_bytes}")
        if self.max_transfers < 1 or self.max_inflight_bytes < self.max_packet_bytes:
            raise ValueError("need max_transfers >= 1 and max_inflight_bytes >= max_packet_bytes "
                             "(else a packet of the largest size could never be received)")
        if not 0 < self.stall_rerequest <= self.stall_drop:
            raise ValueError("need 0 < stall_rerequest <= stall_drop")
        if not 0 < self.reconnect_min_delay <= self.reconnect_max_delay:
            raise ValueError("need 0 < reconnect_min_delay <= reconnect_max_delay")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a TLS client certificate needs both --tls-cert and --tls-key")
        self.tls = self.tls or any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))

    @classmethod
    def from_url(cls, url: str, fleet: str, **options: object) -> "MqttConfig":
        """``mqtt://[user[:password]@]host[:port]`` (1883) or ``mqtts://...`` (TLS, 8883).

        Keyword ``options`` override what the URL says (e.g. ``username=`` from a CLI flag);
        options given as ``None`` are ignored.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError(f"not an MQTT URL: {url!r}; expected mqtt://host:port or mqtts://host:port")
        tls = parts.scheme in ("mqtts", "ssl")
        cfg: dict[str, object] = {
            "fleet": fleet,
            "host": parts.hostname,
            "port": parts.port or (8883 if tls else 1883),
            "tls": tls,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        cfg.update({k: v for k, v in options.items() if v is not None})
        for key in ("tls_ca", "tls_cert", "tls_key"):
            if cfg.get(key) is not None:
                cfg[key] = Path(cfg[key])  # type: ignore[arg-type]
        return cls(**cfg)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ topics
    def packet_topic(self, fleet: str, task: str, agent_id: str) -> str:
        check_name("fleet", fleet)
        return (f"{self.topic_root}/{fleet}/tasks/{encode_segment('task', task)}/"
                f"{encode_segment('agent_id', agent_id)}")

    def chunk_topic(self, fleet: str, agent_id: str, sha256: str, index: int | str) -> str:
        return f"{self.topic_root}/{fleet}/chunks/{encode_segment('agent_id', agent_id)}/{sha256}/{index}"


@dataclass(frozen=True)
class Manifest:
    """Announces a packet sent as retained chunks: enough to reassemble and verify it."""

    sha256: str
    size: int
    chunk_size: int
    chunks: int
    seq: int

    def to_json(self) -> bytes:
        return json.dumps({"format": MANIFEST_FORMAT, "sha256": self.sha256, "size": self.size,
                           "chunk_size": self.chunk_size, "chunks": self.chunks, "seq": self.seq}).encode()

    @classmethod
    def from_json(cls, raw: bytes, max_size: int) -> "Manifest":
        if len(raw) > MAX_MANIFEST_BYTES:
            raise ValueError(f"bad chunk manifest: {len(raw)} bytes, a manifest has at most {MAX_MANIFEST_BYTES}")
        try:
            d = json.loads(raw)
            if d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"unknown manifest format {d.get('format')!r}")
            m = cls(sha256=str(d["sha256"]), size=int(d["size"]), chunk_size=int(d["chunk_size"]),
                    chunks=int(d["chunks"]), seq=int(d["seq"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"bad chunk manifest: {exc}") from exc
        if not re.fullmatch(r"[0-9a-f]{64}", m.sha256):
            raise ValueError("bad chunk manifest: sha256 is not 64 lowercase hex digits")
        if not 0 < m.size <= max_size:
            raise ValueError(f"bad chunk manifest: size {m.size} outside 1..{max_size}")
        if m.chunk_size < 1 or m.chunks != math.ceil(m.size / m.chunk_size):
            raise ValueError("bad chunk manifest: chunk count does not match size / chunk_size")
        if m.chunks > 1 and m.chunk_size < MIN_CHUNK_BYTES or m.chunks > MAX_CHUNKS:
            raise ValueError(f"bad chunk manifest: {m.chunks} chunks of {m.chunk_size} bytes; chunks are at "
                             f"least {MIN_CHUNK_BYTES} bytes and at most {MAX_CHUNKS} per packet")
        return m

    def chunk_length(self, index: int) -> int:
        return self.chunk_size if index < self.chunks - 1 else self.size - self.chunk_size * (self.chunks - 1)


@dataclass
class _Assembly:
    """A chunked packet being put back together; survives reconnects."""

    manifest: Manifest
    fleet: str
    task: str
    agent_id: str
    origin: str
    parts: dict[int, bytes] = field(default_factory=dict)  # only chunks that arrived: <= manifest.size bytes
    subscribed: set[str] = field(default_factory=set)  # chunk topic filters we asked the broker for
    last_progress: float = field(default_factory=time.monotonic)  # last new chunk or re-request
    last_chunk: float = field(default_factory=time.monotonic)  # last new chunk (or the manifest)
    rerequests: int = 0  # asks since the last new chunk

    def missing(self, limit: int) -> list[int]:
        """The first ``limit`` chunk indices not held yet: memory O(limit), never O(claimed chunks)."""
        return list(itertools.islice((i for i in range(self.manifest.chunks) if i not in self.parts), limit))


@dataclass
class _OwnMessage:
    """A retained message this device published; kept to re-publish after a reconnect."""

    payload: bytes
    properties: Properties | None
    info: mqtt.MQTTMessageInfo | None = None  # None: not handed to paho yet (we were offline)


@dataclass
class MqttStats:
    packets_in: int = 0  # complete packets handed to poll()
    chunks_in: int = 0  # chunk messages stored
    chunks_ignored: int = 0  # chunk messages we already had, or for no pending packet
    corrupt: int = 0  # manifests / chunks / packets that failed a check
    deferred: int = 0  # manifests not started because max_transfers / max_inflight_bytes were reached
    dropped: int = 0  # transfers given up: replaced by a newer message on their topic, or stalled
    connects: int = 0
    disconnects: int = 0
    republished: int = 0
    failed_attempts: list[float] = field(default_factory=list)  # monotonic times of failed reconnects


class MqttTransport(Transport):
    """Publish and receive packets of one fleet through an MQTT 5 broker (see module docstring)."""

    def __init__(self, config: MqttConfig) -> None:
        self.config = config
        self.stats = MqttStats()
        self._inbox: queue.Queue[ReceivedPacket] = queue.Queue()
        self._rx_lock = threading.RLock()  # guards _seen and _assemblies (network thread + callers)
        self._seen: set[str] = set()  # sha256 of packets delivered or published by us
        self._assemblies: dict[str, _Assembly] = {}
        self._by_topic: dict[str, str] = {}  # task topic -> sha256 of the transfer its manifest started
        self._delivered: dict[str, str] = {}  # task topic -> sha256 of the packet last delivered from it
        self._held: dict[str, tuple[str, str]] = {}  # sha256 -> (hold, task topic) of packets acked with a hold
        self._abandoned: OrderedDict[str, None] = OrderedDict()  # sha256 of dropped transfers (bounded)
        self._refill = False  # a manifest was deferred: fetch the retained task messages again later
        self._room_freed = False  # a transfer ended since the last deferral: the refill may start
        self._tx_lock = threading.RLock()  # guards _own
        self._own: dict[str, _OwnMessage] = {}  # topic -> our retained message
        self._acks = threading.Condition()  # notified on every PUBACK / (re)connect
        self._refused: dict[int, ReasonCode] = {}  # mid -> PUBACK failure reason
        self._connected = threading.Event()
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        self._client = self._make_client()
        self._connect()

    # ------------------------------------------------------------------ connection
    def _make_client(self) -> mqtt.Client:
        c = self.config
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=c.client_id or f"skill-edge-{c.fleet}-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        if c.username is not None:
            client.username_pw_set(c.username, c.password)
        if c.tls:
            try:
                client.tls_set(
                    ca_certs=str(c.tls_ca) if c.tls_ca else None,
                    certfile=str(c.tls_cert) if c.tls_cert else None,
                    keyfile=str(c.tls_key) if c.tls_key else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError) as exc:
                raise TransportError(f"cannot load TLS files (ca={c.tls_ca}, cert={c.tls_cert}, "
                                     f"key={c.tls_key}): {exc}") from exc
        client.reconnect_delay_set(c.reconnect_min_delay, c.reconnect_max_delay)  # type: ignore[arg-type]
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    @property
    def where(self) -> str:
        return f"{'mqtts' if self.config.tls else 'mqtt'}://{self.config.host}:{self.config.port}"

    def _connect(self) -> None:
        """First connection: retry with exponential backoff until ``connect_timeout``; fail clearly."""
        c = self.config
        deadline = time.monotonic() + c.connect_timeout
        delay = c.reconnect_min_delay
        while True:
            try:
                self._client.connect(c.host, c.port, keepalive=c.keepalive, clean_start=True)
                break
            except ssl.SSLError as exc:
                raise TransportError(f"TLS handshake with {self.where} failed: {exc}; check --tls-ca "
                                     "(the CA that signed the broker certificate) and the host name") from exc
            except OSError as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TransportError(f"cannot reach MQTT broker at {self.where} within "
                                         f"{c.connect_timeout:g} s: {exc}") from exc
                log.info("broker %s not reachable (%s); retrying in %.1f s", self.where, exc, delay)
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, c.reconnect_max_delay)
        self._client.loop_start()
        if not self._connack_event.wait(max(0.0, deadline - time.monotonic()) + 5.0):
            self._shutdown()
            raise TransportError(f"MQTT broker at {self.where} accepted TCP but sent no CONNACK "
                                 f"within {c.connect_timeout:g} s")
        if self._connack is not None and self._connack.is_failure:
            self._shutdown()
            reason = f"broker {self.where} refused the connection: {self._connack}"
            if self._connack.value in _AUTH_REFUSALS:
                raise TransportAuthError(f"{reason}; check --username/--password (and the broker's "
                                         "password_file / ACL)")
            raise TransportError(reason)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: object) -> None:
        try:
            self._handle_connack(reason_code)
        except Exception:  # noqa: BLE001 - never let an exception stop paho's network thread
            log.exception("error while handling CONNACK from %s", self.where)

    def _handle_connack(self, reason_code: ReasonCode) -> None:
        first = not self._connack_event.is_set()
        self._connack = reason_code
        if reason_code.is_failure:
            log.error("broker %s refused the connection: %s", self.where, reason_code)
            self._connack_event.set()
            return
        self.stats.connects += 1
        self._subscribe_all()
        self._connected.set()
        self._send_own(republish=not first and self.config.republish_on_reconnect)
        with self._acks:
            self._acks.notify_all()
        self._connack_event.set()  # last: the constructor returns only once we are fully set up
        if not first:
            log.info("reconnected to %s", self.where)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                       reason_code: ReasonCode, properties: object) -> None:
        self._connected.clear()
        if not self.closed:
            self.stats.disconnects += 1
            log.warning("lost connection to %s (%s); reconnecting with backoff", self.where, reason_code)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self.stats.failed_attempts.append(time.monotonic())

    def _subscribe_all(self) -> None:
        """(Re)subscribe to every task topic of the fleet and to the chunks still missing."""
        topics = [(self._tasks_filter(), QOS)]
        with self._rx_lock:
            for sha, asm in self._assemblies.items():
                topics += self._chunk_subscriptions(sha, asm)
        for i in range(0, len(topics), 64):  # keep each SUBSCRIBE packet small
            self._client.subscribe(topics[i:i + 64])

    def _tasks_filter(self) -> str:
        return f"{self.config.topic_root}/{self.config.fleet}/tasks/+/+"

    def _chunk_subscriptions(self, sha: str, asm: _Assembly) -> list[tuple[str, int]]:
        """Resume: ask only for the chunks we lack (the broker re-sends their retained copies)."""
        missing = asm.missing(limit=_MAX_RESUME_TOPICS + 1)
        if not asm.parts or len(missing) > _MAX_RESUME_TOPICS:
            filters = [self.config.chunk_topic(asm.fleet, asm.agent_id, sha, "+")]
        else:
            filters = [self.config.chunk_topic(asm.fleet, asm.agent_id, sha, i) for i in missing]
        asm.subscribed.update(filters)
        return [(f, QOS) for f in filters]

    # ------------------------------------------------------------------ publish
    def publish(self, packet_bytes: bytes, *, fleet: str, task: str, agent_id: str, seq: int) -> None:
        """Publish retained (chunks first, then the manifest) and wait for the broker's PUBACKs."""
        self._check_open()
        topic = self.config.packet_topic(fleet, task, agent_id)  # checks / encodes the names
        data = bytes(packet_bytes)
        if not data:
            raise ValueError("refusing to publish an empty packet (it would delete the retained one)")
        if len(data) > self.config.max_packet_bytes:
            raise ValueError(f"packet of {len(data)} bytes is over max_packet_bytes={self.config.max_packet_bytes}")
        sha = hashlib.sha256(data).hexdigest()
        with self._rx_lock:
            self._seen.add(sha)  # never deliver our own packet back to ourselves
        deadline = time.monotonic() + self.config.publish_timeout
        cs = self.config.chunk_size
        previous = self._own.get(topic)
        if len(data) <= cs:
            self._put_own({topic: (data, _properties(PACKET_CONTENT_TYPE, seq))})
            self._wait_acked([topic], deadline)
        else:
            manifest = Manifest(sha, len(data), cs, math.ceil(len(data) / cs), int(seq))
            chunks = {self.config.chunk_topic(fleet, agent_id, sha, i): (data[i * cs:(i + 1) * cs], None)
                      for i in range(manifest.chunks)}
            self._put_own(chunks)
            self._wait_acked(list(chunks), deadline)
            self._put_own({topic: (manifest.to_json(), _properties(MANIFEST_CONTENT_TYPE, seq))})
            self._wait_acked([topic], deadline)
        if previous is not None:
            self._retire_chunks(fleet, agent_id, previous, keep=sha)

    def _put_own(self, messages: dict[str, tuple[bytes, Properties | None]]) -> None:
        with self._tx_lock:
            for topic, (payload, props) in messages.items():
                self._own[topic] = _OwnMessage(payload, props)
        if self._connected.is_set():
            self._send_own(republish=False, only=list(messages))

    def _send_own(self, *, republish: bool, only: list[str] | None = None) -> None:
        """Hand our retained messages to paho: unsent ones always, acknowledged ones if ``republish``.

        Chunks go before manifests so a manifest never points at chunks the broker lacks.
        """
        with self._tx_lock:
            topics = only if only is not None else sorted(self._own, key=lambda t: "/tasks/" in t)
            for topic in topics:
                own = self._own.get(topic)
                if own is None:
                    continue
                unsent = own.info is None or own.info.rc != mqtt.MQTT_ERR_SUCCESS
                if not (unsent or (republish and self._is_acked(own.info))):
                    continue  # in flight: paho re-sends unacknowledged QoS 1 messages itself
                own.info = self._client.publish(topic, own.payload, qos=QOS, retain=True,
                                                properties=own.properties)
                if not unsent:
                    self.stats.republished += 1

    @staticmethod
    def _is_acked(info: mqtt.MQTTMessageInfo | None) -> bool:
        return info is not None and info.rc == mqtt.MQTT_ERR_SUCCESS and info.is_published()

    def _wait_acked(self, topics: list[str], deadline: float) -> None:
        pending = list(topics)
        while pending:
            with self._tx_lock:
                infos = {t: self._own[t].info for t in pending if t in self._own}
            with self._acks:
                refused = [self._refused.pop(i.mid) for i in infos.values() if i is not None and i.mid in self._refused]
            if refused:
                raise TransportAuthError(f"broker {self.where} refused a publish: {refused[0]}; check the "
                                         "broker ACL for this user")
            pending = [t for t, info in infos.items() if not self._is_acked(info)]
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                state = "connected" if self._connected.is_set() else "disconnected"
                raise TransportError(f"broker {self.where} did not acknowledge {len(pending)} message(s) "
                                     f"within {self.config.publish_timeout:g} s ({state}), e.g. {pending[0]}")
            with self._acks:
                self._acks.wait(min(0.05, remaining))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int,
                    reason_code: ReasonCode, properties: object) -> None:
        # Called by paho while it holds its outgoing-message lock: take no other lock here.
        with self._acks:
            if reason_code.is_failure:
                self._refused[mid] = reason_code
            self._acks.notify_all()

    def _retire_chunks(self, fleet: str, agent_id: str, previous: _OwnMessage, keep: str) -> None:
        """Delete the retained chunks of the packet this topic carried before (now superseded)."""
        if previous.properties is None or getattr(previous.properties, "ContentType", "") != MANIFEST_CONTENT_TYPE:
            return
        try:
            old = Manifest.from_json(previous.payload, self.config.max_packet_bytes)
        except ValueError:
            return
        if old.sha256 == keep:
            return
        with self._tx_lock:
            for i in range(old.chunks):
                t = self.config.chunk_topic(fleet, agent_id, old.sha256, i)
                self._own.pop(t, None)
                self._client.publish(t, b"", qos=QOS, retain=True)  # empty retained = delete

    # ------------------------------------------------------------------ receive
    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # An exception escaping a callback would stop paho's network thread: log everything here.
        if not msg.payload:
            return  # a deleted retained message
        levels = msg.topic.split("/")
        try:
            if len(levels) == 5 and levels[2] == "tasks":
                self._on_task_message(levels[1], decode_segment(levels[3]), decode_segment(levels[4]), msg)
            elif len(levels) == 6 and levels[2] == "chunks":
                self._on_chunk(decode_segment(levels[3]), levels[4], int(levels[5]), msg)
        except ValueError as exc:
            self.stats.corrupt += 1
            log.warning("ignoring bad message on %s: %s", msg.topic, exc)
        except Exception:  # noqa: BLE001 - keep the network thread alive, but say what broke
            self.stats.corrupt += 1
            log.exception("error while handling a message on %s", msg.topic)

    def _on_task_message(self, fleet: str, task: str, agent_id: str, msg: mqtt.MQTTMessage) -> None:
        content_type = getattr(msg.properties, "ContentType", PACKET_CONTENT_TYPE) if msg.properties else PACKET_CONTENT_TYPE
        seq = _seq_of(msg.properties)
        if content_type == MANIFEST_CONTENT_TYPE:
            manifest = Manifest.from_json(msg.payload, self.config.max_packet_bytes)
            with self._rx_lock:
                sha = manifest.sha256
                if sha in self._seen or sha in self._assemblies or sha in self._abandoned:
                    return
                stale = self._drop_transfer_of(msg.topic, "a newer manifest replaced it")
                stale += self._make_room(manifest)
                subs: list[tuple[str, int]] = []
                if self._room_for(manifest):
                    asm = _Assembly(manifest, fleet, task, agent_id, msg.topic)
                    self._assemblies[sha] = asm
                    self._by_topic[msg.topic] = sha
                    subs = self._chunk_subscriptions(sha, asm)
                else:
                    self.stats.deferred += 1
                    self._refill, self._room_freed = True, False
                    log.warning("deferring the chunked packet on %s (%d bytes): %d transfers / %d bytes in "
                                "flight already", msg.topic, manifest.size, len(self._assemblies),
                                self._inflight_bytes())
            self._unsubscribe(stale)
            if subs:
                self.last_activity = time.monotonic()
                self._client.subscribe(subs)
            return
        if content_type != PACKET_CONTENT_TYPE:
            raise ValueError(f"unknown content type {content_type!r}")
        with self._rx_lock:
            stale = self._drop_transfer_of(msg.topic, "a whole packet replaced its manifest")
        self._unsubscribe(stale)
        sha = hashlib.sha256(msg.payload).hexdigest()
        self._deliver(sha, ReceivedPacket(bytes(msg.payload), fleet, task, agent_id, seq, msg.topic))

    def _on_chunk(self, agent_id: str, sha: str, index: int, msg: mqtt.MQTTMessage) -> None:
        with self._rx_lock:
            asm = self._assemblies.get(sha)
            if asm is None or asm.agent_id != agent_id or index in asm.parts:
                self.stats.chunks_ignored += 1
                return
            m = asm.manifest
            if not 0 <= index < m.chunks or len(msg.payload) != m.chunk_length(index):
                raise ValueError(f"chunk {index} of {sha[:12]} has {len(msg.payload)} bytes, "
                                 f"expected {m.chunk_length(index) if index < m.chunks else 'no chunk'}")
            asm.parts[index] = bytes(msg.payload)
            asm.last_progress = asm.last_chunk = self.last_activity = time.monotonic()
            asm.rerequests = 0
            self.stats.chunks_in += 1
            if len(asm.parts) < m.chunks:
                return
            self._end_transfer(sha)
        self._unsubscribe(sorted(asm.subscribed))
        data = b"".join(asm.parts[i] for i in range(m.chunks))
        got = hashlib.sha256(data).hexdigest()
        if len(data) != m.size or got != sha:
            with self._rx_lock:
                self._remember_abandoned(sha)  # its retained manifest must not start it again
            raise ValueError(f"reassembled packet has {len(data)} bytes and sha256 {got[:12]}, manifest says "
                             f"{m.size} bytes and {sha[:12]}; dropped")
        self._deliver(sha, ReceivedPacket(data, asm.fleet, asm.task, asm.agent_id, m.seq, asm.origin))

    def _deliver(self, sha: str, packet: ReceivedPacket) -> None:
        with self._rx_lock:
            if sha in self._seen:
                return
            self._seen.add(sha)
            self._delivered[packet.origin] = sha
        self.stats.packets_in += 1
        self.last_activity = time.monotonic()
        self._inbox.put(packet)

    def poll(self, timeout: float = 0.0) -> list[ReceivedPacket]:
        self._check_open()
        self._rerequest_stalled()
        out: list[ReceivedPacket] = []
        try:
            out.append(self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait())
            while True:
                out.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        return out

    # ------------------------------------------------------------------ transfer limits
    def _inflight_bytes(self) -> int:
        return sum(a.manifest.size for a in self._assemblies.values())

    def _room_for(self, manifest: Manifest) -> bool:
        """Whether one more transfer fits ``max_transfers`` and ``max_inflight_bytes`` (under _rx_lock)."""
        return (len(self._assemblies) < self.config.max_transfers
                and self._inflight_bytes() + manifest.size <= self.config.max_inflight_bytes)

    def _make_room(self, manifest: Manifest) -> list[str]:
        """Drop stalled transfers (no new chunk for ``stall_rerequest`` s; those that never got a
        chunk first, then the longest stalled) until ``manifest`` fits (under _rx_lock).  A transfer
        that is moving is never dropped for a newcomer, so a flood of manifests whose chunks never
        come cannot push an honest transfer out; it only fills the slots it gets, until they stall."""
        now = time.monotonic()
        stalled = sorted((a for a in self._assemblies.values() if now - a.last_chunk > self.config.stall_rerequest),
                         key=lambda a: (bool(a.parts), a.last_chunk))
        stale: list[str] = []
        for asm in stalled:
            if self._room_for(manifest):
                break
            stale += self._abandon(asm.manifest.sha256, "stalled, and its slot went to a newer manifest")
        return stale

    def _drop_transfer_of(self, topic: str, why: str) -> list[str]:
        """Give up the transfer a task topic's earlier manifest started (under _rx_lock); returns
        the chunk filters to unsubscribe from once the lock is released."""
        sha = self._by_topic.get(topic)
        return self._abandon(sha, why) if sha is not None and sha in self._assemblies else []

    def _abandon(self, sha: str, why: str) -> list[str]:
        """Drop a transfer and remember its sha256, so its retained manifest does not restart it."""
        asm = self._end_transfer(sha)
        self._remember_abandoned(sha)
        self.stats.dropped += 1
        log.warning("dropped the chunked packet %s on %s (%d of %d chunks held): %s", sha[:12], asm.origin,
                    len(asm.parts), asm.manifest.chunks, why)
        return sorted(asm.subscribed)

    def _remember_abandoned(self, sha: str) -> None:
        self._abandoned[sha] = None
        while len(self._abandoned) > _ABANDONED_MEMORY:
            self._abandoned.popitem(last=False)

    def _end_transfer(self, sha: str) -> _Assembly:
        """Forget a transfer, complete or dropped (under _rx_lock; the caller unsubscribes from
        ``asm.subscribed`` after releasing it: paho is never called with our lock held)."""
        asm = self._assemblies.pop(sha)
        if self._by_topic.get(asm.origin) == sha:
            del self._by_topic[asm.origin]
        self._room_freed = True
        return asm

    def _unsubscribe(self, filters: list[str]) -> None:
        for i in range(0, len(filters), 64):
            self._client.unsubscribe(filters[i:i + 64])

    def _rerequest_stalled(self) -> None:
        """Ask again for chunks of a transfer that stopped moving (e.g. the broker dropped some
        of a long burst of retained messages because its per-client queue was full); drop one
        that got no new chunk for ``stall_drop`` s; once there is room again after a deferred
        manifest, re-subscribe to the task topics so the broker re-sends the retained manifests."""
        now = time.monotonic()
        refill = False
        stale: list[str] = []
        with self._rx_lock:
            for sha in [s for s, a in self._assemblies.items() if now - a.last_chunk > self.config.stall_drop]:
                stale += self._abandon(sha, f"no new chunk for {self.config.stall_drop:g} s")
            if self._connected.is_set() and self._refill and self._room_freed:
                self._refill, refill = False, True
        if not self._connected.is_set():
            return
        self._unsubscribe(stale)
        if refill:
            self._client.subscribe([(self._tasks_filter(), QOS)])
        subs: list[tuple[str, int]] = []
        with self._rx_lock:
            for sha, asm in self._assemblies.items():
                wait = min(self.config.stall_rerequest * 2 ** asm.rerequests, 60.0)
                if now - asm.last_progress > wait:
                    asm.last_progress = now
                    asm.rerequests += 1
                    subs += self._chunk_subscriptions(sha, asm)
        for i in range(0, len(subs), 64):
            self._client.subscribe(subs[i:i + 64])

    def forget(self, packet: ReceivedPacket) -> None:
        """Deliver it again when the broker next sends it (its retained copy arrives on every
        (re)subscription, i.e. at the latest on the next run)."""
        with self._rx_lock:
            self._seen.discard(hashlib.sha256(packet.data).hexdigest())

    # Nothing is persisted here: a new run gets every retained packet again and the receiver
    # sorts out duplicates, so ``ack`` only matters for holds, and re-offering within a run
    # means forgetting the packet and asking the broker for its topic's retained copy again.
    def ack(self, packet: ReceivedPacket, *, hold: str | None = None) -> None:
        if hold is not None:
            with self._rx_lock:
                self._held[hashlib.sha256(packet.data).hexdigest()] = (hold, packet.origin)

    def release_holds(self, current: str) -> None:
        with self._rx_lock:
            released = {sha: topic for sha, (hold, topic) in self._held.items() if hold != current}
            for sha in released:
                del self._held[sha]
                self._seen.discard(sha)
        self._fetch_again(sorted(set(released.values())))

    def reoffer(self, task: str, agent_id: str) -> None:
        topic = self.config.packet_topic(self.config.fleet, task, agent_id)
        with self._rx_lock:
            sha = self._delivered.pop(topic, None)
            if sha is None:
                return  # nothing came on that topic in this run: there is nothing to ask again for
            self._seen.discard(sha)
        self._fetch_again([topic])

    def _fetch_again(self, topics: list[str]) -> None:
        """Subscribe to these task topics once more: the broker re-sends their retained messages."""
        if topics and self._connected.is_set():
            for i in range(0, len(topics), 64):
                self._client.subscribe([(t, QOS) for t in topics[i:i + 64]])

    def faults(self) -> int:
        return self.stats.corrupt

    def pending(self) -> int:
        with self._rx_lock:
            return len(self._assemblies)

    def progress(self) -> dict[str, tuple[int, int]]:
        """sha256 -> (chunks held, chunks total) for every chunked packet still being assembled."""
        with self._rx_lock:
            return {sha: (len(a.parts), a.manifest.chunks) for sha, a in self._assemblies.items()}

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._shutdown()

    def _shutdown(self) -> None:
        self.closed = True
        try:
            self._client.disconnect()
        finally:
            self._client.loop_stop()

    def _check_open(self) -> None:
        if self.closed:
            raise TransportError("MQTT transport is closed")


def _properties(content_type: str, seq: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    props.UserProperty = [("seq", str(int(seq)))]
    return props


def _seq_of(properties: Properties | None) -> int:
    for key, value in getattr(properties, "UserProperty", None) or []:
        if key == "seq" and value.isdigit():
            return int(value)
    return -1
