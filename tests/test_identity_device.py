"""Task identity on the real ROM, through the CLI (issue 15, findings 4 and 9, and disk full in learn).

Two devices teach the same name, ``digits``, from different data.  After a sync the first
device holds its own ``digits`` unchanged plus the peer's, and ``classify`` tells them apart by
origin: ``Prediction.agent``, ``--json`` and ``digits@<agent>`` in the table.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skill_edge.cli import app
from skill_edge.runtime.knowledge.bank import KnowledgeBank
from skill_edge.runtime.knowledge.identity import TaskKey
from skill_edge.runtime.exchange.keys import TrustStore, load_device_key
from test_device import _digit_task, _shape_task

runner = CliRunner()


def _cli(*args: str) -> str:
    """stdout of a successful command (progress and log lines go to stderr)."""
    r = runner.invoke(app, list(args))
    assert r.exit_code == 0, r.output
    return r.stdout


def test_same_name_from_two_devices_is_kept_apart_and_classified_by_origin(tmp_path: Path, rom_dir: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    digits, shapes = _digit_task(tmp_path / "digits", [0, 1, 2]), _shape_task(tmp_path / "shapes")
    a, b, share = tmp_path / "a", tmp_path / "b", tmp_path / "share"
    rom = ["--rom", str(rom_dir)]
    _cli("learn", "--task", "digits", "--data", str(digits), "--home", str(a), *rom, "--json")
    _cli("learn", "--task", "digits", "--data", str(shapes), "--home", str(b), *rom, "--json")
    ka, kb = load_device_key(a), load_device_key(b)
    TrustStore.at_home(a).add("b", kb.public_key)
    own_before = KnowledgeBank(a / "bank").resolve("digits")
    assert own_before.own and own_before.agent == ka.key_id and own_before.has_packet

    for outbox in (a / "outbox", b / "outbox"):  # the bank alone carries the packets to the fleet
        for f in outbox.glob("*.skp"):
            f.unlink()
    sync = ["sync", "--transport", f"dir:{share}", "--fleet", "lab", "--idle", "0.5", *rom]
    _cli(*sync, "--home", str(b))
    r = runner.invoke(app, [*sync, "--home", str(a)])
    assert r.exit_code == 0 and "accepted" in r.output, r.output

    bank = KnowledgeBank(a / "bank")
    assert sorted(e.key for e in bank.entries()) == sorted([TaskKey("digits", ka.key_id),
                                                           TaskKey("digits", kb.key_id)])
    assert bank.resolve(f"digits@{ka.key_id[:6]}") == own_before, "the own task is untouched"
    ls = _cli("bank", "ls", "--home", str(a))
    assert f"digits@{ka.key_id[:8]}" in ls and f"digits@{kb.key_id[:8]}" in ls and "received" in ls, ls

    home = ["--home", str(a), *rom]
    digit_imgs, shape_imgs = digits / "test", shapes / "test"
    preds = json.loads(_cli("classify", str(digit_imgs), str(shape_imgs), "--json", "--no-open-set", *home))
    by_dir: dict[str, list[str]] = {"digits": [], "shapes": []}
    for p in preds:
        assert p["task"] == "digits" and p["agent"] in (ka.key_id, kb.key_id), p
        assert p["task_label"] == f"digits@{p['agent'][:8]}"
        by_dir["digits" if str(digit_imgs) in p["source"] else "shapes"].append(p["agent"])
    assert len(by_dir["digits"]) == 24 and len(by_dir["shapes"]) == 16
    assert by_dir["digits"].count(ka.key_id) >= 22, "digit images go to this device's own digits"
    assert by_dir["shapes"].count(kb.key_id) >= 15, "shape images go to the peer's digits"

    table = _cli("classify", str(shape_imgs), "--no-open-set", *home)
    assert f"digits@{kb.key_id[:8]}" in table, table


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_learn_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, rom_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank record does not fit a 192 kB home: exit 1, one line naming the full disk, no traceback,
    nothing stored and no half-written file anywhere in the home."""
    data = _digit_task(tmp_path / "digits", [0, 1, 2])
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(home)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
    monkeypatch.setenv("SKILL_EDGE_CACHE", str(tmp_path / "cache"))  # the feature cache is not under test
    try:
        res = runner.invoke(app, ["learn", "--task", "digits", "--data", str(data), "--home", str(home),
                                  "--rom", str(rom_dir)])
        assert res.exit_code == 1, res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        assert "Traceback" not in res.output
        lines = [line for line in res.output.splitlines() if "cannot store" in line]
        assert len(lines) == 1 and "disk full" in lines[0], res.output
        assert KnowledgeBank(home / "bank").entries() == []
        leftovers = [p for p in home.rglob("*") if p.is_file() and (p.suffix == ".tmp" or "staging" in p.parts)]
        assert leftovers == [] and not list(home.rglob("*.skp")), leftovers
    finally:
        subprocess.run(["umount", str(home)], check=True)


def test_learn_killed_right_after_the_bank_write_loses_no_packet(tmp_path: Path, rom_dir: Path) -> None:
    """SIGKILL ``skill-edge learn`` the moment its task appears in the bank index (before it can
    write the outbox copy): the bank record already holds the signed packet, and the next sync
    publishes it, so the version reaches the fleet anyway."""
    import signal
    import sys
    import time

    from skill_edge.runtime.exchange.packet import PacketCodec

    data = _digit_task(tmp_path / "digits", [0, 1, 2])
    home, share = tmp_path / "home", tmp_path / "share"
    index = home / "bank" / "index.json"
    proc = subprocess.Popen([sys.executable, "-m", "skill_edge", "learn", "--task", "digits", "--data", str(data),
                             "--home", str(home), "--rom", str(rom_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (index.exists() and b'"task": "digits"' in index.read_bytes()):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "learn never stored its task"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    entry = KnowledgeBank(home / "bank").resolve("digits")
    assert entry.own and entry.has_packet
    packet = KnowledgeBank(home / "bank").packet_bytes("digits")
    decoded = PacketCodec().decode(packet)
    assert (decoded.task, decoded.agent_id, decoded.seq) == ("digits", load_device_key(home).key_id, 1)

    r = runner.invoke(app, ["sync", "--transport", f"dir:{share}", "--fleet", "lab", "--idle", "0.3",
                            "--home", str(home), "--rom", str(rom_dir)])
    assert r.exit_code == 0, r.output
    assert [f.read_bytes() for f in (share / "lab").rglob("*.skp")] == [packet]
