"""The light device learns what the torch/scikit-learn device learned: skill-bench accuracy, side by side.

The device now fits its head with scipy's L-BFGS (``runtime.learn.head``) and its GMMC anchors with a
numpy EM (``runtime.mapping.gmm``).  The control arm is the previous device: the torch L-BFGS head (the
code as it was, kept here) and scikit-learn's ``GaussianMixture``.  Both arms learn all 21 tasks
through ``Device.learn_features`` from the same ROM features, in one run, and classify every
test image with the oracle head and with no task oracle (GMMC and Mahalanobis).

    python benchmarks/device_learning.py --features /work/cache/features
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SKILL_BENCH, md_table, task_order, update_readme, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the control arm
def torch_train_head(features, labels, num_classes, *, val_fraction=0.15, weight_decays=(1e-2, 1e-3, 1e-4),
                     max_iter=100, seed=0):
    """The head as the device fitted it before the split (torch L-BFGS), verbatim but for the imports."""
    import torch
    import torch.nn.functional as F

    from skill_edge.runtime.learn.head import HeadFit, stratified_split

    def fit(x, y, c, wd, init=None):
        d = x.shape[1]
        w = torch.zeros(c, d, dtype=x.dtype) if init is None else init[0].clone()
        b = torch.zeros(c, dtype=x.dtype) if init is None else init[1].clone()
        w.requires_grad_(True)
        b.requires_grad_(True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-6, tolerance_change=1e-9)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + 0.5 * wd * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    x = np.asarray(features, np.float32)
    y = np.asarray(labels, np.int64)
    mu, sigma = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64) + 1e-6
    xs = torch.from_numpy(((x - mu) / sigma).astype(np.float32))
    yt = torch.from_numpy(y)
    keep, held = stratified_split(y, val_fraction, seed)
    best_wd, best_acc, init, history = weight_decays[-1], -1.0, None, {}
    for wd in weight_decays:
        w, b = init = fit(xs[keep], yt[keep], num_classes, wd, init)
        acc = float(((xs[held] @ w.T + b).argmax(1) == yt[held]).double().mean())
        history[f"val_acc@wd={wd:g}"] = acc
        if acc > best_acc + 1e-9 or (abs(acc - best_acc) <= 1e-9 and wd > best_wd):
            best_wd, best_acc = wd, acc
    w, b = fit(xs, yt, num_classes, best_wd)
    w64, b64 = w.double(), b.double()
    w_raw = (w64 / torch.from_numpy(sigma)).numpy()
    b_raw = (b64 - (w64 * torch.from_numpy(mu / sigma)).sum(1)).numpy()
    return HeadFit(w_raw.astype(np.float32), b_raw.astype(np.float32), max(best_acc, 0.0), best_wd, history)


def sklearn_diag_mixture(x, k, *, reg_covar, seed=0, max_iter=100):
    """scikit-learn's GaussianMixture, as the device called it before the split."""
    from sklearn.mixture import GaussianMixture

    from skill_edge.runtime.mapping.gmm import DiagMixture

    gm = GaussianMixture(n_components=k, covariance_type="diag", reg_covar=reg_covar, max_iter=max_iter,
                         random_state=seed, init_params="kmeans").fit(np.asarray(x, np.float64))
    return DiagMixture(gm.means_, gm.covariances_, gm.weights_, bool(gm.converged_), int(gm.n_iter_))


# ----------------------------------------------------------------------------- both arms, task by task
def run_arms(data: dict, rom: Path) -> dict[str, dict]:
    """Each task is learned by both arms back to back (alternating which goes first), so machine load
    falls on both alike; then each arm classifies every test set with its own bank."""
    import skill_edge.runtime.mapping.anchors as anchors
    import skill_edge.runtime.device as device_mod
    from skill_edge.runtime.device import Device, FeatureBatch
    from skill_edge.runtime.mapping.gmm import fit_diag_mixture
    from skill_edge.runtime.learn.head import head_accuracy, train_head

    impl = {"device": (train_head, fit_diag_mixture), "control": (torch_train_head, sklearn_diag_mixture)}
    head_s = {arm: 0.0 for arm in impl}
    fit_s = {arm: 0.0 for arm in impl}
    devices = {arm: Device(Path(tempfile.mkdtemp(prefix=f"device-learning-{arm}-")), rom) for arm in impl}
    per_task: dict[str, dict[str, dict]] = {arm: {} for arm in impl}

    def timed(arm: str, fn):
        def run(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                head_s[arm] += time.perf_counter() - t0
        return run

    for i, (name, d) in enumerate(data.items()):
        for arm in (list(impl) if i % 2 == 0 else list(impl)[::-1]):
            device_mod.train_head = timed(arm, impl[arm][0])
            anchors.fit_diag_mixture = impl[arm][1]
            t0 = time.perf_counter()
            k, _ = devices[arm].learn_features(name, d["classes"], d["train_x"], d["train_y"], trunk_stats=d["train_s"])
            fit_s[arm] += time.perf_counter() - t0
            devices[arm].bank.put(k)
            per_task[arm][name] = {"oracle_acc": head_accuracy(k.head_weight, k.head_bias, d["test_x"], d["test_y"]),
                                   "weight_decay": float(k.meta.metrics["weight_decay"])}
        print(f"[{time.strftime('%H:%M:%S')}] {name}: " + ", ".join(
            f"{a} oracle {per_task[a][name]['oracle_acc']:.4f}" for a in impl), flush=True)
    device_mod.train_head, anchors.fit_diag_mixture = impl["device"]
    out = {}
    for arm, dev in devices.items():
        for mp in ("gmmc", "maha"):
            for name, d in data.items():
                r = dev.classify_features(FeatureBatch(d["test_x"], None, d["test_s"]), mapper=mp, open_set=False)
                names = r["task_names"]
                right_task = np.array([names[t] == name for t in r["task_index"]])
                per_task[arm][name][f"{mp}_task_id"] = float(right_task.mean())
                per_task[arm][name][f"{mp}_no_oracle"] = float((right_task & (r["class_index"] == d["test_y"])).mean())
        mean = {key: float(np.mean([v[key] for v in per_task[arm].values()]))
                for key in ("oracle_acc", "gmmc_task_id", "gmmc_no_oracle", "maha_task_id", "maha_no_oracle")}
        out[arm] = {"mean": mean, "per_task": per_task[arm], "head_fit_s": round(head_s[arm], 1),
                    "learn_features_s": round(fit_s[arm], 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=SKILL_BENCH)
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    args = ap.parse_args()
    data = {}
    for name in task_order(args.data):
        tr, te = np.load(args.features / name / "train.npz"), np.load(args.features / name / "test.npz")
        data[name] = {"classes": [str(c) for c in tr["classes"]], "train_x": tr["features"],
                      "train_y": tr["labels"].astype(np.int64), "train_s": tr["trunk_stats"],
                      "test_x": te["features"], "test_y": te["labels"].astype(np.int64), "test_s": te["trunk_stats"]}
    arms = run_arms(data, args.rom)
    dev, ctl = arms["device"]["mean"], arms["control"]["mean"]
    delta = {k: dev[k] - ctl[k] for k in dev}
    summary = {"device": dev, "control": ctl, "delta": delta,
               "oracle_within_0.3_points": abs(delta["oracle_acc"]) <= 0.003,
               "gmmc_task_id_not_worse": delta["gmmc_task_id"] >= -1e-9,
               "gmmc_no_oracle_within_0.1_points": abs(delta["gmmc_no_oracle"]) <= 0.001,
               "head_fit_s": {a: arms[a]["head_fit_s"] for a in arms},
               "learn_features_s": {a: arms[a]["learn_features_s"] for a in arms}}
    write_result("device_learning", {"summary": summary, "tasks": len(data), "arms": arms})
    rows = [[k, f"{ctl[k]:.4f}", f"{dev[k]:.4f}", f"{delta[k]:+.4f}"] for k in dev]
    rows += [["head fits, 21 tasks (s)", arms["control"]["head_fit_s"], arms["device"]["head_fit_s"], ""],
             ["learn_features, 21 tasks (s)", arms["control"]["learn_features_s"], arms["device"]["learn_features_s"],
              ""]]
    update_readme("device_learning", f"""## The light device learns what the torch device learned (`device_learning.py`)

21 skill-bench tasks, the same ROM features, one run. *control*: the head by torch's L-BFGS and GMMC by
scikit-learn (the device before the split); *device*: the head by numpy L-BFGS (`runtime/learn/head.py`) and
GMMC by the numpy EM (`runtime/mapping/gmm.py`). Means over tasks; no-oracle columns are closed-set.

{md_table(["", "control (torch, scikit-learn)", "device (numpy)", "difference"], rows)}

Machine and command: `results/device_learning.json`.
""")
    print(summary)


if __name__ == "__main__":
    main()
