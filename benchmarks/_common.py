"""Shared bits of the benchmark scripts: machine description, result files, README sections."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from skill_edge.runtime.machine import describe_machine, portable_command

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent / "README.md"
SKILL_BENCH = Path(os.environ.get("SKILL_BENCH", Path(__file__).resolve().parents[2] / "shared/data/skill-bench"))


def task_order(root: Path) -> list[str]:
    """The benchmark's tasks in ``tasks.json`` order (its README documents them), else sorted folders."""
    meta = root / "tasks.json"
    if meta.exists():
        return [t["task"] for t in json.loads(meta.read_text())]
    return sorted(p.name for p in root.iterdir() if (p / "train").is_dir())


def machine() -> dict:
    return describe_machine()


def command() -> str:
    """How this benchmark was started, from the repo root, with no path of this machine in it."""
    return "python " + portable_command(sys.argv)


def write_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
               "command": command(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    return path


def update_readme(name: str, markdown: str) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{start}\n{markdown.strip()}\n{end}"
    if start in text and end in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    README.write_text(text)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


FEATURES_ROM = "rom.json"
"""Written by ``extract_features.py`` in each feature root: the backbone and fingerprint of the ROM
that made its features (Lite0 and Lite2 features are both 1,280 wide, so the width cannot tell)."""


def features_rom(roots: list[Path]) -> dict | None:
    """The ROM that every feature root records (``None`` for roots extracted before the record existed).
    Roots from two different ROMs cannot be mixed in one run."""
    seen = {}
    for root in roots:
        path = Path(root) / FEATURES_ROM
        if path.exists():
            rec = json.loads(path.read_text())
            seen[str(root)] = {"backbone": rec["backbone"], "fingerprint": rec["fingerprint"]}
    if len({r["fingerprint"] for r in seen.values()}) > 1:
        raise SystemExit("feature roots from different ROMs cannot be mixed: "
                         + "; ".join(f"{k}: {v['backbone']} ({v['fingerprint'][:12]})" for k, v in seen.items()))
    missing = [str(r) for r in roots if str(r) not in seen]
    if seen and missing:
        raise SystemExit(f"feature roots {missing} record no ROM ({FEATURES_ROM}) while others do; "
                         "re-extract them with benchmarks/extract_features.py")
    return next(iter(seen.values()), None)


def check_same_rom(recorded: dict | None, rom: dict, what: str) -> None:
    """Refuse a run whose features (or cached heads) came from another ROM than ``--rom``, with both named."""
    def named(r: dict) -> str:
        return f"ROM {r['fingerprint'][:12]}" + (f" ({r['backbone']})" if r.get("backbone") else "")

    if recorded is not None and recorded["fingerprint"] != rom["fingerprint"]:
        raise SystemExit(f"{what} came from {named(recorded)}, but --rom is {named(rom)}: pass the ROM that made them")


def teacher_calibrations(tasks: list, knowledge: list) -> list:
    """Each task's ``ThresholdCalibration``, as its teacher held it when it encoded its packet.

    The calibration is never stored with a record, so a benchmark that reads cached records fits
    the Mahalanobis anchor again from the same features (``fit_task_anchors`` is deterministic) and
    refuses a record that anchor does not reproduce (it was learned by other code).  ``tasks`` have
    ``name``, ``x_train``, ``y_train`` and ``s_train``; records without a Mahalanobis anchor get None."""
    import numpy as np

    from skill_edge.runtime.mapping.anchors import fit_task_anchors

    out = []
    for t, k in zip(tasks, knowledge):
        if k.maha is None:
            out.append(None)
            continue
        again = fit_task_anchors(t.x_train, t.y_train, trunk_stats=t.s_train, transform=k.meta.feature_transform,
                                 kinds=("maha",))
        if not (np.array_equal(again.maha.class_means, k.maha.class_means)
                and np.array_equal(again.maha.exemplars, k.maha.exemplars)
                and again.thresholds["maha"] == k.thresholds["maha"]):
            raise SystemExit(f"the cached record of {t.name!r} is not what fit_task_anchors gives today: "
                             "relearn it (delete its cache entry) before measuring its calibrated thresholds")
        out.append(again.calibration)
    return out
