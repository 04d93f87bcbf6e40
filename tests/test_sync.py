"""SyncService and `skill-edge sync`: packets -> receiver -> bank, over a folder and a real broker.

Devices here hold small random TaskKnowledge records (well-separated GMMC anchors, so the
plausibility check has no reason to refuse them); the end-to-end learn -> sync -> classify
test with a real ROM lives with the device runtime.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mqtt_broker import MosquittoBroker, mosquitto, needs_mosquitto, own_broker  # noqa: F401
from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.cli.sync import app as sync_app
from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
from skill_edge.runtime.knowledge.records import GmmcAnchor, TaskKnowledge, TaskMeta
from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.exchange.receive import PacketReceiver
from skill_edge.runtime.exchange.sync import BankPlausibility, SyncService
from skill_edge.runtime.exchange.transport import DirectoryTransport, open_transport, write_atomically

ROM_FP = "ab" * 32
OTHER_ROM_FP = "cd" * 32
DIM = 48


def random_knowledge(task: str, agent: str, seq: int, *, seed: int, dim: int = DIM, k: int = 4,
                     rom: str = ROM_FP) -> TaskKnowledge:
    """A valid task record from random arrays; each task's anchor sits in its own region."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim) * 8.0
    means = (centre + rng.normal(size=(k, dim)) * 0.5).astype(np.float32)
    return TaskKnowledge(
        task=task, labels=[f"{task}-{i}" for i in range(3)],
        head_weight=rng.normal(size=(3, dim)).astype(np.float32), head_bias=rng.normal(size=3).astype(np.float32),
        meta=TaskMeta(agent_id=agent, seq=seq, rom_fingerprint=rom, feature_transform="raw", n_train=60,
                      metrics={"val_acc": 0.9}),
        gmmc=GmmcAnchor(means, rng.uniform(0.5, 1.0, size=(k, dim)).astype(np.float32),
                        np.full(k, 1.0 / k, dtype=np.float32)),
        thresholds={"gmmc": -50.0},
    ).validate()


@dataclass
class Device:
    """One device's files: home (keys, bank, outbox, sync state) plus its signing key."""

    name: str
    home: Path
    key: DeviceKey
    trust: Path

    @property
    def bank_dir(self) -> Path:
        return self.home / "bank"

    @property
    def outbox(self) -> Path:
        return self.home / "outbox"

    def bank(self, quota: int | None = None) -> KnowledgeBank:
        return KnowledgeBank(self.bank_dir, quota_bytes=quota)

    def learn(self, task: str, seq: int = 1, seed: int | None = None, dim: int = DIM, rom: str = ROM_FP,
              to_outbox: bool = True) -> bytes:
        """Store a new task in the own bank and queue its signed packet in the outbox."""
        k = random_knowledge(task, self.name, seq, seed=zlib.crc32(f"{task}/{seq}".encode()) if seed is None else seed,
                             dim=dim, rom=rom)
        data = PacketCodec().encode(k, self.key)
        self.bank().put(k, packet_bytes=data)
        if to_outbox:
            write_atomically(self.outbox / f"{task}-{seq}.skp", data)
        return data

    def service(self, transport, fleet: str, plausibility: bool = True, quota: int | None = None) -> SyncService:
        bank = self.bank(quota)
        receiver = PacketReceiver(TrustStore(self.trust), ROM_FP, self.home / "sync" / "receive",
                                  plausibility=BankPlausibility(bank) if plausibility else None)
        return SyncService(transport, bank, receiver, fleet=fleet, outbox=self.outbox)

    def cli_args(self, transport: str, fleet: str) -> list[str]:
        return ["--transport", transport, "--fleet", fleet, "--home", str(self.home), "--trust", str(self.trust),
                "--rom-fingerprint", ROM_FP]

    def tasks(self) -> dict[str, str]:
        """task -> content hash of what the bank holds."""
        return {e.task: e.content_hash for e in self.bank().entries()}


def make_fleet(root: Path, names: list[str], trusted: list[str] | None = None) -> list[Device]:
    """Devices with their own keys and banks, sharing one trust store (holding ``trusted`` or all)."""
    trust = root / "trust"
    devices = []
    for name in names:
        key = DeviceKey.generate()
        key.save(root / name / "keys")
        if trusted is None or name in trusted:
            TrustStore(trust).add(name, key.public_key)
        devices.append(Device(name, root / name, key, trust))
    trust.mkdir(parents=True, exist_ok=True)
    return devices


# ---------------------------------------------------------------------------- in-process, shared folder


def test_directory_sync_round_trip(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    share = tmp_path / "usb"
    a.learn("birds")
    a.learn("cars")
    b.learn("digits")

    sa = a.service(open_transport(f"dir:{share}", "lab", state_dir=a.home / "sync"), "lab")
    sa.sync_once(idle=0.3, timeout=10)
    assert (sa.stats.published, sa.stats.arrived) == (2, 0)
    assert sorted(p.name for p in (a.outbox / "sent").iterdir()) == ["birds-1.skp", "cars-1.skp"]
    assert not list(a.outbox.glob("*.skp")), "published packets leave the outbox"

    sb = b.service(open_transport(f"dir:{share}", "lab", state_dir=b.home / "sync"), "lab")
    sb.sync_once(idle=0.3, timeout=10)
    assert (sb.stats.published, sb.stats.arrived, sb.stats.accepted) == (1, 2, 2)
    assert b.tasks() == a.tasks() | {"digits": b.tasks()["digits"]}, "b now holds a's tasks, bit for bit"

    sa.sync_once(idle=0.3, timeout=10)
    assert sa.stats.accepted == 1 and a.tasks() == b.tasks(), "both banks converged"
    stored = a.bank().get("digits")
    assert stored.meta.agent_id == "dev-b" and stored.meta.source.startswith("packet:")
    assert a.bank().packet_bytes("digits") == (b.outbox / "sent" / "digits-1.skp").read_bytes()

    # a second run of the same device finds nothing new (the folder transport remembers)
    sb2 = b.service(open_transport(f"dir:{share}", "lab", state_dir=b.home / "sync"), "lab")
    sb2.sync_once(idle=0.3, timeout=10)
    assert (sb2.stats.arrived, sb2.stats.accepted) == (0, 0)


def test_a_quarantined_packet_gets_a_second_look_when_the_bank_changes(tmp_path: Path) -> None:
    """Capture is judged against the bank of the moment; quarantine is re-judged when it changes."""
    me, peer = make_fleet(tmp_path, ["me", "peer"])
    share = tmp_path / "share"
    peer_tx = DirectoryTransport(share, "lab")
    me.learn("victim", seed=1, to_outbox=False)
    sibling = random_knowledge("sibling", "peer", 1, seed=1)  # sits on the victim's inputs
    sibling.gmmc.variances = sibling.gmmc.variances * 0.9
    peer_tx.publish(PacketCodec().encode(sibling, peer.key), fleet="lab", task="sibling", agent_id="peer", seq=1)

    s = me.service(DirectoryTransport(share, "lab"), "lab")
    s.drain(idle=0.3, timeout=10)
    assert s.stats.quarantined == 1 and "sibling" not in me.tasks()
    assert s.recheck_quarantine() == [], "the bank has not changed: no second look"

    me.bank().remove("victim")  # the task it would have captured is gone
    peer_tx.publish(peer.learn("t9", to_outbox=False), fleet="lab", task="t9", agent_id="peer", seq=1)
    events = s.drain(idle=0.3, timeout=10)
    assert [e.kind for e in events] == ["accepted", "released"]
    assert "quarantined for" in events[1].reason and "victim" in events[1].reason
    assert set(me.tasks()) == {"sibling", "t9"} and me.bank().quarantined() == []
    assert (s.stats.accepted, s.stats.released, s.stats.quarantined) == (1, 1, 1)
    # released means accepted for good: the same packet again is a duplicate
    write_atomically(share / "lab" / "sibling" / "copy-1.skp", me.bank().packet_bytes("sibling"))
    assert [e.kind for e in s.drain(idle=0.3, timeout=10)] == ["duplicate"]


def test_every_receive_outcome_is_counted_and_handled(tmp_path: Path) -> None:
    me, peer, stranger = make_fleet(tmp_path, ["me", "peer", "stranger"], trusted=["me", "peer"])
    share = tmp_path / "share"
    peer_tx = DirectoryTransport(share, "lab")
    victim = me.learn("victim", seed=1, to_outbox=False)  # a task this device already knows
    del victim

    good_v2 = peer.learn("t1", seq=2, to_outbox=False)
    old_v1 = peer.learn("t1", seq=1, to_outbox=False)  # signed, trusted, but older: a rollback
    unknown = stranger.learn("t2", to_outbox=False)  # valid, but signer not trusted
    wrong_rom = peer.learn("t3", rom=OTHER_ROM_FP, to_outbox=False)
    # a trusted peer re-sends the victim's anchor under a new name, a little sharper: in scale,
    # yet it outscores the victim's own anchor on about half of the victim's inputs
    hijack = random_knowledge("hijack", "peer", 1, seed=1)
    hijack.gmmc.variances = hijack.gmmc.variances * 0.9
    hijack_bytes = PacketCodec().encode(hijack, peer.key)

    for task, agent, seq, data in [("t1", "peer", 2, good_v2), ("t1", "peer", 1, old_v1), ("t2", "stranger", 1, unknown),
                                   ("t3", "peer", 1, wrong_rom), ("hijack", "peer", 1, hijack_bytes),
                                   ("junk", "peer", 9, b"SKPK\x01" + os.urandom(100))]:
        peer_tx.publish(data, fleet="lab", task=task, agent_id=agent, seq=seq)
    # the same packet again under another name: a duplicate
    write_atomically(share / "lab" / "t1" / "copy-2.skp", good_v2)

    s = me.service(DirectoryTransport(share, "lab"), "lab")
    events = {(e.task, e.kind): e for e in s.drain(idle=0.3, timeout=10)}
    st = s.stats
    assert (st.arrived, st.accepted, st.duplicate, st.rejected, st.quarantined, st.errors) == (7, 1, 1, 4, 1, 0), st
    assert "rollback" in events[("t1", "rejected")].reason
    assert "unknown signer" in events[("t2", "rejected")].reason
    assert "ROM" in events[("t3", "rejected")].reason
    assert events[("junk", "rejected")].agent_id == "peer", "undecodable: addressed by its file name"
    assert sorted(me.tasks()) == ["t1", "victim"], "only the good packet entered the bank"
    (q,) = me.bank().quarantined()
    assert q.task == "hijack" and "victim" in q.reason and q.has_packet


def test_only_this_device_key_moves_its_seq_ledger_and_republish_signs_past_it(tmp_path: Path) -> None:
    """A newer version of an own task signed by this device's key (from before a backup restore) raises
    the key's ledger; a trusted peer that claims this device's agent id with a higher seq moves nothing."""
    from skill_edge.runtime.exchange.seq_ledger import SeqLedger

    me, peer = make_fleet(tmp_path, ["me", "peer"])
    mine = me.key.key_id  # a real device's agent id is its key id
    own = random_knowledge("t", mine, 1, seed=3)
    me.bank().put(own, packet_bytes=PacketCodec().encode(own, me.key), own=True)
    ledger = SeqLedger(me.home / "keys" / "signed_seqs.json", mine)
    share = tmp_path / "share"
    tx = DirectoryTransport(share, "lab")
    forged = PacketCodec().encode(random_knowledge("t", mine, 50, seed=4), peer.key)
    tx.publish(forged, fleet="lab", task="t", agent_id=mine, seq=50)

    s = SyncService(DirectoryTransport(share, "lab"), me.bank(),
                    PacketReceiver(TrustStore(me.trust), ROM_FP, me.home / "sync" / "receive"), fleet="lab",
                    signed_seqs=ledger, republish_key=me.key)
    [e] = s.drain(idle=0.3, timeout=10)
    assert e.kind == "rejected" and "would replace the task this device learned itself" in e.reason
    assert ledger.get("t") == 0 and s.republish_outdated() == []

    tx.publish(PacketCodec().encode(random_knowledge("t", mine, 7, seed=5), me.key), fleet="lab", task="t",
               agent_id=mine, seq=7)
    [e] = s.drain(idle=0.3, timeout=10)
    assert e.kind == "rejected" and "the fleet holds seq 7 of this device's own task 't', signed by its key" in e.reason
    assert "signed again as seq 8 and published" in e.reason
    assert ledger.get("t") == 7 and me.bank().get("t").content_hash() == own.content_hash()  # own work kept

    [e] = s.republish_outdated()
    assert (e.kind, e.seq) == ("resigned", 8) and s.stats.resigned == 1
    held = me.bank().get("t")
    assert held.meta.seq == 8 and ledger.get("t") == 8
    np.testing.assert_array_equal(held.head_weight, own.head_weight)
    sent = PacketCodec().decode(me.bank().packet_bytes("t"), trust=TrustStore(me.trust))
    assert sent.seq == 8 and sent.signer == mine
    assert s.republish_outdated() == []

    # learned again after a restore, before any sync: the same seq as a version the fleet holds, other bytes
    tx.publish(PacketCodec().encode(random_knowledge("t", mine, 8, seed=6), me.key), fleet="lab", task="t",
               agent_id=mine, seq=8)
    [e] = s.drain(idle=0.3, timeout=10)
    assert "other bytes under the seq of the version this bank keeps (seq 8" in e.reason and "equivocation" in e.reason
    assert ledger.get("t") == 9 and me.bank().get("t").meta.seq == 8  # seq 9 counts as taken; nothing replaced
    [e] = s.republish_outdated()
    assert (e.kind, e.seq) == ("resigned", 10) and me.bank().get("t").meta.seq == 10


def test_a_seq_ledger_that_cannot_be_written_loses_nothing(tmp_path: Path) -> None:
    """The floor must be on disk before the newer own version is marked delivered: if the ledger cannot be
    written, the packet is an error, offered again, and taken the next time."""
    from skill_edge.runtime.exchange.seq_ledger import SeqLedger

    me, = make_fleet(tmp_path, ["me"])
    mine = me.key.key_id
    own = random_knowledge("t", mine, 1, seed=3)
    me.bank().put(own, packet_bytes=PacketCodec().encode(own, me.key), own=True)
    ledger_path = me.home / "keys" / "signed_seqs.json"
    ledger_path.mkdir(parents=True)  # a directory where the file must go: every write fails
    share = tmp_path / "share"
    DirectoryTransport(share, "lab").publish(PacketCodec().encode(random_knowledge("t", mine, 5, seed=5), me.key),
                                             fleet="lab", task="t", agent_id=mine, seq=5)
    s = SyncService(DirectoryTransport(share, "lab", retry_delay=0.5), me.bank(),
                    PacketReceiver(TrustStore(me.trust), ROM_FP, me.home / "sync" / "receive"), fleet="lab",
                    signed_seqs=SeqLedger(ledger_path, mine))
    [e] = s.drain(idle=0.2, timeout=5)
    assert e.kind == "error" and "could not store" in e.reason
    assert me.bank().get("t").meta.seq == 1

    ledger_path.rmdir()  # the fault cleared: the same packet comes again and raises the floor
    [e] = s.drain(idle=0.8, timeout=5)
    assert e.kind == "rejected" and "the fleet holds seq 5" in e.reason
    assert SeqLedger(ledger_path, mine).get("t") == 5 and me.bank().get("t").meta.seq == 1


def test_store_failure_loses_nothing(tmp_path: Path) -> None:
    """A full bank turns an accept into an error; the packet is retried and stored once there is room."""
    me, peer = make_fleet(tmp_path, ["me", "peer"])
    data = peer.learn("t1", to_outbox=False)
    DirectoryTransport(tmp_path / "share", "lab").publish(data, fleet="lab", task="t1", agent_id="peer", seq=1)

    tx = DirectoryTransport(tmp_path / "share", "lab", retry_delay=0.5)
    full = me.service(tx, "lab", quota=1000)
    (e,) = full.drain(idle=0.2, timeout=5)
    assert e.kind == "error" and "quota" in e.reason and me.tasks() == {}
    assert tx.poll(timeout=0.2) == [], "a failed packet is retried after retry_delay, not in a hot loop"
    roomy = me.service(tx, "lab")  # same transport: it must hand the packet over again
    (e2,) = roomy.drain(idle=0.8, timeout=5)
    assert e2.kind == "accepted" and list(me.tasks()) == ["t1"]


def test_cli_one_shot_over_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    a.learn("birds")
    runner = CliRunner()
    share = f"dir:{tmp_path / 'share'}"
    r = runner.invoke(sync_app, a.cli_args(share, "lab") + ["--idle", "0.3"])
    assert r.exit_code == 0, r.output
    assert "published 1" in r.output
    r = runner.invoke(sync_app, b.cli_args(share, "lab") + ["--idle", "0.3"])
    assert r.exit_code == 0, r.output
    assert "accepted" in r.output and "arrived 1" in r.output and "accepted 1" in r.output
    assert b.tasks() == a.tasks()

    write_atomically(b.outbox / "broken.skp", b"not a packet")
    r = runner.invoke(sync_app, b.cli_args(share, "lab") + ["--idle", "0.3"])
    assert r.exit_code == 1 and "cannot publish" in r.output and "errors 1" in r.output
    assert (b.outbox / "broken.skp").exists(), "a file that could not be published stays queued"

    # an empty home and no ROM anywhere (the default folder is only there once a ROM is exported): usage
    import skill_edge.models

    monkeypatch.setattr(skill_edge.models, "default_rom_dir", lambda: tmp_path / "no-rom")
    monkeypatch.delenv("SKILL_EDGE_ROM", raising=False)
    r = runner.invoke(sync_app, ["--transport", share, "--home", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "pass --rom" in r.output


# ---------------------------------------------------------------------------- through a real broker


@needs_mosquitto
@pytest.mark.mqtt
def test_mqtt_sync_with_chunked_packets(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    fleet = f"f{uuid.uuid4().hex[:8]}"
    data = a.learn("big", dim=512)
    n_chunks = -(-len(data) // 4096)
    assert n_chunks >= 4
    url = mosquitto.url
    sa = a.service(open_transport(url, fleet, chunk_size=4096), fleet)
    sa.sync_once(idle=0.3, timeout=10)
    assert sa.stats.published == 1 and sa.stats.arrived == 0
    sb = b.service(open_transport(url, fleet, chunk_size=4096), fleet)
    sb.sync_once(idle=0.5, timeout=20)
    assert sb.stats.accepted == 1 and b.tasks() == a.tasks()
    assert sb.transport.stats.chunks_in == n_chunks
    # the same device reconnecting later: its own retained packet comes back and is skipped
    sa2 = a.service(open_transport(url, fleet), fleet)
    sa2.sync_once(idle=0.5, timeout=10)
    assert (sa2.stats.arrived, sa2.stats.own, sa2.stats.accepted) == (1, 1, 0)
    for s in (sa, sb, sa2):
        s.transport.close()


def _start_device(dev: Device, url: str, fleet: str, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "skill_edge.runtime.cli.sync", *dev.cli_args(url, fleet),
            "--watch", "--chunk-size", "2KiB", "--connect-timeout", "30"]
    env = {**os.environ, "SKILL_EDGE_LOG": "INFO", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)


def _wait_converged(devices: list[Device], expected: set[str], timeout: float, procs, logs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        views = [d.tasks() for d in devices]
        if all(set(v) == expected for v in views) and all(v == views[0] for v in views):
            return
        for p, log in zip(procs, logs):
            assert p.poll() is None, f"device process died:\n{log.read_text()}"
        time.sleep(0.25)
    state = {d.name: sorted(d.tasks()) for d in devices}
    raise AssertionError(f"no convergence to {sorted(expected)} within {timeout} s: {state}\n"
                         + "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs))


@needs_mosquitto
@pytest.mark.mqtt
@pytest.mark.slow  # 3 device processes: ~15 s on an idle 2-core machine, ~35 s on a busy one
def test_device_processes_converge_through_broker_restart(own_broker: MosquittoBroker, tmp_path: Path) -> None:
    """`skill-edge sync --watch` processes (own bank and key each, shared trust store) converge to
    identical banks although the broker is killed right after they published and comes back
    empty; a device that joins after the restart gets everything too."""
    a, b, c = devices = make_fleet(tmp_path, ["dev-a", "dev-b", "dev-c"])
    fleet = f"f{uuid.uuid4().hex[:8]}"
    a.learn("birds", dim=256)  # ~11 KB packets: 6 chunks of 2 KiB each
    b.learn("cars", dim=256)
    c.learn("digits", dim=256)
    procs, logs = [], []
    for dev in (a, b):
        logs.append(tmp_path / f"{dev.name}.log")
        procs.append(_start_device(dev, own_broker.url, fleet, logs[-1]))
    try:
        deadline = time.monotonic() + 30
        while not ((a.outbox / "sent" / "birds-1.skp").exists() and (b.outbox / "sent" / "cars-1.skp").exists()):
            assert time.monotonic() < deadline, "devices did not publish:\n" + logs[0].read_text() + logs[1].read_text()
            time.sleep(0.05)

        own_broker.kill()  # mid-sync power cut: the broker forgets every retained packet
        a.learn("flowers", dim=256)  # learned while the broker is away: waits in the outbox
        b.learn("cars", seq=2, dim=256)  # a new version of a task
        time.sleep(0.5)
        own_broker.start()

        logs.append(tmp_path / "dev-c.log")
        procs.append(_start_device(c, own_broker.url, fleet, logs[-1]))  # joins after the restart
        _wait_converged(devices, {"birds", "cars", "digits", "flowers"}, 60, procs, logs)
        assert all(dev.bank().get("cars").meta.seq == 2 for dev in devices)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:  # report it with the logs instead of leaving it running
                p.kill()
                codes.append("did not stop within 30 s of Ctrl-C")
    assert codes == [0, 0, 0], "\n".join(log.read_text()[-2000:] for log in logs)
    out_a = logs[0].read_text()
    assert "lost connection" in out_a and "reconnected" in out_a
    assert "accepted    cars/dev-b seq 2" in out_a and "errors 0" in out_a
