"""A full disk, made real with RLIMIT_FSIZE in a subprocess (writes past the limit fail with EFBIG):
the feature cache warns and the learn goes on, `keys init` says so in one line, and no partial
file is left behind."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from test_device import _shape_task


def _limited(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def _run(args: list[str], limit: int, **kw) -> subprocess.CompletedProcess:
    """``args`` in a subprocess that may write no file larger than ``limit`` bytes (Python ignores SIGXFSZ)."""
    return subprocess.run(args, capture_output=True, text=True, timeout=600, preexec_fn=_limited(limit),
                          env={**os.environ, "SKILL_EDGE_LOG": "WARNING"}, **kw)


def test_feature_cache_that_cannot_be_written_warns_and_leaves_no_temp_file(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import logging, sys
        import numpy as np
        from skill_edge.runtime.rom.feature_cache import FeatureCache
        from skill_edge.runtime.rom.engine import Extraction
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        cache = FeatureCache({str(tmp_path / "cache")!r}, "ab" * 32)
        ex = Extraction(np.ones((200, 1280), np.float32), np.arange(200), trunk_stats=np.ones((200, 384), np.float32))
        print(cache.save("k" * 32, ex), cache.load("k" * 32))
    """)
    res = _run([sys.executable, "-c", script], limit=64 * 1024)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "None"]
    assert "feature cache" in res.stderr and "not written" in res.stderr and "Traceback" not in res.stderr
    assert not list((tmp_path / "cache").rglob("*")) or all(p.is_dir() for p in (tmp_path / "cache").rglob("*"))


def test_learn_goes_on_when_its_feature_cache_hits_a_full_disk(tmp_path: Path, rom_dir: Path) -> None:
    """250 training images make a ~1.3 MB cache entry; the bank records and the packet are under 0.8 MB."""
    data = _shape_task(tmp_path / "shapes", n_train=125, n_test=10)
    home = tmp_path / "home"
    res = _run([sys.executable, "-m", "skill_edge", "learn", "--task", "shapes", "--data", str(data), "--home",
                str(home), "--rom", str(rom_dir), "--json"], limit=800_000)
    assert res.returncode == 0, res.stderr
    assert "feature cache" in res.stderr and "not written" in res.stderr and "Traceback" not in res.stderr
    summary = json.loads(res.stdout)
    assert summary["train_images"] == 250 and summary["test_acc"] >= 0.9
    assert (home / "outbox" / "shapes-1.skp").exists()
    assert not [p for p in home.rglob("*") if p.name.endswith(".tmp")], "a partial temp file was left"
    cached = [p.stat().st_size for p in (home / "cache").rglob("*.safetensors")]
    assert cached and max(cached) < 800_000, "only the small (test split) entry fits"


def test_keys_init_on_a_full_disk_is_one_line_and_leaves_no_half_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    res = _run([sys.executable, "-m", "skill_edge", "keys", "init", "--home", str(home)], limit=64)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: cannot write the device key in"), lines
    assert "File too large" in lines[0]
    keys = home / "keys"
    assert not keys.exists() or not list(keys.iterdir()), list(keys.iterdir())
    ok = subprocess.run([sys.executable, "-m", "skill_edge", "keys", "init", "--home", str(home)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr  # nothing half-written stands in the way of a retry


@pytest.mark.parametrize("value", ["", "INFO", "10"])
def test_log_level_accepts_names_and_numbers(value: str) -> None:
    import logging

    from skill_edge.cli import log_level

    level, complaint = log_level(value or None)
    assert complaint is None and level == {"": logging.WARNING, "INFO": logging.INFO, "10": 10}[value]
    assert log_level("loud")[1] is not None


def test_outbox_write_on_a_full_disk_leaves_no_temp_file(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        from pathlib import Path
        from skill_edge.runtime.cli.main import write_outbox
        outbox = Path({str(tmp_path / "outbox")!r})
        try:
            write_outbox(outbox, "t-1.skp", b"x" * 200_000)
        except OSError as exc:
            print("OSError", exc.errno)
        print(sorted(p.name for p in outbox.iterdir()))
        print(write_outbox(outbox, "small-1.skp", b"y" * 100).name)
    """)
    res = _run([sys.executable, "-c", script], limit=64 * 1024)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["OSError 27", "[]", "small-1.skp"]  # EFBIG, nothing left, then a write fits
