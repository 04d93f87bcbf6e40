"""ROM throughput: torch eager vs ONNX Runtime (CPU), and what the bias inputs cost.

For each backbone (EfficientNet-Lite0 with its real weights; Xception with random weights,
which time the same), at batch 1 and 16, in one run:

* torch eager, plain features
* onnxruntime ``plain`` graph (exported without any bias input)
* onnxruntime ``full`` graph (``bb[N,B]`` on every BN, fed zeros-shaped random biases)
* onnxruntime device path: ``trunk`` + ``tail`` (``bb`` only on the tail)

Variants are timed round-robin (one repeat of each per round) so machine load hits all of
them alike, and the median per variant is reported.  ``bias_overhead`` is
``plain_ips / full_ips - 1`` at batch 16; ``bias_overhead_device_path`` the same for trunk+tail.

Also measures the decode pipeline (``RomEngine.extract`` on real image files) against the
raw trunk+tail throughput: the device-side target is >= 0.9x.

    python benchmarks/rom_throughput.py [--rounds 5] [--backbones efficientnet_lite0 xception]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SKILL_BENCH, md_table, update_readme, write_result  # noqa: E402


def _ort(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def bench_backbone(name: str, rounds: int, threads: int, batches: list[int], work: Path) -> tuple[list[dict], dict]:
    import torch

    from skill_edge.export.backbone import build_backbone
    from skill_edge.export.rom import build_rom, export_plain

    random_init = name != "efficientnet_lite0"
    rom = work / name
    m = build_rom(name, rom, random_init=random_init)
    export_plain(name, rom / "plain.onnx", random_init=random_init)
    torch.set_num_threads(threads)
    eager = build_backbone(name, random_init=random_init).features()
    sess = {g: _ort(rom / f"{g}.onnx", threads) for g in ("plain", "full", "trunk", "tail")}
    size = m.preprocessing["crop"]
    rng = np.random.default_rng(0)
    rows, medians = [], {}
    for n in batches:
        x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
        bb_full = (0.05 * rng.standard_normal((n, m.bias_total))).astype(np.float32)
        bb_tail = (0.05 * rng.standard_normal((n, m.tail_bias_total))).astype(np.float32)
        xt = torch.from_numpy(x)

        def run_eager() -> None:
            with torch.no_grad():
                eager(xt)

        variants = {
            "torch eager (plain)": run_eager,
            "onnxruntime plain": lambda: sess["plain"].run(None, {"image": x}),
            "onnxruntime full+bb": lambda: sess["full"].run(None, {"image": x, "bb": bb_full}),
            "onnxruntime trunk+tail(bb)": lambda: sess["tail"].run(
                None, {"trunk_act": sess["trunk"].run(None, {"image": x})[0], "bb": bb_tail}),
        }
        reps = max(1, 32 // n)
        for fn in variants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for label, fn in variants.items():
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn()
                times[label].append((time.perf_counter() - t0) / (reps * n))
        for label, ts in times.items():
            ips = 1.0 / statistics.median(ts)
            medians[(label, n)] = ips
            rows.append({"backbone": name, "weights": "random" if random_init else "imagenet", "variant": label,
                         "batch": n, "images_per_s": round(ips, 2), "ms_per_image": round(1000 / ips, 3),
                         "rounds": rounds})
            print(f"{name:20s} b={n:2d} {label:28s} {ips:8.1f} img/s", flush=True)
    b = max(batches)
    plain = medians[("onnxruntime plain", b)]
    extra = {
        "bias_overhead": plain / medians[("onnxruntime full+bb", b)] - 1.0,
        "bias_overhead_device_path": plain / medians[("onnxruntime trunk+tail(bb)", b)] - 1.0,
        "macs_per_image": m.macs_per_image,
        "bias_total": m.bias_total,
        "tail_bias_total": m.tail_bias_total,
        "raw_device_ips": medians[("onnxruntime trunk+tail(bb)", b)],
        "rom": rom,
    }
    return rows, extra


def bench_pipeline(rom: Path, threads: int, n_images: int, rounds: int = 3) -> dict:
    """Decode + resize on threads while ORT runs, against raw trunk+tail on ready tensors, interleaved
    round by round so both see the same machine load."""
    from skill_edge.runtime.rom_engine import RomEngine

    files = sorted(SKILL_BENCH.glob("flowers102/test/*/*"))[:n_images] if SKILL_BENCH.exists() else []
    if not files:
        from PIL import Image
        from sklearn.datasets import load_sample_images

        tmp = Path(tempfile.mkdtemp())
        imgs = load_sample_images().images
        for i in range(n_images):
            p = tmp / f"{i}.jpg"
            Image.fromarray(imgs[i % 2]).save(p, quality=90)
            files.append(p)
    eng = RomEngine(rom, providers=["cpu"], threads=threads)
    x = np.stack([eng.preprocess(f) for f in files[:16]])
    eng.extract(files[:32])  # warm-up
    eng.features(x)
    raw, pipe = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(max(1, len(files) // 16)):
            eng.features(x)
        raw.append(16 * max(1, len(files) // 16) / (time.perf_counter() - t0))
        pipe.append(eng.extract(files, batch_size=16).images_per_second)
    r, p = statistics.median(raw), statistics.median(pipe)
    return {"images": len(files), "source": str(files[0].parent.parent) if files else "", "pipeline_ips": p,
            "raw_ips": r, "ratio": p / r, "rounds": rounds, "raw_rounds": raw, "pipeline_rounds": pipe}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "xception"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipeline-images", type=int, default=320)
    args = ap.parse_args()
    rows, overhead, overhead_dev, info, pipeline = [], {}, {}, {}, None
    with tempfile.TemporaryDirectory() as work:
        for name in args.backbones:
            r, extra = bench_backbone(name, args.rounds, args.threads, args.batches, Path(work))
            rows += r
            overhead[name] = round(extra["bias_overhead"], 4)
            overhead_dev[name] = round(extra["bias_overhead_device_path"], 4)
            info[name] = {k: extra[k] for k in ("macs_per_image", "bias_total", "tail_bias_total")}
            if name == "efficientnet_lite0":
                pipeline = bench_pipeline(extra["rom"], args.threads, args.pipeline_images)
                print(f"pipeline {pipeline['pipeline_ips']:.1f} img/s = {pipeline['ratio']:.2f} x raw", flush=True)
    path = write_result("rom_throughput", {
        "bias_overhead": overhead,
        "bias_overhead_goal": 0.03,
        "bias_overhead_device_path": overhead_dev,
        "backbones": info,
        "pipeline": pipeline,
        "rows": rows,
    })
    table = md_table(["backbone", "weights", "variant", "batch", "images/s", "ms/image"],
                     [[r["backbone"], r["weights"], r["variant"], r["batch"], r["images_per_s"], r["ms_per_image"]]
                      for r in rows])
    over = md_table(["backbone", "B (bias slots)", "full graph bb overhead @16", "trunk+tail(bb) overhead @16"],
                    [[n, info[n]["bias_total"], f"{overhead[n]:+.1%}", f"{overhead_dev[n]:+.1%}"] for n in overhead])
    pipe = (f"Decode pipeline (`RomEngine.extract`, {pipeline['images']} real files): "
            f"{pipeline['pipeline_ips']:.1f} img/s = **{pipeline['ratio']:.2f}x** the raw trunk+tail throughput "
            f"({pipeline['raw_ips']:.1f} img/s on ready tensors, timed alternately in the same run).") if pipeline else ""
    import json

    meta = json.loads(path.read_text())
    update_readme("rom_throughput", f"""## ROM throughput (`benchmarks/rom_throughput.py`)

Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores (load average at start
{meta['machine'].get('load_avg_at_start')}). Command: `{meta['command']}`. Date: {meta['date']}.
Results: [`results/rom_throughput.json`](results/rom_throughput.json).

{table}

Cost of the per-sample bias inputs (goal for the full graph: <= +3%):

{over}

{pipe}
""")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
