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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from skill_edge.runtime.knowledge.records import TaskKnowledge
from skill_edge.runtime.machine import describe_machine, portable_command

from .curves import (PAPER_FIT, Curves, fit_dict, fit_label, incremental_matches, order_curves, plot_curves,
                     plot_degradation, plot_task_confusion, pooled_fit, replay_from_scores, scores_are_per_task,
                     task_orders)
from .equivalence import EquivalenceMap
from .fleet import FleetResult
from .metrics import MAPPER_TITLES
from .tasks import family

log = logging.getLogger(__name__)

BASELINE_NAMES = ("naive", "ewc", "er_10pc", "er_10k", "derpp")
BASELINE_LABELS = {"naive": "naive fine-tuning", "ewc": "EWC", "er_10pc": "ER (10 img/class)",
                   "er_10k": "ER (10,000 buffer)", "derpp": "DER++", "joint": "joint (upper bound)"}


class _Labels(dict):
    """Mapper kind -> its title; a kind nobody named yet (a new mapper) is shown as its own name."""

    def __missing__(self, key: str) -> str:
        return str(key)


MAPPER_LABELS = _Labels(MAPPER_TITLES)


@dataclass
class TaskFeatures:
    name: str
    classes: list[str]
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    test_trunk_stats: np.ndarray | None = None  # what the default anchors add to test_x
    test_paths: np.ndarray | None = None  # the test images of test_x's rows (image tasks of a BB run)


@dataclass
class FleetReport:
    out_dir: Path
    summary: dict
    curves: dict[str, dict] = field(default_factory=dict)
    baselines: dict[str, dict] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    markdown: str = ""


def report_device(result: FleetResult):
    """A device on the run's ROM and feature cache, so the report's extractions hit what the fleet cached."""
    from skill_edge.runtime.device import Device

    cache = result.config.get("cache_dir") or str(Path(result.workdir) / "feature-cache")
    return Device(Path(result.workdir) / "report-home", result.config["rom_dir"], cache_dir=cache, threads=None)


def load_task_features(result: FleetResult) -> list[TaskFeatures]:
    """Train features through the shared feature cache (a cache hit: the teachers extracted them), test
    features from the evaluation files the reference device wrote."""
    from safetensors.numpy import load_file

    from skill_edge.runtime.sources.datasets import load_image_folder

    cfg = result.config
    dev = report_device(result)
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
        te_paths = None
        if ev and Path(ev).exists() and not cfg.get("bb"):
            t = load_file(ev)
            te_x, te_y, te_s = t["features"], t["labels"].astype(np.int64), t.get("trunk_stats")
        else:  # a BB run's curves rerun BB tasks from the images, so their rows must be known
            tex = dev.extract(ds.test.paths, keep_trunk=bool(cfg.get("bb")))
            te_x, te_y, te_s = tex.features, np.asarray(ds.test.labels, np.int64)[tex.index], tex.trunk_stats
            te_paths = np.array([str(ds.test.paths[i]) for i in tex.index], dtype=object)
        out.append(TaskFeatures(name, list(ds.classes), ex.features, tr_y, te_x, te_y, te_s, te_paths))
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


def subsample_tests(feats: Sequence[TaskFeatures], max_per_task: int | None, seed: int = 0) -> list[TaskFeatures]:
    """The same seeded test rows of every task (at most ``max_per_task``), for curves that replay a bank
    many times; None keeps every row."""
    if not max_per_task:
        return list(feats)
    out = []
    for i, f in enumerate(feats):
        if len(f.test_y) <= max_per_task:
            out.append(f)
            continue
        keep = np.sort(np.random.default_rng(seed + i).permutation(len(f.test_y))[:max_per_task])
        out.append(TaskFeatures(f.name, f.classes, f.train_x, f.train_y, f.test_x[keep], f.test_y[keep],
                                f.test_trunk_stats[keep] if f.test_trunk_stats is not None else None,
                                f.test_paths[keep] if f.test_paths is not None else None))
    return out


def bb_head_inputs(result: FleetResult, knowledge: Sequence[TaskKnowledge],
                   feats: Sequence[TaskFeatures]) -> dict[str, np.ndarray]:
    """What each BB task's head reads on its own test rows: the features of its BB pass (the tail on the
    trunk activations, or the whole graph on the images, biases bound), as the devices classify.  The
    replayed curves would otherwise feed a BB head the plain features it was never trained on."""
    by_name = {f.name: f for f in feats}
    bb_tasks = [k for k in knowledge if k.bb is not None and k.task in by_name]
    if not bb_tasks:
        return {}
    dev = report_device(result)
    out = {}
    for k in bb_tasks:
        paths = by_name[k.task].test_paths
        if paths is None:
            raise ValueError(f"BB task {k.task!r} has no test images to rerun its BB pass on")
        ex = dev.extract(list(paths), keep_trunk=True)
        if len(ex.index) != len(paths):
            raise ValueError(f"{len(paths) - len(ex.index)} test images of {k.task!r} no longer decode")
        out[k.task] = dev.bb_features(k, ex.trunk_acts, paths)
    return out


def build_report(result: FleetResult, out_dir: str | Path, *, baselines: bool = True,
                 equivalence: EquivalenceMap | None = None, title: str = "skill-edge fleet run",
                 baseline_epochs: int = 5, progress: Callable[[str], None] | None = None,
                 baseline_results: dict[str, dict] | None = None, orders: int = 1,
                 curve_max_per_task: int | None = None, extra: dict | None = None,
                 slow_order_seconds: float | None = None) -> FleetReport:
    """``baseline_results``: baselines measured already (``run_baselines`` on the same features), used
    instead of running them here.  ``orders``: task orders the degradation study replays (the fleet's
    own order first, then seeded random ones; 1 = the fleet's order only).  ``curve_max_per_task``: the
    curves and baselines score at most this many seeded test images per task.  ``extra``: more summary
    keys (how the run was made: roots, budgets).  ``slow_order_seconds``: a mapper whose task scores
    depend on the whole bank (Mahalanobis) is rebuilt at every step of every order; after this many
    seconds it starts no further order (each order it did is complete; the report says how many)."""
    from skill_edge.runtime.knowledge.bank import KnowledgeBank

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda s: None)
    say("loading features")
    feats = load_task_features(result)
    by_name = {f.name: f for f in feats}
    bank = KnowledgeBank(result.bank_dirs[result.reference_device])
    stored = {k.task: k for k in bank.load_all()}
    knowledge = [stored[t] for t in result.tasks if t in stored]
    curve_feats = subsample_tests(feats, curve_max_per_task)
    test_sets = {f.name: (f.test_x, f.test_y, f.test_trunk_stats) for f in curve_feats}
    head_inputs = bb_head_inputs(result, knowledge, curve_feats)

    curves: list[Curves] = []
    by_mapper: dict[str, list[Curves]] = {}
    order_list = task_orders(len(knowledge), max(orders, 1), seed=int(result.config.get("seed", 0)))
    replay: dict[str, dict] = {}
    for mp in result.mappers:
        if not all(getattr(k, mp, None) is not None for k in knowledge):
            continue
        label = f"SKILL ({MAPPER_LABELS[mp]})"
        say(f"SKILL curves, {MAPPER_LABELS[mp]}: are its task scores independent of the other tasks?")
        t0 = time.perf_counter()
        per_task, scores = scores_are_per_task(mp, knowledge, test_sets)
        if per_task:
            by_mapper[mp] = replay_from_scores(knowledge, test_sets, scores, order_list, name=label,
                                               head_inputs=head_inputs)
            how = "one scoring pass of the whole bank (each task scored on its own: checked on random subsets)"
        else:  # e.g. Mahalanobis: the tied covariance depends on every task held, so each step rebuilds it
            by_mapper[mp] = []
            grow = incremental_matches(mp, knowledge, test_sets)
            for i, order in enumerate(order_list):
                if i and slow_order_seconds is not None and time.perf_counter() - t0 > slow_order_seconds:
                    break
                say(f"SKILL curves, {MAPPER_LABELS[mp]}: order {i + 1} of {len(order_list)}, rebuilt at every step")
                by_mapper[mp] += order_curves(knowledge, test_sets, mp, [order], name=label, incremental=grow,
                                              head_inputs=head_inputs)
            how = ("the mapper rebuilt from the first T tasks at every step T" +
                   (" (its covariance's scatter summed task by task: checked equal to a fresh build)" if grow else ""))
        replay[mp] = {"orders": len(by_mapper[mp]), "method": how, "seconds": time.perf_counter() - t0}
        curves.append(by_mapper[mp][0])
    fit_by_mapper = {mp: {**pooled_fit(cs), "replay": replay[mp]} for mp, cs in by_mapper.items()}
    base: dict[str, dict] = {}
    if baseline_results is not None:
        base = baseline_results
    elif baselines:
        base = run_baselines(curve_feats, int(result.macs_per_image.get("full", 0)), epochs=baseline_epochs,
                             progress=lambda n: say(f"baseline {n}"))
    for name, d in base.items():
        curves.append(Curves(BASELINE_LABELS.get(name, name), d["acc_matrix"], d.get("task_names")))
    say("plots")
    suffix = f"\n{len(result.tasks)} tasks, {len(result.agents)} agents"
    plots = plot_curves(curves, out, title_suffix=suffix, task_names=result.tasks)
    if len(order_list) > 1 and by_mapper:
        plots.update(plot_degradation(by_mapper, fit_by_mapper, out, labels=MAPPER_LABELS, family_of=family,
                                      title_suffix=suffix))
    plots["task_confusion"] = str(task_confusion_plot(result, out / "task_confusion.png"))

    skill_curve = {c.name: c.to_dict() for c in curves if c.name.startswith("SKILL")}
    main_mapper = "gmmc" if "gmmc" in result.mappers else result.mappers[0]
    main_curve = skill_curve.get(f"SKILL ({MAPPER_LABELS[main_mapper]})")
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
        "command": portable_command(sys.argv),
        "machine": describe_machine(),
        "agents": len(result.agents),
        "tasks": len(result.tasks),
        "task_names": result.tasks,
        "task_order": result.tasks,  # the run's fixed order: devices, curves and tables follow it
        "task_orders": len(order_list),
        "task_order_permutations": order_list,
        "fit_by_mapper": fit_by_mapper,
        "paper_fit": PAPER_FIT,
        "curve_test_images_per_task": curve_max_per_task,
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
        "main_mapper": main_mapper,
        "packet_bytes_by_mapper": {mp: {"mean": float(np.mean(v)), "max": float(np.max(v))} for mp, v in (
            (mp, [d[mp] for d in result.comm_bytes_per_task.values() if mp in d])
            for mp in ["as_sent", *result.mappers]) if v},
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
        **(extra or {}),
    }
    fleet_json = {**summary, "curves": {c.name: c.to_dict() for c in curves}, "baselines": base,
                  "equivalence_per_task": {mp: d["per_task"] for mp, d in eq.items()} if eq else None,
                  "per_task_accuracy": result.per_task_accuracy[result.reference_device],
                  "per_task_task_id_accuracy": result.per_task_task_id_accuracy[result.reference_device],
                  "per_task_oracle_accuracy": result.per_task_oracle_accuracy[result.reference_device],
                  "bytes": result.bytes, "link": result.link, "sync": result.sync, "plots": plots}
    (out / "fleet.json").write_text(json.dumps(fleet_json, indent=1, default=float) + "\n")
    md = render_markdown(result, summary, curves, base, plots, eq, by_name, out, fit_by_mapper)
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
        counts[MAPPER_LABELS[mp]] = m
    plot_task_confusion(names, counts, path, title="confusion between tasks (no task oracle)", family_of=family)
    return path


def _sci(x) -> str:
    return "-" if x is None else f"{x:.3e}"


def render_markdown(result: FleetResult, s: dict, curves: list[Curves], base: dict, plots: dict, eq,
                    feats: dict[str, TaskFeatures], out: Path, fits: dict[str, dict] | None = None) -> str:
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
    lines.append(f"| mean packet bytes per task ({MAPPER_LABELS[s.get('main_mapper', 'gmmc')]} packet) | "
                 f"{s['comm_bytes_per_task']:,.0f} |")
    for mp, d in s.get("packet_bytes_by_mapper", {}).items():
        lines.append(f"| {MAPPER_LABELS.get(mp, mp)} packets: mean / max bytes | {d['mean']:,.0f} / {d['max']:,.0f} |")
    if s.get("packet_budget"):
        lines.append(f"| packet budget | {s['packet_budget']} |")
    for name, f in s.get("normalized_acc_fit", {}).items():
        lines.append(f"| normalized-accuracy fit, {name}, the run's order | "
                     f"{fit_label(f['slope'], f['intercept'], f['zero_at_tasks'])} |")
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
    first = result.tasks[0] if result.tasks else "-"
    sub = s.get("curve_test_images_per_task")
    scored = (f"every curve, SKILL and baselines, scores the same {sub} seeded test images per task (all of a "
              f"smaller test set)" if sub else "on every test image")
    lines += ["", "## Curves (the run's fixed task order)", "",
              f"SKILL's curves replay the reference device's bank in the run's task order (below); {scored}.",
              "", f"![first task]({rel['first_task']})", "", f"![normalized]({rel['mean_normalized']})", "",
              f"![absolute]({rel['mean_absolute']})", ""]
    lines += [f"| method | final mean accuracy | accuracy on the first task ({first}) at the end | normalized fit |",
              "|---|---|---|---|"]
    for c in curves:
        f = fit_dict(*c.normalized_fit())
        lines.append(f"| {c.name} | {c.mean_absolute[-1]:.4f} | {c.first_task[-1]:.4f} | "
                     f"{fit_label(f['slope'], f['intercept'], f['zero_at_tasks'])} |")
    if fits and s.get("task_orders", 1) > 1:
        lines += ["", f"## Degradation over {s['task_orders']} task orders", "",
                  "The bank is replayed in the run's order and in seeded random orders of the same tasks. One line "
                  "is fitted through every order's normalized-accuracy points (T = 1..{0}); the spread is that of "
                  "the per-order lines. A fit over T <= {0} says nothing certain beyond it: the predictions at "
                  "102 and 1,000 tasks are the line, extended.".format(max(c.tasks for c in curves)), "",
                  "| mapper | orders | fitted line (all orders) | slope: mean of orders +- std [min, max] | final "
                  "normalized (mean of orders) | final absolute | line at T = 102 | line at T = 1,000 | paper (102 tasks) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mp, f in fits.items():
            ps = np.array(f["per_order_slopes"])
            paper = PAPER_FIT.get(mp)
            paper_s = "-"
            if paper and paper["slope"] is not None:
                paper_s = fit_label(paper["slope"], paper["intercept"], paper["zero_crossing"])
            elif paper:
                paper_s = f"zero at T = {paper['zero_crossing']:,.0f}"
            line = fit_label(f['slope'], f['intercept'], f['zero_at_tasks'])
            lines.append(f"| {MAPPER_LABELS[mp]} | {f['orders']} | {line} | "
                         f"{ps.mean():+.5f} +- {f['slope_std']:.5f} [{f['slope_min']:+.5f}, {f['slope_max']:+.5f}] | "
                         f"{f['final_normalized_mean']:.4f} | {f['final_absolute_mean']:.4f} | "
                         f"{f['predicted_at']['102']:.3f} | {f['predicted_at']['1000']:.3f} | {paper_s} |")
        lines += [""] + [f"- {MAPPER_LABELS[mp]}: {f['replay']['orders']} orders, {f['replay']['method']}; "
                         f"{f['replay']['seconds']:.0f} s." for mp, f in fits.items() if "replay" in f]
        for key, alt in (("orders_normalized", "normalized, several orders"), ("orders_absolute", "absolute, several orders"),
                         ("task_id_by_family", "task-ID by family")):
            if key in rel:
                lines += ["", f"![{alt}]({rel[key]})"]
    lines += ["", "## Confusion between tasks", "",
              "Rows: the true task of a test image; columns: the task the mapper chose (reference device, no "
              "task oracle). Tasks are grouped by family, families outlined.", "",
              f"![task confusion]({rel['task_confusion']})", ""]
    lines += ["## Task order", "", "| # | task | family | task root |", "|---|---|---|---|"]
    roots = s.get("task_roots_by_task", {})
    for i, t in enumerate(result.tasks, 1):
        lines.append(f"| {i} | {t} | {family(t)} | {roots.get(t, '-')} |")
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
        cap = s.get("baseline_train_per_task")
        lines += ["", "## Baselines (class-incremental, no task oracle, frozen features)", ""]
        if cap:
            lines += [f"Sampled for time: each baseline trains on a seeded sample of at most {cap} training images per "
                      f"task (all of a smaller task); SKILL's teachers used every image.", ""]
        lines += ["| baseline | final mean accuracy | forgetting | train MACs | wall s |", "|---|---|---|---|---|"]
        for n, d in base.items():
            lines.append(f"| {BASELINE_LABELS.get(n, n)} | {d['final_mean_acc']:.4f} | {d.get('forgetting', 0):.4f} "
                         f"| {_sci(float(sum(d['train_macs'])))} | {d['wall_s']:.1f} |")
    if s["problems"]:
        lines += ["", "## Problems seen", ""] + [f"- {p}" for p in s["problems"]]
    return "\n".join(lines) + "\n"
