"""`skill-edge learn` refuses a bad task name before it reads a single image (issue 15, finding 8).

The name rule is ``knowledge.validate_name``, the same one packet decode applies.  Before, `/`,
`..` and empty names were refused only after training, as a traceback, and escapes or a lone
surrogate were stored and broke `bank ls`, `classify`, `sync` and the terminal later.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skill_edge.runtime.knowledge.bank import KnowledgeBank

SKILL_EDGE = Path(sys.executable).parent / "skill-edge"

BAD = {
    "dotdot": "..",
    "slash": "a/b",
    "empty": "",
    "osc-title": "\x1b]0;pwned\x07x",
    "ansi-clear": "\x1b[2Jx",
    "rtl-override": "abc\u202egnp",
    "201-chars": "a" * 201,
    "lone-surrogate": b"a\xffb",  # argv bytes that are not UTF-8 arrive as the lone surrogate U+DCFF
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learnable two-class ImageFolder: the name is all that is wrong."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for c, level in (("dark", 40), ("light", 210)):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(4):
            px = np.clip(level + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize("name", list(BAD.values()), ids=list(BAD))
def test_learn_with_a_bad_name_fails_before_training_with_exit_2(name, data: Path, rom_dir: Path, tmp_path: Path):
    home = tmp_path / "home"
    env = {**os.environ, "SKILL_EDGE_HOME": str(home), "SKILL_EDGE_CACHE": str(tmp_path / "cache"),
           "COLUMNS": "300"}
    p = subprocess.run([str(SKILL_EDGE), "learn", "--task", name, "--data", str(data), "--rom", str(rom_dir)],
                       capture_output=True, env=env, timeout=300)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    assert p.returncode == 2, out
    assert "Traceback" not in out and "task name" in out
    assert b"\x1b]" not in p.stdout + p.stderr and b"\x1b[2J" not in p.stdout + p.stderr
    assert "\u202e" not in out
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.safetensors"))  # nothing extracted
    assert not (home / "outbox").exists() or not any((home / "outbox").iterdir())
    assert not (home / "bank").exists() or KnowledgeBank(home / "bank").entries() == []


@pytest.mark.parametrize("option", [["--k", "0"], ["--exemplars", "0"], ["--seed", "-1"], ["--countdown", "-1"],
                                    ["--frames", "0"], ["--bb-split", "5"]])
def test_out_of_range_numbers_are_usage_errors_not_tracebacks(tmp_path, option) -> None:
    """``--k 0`` and ``--seed -1`` used to fail deep inside the anchor fit or numpy with a traceback (exit 1),
    and ``--bb-split`` without ``--bb`` was ignored."""
    cmd = [str(Path(sys.executable).parent / "skill-edge"), "learn", "--task", "t", "--data", str(tmp_path),
           "--home", str(tmp_path / "home"), *option]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    said = " ".join(r.stderr.split())
    assert f"Invalid value for '{option[0]}'" in said or "--bb-split 5 chooses where" in said, r.stderr
    assert not (tmp_path / "home").exists(), "refused before the device home is touched"


@pytest.mark.parametrize("option", [dict(k=0), dict(m=0), dict(seed=-1)])
def test_the_api_refuses_out_of_range_numbers_before_reading_an_image(tmp_path, rom_dir, option) -> None:
    from skill_edge.runtime.device import Device, LearnError

    dev = Device(tmp_path / "home", rom_dir)
    with pytest.raises(LearnError, match="must be >= 1 and seed >= 0"):
        dev.learn("t", tmp_path / "no-such-folder", **option)  # the folder is never looked at
    assert dev.bank.entries() == []
