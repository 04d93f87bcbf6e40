"""A crash-safe write never leaves half a file: on a failed write (here a full disk at fsync) the old
bytes stay and no temporary file is left behind; after a kill -9 mid-write only a temporary file can
remain, which readers never open."""
from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from skill_edge.runtime.atomic import write_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "keys" / "device.pub"
    write_atomically(target, b"old", 0o644)
    assert target.read_bytes() == b"old" and oct(target.stat().st_mode & 0o777) == "0o644"

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(target, b"new bytes that do not fit")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["device.pub"]


def test_kill_during_a_write_leaves_the_old_file_whole(tmp_path):
    target = tmp_path / "state.json"
    write_atomically(target, b'{"seq": 1}')
    # a child that stops for good in the middle of writing the temporary file
    code = f"""
import os, signal
from pathlib import Path
import skill_edge.runtime.atomic as atomic
def die(fd):
    os.kill(os.getpid(), signal.SIGKILL)
atomic.os.fsync = die
atomic.write_atomically(Path({str(target)!r}), b'{{"seq": 2}}' * 1000)
"""
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode == -9
    assert target.read_bytes() == b'{"seq": 1}'
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "state.json"]
    assert all(n.startswith(".state.json.") and n.endswith(".tmp") for n in leftovers)
