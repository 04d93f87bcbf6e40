"""A manifest flood over a real Mosquitto: what unauthenticated chunk manifests can make a device hold.

Anyone who may publish to the broker can send a chunk manifest; it is not signed (the packet it
announces is).  Before the limits, a 180-byte manifest claiming millions of one-byte chunks made
every watching device build a list entry per claimed chunk on each stall re-request, and
manifests whose chunks never came were kept for ever.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import tracemalloc

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_broker import MosquittoBroker, mosquitto, needs_mosquitto  # noqa: F401
from test_transport_mqtt import connect, fleet_name, raw_client, receive_until
from skill_edge.runtime.exchange.transport.mqtt import (
    MANIFEST_CONTENT_TYPE,
    MANIFEST_FORMAT,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    Manifest,
)

pytestmark = [needs_mosquitto, pytest.mark.mqtt]


def manifest_props() -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = MANIFEST_CONTENT_TYPE
    props.UserProperty = [("seq", "1")]
    return props


def crafted(size: int, chunk_size: int) -> bytes:
    """A manifest for a packet that does not exist (random sha256, no chunk ever published)."""
    return json.dumps({"format": MANIFEST_FORMAT, "sha256": os.urandom(32).hex(), "size": size,
                       "chunk_size": chunk_size, "chunks": -(-size // chunk_size), "seq": 1}).encode()


def test_manifest_limits_are_derived_from_the_packet_limit() -> None:
    assert MAX_CHUNKS == 131072 and MIN_CHUNK_BYTES == 512
    sha = "ab" * 32
    ok = Manifest.from_json(json.dumps({"format": MANIFEST_FORMAT, "sha256": sha, "size": 64 * 2**20,
                                        "chunk_size": 512, "chunks": MAX_CHUNKS, "seq": 1}).encode(), 64 * 2**20)
    assert ok.chunks == MAX_CHUNKS
    for size, chunk_size in ((60_000_000, 1), (4096, 511)):
        with pytest.raises(ValueError, match="chunks are at least 512 bytes"):
            Manifest.from_json(json.dumps({"format": MANIFEST_FORMAT, "sha256": sha, "size": size,
                                           "chunk_size": chunk_size, "chunks": -(-size // chunk_size),
                                           "seq": 1}).encode(), 64 * 2**20)
    with pytest.raises(ValueError, match="at most 1024"):
        Manifest.from_json(b" " * 2000, 64 * 2**20)


def test_manifest_flood_keeps_memory_and_transfers_bounded(mosquitto: MosquittoBroker) -> None:
    fleet = fleet_name()
    rx = connect(mosquitto, fleet, stall_rerequest=0.2, stall_drop=2.0, max_transfers=8)
    attacker = raw_client(mosquitto)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        # 1: the reported attack, scaled down to stay kind to CI: 2 M one-byte chunks per manifest
        for i in range(3):
            attacker.publish(f"skill/{fleet}/tasks/huge{i}/evil", crafted(2_000_000, 1), qos=1, retain=True,
                             properties=manifest_props()).wait_for_publish(5)
        # 2: many distinct transfers of 1 MiB claimed each (2,048 chunks of 512 bytes), none ever sent
        for i in range(120):
            attacker.publish(f"skill/{fleet}/tasks/t{i}/evil", crafted(2**20, 512), qos=1, retain=True,
                             properties=manifest_props()).wait_for_publish(5)
        held = []
        deadline = time.monotonic() + 4.0  # stall re-requests every 0.2 s (backing off), then drops at 2 s
        while time.monotonic() < deadline:
            rx.poll(timeout=0.05)
            held.append(rx.pending())
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"peak {peak / 2**20:.2f} MiB, held at most {max(held)}, {rx.stats}")
    assert peak < 8 * 2**20, f"the flood made the transport allocate {peak / 2**20:.1f} MiB"
    assert max(held) <= 8, f"at most max_transfers transfers at once, held up to {max(held)}"
    assert rx.stats.corrupt >= 3, "manifests of 2 M one-byte chunks are refused outright"
    # each manifest beyond the 8 slots either waited, or pushed out a transfer that had stalled
    assert rx.stats.deferred + rx.stats.dropped >= 112, rx.stats
    assert rx.stats.dropped >= 8, "transfers whose chunks never came were dropped"

    # an honest chunked packet published after the flood is still delivered
    pub = connect(mosquitto, fleet, chunk_size=1024)
    honest = os.urandom(40_000)
    pub.publish(honest, fleet=fleet, task="honest", agent_id="dev-a", seq=1)
    # It waits its turn behind the manifests deferred during the flood: with 8 slots and a 2 s stall drop,
    # ~112 deferred fakes drain in about (112 / 8) x 2 s = 28 s, so the bound is a minute, not seconds (a
    # known latency cost of the bounded design; the flood cannot exhaust memory or drop the packet).
    assert receive_until(rx, honest, timeout=90), "the honest packet got through the flood"
    assert hashlib.sha256(honest).hexdigest() not in rx.progress()
    attacker.loop_stop()
    pub.close()
    rx.close()


def test_a_replaced_manifest_drops_its_transfer(mosquitto: MosquittoBroker) -> None:
    """A newer message on the same task topic replaces the manifest, so the old transfer cannot complete."""
    fleet = fleet_name()
    rx = connect(mosquitto, fleet, stall_rerequest=30, stall_drop=60)
    attacker = raw_client(mosquitto)
    topic = f"skill/{fleet}/tasks/t/evil"
    first = crafted(8192, 1024)
    attacker.publish(topic, first, qos=1, retain=True, properties=manifest_props()).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while rx.pending() != 1 and time.monotonic() < deadline:
        rx.poll(timeout=0.05)
    assert set(rx.progress()) == {json.loads(first)["sha256"]}
    second = crafted(8192, 1024)
    attacker.publish(topic, second, qos=1, retain=True, properties=manifest_props()).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while set(rx.progress()) != {json.loads(second)["sha256"]} and time.monotonic() < deadline:
        rx.poll(timeout=0.05)
    assert set(rx.progress()) == {json.loads(second)["sha256"]} and rx.stats.dropped == 1
    attacker.publish(topic, b"whole packet", qos=1, retain=True).wait_for_publish(5)
    assert receive_until(rx, b"whole packet", timeout=5)
    assert rx.progress() == {} and rx.stats.dropped == 2
    attacker.loop_stop()
    rx.close()
