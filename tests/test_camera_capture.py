"""`learn --camera` from a real video file (written with cv2.VideoWriter, read back as file://):
no crash when DISPLAY is set with OpenCV headless, no countdown for files, and a second capture
never silently mixes with the first."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from skill_edge.cli import app
from test_cli_classify import _run_in_pty

cv2 = pytest.importorskip("cv2")
runner = CliRunner()
FRAMES = 6  # per label


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MJPG clip: red discs, then blue discs."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    assert writer.isOpened()
    rng = np.random.default_rng(0)
    for colour in ((40, 40, 230), (230, 40, 40)):  # BGR
        for _ in range(FRAMES):
            img = (rng.random((64, 64, 3)) * 50 + 90).astype(np.uint8)
            cv2.circle(img, tuple(int(v) for v in rng.integers(20, 44, size=2)), 12, colour, -1)
            writer.write(img)
    writer.release()
    return path


def _learn(clip: Path, home: Path, rom_dir: Path, *extra: str, env: dict | None = None):
    return runner.invoke(app, ["learn", "--task", "colours", "--camera", f"file://{clip}", "--labels", "red,blue",
                               "--frames", str(FRAMES), "--home", str(home), "--rom", str(rom_dir), "--json", *extra],
                         env=env)


def _frames(home: Path) -> dict[str, int]:
    cap = home / "captures" / "colours" / "train"
    return {d.name: len(list(d.glob("*.jpg"))) for d in sorted(cap.iterdir())}


def test_display_set_with_headless_opencv_falls_back_and_files_need_no_countdown(clip: Path, tmp_path: Path,
                                                                                   rom_dir: Path) -> None:
    """OpenCV headless has no imshow: with DISPLAY set the capture used to crash in cv2.imshow."""
    from skill_edge.runtime.sources.camera import gui_available

    t0 = time.monotonic()
    res = _learn(clip, tmp_path / "h", rom_dir, "--countdown", "5", env={"DISPLAY": ":0"})
    assert res.exit_code == 0, res.output
    if not gui_available():  # the opencv-python-headless this project installs
        assert "OpenCV has no GUI support here" in res.stderr
    assert "(timed)" in res.stderr and "capturing in" not in res.stderr  # no countdown for a file
    assert time.monotonic() - t0 < 2 * 5, "a 5 s countdown per label ran for a file:// source"
    assert _frames(tmp_path / "h") == {"blue": FRAMES, "red": FRAMES}
    assert json.loads(res.stdout)["train_images"] > 0


def test_headless_flag_and_recapture_needs_append_or_replace(clip: Path, tmp_path: Path, rom_dir: Path) -> None:
    home = tmp_path / "h"
    assert _learn(clip, home, rom_dir, "--headless").exit_code == 0
    first = sorted(p.name for p in (home / "captures" / "colours" / "train" / "red").glob("*.jpg"))

    again = _learn(clip, home, rom_dir, "--headless")
    assert again.exit_code == 2, again.output
    assert f"already holds {2 * FRAMES} frames" in " ".join(again.output.split())
    assert "--append" in again.output and "--replace" in again.output and "Traceback" not in again.output
    assert _frames(home) == {"blue": FRAMES, "red": FRAMES}, "a refused capture must not touch the old frames"

    res = _learn(clip, home, rom_dir, "--headless", "--append")
    assert res.exit_code == 0, res.output
    assert _frames(home) == {"blue": 2 * FRAMES, "red": 2 * FRAMES}

    res = _learn(clip, home, rom_dir, "--headless", "--replace")
    assert res.exit_code == 0, res.output
    assert _frames(home) == {"blue": FRAMES, "red": FRAMES}
    now = sorted(p.name for p in (home / "captures" / "colours" / "train" / "red").glob("*.jpg"))
    assert not set(now) & set(first), "--replace keeps none of the earlier frames"

    both = _learn(clip, home, rom_dir, "--append", "--replace")
    assert both.exit_code == 2 and "at most one of --append and --replace" in both.output


def test_capture_dir_policy_without_a_camera(tmp_path: Path) -> None:
    from skill_edge.runtime.sources.camera import CaptureExistsError, prepare_capture_dir

    target = tmp_path / "cap"
    assert prepare_capture_dir(target, "refuse") == 0  # nothing there: nothing to refuse
    (target / "train" / "a").mkdir(parents=True)
    (target / "train" / "a" / "1.jpg").write_bytes(b"x")
    with pytest.raises(CaptureExistsError, match="already holds 1 frames"):
        prepare_capture_dir(target, "refuse")
    assert prepare_capture_dir(target, "append") == 1 and (target / "train" / "a" / "1.jpg").exists()
    assert prepare_capture_dir(target, "replace") == 1 and not (target / "train").exists()
    with pytest.raises(ValueError):
        prepare_capture_dir(target, "merge")


def test_recapture_on_a_terminal_asks(clip: Path, tmp_path: Path, rom_dir: Path) -> None:
    """At a terminal, learn asks what to do with an earlier capture instead of refusing."""
    home = tmp_path / "h"
    assert _learn(clip, home, rom_dir, "--headless").exit_code == 0
    args = ["learn", "--task", "colours", "--camera", f"file://{clip}", "--labels", "red,blue", "--frames",
            str(FRAMES), "--home", str(home), "--rom", str(rom_dir), "--headless"]
    code, screen = _run_in_pty(args, answers={"[a]ppend, [r]eplace or [q]uit": "a"})
    assert code == 0, screen
    assert f"already holds {2 * FRAMES} captured frames" in screen
    assert _frames(home) == {"blue": 2 * FRAMES, "red": 2 * FRAMES}
    code, screen = _run_in_pty(args, answers={"[a]ppend, [r]eplace or [q]uit": "q"})
    assert code == 2 and _frames(home) == {"blue": 2 * FRAMES, "red": 2 * FRAMES}, screen


@pytest.mark.parametrize("task,labels", [("../escape", "red,blue"), ("ok", "red,../../x"), ("ok", "red,\x1b[2Jx")])
def test_a_bad_task_name_or_label_is_refused_before_anything_is_captured(clip: Path, tmp_path: Path, rom_dir: Path,
                                                                          task: str, labels: str) -> None:
    """The task name and every label become folders under captures/: they are checked before capture."""
    home = tmp_path / "h"
    res = runner.invoke(app, ["learn", "--task", task, "--camera", f"file://{clip}", "--labels", labels,
                              "--frames", str(FRAMES), "--home", str(home), "--rom", str(rom_dir), "--headless"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "\x1b[2J" not in res.output
    assert not (tmp_path / "escape").exists() and not (home / "captures").exists()
    assert not list(tmp_path.rglob("*.jpg"))


def test_relearning_a_task_from_the_camera_asks_before_capturing(clip: Path, tmp_path: Path, rom_dir: Path) -> None:
    """The device's own task is never replaced by accident: with no earlier capture to ask about (here
    deleted), learn refuses before capturing, or asks at a terminal, and --replace says yes."""
    import shutil

    from skill_edge.runtime.device import Device

    home = tmp_path / "h"
    assert _learn(clip, home, rom_dir, "--headless").exit_code == 0
    shutil.rmtree(home / "captures")
    res = _learn(clip, home, rom_dir, "--headless")
    assert res.exit_code == 2, res.output
    assert "already learned 'colours' (seq 1" in " ".join(res.output.split())
    assert not (home / "captures").exists(), "refused before anything was captured"
    assert Device(home, rom_dir).own_entry("colours").seq == 1

    args = ["learn", "--task", "colours", "--camera", f"file://{clip}", "--labels", "red,blue", "--frames",
            str(FRAMES), "--home", str(home), "--rom", str(rom_dir), "--headless"]
    code, screen = _run_in_pty(args, answers={"[r]eplace or [q]uit": "q"})
    assert code == 2 and not (home / "captures").exists(), screen
    code, screen = _run_in_pty(args, answers={"[r]eplace or [q]uit": "r"})
    assert code == 0, screen
    assert Device(home, rom_dir).own_entry("colours").seq == 2 and _frames(home) == {"blue": FRAMES, "red": FRAMES}
