"""Beneficial biases that pay off (issue 16): gain of BB over the plain head, per task and BB mode.

For each domain-shifted skill-bench task, the oracle head's validation and test accuracy without
BB, with today's tail-only BB (split 7 on Lite0, Adam, 8 epochs) and with BB learned from earlier
split points, plus the device's default (``auto``: each task keeps the split that is best on its
validation split, or no BB when none beats the plain head there).  Every choice (the recipe, the
split, the epoch) is made on validation splits carved from train; test is only reported.

Activations are cached at the split points (one torch pass per image, float16) and the biases of the
stages after them are trained on those caches; ``--explore-*`` first compares training recipes at one
split on a subsample and the best (mean validation gain) is used for every split.  Inference cost is
measured on ORT CPU: a plain image (decode, trunk, tail) against an image routed to a BB task (the
same, plus its tail or its whole-network rerun with the biases bound).

    python benchmarks/bb_gain.py --data SKILL_BENCH_DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SKILL_BENCH, command, machine, md_table, update_readme  # noqa: E402
from skill_edge.runtime.learn.bb import BBRecipe, TAIL_RECIPE_V1, build_torch_suffix, prefix_activations, train_bb  # noqa: E402
from skill_edge.runtime.exchange.codec import encode_tensor  # noqa: E402
from skill_edge.runtime.sources.datasets import load_image_folder  # noqa: E402
from skill_edge.runtime.learn.head import train_head  # noqa: E402
from skill_edge.runtime.rom.preprocess import Preprocessing, iter_batches  # noqa: E402
from skill_edge.runtime.rom.engine import RomEngine  # noqa: E402
from skill_edge.export.backbone import build_backbone  # noqa: E402
from skill_edge.export.manifest import RomManifest  # noqa: E402

TASKS = ["gtsrb", "brain-mri", "notmnist", "quickdraw", "flowers102", "omniglot-balinese", "omniglot-sanskrit"]
#: Candidates compared on validation (``--explore-*``); BB kept only with >= 1 point validation gain.
RECIPES = {
    "adam-1e-2": BBRecipe("adam", 1e-2, 1e-3, batch_size=32, min_val_gain=0.01),
    "adam-3e-3": BBRecipe("adam", 3e-3, 3e-3, batch_size=32, min_val_gain=0.01),
    "sign-3e-3": BBRecipe("sign", 3e-3, 1e-3, batch_size=32, min_val_gain=0.01),
    "adam-1e-3": BBRecipe("adam", 1e-3, 1e-3, batch_size=32, min_val_gain=0.01),
    "adam-1e-3-aug": BBRecipe("adam", 1e-3, 1e-3, batch_size=32, min_val_gain=0.01, augment="shift+flip"),
    "adam-3e-4-aug": BBRecipe("adam", 3e-4, 1e-3, batch_size=32, min_val_gain=0.01, augment="shift+flip"),
    # the head starts at zero and learns beside the biases; epochs are judged by the refitted head
    "fresh-1e-2": BBRecipe("adam", 1e-2, 1e-2, batch_size=32, min_val_gain=0.01, head_start="fresh"),
    "fresh-3e-3": BBRecipe("adam", 3e-3, 1e-2, batch_size=32, min_val_gain=0.01, head_start="fresh"),
}
#: Tasks whose labels survive a horizontal flip (natural images); signs, characters and sketches are
#: only shifted (an augmenting recipe's ``shift+flip`` becomes ``shift`` for them).
FLIP_OK = {"flowers102", "brain-mri", "cifar10", "clothing", "ants-bees", "weather", "coil20"}


def sample(paths: list, labels: list, cap: int | None, seed: int) -> tuple[list, np.ndarray]:
    """A stratified, seeded subsample of at most ``cap`` items (all when ``cap`` is None)."""
    y = np.asarray(labels)
    if cap is None or len(y) <= cap:
        return list(paths), y
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:max(1, round(cap * np.mean(y == c)))]
                          for c in np.unique(y)])
    idx = np.sort(idx)
    return [paths[i] for i in idx], y[idx]


def encoded_bytes(bb: np.ndarray, enc: str) -> int:
    return int(sum(v.nbytes for v in encode_tensor(np.asarray(bb, np.float32), enc).values()))


def suffix_features(mod, acts: np.ndarray, bb: np.ndarray | None) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        b = None if bb is None else torch.from_numpy(bb)
        for i in range(0, len(acts), 128):
            a = torch.from_numpy(acts[i:i + 128]).float()
            out.append(mod(a, None if b is None else b.expand(len(a), -1)).numpy())
    return np.concatenate(out)


def accuracy(head, feats: np.ndarray, y: np.ndarray) -> float:
    return float(((feats @ head.weight.T + head.bias).argmax(1) == y).mean())


def inference_cost(rom: Path, paths: list, bb_tail: np.ndarray, bb_suffix: np.ndarray, repeats: int = 3) -> dict:
    """Seconds per image on ORT CPU: plain classify pass vs one routed to a tail / whole-network BB task."""
    eng = RomEngine(rom, providers=["cpu"])
    eng.extract(paths[:16])  # warm-up
    x = np.stack([eng.preprocess(p) for p in paths])
    eng.tail(eng.trunk(x[:16]), bb_tail), eng.full(x[:16], bb_suffix)  # bind + warm the sessions
    res = {"plain": [], "tail": [], "full": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        ex = eng.extract(paths, keep_trunk=True)
        t1 = time.perf_counter()
        for i in range(0, len(x), 16):
            eng.tail(ex.trunk_acts[i:i + 16], bb_tail)
        t2 = time.perf_counter()
        for i in range(0, len(x), 16):
            eng.full(x[i:i + 16], bb_suffix)
        t3 = time.perf_counter()
        res["plain"].append((t1 - t0) / len(x))
        res["tail"].append((t2 - t1) / len(x))
        res["full"].append((t3 - t2) / len(x))
    plain = float(np.median(res["plain"]))
    tail = float(np.median(res["tail"]))
    full = float(np.median(res["full"]))
    return {"images": len(paths), "plain_s_per_image": plain, "tail_rerun_s_per_image": tail,
            "full_rerun_s_per_image": full, "ratio_tail": (plain + tail) / plain, "ratio_full": (plain + full) / plain,
            "macs": eng.manifest.macs_per_image}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SKILL_BENCH)
    ap.add_argument("--rom", type=Path, default=Path(__file__).resolve().parents[1] / "models/rom/efficientnet_lite0")
    ap.add_argument("--tasks", nargs="*", default=TASKS)
    ap.add_argument("--splits", nargs="*", type=int, default=[7, 5], help="BB split points (first trained stage)")
    ap.add_argument("--train-cap", type=int, default=400, help="train images per task (stratified sample)")
    ap.add_argument("--test-cap", type=int, default=300, help="test images per task (stratified sample)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--patience", type=int, default=2)
    ap.add_argument("--explore-split", type=int, default=7)
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--explore-tasks", nargs="*", default=None, help="tasks the recipes are compared on (default all)")
    ap.add_argument("--name", default="bb_gain")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    man = RomManifest.read(args.rom)
    backbone = build_backbone(man.backbone, weights=args.rom / man.weights_file)
    pre = Preprocessing.from_manifest(man.preprocessing)
    mods = {s: build_torch_suffix(args.rom, s) for s in args.splits}
    data: dict[str, dict] = {}
    timings: dict[str, float] = {"cache_activations_s": 0.0, "train_s": 0.0}
    rows: list[dict] = []
    plain_heads = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    tail_split = man.tail_split
    cost: dict = {}
    chosen_recipe: dict[str, str] = {}
    gains: dict[str, list[float]] = {}

    def cache(task: str) -> dict:
        """1. activations at the split points, float16, one torch pass per image (a stratified sample)."""
        ds = load_image_folder(args.data / task)
        tr_p, tr_y = sample(ds.train.paths, ds.train.labels, args.train_cap, 0)
        te_p, te_y = sample(ds.test.paths, ds.test.labels, args.test_cap, 1)
        d = {"classes": ds.classes, "n_train_all": len(ds.train), "n_test_all": len(ds.test)}
        for part, paths, y in (("train", tr_p, tr_y), ("test", te_p, te_y)):
            kept: list[int] = []

            def batches():
                for b in iter_batches(paths, pre, 32, workers=1):
                    kept.extend(int(i) for i in b.index)
                    if len(b.index):
                        yield b.x

            acts = prefix_activations(args.rom, batches(), args.splits, backbone=backbone)
            d[part] = {"acts": {s: acts[s] for s in args.splits}, "features": acts[-1], "y": y[np.asarray(kept)],
                       "paths": [paths[i] for i in kept]}
        return d

    def row(task: str, mode: str, split: int | None, recipe: dict | None, val: float, val_without: float,
            test: float, kept: bool, seconds: float, bb: np.ndarray | None, extra: dict | None = None) -> dict:
        d = data[task]
        r = {"task": task, "mode": mode, "split": split, "recipe": recipe, "val_acc": val,
             "val_acc_without_bb": val_without, "test_acc": test, "test_acc_no_bb": d["no_bb_test"],
             "test_delta": test - d["no_bb_test"], "kept": kept, "train_s": seconds,
             "bias_values": int(bb.size) if bb is not None else 0,
             "bias_bytes_f16": encoded_bytes(bb, "f16") if bb is not None else 0,
             "bias_bytes_int8": encoded_bytes(bb, "i8r") if bb is not None else 0,
             "n_train": int(len(d["train"]["y"])), "n_test": int(len(d["test"]["y"])), **(extra or {})}
        rows.append(r)
        (RESULTS / f"{args.name}.partial.json").write_text(json.dumps({"rows": rows, "timings": timings}, indent=1,
                                                                     default=float))
        print(f"[{time.perf_counter() - t_start:6.0f}s] {task:18s} {mode:22s} val {val:.4f} (plain {val_without:.4f}) "
              f"test {test:.4f} ({r['test_delta']*100:+.2f}) kept={kept} {seconds:.0f}s", flush=True)
        return r

    def run(task: str, mode: str, split: int, recipe: BBRecipe) -> dict:
        d = data[task]
        if recipe.augment and split != 0:  # activations past stage 0 cannot be cropped or flipped
            recipe = dataclasses.replace(recipe, augment=None)
        elif recipe.augment == "shift+flip" and task not in FLIP_OK:
            recipe = dataclasses.replace(recipe, augment="shift")
        tr = d["train"]
        fit = train_bb(args.rom, tr["acts"][split], tr["y"], len(d["classes"]), plain_heads[task],
                       split=split, recipe=recipe, plain_features=tr["features"], suffix=mods[split])
        test = d["no_bb_test"]
        if fit.kept:
            feats = suffix_features(mods[split], d["test"]["acts"][split], fit.bb)
            test = accuracy(fit.head, feats, d["test"]["y"])
        timings["train_s"] += fit.seconds
        return row(task, mode, split, recipe.to_dict(), fit.val_accuracy, fit.val_accuracy_without_bb, test,
                   fit.kept, fit.seconds, fit.bb if fit.kept else None,
                   {"best_epoch": fit.head.history.get("bb_best_epoch", 0), "epochs_run": fit.epochs_run,
                    "val_history": fit.history, "bias_values_trained": int(fit.bb.size)})

    def with_epochs(name: str) -> BBRecipe:
        b = RECIPES[name]
        return dataclasses.replace(b, epochs=args.epochs, patience=args.patience)

    # Each task is done whole before the next (results are written after every task): cache, the plain
    # head, every recipe at the explore split (the tail: cheap), the recipe best on *this task's*
    # validation split for the other splits, today's tail BB, and the auto default.
    for task in args.tasks:
        t0 = time.perf_counter()
        data[task] = d = cache(task)
        timings["cache_activations_s"] += time.perf_counter() - t0
        print(f"[{time.perf_counter() - t_start:6.0f}s] cached {task}: {len(d['train']['y'])} train, "
              f"{len(d['test']['y'])} test", flush=True)
        if not cost:  # 1b. inference cost of a routed image, on the first task's test images
            t0 = time.perf_counter()
            rng = np.random.default_rng(0)
            cost.update(inference_cost(args.rom, d["test"]["paths"][:64],
                                       rng.normal(0, 0.1, man.tail_bias_total).astype(np.float32),
                                       rng.normal(0, 0.1, man.bias_suffix_total(min(args.splits))).astype(np.float32)))
            timings["inference_cost_s"] = time.perf_counter() - t0
        # 2. the plain head (no BB)
        t0 = time.perf_counter()
        head = train_head(d["train"]["features"], d["train"]["y"], len(d["classes"]))
        plain_heads[task] = head
        d["no_bb_test"] = accuracy(head, d["test"]["features"], d["test"]["y"])
        row(task, "no_bb", None, None, head.val_accuracy, head.val_accuracy, d["no_bb_test"], False,
            time.perf_counter() - t0, None)
        # 3. the recipes at the explore split, judged on validation
        explored = {}
        for name in args.recipes:
            explored[name] = run(task, f"split{args.explore_split}/{name}", args.explore_split, with_epochs(name))
            gains.setdefault(name, []).append(explored[name]["val_acc"] - explored[name]["val_acc_without_bb"])
        best_name = max(args.recipes, key=lambda n: (explored[n]["val_acc"], -args.recipes.index(n)))
        chosen_recipe[task] = best_name
        # 4. every split with that recipe
        per_split = {}
        for split in args.splits:
            if split == args.explore_split:
                r = dict(explored[best_name])
                r["mode"] = f"split{split}"
                rows.append(r)
            else:
                r = run(task, f"split{split}", split, with_epochs(best_name))
            per_split[split] = r
        # 5. today's tail-only BB
        if tail_split in args.splits:
            run(task, "tail_v1", tail_split, TAIL_RECIPE_V1)
        # 6. the default: the split best on validation among those kept, else no BB
        cands = [r for r in per_split.values() if r["kept"]]
        spent = sum(r["train_s"] for r in per_split.values()) + (
            sum(explored[n]["train_s"] for n in args.recipes if n != best_name))
        if cands:  # best validation accuracy; on a tie, the later (cheaper) split
            pick = max(cands, key=lambda r: (r["val_acc"], r["split"]))
            r = dict(pick)
            r.update(mode="auto", train_s=spent, chosen_split=pick["split"])
        else:
            r = dict(next(x for x in rows if x["task"] == task and x["mode"] == "no_bb"))
            r.update(mode="auto", train_s=spent, chosen_split=None, kept=False)
        rows.append(r)
        print(f"{task:18s} auto -> split {r['chosen_split']} test {r['test_acc']:.4f} ({r['test_delta']*100:+.2f})",
              flush=True)
        write_outputs(args, rows, timings, cost, chosen_recipe, gains, tail_split, t_start)


def write_outputs(args, rows: list[dict], timings: dict, cost: dict, chosen_recipe: dict, gains: dict,
                  tail_split: int, t_start: float) -> None:
    for r in rows:
        s = r.get("chosen_split", r["split"]) if r["mode"] == "auto" else r["split"]
        r["inference_cost_ratio"] = (1.0 if not r["kept"] or s is None else
                                     cost["ratio_tail"] if s == tail_split else cost["ratio_full"])
        r["rerun_graph"] = None if not r["kept"] or s is None else "tail" if s == tail_split else "full"
    timings["total_s"] = time.perf_counter() - t_start
    auto = [r for r in rows if r["mode"] == "auto"]
    deltas = {r["task"]: r["test_delta"] for r in auto}
    summary = {"default_mode": "auto", "tasks": len(auto), "mean_gain": float(np.mean(list(deltas.values()))),
               "worst_task_delta": float(min(deltas.values())),
               "inference_cost_ratio": float(max(r["inference_cost_ratio"] for r in auto)),
               "recipe_per_task": chosen_recipe,
               "recipe_val_gain": {k: float(np.nanmean(v)) for k, v in gains.items()},
               "splits_tried": args.splits, "tail_split": tail_split,
               "tasks_planned": len(args.tasks),
               "goals": {"mean_gain_min": 0.03, "worst_task_delta_min": -0.005, "inference_cost_ratio_max": 2.1,
                         "total_minutes_max": 60},
               "minutes": timings["total_s"] / 60}
    for mode in ["tail_v1", *[f"split{s}" for s in args.splits]]:
        rs = [r for r in rows if r["mode"] == mode]
        if rs:
            summary[f"mean_gain_{mode}"] = float(np.mean([r["test_delta"] for r in rs]))
    payload = {"benchmark": args.name, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
               "command": command(),
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("data", "rom")},
               "activation_cache": "float16 activations at every split point, one torch pass per image; "
                                   "training reruns only the suffix",
               "inference_cost": cost, "timings": timings, "summary": summary,
               "rows": rows}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(payload, indent=2, default=float) + "\n")
    if summary["tasks"] == summary["tasks_planned"]:
        (RESULTS / f"{args.name}.partial.json").unlink(missing_ok=True)
    write_readme(payload, args.name)


def write_readme(p: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, s = p["rows"], p["summary"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    explore = p["settings"]["explore_split"]
    recipes = [f"split{explore}/{n}" for n in p["settings"]["recipes"]] if len(p["settings"]["recipes"]) > 1 else []
    modes = [m for m in ["no_bb", "tail_v1", *recipes, *[f"split{x}" for x in s["splits_tried"]], "auto"]
             if any(r["mode"] == m for r in rows)]
    get = {(r["task"], r["mode"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(10, 4.2))
    w = 0.8 / max(1, len(modes) - 1)
    for i, m in enumerate(modes[1:]):
        ax.bar(np.arange(len(tasks)) + i * w, [100 * get[(t, m)]["test_delta"] if (t, m) in get else 0 for t in tasks],
               w, label=m)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-0.5, color="r", lw=0.8, ls=":", label="-0.5 point limit")
    ax.set_xticks(np.arange(len(tasks)) + w * (len(modes) - 2) / 2, tasks, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy gain over no BB (points)")
    ax.set_title(f"BB gain, oracle head (mean gain of auto: {100 * s['mean_gain']:+.2f} points)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    table = []
    for t in tasks:
        cells = [t]
        for m in modes:
            r = get.get((t, m))
            if r is None:
                cells.append("")
                continue
            mark = "" if m == "no_bb" else (" ✓" if r["kept"] else " ✗")
            split = f" @{r['chosen_split']}" if m == "auto" and r.get("chosen_split") is not None else ""
            cells.append(f"{100 * r['test_acc']:.1f}{mark}{split}")
        table.append(cells)
    md = f"""### Beneficial biases that pay off (`bb_gain.py`)

Oracle head test accuracy (%) per BB mode; ✓ = BB kept on validation, ✗ = not kept (the plain head ships).
`splitN` learns the biases of stages N.. (Lite0: 7 = today's tail, 3,904 biases; 5 = 16,912; 0 = the whole network, 21,008);
`auto` (the default) keeps each task's best split on validation; `splitN/recipe` columns are the recipes
compared at the explore split, side by side on the same images. Recipe chosen per task on its validation
split at split {explore}: {', '.join(f'{t} {n}' for t, n in s['recipe_per_task'].items())} (mean validation gains there:
{', '.join(f'{k} {100 * v:+.2f}' for k, v in s['recipe_val_gain'].items())}). {s['tasks']} of {s['tasks_planned']} tasks done.

{md_table(['task', *modes], table)}

Summary (default `auto` against no BB, test): mean gain **{100 * s['mean_gain']:+.2f} points** (goal +3.0),
worst task {100 * s['worst_task_delta']:+.2f} points (goal ≥ −0.5), routed image {s['inference_cost_ratio']:.2f}× a plain one
(goal ≤ 2.1), {s['minutes']:.0f} min for the benchmark (goal 60). Machine: {p['machine'].get('cpu')}, {p['machine'].get('cores')} cores.
Command: `{p['command']}`.

![BB gain](results/{name}.png)
"""
    update_readme(name, md)


if __name__ == "__main__":
    main()
