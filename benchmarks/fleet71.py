"""SKILL at scale: one device per task over several task roots (skill-bench + skill-bench-more: 71 tasks).

Every device is an ordinary ``runtime.Device`` in its own process (one ONNX Runtime thread) that opens
and verifies the ROM, learns its one task from the ROM features that ``extract_features.py`` cached
(a feature-task file), signs and publishes its packet through a shared-folder transport, takes in
every other device's packet and classifies every task's test images with no task oracle, with every
mapper of ``metrics.MAPPERS``.  The tasks run in one fixed order: root by root as given, each root in
its ``tasks.json`` order; the report lists it.

Packets: ``--anchor-budget KIND=SIZE`` caps each mapper's single-anchor packet (head + that anchor),
which is what the Fig. 9 row of that mapper counts; the lab packet, which carries every anchor so that
one run measures every mapper, is encoded at the one codec step that keeps each under its cap.

Stages (``--stage``), each resumable:

* ``baselines``: naive, EWC, ER (10/class, 10k), DER++ on the same features and test rows, class-
  incremental, no task oracle; cached in ``WORK/baselines.json`` (they do not depend on the fleet);
* ``fleet``: the devices.  After an interruption, ``--stage fleet`` (or ``all``) again resumes in the same
  workdir: a device that finished is not run again, the others recover their task from their bank
  (not learned again) and the packets from the transport folder;
* ``report``: curves over ``--orders`` task orders, fits, plots, Fig. 9, ``results/fleet71.json`` and
  ``results/fleet71/report.md``; rerunnable from ``WORK/fleet_result.json`` alone.

    python benchmarks/fleet71.py --data DATA_DIR/skill-bench DATA_DIR/skill-bench-more \\
        --features FEATURES_DIR FEATURES_MORE_DIR [--subset 8] [--stage all]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, md_table, update_readme  # noqa: E402
from skill_edge.runtime.machine import portable_command  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASELINE_ORDER = ("naive", "ewc", "er_10pc", "er_10k", "derpp")


def parse_budgets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        kind, sep, size = item.partition("=")
        if not sep:
            raise SystemExit(f"--anchor-budget takes KIND=SIZE (e.g. gmmc=48KB), got {item!r}")
        out[kind] = size
    return out


def choose_tasks(roots: list[Path], subset: int | None):
    """Every task of every root in the fixed order, or ``subset`` of them taken evenly from each root."""
    from skill_edge.firmware_sim.tasks import discover_tasks

    tasks = discover_tasks(roots)
    if not subset:
        return tasks
    per_root = {r: [t for t in tasks if t.root == Path(r).expanduser()] for r in roots}
    share = -(-subset // len(roots))
    picked = {t.name for ts in per_root.values() for t in ts[:share]}
    return [t for t in tasks if t.name in picked][:subset]


def scrub(text: str, places: dict[str, str]) -> str:
    """This machine's paths replaced by placeholders (longest first), for committed files."""
    for path, name in sorted(places.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(path, name)
    return text


def task_features(files: dict[str, Path]):
    from skill_edge.firmware_sim.agent import load_feature_task
    from skill_edge.firmware_sim.report import TaskFeatures

    out = []
    for name, path in files.items():
        ft = load_feature_task(path)
        out.append(TaskFeatures(name, list(ft.classes), ft.train_features, ft.train_labels, ft.test_features,
                                ft.test_labels, ft.test_trunk_stats))
    return out


def subsample_train(feats, per_task: int, seed: int = 0):
    """The same seeded sample of at most ``per_task`` training rows of every task (all of a smaller one)."""
    import numpy as np

    from skill_edge.firmware_sim.report import TaskFeatures

    out = []
    for i, f in enumerate(feats):
        keep = np.sort(np.random.default_rng(seed + i).permutation(len(f.train_y))[:per_task])
        out.append(TaskFeatures(f.name, f.classes, f.train_x[keep], f.train_y[keep], f.test_x, f.test_y,
                                f.test_trunk_stats))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="task roots, in order (their tasks.json)")
    ap.add_argument("--features", type=Path, nargs="+", required=True,
                    help="feature roots <root>/<task>/{train,test}.npz (extract_features.py), searched in order")
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    ap.add_argument("--work", type=Path, default=REPO / ".cache/fleet71")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet71")
    ap.add_argument("--name", default="fleet71", help="result file stem: results/<name>.json")
    ap.add_argument("--subset", type=int, default=None, help="only this many tasks, taken evenly from the roots")
    ap.add_argument("--stage", choices=("baselines", "fleet", "report", "all"), default="all")
    ap.add_argument("--anchor-budget", nargs="*", default=["gmmc=48KB", "maha=192KB"],
                    help="KIND=SIZE: cap of each mapper's single-anchor packet")
    ap.add_argument("--plausibility", action="store_true", help="receivers check every packet's plausibility")
    ap.add_argument("--eval-per-task", type=int, default=50,
                    help="test images of every task each device classifies (the same seeded rows on every device)")
    ap.add_argument("--curve-per-task", type=int, default=60,
                    help="test images per task the curves and baselines score (the same seeded rows)")
    ap.add_argument("--orders", type=int, default=10, help="task orders of the degradation study")
    ap.add_argument("--slow-order-seconds", type=float, default=480.0,
                    help="a mapper rebuilt at every step (Mahalanobis) starts no further order after this long")
    ap.add_argument("--eval-slots", type=int, default=4)
    ap.add_argument("--learn-slots", type=int, default=8,
                    help="devices learning at once (a 2,560-image task peaks at ~370 MB; 71 at once outgrow the RAM)")
    ap.add_argument("--quota-mb", type=int, default=512)
    ap.add_argument("--converge-timeout", type=float, default=5400.0)
    ap.add_argument("--baseline-epochs", type=int, default=5)
    ap.add_argument("--baseline-train-per-task", type=int, default=0,
                    help="a seeded sample of at most this many training images per task for the baselines (default "
                         "0: every image; on features the five baselines take about 4 minutes on 2 cores at 71 tasks)")
    ap.add_argument("--baselines", nargs="*", default=list(BASELINE_ORDER))
    ap.add_argument("--fresh", action="store_true", help="delete WORK's fleet first instead of resuming it")
    args = ap.parse_args()

    from skill_edge.export.manifest import RomManifest
    from skill_edge.firmware_sim.equivalence import EquivalenceMap
    from skill_edge.firmware_sim.fleet import FleetConfig, FleetResult, run_fleet
    from skill_edge.firmware_sim.metrics import MAPPERS
    from skill_edge.firmware_sim.report import build_report, run_baselines, subsample_tests
    from skill_edge.firmware_sim.tasks import feature_task_files

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tasks = choose_tasks(args.data, args.subset)
    names = [t.name for t in tasks]
    fingerprint = RomManifest.read(args.rom).fingerprint
    files = feature_task_files(args.features, names, fingerprint, work / "tasks")
    print(f"{len(names)} tasks from {len(args.data)} roots; first {names[:3]}, last {names[-3:]}", flush=True)
    budgets = parse_budgets(args.anchor_budget)
    stamp = lambda: time.strftime("%H:%M:%S")  # noqa: E731

    # ------------------------------------------------------------------ baselines (independent of the fleet)
    base_path = work / "baselines.json"
    base_key = {"tasks": names, "epochs": args.baseline_epochs, "per_task": args.curve_per_task,
                "names": args.baselines, "train_per_task": args.baseline_train_per_task}
    baselines = None
    if base_path.exists():
        cached = json.loads(base_path.read_text())
        if cached.get("key") == base_key:
            baselines = cached["results"]
    if args.stage in ("baselines", "all") and baselines is None:
        feats = subsample_tests(task_features(files), args.curve_per_task)
        if args.baseline_train_per_task:
            feats = subsample_train(feats, args.baseline_train_per_task)
        macs = int(RomManifest.read(args.rom).macs_per_image["full"])
        baselines = {}
        for b in args.baselines:
            print(f"[{stamp()}] baseline {b} on {len(names)} tasks", flush=True)
            baselines.update(run_baselines(feats, macs, names=[b], epochs=args.baseline_epochs))
            print(f"[{stamp()}]   final mean acc {baselines[b]['final_mean_acc']:.4f}, {baselines[b]['wall_s']:.0f} s",
                  flush=True)
        base_path.write_text(json.dumps({"key": base_key, "results": baselines}))

    # ------------------------------------------------------------------ the fleet
    fleet_dir = work / "fleet"
    result_path = work / "fleet_result.json"
    result = None
    if args.stage in ("fleet", "all"):
        if args.fresh and fleet_dir.exists():
            shutil.rmtree(fleet_dir)
            result_path.unlink(missing_ok=True)
        if result_path.exists():
            result = FleetResult.load(result_path)
            print(f"the fleet finished already ({result_path}); rerun the report with --stage report", flush=True)
        else:
            cfg = FleetConfig(rom_dir=args.rom, tasks={k: str(v) for k, v in files.items()}, workdir=fleet_dir,
                              threads=1, mappers=MAPPERS, anchor_budgets=budgets, plausibility=args.plausibility,
                              converge_timeout=args.converge_timeout, save_eval_features=False,
                              quota_bytes=args.quota_mb * 2**20, max_concurrent_evaluations=args.eval_slots,
                              eval_max_per_task=args.eval_per_task, max_concurrent_learning=args.learn_slots,
                              resume=(fleet_dir / "devices").exists())
            last = [0.0]
            counts: dict[str, int] = {}

            def progress(stage: str, device: str, done: int, total: int) -> None:
                if done == total and stage in ("learn", "receive", "evaluate", "done"):
                    counts[stage] = counts.get(stage, 0) + 1
                if time.time() - last[0] > 60:
                    last[0] = time.time()
                    print(f"[{stamp()}] finished: {counts}; last event {device} {stage} {done}/{total}", flush=True)

            print(f"[{stamp()}] fleet of {len(names)} devices ({'resuming' if cfg.resume else 'fresh'}), "
                  f"mappers {list(MAPPERS)}, budgets {budgets}, plausibility {args.plausibility}", flush=True)
            result = run_fleet(cfg, progress=progress)
            result.save(result_path)
            print(f"[{stamp()}] fleet done: converged {result.converged}, agree {result.devices_agree}, "
                  f"{result.wall['fleet_end_to_end_s']:.0f} s", flush=True)
    if args.stage in ("report", "all"):
        if result is None:
            if not result_path.exists():
                raise SystemExit(f"no fleet result at {result_path}: run --stage fleet first")
            result = FleetResult.load(result_path)
        report(args, result, baselines, budgets, tasks, work, EquivalenceMap, build_report)


def report(args, result, baselines, budgets, tasks, work: Path, EquivalenceMap, build_report) -> None:
    from skill_edge.firmware_sim.report import MAPPER_LABELS

    out = args.out.resolve()
    if out.exists():
        shutil.rmtree(out)
    roots = {t.name: t.root.name for t in tasks}
    places = {str(REPO) + "/": "", str(REPO): ".", str(work): "WORKDIR", str(args.rom.resolve()): "ROM_DIR"}
    results_dir = out.parent if out.parent.name == "results" else None
    if results_dir is not None:  # e.g. a run from a snapshot of the tree, writing into the checkout's results
        places[str(out)] = f"benchmarks/results/{out.name}"
    for i, r in enumerate(args.data):
        places[str(r.resolve())] = f"DATA_DIR/{r.resolve().name}"
    for i, r in enumerate(args.features):
        places[str(r.resolve())] = "FEATURES_DIR" if i == 0 else f"FEATURES_DIR_{i + 1}"
    cmd = "python " + portable_command(sys.argv)
    budget_text = ", ".join(f"{MAPPER_LABELS[k]} packet (head + its anchor) <= {v}" for k, v in budgets.items())
    budget_text += "; the lab packet carries every anchor at the one codec step that keeps each under its cap"
    eq = EquivalenceMap.skill_bench().restricted_to(result.tasks)
    t0 = time.time()
    rep = build_report(result, out, baselines=baselines is not None, baseline_results=baselines, equivalence=eq,
                       title=f"SKILL at scale: {len(result.agents)} devices, {len(result.tasks)} tasks "
                             f"({' + '.join(r.resolve().name for r in args.data)})",
                       orders=args.orders, curve_max_per_task=args.curve_per_task,
                       slow_order_seconds=args.slow_order_seconds,
                       progress=lambda s: print(f"[{time.strftime('%H:%M:%S')}] report: {s}", flush=True),
                       extra={"command": scrub(cmd, places), "task_roots": [f"DATA_DIR/{r.resolve().name}"
                                                                              for r in args.data],
                              "task_roots_by_task": roots, "packet_budget": budget_text,
                              "anchor_budgets": budgets, "plausibility": args.plausibility,
                              "baseline_train_per_task": args.baseline_train_per_task or None,
                              "eval_images_per_task": args.eval_per_task,
                              "concurrent_evaluations": args.eval_slots, "concurrent_learning": args.learn_slots,
                              "threads_per_device": 1,
                              "peak_rss_mb_per_device": max(d["peak_rss_mb"] for d in result.bytes.values()),
                              "fleet_wall_s": result.wall["fleet_end_to_end_s"]})
    print(f"report built in {time.time() - t0:.0f} s", flush=True)
    fleet_json = out / "fleet.json"
    target = out.parent / f"{args.name}.json"
    target.write_text(scrub(fleet_json.read_text(), places))
    fleet_json.unlink()
    md = out / "report.md"
    md.write_text(scrub(md.read_text(), places))
    if results_dir is not None:  # a trial run elsewhere leaves the README alone
        import _common

        _common.README = results_dir.parent / "README.md"
        readme(args, rep.summary, target)
    print(f"wrote {target} and {md}", flush=True)


def readme(args, s: dict, target: Path) -> None:
    from skill_edge.firmware_sim.report import BASELINE_LABELS, MAPPER_LABELS
    from skill_edge.firmware_sim.curves import fit_label

    rows = [["devices / tasks", f"{s['agents']} / {s['tasks']}"],
            ["converged, devices agree", f"{s['converged']}, {s['devices_agree']}"],
            ["fleet wall clock", f"{s['fleet_wall_s'] / 60:.1f} min (one machine, 2 cores)"],
            ["peak RSS per device", f"{s['peak_rss_mb_per_device']:.0f} MB"],
            ["packet budget", s["packet_budget"]]]
    for mp, d in s.get("packet_bytes_by_mapper", {}).items():
        rows.append([f"{MAPPER_LABELS.get(mp, mp)} packet bytes, mean / max", f"{d['mean']:,.0f} / {d['max']:,.0f}"])
    for mp, v in s["speedup_xN_by_mapper"].items():
        rows.append([f"MAC speedup, {MAPPER_LABELS[mp]}", f"{v:.4f} N"])
    rows.append(["mean oracle accuracy", f"{s['mean_oracle_acc']:.4f}"])
    for mp in s["mean_no_oracle_acc"]:
        rows.append([f"{MAPPER_LABELS[mp]}: task-ID / no-oracle accuracy (x oracle)",
                     f"{s['mean_task_id_acc'][mp]:.4f} / {s['mean_no_oracle_acc'][mp]:.4f} "
                     f"({s['mean_no_oracle_acc'][mp] / s['mean_oracle_acc']:.3f}x)"])
    for mp, f in s["fit_by_mapper"].items():
        rows.append([f"{MAPPER_LABELS[mp]} normalized accuracy over {f['orders']} orders",
                     f"{fit_label(f['slope'], f['intercept'], f['zero_at_tasks'])} (slope std {f['slope_std']:.5f})"])
    for b, acc in s.get("baselines_final_mean_acc", {}).items():
        rows.append([f"baseline {BASELINE_LABELS.get(b, b)}, final mean accuracy", f"{acc:.4f}"])
    per_task = s.get("baseline_train_per_task")
    baseline_data = ("the baselines train on every training image of every task, as SKILL's teachers do"
                     if not per_task else
                     f"the baselines train on at most {per_task} seeded training images per task (sampled for time), "
                     "SKILL's teachers on every image")
    update_readme(args.name, f"""## SKILL at scale: {s['agents']} devices, {s['tasks']} tasks (`fleet71.py`)

One device per task over {' + '.join(s['task_roots'])}, in that fixed order (listed in the report), one process and
one ONNX Runtime thread per device, learning from cached ROM features, a shared-folder transport; every device
classifies {s['eval_images_per_task']} seeded test images of every task with every mapper (the same rows on every device,
so agreement is checked image by image). Plausibility checks {'on' if s['plausibility'] else 'off (their cost at this scale is issue 18, section 4)'}.
Curves and baselines score {s['curve_test_images_per_task']} seeded test images per task; {baseline_data}.

{md_table(["", "value"], rows)}

Report with Fig. 4/6/8 (fixed order and {s['task_orders']} orders), task-ID by family, task confusion, the Fig. 9 table
and the baselines: [`results/{args.name}/report.md`](results/{args.name}/report.md); numbers: [`results/{target.name}`](results/{target.name}).
Command: `{s['command']}`.
""")


if __name__ == "__main__":
    main()
