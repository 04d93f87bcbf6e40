"""Task identity (issue 15, findings 4 and 9): a task is its origin agent plus its name.

Real signed packets, a real folder transport and the real bank: a peer's packet never replaces
a task the device learned itself, two agents' tasks of one name are both kept and both
classifiable, a newer version from the same origin replaces the older one, and the device's own
packet lives in its bank record, so sync publishes it even when no outbox file exists.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skill_edge.runtime.knowledge.bank import (
    INDEX_FORMAT,
    AmbiguousTaskError,
    KnowledgeBank,
    OwnTaskError,
    UnknownTaskError,
    _index_digest,
)
from skill_edge.runtime.cli.bank import app as bank_app
from skill_edge.runtime.cli.sync import app as sync_app
from skill_edge.runtime.knowledge.identity import TaskKey, display_names, match
from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore
from skill_edge.runtime.knowledge.records import GmmcAnchor, TaskKnowledge, TaskMeta
from skill_edge.runtime.mapping.mapper import build_mapper
from skill_edge.runtime.exchange.packet import PacketCodec
from skill_edge.runtime.exchange.receive import PacketReceiver
from skill_edge.runtime.exchange.sync import BankPlausibility, SyncService
from skill_edge.runtime.exchange.transport import open_transport

ROM_FP = "ab" * 32
DIM = 48
runner = CliRunner()


def knowledge(task: str, agent: str, seq: int, centre_seed: int) -> TaskKnowledge:
    """A valid task whose GMMC anchor sits around its own centre (``centre_seed``), far from others."""
    rng = np.random.default_rng(centre_seed * 1000 + seq)
    centre = np.random.default_rng(centre_seed).normal(size=DIM) * 8.0
    k = 4
    return TaskKnowledge(
        task=task, labels=[f"{task}-{i}" for i in range(3)],
        head_weight=rng.normal(size=(3, DIM)).astype(np.float32), head_bias=rng.normal(size=3).astype(np.float32),
        meta=TaskMeta(agent_id=agent, seq=seq, rom_fingerprint=ROM_FP, feature_transform="raw", n_train=60,
                      source="learned:/data" if seq else "", metrics={"val_acc": 0.9}),
        gmmc=GmmcAnchor((centre + rng.normal(size=(k, DIM)) * 0.5).astype(np.float32),
                        rng.uniform(0.5, 1.0, size=(k, DIM)).astype(np.float32), np.full(k, 1.0 / k, np.float32)),
        thresholds={"gmmc": -1e9},
    ).validate()


class Agent:
    """One device: its key, home, bank and a sync service on a shared folder."""

    def __init__(self, root: Path, name: str, trust: Path) -> None:
        self.name, self.home, self.trust = name, root / name, trust
        self.key = DeviceKey.generate()
        self.key.save(self.home / "keys")
        TrustStore(trust).add(name, self.key.public_key)

    @property
    def id(self) -> str:
        return self.key.key_id

    @property
    def bank(self) -> KnowledgeBank:
        return KnowledgeBank(self.home / "bank")

    def learn(self, task: str, seq: int, centre_seed: int) -> bytes:
        """What ``Device.store_own`` does: encode the signed packet, store task + packet in one bank write."""
        k = knowledge(task, self.id, seq, centre_seed)
        packet = PacketCodec().encode(k, self.key)
        self.bank.put(k, packet_bytes=packet, own=True)
        return packet

    def packet(self, task: str, seq: int, centre_seed: int, agent: str | None = None) -> bytes:
        """A packet signed by this agent's key, not stored anywhere (``agent`` may claim another origin)."""
        return PacketCodec().encode(knowledge(task, agent or self.id, seq, centre_seed), self.key)

    def service(self, share: Path) -> SyncService:
        bank = self.bank
        receiver = PacketReceiver(TrustStore(self.trust), ROM_FP, self.home / "sync" / "receive",
                                  plausibility=BankPlausibility(bank))
        tx = open_transport(f"dir:{share}", "lab", state_dir=self.home / "sync")
        return SyncService(tx, bank, receiver, fleet="lab")


def publish(share: Path, *packets: bytes) -> None:
    """Drop packets into the shared folder the way a peer's sync does."""
    tx = open_transport(f"dir:{share}", "lab")
    codec = PacketCodec()
    for data in packets:
        p = codec.decode(data)
        tx.publish(data, fleet="lab", task=p.task, agent_id=p.agent_id, seq=p.seq)
    tx.close()


def content(bank: KnowledgeBank) -> dict[tuple[str, str], tuple[int, str]]:
    return {(e.task, e.agent): (e.seq, e.content_hash) for e in bank.entries()}


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[Agent, Agent, Agent, Path]:
    trust = tmp_path / "trust"
    return (Agent(tmp_path, "dev", trust), Agent(tmp_path, "peer-p", trust), Agent(tmp_path, "peer-q", trust),
            tmp_path / "share")


# ---------------------------------------------------------------------------- identity helpers
def test_labels_are_bare_names_unless_a_name_is_shared() -> None:
    keys = [TaskKey("cifar", "3fa2c0de11"), TaskKey("cifar", "77b1e0aa00"), TaskKey("mnist", "3fa2c0de11")]
    assert display_names(keys) == ["cifar@3fa2c0de", "cifar@77b1e0aa", "mnist"]
    same_prefix = [TaskKey("x", "aaaaaaaa-1"), TaskKey("x", "aaaaaaaa-2")]
    assert display_names(same_prefix) == ["x@aaaaaaaa-1", "x@aaaaaaaa-2"]  # short ids collide: full ids
    assert match("cifar", keys) == keys[:2]
    assert match("cifar@77", keys) == [keys[1]]
    assert match("mnist@3fa2c0de11", keys) == [keys[2]]
    assert match("cifar@zz", keys) == [] and match("owls", keys) == []
    odd = [TaskKey("a@b", "agent")]  # a name that itself holds "@" is still found by its name
    assert match("a@b", odd) == odd and match("a@b@ag", odd) == odd


# ---------------------------------------------------------------------------- finding 4
def test_own_task_survives_a_peers_same_name_packet(fleet) -> None:
    dev, peer, _, share = fleet
    dev.learn("mnist", 1, centre_seed=1)
    own_before = content(dev.bank)[("mnist", dev.id)]
    impostor = peer.packet("mnist", 5, centre_seed=2, agent=dev.id)  # claims to be the device itself
    publish(share, peer.packet("mnist", 1, centre_seed=3), impostor)

    svc = dev.service(share)
    svc.sync_once(idle=0.3, timeout=10)
    kinds = sorted(e.kind for e in svc.events if e.kind != "published")
    assert kinds == ["accepted", "rejected"], [(e.kind, e.reason) for e in svc.events]
    rejected = next(e for e in svc.events if e.kind == "rejected")
    assert "learned itself" in rejected.reason and rejected.seq == 5
    got = content(dev.bank)
    assert got[("mnist", dev.id)] == own_before, "the device's own mnist is untouched"
    assert got[("mnist", peer.id)][0] == 1, "the peer's mnist is kept beside it"
    assert len(got) == 2
    own = dev.bank.resolve(f"mnist@{dev.id[:6]}")
    assert own.own and own.key == TaskKey("mnist", dev.id)
    with pytest.raises(AmbiguousTaskError, match=r"2 tasks match 'mnist'") as err:
        dev.bank.get("mnist")
    assert f"mnist@{dev.id[:8]} (own)" in str(err.value) and f"mnist@{peer.id[:8]} (received)" in str(err.value)

    # the bank itself refuses it too, whoever calls it, and an identical copy is a no-op
    with pytest.raises(OwnTaskError):
        dev.bank.put(knowledge("mnist", dev.id, 9, centre_seed=2))
    same = dev.bank.put(dev.bank.get(TaskKey("mnist", dev.id)))
    assert same.own and content(dev.bank) == got

    # and a second sync still holds the line (no retry storm, nothing replaced)
    svc2 = dev.service(share)
    svc2.sync_once(idle=0.3, timeout=10)
    assert svc2.stats.errors == 0 and content(dev.bank) == got


def test_two_peers_same_name_are_both_kept_and_classifiable(fleet) -> None:
    dev, p, q, share = fleet
    publish(share, p.packet("cifar", 1, centre_seed=10), q.packet("cifar", 1, centre_seed=20))
    svc = dev.service(share)
    svc.sync_once(idle=0.3, timeout=10)
    assert svc.stats.accepted == 2, [(e.kind, e.reason) for e in svc.events]
    assert sorted(content(dev.bank)) == sorted([("cifar", p.id), ("cifar", q.id)])

    tasks = dev.bank.load_all()
    mapper = build_mapper("gmmc", tasks)
    assert sorted(mapper.task_names) == sorted([f"cifar@{p.id[:8]}", f"cifar@{q.id[:8]}"])
    rng = np.random.default_rng(0)
    for seed, agent in ((10, p.id), (20, q.id)):
        x = (np.random.default_rng(seed).normal(size=DIM) * 8.0 + rng.normal(size=(20, DIM)) * 0.5)
        res = mapper.predict(x.astype(np.float32))
        assert {tasks[i].meta.agent_id for i in res.task_index} == {agent}

    # a newer version from the same origin replaces the older one; the other agent's is untouched
    q_before = content(dev.bank)[("cifar", q.id)]
    publish(share, p.packet("cifar", 2, centre_seed=10))
    svc = dev.service(share)
    svc.sync_once(idle=0.3, timeout=10)
    assert svc.stats.accepted == 1
    got = content(dev.bank)
    assert got[("cifar", p.id)][0] == 2 and got[("cifar", q.id)] == q_before and len(got) == 2


def test_cli_shows_origin_and_takes_task_at_agent(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    dev, p, q, share = fleet
    monkeypatch.delenv("SKILL_EDGE_HOME", raising=False)
    monkeypatch.setenv("COLUMNS", "250")
    dev.learn("cifar", 1, centre_seed=1)
    dev.learn("mnist", 1, centre_seed=2)
    dev.service(share).sync_once(idle=0.3, timeout=10)  # publishes nothing foreign yet
    publish(share, p.packet("cifar", 3, centre_seed=10))
    dev.service(share).sync_once(idle=0.3, timeout=10)
    home = ["--home", str(dev.home)]

    r = runner.invoke(bank_app, ["ls", *home])
    assert r.exit_code == 0, r.output
    for text in (f"cifar@{dev.id[:8]}", f"cifar@{p.id[:8]}", "own", "received", "mnist"):
        assert text in r.output, (text, r.output)
    assert "mnist@" not in r.output, "an unambiguous name is shown bare"

    r = runner.invoke(bank_app, ["show", "cifar", *home])
    assert r.exit_code == 1 and "2 tasks match 'cifar'" in r.output and f"cifar@{p.id[:8]}" in r.output, r.output
    assert "Traceback" not in r.output
    r = runner.invoke(bank_app, ["show", f"cifar@{p.id[:5]}", *home])
    assert r.exit_code == 0 and p.id in r.output and "received" in r.output, r.output
    r = runner.invoke(bank_app, ["show", "mnist", *home])
    assert r.exit_code == 0 and dev.id in r.output and "own" in r.output, r.output

    r = runner.invoke(bank_app, ["rm", "cifar", *home])
    assert r.exit_code == 1 and "TASK@AGENT" in r.output
    r = runner.invoke(bank_app, ["rm", f"cifar@{p.id[:6]}", *home])
    assert r.exit_code == 0 and f"cifar@{p.id[:8]}" in r.output, r.output
    assert sorted(content(dev.bank)) == sorted([("cifar", dev.id), ("mnist", dev.id)])
    r = runner.invoke(bank_app, ["verify", *home])
    assert r.exit_code == 0 and "2 task(s) verified" in r.output, r.output
    r = runner.invoke(bank_app, ["show", "owls", *home])
    assert r.exit_code == 1 and "no task 'owls'" in r.output


def test_index_written_before_task_identity_is_read_and_migrated(tmp_path: Path) -> None:
    """A bank from before task identity (index format /1, keyed by name) loses nothing."""
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    mine = bank.put(knowledge("mnist", "me", 1, 1), packet_bytes=b"own packet bytes")
    theirs = knowledge("cifar", "peer", 2, 2)
    theirs.meta.source = "packet:" + "0" * 64
    bank.put(theirs)
    v2 = json.loads((root / "index.json").read_text())
    assert v2["format"] == INDEX_FORMAT
    legacy_tasks = {}
    for e in v2["tasks"]:
        e = dict(e)
        e.pop("own"), e.pop("packet_sha256")
        legacy_tasks[e["task"]] = e
    body = {"format": "skill-edge-bank-index/1", "generation": 7, "tasks": legacy_tasks}
    (root / "index.json").write_text(json.dumps({**body, "sha256": _index_digest(body)}))
    (root / "index.prev.json").unlink()

    with open(root / "lock", "a") as lock:  # another writer holds the lock: a reader sees /1 as it is
        fcntl.flock(lock, fcntl.LOCK_EX)
        reader = KnowledgeBank(root)
        assert {e.task: e.own for e in reader.entries()} == {"mnist": True, "cifar": False}
        assert reader.resolve("mnist").packet_sha256 == ""  # not known until a writer migrates
        assert json.loads((root / "index.json").read_text())["format"] == "skill-edge-bank-index/1"

    again = KnowledgeBank(root)  # a writer: migrates to /2, with the packet digest from the record
    assert json.loads((root / "index.json").read_text())["format"] == INDEX_FORMAT
    e = again.resolve("mnist")
    assert e.own and e.packet_sha256 == hashlib.sha256(b"own packet bytes").hexdigest() == mine.packet_sha256
    assert not again.resolve("cifar").own
    assert again.packet_bytes("mnist") == b"own packet bytes"
    assert again.verify().ok
    with pytest.raises(UnknownTaskError):
        again.get(TaskKey("mnist", "someone-else"))


# ---------------------------------------------------------------------------- finding 9
def test_own_packet_is_in_the_bank_and_sync_publishes_it_without_an_outbox(fleet, tmp_path: Path) -> None:
    """learn writes task + packet in one bank write: no outbox file is needed, and a transport
    that lost everything (a broker restarted empty, a fresh folder) is refilled by the next sync."""
    dev, peer, _, share = fleet
    packet = dev.learn("mnist", 1, centre_seed=1)
    assert dev.bank.packet_bytes("mnist") == packet and not (dev.home / "outbox").exists()

    svc = dev.service(share)
    svc.sync_once(idle=0.3, timeout=10)
    assert svc.stats.published == 1
    got = peer.service(share)
    got.sync_once(idle=0.3, timeout=10)
    assert got.stats.accepted == 1 and peer.bank.packet_bytes("mnist") == packet

    fresh = tmp_path / "share-after-restart"  # everything the transport held is gone
    svc = dev.service(fresh)
    svc.sync_once(idle=0.3, timeout=10)
    assert svc.stats.published == 1 and svc.stats.errors == 0
    files = list((fresh / "lab").rglob("*.skp"))
    assert [f.read_bytes() for f in files] == [packet]

    relay = tmp_path / "relay"  # its own packet relayed back by someone else: known from the bank
    publish(relay, packet)
    events = dev.service(relay).receive_available(timeout=2.0)
    assert [e.kind for e in events] == ["own"], [(e.kind, e.reason) for e in events]

    # `sync --publish-bank-of AGENT` publishes that agent's stored packets from the bank
    fresh2 = tmp_path / "share-3"
    r = runner.invoke(sync_app, ["--transport", f"dir:{fresh2}", "--fleet", "lab", "--home", str(dev.home),
                                 "--trust", str(dev.trust), "--rom-fingerprint", ROM_FP, "--idle", "0.3",
                                 "--publish-bank-of", dev.id])
    assert r.exit_code == 0, r.output
    assert [f.read_bytes() for f in (fresh2 / "lab").rglob("*.skp")] == [packet]
