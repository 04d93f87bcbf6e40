"""How the task mappers scale with the number of stored tasks: latency per image and memory.

Synthetic anchors (k = 25 diagonal Gaussians per task for GMMC; 10 classes x 5 exemplars per
task for Mahalanobis) for 100, 1,000 and 10,000 tasks at D = 1280 (EfficientNet-Lite0) and
D = 2048 (Xception).  Latency is the median over repeats of one ``predict`` call on a batch of
32 raw feature vectors, after warm-up, divided by 32, with BLAS and torch limited to 2 threads
(the mapper's big matrix products go through torch's sgemm when torch is installed).  Memory
is the bytes of the mapper's own arrays (``TaskMapper.nbytes``).

For Mahalanobis with more than ``--cov-tasks`` tasks the tied covariance is estimated from the
first ``--cov-tasks`` tasks' exemplars (the per-batch cost does not depend on it); the time to
fold one task's exemplars into the covariance statistics is measured separately.

    nice python benchmarks/mapper_scale.py            # writes benchmarks/results/mapper_scale.{json,md}
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy/torch load
    os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from skill_edge.runtime.knowledge.records import GmmcAnchor, MahalanobisAnchor  # noqa: E402
from skill_edge.runtime.machine import cpu_model, portable_command  # noqa: E402
from skill_edge.runtime.mapping.mapper import GmmcMapper, MahalanobisMapper, exemplar_scatter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POOL = 64  # distinct random anchors, cycled over tasks (the mapper copies them into its own arrays)


def gmmc_pool(rng: np.random.Generator, dim: int, k: int) -> list[GmmcAnchor]:
    out = []
    for _ in range(POOL):
        means = np.abs(rng.normal(0.5, 0.3, (k, dim))).astype(np.float32)
        variances = rng.uniform(0.01, 0.1, (k, dim)).astype(np.float32)
        w = rng.uniform(0.5, 1.5, k)
        out.append(GmmcAnchor(means, variances, (w / w.sum()).astype(np.float32)))
    return out


def maha_pool(rng: np.random.Generator, dim: int, classes: int, m: int) -> list[MahalanobisAnchor]:
    out = []
    for _ in range(POOL):
        means = np.abs(rng.normal(0.5, 0.3, (classes, dim))).astype(np.float32)
        labels = np.repeat(np.arange(classes), m)
        ex = (means[labels] + rng.normal(0, 0.1, (classes * m, dim))).astype(np.float32)
        out.append(MahalanobisAnchor(means, ex, labels.astype(np.float32)))
    return out


def time_predict(mapper, x: np.ndarray, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        mapper.predict(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mapper.predict(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--dims", type=int, nargs="+", default=[1280, 2048])
    ap.add_argument("--mappers", nargs="+", default=["gmmc", "maha"], choices=["gmmc", "maha"])
    ap.add_argument("--k", type=int, default=25)
    ap.add_argument("--classes", type=int, default=10, help="classes per task (Mahalanobis)")
    ap.add_argument("--m", type=int, default=5, help="exemplars per class (Mahalanobis)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--cov-tasks", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=RESULTS / "mapper_scale.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    rng = np.random.default_rng(0)
    rows = []
    for dim in args.dims:
        x = np.abs(rng.normal(0.5, 0.3, (args.batch, dim))).astype(np.float32)
        pools = {}
        for mapper_kind in args.mappers:
            pools[mapper_kind] = (gmmc_pool(rng, dim, args.k) if mapper_kind == "gmmc"
                                  else maha_pool(rng, dim, args.classes, args.m))
        for n_tasks in args.tasks:
            names = [f"task{i:05d}" for i in range(n_tasks)]
            for mapper_kind in args.mappers:
                pool = pools[mapper_kind]
                anchors = [pool[i % POOL] for i in range(n_tasks)]
                t0 = time.perf_counter()
                extra = {}
                if mapper_kind == "gmmc":
                    mapper = GmmcMapper(names, anchors)
                else:
                    n_cov = min(n_tasks, args.cov_tasks)
                    t_cov = time.perf_counter()
                    stats = exemplar_scatter(anchors[:n_cov])
                    extra["scatter_s_per_task"] = (time.perf_counter() - t_cov) / n_cov
                    extra["covariance_from_tasks"] = n_cov
                    mapper = MahalanobisMapper(names, anchors, covariance=stats.shrunk()[0])
                build_s = time.perf_counter() - t0
                repeats = args.repeats if n_tasks < 10000 else max(3, args.repeats // 2)
                sec = time_predict(mapper, x, repeats)
                row = {
                    "tasks": n_tasks, "dim": dim, "mapper": mapper_kind,
                    "ms_per_image": 1000.0 * sec / args.batch, "ms_per_batch": 1000.0 * sec,
                    "bytes": int(mapper.nbytes()), "bytes_per_task": mapper.nbytes() / n_tasks,
                    "build_s": build_s, **extra,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
                del mapper, anchors

    result = {
        "benchmark": "mapper_scale",
        "command": "python " + portable_command(sys.argv),
        "machine": {
            "cpu": cpu_model(), "cores": os.cpu_count(), "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
            "numpy": np.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "load_average_at_end": list(os.getloadavg()),
        },
        "settings": {"batch": args.batch, "k": args.k, "classes_per_task": args.classes,
                     "exemplars_per_class": args.m, "repeats": args.repeats, "dtype": "float32",
                     "latency": "median wall time of MapperResult predict() on one batch / batch size"},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Task-mapper scaling",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, BLAS threads {m['blas_threads']}, torch threads "
        f"{m['torch_threads']}, numpy {m['numpy']}, torch {m['torch']}; "
        f"load average at end {', '.join(f'{v:.2f}' for v in m['load_average_at_end'])} (shared machine).",
        f"Command: `{result['command']}`",
        "",
        f"Batch {result['settings']['batch']}, float32; GMMC k = {result['settings']['k']}; Mahalanobis "
        f"{result['settings']['classes_per_task']} classes/task. Goal: <= 5 ms/image at 1,000 tasks.",
        "",
        "| mapper | dim | tasks | ms / image | MB | bytes / task | build s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['mapper']} | {r['dim']} | {r['tasks']:,} | {r['ms_per_image']:.3f} | "
                     f"{r['bytes'] / 2**20:,.1f} | {r['bytes_per_task']:,.0f} | {r['build_s']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
