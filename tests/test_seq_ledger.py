"""``SeqLedger``: the newest seq a device key signed per task, a floor that survives a wiped bank."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest

from skill_edge.runtime.exchange.seq_ledger import FORMAT, SeqLedger


def test_records_only_raise_and_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signed_seqs.json"
    ledger = SeqLedger(path, "agent-a")
    assert ledger.get("birds") == 0
    ledger.record("birds", 3)
    ledger.record("birds", 2)  # a lower seq never lowers the floor
    ledger.record("cars", 1)
    again = SeqLedger(path, "agent-a")
    assert (again.get("birds"), again.get("cars"), again.get("dogs")) == (3, 1, 0)
    assert json.loads(path.read_text()) == {"format": FORMAT, "agent": "agent-a", "seqs": {"birds": 3, "cars": 1}}


def test_another_keys_ledger_counts_for_nothing(tmp_path: Path) -> None:
    path = tmp_path / "signed_seqs.json"
    SeqLedger(path, "old-key").record("birds", 7)
    new = SeqLedger(path, "new-key")
    assert new.get("birds") == 0
    new.record("birds", 1)  # the new key's ledger replaces the old one
    assert SeqLedger(path, "new-key").get("birds") == 1 and SeqLedger(path, "old-key").get("birds") == 0


@pytest.mark.parametrize("junk", [b"", b"{not json", b'{"format": "skill-edge-signed-seqs/1", "agent": "a", "seqs": 5}',
                                  b'["a list"]'])
def test_an_unreadable_ledger_is_a_warning_and_a_floor_of_zero(tmp_path: Path, junk: bytes, caplog) -> None:
    path = tmp_path / "signed_seqs.json"
    path.write_bytes(junk)
    ledger = SeqLedger(path, "a")
    with caplog.at_level(logging.WARNING):
        assert ledger.get("birds") == 0
    assert "unreadable seq ledger" in caplog.text
    ledger.record("birds", 2)  # and the next signature writes a good one
    assert SeqLedger(path, "a").get("birds") == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_raises_and_keeps_the_old_ledger(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ledger = SeqLedger(mnt / "signed_seqs.json", "a")
        ledger.record("birds", 1)
        with open(mnt / "filler", "wb", buffering=0) as f:  # fill every block left
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        with pytest.raises(OSError):
            ledger.record("a-task-with-a-long-name-" * 40, 1)
        assert ledger.get("birds") == 1
        assert sorted(p.name for p in mnt.iterdir()) == ["filler", "signed_seqs.json", "signed_seqs.json.lock"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _record_many(path: str, agent: str, prefix: str, n: int) -> None:
    ledger = SeqLedger(path, agent)
    for i in range(n):
        ledger.record(f"{prefix}{i}", i + 1)


def test_two_processes_recording_at_once_lose_nothing(tmp_path: Path) -> None:
    import multiprocessing

    path = str(tmp_path / "signed_seqs.json")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(path, "a", p, 150)) for p in ("x", "y")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ledger = SeqLedger(path, "a")
    assert all(ledger.get(f"{p}{i}") == i + 1 for p in ("x", "y") for i in range(150))
