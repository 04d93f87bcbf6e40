"""The CLI as users meet it: exit codes, readable output on a terminal and in a pipe, progress,
backend names, --version and SKILL_EDGE_LOG.  Real subprocesses (pipes and a real pty) where
what matters is what a user's terminal or script sees."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skill_edge.cli import app
from skill_edge.runtime.cli.output import relative_names, shorten_path
from skill_edge.runtime.rom.engine import ProviderError, normalize_providers
from test_device import _digit_task, _shape_task

runner = CliRunner()
SKILL_EDGE = [sys.executable, "-m", "skill_edge"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory: pytest.TempPathFactory, rom_dir: Path) -> dict:
    """A home that learned two tiny tasks through the CLI, and the task folders."""
    base = tmp_path_factory.mktemp("cli")
    tasks = {"digits": _digit_task(base / "digits", [0, 1], n_train=12, n_test=4),
             "shapes": _shape_task(base / "shapes", n_train=12, n_test=4)}
    home = base / "home"
    for name, path in tasks.items():
        res = runner.invoke(app, ["learn", "--task", name, "--data", str(path), "--home", str(home),
                                  "--rom", str(rom_dir), "--json"])
        assert res.exit_code == 0, res.output
    return {"home": home, "tasks": tasks, "rom": rom_dir}


def _run(args: list[str], env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """The real command in a subprocess, stdout and stderr on pipes (not a terminal)."""
    return subprocess.run([*SKILL_EDGE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, **kw)


def _run_in_pty(args: list[str], columns: int = 80, answers: dict[str, str] | None = None,
                env: dict | None = None) -> tuple[int, str]:
    """The real command on a real pseudo-terminal (what a user at a shell sees): (exit code, the screen
    with escape codes removed).  ``answers`` types a reply once the screen shows a prompt's text."""
    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": str(columns), "LINES": "40", "TERM": "xterm", **(env or {})}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([*SKILL_EDGE, *args], stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    pending = dict(answers or {})
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 300)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
        screen = b"".join(chunks).decode("utf-8", "replace")
        for prompt in [k for k in pending if k in screen]:
            os.write(master, pending.pop(prompt).encode() + b"\n")
    code = proc.wait(timeout=60)
    os.close(master)
    return code, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode("utf-8", "replace"))


def _common(learned: dict) -> list[str]:
    """Home and ROM, and no open set: these tiny tasks' thresholds would call some of their own images unknown."""
    return ["--home", str(learned["home"]), "--rom", str(learned["rom"]), "--no-open-set"]


def test_missing_and_unreadable_inputs_exit_1_and_the_rest_is_still_classified(learned: dict, tmp_path: Path) -> None:
    good = sorted((learned["tasks"]["shapes"] / "test" / "disc").glob("*.png"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    res = runner.invoke(app, ["classify", *map(str, good), str(bad), str(tmp_path / "missing.png"), str(empty),
                              *_common(learned), "--json"])
    assert res.exit_code == 1, res.output
    preds = {p["source"]: p for p in json.loads(res.stdout)}
    assert len(preds) == 5
    assert all(preds[str(g)]["task"] == "shapes" and preds[str(g)]["error"] is None for g in good)
    assert "not a readable image" in preds[str(bad)]["error"]
    assert preds[str(tmp_path / "missing.png")]["error"] == "no such file or directory"
    assert preds[str(empty)]["error"].startswith("folder holds no images")
    assert "5 inputs: shapes 2, unknown 0, unreadable 3" in res.stderr  # --json keeps stdout pure JSON
    ok = runner.invoke(app, ["classify", *map(str, good), *_common(learned)])
    assert ok.exit_code == 0, ok.output
    assert "2 inputs: shapes 2, unknown 0, unreadable 0" in ok.stdout
    nothing = runner.invoke(app, ["classify", *_common(learned)])
    assert nothing.exit_code == 2 and "nothing to classify" in nothing.output


def test_an_empty_home_says_so(learned: dict, tmp_path: Path) -> None:
    """Not "no task with a maha anchor" (what --mapper auto picked): the bank is empty, and where it is."""
    image = sorted((learned["tasks"]["shapes"] / "test" / "disc").glob("*.png"))[0]
    res = runner.invoke(app, ["classify", str(image), "--home", str(tmp_path / "new"), "--rom", str(learned["rom"])])
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert f"the bank at {tmp_path / 'new' / 'bank'} holds no task for this ROM" in text and "Traceback" not in text


def test_exit_codes_are_documented_in_help() -> None:
    for verb in ("classify", "learn", "eval"):
        res = runner.invoke(app, [verb, "--help"], env={"COLUMNS": "200"})
        assert res.exit_code == 0
        text = " ".join(res.output.split())
        assert "Exit codes:" in text and " 1 " in text and " 2 " in text, verb
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "Exit codes" in readme and "SKILL_EDGE_LOG" in readme and "csi://0" in readme


def test_piped_output_is_plain_whole_and_progress_goes_to_stderr(learned: dict) -> None:
    """Not a terminal: one plain line per input with its whole path, a summary, progress lines on stderr."""
    folder = learned["tasks"]["digits"] / "test"
    files = sorted(folder.glob("*/*.png"))
    res = _run(["classify", str(folder), *_common(learned)])
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == f"{len(files)} inputs, mapper mahalanobis"  # auto: every task carries both anchors
    assert lines[1].split() == ["input", "task", "class", "task", "conf", "class", "conf", "note"]
    assert [ln.split()[0] for ln in lines[2:2 + len(files)]] == [str(f) for f in files]
    assert lines[-1].startswith(f"{len(files)} inputs: digits ")
    assert "│" not in res.stdout and "\x1b" not in res.stdout
    assert "backend: CPUExecutionProvider" in res.stderr
    n = len(files)
    assert f"classify: images 0/{n}" in res.stderr and f"classify: images {n}/{n}" in res.stderr


def test_terminal_table_keeps_the_end_of_each_path(learned: dict, tmp_path: Path) -> None:
    """On an 80-column terminal, long paths that share their start are cut at the start, not the end."""
    deep = tmp_path / ("a-rather-long-folder-name" * 3) / "and-another-level-of-folders" / "photos"
    deep.mkdir(parents=True)
    src = sorted((learned["tasks"]["shapes"] / "test").glob("*/*.png"))[:3]
    names = [f"holiday_picture_{i:04d}_{p.parent.name}.png" for i, p in enumerate(src)]
    for p, n in zip(src, names):
        (deep / n).write_bytes(p.read_bytes())
    code, screen = _run_in_pty(["classify", *[str(deep / n) for n in names], *_common(learned)])
    assert code == 0, screen
    assert "3 inputs: shapes 3" in screen, screen
    rows = [ln for ln in screen.splitlines() if "shapes" in ln and "│" in ln]
    assert len(rows) == 3, screen
    for n, row in zip(names, rows):
        assert n[-12:] in row, (n, row)  # ..._disc.png / ..._square.png: every row tells its file apart
    assert len({row.split("│")[1] for row in rows}) == 3
    assert "images" in screen and "3/3" in screen  # the progress bar reached the end


def test_shorten_path_cuts_the_start() -> None:
    assert shorten_path("/data/cups/train/mug/img_0001.jpg", 16) == "…ug/img_0001.jpg"
    assert shorten_path("/a/very_long_file_name_of_a_photo.jpg", 12) == "…a_photo.jpg"
    assert shorten_path("short.jpg", 16) == "short.jpg"
    assert relative_names(["/d/x/a.jpg", "/d/y/b.jpg"]) == ("/d", ["x/a.jpg", "y/b.jpg"])
    assert relative_names(["cam#0", "cam#1"]) == (None, ["cam#0", "cam#1"])


@pytest.mark.parametrize("given, want", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], ["cuda", "cpu"]),
    (["TensorrtExecutionProvider", "cuda", "CPU"], ["tensorrt", "cuda", "cpu"]),
    (["trt", "cpuexecutionprovider", "cpu"], ["tensorrt", "cpu"]),
])
def test_onnxruntime_provider_names_are_accepted(given: list[str], want: list[str]) -> None:
    assert normalize_providers(given) == want


def test_provider_names_on_the_command_line(learned: dict) -> None:
    img = str(next((learned["tasks"]["shapes"] / "test" / "disc").glob("*.png")))
    res = runner.invoke(app, ["classify", img, *_common(learned), "--provider", "CPUExecutionProvider", "--json"])
    assert res.exit_code == 0, res.output
    assert "backend: CPUExecutionProvider" in res.stderr
    bad = runner.invoke(app, ["classify", img, *_common(learned), "--provider", "OpenVINOExecutionProvider"])
    assert bad.exit_code == 2 and not isinstance(bad.exception, ValueError)
    assert "unknown provider(s) 'OpenVINOExecutionProvider'" in " ".join(bad.output.split())
    assert "CUDAExecutionProvider" in bad.output and "Traceback" not in bad.output
    with pytest.raises(ProviderError):
        normalize_providers(["gpu"])
    # ORT's CUDA name: runs on CUDA where a GPU is, else a one-line "no usable backend", never a traceback
    cuda = _run(["classify", img, *_common(learned), "--provider", "CUDAExecutionProvider", "--json"])
    assert "Traceback" not in cuda.stderr
    if cuda.returncode == 0:
        assert "backend: CUDAExecutionProvider" in cuda.stderr
    else:
        assert cuda.returncode == 2 and "no usable backend" in cuda.stderr


def test_version_and_log_level(learned: dict) -> None:
    from skill_edge import __version__

    res = _run(["--version"])
    assert res.returncode == 0 and res.stdout.strip() == f"skill-edge {__version__}"
    img = str(next((learned["tasks"]["digits"] / "test").glob("*/*.png")))
    res = _run(["classify", img, *_common(learned), "--json"], env={"SKILL_EDGE_LOG": "debug"})
    assert res.returncode == 0, res.stderr
    json.loads(res.stdout)  # log lines never mix into the results
    assert re.search(r"^DEBUG \S+: ", res.stderr, re.M), res.stderr
    res = _run(["classify", img, *_common(learned), "--json"], env={"SKILL_EDGE_LOG": "chatty"})
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "SKILL_EDGE_LOG='chatty' is not a log level" in res.stderr


def test_learn_stages_all_complete(learned: dict, tmp_path: Path) -> None:
    """Every stage the learn reports ends at n/n (the head and anchor stages used to stay at 0/1)."""
    res = _run(["learn", "--task", "shapes2", "--data", str(learned["tasks"]["shapes"]), "--home",
                str(tmp_path / "h"), "--rom", str(learned["rom"])])
    assert res.returncode == 0, res.stderr
    stages = {}
    for m in re.finditer(r"^learn: (.+) (\d+)/(\d+)$", res.stderr, re.M):
        stages[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    assert {"extract train", "train head", "fit anchors", "extract test"} <= set(stages), res.stderr
    assert all(done == total for done, total in stages.values()), stages
    assert stages["train head"] == (1, 1) and stages["fit anchors"] == (1, 1)
    assert "task: shapes2" in res.stdout and "backend: CPUExecutionProvider" in res.stdout


def test_stage_bars_complete_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage reported only at its start (0/1), as learn reports its head and anchor fits, ends at 1/1."""
    import io

    from rich.console import Console

    from skill_edge.runtime.cli import output as cli_output

    buf = io.StringIO()
    monkeypatch.setattr(cli_output, "console", Console(file=buf, force_terminal=True, width=100))
    with cli_output.StageProgress("learn") as prog:
        prog.update("extract train", 16, 48)
        prog.update("extract train", 48, 48)
        prog.update("train head", 0, 1)
        prog.update("fit anchors", 0, 1)
        bars = prog._progress.tasks
        assert [(t.description, t.completed, t.total) for t in bars] == [
            ("extract train", 48, 48), ("train head", 1, 1), ("fit anchors", 0, 1)]
    assert all(t.completed == t.total for t in bars)
    final = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue()).split("\r")[-1]
    assert "train head" in final and "fit anchors" in final and "0/1" not in final


def test_names_with_brackets_are_printed_as_they_are(learned: dict, tmp_path: Path) -> None:
    """A file called ``[b]x[i].png`` is text, not rich markup, in the table and in error lines."""
    odd = tmp_path / "[b]photo[i].png"
    odd.write_bytes(next((learned["tasks"]["shapes"] / "test" / "disc").glob("*.png")).read_bytes())
    res = runner.invoke(app, ["classify", str(odd), str(tmp_path / "[red]gone.png"), *_common(learned)])
    assert res.exit_code == 1, res.output
    assert f"{odd}  shapes  disc" in res.stdout and str(tmp_path / "[red]gone.png") in res.stdout
    bad = runner.invoke(app, ["classify", str(odd), *_common(learned), "--mapper", "[bold]x"])
    assert bad.exit_code == 2 and "not '[bold]x'" in bad.output
