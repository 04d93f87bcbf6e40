"""How many simulated devices fit on this machine: a fleet of at least 100 light devices, one process each.

The 21 skill-bench tasks are split by class into shares of ``--classes-per-device`` classes
(a task with fewer classes stays whole), which gives more than 100 distinct tasks, one per
device.  Each device is an ordinary ``runtime.Device`` in its own process with one ONNX Runtime
thread: it opens and verifies the ROM, learns its share from the ROM features that
``extract_features.py`` wrote (a feature-task file), signs and publishes its packet through a real
shared-folder transport, receives every other device's packet, and classifies every share's test
set with no task oracle.  Each device reports its own peak RSS (``getrusage``); the fleet result says
whether the banks converged and whether every device made the same predictions.

At most ``--eval-slots`` devices classify the test sets at the same time (a fleet-wide ``flock``
slot): that step holds every share's test features and both mappers, about 250 MB per device, and
119 devices doing it at once would need more RAM than the machine has.  Each device's own peak
RSS is unchanged by this; only the sum is bounded.  Each device classifies ``--eval-per-task``
test images of every share (the same seeded rows on every device, so agreement is still checked
image by image): at 119 x 119 full test sets the classification alone would take an hour here.  Each bank gets ``--quota-mb`` (119 lossless
packets outgrow the 64 MiB default).

Plausibility checks are off in this run (``--plausibility`` turns them on): today every check
re-maps every reference point of the bank, so a device's student work grows with the square of
the tasks it holds, and 100 devices x 100 packets of it do not fit 2 cores in hours (the student
cost at scale is measured and reduced in the scale issue).  Everything else a device does is the
product path.

    python benchmarks/fleet_density.py --features /work/cache/features [--classes-per-device 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SKILL_BENCH, md_table, task_order, update_readme, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def shares(features: Path, tasks: list[str], per_device: int, rom_fingerprint: str, out: Path) -> dict[str, Path]:
    """Feature-task files, one per share of ``per_device`` classes (a trailing single class joins the last)."""
    from skill_edge.firmware_sim.tasks import feature_task_files

    return feature_task_files([features], tasks, rom_fingerprint, out, classes_per_share=per_device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True, help="DIR/<task>/{train,test}.npz (extract_features.py)")
    ap.add_argument("--data", type=Path, default=SKILL_BENCH, help="only for the task order (tasks.json)")
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    ap.add_argument("--work", type=Path, default=REPO / ".cache/fleet-density")
    ap.add_argument("--classes-per-device", type=int, default=4)
    ap.add_argument("--min-devices", type=int, default=100)
    ap.add_argument("--mappers", nargs="+", default=["gmmc", "maha"])
    ap.add_argument("--plausibility", action="store_true")
    ap.add_argument("--converge-timeout", type=float, default=3600.0)
    ap.add_argument("--eval-slots", type=int, default=8,
                    help="devices classifying the fleet's test sets at once (each holds them all: ~250 MB)")
    ap.add_argument("--eval-per-task", type=int, default=20,
                    help="test images per share each device classifies (the same rows on every device)")
    ap.add_argument("--quota-mb", type=int, default=512,
                    help="each device's bank quota: 119 lossless packets of up to 1 MB each outgrow the 64 MiB default")
    args = ap.parse_args()

    from skill_edge.export.manifest import RomManifest
    from skill_edge.firmware_sim.fleet import FleetConfig, run_fleet

    fingerprint = RomManifest.read(args.rom).fingerprint
    files = shares(args.features, task_order(args.data), args.classes_per_device, fingerprint, args.work / "tasks")
    if len(files) < args.min_devices:
        sys.exit(f"only {len(files)} shares with {args.classes_per_device} classes each; lower --classes-per-device")
    print(f"{len(files)} devices, one share each; mappers {args.mappers}; plausibility {args.plausibility}", flush=True)
    cfg = FleetConfig(rom_dir=args.rom, tasks={k: str(v) for k, v in files.items()}, workdir=args.work / "fleet",
                      threads=1, mappers=tuple(args.mappers), plausibility=args.plausibility,
                      converge_timeout=args.converge_timeout, save_eval_features=False,
                      quota_bytes=args.quota_mb * 2**20, max_concurrent_evaluations=args.eval_slots,
                      eval_max_per_task=args.eval_per_task)
    last = [0.0]

    def progress(stage: str, device: str, done: int, total: int) -> None:
        if time.time() - last[0] > 30:
            last[0] = time.time()
            print(f"[{time.strftime('%H:%M:%S')}] {device} {stage} {done}/{total}", flush=True)

    t0 = time.time()
    result = run_fleet(cfg, progress=progress)
    wall = time.time() - t0
    rss = {n: d["peak_rss_mb"] for n, d in result.bytes.items()}
    payload = {
        "devices": len(result.agents), "converged": result.converged, "devices_agree": result.devices_agree,
        "peak_rss_mb_per_device": round(max(rss.values()), 1),
        "median_peak_rss_mb_per_device": round(statistics.median(rss.values()), 1),
        "sum_peak_rss_gb": round(sum(rss.values()) / 1024, 2),
        "tasks": len(result.tasks), "classes_per_device": args.classes_per_device, "threads_per_device": 1,
        "plausibility": args.plausibility, "mappers": list(result.mappers), "engine": result.engine,
        "bank_quota_mb": args.quota_mb, "concurrent_evaluations": args.eval_slots,
        "eval_images_per_task": args.eval_per_task, "bank_mb_per_device": round(max(d["bank_bytes"] for d in result.bytes.values()) / 2**20, 1),
        "transport": "dir (shared folder)", "wall_s": round(wall, 1),
        "mean_no_oracle_acc": result.mean_no_oracle_acc, "mean_task_id_acc": result.mean_task_id_acc,
        "mean_oracle_acc": result.mean_oracle_acc, "problems": result.problems[:20],
        "quarantined": sum(len(v) for v in result.quarantined.values()),
        "peak_rss_mb_by_device": rss,
    }
    path = write_result("fleet_density", payload)
    print(json.dumps({k: v for k, v in payload.items() if k != "peak_rss_mb_by_device"}, indent=1))
    rows = [[k, payload[k]] for k in ("devices", "converged", "devices_agree", "peak_rss_mb_per_device",
                                      "median_peak_rss_mb_per_device", "sum_peak_rss_gb", "wall_s", "plausibility")]
    rows += [[f"no-oracle accuracy ({mp})", f"{v:.3f}"] for mp, v in result.mean_no_oracle_acc.items()]
    rows += [["oracle accuracy", f"{result.mean_oracle_acc:.3f}"]]
    update_readme("fleet_density", f"""## Fleet density: {payload['devices']} light devices on one machine (`fleet_density.py`)

The 21 skill-bench tasks split into shares of {args.classes_per_device} classes, one share per device, one process and one
ONNX Runtime thread per device, a shared-folder transport. Each device opens the ROM, learns its share from
ROM features, publishes its signed packet, receives all the others and classifies every share's test set with
no task oracle. Peak RSS is each device process's own `getrusage` maximum. Plausibility checks are
{'on' if args.plausibility else 'off (their cost grows with the square of the bank; see the script docstring)'}.

{md_table(["", "value"], rows)}

Machine and command: `results/fleet_density.json`.
""")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
