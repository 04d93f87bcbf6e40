"""Directory / outbox transport: atomic files in <root>/<fleet>/<task>/<agent>-<seq>.skp."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skill_edge.runtime.exchange.transport import DirectoryTransport, TransportError, packet_path
from skill_edge.runtime.exchange.transport.base import check_name, decode_segment, encode_segment


def test_round_trip_between_two_devices(tmp_path: Path) -> None:
    share = tmp_path / "share"
    a = DirectoryTransport(share, "lab")
    b = DirectoryTransport(share, "lab")
    pkt1, pkt2 = os.urandom(5000), os.urandom(70_000)
    a.publish(pkt1, fleet="lab", task="digits", agent_id="dev-a", seq=1)
    a.publish(pkt2, fleet="lab", task="birds", agent_id="dev-a", seq=4)

    assert (share / "lab" / "digits" / "dev-a-1.skp").read_bytes() == pkt1
    assert not [p for p in (share / "lab").rglob("*") if p.name.startswith(".")], "temp files left behind"
    assert a.poll() == [], "a device must not receive its own packets back"

    got = {p.task: p for p in b.poll(timeout=1.0)}
    assert set(got) == {"digits", "birds"}
    assert got["digits"].data == pkt1 and got["birds"].data == pkt2
    assert (got["birds"].agent_id, got["birds"].seq, got["birds"].fleet) == ("dev-a", 4, "lab")
    assert b.poll() == [], "each file is delivered once"

    b.publish(b"reply", fleet="lab", task="digits", agent_id="dev-b", seq=2)
    (back,) = a.poll(timeout=1.0)
    assert (back.data, back.agent_id) == (b"reply", "dev-b")
    a.close()
    b.close()
    with pytest.raises(TransportError):
        a.poll()


def test_other_fleets_are_invisible(tmp_path: Path) -> None:
    a = DirectoryTransport(tmp_path, "fleet-1")
    b = DirectoryTransport(tmp_path, "fleet-2")
    a.publish(b"x" * 10, fleet="fleet-1", task="t", agent_id="a", seq=0)
    assert b.poll(timeout=0.3) == []


def test_partial_and_temp_files_are_tolerated(tmp_path: Path) -> None:
    rx = DirectoryTransport(tmp_path, "lab", scan_interval=0.05)
    task_dir = tmp_path / "lab" / "t"
    task_dir.mkdir(parents=True)
    (task_dir / ".dev-a-1.skp.123.tmp").write_bytes(b"half")  # an atomic writer's temp file
    (task_dir / "dev-a-1.skp.tmp").write_bytes(b"half")
    (task_dir / "dev-a-2.skp").write_bytes(b"")  # just created by a non-atomic copy
    (task_dir / "notes.skp").write_bytes(b"not a packet name")
    assert rx.poll(timeout=0.2) == []

    # A non-atomic copy (cp onto a USB stick) that is still growing: whatever was read early is
    # delivered (the receiver rejects it as a bad packet), and the finished file is delivered again.
    full = os.urandom(4096)
    target = task_dir / "dev-a-2.skp"
    target.write_bytes(full[:1000])
    (first,) = rx.poll(timeout=1.0)
    assert first.data == full[:1000]
    target.write_bytes(full)
    os.utime(target, ns=(1, 1))  # make sure the signature changes even on coarse-mtime file systems
    (second,) = rx.poll(timeout=1.0)
    assert second.data == full and second.seq == 2


def test_state_file_remembers_delivered_files(tmp_path: Path) -> None:
    share, state = tmp_path / "share", tmp_path / "state" / "seen.json"
    DirectoryTransport(share, "lab").publish(b"p1", fleet="lab", task="t", agent_id="a", seq=1)
    first = DirectoryTransport(share, "lab", state_file=state)
    (p1,) = first.poll()
    assert p1.data == b"p1"
    first.ack(p1)
    first.close()

    second = DirectoryTransport(share, "lab", state_file=state)
    assert second.poll() == [], "a later run must not re-deliver what an earlier run delivered"
    DirectoryTransport(share, "lab").publish(b"p2-new", fleet="lab", task="t", agent_id="a", seq=1)
    assert [p.data for p in second.poll(timeout=1.0)] == [b"p2-new"], "a rewritten file is new"

    state.write_text("{not json")
    assert [p.data for p in DirectoryTransport(share, "lab", state_file=state).poll()] == [b"p2-new"]


def test_a_packet_is_delivered_for_good_only_once_acked(tmp_path: Path) -> None:
    """Polled but not acked (the device died before the bank decided): the next run gets it again."""
    share, state = tmp_path / "share", tmp_path / "state" / "seen.json"
    for seq in (1, 2, 3):
        DirectoryTransport(share, "lab").publish(b"p%d" % seq, fleet="lab", task="t", agent_id="a", seq=seq)
    first = DirectoryTransport(share, "lab", state_file=state)
    got = first.poll()
    assert [p.data for p in got] == [b"p1", b"p2", b"p3"]
    assert first.poll() == [], "within one run an offered packet is not offered twice"
    first.ack(got[0])  # then the process is killed: no close(), no more acks
    assert not state.with_name(state.name + ".tmp").exists()

    second = DirectoryTransport(share, "lab", state_file=state)
    again = second.poll()
    assert [p.data for p in again] == [b"p2", b"p3"], "unacked packets are offered again, the acked one is not"
    second.forget(again[0])  # could not store it: offered again after retry_delay, never marked delivered
    second.ack(again[1])
    assert [p.data for p in DirectoryTransport(share, "lab", state_file=state).poll()] == [b"p2"]


def test_held_packets_come_back_when_the_hold_is_released(tmp_path: Path) -> None:
    share, state = tmp_path / "share", tmp_path / "seen.json"
    DirectoryTransport(share, "lab").publish(b"untrusted", fleet="lab", task="t", agent_id="a", seq=1)
    DirectoryTransport(share, "lab").publish(b"done", fleet="lab", task="u", agent_id="a", seq=1)
    rx = DirectoryTransport(share, "lab", state_file=state)
    held, done = sorted(rx.poll(), key=lambda p: p.task)
    rx.ack(held, hold="trust-v1")
    rx.ack(done)
    rx.close()
    rx = DirectoryTransport(share, "lab", state_file=state)
    rx.release_holds("trust-v1")
    assert rx.poll() == [], "same trust store: nothing comes back"
    rx.release_holds("trust-v2")
    assert [p.data for p in rx.poll()] == [b"untrusted"], "only the held packet is offered again"


def test_reoffer_brings_back_one_agents_packets_of_one_task(tmp_path: Path) -> None:
    share, state = tmp_path / "share", tmp_path / "seen.json"
    pub = DirectoryTransport(share, "lab")
    for task, agent, seq in (("t", "a", 1), ("t", "a", 2), ("t", "b", 1), ("t x", "a-1", 1), ("u", "a", 1)):
        pub.publish(f"{task}/{agent}/{seq}".encode(), fleet="lab", task=task, agent_id=agent, seq=seq)
    rx = DirectoryTransport(share, "lab", state_file=state)
    for p in rx.poll():
        rx.ack(p)
    rx.reoffer("t", "a")
    assert sorted(p.data for p in rx.poll()) == [b"t/a/1", b"t/a/2"]
    rx.reoffer("t x", "a-1")
    assert [p.data for p in rx.poll()] == [b"t x/a-1/1"]


def test_republish_same_name_replaces_atomically(tmp_path: Path) -> None:
    t = DirectoryTransport(tmp_path, "lab")
    t.publish(b"old", fleet="lab", task="t", agent_id="a", seq=3)
    t.publish(b"newer", fleet="lab", task="t", agent_id="a", seq=3)
    assert packet_path(tmp_path, "lab", "t", "a", 3).read_bytes() == b"newer"
    assert sorted(p.name for p in (tmp_path / "lab" / "t").iterdir()) == ["a-3.skp"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "+", "#", ".hidden", "x" * 129, "sp ace"])
def test_unsafe_fleet_names_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be used in a path or topic"):
        check_name("fleet", bad)
    with pytest.raises(ValueError):
        DirectoryTransport(tmp_path, bad)
    with pytest.raises(ValueError):
        DirectoryTransport(tmp_path, "lab").publish(b"x", fleet=bad, task="t", agent_id="a", seq=0)


@pytest.mark.parametrize("name", ["traffic signs", "a/b", "../up", "..", ".hidden", "+", "#", "x-1-2", "Vögel", "50%"])
def test_any_task_or_agent_name_round_trips_inside_the_layout(tmp_path: Path, name: str) -> None:
    share = tmp_path / "share"
    DirectoryTransport(share, "lab").publish(b"data", fleet="lab", task=name, agent_id=name, seq=3)
    (p,) = DirectoryTransport(share, "lab").poll()
    assert (p.task, p.agent_id, p.seq, p.data) == (name, name, 3, b"data")
    files = [f for f in share.rglob("*") if f.is_file()]
    assert len(files) == 1 and files[0].parent.parent == share / "lab", "the name cannot escape its folder"
    assert not files[0].parent.name.startswith(".") and not files[0].name.startswith(".")
    assert encode_segment("task", name) == files[0].parent.name and decode_segment(files[0].parent.name) == name


def test_empty_or_huge_names_are_refused(tmp_path: Path) -> None:
    t = DirectoryTransport(tmp_path, "lab")
    for kwargs in ({"task": ""}, {"agent_id": ""}, {"task": "x" * 201}, {"agent_id": "/" * 70}):
        with pytest.raises(ValueError, match="non-empty|too long"):
            t.publish(b"x", fleet="lab", **{"task": "t", "agent_id": "a", **kwargs}, seq=0)


def test_drain_stops_when_quiet(tmp_path: Path) -> None:
    t = DirectoryTransport(tmp_path, "lab", scan_interval=0.02)
    DirectoryTransport(tmp_path, "lab").publish(b"abc", fleet="lab", task="t", agent_id="a", seq=0)
    got = list(t.drain(idle=0.2, timeout=5))
    assert [p.data for p in got] == [b"abc"]


def test_an_identical_republish_is_not_delivered_again(tmp_path: Path) -> None:
    """A restarted device publishes its stored packet again: peers that took it must not read it twice."""
    a, b = DirectoryTransport(tmp_path, "lab"), DirectoryTransport(tmp_path, "lab")
    pkt = os.urandom(4000)
    a.publish(pkt, fleet="lab", task="t", agent_id="a", seq=1)
    (got,) = b.poll(timeout=1.0)
    b.ack(got)
    restarted = DirectoryTransport(tmp_path, "lab")  # a new process: no memory of the first publish
    restarted.publish(pkt, fleet="lab", task="t", agent_id="a", seq=1)
    assert b.poll(timeout=0.3) == []
    restarted.publish(pkt[:-1] + bytes([pkt[-1] ^ 1]), fleet="lab", task="t", agent_id="a", seq=1)
    (changed,) = b.poll(timeout=1.0)  # different bytes under the same name are offered again
    assert changed.data != pkt
