"""How no-oracle accuracy degrades with the number of tasks T (paper Fig. 6 and 8), and an
extrapolation check by simulation out to 1,000 tasks (issue 18, section 2).

1. Heads and anchors of every task found under the ``--features`` roots (skill-bench's 21 and
   skill-bench-more's 50: 71) are learned once with the device code (``Device.learn_features``)
   and cached under ``--cache`` (keyed by the training arrays and the learning code).
2. For ``--orders`` random task orders and every T = 1..N, each mapper kind the runtime knows
   (``runtime.device.MAPPER_ALIASES``, built with ``runtime.mapping.mapper.build_mapper``; a kind added
   there is included by rerunning) holds the first T tasks of the order and classifies, with no
   task oracle and closed-set, up to ``--max-test`` seeded test rows of each of those tasks.
   Per T: average normalized accuracy (no-oracle / oracle, per task, then the mean: Fig. 6),
   absolute accuracy (Fig. 8) and task-ID accuracy, also for the Omniglot family (``omniglot-*``)
   and the rest apart.  A kind whose per-task scores do not depend on the other tasks (GMMC:
   checked at run time against a mapper over a random subset) is scored once over all tasks and
   its decisions for T tasks are the argmax over their columns; any other kind (Mahalanobis: the
   tied covariance comes from the tasks held) is rebuilt for every T of every order.
3. A line y = a T + b is fitted per order and per kind (slope spread over orders, zero crossing,
   "no zero crossing" when the slope is not negative), beside the paper's lines.
4. Simulation: synthetic tasks are real tasks moved by an offset drawn from the spread of their
   own family's task means (``delta = (mean_q - mean_r) / sqrt 2``, q and r two other tasks of
   the parent's family, so two synthetic children differ like two real siblings), their anchors
   and test features moved alike.  Parents are drawn uniformly from the real tasks, so the
   Omniglot look-alikes are 50/71 of the synthetic tasks too.  The same metrics are measured
   out to ``--sim-tasks`` (1,000) on a grid of T, and compared with the real curve where they
   overlap.

    flock /work/cache/heavy.lock python benchmarks/skill_scale.py \\
        --features FEATURES_DIR FEATURES_MORE_DIR --cache CACHE_DIR
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, md_table, update_readme, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
#: The paper's fitted lines (Fig. 6): normalized accuracy = slope * T + intercept.
PAPER_FITS = {"gmmc": {"slope": -0.0005, "intercept": 0.978, "zero_at": 1956},
              # the paper prints only the zero crossing for Mahalanobis ("results are similar"): its line
              # is drawn through GMMC's intercept, an assumption the legend states
              "maha": {"slope": -0.978 / 2445, "intercept": 0.978, "zero_at": 2445, "intercept_assumed": True}}
#: Code whose change makes the cached heads and anchors stale.
LEARN_CODE = ("runtime/mapping/anchors.py", "runtime/learn/head.py", "runtime/mapping/gmm.py", "runtime/knowledge/records.py")
FAMILY = "omniglot-"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def mapper_kinds() -> list[str]:
    """Every task-mapper kind the device knows, in a stable order."""
    from skill_edge.runtime.device import MAPPER_ALIASES

    return list(dict.fromkeys(MAPPER_ALIASES.values()))


# ----------------------------------------------------------------------------- data and learning
@dataclasses.dataclass
class Task:
    name: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    s_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    s_test: np.ndarray

    @property
    def omniglot(self) -> bool:
        return self.name.startswith(FAMILY)


def load_tasks(roots: list[Path]) -> list[Task]:
    out = []
    for root in roots:
        for d in sorted(p for p in root.iterdir() if (p / "train.npz").exists() and (p / "test.npz").exists()):
            tr, te = np.load(d / "train.npz"), np.load(d / "test.npz")
            out.append(Task(d.name, [str(c) for c in tr["classes"]], tr["features"].astype(np.float32),
                            tr["labels"].astype(np.int64), tr["trunk_stats"].astype(np.float32),
                            te["features"].astype(np.float32), te["labels"].astype(np.int64),
                            te["trunk_stats"].astype(np.float32)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise SystemExit(f"a task name appears under two feature roots: {sorted({n for n in names if names.count(n) > 1})}")
    return out


def learned(tasks: list[Task], cache: Path, rom: Path, kinds: list[str], newest: bool = False):
    """Every task's ``TaskKnowledge`` as the device learns it, from the cache when it is there.

    ``newest``: take each task's most recently written cache entry, whatever code wrote it (a
    second benchmark reading what this one just learned, while others commit to the learning code)."""
    from safetensors.numpy import load_file, save_file

    from skill_edge.runtime.device import Device
    from skill_edge.runtime.knowledge.records import TaskKnowledge

    if newest:
        stems = [max(cache.glob(f"{t.name}-*.json"), key=lambda p: p.stat().st_mtime, default=None) for t in tasks]
        if all(stems):
            log(f"heads and anchors: the newest cache entry of each task ({len(stems)} tasks)")
            return [TaskKnowledge.from_parts(json.loads(p.read_text()), load_file(str(p.with_suffix(".safetensors"))))
                    for p in stems]

    code = hashlib.sha256(b"".join((REPO / f).read_bytes() for f in LEARN_CODE) + ",".join(kinds).encode())
    device = None
    out = []
    cache.mkdir(parents=True, exist_ok=True)
    for t in tasks:
        h = code.copy()
        h.update(t.name.encode())
        for a in (t.x_train, t.y_train, t.s_train):
            h.update(np.ascontiguousarray(a).tobytes())
        stem = cache / f"{t.name}-{h.hexdigest()[:16]}"
        if stem.with_suffix(".json").exists():
            out.append(TaskKnowledge.from_parts(json.loads(stem.with_suffix(".json").read_text()),
                                                load_file(str(stem.with_suffix(".safetensors")))))
            continue
        if device is None:
            device = Device(Path(tempfile.mkdtemp(prefix="skill-scale-")), rom)
        t0 = time.perf_counter()
        k, _ = device.learn_features(t.name, t.classes, t.x_train, t.y_train, trunk_stats=t.s_train, mappers=kinds)
        log(f"learned {t.name} ({len(t.classes)} classes, {len(t.y_train)} rows) in {time.perf_counter() - t0:.1f} s")
        save_file(k.tensors(), str(stem.with_suffix(".safetensors")))
        stem.with_suffix(".json").write_text(json.dumps(k.metadata()))
        out.append(k)
    return out


# ----------------------------------------------------------------------------- evaluation
@dataclasses.dataclass
class Rows:
    """The evaluated test rows of every task, in the anchors' space, with what the oracle head gets."""

    z: np.ndarray  # [R, A] transformed features
    task: np.ndarray  # [R] index of the row's task
    head_ok: np.ndarray  # [R] the task's own head is right (the oracle)


def eval_rows(tasks: list[Task], knowledge, max_test: int, seed: int) -> Rows:
    from skill_edge.runtime.mapping.anchors import transform_features

    rng = np.random.default_rng(seed)
    zs, owner, ok = [], [], []
    for i, (t, k) in enumerate(zip(tasks, knowledge)):
        idx = np.arange(len(t.y_test))
        if len(idx) > max_test:
            idx = np.sort(rng.choice(len(idx), max_test, replace=False))
        x, y, s = t.x_test[idx], t.y_test[idx], None if t.s_test is None else t.s_test[idx]
        zs.append(transform_features(x, k.meta.feature_transform, s).astype(np.float32))
        owner.append(np.full(len(idx), i))
        ok.append((x @ k.head_weight.T + k.head_bias).argmax(1) == y)
    return Rows(np.concatenate(zs), np.concatenate(owner), np.concatenate(ok))


def build(kind: str, knowledge):
    from skill_edge.runtime.mapping.mapper import build_mapper

    return build_mapper(kind, knowledge)


def separable(kind: str, knowledge, z: np.ndarray, seed: int) -> tuple[bool, np.ndarray | None]:
    """Whether ``kind``'s per-task scores ignore the other tasks held (then the full score matrix
    answers every T); checked on a random third of the tasks against the mapper over all of them."""
    full = build(kind, knowledge).task_scores(z)
    rng = np.random.default_rng(seed)
    sub = np.sort(rng.choice(len(knowledge), max(2, len(knowledge) // 3), replace=False))
    part = build(kind, [knowledge[i] for i in sub]).task_scores(z)
    ok = bool(np.allclose(part, full[:, sub], rtol=1e-4, atol=1e-3 * float(np.abs(full).mean() + 1)))
    decisions_equal = float((part.argmax(1) == full[:, sub].argmax(1)).mean())
    log(f"{kind}: per-task scores {'do not depend' if ok else 'depend'} on the other tasks "
        f"(subset of {len(sub)}: decisions equal on {decisions_equal:.4%} of rows)")
    return ok, (full if ok else None)


def metrics_for(pred: np.ndarray, owner: np.ndarray, head_ok: np.ndarray, held: np.ndarray,
                oracle: np.ndarray, omni: np.ndarray) -> dict[str, float]:
    """Per-task means over the tasks ``held`` (global indices) for rows owned by them; ``pred`` is global."""
    right = pred == owner
    n = np.bincount(owner, minlength=len(oracle)).astype(np.float64)
    tid = np.bincount(owner, weights=right, minlength=len(oracle)) / np.maximum(n, 1)
    noor = np.bincount(owner, weights=right & head_ok, minlength=len(oracle)) / np.maximum(n, 1)
    norm = noor / np.maximum(oracle, 1e-12)
    h_om, h_rest = held[omni[held]], held[~omni[held]]
    return {"normalized": float(norm[held].mean()), "absolute": float(noor[held].mean()),
            "oracle": float(oracle[held].mean()), "task_id": float(tid[held].mean()),
            "task_id_omniglot": float(tid[h_om].mean()) if len(h_om) else float("nan"),
            "task_id_rest": float(tid[h_rest].mean()) if len(h_rest) else float("nan")}


METRICS = ("normalized", "absolute", "oracle", "task_id", "task_id_omniglot", "task_id_rest")


def curves(kind: str, knowledge, rows: Rows, orders: list[np.ndarray], t_values: list[int], omni: np.ndarray,
           seed: int, note=None, rebuilt_t=None, separable_known: bool | None = None) -> dict[str, np.ndarray]:
    """metric -> [orders, len(t_values)] for one mapper kind.

    A kind that must be rebuilt for every T is measured only at ``rebuilt_t`` (when given; NaN
    elsewhere): on 2 shared cores a Mahalanobis mapper over T tasks costs its exemplar scatter and a
    D x D factorisation per T.  ``separable_known=False`` skips the separability probe."""
    n_tasks = len(knowledge)
    oracle = (np.bincount(rows.task, weights=rows.head_ok, minlength=n_tasks)
              / np.maximum(np.bincount(rows.task, minlength=n_tasks), 1))
    out = {m: np.full((len(orders), len(t_values)), np.nan) for m in METRICS}
    sep, full = (False, None) if separable_known is False else separable(kind, knowledge, rows.z, seed)
    t0 = time.perf_counter()
    for o, order in enumerate(orders):
        for j, t in enumerate(t_values):
            if not sep and rebuilt_t is not None and t not in rebuilt_t:
                continue
            held = np.sort(order[:t])
            mask = np.isin(rows.task, held)
            if sep:
                pred = held[full[np.ix_(mask, held)].argmax(1)]
            else:
                pred = held[build(kind, [knowledge[i] for i in held]).task_scores(rows.z[mask]).argmax(1)]
            m = metrics_for(pred, rows.task[mask], rows.head_ok[mask], held, oracle, omni)
            for key in METRICS:
                out[key][o, j] = m[key]
        log(f"{kind}: order {o + 1}/{len(orders)} done ({time.perf_counter() - t0:.0f} s); at T = {t_values[-1]}: "
            f"normalized {out['normalized'][o, -1]:.4f}, task-ID {out['task_id'][o, -1]:.4f}")
    if note is not None:
        note[kind] = ("one score matrix, columns per T" if sep else
                      "mapper rebuilt for every T" if rebuilt_t is None else
                      f"mapper rebuilt for each T of {sorted(set(rebuilt_t) & set(t_values))}")
    return out


# ----------------------------------------------------------------------------- fits
def fit_line(t: np.ndarray, y: np.ndarray) -> dict:
    a, b = np.polyfit(np.asarray(t, np.float64), np.asarray(y, np.float64), 1)
    resid = y - (a * t + b)
    return {"slope": float(a), "intercept": float(b), "zero_at": zero_crossing(a, b),
            "rms_residual": float(np.sqrt(np.mean(resid ** 2)))}


def zero_crossing(a: float, b: float) -> float | None:
    """Where a*T + b reaches zero, for a falling line from a positive intercept; None otherwise
    (a slope of about zero or above never reaches it: no 1e16 task counts)."""
    if b <= 0 or a >= -1e-7:
        return None
    return float(-b / a)


def predict(fit: dict, t: float) -> float:
    return float(np.clip(fit["slope"] * t + fit["intercept"], 0.0, 1.0))


def fmt_zero(z: float | None) -> str:
    return "no zero crossing" if z is None else f"{z:,.0f}"


def fits(curve: dict[str, np.ndarray], t_values: list[int], fit_range: tuple[int, int]) -> dict:
    t = np.asarray(t_values, np.float64)
    sel = (t >= fit_range[0]) & (t <= fit_range[1]) & np.isfinite(curve["normalized"][0])
    per_order = [fit_line(t[sel], row[sel]) for row in curve["normalized"]]
    mean_fit = fit_line(t[sel], curve["normalized"].mean(0)[sel])
    slopes = np.array([f["slope"] for f in per_order])
    inter = np.array([f["intercept"] for f in per_order])
    zeros = [f["zero_at"] for f in per_order]
    # how well a line fitted on the first half predicts the second: where the line is trustworthy
    half = sel & (t <= fit_range[1] // 2)
    first_half = fit_line(t[half], curve["normalized"].mean(0)[half])
    end = float(curve["normalized"].mean(0)[sel][-1])
    return {"range": list(fit_range), "mean_curve": mean_fit,
            "slope_mean": float(slopes.mean()), "slope_std": float(slopes.std(ddof=1)) if len(slopes) > 1 else 0.0,
            "slope_min": float(slopes.min()), "slope_max": float(slopes.max()),
            "intercept_mean": float(inter.mean()), "intercept_std": float(inter.std(ddof=1)) if len(inter) > 1 else 0.0,
            "zero_at_per_order": zeros, "per_order": per_order,
            "half_fit": {**first_half, "predicts_at_end": predict(first_half, fit_range[1]), "measured_at_end": end},
            "log_fit": log_fit(t[sel], curve["normalized"].mean(0)[sel])}


def log_fit(t: np.ndarray, y: np.ndarray) -> dict:
    a, b = np.polyfit(np.log(t), y, 1)
    resid = y - (a * np.log(t) + b)
    return {"slope_per_log_t": float(a), "intercept": float(b), "rms_residual": float(np.sqrt(np.mean(resid ** 2))),
            "at_102": float(a * np.log(102) + b), "at_1000": float(a * np.log(1000) + b)}


# ----------------------------------------------------------------------------- simulation
def synthetic(knowledge, rows: Rows, omni: np.ndarray, n: int, per_task: int, seed: int, scale: float = 1.0):
    """``n`` synthetic tasks: a real parent moved by a family-spread offset; anchors and test rows alike.

    Returns (knowledge list, Rows with task = synthetic index, parent index per synthetic task)."""
    from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor

    rng = np.random.default_rng(seed)
    means = np.stack([rows.z[rows.task == i].mean(0) for i in range(len(knowledge))]).astype(np.float64)
    fam = [np.flatnonzero(omni == omni[i]) for i in range(len(knowledge))]
    parents = rng.integers(0, len(knowledge), n)
    out, zs, owner, ok = [], [], [], []
    for s, p in enumerate(parents):
        pool = fam[p][fam[p] != p]
        q, r = rng.choice(pool, 2, replace=False)
        delta = (scale * (means[q] - means[r]) / np.sqrt(2.0)).astype(np.float32)
        k = knowledge[p]
        g = k.gmmc and GmmcAnchor(k.gmmc.means + delta, k.gmmc.variances, k.gmmc.weights)
        m = k.maha and MahalanobisAnchor(k.maha.class_means + delta, k.maha.exemplars + delta, k.maha.exemplar_labels)
        out.append(dataclasses.replace(k, task=f"syn{s:05d}", gmmc=g, maha=m))
        idx = np.flatnonzero(rows.task == p)
        if len(idx) > per_task:
            idx = np.sort(rng.choice(idx, per_task, replace=False))
        zs.append(rows.z[idx] + delta)
        owner.append(np.full(len(idx), s))
        ok.append(rows.head_ok[idx])
    return out, Rows(np.concatenate(zs), np.concatenate(owner), np.concatenate(ok)), parents


def simulate(kinds, knowledge, rows, omni, args, real: dict) -> dict:
    """Per kind: the offset scale calibrated on the real curve (T <= the real task count), then the
    simulation out to ``--sim-tasks`` at that scale, and at scale 1 (uncalibrated) beside it."""
    n_real = len(knowledge)
    grid = sorted({t for t in args.sim_grid if t <= args.sim_tasks} | {args.sim_tasks})
    small = [t for t in grid if t <= n_real] + ([n_real] if n_real not in grid else [])
    orders = [np.random.default_rng(args.seed + 2000 + o).permutation(args.sim_tasks) for o in range(args.sim_orders)]
    out = {"tasks": args.sim_tasks, "test_rows_per_task": args.sim_test, "orders": args.sim_orders, "t": grid,
           "calibration_t": small, "kinds": {}}
    for kind in kinds:
        probe, _, _ = synthetic(knowledge, rows, omni, 2, args.sim_test, args.seed + 1000)
        if not all(_has_anchor(k, kind) for k in probe):
            log(f"simulation: {kind} skipped (its anchor is not one the simulation knows how to move)")
            continue
        rebuilt = "rebuilt" in real[kind].get("how_scored", "")
        real_mean = np.asarray(real[kind]["curves"]["normalized"]["mean"], np.float64)
        cal_t = [t for t in small if np.isfinite(real_mean[t - 1])] if not rebuilt else \
            [t for t in args.sim_grid_rebuilt if t <= n_real and np.isfinite(real_mean[t - 1])]
        want = real_mean[np.asarray(cal_t) - 1]
        grid_k = grid if not rebuilt else sorted({t for t in args.sim_grid_rebuilt if t <= args.sim_tasks})
        known = False if rebuilt else None
        rms = {}
        for sc in args.sim_scales:  # calibration: n_real synthetic tasks, the real curve's T range
            sk, sr, par = synthetic(knowledge, rows, omni, n_real, args.sim_test, args.seed + 1000, sc)
            cal_orders = [np.random.default_rng(args.seed + 3000 + o).permutation(n_real) for o in range(2)]
            c = curves(kind, sk, sr, cal_orders, cal_t, omni[par], args.seed, separable_known=known)
            rms[sc] = float(np.sqrt(np.mean((c["normalized"].mean(0) - want) ** 2)))
            log(f"simulation {kind}: offset scale {sc}: rms from the real curve {rms[sc]:.4f}")
        best = min(rms, key=rms.get)
        res = {"scale": best, "calibration_rms": rms, "calibration_t": cal_t}
        for label, sc in (("calibrated", best), ("uncalibrated", 1.0)):
            if label == "uncalibrated" and best == 1.0:
                continue
            sk, sr, par = synthetic(knowledge, rows, omni, args.sim_tasks, args.sim_test, args.seed + 1000, sc)
            c = curves(kind, sk, sr, orders[:1] if label == "uncalibrated" or rebuilt else orders, grid_k, omni[par],
                       args.seed, separable_known=known)
            res[label] = {m: summary(v) for m, v in c.items()}
            res[label]["t"] = grid_k
            res[label]["omniglot_share"] = float(omni[par].mean())
        res.update(res["calibrated"])  # the calibrated curves are the simulation's answer (with their "t")
        out["kinds"][kind] = res
    return out


def _has_anchor(k, kind: str) -> bool:
    try:
        build(kind, [k])
        return kind in ("gmmc", "maha")
    except Exception:  # noqa: BLE001 - a kind this simulation cannot build from moved anchors
        return False


def summary(v: np.ndarray) -> dict:
    """Mean, min, max, std over orders per T (NaN where a T was not measured)."""
    with np.errstate(invalid="ignore"):
        return {"mean": v.mean(0).tolist(), "min": v.min(0).tolist(), "max": v.max(0).tolist(),
                "std": (v.std(0, ddof=1) if len(v) > 1 else np.zeros(v.shape[1])).tolist()}


# ----------------------------------------------------------------------------- plots
LABEL = {"gmmc": "GMMC", "maha": "Mahalanobis"}


def plots(result: dict, out_dir: Path, prefix: str = "skill_scale") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10})
    t = np.asarray(result["t"])
    kinds = list(result["kinds"])
    paths = []

    def dress(ax, title, ylabel):
        ax.set_title(title)
        ax.set_xlabel("number of tasks learned, T")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(1, t[-1])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left")

    def save(fig, name):
        fig.tight_layout()
        paths.append(out_dir / name)
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)

    def band(ax, s, color, label):
        mean, lo, hi = map(lambda v: np.asarray(v, np.float64), (s["mean"], s["min"], s["max"]))
        ok = np.isfinite(mean)
        ax.fill_between(t[ok], lo[ok], hi[ok], color=color, alpha=0.25, lw=0)
        ax.plot(t[ok], mean[ok], "o-" if ok.sum() < len(t) else "-", color=color, lw=2, ms=3, label=label)

    # Fig. 6: normalized accuracy with the fitted line and the paper's
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        r = result["kinds"][kind]
        f = r["fit"]["mean_curve"]
        band(ax, r["curves"]["normalized"], "C0",
             f"measured, mean of {result['orders']} orders (band: min-max)")
        ax.plot(t, f["slope"] * t + f["intercept"], "k--", lw=1.5,
                label=f"fit y = {f['slope']:+.5f} T + {f['intercept']:.3f}, zero at {fmt_zero(f['zero_at'])}")
        p = PAPER_FITS.get(kind, {})
        if p:
            assumed = " (intercept assumed)" if p.get("intercept_assumed") else ""
            ax.plot(t, p["slope"] * t + p["intercept"], ":", color="C3", lw=2,
                    label=f"paper y = {p['slope']:+.4f} T + {p['intercept']:.3f}{assumed}, zero at {p['zero_at']:,}")
        dress(ax, f"{LABEL.get(kind, kind)}: average normalized accuracy", "no-oracle accuracy / oracle accuracy")
    save(fig, f"{prefix}_normalized.png")

    # Fig. 8: absolute accuracy, with the oracle's
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, kind in enumerate(kinds):
        band(ax, result["kinds"][kind]["curves"]["absolute"], f"C{i}", f"{LABEL.get(kind, kind)}, no oracle")
    band(ax, result["kinds"][kinds[0]]["curves"]["oracle"], "0.4", "task oracle (same heads)")
    dress(ax, "Average absolute accuracy on the tasks learned so far", "accuracy")
    save(fig, f"{prefix}_absolute.png")

    # task-ID accuracy: Omniglot family vs the rest
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        c = result["kinds"][kind]["curves"]
        band(ax, c["task_id_omniglot"], "C1", "Omniglot alphabets (look-alike family)")
        band(ax, c["task_id_rest"], "C2", "the other tasks")
        band(ax, c["task_id"], "C0", "all tasks")
        dress(ax, f"{LABEL.get(kind, kind)}: task-ID accuracy", "fraction of test rows sent to their own task")
    save(fig, f"{prefix}_task_id.png")

    sim = result.get("simulation")
    if sim and sim["kinds"]:
        fig, ax = plt.subplots(figsize=(9, 5.5))
        for i, kind in enumerate(sim["kinds"]):
            sk = sim["kinds"][kind]
            s = sk["normalized"]
            st = np.asarray(sk.get("t", sim["t"]))
            ax.fill_between(st, s["min"], s["max"], color=f"C{i}", alpha=0.25, lw=0)
            ax.plot(st, s["mean"], "o-", color=f"C{i}", lw=2, ms=4,
                    label=f"{LABEL.get(kind, kind)}: simulation, offsets x{sk['scale']:g} (fitted on T <= {int(t[-1])})")
            if "uncalibrated" in sk:
                ax.plot(sk["uncalibrated"].get("t", st), sk["uncalibrated"]["normalized"]["mean"], "x:", color=f"C{i}",
                        lw=1, ms=4,
                        label=f"{LABEL.get(kind, kind)}: simulation, offsets x1 (not fitted)")
            real = np.asarray(result["kinds"][kind]["curves"]["normalized"]["mean"], np.float64)
            ax.plot(t[np.isfinite(real)], real[np.isfinite(real)], color=f"C{i}", lw=3, alpha=0.5,
                    label=f"{LABEL.get(kind, kind)}: real tasks")
            f = result["kinds"][kind]["fit"]["mean_curve"]
            tt = np.geomspace(1, sim["tasks"], 300)  # a line is a curve on a log axis: draw it densely
            ax.plot(tt, np.clip(f["slope"] * tt + f["intercept"], 0, None), "--", color=f"C{i}", lw=1.2,
                    label=f"{LABEL.get(kind, kind)}: line fitted on T <= {int(t[-1])}")
        p = PAPER_FITS["gmmc"]
        tt = np.geomspace(1, sim["tasks"], 300)
        ax.plot(tt, p["slope"] * tt + p["intercept"], ":", color="C3", lw=2, label="paper, GMMC line")
        ax.set_xscale("log")
        ax.set_title("Normalized accuracy out to 1,000 tasks: simulation vs extrapolated lines")
        ax.set_xlabel("number of tasks learned, T (log scale)")
        ax.set_ylabel("no-oracle accuracy / oracle accuracy")
        ax.set_xticks([1, 2, 5, 10, 20, 50, 71, 102, 200, 500, 1000])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlim(1, sim["tasks"])
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=9)
        save(fig, f"{prefix}_simulation.png")
    return paths


# ----------------------------------------------------------------------------- report
def markdown(result: dict) -> str:
    t_end = result["t"][-1]
    rows = []
    for kind, r in result["kinds"].items():
        f = r["fit"]
        z = [fmt_zero(v) for v in f["zero_at_per_order"]]
        c = r["curves"]
        sim = result.get("simulation", {}).get("kinds", {}).get(kind)
        st = list(sim.get("t", result["simulation"]["t"])) if sim else []

        def at(s, tv):
            return f"{s['mean'][st.index(tv)]:.3f}" if s and tv in st else "-"
        rows.append([
            LABEL.get(kind, kind),
            f"{f['mean_curve']['slope']:+.5f} ({f['slope_min']:+.5f} .. {f['slope_max']:+.5f})",
            f"{f['mean_curve']['intercept']:.3f} ± {f['intercept_std']:.3f}",
            f"{fmt_zero(f['mean_curve']['zero_at'])} (orders: {', '.join(z)})",
            f"{c['normalized']['mean'][-1]:.3f} ({min(c['normalized']['min'][-1:]):.3f}..{max(c['normalized']['max'][-1:]):.3f})",
            f"{c['absolute']['mean'][-1]:.3f}", f"{c['task_id']['mean'][-1]:.3f}",
            f"{c['task_id_omniglot']['mean'][-1]:.3f} / {c['task_id_rest']['mean'][-1]:.3f}",
            f"{predict(f['mean_curve'], 102):.3f} / {predict(f['mean_curve'], 1000):.3f}",
            f"{f['log_fit']['at_102']:.3f} / {f['log_fit']['at_1000']:.3f}",
            f"{at(sim and sim['normalized'], 102)} / {at(sim and sim['normalized'], result.get('simulation', {}).get('tasks'))}"
            + (f" (offsets x{sim['scale']:g})" if sim else ""),
        ])
    return "\n".join([
        f"{result['tasks']} real tasks ({result['omniglot_tasks']} Omniglot alphabets), {result['orders']} random "
        f"task orders, T = 1..{t_end}, up to {result['max_test']} seeded test rows per task, closed set, no oracle.",
        "Normalized = the task's no-oracle accuracy / its oracle accuracy (paper Fig. 6), averaged over the T tasks held.",
        "",
        md_table(["mapper", f"slope per task (orders' range)", "intercept", "zero at T", f"normalized at T = {t_end}",
                  f"absolute at {t_end}", f"task-ID at {t_end}", "task-ID Omniglot / rest",
                  "line at 102 / 1,000", "log fit at 102 / 1,000", "simulation at 102 / 1,000"], rows),
        "",
        "Paper (Fig. 6, xception, 102 tasks): GMMC y = -0.0005 T + 0.978, zero at 1,956; Mahalanobis zero at 2,445.",
    ])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, nargs="+", required=True, help="roots of <task>/{train,test}.npz")
    ap.add_argument("--cache", type=Path, required=True, help="where learned heads and anchors are kept")
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--max-test", type=int, default=100, help="seeded test rows per task")
    ap.add_argument("--kinds", nargs="*", help="mapper kinds (default: every kind the device knows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sim-tasks", type=int, default=1000)
    ap.add_argument("--sim-test", type=int, default=10, help="test rows per synthetic task")
    ap.add_argument("--sim-orders", type=int, default=2)
    ap.add_argument("--sim-grid", type=int, nargs="*",
                    default=[1, 2, 5, 10, 20, 35, 50, 71, 102, 150, 200, 300, 500, 700, 1000])
    ap.add_argument("--rebuilt-t", type=int, nargs="*",
                    default=[*range(1, 11), *range(15, 71, 5), 71],
                    help="T measured for a mapper rebuilt per T (Mahalanobis); every T for separable ones")
    ap.add_argument("--sim-grid-rebuilt", type=int, nargs="*", default=[10, 35, 71, 102, 200, 500, 1000],
                    help="simulated T for a mapper rebuilt per T (one order)")
    ap.add_argument("--sim-scales", type=float, nargs="*", default=[0.5, 0.7, 1.0],
                    help="offset scales tried when calibrating the simulation on the real curve")
    ap.add_argument("--sim-only", action="store_true",
                    help="keep results/<name>.json's real curves and run the simulation again")
    ap.add_argument("--name", default="skill_scale", help="results/<name>.json and the README section")
    args = ap.parse_args(argv)

    kinds = args.kinds or mapper_kinds()
    tasks = load_tasks(args.features)
    log(f"{len(tasks)} tasks, mapper kinds {kinds}")
    knowledge = learned(tasks, args.cache, args.rom, kinds, newest=args.sim_only)
    omni = np.array([t.omniglot for t in tasks])
    rows = eval_rows(tasks, knowledge, args.max_test, args.seed)
    log(f"{len(rows.task)} test rows")
    n = len(tasks)
    if args.sim_only:  # the real curves of the last run, the simulation again (e.g. with other scales)
        old = json.loads((RESULTS / f"{args.name}.json").read_text())
        result = {k: v for k, v in old.items() if k not in ("benchmark", "date", "machine", "command", "simulation")}
        result.setdefault("real_curves_from", {"date": old["date"], "command": old["command"],
                                               "machine": old["machine"]})
        result["simulation"] = simulate(kinds, knowledge, rows, omni, args, result["kinds"])
        return finish(result, args)
    t_values = list(range(1, n + 1))
    orders = [np.random.default_rng(args.seed + o).permutation(n) for o in range(args.orders)]
    result = {"tasks": n, "omniglot_tasks": int(omni.sum()), "task_names": [t.name for t in tasks],
              "orders": args.orders, "task_orders": [[tasks[i].name for i in o] for o in orders],
              "max_test": args.max_test, "test_rows": int(len(rows.task)), "t": t_values, "paper": PAPER_FITS,
              "how_scored": {}, "kinds": {}}
    for kind in kinds:
        t0 = time.perf_counter()
        c = curves(kind, knowledge, rows, orders, t_values, omni, args.seed, result["how_scored"],
                   rebuilt_t=sorted(set(args.rebuilt_t) | {n}))
        result["kinds"][kind] = {"curves": {m: summary(v) for m, v in c.items()}, "how_scored": result["how_scored"][kind],
                                 "fit": fits(c, t_values, (1, n)), "seconds": round(time.perf_counter() - t0, 1)}
    if args.sim_tasks > 0:
        result["simulation"] = simulate(kinds, knowledge, rows, omni, args, result["kinds"])
    return finish(result, args)


def finish(result: dict, args) -> int:
    paths = plots(result, RESULTS, args.name)
    result["plots"] = [str(p.relative_to(RESULTS.parent)) for p in paths]
    path = write_result(args.name, result)
    scrub_command(path, args.features, args.cache)
    md = markdown(result)
    (RESULTS / f"{args.name}.md").write_text(f"# Accuracy vs number of tasks\n\n{md}\n")
    if args.name == "skill_scale":
        update_readme("skill_scale", readme_section(result, md))
    log(f"wrote {path}\n{md}")
    return 0


def readme_section(result: dict, md: str) -> str:
    """The README section: the table, the plots, and what the fit can and cannot say."""
    t_end = result["t"][-1]
    lines = [f"## Accuracy vs number of tasks, {result['tasks']} real tasks (`skill_scale.py`)", "", md, ""]
    for kind, r in result["kinds"].items():
        h = r["fit"]["half_fit"]
        lines.append(f"- {LABEL.get(kind, kind)}: a line fitted on T <= {t_end // 2} predicts {h['predicts_at_end']:.3f} "
                     f"at T = {t_end}, measured {h['measured_at_end']:.3f}; rms residual of the full-range line "
                     f"{r['fit']['mean_curve']['rms_residual']:.4f} (log-T fit: {r['fit']['log_fit']['rms_residual']:.4f}). "
                     f"Scored as: {result['how_scored'].get(kind, '')}.")
    lines += ["", "![normalized accuracy vs T](results/skill_scale_normalized.png)", "",
              "![absolute accuracy vs T](results/skill_scale_absolute.png)", "",
              "![task-ID accuracy, Omniglot vs the rest](results/skill_scale_task_id.png)", ""]
    if result.get("simulation", {}).get("kinds"):
        lines += ["![simulation to 1,000 tasks](results/skill_scale_simulation.png)", ""]
    lines.append("Machine, command, task orders and every curve: `results/skill_scale.json`.")
    return "\n".join(lines)


def scrub_command(path: Path, features: list[Path], cache: Path) -> None:
    """Record the command with placeholders instead of this machine's paths."""
    data = json.loads(path.read_text())
    cmd = data["command"]
    names = {str(root): "FEATURES_DIR" if i == 0 else f"FEATURES_DIR_{i + 1}" for i, root in enumerate(features)}
    for root in sorted(names, key=len, reverse=True):  # a root may be a prefix of another (features, features-more)
        cmd = cmd.replace(root, names[root])
    data["command"] = cmd.replace(str(cache), "CACHE_DIR")
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
