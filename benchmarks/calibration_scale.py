"""Does the task mapper's calibrated temperature depend on how many tasks the bank holds?

The runtime ships one softmax temperature per mapper (``GmmcMapper.temperature``,
``MahalanobisMapper.temperature``), fitted on the 21 skill-bench tasks (``mapper_peers.py``).  Here
the temperature is refitted, by the same method (likelihood on every other test image of each task,
ECE on the rest), on random banks of T = 5 .. 71 of the 71 tasks (skill-bench + skill-bench-more),
three draws per T, and the ECE of the task confidence at the *shipped* temperature is reported beside it.

    python benchmarks/calibration_scale.py --features FEATURES_DIR FEATURES_DIR_2 --cache CACHE_DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, update_readme, write_result  # noqa: E402
from mapper_peers import calibration  # noqa: E402
from skill_scale import learned, load_tasks, log  # noqa: E402

from skill_edge.runtime.mapping.mapper import build_mapper  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", type=Path, nargs="+", required=True)
    ap.add_argument("--cache", type=Path, required=True, help="skill_scale.py's heads and anchors")
    ap.add_argument("--rom", type=Path, default=Path("models/rom/efficientnet_lite0"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 10, 21, 35, 50, 71])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--test-per-task", type=int, default=100)
    args = ap.parse_args()
    tasks = load_tasks(args.features)
    knowledge = {k.task: k for k in learned(tasks, args.cache, args.rom, ["gmmc", "maha"], newest=True)}
    knowledge = [knowledge[t.name] for t in tasks]
    rng = np.random.default_rng(0)
    rows = []
    for kind in ("gmmc", "maha"):
        for size in [s for s in args.sizes if s <= len(tasks)]:
            for draw in range(args.draws if size < len(tasks) else 1):
                sub = np.sort(rng.choice(len(tasks), size, replace=False))
                mp = build_mapper(kind, [knowledge[i] for i in sub])
                x = np.concatenate([mp.prepare(tasks[i].x_test[:args.test_per_task], tasks[i].s_test[:args.test_per_task])
                                    for i in sub])
                truth = np.concatenate([np.full(min(len(tasks[i].x_test), args.test_per_task), j)
                                        for j, i in enumerate(sub)])
                sel = mp.task_scores(x).astype(np.float64)
                fitted = calibration(sel, truth)
                shipped = calibration(sel / mp.temperature, truth)
                rows.append({"mapper": kind, "tasks": int(size), "draw": draw, "shipped_temperature": mp.temperature,
                             "fitted_temperature": fitted["temperature"], "ece_at_shipped": shipped["ece_before"],
                             "ece_at_fitted": fitted["ece_after"],
                             "omniglot_share": float(np.mean(["omniglot" in tasks[i].name for i in sub]))})
                log(f"{kind} T={size} draw {draw}: fitted {fitted['temperature']:.1f} (shipped {mp.temperature:g}), "
                    f"ECE at shipped {shipped['ece_before']:.3f}, at fitted {fitted['ece_after']:.3f}")
    write_result("calibration_scale", {"tasks": [t.name for t in tasks], "test_per_task": args.test_per_task,
                                       "rows": rows})
    table = []
    for kind in ("gmmc", "maha"):
        for size in sorted({r["tasks"] for r in rows}):
            rs = [r for r in rows if r["mapper"] == kind and r["tasks"] == size]
            table.append([kind, size, f"{rs[0]['shipped_temperature']:g}",
                          " / ".join(f"{r['fitted_temperature']:.0f}" for r in rs),
                          " / ".join(f"{r['ece_at_shipped']:.3f}" for r in rs),
                          " / ".join(f"{r['ece_at_fitted']:.3f}" for r in rs)])
    update_readme("calibration_scale", f"""## Task-confidence temperature against bank size (`calibration_scale.py`)

Random banks of T of the {len(tasks)} tasks, {args.draws} draws per T, first {args.test_per_task} test images per task;
temperature fitted as in `mapper_peers.py`. Command and machine: `results/calibration_scale.json`.

{md_table(["mapper", "T", "shipped", "fitted (per draw)", "ECE at shipped", "ECE at fitted"], table)}
""")


if __name__ == "__main__":
    main()
