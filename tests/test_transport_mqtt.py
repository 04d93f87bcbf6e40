"""MQTT transport against a real Mosquitto process (see tests/mqtt_broker.py)."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from mqtt_broker import MosquittoBroker, make_tls_files, mosquitto, needs_mosquitto, own_broker  # noqa: F401
from skill_edge.runtime.exchange.transport import TransportAuthError, TransportError, open_transport
from skill_edge.runtime.exchange.transport.mqtt import MqttConfig, MqttTransport

pytestmark = [needs_mosquitto, pytest.mark.mqtt]


def fleet_name() -> str:
    return f"f{uuid.uuid4().hex[:10]}"  # every test its own fleet: retained messages never leak between tests


def connect(broker: MosquittoBroker, fleet: str, **options: object) -> MqttTransport:
    options = {"reconnect_min_delay": 0.1, "reconnect_max_delay": 1.0, "connect_timeout": 10.0, **options}
    return MqttTransport(MqttConfig(fleet=fleet, host=broker.host, port=broker.port, **options))


def raw_client(broker: MosquittoBroker) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def receive_until(t: MqttTransport, wanted: bytes, timeout: float) -> bool:
    for p in t.packets(timeout=timeout):
        if p.data == wanted:
            return True
    return False


def test_url_parsing() -> None:
    c = MqttConfig.from_url("mqtts://dev%40x:p%3Ass@broker.local", "lab", username=None, chunk_size=1000)
    assert (c.host, c.port, c.tls, c.username, c.password, c.chunk_size) == \
        ("broker.local", 8883, True, "dev@x", "p:ss", 1000)
    c = MqttConfig.from_url("mqtt://u:p@10.0.0.2:1884", "lab", username="other", tls_ca="/ca.pem")
    assert (c.port, c.username, c.password, c.tls, c.tls_ca) == (1884, "other", "p", True, Path("/ca.pem"))
    assert c.packet_topic("lab", "digits", "dev-1") == "skill/lab/tasks/digits/dev-1"
    assert c.chunk_topic("lab", "dev 1", "ab" * 32, 7) == f"skill/lab/chunks/dev%201/{'ab' * 32}/7"
    with pytest.raises(ValueError, match="not an MQTT URL"):
        MqttConfig.from_url("http://x", "lab")
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        MqttConfig(fleet="lab", tls_cert=Path("c.pem"))
    with pytest.raises(ValueError, match="cannot be used"):
        MqttConfig(fleet="lab/+")


def test_live_and_late_joiner_get_latest_retained_packets(mosquitto: MosquittoBroker) -> None:
    fleet = fleet_name()
    early = connect(mosquitto, fleet)
    pub = connect(mosquitto, fleet)
    p_old, p_new, p_other = os.urandom(300), os.urandom(400), os.urandom(500)
    pub.publish(p_old, fleet=fleet, task="digits", agent_id="dev-a", seq=1)
    pub.publish(p_new, fleet=fleet, task="digits", agent_id="dev-a", seq=2)
    pub.publish(p_other, fleet=fleet, task="birds", agent_id="dev-a", seq=1)

    live = {p.data for p in early.drain(idle=0.5, timeout=10)}
    assert live == {p_old, p_new, p_other}, "a subscriber that was online sees every publish"

    late = connect(mosquitto, fleet)  # joins after everything was published
    got = {p.task: p for p in late.drain(idle=0.5, timeout=10)}
    assert set(got) == {"digits", "birds"}
    assert got["digits"].data == p_new and got["digits"].seq == 2, "retained = the latest per task and agent"
    assert got["birds"].data == p_other
    assert got["digits"].origin == f"skill/{fleet}/tasks/digits/dev-a"
    assert pub.poll(timeout=0.3) == [], "own packets are not delivered back"
    for t in (early, pub, late):
        t.close()


def test_names_with_topic_characters_are_encoded(mosquitto: MosquittoBroker) -> None:
    fleet = fleet_name()
    pub = connect(mosquitto, fleet)
    pub.publish(b"p1", fleet=fleet, task="traffic signs/#1", agent_id="dev +", seq=1)
    assert pub.config.packet_topic(fleet, "traffic signs/#1", "dev +") == \
        f"skill/{fleet}/tasks/traffic%20signs%2F%231/dev%20%2B"
    rx = connect(mosquitto, fleet)
    (p,) = list(rx.drain(idle=0.5, timeout=10))
    assert (p.task, p.agent_id, p.data) == ("traffic signs/#1", "dev +", b"p1")
    pub.close()
    rx.close()


def test_packet_from_plain_mosquitto_pub_is_received(mosquitto: MosquittoBroker) -> None:
    """Operators can inject a packet file by hand: no content type means 'packet bytes'."""
    fleet = fleet_name()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # MQTT 3.1.1: no properties at all
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    c.publish(f"skill/{fleet}/tasks/t1/manual", b"PKT" * 100, qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()
    rx = connect(mosquitto, fleet)
    (p,) = list(rx.drain(idle=0.5, timeout=10))
    assert (p.data, p.task, p.agent_id, p.seq) == (b"PKT" * 100, "t1", "manual", -1)
    rx.close()


def test_large_packet_is_chunked_and_reassembled(mosquitto: MosquittoBroker) -> None:
    fleet = fleet_name()
    big = os.urandom(100_000)
    pub = connect(mosquitto, fleet, chunk_size=4096)
    pub.publish(big, fleet=fleet, task="big", agent_id="dev-a", seq=7)

    # The broker really holds 25 retained chunks plus the manifest.
    seen: dict[str, bytes] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: seen.__setitem__(m.topic, m.payload)
    c.connect(mosquitto.host, mosquitto.port)
    c.loop_start()
    c.subscribe(f"skill/{fleet}/#", 1)
    wait_for(lambda: len(seen) == 26, 10, "26 retained messages")
    c.loop_stop()
    sha = hashlib.sha256(big).hexdigest()
    assert b"".join(seen[f"skill/{fleet}/chunks/dev-a/{sha}/{i}"] for i in range(25)) == big

    rx = connect(mosquitto, fleet)  # its own chunk size does not matter for receiving
    (p,) = list(rx.drain(idle=0.5, timeout=20))
    assert p.data == big and (p.task, p.agent_id, p.seq) == ("big", "dev-a", 7)
    assert rx.stats.chunks_in == 25 and rx.pending() == 0

    # A newer version replaces the manifest and deletes the superseded chunks from the broker.
    big2 = os.urandom(9000)
    pub.publish(big2, fleet=fleet, task="big", agent_id="dev-a", seq=8)
    (p2,) = list(rx.drain(idle=0.5, timeout=20))
    assert p2.data == big2
    late = connect(mosquitto, fleet)
    assert [q.data for q in late.drain(idle=0.5, timeout=20)] == [big2]
    c.disconnect()
    retained_now: dict[str, bytes] = {}
    c = raw_client(mosquitto)
    c.on_message = lambda cl, u, m: retained_now.__setitem__(m.topic, m.payload)
    c.subscribe(f"skill/{fleet}/chunks/#", 1)
    wait_for(lambda: len(retained_now) == 3, 5, "the 3 chunks of the new version")
    time.sleep(0.2)
    sha2 = hashlib.sha256(big2).hexdigest()
    assert sorted(retained_now) == [f"skill/{fleet}/chunks/dev-a/{sha2}/{i}" for i in range(3)], \
        "superseded chunks must not stay retained on the broker forever"
    c.disconnect()
    for t in (pub, rx, late):
        t.close()


def test_corrupt_chunked_packet_is_dropped(mosquitto: MosquittoBroker) -> None:
    fleet = fleet_name()
    pub = connect(mosquitto, fleet, chunk_size=1000)
    data = os.urandom(3500)
    pub.publish(data, fleet=fleet, task="t", agent_id="a", seq=1)
    sha = hashlib.sha256(data).hexdigest()
    c = raw_client(mosquitto)
    tampered = bytearray(data[1000:2000])
    tampered[10] ^= 0xFF
    c.publish(f"skill/{fleet}/chunks/a/{sha}/1", bytes(tampered), qos=1, retain=True).wait_for_publish(5)
    c.publish(f"skill/{fleet}/chunks/a/{sha}/2", b"short", qos=1, retain=True).wait_for_publish(5)
    rx = connect(mosquitto, fleet, stall_rerequest=0.2)
    assert list(rx.drain(idle=0.5, timeout=10)) == [], "refused chunks are no activity: drain ends"
    assert 1 <= rx.stats.corrupt <= 3, "the wrong-length chunk is refused (re-asked with backoff 0.2, 0.4 s)"
    assert rx.progress() == {sha: (3, 4)}
    # put back the right length but wrong bytes: reassembly succeeds, the sha256 check fails
    corrupt_before = rx.stats.corrupt
    c.publish(f"skill/{fleet}/chunks/a/{sha}/2", b"\0" * 1000, qos=1, retain=True).wait_for_publish(5)
    wait_for(lambda: rx.pending() == 0, 5, "the transfer to complete")
    # >= : a stall re-request still in flight may bring the old short chunk back (one more refusal) first
    assert rx.stats.corrupt >= corrupt_before + 1 and list(rx.packets(timeout=0.5)) == [], \
        "complete, but the sha256 check fails: nothing is delivered"
    assert rx.progress() == {}, "the failed transfer is dropped, not kept half-done"
    c.loop_stop()
    pub.close()
    rx.close()


def test_transfer_completes_when_broker_drops_queued_chunks(tmp_path: Path) -> None:
    """A broker with a tiny per-client queue drops most of a burst of retained chunks; the
    stalled receiver asks again for exactly what it lacks until the packet is whole."""
    broker = MosquittoBroker(tmp_path / "tiny", max_queued_messages=3, max_inflight_messages=2).start()
    try:
        fleet = fleet_name()
        data = os.urandom(20_000)
        pub = connect(broker, fleet, chunk_size=1000)  # 20 chunks
        pub.publish(data, fleet=fleet, task="t", agent_id="a", seq=1)
        rx = connect(broker, fleet, stall_rerequest=0.3)
        assert receive_until(rx, data, timeout=20)
        assert "Outgoing messages are being dropped" in broker.log(), "the broker really dropped chunks"
        assert rx.stats.chunks_in == 20 and rx.stats.corrupt == 0
        pub.close()
        rx.close()
    finally:
        broker.kill()


def test_chunked_transfer_resumes_after_disconnect(own_broker: MosquittoBroker) -> None:
    """The receiver holds part of a packet, loses the broker, and after reconnecting asks only
    for the chunks it lacks."""
    fleet = fleet_name()
    data = os.urandom(64 * 1024)
    pub = connect(own_broker, fleet, chunk_size=2048)  # 32 chunks
    pub.publish(data, fleet=fleet, task="t", agent_id="dev-a", seq=3)
    sha = hashlib.sha256(data).hexdigest()
    lacking = {3, 17, 30, 31}
    c = raw_client(own_broker)  # take some chunks off the broker: the transfer stops half way
    for i in lacking:
        c.publish(f"skill/{fleet}/chunks/dev-a/{sha}/{i}", b"", qos=1, retain=True).wait_for_publish(5)
    c.loop_stop()

    rx = connect(own_broker, fleet, stall_rerequest=60)
    assert list(rx.drain(idle=0.5, timeout=10)) == []
    assert rx.progress() == {sha: (32 - len(lacking), 32)}

    own_broker.kill()  # both devices lose the broker mid-transfer
    wait_for(lambda: not rx.connected and not pub.connected, 5, "both clients to notice")
    own_broker.start()  # an empty broker on the same port; the publisher re-publishes its own
    assert receive_until(rx, data, timeout=15)
    assert rx.stats.chunks_in == 32 and rx.stats.chunks_ignored == 0, \
        "after the reconnect only the missing chunks were fetched"
    assert rx.stats.disconnects == 1 and rx.stats.connects == 2 and pub.stats.republished >= 33
    pub.close()
    rx.close()


def test_reconnect_with_backoff_when_broker_restarts(own_broker: MosquittoBroker) -> None:
    fleet = fleet_name()
    a = connect(own_broker, fleet, reconnect_min_delay=0.1, reconnect_max_delay=0.8)
    b = connect(own_broker, fleet, reconnect_min_delay=0.1, reconnect_max_delay=0.8)
    a.publish(b"before", fleet=fleet, task="t", agent_id="a", seq=1)
    assert [p.data for p in b.drain(idle=0.3, timeout=10)] == [b"before"]

    own_broker.kill()
    down_at = time.monotonic()
    done: list[float] = []
    errors: list[BaseException] = []

    def publish_while_down() -> None:
        try:
            a.publish(b"during outage", fleet=fleet, task="t2", agent_id="a", seq=1)
            done.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    worker = threading.Thread(target=publish_while_down)
    worker.start()
    time.sleep(2.5)
    assert not done, "publish must wait for the broker's acknowledgement"
    own_broker.start()
    up_at = time.monotonic()
    worker.join(15)
    assert not errors and done, errors
    assert done[0] - up_at < 2.0, "reconnect is bounded by reconnect_max_delay (0.8 s) plus slack"

    assert receive_until(b, b"during outage", timeout=10), "the other device gets it after reconnecting"

    # exponential backoff: gaps between failed attempts grow 0.1 -> 0.2 -> 0.4 -> 0.8 and stay capped
    attempts = [t for t in b.stats.failed_attempts if down_at <= t <= up_at]
    gaps = [y - x for x, y in zip(attempts, attempts[1:])]
    assert len(attempts) >= 4, attempts
    assert gaps[0] < gaps[1] < gaps[2], f"delays must grow: {gaps}"
    assert abs(gaps[1] / gaps[0] - 2) < 0.6, f"and double: {gaps}"
    assert max(gaps) < 0.8 + 0.3, f"and stay capped at reconnect_max_delay: {gaps}"
    a.close()
    b.close()


def test_first_connection_retries_until_broker_is_up(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "late")
    threading.Timer(1.0, broker.start).start()
    t0 = time.monotonic()
    t = connect(broker, fleet_name(), reconnect_min_delay=0.2, reconnect_max_delay=0.5)
    assert 0.9 < time.monotonic() - t0 < 6
    assert t.connected
    t.close()
    broker.kill()


def test_unreachable_broker_gives_clear_error(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "never")  # configured, never started: nothing listens
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"cannot reach MQTT broker at mqtt://127\.0\.0\.1:\d+ within 1\.5 s"):
        connect(broker, fleet_name(), connect_timeout=1.5)
    assert 1.4 < time.monotonic() - t0 < 4


def test_username_password_auth(tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "auth", users={"device-1": "s3cret", "device-2": "other"}).start()
    try:
        fleet = fleet_name()
        url = broker.url
        a = open_transport(url, fleet, username="device-1", password="s3cret", connect_timeout=5)
        b = open_transport(url.replace("mqtt://", "mqtt://device-2:other@"), fleet, connect_timeout=5)
        a.publish(b"authed", fleet=fleet, task="t", agent_id="device-1", seq=1)
        assert [p.data for p in b.drain(idle=0.5, timeout=10)] == [b"authed"]
        a.close()
        b.close()

        t0 = time.monotonic()
        with pytest.raises(TransportAuthError, match="(Bad user name or password|Not authorized).*--username/--password"):
            open_transport(url, fleet, username="device-1", password="wrong", connect_timeout=5)
        with pytest.raises(TransportAuthError, match="refused the connection"):
            open_transport(url, fleet, connect_timeout=5)  # anonymous is not allowed
        assert time.monotonic() - t0 < 3, "a refused login must fail fast, not retry until the timeout"
    finally:
        broker.kill()


def test_broker_acl_pins_each_device_to_its_own_topics(tmp_path: Path) -> None:
    """The layout puts the agent id in every topic a device writes, so an ACL can enforce it."""
    acl = ["pattern read skill/#", "pattern write skill/+/tasks/+/%u", "pattern write skill/+/chunks/%u/#"]
    broker = MosquittoBroker(tmp_path / "acl", users={"dev-1": "pw1", "dev-2": "pw2"}, acl=acl).start()
    try:
        fleet = fleet_name()
        one = open_transport(broker.url, fleet, username="dev-1", password="pw1", chunk_size=1000, connect_timeout=5)
        two = open_transport(broker.url, fleet, username="dev-2", password="pw2", connect_timeout=5)
        big = os.urandom(5000)
        one.publish(big, fleet=fleet, task="t", agent_id="dev-1", seq=1)  # chunked, own topics: allowed
        assert [p.data for p in two.drain(idle=0.5, timeout=10)] == [big]
        with pytest.raises(TransportAuthError, match="refused a publish: Not authorized"):
            one.publish(b"forged", fleet=fleet, task="t", agent_id="dev-2", seq=9)
        with pytest.raises(TransportAuthError, match="refused a publish"):
            one.publish(os.urandom(3000), fleet=fleet, task="t", agent_id="dev-2", seq=9)  # chunks too
        assert two.poll(timeout=0.5) == []
        one.close()
        two.close()
    finally:
        broker.kill()


def test_tls_with_client_certificate(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path / "pki")
    broker = MosquittoBroker(tmp_path / "tls", tls=tls).start()
    try:
        fleet = fleet_name()
        opts = dict(tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key, connect_timeout=5)
        a = open_transport(broker.url, fleet, **opts)
        b = open_transport(broker.url, fleet, **opts)
        a.publish(b"over tls", fleet=fleet, task="t", agent_id="a", seq=1)
        assert [p.data for p in b.drain(idle=0.5, timeout=10)] == [b"over tls"]
        a.close()
        b.close()

        other_ca = make_tls_files(tmp_path / "other-pki").ca
        with pytest.raises(TransportError, match="TLS handshake .* failed.*--tls-ca"):
            open_transport(broker.url, fleet, tls_ca=other_ca, tls_cert=tls.client_cert,
                           tls_key=tls.client_key, connect_timeout=3)
    finally:
        broker.kill()
