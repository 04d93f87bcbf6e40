"""Label equivalence across tasks (paper A.10): strict vs equivalence-aware accuracy.

When two tasks share a concept (clothing's "dress" and fashion-mnist's "dress"), the mapper
may route an image to the sibling task, whose head still names the right thing. Strict
scoring calls that a failure. Equivalence-aware scoring accepts it when the (task, class)
pair the system output is declared equivalent to the true one.

The map is a list of *pairs*, not equivalence classes. It is symmetric but deliberately not
transitive: clothing's "shoes" matches fashion-mnist's sneaker, sandal and ankle-boot, but
that does not make a sneaker a sandal.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

BUILTIN_SKILL_BENCH = Path(__file__).resolve().parent / "equivalence_skill_bench.csv"

Label = tuple[str, str]  # (task, class)


class EquivalenceError(ValueError):
    """A map file that cannot be read."""


@dataclass
class EquivalenceMap:
    pairs: set[tuple[Label, Label]] = field(default_factory=set)
    notes: dict[tuple[Label, Label], str] = field(default_factory=dict)

    def add(self, a: Label, b: Label, note: str = "") -> None:
        self.pairs.add((a, b))
        self.pairs.add((b, a))
        if note:
            self.notes[(a, b)] = note

    def equivalent(self, a: Label, b: Label) -> bool:
        return a == b or (a, b) in self.pairs

    def __len__(self) -> int:
        return len(self.pairs) // 2

    @classmethod
    def load(cls, path: str | Path) -> "EquivalenceMap":
        """CSV with columns task_a,class_a,task_b,class_b[,note], or JSON ``[[task_a, class_a, task_b, class_b], ...]``."""
        path = Path(path)
        m = cls()
        try:
            if path.suffix.lower() == ".json":
                rows = json.loads(path.read_text())
                for r in rows:
                    if isinstance(r, dict):
                        m.add((r["task_a"], r["class_a"]), (r["task_b"], r["class_b"]), r.get("note", ""))
                    else:
                        m.add((str(r[0]), str(r[1])), (str(r[2]), str(r[3])), str(r[4]) if len(r) > 4 else "")
            else:
                with open(path, newline="") as f:
                    for r in csv.DictReader(f):
                        m.add((r["task_a"].strip(), r["class_a"].strip()), (r["task_b"].strip(), r["class_b"].strip()),
                              (r.get("note") or "").strip())
        except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise EquivalenceError(f"cannot read equivalence map {path}: {type(exc).__name__}: {exc}") from exc
        return m

    @classmethod
    def skill_bench(cls) -> "EquivalenceMap":
        """The overlaps shipped for the 21-task skill-bench."""
        return cls.load(BUILTIN_SKILL_BENCH)

    def restricted_to(self, tasks: Sequence[str]) -> "EquivalenceMap":
        keep = set(tasks)
        m = EquivalenceMap()
        for a, b in self.pairs:
            if a[0] in keep and b[0] in keep:
                m.pairs.add((a, b))
        return m

    def correct(self, true_task: str, true_labels: Sequence[str], pred_tasks: Sequence[str | None],
                pred_labels: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """Per-image (strict, equivalence-aware) correctness for one task's test set."""
        strict = np.array([pt == true_task and pl == tl for tl, pt, pl in zip(true_labels, pred_tasks, pred_labels)],
                          dtype=bool)
        aware = np.array([s or (pt is not None and self.equivalent((true_task, tl), (pt, pl)))
                          for s, tl, pt, pl in zip(strict, true_labels, pred_tasks, pred_labels)], dtype=bool)
        return strict, aware
