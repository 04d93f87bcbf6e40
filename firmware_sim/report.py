"""Turn a fleet run into what people look at: ``fleet.json``, plots and a Markdown report.

Inputs are a ``FleetResult`` (what the devices measured) plus the tasks' features, read back
from the shared feature cache and the evaluation files the devices wrote. From those it
derives:

* SKILL's lifelong curves per mapper (paper Fig. 4/6/8) by replaying the bank in task order;
* the baselines (naive, EWC, ER 10/class, ER 10k, DER++) on the *same* frozen features and
  test sets, class-incremental with no task oracle;
* the Fig. 9 MAC table, SKILL rows from the run and baseline rows from the baselines' counts;
* strict and equivalence-aware accuracy (paper A.10) when an equivalence map is given.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from skill_edge.runtime.machine import describe_machine

from .curves import Curves, plot_curves, plot_task_confusion, skill_curves
from .equivalence import EquivalenceMap
from .fleet import FleetResult

log = logging.getLogger(__name__)

BASELINE_NAMES = ("naive", "ewc", "er_10pc", "er_10k", "derpp")
BASELINE_LABELS = {"naive": "naive fine-tuning", "ewc": "EWC", "er_10pc": "ER (10 img/class)",
                   "er_10k": "ER (10,000 buffer)", "derpp": "DER++", "joint": "joint (upper bound)"}
MAPPER_LABELS = {"gmmc": "GMMC", "maha": "Mahalanobis"}


@dataclass
class TaskFeatures:
    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_trunk_stats: np.ndarray | None = None  # what the default anchors add to test_x


@dataclass
class FleetReport:
    out_dir: Path
    summary: dict
    curves: dict[str, dict] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    markdown: str = ""


def load_task_features(result: FleetResult) -> list[TaskFeatures]:
    """Train features through the shared feature cache (a cache hit: the teachers extracted them), test
    features from the evaluation files the reference device wrote."""
    from safetensors.numpy import load_file

    from skill_edge.runtime.datasets import load_image_folder
    from skill_edge.runtime.device import Device

    cfg = result.config
    cache = cfg.get("cache_dir") or str(Path(result.workdir) / "feature-cache")
    dev = Device(Path(result.workdir) / "report-home", cfg["rom_dir"], cache_dir=cache, threads=None)
    out = []
    for name in result.tasks:
        src = Path(cfg["tasks"][name])
        ev = result.eval_features.get(name)
        if src.suffix == ".safetensors":
            t = load_file(str(src))
            meta = _st_metadata(src)
            out.append(TaskFeatures(name, json.loads(meta.get("classes", "[]")), t["train_features"],
                                    t["train_labels"].astype(np.int64), t["test_features"],
                                    t["test_labels"].astype(np.int64), t.get("test_trunk_stats")))
            continue
        ds = load_image_folder(src, seed=int(cfg.get("seed", 0)))
        ex = dev.extract(ds.train.paths, keep_trunk=bool(cfg.get("bb")))
        tr_y = np.asarray(ds.train.labels, np.int64)[ex.index]
        if ev and Path(ev).exists():
            t = load_file(ev)
            te_x, te_y, te_s = t["features"], t["labels"].astype(np.int64), t.get("trunk_stats")
        else:
            tex = dev.extract(ds.test.paths, keep_trunk=bool(cfg.get("bb")))
            te_x, te_y, te_s = tex.features, np.asarray(ds.test.labels, np.int64)[tex.index], tex.trunk_stats
        out.append(TaskFeatures(name, list(ds.classes), ex.features, tr_y, te_x, te_y, te_s))
    return out


def _st_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def equivalence_accuracy(result: FleetResult, feats: Sequence[TaskFeatures], eq: EquivalenceMap
                         ) -> dict[str, dict[str, float]]:
    """Mean strict and equivalence-aware no-oracle accuracy per mapper, from the reference device's predictions."""
    classes = {f.name: f.classes for f in feats}
    out: dict[str, dict[str, float]] = {}
    for mp, per_task in result.predictions.items():
        strict_m, aware_m, per = [], [], {}
        for ti, name in enumerate(result.tasks):
            p = per_task.get(name)
            if p is None:
                continue
            labels = [classes[name][y] for y in result.test_labels[name]]
            # scored like the devices' own accuracy: the mapper's best task, open-set flag ignored
            pt = [result.tasks[t] if t >= 0 else None for t in p["task_index"]]
            pl = [classes[t][c] if t is not None and c < len(classes[t]) else None
                  for t, c in zip(pt, p["class_index"])]
            s, a = eq.correct(name, labels, pt, pl)
            strict_m.append(float(s.mean()))
            aware_m.append(float(a.mean()))
            per[name] = {"strict": float(s.mean()), "equivalence_aware": float(a.mean())}
        out[mp] = {"strict": float(np.mean(strict_m)), "equivalence_aware": float(np.mean(aware_m)), "per_task": per}
    return out


def run_baselines(feats: Sequence[TaskFeatures], backbone_macs: int, names: Sequence[str] = BASELINE_NAMES,
                  epochs: int = 5, seed: int = 0, lr: float = 0.003,
                  progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Each strategy on the raw frozen features (what a single sequential agent sees), with Adam at ``lr``."""
    from .baselines import TaskData, run_baseline

    tasks = [TaskData(f.name, f.train_x.astype(np.float32), f.train_y, f.test_x.astype(np.float32), f.test_y,
                      tuple(f.classes)) for f in feats]
    out = {}
    for name in names:
        if progress:
            progress(name)
        t0 = time.perf_counter()
        r = run_baseline(name, tasks, epochs=epochs, seed=seed, lr=lr, backbone_macs_per_image=backbone_macs)
        d = r.to_dict()
        d["wall_s"] = time.perf_counter() - t0
        out[name] = d
        log.info("baseline %s: final mean acc %.3f (%.0fs)", name, r.final_mean_acc, d["wall_s"])
    return out


def build_report(result: FleetResult, out_dir: str | Path, *, baselines: bool = True,
                 equivalence: EquivalenceMap | None = None, title: str = "skill-edge fleet run",
                 baseline_epochs: int = 5, progress: Callable[[str], None] | None = None) -> FleetReport:
    from skill_edge.runtime.bank import KnowledgeBank

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda s: None)
    say("loading features")
    feats = load_task_features(result)
    by_name = {f.name: f for f in feats}
    bank = KnowledgeBank(result.bank_dirs[result.reference_device])
    stored = {k.task: k for k in bank.load_all()}
    knowledge = [stored[t] for t in result.tasks if t in stored]
    test_sets = {f.name: (f.test_x, f.test_y, f.test_trunk_stats) for f in feats}

    say("SKILL curves")
    curves: list[Curves] = []
    for mp in result.mappers:
        if all(getattr(k, mp) is not None for k in knowledge):
            curves.append(skill_curves(knowledge, test_sets, mp, name=f"SKILL ({MAPPER_LABELS.get(mp, mp)})"))
    base: dict[str, dict] = {}
    if baselines:
        base = run_baselines(feats, int(result.macs_per_image.get("full", 0)), epochs=baseline_epochs,
                             progress=lambda n: say(f"baseline {n}"))
        for name, d in base.items():
            curves.append(Curves(BASELINE_LABELS.get(name, name), d["acc_matrix"]))
    say("plots")
    plots = plot_curves(curves, out, title_suffix=f"\n{len(result.tasks)} tasks, {len(result.agents)} agents")
    plots["task_confusion"] = str(task_confusion_plot(result, out / "task_confusion.png"))

    skill_curve = {c.name: c.to_dict() for c in curves if c.name.startswith("SKILL")}
    main_mapper = "gmmc" if "gmmc" in result.mappers else result.mappers[0]
    main_curve = skill_curve.get(f"SKILL ({MAPPER_LABELS.get(main_mapper, main_mapper)})")
    eq = equivalence_accuracy(result, feats, equivalence) if equivalence is not None else None

    def row(setting: str, mapper: str):
        try:
            return result.row(setting, mapper)
        except (KeyError, ValueError, StopIteration):
            return None

    skill_rows = {mp: row("skill", mp) for mp in result.mappers}
    speed = {mp: r.speedup_xN for mp, r in skill_rows.items() if r is not None}
    comm_per_task = {t: v.get(main_mapper, v.get("as_sent")) for t, v in result.comm_bytes_per_task.items()}
    summary = {
        "title": title,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": describe_machine(),
        "agents": len(result.agents),
        "tasks": len(result.tasks),
        "task_names": result.tasks,
        "engine": result.engine_version,
        "transport": result.transport.split(":")[0],
        "converged": result.converged,
        "devices_agree": result.devices_agree,
        "speedup_xN": speed.get(main_mapper),
        "speedup_xN_by_mapper": speed,
        # a measured sequential run if there is one, else the CPU-time estimate: the wall-time estimate
        # sums learn times that were stretched by devices sharing cores, which flatters the fleet
        "wallclock_speedup": result.wall.get("wallclock_speedup_measured",
                                             result.wall.get("wallclock_speedup_cpu", result.wall.get("wallclock_speedup"))),
        "wallclock": result.wall,
        "comm_bytes_per_task": float(np.mean(list(comm_per_task.values()))) if comm_per_task else 0.0,
        "comm_bytes_per_task_by_task": comm_per_task,
        "mean_no_oracle_acc": result.mean_no_oracle_acc,
        "mean_task_id_acc": result.mean_task_id_acc,
        "mean_oracle_acc": result.mean_oracle_acc,
        "normalized_acc_slope": main_curve["normalized_fit"]["slope"] if main_curve else None,
        "normalized_acc_fit": {n: c["normalized_fit"] for n, c in skill_curve.items()},
        "equivalence": ({mp: {k: v for k, v in d.items() if k != "per_task"} for mp, d in eq.items()}
                        if eq else None),
        "baselines_final_mean_acc": {n: d["final_mean_acc"] for n, d in base.items()},
        "mac_rows": [_row_dict(r) for r in result.mac_rows] + _baseline_mac_rows(base, skill_rows.get(main_mapper)),
        "restarts": result.restarts,
        "problems": result.problems,
    }
    fleet_json = {**summary, "curves": {c.name: c.to_dict() for c in curves}, "baselines": base,
                  "equivalence_per_task": {mp: d["per_task"] for mp, d in eq.items()} if eq else None,
                  "per_task_accuracy": result.per_task_accuracy[result.reference_device],
                  "per_task_task_id_accuracy": result.per_task_task_id_accuracy[result.reference_device],
                  "per_task_oracle_accuracy": result.per_task_oracle_accuracy[result.reference_device],
                  "bytes": result.bytes, "link": result.link, "sync": result.sync, "plots": plots}
    (out / "fleet.json").write_text(json.dumps(fleet_json, indent=1, default=float) + "\n")
    md = render_markdown(result, summary, curves, base, plots, eq, by_name, out)
    (out / "report.md").write_text(md)
    return FleetReport(out, summary, {c.name: c.to_dict() for c in curves}, base, plots, md)


def _row_dict(r) -> dict:
    from dataclasses import asdict

    return asdict(r)


def _baseline_mac_rows(base: dict[str, dict], skill_gmmc) -> list[dict]:
    rows = []
    ref_total = skill_gmmc.total_macs if skill_gmmc is not None else None
    for name, d in base.items():
        total = float(sum(d["train_macs"]))
        rows.append({"method": f"{BASELINE_LABELS.get(name, name)} (single agent, frozen features)",
                     "setting": "baseline", "mapper": "-", "bb": False, "teacher_macs": total, "comm_bytes": 0.0,
                     "comm_macs": 0.0, "student_macs": 0.0, "total_macs": total, "speedup_xN": None,
                     "accuracy": d["final_mean_acc"],
                     "notes": {"slowdown_vs_skill_gmmc": total / ref_total if ref_total else None}})
    return rows


def task_confusion_plot(result: FleetResult, path: Path) -> Path:
    names = result.tasks
    counts = {}
    for mp in result.predictions:
        m = np.zeros((len(names), len(names)))
        for ti, t in enumerate(names):
            chosen = np.asarray(result.predictions[mp].get(t, {}).get("task_index", []), dtype=np.int64)
            np.add.at(m[ti], chosen[chosen >= 0], 1)
        counts[MAPPER_LABELS.get(mp, mp)] = m
    plot_task_confusion(names, counts, path, title="confusion between tasks (no task oracle)")
    return path


def _sci(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def render_markdown(result: FleetResult, s: dict, curves: list[Curves], base: dict, plots: dict, eq,
                    feats: dict[str, TaskFeatures], out: Path) -> str:
    rel = {k: Path(v).name for k, v in plots.items()}
    lines = [f"# {s['title']}", "",
             f"{s['agents']} agents, {s['tasks']} tasks, engine {s['engine']}, transport {s['transport']}; "
             f"banks converged: **{s['converged']}**; all devices give identical predictions: "
             f"**{s['devices_agree']}**.", "",
             f"Machine: {s['machine']['cpu']}, {s['machine']['cores']} cores, {s['machine'].get('memory_gib')} GiB "
             f"(load average {s['machine'].get('load_avg_at_start')}). Command: `{s['command']}`. Date: {s['date']}.",
             ""]
    lines += ["## Summary", "", "| metric | value |", "|---|---|"]
    for mp, acc in s["mean_no_oracle_acc"].items():
        lines.append(f"| mean no-oracle accuracy, {MAPPER_LABELS.get(mp, mp)} | {acc:.4f} |")
        lines.append(f"| mean task-ID accuracy, {MAPPER_LABELS.get(mp, mp)} | {s['mean_task_id_acc'][mp]:.4f} |")
    lines.append(f"| mean oracle (head) accuracy | {s['mean_oracle_acc']:.4f} |")
    for mp, v in s["speedup_xN_by_mapper"].items():
        lines.append(f"| speedup factor (MACs), {MAPPER_LABELS.get(mp, mp)} | {v:.4f} N |")
    w = s["wallclock"]
    basis = ("measured sequential run" if "wallclock_speedup_measured" in w
             else "sequential time estimated from CPU seconds")
    lines.append(f"| wall-clock speedup vs one sequential agent | {s['wallclock_speedup']:.2f}x "
                 f"(fleet {w.get('fleet_learn_share_wall_s', float('nan')):.1f} s; {basis}; all devices share "
                 f"this machine's {os.cpu_count()} cores) |")
    lines.append(f"| mean packet bytes per task | {s['comm_bytes_per_task']:,.0f} |")
    if s["normalized_acc_slope"] is not None:
        lines.append(f"| normalized-accuracy slope per task | {s['normalized_acc_slope']:.5f} |")
    if eq:
        for mp, d in eq.items():
            lines.append(f"| {MAPPER_LABELS.get(mp, mp)} accuracy: strict / equivalence-aware | "
                         f"{d['strict']:.4f} / {d['equivalence_aware']:.4f} |")
    lines += ["", f"Wall-clock method: {w.get('method', '')}", ""]
    lines += ["## Computation and communication (paper Fig. 9)", "",
              "alpha = 1,000 MACs per byte; communication counts what one student receives, serially. "
              "Baselines run on the same frozen features (cheap) with backbone MACs counted once per sample "
              "they train on, one agent learning every task in sequence.", "",
              "| method | teacher MACs | comm bytes | comm MACs | student MACs | total MACs | speedup xN | accuracy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in s["mac_rows"]:
        acc = "-" if r.get("accuracy") is None else f"{r['accuracy']:.4f}"
        sp = "-" if r.get("speedup_xN") is None else f"{r['speedup_xN']:.4f}"
        lines.append(f"| {r['method']} | {_sci(r['teacher_macs'])} | {r['comm_bytes']:,.0f} | {_sci(r['comm_macs'])} "
                     f"| {_sci(r['student_macs'])} | {_sci(r['total_macs'])} | {sp} | {acc} |")
    lines += ["", "## Curves", "",
              f"![task 1]({rel['first_task']})", "", f"![normalized]({rel['mean_normalized']})", "",
              f"![absolute]({rel['mean_absolute']})", "", f"![task confusion]({rel['task_confusion']})", ""]
    lines += ["| method | final mean accuracy | task-1 accuracy at the end | normalized fit |", "|---|---|---|---|"]
    for c in curves:
        slope, intercept, zero = c.normalized_fit()
        zero_s = f", zero at N = {zero:,.0f}" if np.isfinite(zero) else ""
        lines.append(f"| {c.name} | {c.mean_absolute[-1]:.4f} | {c.first_task[-1]:.4f} | "
                     f"y = {slope:.5f} x + {intercept:.4f}{zero_s} |")
    lines += ["", "## Per task (reference device)", "",
              "| task | classes | test | oracle | " + " | ".join(
                  f"{MAPPER_LABELS.get(mp, mp)} task-ID | {MAPPER_LABELS.get(mp, mp)} no-oracle"
                  for mp in result.mappers) + " | packet bytes |",
              "|" + "---|" * (4 + 2 * len(result.mappers) + 1)]
    ref = result.reference_device
    for t in result.tasks:
        cells = [t, str(len(feats[t].classes)), str(len(feats[t].test_y)),
                 f"{result.per_task_oracle_accuracy[ref].get(t, float('nan')):.3f}"]
        for mp in result.mappers:
            cells.append(f"{result.per_task_task_id_accuracy[ref].get(mp, {}).get(t, float('nan')):.3f}")
            cells.append(f"{result.per_task_accuracy[ref].get(mp, {}).get(t, float('nan')):.3f}")
        cells.append(f"{s['comm_bytes_per_task_by_task'].get(t, 0):,}")
        lines.append("| " + " | ".join(cells) + " |")
    if base:
        lines += ["", "## Baselines (class-incremental, no task oracle, frozen features)", "",
                  "| baseline | final mean accuracy | forgetting | train MACs | wall s |", "|---|---|---|---|---|"]
        for n, d in base.items():
            lines.append(f"| {BASELINE_LABELS.get(n, n)} | {d['final_mean_acc']:.4f} | {d.get('forgetting', 0):.4f} "
                         f"| {_sci(float(sum(d['train_macs'])))} | {d['wall_s']:.1f} |")
    if s["problems"]:
        lines += ["", "## Problems seen", ""] + [f"- {p}" for p in s["problems"]]
    return "\n".join(lines) + "\n"
