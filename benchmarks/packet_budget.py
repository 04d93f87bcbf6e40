"""Accuracy against packet size: how small can a task's knowledge packet get before the fleet loses accuracy?

For every byte budget and both task mappers, each skill-bench task is learned once (head by
``train_head``, anchors by ``fit_task_anchors``, exactly what ``Device.learn_features`` does),
encoded with ``PacketCodec(budget_bytes=b)`` and signed with a throwaway ``DeviceKey``, decoded
by a receiver that trusts that key, and the receiver's mapper (``build_mapper``) is built from
the decoded tasks.  Every test image of every task is then classified with no task oracle:

    no-oracle accuracy of task t = fraction of t's test images for which the mapper picks t
                                   AND t's (decoded) head picks the right class

``mean_no_oracle_acc`` is the mean of that over tasks (the mapper is closed-set here: the
argmax task, no "unknown" answer).  A packet carries only the anchor its mapper needs: GMMC
rows send head + GMMC, Mahalanobis rows send head + class means + exemplars.

Budgets are per packet.  A task that no ladder step fits into the budget (``BudgetError``) is
sent at its *smallest* ladder step anyway and counted in ``over_budget`` (so its real size is in
the byte means, and the accuracy is what a fleet that lets such packets through would get);
``mean_no_oracle_acc_if_dropped`` is the accuracy when those tasks are not sent at all instead
(their images count as wrong).  The goal is judged on the mean bytes per task, the paper's
own measure (561 KB per task, appendix A.8), and, more strictly, on the largest packet.

Two comparisons come with it: every task sent at one fixed ladder step ("where accuracy
goes": which precision or reduction costs what), and the budget walk over the ladder as it was
before this benchmark (int8 head with per-row scales, then GMMC merges and exemplar thinning).

    nice python benchmarks/packet_budget.py --features /work/cache/features   # from extracted features
    nice python benchmarks/packet_budget.py --feature-cache DIR               # extract from skill-bench images

Writes benchmarks/results/packet_budget.{json,png} and the packet_budget section of benchmarks/README.md.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SKILL_BENCH, md_table, task_order, teacher_calibrations, update_readme, write_result  # noqa: E402
from skill_edge.runtime.machine import portable_path  # noqa: E402

from skill_edge.runtime.exchange.codec import (  # noqa: E402
    EncodingPlan,
    exemplars_per_class,
    format_size,
    parse_size,
    plan_for_step,
)
from skill_edge.runtime.exchange.keys import DeviceKey, TrustStore  # noqa: E402
from skill_edge.runtime.knowledge.records import TaskKnowledge  # noqa: E402
from skill_edge.runtime.mapping.anchors import ThresholdCalibration, transform_features  # noqa: E402
from skill_edge.runtime.mapping.mapper import build_mapper, mahalanobis_task_score  # noqa: E402
from skill_edge.runtime.exchange.packet import BudgetError, PacketCodec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROM = REPO / "models/rom/efficientnet_lite0"
DEFAULT_BUDGETS_KB = (16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536)
GOAL_BYTES = parse_size("56KB")  # one tenth of the paper's 561 KB per task (82 + 70 + 409 KB, appendix A.8)
GOAL_POINTS = 0.5  # allowed accuracy loss against fp32, in percentage points
MAPPERS = ("gmmc", "maha")
MAPPER_NAMES = {"gmmc": "GMMC", "maha": "Mahalanobis"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- data


@dataclass
class TaskData:
    name: str
    classes: list[str]
    x_train: np.ndarray  # raw ROM features [N, D]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    s_train: np.ndarray | None = None  # trunk statistics [N, 2C] (the default anchors read them)
    s_test: np.ndarray | None = None


def load_from_features(root: Path, names: list[str]) -> list[TaskData]:
    """``<root>/<task>/{train,test}.npz`` with ``features`` [N, D], ``labels`` [N], ``classes``, ``trunk_stats``."""
    out = []
    for name in names:
        parts = {}
        for split in ("train", "test"):
            path = root / name / f"{split}.npz"
            if not path.exists():
                raise SystemExit(f"missing {path}: extract the task first or drop it with --tasks")
            with np.load(path, allow_pickle=False) as z:
                parts[split] = (z["features"].astype(np.float32), z["labels"].astype(np.int64),
                                [str(c) for c in z["classes"]],
                                z["trunk_stats"].astype(np.float32) if "trunk_stats" in z.files else None)
        out.append(TaskData(name, parts["train"][2], parts["train"][0], parts["train"][1],
                            parts["test"][0], parts["test"][1], parts["train"][3], parts["test"][3]))
    return out


def load_from_images(device, data_root: Path, names: list[str]) -> list[TaskData]:
    """Extract every task's train/test images through the device (and its feature cache)."""
    from skill_edge.runtime.sources.datasets import load_image_folder

    out = []
    for name in names:
        ds = load_image_folder(data_root / name)
        split = {}
        for s in ("train", "test"):
            files = getattr(ds, s)
            t0 = time.perf_counter()
            ex = device.extract(files.paths)
            split[s] = (ex.features.astype(np.float32), np.asarray(files.labels, np.int64)[ex.index], ex.trunk_stats)
            log(f"{name} {s}: {len(ex.index)} images ({len(ex.failed)} unreadable) in {time.perf_counter() - t0:.0f} s")
        (xtr, ytr, s_tr), (xte, yte, s_te) = split["train"], split["test"]
        out.append(TaskData(name, list(ds.classes), xtr, ytr, xte, yte, s_tr, s_te))
    return out


# ---------------------------------------------------------------------------- teacher


def learn(device, task: TaskData, cache: Path | None) -> TaskKnowledge:
    """The task as a teacher device learns it (head + both anchors), cached on disk by data hash."""
    from safetensors.numpy import load_file, save_file

    h = hashlib.sha256(f"{task.name}|{task.classes}|{device.fingerprint}|{LEARN_CODE}".encode())
    for a in (task.x_train, task.y_train) + ((task.s_train,) if task.s_train is not None else ()):
        h.update(np.ascontiguousarray(a).tobytes())
    stem = cache / f"{task.name}-{h.hexdigest()[:16]}" if cache else None
    if stem is not None and stem.with_suffix(".json").exists():
        md = json.loads(stem.with_suffix(".json").read_text())
        return TaskKnowledge.from_parts(md, load_file(str(stem.with_suffix(".safetensors"))))
    t0 = time.perf_counter()
    k, _ = device.learn_features(task.name, task.classes, task.x_train, task.y_train, trunk_stats=task.s_train,
                                 mappers=MAPPERS)
    log(f"learned {task.name} ({len(task.classes)} classes) in {time.perf_counter() - t0:.0f} s")
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_file(k.tensors(), str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(k.metadata()))
    return k


def _learn_code_digest() -> str:
    """A digest of the code that turns features into knowledge: a cached record is stale once it changes
    (a key on the data alone kept serving session-old anchors after the defaults were retuned)."""
    import skill_edge.runtime.mapping.anchors as anchors_mod
    import skill_edge.runtime.learn.head as learn_mod

    h = hashlib.sha256()
    for mod in (anchors_mod, learn_mod):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


LEARN_CODE = _learn_code_digest()


def for_mapper(k: TaskKnowledge, kind: str) -> TaskKnowledge:
    """The record a device using mapper ``kind`` broadcasts: only the anchor that mapper reads."""
    return replace(k, gmmc=None) if kind == "maha" else replace(k, maha=None)


# ---------------------------------------------------------------------------- the wire


@dataclass
class Sent:
    knowledge: TaskKnowledge  # as the receiver decoded it
    nbytes: int
    step: str
    over_budget: bool
    encode_s: float = 0.0  # the sender's budget walk, signing included


class Radio:
    """One sender key, one receiver trust store: encode -> bytes -> verified decode."""

    def __init__(self, work: Path) -> None:
        self.key = DeviceKey.generate()
        self.trust = TrustStore(work / "trust")
        self.trust.add("teacher", self.key.public_key)

    def send(self, k: TaskKnowledge, budget: int | None, ladder: Callable[[TaskKnowledge], list[EncodingPlan]]
             | None = None, calibration: ThresholdCalibration | None = None) -> Sent:
        """The codec's own budget walk; or, with ``ladder``, the same walk over other plans (for comparisons).
        ``calibration``: the teacher's held-out images, as ``learn`` hands them to the encoder."""
        codec = PacketCodec(budget_bytes=budget)
        over = False
        t0 = time.perf_counter()
        if ladder is None:
            try:
                data = codec.encode(k, self.key, calibration=calibration)
            except BudgetError as err:
                data = codec.encode(k, self.key, plan=err.smallest_step, calibration=calibration)
                over = True
        else:
            packets = []
            for plan in ladder(k):
                packets.append(codec.encode(k, self.key, plan=plan, calibration=calibration))
                if budget is None or len(packets[-1]) <= budget:
                    break
            else:
                over = True
            data = packets[-1] if not over else min(packets, key=len)
        encode_s = time.perf_counter() - t0
        p = codec.decode(data, trust=self.trust)
        return Sent(p.knowledge, len(data), p.plan.step, over, encode_s)


def fixed_step(step: str) -> Callable[[TaskKnowledge], list[EncodingPlan]]:
    """A one-rung ladder: every task sent at exactly this step (an ablation)."""
    return lambda k: [plan_for_step(k, step)]


def previous_ladder(k: TaskKnowledge) -> list[EncodingPlan]:
    """The ladder before per-column and low-bit codes: fp32, fp16, int8 with a per-row (``i8r``) head,
    then GMMC merges, int8 BB and exemplar thinning at int8."""
    k0 = k.gmmc.k if k.gmmc is not None else None
    m0 = exemplars_per_class(k.maha, k.num_classes) if k.maha is not None else None
    steps, base = ["fp32", "fp16", "int8"], "int8"
    if k0 is not None and k0 > 1:
        steps += [f"int8+gmmc_k={j}" for j in range(k0 - 1, 0, -1)]
        base = "int8+gmmc_k=1"
    if k.bb is not None:
        base += "+bb_int8"
        steps.append(base)
    if m0 is not None and m0 > 1:
        steps += [f"{base}+exemplars={j}" for j in range(m0 - 1, 0, -1)]
    return [with_row_head(plan_for_step(k, s)) for s in steps]


def with_row_head(plan: EncodingPlan) -> EncodingPlan:
    """The same plan with the head quantised per row (``i8r``) wherever it is an integer code."""
    if plan.tensors["head.weight"] in ("f32", "f16"):
        return plan
    return replace(plan, tensors={**plan.tensors, "head.weight": "i8r"})


# ---------------------------------------------------------------------------- student


def evaluate(kind: str, received: list[TaskKnowledge], tasks: list[TaskData]) -> dict:
    """No-oracle, task-id and oracle-head accuracy per task, with the receiver's mapper over ``received``.

    ``received`` may lack some tasks (not sent): their test images then count as wrong.
    """
    by_name = {k.task: i for i, k in enumerate(received)}
    mapper = build_mapper(kind, received)
    per_task = {}
    for t in tasks:
        if t.name not in by_name:
            per_task[t.name] = {"no_oracle": 0.0, "task_id": 0.0, "oracle": float("nan")}
            continue
        k = received[by_name[t.name]]
        # closed set: the argmax task (``predict`` would also run the open-set test, which is not scored here)
        picked = mapper.task_scores(mapper.prepare(t.x_test, t.s_test)).argmax(axis=1) == by_name[t.name]
        right = (t.x_test @ k.head_weight.T + k.head_bias).argmax(1) == t.y_test
        per_task[t.name] = {"no_oracle": float(np.mean(picked & right)), "task_id": float(np.mean(picked)),
                            "oracle": float(np.mean(right))}
    mean = {m: float(np.nanmean([v[m] for v in per_task.values()])) for m in ("no_oracle", "task_id", "oracle")}
    return {"mean": mean, "per_task": per_task}


def open_set(kind: str, received: list[TaskKnowledge], tasks: list[TaskData]) -> dict:
    """Unknown rates with the thresholds the packets carry: of the known tasks' test images (false
    alarms), and, leaving each task out of the receiver's bank in turn, of the absent task's
    images (detections).  A budget rung that changes an anchor must keep both near fp32's."""
    mapper = build_mapper(kind, received)
    known = [float(np.mean(mapper.predict(t.x_test, t.s_test).unknown)) for t in tasks]
    absent = [float(np.mean(build_mapper(kind, received[:i] + received[i + 1:]).predict(t.x_test, t.s_test).unknown))
              for i, t in enumerate(tasks)]
    return {"known_task_images_unknown": float(np.mean(known)), "absent_task_images_unknown": float(np.mean(absent)),
            "per_task_known": dict(zip([t.name for t in tasks], known)),
            "per_task_absent": dict(zip([t.name for t in tasks], absent))}


def threshold_carry(radio: Radio, sent: list[TaskKnowledge], originals: list[TaskKnowledge],
                    tasks: list[TaskData]) -> dict:
    """How well the thresholds the packets carry (set on each teacher's held-out images for the sent
    anchor, ``recalibrate_maha_threshold``) do, against two controls: the teacher's own threshold left
    as it was, and the one carried over draws of the anchor's own model (``carry_maha_threshold``,
    before the teacher's calibration reached the encoder); and against the threshold the real test
    images would give the sent anchor (the test fraction the teacher's threshold leaves below it on
    the original anchor, taken as a quantile of the sent anchor's test scores)."""
    control = [replace(k, thresholds={**k.thresholds, "maha": o.thresholds["maha"]}) for k, o in zip(sent, originals)]
    drawn = [replace(k, thresholds={**k.thresholds, "maha": radio.send(o, None, fixed_step(k.meta.encoding["step"]))
                                    .knowledge.thresholds["maha"]}) for k, o in zip(sent, originals)]
    ratios, drawn_ratios = {}, {}
    for k, d, o, t in zip(sent, drawn, originals, tasks):
        x = transform_features(t.x_test, o.meta.feature_transform, t.s_test)
        before, after = mahalanobis_task_score(o.maha, x), mahalanobis_task_score(k.maha, x)
        real = float(np.quantile(after, np.mean(before < o.thresholds["maha"])))
        ratios[t.name] = k.thresholds["maha"] / real
        drawn_ratios[t.name] = d.thresholds["maha"] / real
    return {"uncarried_open_set": open_set("maha", control, tasks),
            "drawn_open_set": open_set("maha", drawn, tasks),
            "carried_over_real_threshold": ratios,
            "carried_over_real_threshold_range": [min(ratios.values()), max(ratios.values())],
            "drawn_over_real_threshold_range": [min(drawn_ratios.values()), max(drawn_ratios.values())]}


def run_config(radio: Radio, kind: str, knowledge: list[TaskKnowledge], tasks: list[TaskData],
               budget: int | None, ladder: Callable[[TaskKnowledge], list[EncodingPlan]] | None = None,
               with_open_set: bool = False, calibrations: list | None = None) -> dict:
    t0 = time.perf_counter()
    cals = calibrations if calibrations is not None and kind == "maha" else [None] * len(knowledge)
    sent = [radio.send(for_mapper(k, kind), budget, ladder, c) for k, c in zip(knowledge, cals)]
    ev = evaluate(kind, [s.knowledge for s in sent], tasks)
    row = {"mapper": kind, "budget_bytes": budget,
           "mean_packet_bytes": float(np.mean([s.nbytes for s in sent])),
           "max_packet_bytes": int(max(s.nbytes for s in sent)),
           "mean_no_oracle_acc": ev["mean"]["no_oracle"], "mean_task_id_acc": ev["mean"]["task_id"],
           "mean_oracle_acc": ev["mean"]["oracle"],
           "over_budget": [k.task for k, s in zip(knowledge, sent) if s.over_budget],
           "packets": {k.task: {"bytes": s.nbytes, "step": s.step, "over_budget": s.over_budget,
                                **ev["per_task"][k.task]} for k, s in zip(knowledge, sent)}}
    if row["over_budget"]:
        kept = [s.knowledge for s in sent if not s.over_budget]
        row["mean_no_oracle_acc_if_dropped"] = (evaluate(kind, kept, tasks)["mean"]["no_oracle"] if kept else 0.0)
    else:
        row["mean_no_oracle_acc_if_dropped"] = row["mean_no_oracle_acc"]
    row["max_encode_s"] = round(max(s.encode_s for s in sent), 2)
    row["slowest_encode"] = max(zip(knowledge, sent), key=lambda ks: ks[1].encode_s)[0].task
    if with_open_set:
        row["open_set"] = open_set(kind, [s.knowledge for s in sent], tasks)
        if kind == "maha" and budget is not None:
            row["threshold_carry"] = threshold_carry(radio, [s.knowledge for s in sent],
                                                     [for_mapper(k, kind) for k in knowledge], tasks)
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


# ---------------------------------------------------------------------------- report


def goal_verdict(rows: list[dict], fp32: dict, ablation: dict) -> dict:
    """Per mapper: the budgets whose mean packet is <= 56 KB with accuracy within 0.5 points of fp32,
    and the fixed steps (every task at one step, no per-packet budget) that do the same."""
    out = {}
    for kind in fp32:
        ref = fp32[kind]["mean_no_oracle_acc"]
        mine = sorted((r for r in rows if r["mapper"] == kind), key=lambda r: r["budget_bytes"])
        ok_mean = [r for r in mine if r["mean_packet_bytes"] <= GOAL_BYTES
                   and r["mean_no_oracle_acc"] >= ref - GOAL_POINTS / 100]
        ok_max = [r for r in ok_mean if r["max_packet_bytes"] <= GOAL_BYTES and not r["over_budget"]]
        best_small = max((r for r in mine if r["mean_packet_bytes"] <= GOAL_BYTES),
                         key=lambda r: r["mean_no_oracle_acc"], default=None)
        # issue 17's compact goal: every packet <= 56 KB, no-oracle accuracy over the fp32 heads' oracle
        every_under = max((r for r in mine if r["max_packet_bytes"] <= GOAL_BYTES and not r["over_budget"]),
                          key=lambda r: r["mean_no_oracle_acc"], default=None)
        out[kind] = {
            "fp32_acc": ref,
            "met_on_mean_bytes": bool(ok_mean),
            "budgets_meeting_goal": [r["budget_bytes"] for r in ok_mean],
            "budgets_meeting_goal_with_every_packet_under": [r["budget_bytes"] for r in ok_max],
            "best": ({k: ok_mean[0][k] for k in ("budget_bytes", "mean_packet_bytes", "max_packet_bytes",
                                                   "mean_no_oracle_acc")} if ok_mean else None),
            "best_acc_at_or_under_goal_bytes": best_small["mean_no_oracle_acc"] if best_small else None,
            "best_budget_at_or_under_goal_bytes": best_small["budget_bytes"] if best_small else None,
            "best_ratio_to_oracle_every_packet_under_goal_bytes": (
                every_under["mean_no_oracle_acc"] / fp32[kind]["mean_oracle_acc"]
                if every_under and fp32[kind].get("mean_oracle_acc") else None),
            "budget_of_that_ratio": every_under["budget_bytes"] if every_under else None,
            "fixed_steps_meeting_goal": [
                {k: r[k] for k in ("step", "mean_packet_bytes", "max_packet_bytes", "mean_no_oracle_acc")}
                for r in ablation.get(kind, []) if r["mean_packet_bytes"] <= GOAL_BYTES
                and r["mean_no_oracle_acc"] >= ref - GOAL_POINTS / 100],
        }
    return out


def ablation_steps(kind: str) -> list[str]:
    """Fixed steps that show where accuracy goes: precision rungs, then what only the anchor loses."""
    reductions = ([f"int3+gmmc_k={k}" for k in (20, 15, 10, 5, 2, 1)] if kind == "gmmc"
                  else [f"int3+exemplars={m}" for m in (4, 3, 2, 1)])
    return ["fp16", "int8", "int4", "int3", *reductions, "int3+head_int2"]


def plot(rows: list[dict], previous: list[dict], fp32: dict, ablation: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {"gmmc": "tab:blue", "maha": "tab:orange"}
    for kind in fp32:
        for series, style, label in ((rows, "o-", "budget ladder"), (previous, "x--", "previous ladder (row-scaled head)")):
            mine = sorted((r for r in series if r["mapper"] == kind), key=lambda r: r["mean_packet_bytes"])
            if mine:
                ax.plot([r["mean_packet_bytes"] / 1000 for r in mine], [100 * r["mean_no_oracle_acc"] for r in mine],
                        style, color=colours[kind], ms=4, alpha=1.0 if series is rows else 0.45,
                        label=f"{MAPPER_NAMES[kind]}: {label}")
        fixed = ablation.get(kind, [])
        if fixed:
            ax.plot([r["mean_packet_bytes"] / 1000 for r in fixed], [100 * r["mean_no_oracle_acc"] for r in fixed],
                    "s", mfc="none", color=colours[kind], ms=5, lw=0, label=f"{MAPPER_NAMES[kind]}: one fixed step")
        ref = fp32[kind]
        ax.plot([ref["mean_packet_bytes"] / 1000], [100 * ref["mean_no_oracle_acc"]], "*", color=colours[kind],
                ms=14, label=f"{MAPPER_NAMES[kind]}: fp32 reference")
        ax.axhline(100 * ref["mean_no_oracle_acc"] - GOAL_POINTS, color=colours[kind], lw=0.8, ls=":")
    ax.axvline(GOAL_BYTES / 1000, color="k", ls="--", lw=1, label="goal: 56 KB per task")
    ax.set_xscale("log")
    ticks = [16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512]
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("mean packet size per task (KB, log scale)")
    ax.set_ylabel("mean no-oracle accuracy over tasks (%)")
    ax.set_title("Knowledge packet size vs accuracy (skill-bench, 21 tasks, EfficientNet-Lite0)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.01, "dotted: fp32 accuracy - 0.5 points", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(payload: dict) -> str:
    rows, previous, fp32, verdict = payload["rows"], payload["rows_previous_ladder"], payload["fp32"], payload["verdict"]
    prev = {(r["mapper"], r["budget_bytes"]): r for r in previous}
    lines = ["## Packet size vs accuracy (`packet_budget.py`)", "",
             f"{payload['n_tasks']} skill-bench tasks, EfficientNet-Lite0 ROM features.  Every task's packet is "
             "encoded with `PacketCodec(budget_bytes=b)`, signed, decoded by a receiver that trusts the key, and "
             "the receiver's mapper is built from the decoded tasks; a packet carries only its mapper's anchor.  "
             "Accuracy is the mean over tasks of no-oracle accuracy (the mapper must pick the task *and* its head "
             "the class; closed set).  A task that fits no ladder step is sent at its smallest step and counted in "
             "*over*; *if dropped* is the accuracy when such tasks are not sent at all.  *previous* is the ladder "
             "before this benchmark (int8 head with per-row scales, then GMMC merges / exemplar thinning).", "",
             "![accuracy vs bytes](results/packet_budget.png)", ""]
    for kind in fp32:
        ref, v = fp32[kind], verdict[kind]
        lines += [f"### {MAPPER_NAMES[kind]} mapper", "",
                  f"fp32 reference: **{100 * ref['mean_no_oracle_acc']:.2f} %** at {ref['mean_packet_bytes'] / 1000:.1f} KB "
                  f"mean per task ({ref['max_packet_bytes'] / 1000:.1f} KB max).", ""]
        table = []
        for r in sorted((r for r in rows if r["mapper"] == kind), key=lambda r: r["budget_bytes"]):
            p = prev.get((kind, r["budget_bytes"]))
            table.append([format_size(r["budget_bytes"]), f"{r['mean_packet_bytes'] / 1000:.1f}",
                          f"{r['max_packet_bytes'] / 1000:.1f}", f"{100 * r['mean_no_oracle_acc']:.2f}",
                          f"{100 * (r['mean_no_oracle_acc'] - ref['mean_no_oracle_acc']):+.2f}",
                          f"{100 * r['mean_task_id_acc']:.2f}", f"{100 * r['mean_oracle_acc']:.2f}",
                          len(r["over_budget"]), f"{100 * r['mean_no_oracle_acc_if_dropped']:.2f}",
                          f"{100 * p['mean_no_oracle_acc']:.2f} @ {p['mean_packet_bytes'] / 1000:.0f} KB" if p else "-",
                          _steps_summary(r)])
        lines += [md_table(["budget", "mean KB", "max KB", "no-oracle %", "vs fp32", "task-id %", "oracle head %",
                            "over", "if dropped %", "previous ladder", "steps (tasks)"], table), ""]
        if v["met_on_mean_bytes"]:
            b = v["best"]
            under = v["budgets_meeting_goal_with_every_packet_under"]
            lines.append(f"**Goal met** (mean packet <= 56 KB per task, accuracy within {GOAL_POINTS} points of fp32) "
                         f"with budgets {', '.join(format_size(x) for x in v['budgets_meeting_goal'])}; smallest: "
                         f"{format_size(b['budget_bytes'])} budget, {b['mean_packet_bytes'] / 1000:.1f} KB mean, "
                         f"{b['max_packet_bytes'] / 1000:.1f} KB max, {100 * b['mean_no_oracle_acc']:.2f} % "
                         f"({100 * (b['mean_no_oracle_acc'] - v['fp32_acc']):+.2f} points).  Every packet is also "
                         "<= 56 KB with " + (", ".join(format_size(x) for x in under) if under else "none of them") + ".")
        else:
            best = v["best_acc_at_or_under_goal_bytes"]
            lines.append("**Goal not met with a per-packet budget**: best accuracy at <= 56 KB mean is "
                         + (f"{100 * best:.2f} % ({100 * (best - v['fp32_acc']):+.2f} points)" if best is not None
                            else "n/a") + ".")
        ratio = v.get("best_ratio_to_oracle_every_packet_under_goal_bytes")
        if ratio is not None:
            lines.append(f"  With every packet <= 56 KB ({format_size(v['budget_of_that_ratio'])} budget) no-oracle "
                         f"accuracy is **{ratio:.4f}x** the fp32 heads' oracle ({100 * ref['mean_oracle_acc']:.2f} %).")
        goal_row = next((r for r in rows if r["mapper"] == kind and r["budget_bytes"] == GOAL_BYTES
                         and "open_set" in r), None)
        if goal_row is not None and "open_set" in ref:
            a, b = ref["open_set"], goal_row["open_set"]
            lines.append(f"  Open set with the thresholds the packets carry: known-task images called unknown "
                         f"{100 * a['known_task_images_unknown']:.1f} % at fp32, "
                         f"{100 * b['known_task_images_unknown']:.1f} % at 56 KB; an absent task's images called "
                         f"unknown (each task left out of the bank in turn) {100 * a['absent_task_images_unknown']:.1f} % "
                         f"and {100 * b['absent_task_images_unknown']:.1f} %.")
            carry = goal_row.get("threshold_carry")
            if carry is not None:
                u, (lo, hi) = carry["uncarried_open_set"], carry["carried_over_real_threshold_range"]
                lines.append(f"  Control, the teachers' thresholds sent unchanged: {100 * u['known_task_images_unknown']:.1f} % "
                             f"and {100 * u['absent_task_images_unknown']:.1f} %.  The thresholds the packets carry, "
                             f"set on each teacher's held-out images for the sent anchor, are "
                             f"{lo:.2f}x to {hi:.2f}x the ones the real test images would give the sent anchors.")
                if "drawn_open_set" in carry:
                    dr, (dlo, dhi) = carry["drawn_open_set"], carry["drawn_over_real_threshold_range"]
                    lines.append(f"  Control, the thresholds carried over draws of each anchor's own model (before): "
                                 f"{100 * dr['known_task_images_unknown']:.1f} % and "
                                 f"{100 * dr['absent_task_images_unknown']:.1f} %, {dlo:.2f}x to {dhi:.2f}x the real ones.")
            lines.append(f"  Slowest budget walk at 56 KB: {goal_row['max_encode_s']:.2f} s ({goal_row['slowest_encode']}).")
        fixed = v["fixed_steps_meeting_goal"]
        if fixed:
            lines.append("  Fixed steps (every task at one step, no per-packet cap) that meet it: " + "; ".join(
                f"`{f['step']}` {f['mean_packet_bytes'] / 1000:.1f} KB mean ({f['max_packet_bytes'] / 1000:.1f} KB max), "
                f"{100 * f['mean_no_oracle_acc']:.2f} %" for f in fixed) + ".")
        lines.append("")
    lines += ["Reading the tables: the *previous ladder* quantised the head with one int8 scale per row, "
              "which rounds every weight but those of a few large-weight feature columns to zero (oracle head "
              "accuracy 60 % instead of 85.5 %); per-column scales (`i8c` .. `i3c`) remove that loss.  A "
              "Mahalanobis anchor grows with the number of classes (class means + exemplars per class), so under "
              "a per-packet cap the tasks with 40+ classes (gtsrb, flowers102, the larger Omniglot alphabets) "
              "merge their class means into fewer rows (`+means=K`, Ward's criterion; the head keeps its 3-bit "
              "code) before any falls back to a ternary head; GMMC anchors do not grow with classes.  A rung that "
              "changes the Mahalanobis anchor sets its open-set threshold again for the anchor the receiver "
              "restores, on the teacher's held-out images (`recalibrate_maha_threshold`).", ""]
    lines += ["### Where accuracy goes (every task sent at one fixed step)", ""]
    table = []
    for kind in payload["ablation"]:
        for r in payload["ablation"][kind]:
            table.append([MAPPER_NAMES[kind], r["step"], f"{r['mean_packet_bytes'] / 1000:.1f}",
                          f"{100 * r['mean_no_oracle_acc']:.2f}",
                          f"{100 * (r['mean_no_oracle_acc'] - fp32[kind]['mean_no_oracle_acc']):+.2f}",
                          f"{100 * r['mean_task_id_acc']:.2f}", f"{100 * r['mean_oracle_acc']:.2f}"])
    lines += [md_table(["mapper", "step", "mean KB", "no-oracle %", "vs fp32", "task-id %", "oracle head %"], table),
              "", f"Machine: {payload['machine'].get('cpu')}, {payload['machine'].get('cores')} cores.  "
              f"Command: `{payload['command']}`"]
    return "\n".join(lines)


def _steps_summary(row: dict, limit: int = 3) -> str:
    counts: dict[str, int] = {}
    for p in row["packets"].values():
        counts[p["step"]] = counts.get(p["step"], 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    text = ", ".join(f"{s} ({n})" for s, n in top[:limit])
    return text + (f", +{len(top) - limit} more" if len(top) > limit else "")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", type=Path, help="DIR/<task>/{train,test}.npz; default: extract from --data")
    ap.add_argument("--data", type=Path, default=SKILL_BENCH, help="skill-bench root (tasks.json + task folders)")
    ap.add_argument("--rom", type=Path, default=DEFAULT_ROM)
    ap.add_argument("--feature-cache", type=Path, default=os.environ.get("SKILL_EDGE_CACHE") or REPO / ".cache/features",
                    help="Device feature cache for image extraction (default $SKILL_EDGE_CACHE, else .cache/features)")
    ap.add_argument("--learn-cache", type=str, default=str(REPO / ".cache/packet_budget"),
                    help="where learned task records are kept between runs ('' to disable)")
    ap.add_argument("--tasks", nargs="*", help="subset of tasks (default: all in tasks.json)")
    ap.add_argument("--budgets", nargs="*", default=[f"{b}KB" for b in DEFAULT_BUDGETS_KB])
    ap.add_argument("--mappers", nargs="*", default=list(MAPPERS), choices=MAPPERS)
    ap.add_argument("--no-previous", action="store_true", help="skip the previous-ladder comparison")
    ap.add_argument("--no-ablation", action="store_true", help="skip the fixed-step ablation")
    ap.add_argument("--name", default="packet_budget", help="result name (json/png/README section)")
    args = ap.parse_args(argv)

    from skill_edge.runtime.device import Device

    names = args.tasks or task_order(args.data)
    budgets = sorted(parse_size(b) for b in args.budgets)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="packet-budget-") as tmp:
        work = Path(tmp)
        device = Device(work / "teacher", args.rom, cache_dir=args.feature_cache, threads=2)
        tasks = (load_from_features(args.features, names) if args.features
                 else load_from_images(device, args.data, names))
        knowledge = [learn(device, t, Path(args.learn_cache) if args.learn_cache else None) for t in tasks]
        radio = Radio(work)
        cals = teacher_calibrations(tasks, knowledge) if "maha" in args.mappers else None

        def sweep(label: str, ladder=None) -> list[dict]:
            out = []
            for kind in args.mappers:
                for b in budgets:
                    r = run_config(radio, kind, knowledge, tasks, b, ladder, with_open_set=b == GOAL_BYTES,
                                   calibrations=cals)
                    out.append(r)
                    log(f"{label} {kind} {format_size(b)}: {r['mean_packet_bytes'] / 1000:.1f} KB mean / "
                        f"{r['max_packet_bytes'] / 1000:.1f} max, acc {100 * r['mean_no_oracle_acc']:.2f} % "
                        f"(task-id {100 * r['mean_task_id_acc']:.2f}, oracle {100 * r['mean_oracle_acc']:.2f}), "
                        f"over budget {len(r['over_budget'])} [{r['seconds']} s]")
            return out

        fp32 = {}
        for kind in args.mappers:
            r = run_config(radio, kind, knowledge, tasks, None, with_open_set=True, calibrations=cals)
            fp32[kind] = {k: r[k] for k in ("mean_packet_bytes", "max_packet_bytes", "mean_no_oracle_acc",
                                            "mean_task_id_acc", "mean_oracle_acc", "packets", "open_set")}
            log(f"fp32 {kind}: {r['mean_packet_bytes'] / 1000:.1f} KB mean, acc {100 * r['mean_no_oracle_acc']:.2f} %")
        rows = sweep("ladder")
        ablation = {kind: [] for kind in args.mappers}
        if not args.no_ablation:
            for kind in args.mappers:
                for step in ["int8 (per-row head)", *ablation_steps(kind)]:
                    ladder = ((lambda k: [with_row_head(plan_for_step(k, "int8"))]) if step.startswith("int8 (")
                              else fixed_step(step))
                    r = run_config(radio, kind, knowledge, tasks, None, ladder, calibrations=cals)
                    ablation[kind].append({"step": step, **{k: r[k] for k in (
                        "mean_packet_bytes", "max_packet_bytes", "mean_no_oracle_acc", "mean_task_id_acc",
                        "mean_oracle_acc")}})
                    log(f"ablation {kind} {step}: {r['mean_packet_bytes'] / 1000:.1f} KB, "
                        f"acc {100 * r['mean_no_oracle_acc']:.2f} % (task-id {100 * r['mean_task_id_acc']:.2f}, "
                        f"oracle {100 * r['mean_oracle_acc']:.2f})")
        previous = [] if args.no_previous else sweep("previous", previous_ladder)
    payload = {"tasks": [t.name for t in tasks], "n_tasks": len(tasks),
               "classes": {t.name: len(t.classes) for t in tasks},
               "features": (portable_path(args.features, "features") if args.features
                            else f"extracted from {portable_path(args.data, 'data')}"),
               "rom_fingerprint": device.fingerprint, "goal": {"bytes": GOAL_BYTES, "points": GOAL_POINTS},
               "over_budget_policy": "sent at the smallest ladder step (counted in over_budget); "
                                     "mean_no_oracle_acc_if_dropped = not sent, its images count as wrong",
               "evaluation": "closed set: the mapper's argmax task, then that task's head; mean over tasks",
               "fp32": fp32, "rows": rows, "verdict": goal_verdict(rows, fp32, ablation), "ablation": ablation,
               "rows_previous_ladder": previous, "seconds": round(time.perf_counter() - t_start)}
    path = write_result(args.name, payload)
    png = RESULTS / f"{args.name}.png"
    plot(rows, previous, fp32, ablation, png)
    if args.name == "packet_budget":
        update_readme("packet_budget", markdown(json.loads(path.read_text())))
    log(f"wrote {path} and {png}")
    for kind, v in payload["verdict"].items():
        log(f"goal {kind}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
