"""Receive-side acceptance policy: trust, ROM fingerprint, replay, rollback, plausibility, state file."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import numpy as np
import pytest
from bench_modules import load_benchmark
from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
from skill_edge.runtime.knowledge.records import TaskKnowledge
from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.exchange.receive import (
    STATE_FILE,
    PacketReceiver,
    ReceiveState,
    ReceiveStateError,
)

fuzz = load_benchmark("fuzz_packets")
ROM = fuzz.ROM_FINGERPRINT


@pytest.fixture()
def key() -> DeviceKey:
    return DeviceKey.generate()


@pytest.fixture()
def trust(key, tmp_path) -> TrustStore:
    t = TrustStore(tmp_path / "trust")
    t.add("peer", key.public_key)
    return t


@pytest.fixture()
def receiver(trust, tmp_path) -> PacketReceiver:
    return PacketReceiver(trust, ROM, tmp_path / "state")


def version(seq: int, agent: str = "agent-a", task: str = "task-a", seed: int = 0) -> TaskKnowledge:
    return fuzz.random_knowledge(np.random.default_rng(seed + seq), d=32, c=3, k=3, m=2, bb=40, agent=agent,
                                 task=task, seq=seq)


def test_accepts_a_trusted_packet_and_records_it(receiver, key, tmp_path):
    data = PacketCodec().encode(version(1), key)
    stored = []
    r = receiver.receive(data, on_accept=lambda p, raw: stored.append((p, raw)))
    assert r.status == "accepted" and r.accepted and r.packet.seq == 1
    assert len(stored) == 1 and stored[0][1] == data and stored[0][0].knowledge.task == "task-a"
    state = json.loads((tmp_path / "state" / STATE_FILE).read_text())
    assert state["streams"] == [{"agent": "agent-a", "task": "task-a", "seq": 1, "digests": [r.packet.sha256],
                                 "signer": key.key_id}]


def test_same_packet_twice_is_a_duplicate_no_op(receiver, key, tmp_path):
    data = PacketCodec().encode(version(1), key)
    assert receiver.receive(data).status == "accepted"
    before = (tmp_path / "state" / STATE_FILE).read_bytes()
    calls = []
    r = receiver.receive(data, on_accept=lambda p, raw: calls.append(p))
    assert r.status == "duplicate" and "already accepted" in r.reason
    assert calls == [] and (tmp_path / "state" / STATE_FILE).read_bytes() == before


def test_rollback_to_an_older_seq_is_rejected(receiver, key, caplog):
    old, new = PacketCodec().encode(version(1), key), PacketCodec().encode(version(2), key)
    assert receiver.receive(new).status == "accepted"
    with caplog.at_level(logging.INFO, logger="skill_edge.runtime.exchange.receive"):
        r = receiver.receive(old)
    assert r.status == "rejected" and r.code == "rollback" and "seq 2 was already accepted" in r.reason
    assert "rollback" in caplog.text  # the reason is logged (at INFO: SyncService reports the decision once)
    assert receiver.state.latest("agent-a", "task-a") == 2


def test_newer_versions_are_accepted_and_old_accepted_ones_stay_duplicates(receiver, key):
    p1, p2, p3 = (PacketCodec().encode(version(s), key) for s in (1, 2, 5))
    assert [receiver.receive(p).status for p in (p1, p2, p3)] == ["accepted"] * 3
    assert receiver.receive(p1).status == "duplicate"  # an old echo we did accept once: no-op, not an attack
    assert receiver.state.latest("agent-a", "task-a") == 5


def test_same_seq_with_different_content_is_rejected(receiver, key):
    a = version(1)
    b = replace(a, head_bias=a.head_bias + 1.0)
    assert receiver.receive(PacketCodec().encode(a, key)).status == "accepted"
    r = receiver.receive(PacketCodec().encode(b, key))
    assert r.status == "rejected" and r.code == "equivocation"
    # the same knowledge re-encoded with another plan is also different bytes at the same seq
    assert receiver.receive(PacketCodec().encode(a, key, plan="int8")).code == "equivocation"


def test_streams_are_per_agent_and_task(receiver, key):
    assert receiver.receive(PacketCodec().encode(version(5), key)).status == "accepted"
    assert receiver.receive(PacketCodec().encode(version(1, agent="agent-b"), key)).status == "accepted"
    assert receiver.receive(PacketCodec().encode(version(1, task="task-b"), key)).status == "accepted"


def test_a_peer_may_not_speak_for_another_agent(receiver, trust, key):
    """Two trusted keys: the second may not publish (any task) under the agent id the first one owns."""
    other = DeviceKey.generate()
    trust.add("other", other.public_key)
    assert receiver.receive(PacketCodec().encode(version(1), key)).status == "accepted"
    for spoof in (version(2), version(1, task="task-b")):  # a newer version of a's task, and a new task as a
        r = receiver.receive(PacketCodec().encode(spoof, other))
        assert (r.status, r.code) == ("rejected", "agent-key-mismatch"), r.reason
        assert "agent-a" in r.reason
    assert receiver.receive(PacketCodec().encode(version(1, agent="agent-o"), other)).status == "accepted"
    assert receiver.receive(PacketCodec().encode(version(2), key)).status == "accepted"  # the owner still can


def test_unknown_signer_and_unsigned_are_rejected(receiver):
    r = receiver.receive(PacketCodec().encode(version(1), DeviceKey.generate()))
    assert r.status == "rejected" and r.code == "unknown-signer" and r.packet is None
    r = receiver.receive(PacketCodec().encode(version(1), None))
    assert r.status == "rejected" and r.code == "unsigned"
    assert receiver.state.latest("agent-a", "task-a") is None


def test_removing_a_key_from_the_trust_store_takes_effect_immediately(receiver, trust, key):
    trust.remove("peer")
    assert receiver.receive(PacketCodec().encode(version(1), key)).code == "unknown-signer"


def test_wrong_rom_fingerprint_is_rejected(trust, key, tmp_path):
    rx = PacketReceiver(trust, "0" * 64, tmp_path / "state")
    r = rx.receive(PacketCodec().encode(version(1), key))
    assert r.status == "rejected" and r.code == "wrong-rom" and "this device runs 0000" in r.reason


def test_tampered_packet_is_rejected(receiver, key):
    data = bytearray(PacketCodec().encode(version(1), key))
    data[100] ^= 0x20
    r = receiver.receive(bytes(data))
    assert r.status == "rejected" and r.code == "bad-signature"


def test_garbage_is_rejected_not_raised(receiver):
    for junk in (b"", b"SKPK", os.urandom(5000)):
        assert receiver.receive(junk).status == "rejected"


def head_norm_plausibility(limit: float):
    """A real (if simple) hijack check: a head whose weights are far larger than usual is suspicious."""
    def check(k: TaskKnowledge) -> tuple[bool, str]:
        norm = float(np.linalg.norm(k.head_weight))
        return (norm <= limit, f"head weight norm {norm:.1f} exceeds {limit}")
    return check


def test_implausible_knowledge_is_quarantined_and_not_recorded(trust, key, tmp_path):
    rx = PacketReceiver(trust, ROM, tmp_path / "state", plausibility=head_norm_plausibility(10.0))
    good = version(1)
    evil = replace(version(2), head_weight=version(2).head_weight * 1000)
    assert rx.receive(PacketCodec().encode(good, key)).status == "accepted"
    r = rx.receive(PacketCodec().encode(evil, key), on_accept=lambda p, raw: pytest.fail("stored a hijack"))
    assert r.status == "quarantined" and "exceeds 10.0" in r.reason and r.packet.seq == 2
    assert rx.state.latest("agent-a", "task-a") == 1


def test_failed_store_is_not_recorded_so_the_packet_is_taken_again(receiver, key):
    data = PacketCodec().encode(version(1), key)

    def broken_store(packet, raw):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        receiver.receive(data, on_accept=broken_store)
    assert receiver.state.latest("agent-a", "task-a") is None
    assert receiver.receive(data).status == "accepted"


def test_state_survives_a_new_receiver(trust, key, tmp_path):
    PacketReceiver(trust, ROM, tmp_path / "s").receive(PacketCodec().encode(version(3), key))
    r = PacketReceiver(trust, ROM, ReceiveState(tmp_path / "s")).receive(PacketCodec().encode(version(2), key))
    assert r.code == "rollback"


def test_corrupt_state_is_an_error_not_a_silent_reset(receiver, key, tmp_path):
    receiver.receive(PacketCodec().encode(version(1), key))
    (tmp_path / "state" / STATE_FILE).write_text("{not json")
    with pytest.raises(ReceiveStateError, match="re-allows rollbacks"):
        receiver.receive(PacketCodec().encode(version(2), key))


def test_state_file_is_replaced_atomically(receiver, key, tmp_path):
    receiver.receive(PacketCodec().encode(version(1), key))
    receiver.receive(PacketCodec().encode(version(2), key))
    leftovers = [p.name for p in (tmp_path / "state").iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["streams"][0]["seq"] == 2


# ---------------------------------------------------------------------------- the bank as second floor


@pytest.fixture()
def banked(trust, tmp_path):
    """A receiver that feeds a real bank (and checks versions against it), plus that bank."""
    from skill_edge.runtime.knowledge.bank import KnowledgeBank

    bank = KnowledgeBank(tmp_path / "bank")
    rx = PacketReceiver(trust, ROM, tmp_path / "state", bank=bank)
    return rx, bank


def store_into(bank):
    return lambda packet, raw: bank.put(packet.knowledge, packet_bytes=raw)


def test_deleting_the_state_file_does_not_reopen_rollbacks(banked, key, tmp_path):
    rx, bank = banked
    v1, v2 = PacketCodec().encode(version(1), key), PacketCodec().encode(version(2), key)
    assert rx.receive(v2, on_accept=store_into(bank)).status == "accepted"
    (tmp_path / "state" / STATE_FILE).unlink()
    r = rx.receive(v1, on_accept=lambda p, raw: pytest.fail("rolled the bank back"))
    assert r.status == "rejected" and r.code == "rollback" and "seq 2 is in the bank" in r.reason
    assert [(e.task, e.seq) for e in bank.entries()] == [("task-a", 2)]
    other = PacketCodec().encode(version(2, seed=7), key)  # seq 2 again, other content: equivocation
    assert rx.receive(other).code == "equivocation"
    r = rx.receive(v2)
    assert r.status == "duplicate" and "the bank holds it" in r.reason
    assert rx.state.latest("agent-a", "task-a") == 2, "the state file catches up with the bank"


def test_a_store_cut_short_before_the_state_write_is_a_duplicate_next_time(banked, key):
    """The process died after the bank stored the packet and before the state file recorded it."""
    rx, bank = banked
    data = PacketCodec().encode(version(3), key)
    bank.put(rx.codec.decode(data).knowledge, packet_bytes=data)
    r = rx.receive(data, on_accept=lambda p, raw: pytest.fail("stored twice"))
    assert r.status == "duplicate" and rx.state.latest("agent-a", "task-a") == 3


def test_a_task_removed_from_the_bank_can_be_received_again(banked, key):
    rx, bank = banked
    v1, v2 = PacketCodec().encode(version(1), key), PacketCodec().encode(version(2), key)
    rx.receive(v1, on_accept=store_into(bank))
    rx.receive(v2, on_accept=store_into(bank))
    bank.remove("task-a")
    assert rx.receive(v1).status == "duplicate", "an older accepted version stays a no-op"
    r = rx.receive(v2, on_accept=store_into(bank))
    assert r.status == "accepted", r.reason
    assert [(e.task, e.seq) for e in bank.entries()] == [("task-a", 2)]
    assert rx.receive(v2).status == "duplicate"
