"""`skill-edge demo` end to end on its embedded default data (tiny sizes), report files and keys included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from skill_edge.cli import app
from skill_edge.firmware_sim.demo_data import FASHION_DIR, build_demo_tasks
from skill_edge.firmware_sim.equivalence import EquivalenceMap

runner = CliRunner()
needs_fashion = pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian package dataset-fashion-mnist is not installed (scripts/setup.sh installs it)")


@needs_fashion
def test_demo_data_is_six_real_tasks(tmp_path: Path) -> None:
    dirs = build_demo_tasks(tmp_path, train_per_class=5, test_per_class=3)
    assert [d.name for d in dirs] == ["fashion-t-shirt-trouser", "fashion-pullover-dress", "fashion-coat-sandal",
                                      "fashion-shirt-sneaker", "fashion-bag-ankle-boot", "digits"]
    assert sorted(p.name for p in (dirs[0] / "train").iterdir()) == ["t-shirt", "trouser"]
    assert len(list((dirs[0] / "train" / "trouser").glob("*.png"))) == 5
    assert len(list((dirs[-1] / "train").iterdir())) == 10


@needs_fashion
@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, rom_dir: Path) -> None:
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--rom", str(rom_dir), "--train-per-class", "25",
                              "--test-per-class", "10"])
    assert res.exit_code == 0, res.output
    fleet = json.loads((out / "fleet.json").read_text())
    for key in ("agents", "tasks", "speedup_xN", "wallclock_speedup", "comm_bytes_per_task", "mean_no_oracle_acc",
                "normalized_acc_slope"):
        assert key in fleet, key
    # results say where they came from (under CliRunner the command is pytest's own argv)
    assert fleet["machine"]["cores"] >= 1 and fleet["machine"]["cpu"] and fleet["command"] and fleet["date"]
    assert fleet["agents"] == 6 and fleet["tasks"] == 6 and fleet["converged"] and fleet["devices_agree"]
    assert 0.9 < fleet["speedup_xN"] <= 1.0
    assert fleet["mean_no_oracle_acc"]["gmmc"] > 0.6 and fleet["mean_oracle_acc"] > 0.75
    assert set(fleet["baselines_final_mean_acc"]) == {"naive", "ewc", "er_10pc", "er_10k", "derpp"}
    assert fleet["baselines_final_mean_acc"]["naive"] < fleet["mean_no_oracle_acc"]["gmmc"]
    for png in ("fig4_first_task.png", "fig6_normalized.png", "fig8_absolute.png", "task_confusion.png"):
        assert (out / png).stat().st_size > 10_000, png
    md = (out / "report.md").read_text()
    assert "Fig. 9" in md and "DER++" in md and "EWC" in md
    # off a terminal (a log, CI) the summary is plain columns: every task name whole, one line per task
    lines = res.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["task", "oracle"])
    assert "\u2026" not in res.stdout and "\u2503" not in res.stdout, "no rich table box or ellipsis"
    assert [ln.split()[0] for ln in lines[header + 1:header + 8]] == [*fleet["task_names"], "mean"]
    assert next(ln for ln in lines if ln.startswith("banks converged: True, devices agree: True, speedup"))


def test_equivalence_map_scoring(tmp_path: Path) -> None:
    m = EquivalenceMap.skill_bench()
    assert m.equivalent(("clothing", "pants"), ("fashion-mnist", "trouser"))
    assert m.equivalent(("fashion-mnist", "sandal"), ("clothing", "shoes"))
    assert not m.equivalent(("fashion-mnist", "sandal"), ("fashion-mnist", "sneaker"))  # not transitive
    assert m.equivalent(("notmnist", "C"), ("omniglot-latin", "character03"))
    strict, aware = m.correct("clothing", ["pants", "dress", "hat"],
                              ["fashion-mnist", "clothing", "fashion-mnist"], ["trouser", "dress", "bag"])
    assert strict.tolist() == [False, True, False] and aware.tolist() == [True, True, False]
    j = tmp_path / "map.json"
    j.write_text(json.dumps([["a", "x", "b", "y"]]))
    assert EquivalenceMap.load(j).equivalent(("b", "y"), ("a", "x"))
    bad = tmp_path / "bad.csv"
    bad.write_text("nonsense\n1,2\n")
    from skill_edge.firmware_sim.equivalence import EquivalenceError

    with pytest.raises(EquivalenceError):
        EquivalenceMap.load(bad)


def test_demo_refuses_a_bad_engine_or_an_unreachable_broker_before_any_device_starts(tmp_path: Path,
                                                                                      rom_dir: Path) -> None:
    """Each used to end in a traceback (the broker one after every device had waited out its connect timeout)."""
    from test_device import _digit_task

    root = tmp_path / "tasks"
    for name, digits in (("a", [0, 1]), ("b", [2, 3])):
        _digit_task(root / name, digits, n_train=6, n_test=2)
    base = ["demo", "--data", str(root), "--rom", str(rom_dir), "--no-baselines"]
    for extra, want in ((["--engine", "threads"], "engine must be 'process' or 'ray'"),
                        (["--transport", "mqtt://127.0.0.1:1"], "start a broker"),
                        (["--transport", "usb:/media/x"], "unknown transport 'usb:/media/x'"),
                        (["--agents", "3"], "agents must be between 1 and the number of tasks")):
        out = tmp_path / f"out-{len(extra[1])}"
        res = runner.invoke(app, [*base, "--out", str(out), *extra])
        text = " ".join(res.output.split())
        assert res.exit_code == 2, (extra, res.output)
        assert "cannot run the fleet:" in text and want in text and "Traceback" not in text, (extra, text)
        assert not (out / "work" / "devices").exists(), f"{extra}: no device was started"
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "out-0"), "--agents", "0"])  # was "one per task"
    assert res.exit_code == 2 and "Invalid value for '--agents'" in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out-0" / "work" / "devices").exists()
