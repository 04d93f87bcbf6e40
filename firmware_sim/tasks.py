"""Where a fleet's tasks come from: one or several task roots, in a fixed order, as images or cached features.

A *task root* is a folder of task folders laid out as ``<task>/{train,test}/<class>/*`` (skill-bench,
skill-bench-more).  ``discover_tasks([root, ...])`` lists them in one fixed order: root by root, as
given, and inside a root in its ``tasks.json`` order (else sorted folder names).  A task name that
two roots share is refused: a fleet identifies tasks by name.

A *feature root* holds what ``benchmarks/extract_features.py`` wrote for a task root:
``<task>/{train,test}.npz`` with ``features``, ``labels``, ``classes`` and ``trunk_stats``.
``feature_task_files`` turns them into the fleet's feature-task files (``agent.FeatureTask``),
one per task, so a run of 71 devices does not push 100,000 images through the ROM again.
``task_shares`` splits a task by class (the density benchmark's shares) on the way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np


class TaskRootError(ValueError):
    """Task or feature roots that cannot make a fleet; the message says what is wrong."""


@dataclass(frozen=True)
class RootTask:
    name: str
    root: Path  # the task root it came from
    path: Path  # <root>/<name>


def root_order(root: Path) -> list[str]:
    """The tasks of one root in its ``tasks.json`` order, else its sorted task folders."""
    meta = root / "tasks.json"
    if meta.exists():
        return [t["task"] for t in json.loads(meta.read_text())]
    if not root.is_dir():
        raise TaskRootError(f"{root} is not a folder of task folders")
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir())


def discover_tasks(roots: Sequence[str | Path]) -> list[RootTask]:
    """Every task of every root, root by root, in a fixed order; refuses a name two roots share."""
    out: list[RootTask] = []
    seen: dict[str, Path] = {}
    for r in roots:
        root = Path(r).expanduser()
        names = root_order(root)
        if not names:
            raise TaskRootError(f"{root} holds no task folders laid out as <task>/train/<class>/*")
        for name in names:
            if name in seen:
                raise TaskRootError(f"task {name!r} is in both {seen[name]} and {root}; a fleet names tasks "
                                    f"uniquely (drop one root or rename the folder)")
            seen[name] = root
            out.append(RootTask(name, root, root / name))
    return out


def find_features(feature_roots: Sequence[str | Path], name: str) -> Path:
    """The feature folder ``<root>/<name>`` (with train.npz and test.npz) of the first root that has it."""
    for r in feature_roots:
        d = Path(r).expanduser() / name
        if (d / "train.npz").is_file() and (d / "test.npz").is_file():
            return d
    raise TaskRootError(f"no cached features for task {name!r} under {[str(r) for r in feature_roots]} "
                        f"(expected <root>/{name}/train.npz and test.npz: run benchmarks/extract_features.py)")


def task_shares(classes: Sequence[str], per_share: int | None) -> list[list[int]]:
    """Class indices split into shares of ``per_share`` (a trailing single class joins the last share)."""
    n = len(classes)
    if not per_share or per_share >= n:
        return [list(range(n))]
    groups = [list(range(i, min(i + per_share, n))) for i in range(0, n, per_share)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        groups[-2] += groups.pop()
    return groups


def feature_task_files(feature_roots: Sequence[str | Path], names: Sequence[str], rom_fingerprint: str,
                       out: str | Path, *, classes_per_share: int | None = None) -> dict[str, Path]:
    """Feature-task files under ``out`` for ``names`` (in that order), from the cached npz features.

    A file that exists already is reused (a resumed run rebuilds nothing).  With ``classes_per_share``
    a task of more classes becomes shares ``<task>-partNN``."""
    from .agent import FeatureTask, save_feature_task

    out = Path(out)
    files: dict[str, Path] = {}
    for task in names:
        d = find_features(feature_roots, task)
        tr, te = np.load(d / "train.npz"), np.load(d / "test.npz")
        classes = [str(c) for c in tr["classes"]]
        shares = task_shares(classes, classes_per_share)
        for g, group in enumerate(shares):
            name = task if len(shares) == 1 else f"{task}-part{g + 1:02d}"
            path = out / f"{name}.safetensors"
            if path.exists():
                files[name] = path
                continue
            remap = np.full(len(classes), -1, np.int64)
            remap[group] = np.arange(len(group))
            a, b = np.isin(tr["labels"], group), np.isin(te["labels"], group)
            ft = FeatureTask([classes[c] for c in group], tr["features"][a], remap[tr["labels"][a]],
                             te["features"][b], remap[te["labels"][b]], rom_fingerprint,
                             tr["trunk_stats"][a], te["trunk_stats"][b])
            files[name] = save_feature_task(path, ft)
    return files


def family(name: str) -> str:
    """A task's family for plots: the name up to its first '-' (``omniglot-greek`` -> ``omniglot``)."""
    return name.split("-", 1)[0]


__all__ = ["RootTask", "TaskRootError", "discover_tasks", "family", "feature_task_files", "find_features",
           "root_order", "task_shares"]
