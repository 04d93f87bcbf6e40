"""``skill-edge eval``: how well this one device classifies a labelled folder, with no task oracle.

The device sees each image as ``classify`` does: the mapper picks a task from everything in the
bank, then that task's head picks a class.  Because the folder says which task and class each
image belongs to, three numbers come out per task and overall:

- task-ID accuracy: the mapper chose the true task (``unknown`` counts as wrong);
- no-oracle accuracy: the true task *and* the true class, which is what a user gets;
- oracle accuracy: the true task's head alone, as if the task were known (the paper's upper bound);

and a confusion matrix per task: true class against predicted class, with the images routed to
another task or answered ``unknown`` in their own columns.  ``--json`` gives all of it as data.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer

from skill_edge.runtime.cli.main import (
    CLASSIFY_CHUNK,
    EXIT_INPUT_FAILED,
    EXIT_USAGE,
    HomeOption,
    MapperOption,
    NoOpenSetOption,
    ProviderOption,
    RomOption,
    check_mapper,
    open_device,
)
from skill_edge.runtime.cli.output import StageProgress, console, out, print_json, print_table, say_error

OTHER_TASK = "other task"
UNKNOWN = "unknown"


class EvalError(ValueError):
    """A folder that cannot be evaluated on this device (no such task in the bank, classes it lacks)."""


@dataclass
class TaskEval:
    """One labelled folder's results; ``confusion`` is [classes, classes + 2] (+ other task, unknown)."""

    task: str
    data: str
    classes: list[str]
    images: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    task_correct: int = 0
    correct: int = 0
    oracle_correct: int = 0
    unknown: int = 0
    confusion: np.ndarray | None = None
    routed_to: Counter = field(default_factory=Counter)  # every answer: the task chosen, or unknown
    other_tasks: Counter = field(default_factory=Counter)  # the wrong tasks among them

    @property
    def classified(self) -> int:
        return self.images - len(self.unreadable)

    def rates(self) -> dict[str, float | None]:
        n = self.classified
        return {name: (round(v / n, 4) if n else None) for name, v in
                (("task_accuracy", self.task_correct), ("accuracy", self.correct),
                 ("oracle_accuracy", self.oracle_correct))}

    def to_dict(self) -> dict:
        return {"task": self.task, "data": self.data, "classes": self.classes, "images": self.images,
                "classified": self.classified, "unreadable": len(self.unreadable), **self.rates(),
                "unknown": self.unknown,
                "confusion": {"rows": self.classes, "columns": [*self.classes, OTHER_TASK, UNKNOWN],
                              "counts": self.confusion.tolist()},
                "routed_to": dict(sorted(self.routed_to.items())),
                "other_tasks": dict(sorted(self.other_tasks.items()))}


def _total(results: list[TaskEval]) -> TaskEval:
    all_ = TaskEval("all", "", [], confusion=np.zeros((0, 2), np.int64))
    for r in results:
        all_.images += r.images
        all_.unreadable += r.unreadable
        all_.task_correct += r.task_correct
        all_.correct += r.correct
        all_.oracle_correct += r.oracle_correct
        all_.unknown += r.unknown
    return all_


def _bank_task(dev, data: Path, classes: list[str], task: str | None):
    """The bank's ``TaskKnowledge`` a folder is labelled for: ``--task``, else the folder's name, else
    the one task with exactly the folder's classes.  Same-name tasks from several agents: the own one."""
    known = dev.knowledge()
    if task is not None:
        cands = [k for k in known if k.task == task]
    else:
        cands = [k for k in known if k.task == data.name] or [k for k in known if sorted(k.labels) == classes]
    if not cands:
        names = ", ".join(sorted({k.task for k in known})) or "none"
        raise EvalError(f"{data}: no task {task or data.name!r} in the bank (it holds: {names}); "
                        "name the task with --task")
    own = [k for k in cands if k.meta.agent_id == dev.agent_id]
    if len(cands) > 1 and len(own) != 1 and len({k.task for k in cands}) > 1:
        raise EvalError(f"{data}: its classes fit several tasks ({', '.join(k.task for k in cands)}); "
                        "name one with --task")
    k = own[0] if len(own) == 1 else cands[0]
    missing = [c for c in classes if c not in k.labels]
    if missing:
        raise EvalError(f"{data}: class folder(s) {', '.join(missing)} are not classes of task {k.task!r} "
                        f"(its classes: {', '.join(k.labels)})")
    return k


def evaluate_folder(dev, data: Path, *, task: str | None, split: str, mapper: str, open_set: bool, seed: int,
                    progress: StageProgress) -> TaskEval:
    """Classify one labelled folder with no task oracle and count what came out (see the module docstring)."""
    from skill_edge.runtime.sources.datasets import load_image_folder

    ds = load_image_folder(data, seed=seed)
    k = _bank_task(dev, data, ds.classes, task)
    from skill_edge.runtime.device import MAPPER_NAMES

    kind = dev.resolve_mapper(mapper)
    if getattr(k, kind) is None:  # the mapper could never pick it: every image would count as a miss
        other = next(n for c, n in MAPPER_NAMES.items() if c != kind)
        raise EvalError(f"task {k.task!r} has no {MAPPER_NAMES[kind]} anchor, so this mapper never picks it; "
                        f"use --mapper {other}")
    parts = [ds.test] if split == "test" else [ds.train, ds.val, ds.test]
    paths = [p for s in parts for p in s.paths]
    truth = np.array([k.labels.index(ds.classes[y]) for s in parts for y in s.labels], np.int64)
    c = len(k.labels)
    res = TaskEval(k.task, str(data), list(k.labels), images=len(paths), confusion=np.zeros((c, c + 2), np.int64))
    stage = f"{k.task} images"
    for start in range(0, len(paths), CLASSIFY_CHUNK):
        progress.update(stage, start, len(paths))
        chunk = paths[start:start + CLASSIFY_CHUNK]
        batch, failed, index = dev.featurize(chunk, keep_images=dev.reruns_full_graph(mapper, k))
        res.unreadable += [(str(chunk[i]), why) for i, why in failed]
        if not len(index):
            continue
        r = dev.classify_features(batch, mapper=mapper, open_set=open_set)
        y = truth[start + np.asarray(index)]
        feats = batch.features if k.bb is None else dev.bb_features(k, batch.trunk_acts, batch.images)
        oracle = (feats @ k.head_weight.T + k.head_bias).argmax(1)
        res.oracle_correct += int((oracle == y).sum())
        agents = r.get("task_agents")  # a task is its name and its origin agent (runtime.knowledge.identity)
        shown = r.get("task_labels") or r["task_names"]
        for row, true in enumerate(y):
            t = int(r["task_index"][row])
            pred = int(r["class_index"][row])
            if r["unknown"][row]:
                res.unknown += 1
                res.routed_to[UNKNOWN] += 1
                res.confusion[true, c + 1] += 1
            elif r["task_names"][t] == k.task and (agents is None or agents[t] == k.meta.agent_id):
                res.task_correct += 1
                res.correct += int(pred == true)
                res.routed_to[shown[t]] += 1
                res.confusion[true, pred] += 1
            else:
                res.routed_to[shown[t]] += 1
                res.other_tasks[shown[t]] += 1
                res.confusion[true, c] += 1
    progress.update(stage, len(paths), len(paths))
    return res


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def eval_command(
    data: List[Path] = typer.Option(..., "--data", "-d",
                                    help="Labelled ImageFolder DIR/{train,val,test}/<class>/* of a task in the bank "
                                         "(repeatable: one folder per task)."),
    task: Optional[str] = typer.Option(None, "--task", "-t",
                                       help="The bank task the folder is labelled for (default: the folder's name, "
                                            "else the one task with the folder's classes). One --data only."),
    split: str = typer.Option("test", "--split",
                              help="test: the folder's test split (or the same seeded hold-out learn used when it "
                                   "has none); all: every image."),
    mapper: str = MapperOption,
    no_open_set: bool = NoOpenSetOption,
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the hold-out split (as given to learn)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results (and the confusion matrices) as JSON."),
    home: Optional[Path] = HomeOption,
    rom: Optional[Path] = RomOption,
    provider: Optional[List[str]] = ProviderOption,
) -> None:
    """Accuracy and confusion of this device on labelled folders, with no task oracle.

    Exit codes:
    0 every image classified;
    1 some images unreadable (the rest are evaluated and printed);
    2 a bad option, no ROM, a folder that is no task of the bank, or an empty bank.
    """
    from skill_edge.runtime.sources.datasets import DatasetError
    from skill_edge.runtime.device import LearnError

    check_mapper(mapper)
    if split not in ("test", "all"):
        say_error(f"--split must be test or all, not {split!r}")
        raise typer.Exit(EXIT_USAGE)
    if task is not None and len(data) > 1:
        console.print("[red]--task names the task of a single --data folder[/red]")
        raise typer.Exit(EXIT_USAGE)
    dev = open_device(home, rom, provider)
    try:
        with StageProgress("eval") as prog:
            results = [evaluate_folder(dev, Path(d), task=task, split=split, mapper=mapper,
                                       open_set=not no_open_set, seed=seed, progress=prog) for d in data]
    except (DatasetError, EvalError, LearnError) as exc:
        say_error("cannot evaluate:", exc)
        raise typer.Exit(EXIT_USAGE) from None
    total = _total(results)
    from skill_edge.runtime.device import MAPPER_NAMES

    mapper = MAPPER_NAMES[dev.resolve_mapper(mapper)]  # what ``auto`` chose
    report = {"backend": dev.engine.backend, "mapper": mapper, "open_set": not no_open_set, "split": split,
              "images": total.images, "classified": total.classified, "unreadable": len(total.unreadable),
              **total.rates(), "unknown": total.unknown, "tasks": [r.to_dict() for r in results],
              "unreadable_files": [{"path": p, "error": why} for p, why in total.unreadable]}
    if as_json:
        print_json(report)
    else:
        _print_report(results, total, mapper, split)
    if total.unreadable:
        console.print(f"[yellow]{len(total.unreadable)} image(s) could not be read[/yellow]")
        raise typer.Exit(EXIT_INPUT_FAILED)


def _print_report(results: list[TaskEval], total: TaskEval, mapper: str, split: str) -> None:
    rows = []
    for r in [*results, total] if len(results) > 1 else results:
        rates = r.rates()
        rows.append([r.task, str(r.classified), _pct(rates["task_accuracy"]), _pct(rates["accuracy"]),
                     _pct(rates["oracle_accuracy"]), str(r.unknown), str(len(r.unreadable))])
    print_table(f"eval, no task oracle (mapper {mapper}, {split} split)",
                ("task", "images", "task-ID acc", "no-oracle acc", "oracle acc", "unknown", "unreadable"), rows)
    for r in results:
        cols = [*r.classes, OTHER_TASK, UNKNOWN]
        print_table(f"{r.task}: true class (rows) by predicted class (columns)", ("true", *cols),
                    [[cls, *map(str, r.confusion[i])] for i, cls in enumerate(r.classes)])
        if r.other_tasks:
            out.print(f"{r.task}: routed to other tasks: "
                      + ", ".join(f"{t} {n}" for t, n in sorted(r.other_tasks.items())),
                      markup=False, highlight=False, soft_wrap=True)
