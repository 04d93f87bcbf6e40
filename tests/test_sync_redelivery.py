"""Packets that must travel again: rejected before `keys add`, or received and then `bank rm`-ed.

Before, the folder transport recorded both as delivered for good: a packet rejected because its
signer was not trusted yet never came back after `keys add`, and a task removed from the bank
was reported as "duplicate" (or not offered at all) by every later sync.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mqtt_broker import MosquittoBroker, mosquitto, needs_mosquitto  # noqa: F401
from skill_edge.runtime.cli.sync import app as sync_app
from skill_edge.runtime.exchange.keys import TrustStore
from skill_edge.runtime.exchange.transport import open_transport
from test_sync import make_fleet


def one_shot(device, share: Path):
    """One `skill-edge sync` run of ``device`` (a fresh transport and service, as a new process has)."""
    service = device.service(open_transport(f"dir:{share}", "lab", state_dir=device.home / "sync"), "lab",
                             plausibility=False)
    service.sync_once(idle=0.2, timeout=10)
    service.transport.close()
    return service.stats


def test_a_packet_rejected_before_keys_add_is_offered_again(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"], trusted=["dev-b"])  # nobody trusts dev-a yet
    share = tmp_path / "share"
    a.learn("birds")
    one_shot(a, share)
    first = one_shot(b, share)
    assert (first.arrived, first.rejected, first.accepted) == (1, 1, 0)
    assert one_shot(b, share).arrived == 0, "without a trust change the rejection stands"

    TrustStore(b.trust).add("dev-a", a.key.public_key)  # skill-edge keys add dev-a dev-a.pub
    after = one_shot(b, share)
    assert (after.arrived, after.accepted, after.rejected) == (1, 1, 0)
    assert b.tasks() == a.tasks()


def test_keys_add_during_watch_brings_the_packet_back(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"], trusted=["dev-b"])
    share = tmp_path / "share"
    a.learn("birds")
    one_shot(a, share)
    service = b.service(open_transport(f"dir:{share}", "lab", state_dir=b.home / "sync"), "lab",
                        plausibility=False)
    assert [e.kind for e in service.receive_available(timeout=1.0)] == ["rejected"]
    assert service.receive_available(timeout=0.3) == []
    TrustStore(b.trust).add("dev-a", a.key.public_key)
    assert [e.kind for e in service.receive_available(timeout=1.0)] == ["accepted"]
    service.transport.close()


def test_a_removed_task_comes_back_on_the_next_sync(tmp_path: Path) -> None:
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"])
    share = tmp_path / "share"
    a.learn("birds", seq=1)
    a.learn("birds", seq=2)
    a.learn("cars")
    one_shot(a, share)
    assert one_shot(b, share).accepted == 3, "birds seq 1, then seq 2, and cars"
    want = b.tasks()
    b.bank().remove("birds")  # skill-edge bank rm birds
    again = one_shot(b, share)
    assert (again.arrived, again.accepted, again.duplicate, again.rejected) == (2, 1, 1, 0), \
        "both birds files are offered again: seq 2 is taken back, seq 1 stays a no-op"
    assert b.tasks() == want, "the newest birds is back, bit for bit"
    assert b.bank().get("birds").meta.seq == 2
    assert one_shot(b, share).arrived == 0, "and stays delivered"

    runner = CliRunner()  # the same through the CLI: bank rm, then skill-edge sync
    b.bank().remove("cars")
    r = runner.invoke(sync_app, b.cli_args(f"dir:{share}", "lab") + ["--idle", "0.2", "--no-plausibility"])
    assert r.exit_code == 0, r.output
    assert "cars" in b.tasks() and "accepted 1," in r.output and "duplicate 0," in r.output


@needs_mosquitto
@pytest.mark.mqtt
def test_over_mqtt_a_watching_device_gets_the_packet_after_keys_add_and_bank_rm(
        mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    """The broker keeps every packet retained; a watching device asks for it again (no restart)."""
    a, b = make_fleet(tmp_path, ["dev-a", "dev-b"], trusted=["dev-b"])
    fleet = f"f{uuid.uuid4().hex[:8]}"
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    a.learn("birds")
    sa = a.service(open_transport(url, fleet, chunk_size=1024), fleet)  # chunked: the manifest is re-fetched too
    sa.publish_outbox()
    sb = b.service(open_transport(url, fleet), fleet, plausibility=False)
    kinds = lambda: [e.kind for e in sb.drain(idle=0.5, timeout=10)]  # noqa: E731
    assert kinds() == ["rejected"]
    TrustStore(b.trust).add("dev-a", a.key.public_key)
    assert kinds() == ["accepted"]
    b.bank().remove("birds")
    assert kinds() == ["accepted"] and "birds" in b.tasks()
    assert kinds() == []
    sa.transport.close()
    sb.transport.close()
