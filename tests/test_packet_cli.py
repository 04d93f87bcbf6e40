"""``skill-edge keys init|add|ls|rm`` and ``skill-edge packet inspect`` through typer's runner."""

from __future__ import annotations

import dataclasses
import hashlib
import stat

import numpy as np
import pytest
import typer
from skill_edge.runtime.cli.packets import keys_app, packet_app
from skill_edge.runtime.exchange.keys import DeviceKey, load_device_key
from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor, TaskKnowledge, TaskMeta
from skill_edge.runtime.exchange.packet import PacketCodec
from typer.testing import CliRunner

app = typer.Typer()
app.add_typer(keys_app, name="keys")
app.add_typer(packet_app, name="packet")
runner = CliRunner()


def cli(*args: str, env: dict | None = None):
    return runner.invoke(app, list(args), env={"COLUMNS": "220", **(env or {})})  # wide: no wrapped hashes


def small_task() -> TaskKnowledge:
    rng = np.random.default_rng(0)
    return TaskKnowledge(
        task="flowers", labels=["rose", "tulip", "daisy"],
        head_weight=rng.normal(size=(3, 16)).astype(np.float32), head_bias=np.zeros(3, np.float32),
        meta=TaskMeta(agent_id="cam-7", seq=4, rom_fingerprint=hashlib.sha256(b"rom").hexdigest()),
        gmmc=GmmcAnchor(rng.normal(size=(4, 16)).astype(np.float32), np.ones((4, 16), np.float32),
                        np.full(4, 0.25, np.float32)))


def test_keys_lifecycle(tmp_path):
    home = str(tmp_path / "home")
    r = cli("keys", "init", "--home", home)
    assert r.exit_code == 0, r.output
    dev = load_device_key(home)
    assert dev.key_id in r.output
    assert stat.S_IMODE((tmp_path / "home" / "keys" / "device.pem").stat().st_mode) == 0o600
    assert cli("keys", "init", "--home", home).exit_code == 1  # no silent replacement

    peer = DeviceKey.generate()
    peer.save(tmp_path / "peer")
    r = cli("keys", "add", "cam-7", str(tmp_path / "peer" / "device.pub"), "--home", home)
    assert r.exit_code == 0 and peer.key_id in r.output
    r = cli("keys", "ls", "--home", home)
    assert r.exit_code == 0 and "cam-7" in r.output and "self" in r.output and peer.key_id in r.output
    r = cli("keys", "rm", "cam-7", "--home", home)
    assert r.exit_code == 0
    assert "cam-7" not in cli("keys", "ls", "--home", home).output
    assert cli("keys", "rm", "cam-7", "--home", home).exit_code == 1


def test_home_comes_from_the_environment(tmp_path):
    env = {"SKILL_EDGE_HOME": str(tmp_path / "envhome")}
    assert cli("keys", "init", "--no-trust-self", env=env).exit_code == 0
    assert (tmp_path / "envhome" / "keys" / "device.pem").exists()
    assert "trust store is empty" in cli("keys", "ls", env=env).output


@pytest.fixture()
def home_with_peer(tmp_path):
    home = tmp_path / "home"
    assert cli("keys", "init", "--home", str(home), "--no-trust-self").exit_code == 0
    peer = DeviceKey.generate()
    peer.save(tmp_path / "peer")
    assert cli("keys", "add", "cam-7", str(tmp_path / "peer" / "device.pub"), "--home", str(home)).exit_code == 0
    return home, peer


def test_inspect_shows_everything_and_verifies(tmp_path, home_with_peer):
    home, peer = home_with_peer
    f = tmp_path / "flowers.skp"
    f.write_bytes(PacketCodec().encode(small_task(), peer, plan="int8+gmmc_k=2"))
    r = cli("packet", "inspect", str(f), "--home", str(home))
    assert r.exit_code == 0, r.output
    for text in ("flowers", "rose, tulip, daisy", "cam-7", "seq", "4", hashlib.sha256(b"rom").hexdigest(),
                 "gmmc.means", "i8r", "I8", "gmmc.means.scale", "signature verifies", peer.key_id,
                 "GMMC components", "2 of 4"):
        assert text in r.output, text


def test_inspect_fails_on_unknown_signer_unsigned_and_tampered(tmp_path, home_with_peer):
    home, peer = home_with_peer
    cases = {
        "stranger.skp": (PacketCodec().encode(small_task(), DeviceKey.generate()), "unknown signer"),
        "unsigned.skp": (PacketCodec().encode(small_task(), None), "unsigned"),
    }
    data = bytearray(PacketCodec().encode(small_task(), peer))
    data[60] ^= 1
    cases["tampered.skp"] = (bytes(data), "modified after signing")
    for name, (blob, reason) in cases.items():
        f = tmp_path / name
        f.write_bytes(blob)
        r = cli("packet", "inspect", str(f), "--home", str(home))
        assert r.exit_code == 1 and reason in r.output, (name, r.output)


def test_inspect_fails_on_a_malformed_packet(tmp_path, home_with_peer):
    home, peer = home_with_peer
    f = tmp_path / "cut.skp"
    f.write_bytes(PacketCodec().encode(small_task(), peer)[:100])
    r = cli("packet", "inspect", str(f), "--home", str(home))
    assert r.exit_code == 1 and "truncated" in r.output


def test_inspect_shows_merged_mahalanobis_means(tmp_path, home_with_peer):
    home, peer = home_with_peer
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 16)).astype(np.float32)
    task = dataclasses.replace(small_task(), gmmc=None, maha=MahalanobisAnchor(
        means, (means[np.arange(6) % 3] + rng.normal(size=(6, 16))).astype(np.float32),
        (np.arange(6) % 3).astype(np.float32)), thresholds={"maha": -40.0})
    f = tmp_path / "flowers.skp"
    f.write_bytes(PacketCodec().encode(task, peer, plan="int8+exemplars=1+means=2"))
    r = cli("packet", "inspect", str(f), "--home", str(home))
    assert r.exit_code == 0, r.output
    for text in ("Mahalanobis mean rows", "2 for 3 classes (merged)", "1 of 2 (per merged row)", "maha=-"):
        assert text in r.output, text


def test_keys_ls_and_inspect_as_json(tmp_path, home_with_peer):
    """--json where the output is data: the same facts as the tables, parseable, on stdout alone."""
    import json

    home, peer = home_with_peer
    r = runner.invoke(app, ["keys", "ls", "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    keys = json.loads(r.stdout)
    assert keys["device_key"]["key_id"] == load_device_key(home).key_id
    assert [(k["name"], k["key_id"]) for k in keys["trusted"]] == [("cam-7", peer.key_id)]

    f = tmp_path / "flowers.skp"
    data = PacketCodec().encode(small_task(), peer, plan="int8+gmmc_k=2")
    f.write_bytes(data)
    r = runner.invoke(app, ["packet", "inspect", str(f), "--home", str(home), "--json"])
    assert r.exit_code == 0, r.output
    p = json.loads(r.stdout)
    assert (p["task"], p["labels"], p["agent"], p["seq"], p["bytes"]) == ("flowers", ["rose", "tulip", "daisy"],
                                                                          "cam-7", 4, len(data))
    assert p["sha256"] == hashlib.sha256(data).hexdigest()
    assert p["plan"]["step"] == "int8+gmmc_k=2" and (p["plan"]["gmmc_k"], p["plan"]["gmmc_k_original"]) == (2, 4)
    assert {"name": "gmmc.means", "shape": [2, 16]}.items() <= next(
        t for t in p["tensors"] if t["name"] == "gmmc.means").items()
    assert p["signature"] == {"signer": peer.key_id, "trusted_as": "cam-7", "verifies": True, "problem": None}

    f.write_bytes(PacketCodec().encode(small_task(), DeviceKey.generate()))
    r = runner.invoke(app, ["packet", "inspect", str(f), "--home", str(home), "--json"])
    assert r.exit_code == 1  # still a failure, and still data: which key, and why
    p = json.loads(r.stdout)
    assert p["signature"]["verifies"] is False and "unknown signer" in p["signature"]["problem"]
    f.write_bytes(data[:100])
    r = runner.invoke(app, ["packet", "inspect", str(f), "--home", str(home), "--json"])
    assert r.exit_code == 1 and r.stdout == "" and "truncated" in r.stderr
