"""`skill-edge eval`: accuracy and confusion on one device, end to end on two small generated tasks,
checked against what `learn` and `classify` report for the same images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from skill_edge.cli import app
from test_cli_classify import learned  # noqa: F401  (the module fixture: two tasks learned through the CLI)

runner = CliRunner()


def _args(learned: dict, *data: Path) -> list[str]:
    return ["eval", *[a for d in data for a in ("--data", str(d))], "--home", str(learned["home"]), "--rom",
            str(learned["rom"]), "--no-open-set"]


def test_eval_json_agrees_with_classify_and_learn(learned: dict) -> None:  # noqa: F811
    tasks = learned["tasks"]
    res = runner.invoke(app, [*_args(learned, tasks["digits"], tasks["shapes"]), "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["backend"] == "CPUExecutionProvider" and rep["split"] == "test" and rep["unreadable"] == 0
    from skill_edge.runtime.device import Device

    dev = Device(learned["home"], learned["rom"])
    n_all = right_task_all = right_all = 0
    for t in rep["tasks"]:
        files = sorted((tasks[t["task"]] / "test").glob("*/*.png"))
        assert t["images"] == t["classified"] == len(files)
        preds = dev.classify(files, open_set=False)  # the same images, through the everyday path
        right_task = sum(p.task == t["task"] for p in preds)
        right = sum(p.task == t["task"] and p.label == f.parent.name for p, f in zip(preds, files))
        assert t["task_accuracy"] == round(right_task / len(files), 4)
        assert t["accuracy"] == round(right / len(files), 4)
        # the oracle head on the test split is exactly what learn measured as test_acc
        assert t["oracle_accuracy"] == round(dev.bank.get(t["task"]).meta.metrics["test_acc"], 4)
        counts = np.array(t["confusion"]["counts"])
        assert t["confusion"]["columns"] == [*t["classes"], "other task", "unknown"]
        assert counts.shape == (len(t["classes"]), len(t["classes"]) + 2)
        per_class = [sum(f.parent.name == c for f in files) for c in t["classes"]]
        assert counts.sum(axis=1).tolist() == per_class
        assert np.trace(counts[:, :len(t["classes"])]) == right
        assert counts[:, -2].sum() == len(files) - right_task == sum(t["other_tasks"].values())
        n_all, right_task_all, right_all = n_all + len(files), right_task_all + right_task, right_all + right
    assert rep["images"] == n_all
    assert rep["task_accuracy"] == round(right_task_all / n_all, 4) and rep["accuracy"] == round(right_all / n_all, 4)
    assert rep["task_accuracy"] >= 0.75


def test_eval_prints_readable_tables(learned: dict) -> None:  # noqa: F811
    res = runner.invoke(app, _args(learned, learned["tasks"]["shapes"], learned["tasks"]["digits"]))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "eval, no task oracle (mapper mahalanobis, test split)"  # auto: both anchors stored
    assert lines[1].split() == ["task", "images", "task-ID", "acc", "no-oracle", "acc", "oracle", "acc", "unknown",
                                "unreadable"]
    assert [ln.split()[0] for ln in lines[2:5]] == ["shapes", "digits", "all"]
    assert "shapes: true class (rows) by predicted class (columns)" in lines
    i = lines.index("digits: true class (rows) by predicted class (columns)")
    assert lines[i + 1].split() == ["true", "d0", "d1", "other", "task", "unknown"]
    assert [ln.split()[0] for ln in lines[i + 2:i + 4]] == ["d0", "d1"]
    assert "eval: shapes images 8/8" in res.stderr and "backend: CPUExecutionProvider" in res.stderr


def test_eval_finds_the_task_by_its_classes_and_counts_unreadable_images(learned: dict,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    renamed = tmp_path / "my-shapes"  # not a bank task's name: found by its classes (disc, square)
    shutil.copytree(learned["tasks"]["shapes"], renamed)
    (renamed / "test" / "disc" / "broken.png").write_bytes(b"not a png")
    res = runner.invoke(app, [*_args(learned, renamed), "--json", "--split", "all"])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.stdout)
    assert rep["tasks"][0]["task"] == "shapes" and rep["split"] == "all"
    assert rep["images"] == 33 and rep["unreadable"] == 1 and rep["classified"] == 32
    assert rep["unreadable_files"][0]["path"].endswith("broken.png")


def test_eval_refuses_folders_it_cannot_score(learned: dict, tmp_path: Path) -> None:  # noqa: F811
    other = tmp_path / "fruit"
    for c in ("apple", "pear"):
        (other / "train" / c).mkdir(parents=True)
        shutil.copy(next((learned["tasks"]["shapes"] / "train" / "disc").glob("*.png")), other / "train" / c / "1.png")
        shutil.copy(next((learned["tasks"]["shapes"] / "train" / "disc").glob("*.png")), other / "train" / c / "2.png")
    res = runner.invoke(app, _args(learned, other))
    assert res.exit_code == 2 and "no task 'fruit' in the bank" in " ".join(res.output.split())
    assert "Traceback" not in res.output
    res = runner.invoke(app, [*_args(learned, other), "--task", "shapes"])
    assert res.exit_code == 2 and "apple, pear are not classes of task 'shapes'" in " ".join(res.output.split())
    res = runner.invoke(app, [*_args(learned, tmp_path / "nowhere")])
    assert res.exit_code == 2 and "is not a directory" in " ".join(res.output.split())
    res = runner.invoke(app, [*_args(learned, other), "--split", "half"])
    assert res.exit_code == 2 and "--split must be test or all" in res.output


def test_eval_with_a_mapper_the_task_has_no_anchor_for(learned: dict, tmp_path: Path) -> None:  # noqa: F811
    home = tmp_path / "home"
    shutil.copytree(learned["home"], home)
    res = runner.invoke(app, ["learn", "--task", "shapes", "--data", str(learned["tasks"]["shapes"]), "--home",
                              str(home), "--rom", str(learned["rom"]), "--mapper", "gmmc", "--replace", "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--data", str(learned["tasks"]["shapes"]), "--home", str(home), "--rom",
                              str(learned["rom"]), "--mapper", "mahalanobis"])
    assert res.exit_code == 2
    assert "task 'shapes' has no mahalanobis anchor" in " ".join(res.output.split()) and "--mapper gmmc" in res.output
