"""Deterministic tests of the knowledge bank: round trip, replace, remove, quota, full disk, corruption,
index fallback, lock contention, quarantine and the ``skill-edge bank`` CLI."""

from __future__ import annotations

import errno
import json
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skill_edge.runtime.knowledge.bank import (
    BankCorruptError,
    BankError,
    BankLockedError,
    BankQuotaError,
    KnowledgeBank,
    UnknownTaskError,
)
from skill_edge.runtime.cli.bank import app
from skill_edge.runtime.knowledge.records import KnowledgeError, TaskKnowledge

HELPER = Path(__file__).with_name("bank_writer_proc.py")
_spec = importlib.util.spec_from_file_location("bank_writer_proc", HELPER)
writer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(writer)
make_knowledge, make_packet = writer.make_knowledge, writer.make_packet


def assert_same_knowledge(a: TaskKnowledge, b: TaskKnowledge) -> None:
    assert a.metadata() == b.metadata()
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for name in ta:
        np.testing.assert_array_equal(ta[name], tb[name], err_msg=name)
    assert a.content_hash() == b.content_hash()


def record_dirs(root: Path) -> set[str]:
    return {d.name for d in (root / "records").iterdir()}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def bank_state(bank: KnowledgeBank) -> dict[str, str]:
    return {e.task: e.content_hash for e in bank.entries()}


# ---------------------------------------------------------------------- round trip / replace / remove
def test_round_trip_keeps_every_tensor_metadata_and_packet(tmp_path: Path) -> None:
    bank = KnowledgeBank(tmp_path / "bank")
    full = make_knowledge("birds", 1)  # bb + gmmc + maha
    bare = make_knowledge("cars", 4)  # no bb, gmmc + maha
    bare.gmmc = bare.maha = None
    e1 = bank.put(full, packet_bytes=make_packet("birds", 1))
    e2 = bank.put(bare)

    again = KnowledgeBank(tmp_path / "bank")  # a fresh process-like view of the same directory
    assert_same_knowledge(again.get("birds"), full)
    assert_same_knowledge(again.get("cars"), bare)
    assert again.packet_bytes("birds") == make_packet("birds", 1)
    assert again.packet_bytes("cars") is None
    assert [e.task for e in again.entries()] == ["birds", "cars"]
    b = again.entries()[0]
    assert b == e1
    assert (b.classes, b.seq, b.agent, b.source, b.has_bb, b.anchors, b.has_packet) == (
        4, 1, "agent-1", "learned:/data/birds", True, ("gmmc",), True)
    assert b.created == full.meta.created and b.content_hash == full.content_hash()
    c = again.entries()[1]
    assert (c.has_bb, c.anchors, c.has_packet) == (False, (), False)
    assert again.used_bytes() == e1.bytes + e2.bytes
    assert e1.bytes == sum(p.stat().st_size for p in (tmp_path / "bank" / "records" / e1.record).iterdir())
    assert [k.task for k in again.load_all()] == ["birds", "cars"]
    assert "birds" in again and "owls" not in again
    assert again.verify().ok


def test_replace_is_whole_and_old_record_is_collected(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    v1 = bank.put(make_knowledge("birds", 1), packet_bytes=make_packet("birds", 1))
    v2 = bank.put(make_knowledge("birds", 2))
    assert v1.record != v2.record
    assert_same_knowledge(bank.get("birds"), make_knowledge("birds", 2))
    assert bank.packet_bytes("birds") is None  # the packet belonged to v1 only
    assert [e.task for e in bank.entries()] == ["birds"]
    assert bank.used_bytes() == v2.bytes
    # v1 stays on disk only as long as index.prev.json (the fallback generation) references it
    assert record_dirs(root) == {v1.record, v2.record}
    bank.put(make_knowledge("cars", 3))
    assert v1.record not in record_dirs(root)
    # putting identical knowledge again reuses the same content-addressed record
    assert bank.put(make_knowledge("birds", 2)).record == v2.record
    assert bank.verify().ok


def test_remove_and_unknown_task(tmp_path: Path) -> None:
    bank = KnowledgeBank(tmp_path / "bank")
    bank.put(make_knowledge("birds", 1))
    bank.put(make_knowledge("cars", 2))
    bank.remove("birds")
    assert [e.task for e in bank.entries()] == ["cars"]
    with pytest.raises(UnknownTaskError, match="no task 'birds'"):
        bank.get("birds")
    with pytest.raises(UnknownTaskError, match="no task 'birds'"):
        bank.remove("birds")
    assert bank.verify().ok


def test_a_removed_task_keeps_its_newest_seq_until_stored_again(tmp_path: Path) -> None:
    """Peers may keep a removed version, so its seq is remembered: a relearn must start above it."""
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 3), own=True)
    bank.put(make_knowledge("cars", 1))
    assert bank.removed() == []
    bank.remove("birds")
    bank.remove("cars")
    again = KnowledgeBank(root)  # kept in the index, across processes
    assert [(r.task, r.seq, r.own) for r in again.removed()] == [("birds", 3, True), ("cars", 1, False)]
    assert again.verify().ok
    again.put(make_knowledge("birds", 4), own=True)  # stored again above it: forgotten
    assert [r.task for r in again.removed()] == ["cars"]
    again.put(make_knowledge("cars", 1))  # the same version back (a sync): forgotten too
    assert again.removed() == []


def test_an_index_written_before_removed_seqs_reads_the_same(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1))
    assert "removed" not in json.loads((root / "index.json").read_text())  # byte-compatible until a removal
    bank.remove("birds")
    assert json.loads((root / "index.json").read_text())["removed"][0]["seq"] == 1


def test_invalid_knowledge_is_rejected_before_anything_is_written(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bad = make_knowledge("birds", 1)
    bad.head_bias = bad.head_bias[:-1]
    with pytest.raises(KnowledgeError, match="head shapes"):
        bank.put(bad)
    assert bank.entries() == [] and record_dirs(root) == set()


# ---------------------------------------------------------------------- quota and full disk
def test_quota_refuses_and_leaves_bank_unchanged(tmp_path: Path) -> None:
    probe = KnowledgeBank(tmp_path / "probe").put(make_knowledge("birds", 2))
    quota = int(probe.bytes * 2.5)
    bank = KnowledgeBank(tmp_path / "bank", quota_bytes=quota)
    bank.put(make_knowledge("birds", 2))
    bank.put(make_knowledge("cars", 2))
    before = bank_state(bank)
    dirs = record_dirs(tmp_path / "bank")
    with pytest.raises(BankQuotaError) as err:
        bank.put(make_knowledge("flowers", 2))
    msg = str(err.value)
    assert f"{quota:,}-byte quota" in msg and f"{bank.used_bytes():,}" in msg and "needs" in msg
    assert bank_state(bank) == before and record_dirs(tmp_path / "bank") == dirs
    # replacing within the quota is fine: the replaced version's bytes are freed
    bank.put(make_knowledge("birds", 6))
    assert bank.get("birds").meta.seq == 6
    # quarantined items count against the same quota
    with pytest.raises(BankQuotaError):
        bank.quarantine(make_knowledge("flowers", 2), "bad signature")
    bank.remove("cars")
    bank.put(make_knowledge("flowers", 2))
    assert bank.verify().ok


@pytest.fixture
def enospc_after(monkeypatch: pytest.MonkeyPatch):
    """Make os.write to files under a directory fail with ENOSPC once ``budget`` bytes were written."""

    def arm(root: Path, budget: int) -> dict[str, int]:
        real_write = os.write
        state = {"written": 0}
        prefix = str(root.resolve())

        def write(fd: int, data) -> int:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if not target.startswith(prefix):
                return real_write(fd, data)
            room = budget - state["written"]
            if room <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n = real_write(fd, bytes(memoryview(data)[:room]))  # a short write first, like a real disk
            state["written"] += n
            return n

        monkeypatch.setattr(os, "write", write)
        return state

    return arm


def test_enospc_at_every_stage_of_a_put_leaves_bank_unchanged(tmp_path: Path, enospc_after, monkeypatch) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1), packet_bytes=make_packet("birds", 1))
    bank.put(make_knowledge("cars", 2))
    before, dirs = bank_state(bank), record_dirs(root)
    new = make_knowledge("birds", 3)
    size = KnowledgeBank(tmp_path / "probe").put(new, packet_bytes=make_packet("birds", 3)).bytes
    index_bytes = 2 * (root / "index.json").stat().st_size
    budgets = sorted({0, 1, 100, 300, 5000, size // 2, size - 1, size + 10, size + index_bytes // 2,
                      size + index_bytes // 2 + 100})
    for budget in budgets:
        enospc_after(root, budget)
        with pytest.raises(BankError, match="disk full while storing task 'birds'") as err:
            bank.put(new, packet_bytes=make_packet("birds", 3))
        assert "bank is unchanged" in str(err.value)
        monkeypatch.undo()
        assert bank_state(bank) == before, budget
        assert record_dirs(root) == dirs, budget  # no half record left under records/
        assert list((root / "staging").iterdir()) == [], budget
        assert_same_knowledge(bank.get("birds"), make_knowledge("birds", 1))
        report = KnowledgeBank(root).verify()
        assert report.ok and not report.orphans, (budget, report)
    bank.put(new)  # once there is room again, the put works
    assert bank.get("birds").meta.seq == 3


def test_real_full_tmpfs(tmp_path: Path) -> None:
    """A genuinely full filesystem (tmpfs of 600 kB), when this test may mount one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    try:
        bank = KnowledgeBank(mnt / "bank")
        stored = []
        with pytest.raises(BankError, match="disk full") as err:
            for seq in range(1, 100):
                bank.put(make_knowledge(f"task{seq}", seq), packet_bytes=make_packet("x", seq))
                stored.append(seq)
        assert not isinstance(err.value, BankQuotaError)
        assert 2 <= len(stored) < 20
        again = KnowledgeBank(mnt / "bank")
        report = again.verify()
        assert report.ok and not report.orphans and not report.staging_leftovers, report
        assert [e.task for e in again.entries()] == sorted(f"task{s}" for s in stored)
        for s in stored:
            assert_same_knowledge(again.get(f"task{s}"), make_knowledge(f"task{s}", s))
        again.remove(f"task{stored[0]}")
        again.remove(f"task{stored[1]}")
        again.put(make_knowledge("late", 7))  # space freed by remove is usable again
        assert again.verify().ok
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------------- corruption
@pytest.mark.parametrize("name", ["tensors.safetensors", "metadata.json", "packet.bin", "record.json"])
def test_flipped_byte_in_a_record_is_reported_by_name(tmp_path: Path, name: str) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    entry = bank.put(make_knowledge("birds", 1), packet_bytes=make_packet("birds", 1))
    bank.put(make_knowledge("cars", 2))
    flip_byte(root / "records" / entry.record / name, 97)
    with pytest.raises(BankCorruptError, match=rf"task 'birds'.*{name}"):
        bank.get("birds")
    with pytest.raises(BankCorruptError, match=name):
        bank.load_all()
    assert_same_knowledge(bank.get("cars"), make_knowledge("cars", 2))  # others unaffected
    report = bank.verify()
    assert not report.ok and report.tasks_checked == ["cars"]
    assert len(report.problems) == 1 and name in report.problems[0] and "'birds'" in report.problems[0]


def test_rom_fingerprints_read_each_records_checked_metadata_only(tmp_path: Path) -> None:
    import dataclasses

    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    assert bank.rom_fingerprints() == set()
    birds = make_knowledge("birds", 1)
    birds.meta = dataclasses.replace(birds.meta, rom_fingerprint="aa" * 32)
    entry = bank.put(birds)
    bank.put(make_knowledge("cars", 2))  # learned before records named their ROM: ""
    assert bank.rom_fingerprints() == {"aa" * 32, ""}
    # a bad tensor file is not read here (load_all and verify report it) ...
    flip_byte(root / "records" / entry.record / "tensors.safetensors", 97)
    assert bank.rom_fingerprints() == {"aa" * 32, ""}
    # ... but the metadata it answers from is checked against the record's manifest
    flip_byte(root / "records" / entry.record / "metadata.json", 5)
    with pytest.raises(BankCorruptError, match="metadata.json"):
        bank.rom_fingerprints()


def test_corrupt_index_falls_back_and_salvages_into_quarantine(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1))
    bank.put(make_knowledge("cars", 2))  # generation 2; index.prev.json holds generation 1 (birds only)
    flip_byte(root / "index.json", 200)

    # readers fall back immediately, without a writer
    assert [e.task for e in bank.entries()] == ["birds"]
    reopened = KnowledgeBank(root)  # takes the lock and repairs
    assert [e.task for e in reopened.entries()] == ["birds"]
    report = reopened.verify()
    assert not report.ok and "index.json failed its checksum" in report.repaired[0]
    assert (root / "index.json.corrupt").exists()
    # the record only the corrupt generation referenced was kept, in quarantine
    [q] = reopened.quarantined()
    assert q.task == "cars" and "failed its checksum" in q.reason
    item = reopened.get_quarantined(q.id)
    assert_same_knowledge(TaskKnowledge.from_parts(item.metadata, item.tensors), make_knowledge("cars", 2))
    assert KnowledgeBank(root).verify().ok  # repaired for good
    reopened.put(make_knowledge("flowers", 3))
    assert [e.task for e in reopened.entries()] == ["birds", "flowers"]


def test_both_indexes_corrupt_is_a_clear_error_and_deletes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1))
    bank.put(make_knowledge("cars", 2))
    dirs = record_dirs(root)
    flip_byte(root / "index.json", 50)
    flip_byte(root / "index.prev.json", 50)
    with pytest.raises(BankCorruptError, match="no usable index.*index.json fails.*index.prev.json fails"):
        KnowledgeBank(root)
    assert record_dirs(root) == dirs


# ---------------------------------------------------------------------- concurrency
def test_second_writer_waits_for_the_lock_and_readers_do_not(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    KnowledgeBank(root).put(make_knowledge("birds", 1))
    holder = subprocess.Popen([sys.executable, str(HELPER), "hold-lock", str(root), "30"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        bank = KnowledgeBank(root, lock_timeout=0.3)  # opening does not block on a busy writer
        with pytest.raises(BankLockedError, match=rf"locked by another writer \(pid {holder.pid}\)"):
            bank.put(make_knowledge("cars", 2))
        with pytest.raises(BankLockedError):
            bank.remove("birds")
        assert_same_knowledge(bank.get("birds"), make_knowledge("birds", 1))  # reads need no lock
        assert [e.task for e in bank.entries()] == ["birds"]
    finally:
        holder.kill()
        holder.wait()
    bank.put(make_knowledge("cars", 2))  # the dead holder's lock is released by the kernel
    assert [e.task for e in bank.entries()] == ["birds", "cars"]


# ---------------------------------------------------------------------- quarantine
def test_quarantine_is_listed_never_loaded_and_removable(tmp_path: Path) -> None:
    bank = KnowledgeBank(tmp_path / "bank")
    bank.put(make_knowledge("birds", 1))
    suspicious = make_knowledge("birds", 2)
    q1 = bank.quarantine(suspicious, "signature from unknown agent", packet_bytes=make_packet("birds", 2))
    q2 = bank.quarantine(None, "packet failed to decode", packet_bytes=b"\x00garbage")
    with pytest.raises(ValueError, match="needs the knowledge"):
        bank.quarantine(None, "nothing")
    assert [q.id for q in bank.quarantined()] == [q1.id, q2.id]
    assert (q1.task, q1.has_knowledge, q1.has_packet) == ("birds", True, True)
    assert (q2.task, q2.has_knowledge, q2.reason) == (None, False, "packet failed to decode")
    assert bank.get("birds").meta.seq == 1  # quarantine never replaces the live task
    assert [k.meta.seq for k in bank.load_all()] == [1]
    assert bank.get_quarantined(q2.id).packet_bytes == b"\x00garbage"
    assert bank.used_bytes() == bank.entries()[0].bytes + q1.bytes + q2.bytes
    bank.remove_quarantined(q1.id)
    assert [q.id for q in bank.quarantined()] == [q2.id]
    with pytest.raises(UnknownTaskError):
        bank.remove_quarantined(q1.id)
    report = bank.verify()
    assert report.ok and report.quarantined == 1


# ---------------------------------------------------------------------- CLI
def test_cli_ls_and_show_in_a_pipe_print_every_cell_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Off a terminal (a pipe, a log, CliRunner) the tables are plain columns: a long source path or
    task name is printed whole, not cut to 80 columns with an ellipsis, and the counts line up."""
    monkeypatch.delenv("COLUMNS", raising=False)
    root = tmp_path / "bank"
    k = make_knowledge("a-rather-long-task-name-for-the-bank", 1)
    k.meta.source = "learned:/media/sdcard/captures/2026-12-07/kitchen-counter/left-camera/session-0042"
    KnowledgeBank(root).put(k)
    r = CliRunner().invoke(app, ["ls", "--bank", str(root)])
    assert r.exit_code == 0, r.output
    assert "\u2026" not in r.output and k.meta.source in r.output and k.task in r.output
    header, row = r.output.splitlines()[1:3]
    assert header.split()[:4] == ["task", "agent", "origin", "classes"]
    assert row.index(f"{KnowledgeBank(root).entries()[0].bytes:,}") + len(f"{KnowledgeBank(root).entries()[0].bytes:,}") \
        == len(header), "sizes are aligned right, under their heading"
    r = CliRunner().invoke(app, ["show", "--bank", str(root), k.task])
    assert r.exit_code == 0 and f"source: {k.meta.source}" in r.output and "\u2026" not in r.output, r.output


def test_cli_ls_show_rm_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SKILL_EDGE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("COLUMNS", "200")
    root = tmp_path / "home" / "bank"  # the default location under SKILL_EDGE_HOME
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1), packet_bytes=make_packet("birds", 1))
    bank.put(make_knowledge("cars", 2))
    bank.quarantine(None, "bad signature", packet_bytes=b"junk")
    runner = CliRunner()

    r = runner.invoke(app, ["ls"])
    assert r.exit_code == 0, r.output
    assert "birds" in r.output and "cars" in r.output and "gmmc" in r.output and "bad signature" in r.output

    r = runner.invoke(app, ["show", "birds"])
    assert r.exit_code == 0, r.output
    for text in ("birds-class0", "birds-class3", "head.weight", "(4, 256)", "gmmc.means", "(25, 256)",
                 "val_acc", "learned:/data/birds", "agent-1", make_knowledge("birds", 1).content_hash()[:16]):
        assert text in r.output, text

    r = runner.invoke(app, ["verify"])
    assert r.exit_code == 0 and "2 task(s) verified" in r.output, r.output

    r = runner.invoke(app, ["rm", "birds"])
    assert r.exit_code == 0 and "removed" in r.output.lower()
    assert [e.task for e in KnowledgeBank(root).entries()] == ["cars"]
    r = runner.invoke(app, ["rm", "birds"])
    assert r.exit_code == 1 and "no task 'birds'" in r.output
    r = runner.invoke(app, ["show", "owls"])
    assert r.exit_code == 1 and "no task 'owls'" in r.output

    cars = KnowledgeBank(root).entries()[0]
    flip_byte(root / "records" / cars.record / "tensors.safetensors", 300)
    r = runner.invoke(app, ["verify", "--bank", str(root)])
    assert r.exit_code == 1 and "tensors.safetensors" in r.output, r.output
    r = runner.invoke(app, ["ls", "--bank", str(tmp_path / "nowhere")])
    assert r.exit_code == 0 and "no bank" in r.output.lower()
    assert not (tmp_path / "nowhere").exists()


def test_cli_ls_show_verify_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json gives scripts the listing, one task and the check as data, errors on stderr only."""
    import json

    monkeypatch.setenv("SKILL_EDGE_HOME", str(tmp_path / "home"))
    root = tmp_path / "home" / "bank"
    bank = KnowledgeBank(root)
    bank.put(make_knowledge("birds", 1), packet_bytes=make_packet("birds", 1))
    bank.put(make_knowledge("cars", 2))
    bank.quarantine(None, "bad signature", packet_bytes=b"junk")
    runner = CliRunner()

    r = runner.invoke(app, ["ls", "--json"])
    assert r.exit_code == 0, r.output
    listing = json.loads(r.stdout)
    tasks = {t["task"]: t for t in listing["tasks"]}
    assert sorted(tasks) == ["birds", "cars"] and tasks["birds"]["has_packet"] and not tasks["cars"]["has_packet"]
    assert tasks["birds"]["classes"] == 4 and tasks["birds"]["anchors"] == ["gmmc"]
    assert tasks["birds"]["content_hash"] == make_knowledge("birds", 1).content_hash()
    assert [q["reason"] for q in listing["quarantined"]] == ["bad signature"]
    assert listing["used_bytes"] == KnowledgeBank(root).used_bytes()

    r = runner.invoke(app, ["show", "birds", "--json"])
    assert r.exit_code == 0, r.output
    shown = json.loads(r.stdout)
    assert shown["labels"][0] == "birds-class0" and shown["tensors"]["head.weight"]["shape"] == [4, 256]
    assert shown["source"] == "learned:/data/birds" and shown["metrics"]["val_acc"] > 0

    r = runner.invoke(app, ["verify", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["ok"] is True
    flip_byte(root / "records" / tasks["cars"]["record"] / "tensors.safetensors", 300)
    r = runner.invoke(app, ["verify", "--json"])
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and not report["ok"] and any("tensors.safetensors" in p for p in report["problems"])

    r = runner.invoke(app, ["show", "owls", "--json"])
    assert r.exit_code == 1 and r.stdout == "" and "no task 'owls'" in r.stderr
    r = runner.invoke(app, ["ls", "--bank", str(tmp_path / "nowhere"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["exists"] is False and json.loads(r.stdout)["tasks"] == []


def test_a_bank_written_before_bb_split_existed_still_opens(tmp_path: Path) -> None:
    """Records stored before ``TaskMeta.bb_split`` (issue 16) carry no such key in their metadata; an
    upgraded device must read them as they were hashed, not call its own bank corrupt."""
    import json

    bank = KnowledgeBank(tmp_path / "bank")
    plain = make_knowledge("cars", 4)
    plain.bb = None
    bank.put(plain)
    # the pre-issue-16 format: metadata without the key (what every older record holds)
    assert "bb_split" not in plain.metadata()["meta"]
    record = next((tmp_path / "bank").rglob("*.json"))
    meta = json.loads(record.read_text())
    assert "bb_split" not in json.dumps(meta)
    again = KnowledgeBank(tmp_path / "bank")
    assert again.get("cars").meta.bb_split == -1
    assert_same_knowledge(again.get("cars"), plain)
    # a split point other than the default is written and read back
    split = make_knowledge("birds", 1)
    split.meta.bb_split = 5
    assert split.metadata()["meta"]["bb_split"] == 5
    bank.put(split)
    assert KnowledgeBank(tmp_path / "bank").get("birds").meta.bb_split == 5


def test_a_bank_written_with_bb_split_spelled_out_still_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Between issue 16's first commit and the fix above, records were written (and indexed) with
    ``bb_split: -1`` spelled out; a bank holding them opens too."""
    from dataclasses import asdict

    import skill_edge.runtime.knowledge.records as knowledge_module

    plain = make_knowledge("cars", 4)
    plain.bb = None
    with monkeypatch.context() as m:  # the writer of that window
        m.setattr(knowledge_module, "_meta_dict", lambda meta: asdict(meta))
        KnowledgeBank(tmp_path / "bank").put(plain)
        assert plain.metadata()["meta"]["bb_split"] == -1
    again = KnowledgeBank(tmp_path / "bank")
    assert_same_knowledge(again.get("cars"), plain)
    assert plain.content_hash() != plain.content_hash(explicit_bb_split=True)
