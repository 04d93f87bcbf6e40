"""GPU verification of the ROM backends, for the machine a session is lent (docs/GPU.md).

CI never has a GPU, so this is not a test: it is the one script a session runs on a lent
GPU machine, and its JSON is what docs/GPU.md quotes.  In one process it

1. records what the machine has (GPU, driver, torch, onnxruntime providers, TensorRT or why not);
2. exports the default ROM there (or uses ``--rom``) and a plain, bias-free graph for comparison;
3. checks ONNX Runtime CUDA against ONNX Runtime CPU on natural images: biases zero, mixed
   per-row biases (per-sample tail graph), one bias vector (bound tail), the full ``bb`` graph,
   and TF32 on/off;
4. times the trunk+tail path on both providers at batch 1/16/64, torch eager on the GPU, the
   full ``bb`` graph against the plain export on the GPU, and the decode pipeline from JPEG files;
5. learns one small real task end to end on ``Device(providers=[cuda])`` and on the CPU, with BB,
   and compares their predictions;
6. builds TensorRT engines and checks them, when ``tensorrt`` imports.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from _common import command, machine, md_table  # noqa: I001 - benchmarks run as scripts


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Largest per-row ‖a − b‖ / ‖b‖."""
    return float((np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)).max())


def environment() -> dict:
    import onnxruntime as ort
    import torch

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    try:
        env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                            "--format=csv,noheader"], capture_output=True, text=True,
                                           timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        env["nvidia_smi"] = f"unavailable: {exc}"
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError as exc:
        import ctypes.util

        env["tensorrt"] = None
        env["tensorrt_missing"] = f"{exc}; libnvinfer on the loader path: {ctypes.util.find_library('nvinfer')}"
    return env


def natural_images(n: int, seed: int = 0) -> tuple[list, list[int], list[str]]:
    """Random crops and flips of the photos scikit-learn and scikit-image ship, with their source as label."""
    from PIL import Image
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {"china": None, "flower": None}
    for name, arr in zip(photos, load_sample_images().images):
        photos[name] = arr
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photos[name] = getattr(data, name)()
    names = list(photos)
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(n):
        k = i % len(names)
        img = Image.fromarray(photos[names[k]])
        w, h = img.size
        s = rng.uniform(0.4, 1.0)
        cw, ch = int(w * s), int(h * s)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(crop)
        labels.append(k)
    return out, labels, names


#: Repetition scale: ``--smoke`` sets it low to try the script on a CPU machine.
REPS = {"scale": 1.0}


def median_seconds(fn, reps: int, warmup: int = 3, sync=None) -> float:
    reps = max(1, int(reps * REPS["scale"]))
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def check_parity(rom: Path, x: np.ndarray, results: dict) -> None:
    import onnxruntime as ort

    from skill_edge.runtime.rom.engine import RomEngine

    cpu, gpu = RomEngine(rom, providers=["cpu"]), RomEngine(rom, providers=["cuda"])
    results["cuda_session_providers"] = gpu._graphs["trunk"].session.get_providers()
    rng = np.random.default_rng(1)
    n, b = len(x), cpu.tail_bias_total
    mixed = rng.normal(0, 0.05, (n, b)).astype(np.float32)
    a_cpu, a_gpu = cpu.trunk(x), gpu.trunk(x)
    par = {"trunk_activations": rel_err(a_gpu.reshape(n, -1), a_cpu.reshape(n, -1))}
    for label, bb in (("bb_zero", None), ("bb_mixed_rows", mixed), ("bb_one_vector", mixed[0])):
        par[label] = rel_err(gpu.tail(a_gpu, bb), cpu.tail(a_cpu, bb))
    full = rom / cpu.manifest.graphs["full"].file
    bb_full = rng.normal(0, 0.05, (n, cpu.manifest.bias_total)).astype(np.float32)
    feeds = {"image": x, "bb": bb_full}
    ref = ort.InferenceSession(str(full), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    for tf32 in ("1", "0"):
        try:
            s = ort.InferenceSession(str(full), providers=[("CUDAExecutionProvider", {"use_tf32": tf32})])
            par[f"full_graph_mixed_bb_tf32_{tf32}"] = rel_err(s.run(None, feeds)[0], ref)
        except Exception as exc:  # noqa: BLE001 - record, don't stop the check
            par[f"full_graph_mixed_bb_tf32_{tf32}"] = f"error: {exc}"
    results["parity_vs_ort_cpu"] = par
    print("parity (max per-row relative error vs ORT CPU):", json.dumps(par, indent=1), flush=True)


def time_backends(rom: Path, x: np.ndarray, plain: Path | None, results: dict) -> None:
    import torch

    from skill_edge.export.backbone import build_backbone
    from skill_edge.runtime.rom.engine import RomEngine

    rows = []
    engines = {"ORT CUDA": RomEngine(rom, providers=["cuda"]), "ORT CPU": RomEngine(rom, providers=["cpu"]),
               # onnxruntime's own defaults: TF32, exhaustive cuDNN search
               "ORT CUDA, onnxruntime defaults (TF32)": RomEngine(rom, providers=["cuda"], cuda_options={})}
    reps = {1: 100, 16: 30, 64: 10}
    for bs in (1, 16, 64):
        xb = x[:bs]
        for label, eng in engines.items():
            if label == "ORT CPU" and bs == 64:
                continue
            t = median_seconds(lambda: eng.features(xb), reps[bs] if "CUDA" in label else max(3, reps[bs] // 5))
            rows.append({"path": f"RomEngine trunk+tail, {label}", "batch": bs, "ms_per_batch": t * 1e3,
                         "images_per_s": bs / t})
            print(rows[-1], flush=True)
    bk = build_backbone(rom_backbone(rom), rom / engines["ORT CPU"].manifest.weights_file)  # the ROM's own weights
    net = bk.features().cuda().eval()
    sync = torch.cuda.synchronize
    for bs in (1, 16, 64):
        xt = torch.from_numpy(x[:bs]).cuda()
        for label, ctx in (("fp32", torch.autocast("cuda", enabled=False)),
                           ("fp16 autocast", torch.autocast("cuda", dtype=torch.float16))):
            def run(xt=xt, ctx=ctx):
                with torch.no_grad(), ctx:
                    return net(xt)
            t = median_seconds(run, reps[bs], sync=sync)
            rows.append({"path": f"torch eager CUDA {label} (device-resident input)", "batch": bs,
                         "ms_per_batch": t * 1e3, "images_per_s": bs / t})
            print(rows[-1], flush=True)
    with torch.no_grad():
        ref = RomEngine(rom, providers=["cpu"]).features(x[:16])
        results["torch_cuda_vs_ort_cpu"] = {"fp32": rel_err(net(torch.from_numpy(x[:16]).cuda()).float().cpu().numpy(), ref)}
        with torch.autocast("cuda", dtype=torch.float16):
            results["torch_cuda_vs_ort_cpu"]["fp16_autocast"] = rel_err(
                net(torch.from_numpy(x[:16]).cuda()).float().cpu().numpy(), ref)
    if plain is not None:
        results["cuda_bias_overhead"] = bias_overhead(rom, plain, engines["ORT CUDA"], x)
    results["throughput"] = rows


def bias_overhead(rom: Path, plain: Path, eng, x: np.ndarray) -> dict:
    """rom_throughput's ABBA blocks on the GPU: per-sample biases on the full graph and on the device path."""
    import onnxruntime as ort

    from rom_throughput import PLAIN, abba_ratios
    from skill_edge.runtime.rom.engine import CUDA_PROVIDER_OPTIONS, ort_session_options

    cuda = [("CUDAExecutionProvider", CUDA_PROVIDER_OPTIONS)]  # as the engine runs its graphs
    s_full = ort.InferenceSession(str(rom / eng.manifest.graphs["full"].file), ort_session_options(), providers=cuda)
    s_plain = ort.InferenceSession(str(plain), ort_session_options(), providers=cuda)
    rng = np.random.default_rng(2)
    out = {}
    for bs in (16, 64):
        xb = x[:bs]
        bb_full = rng.normal(0, 0.05, (bs, eng.manifest.bias_total)).astype(np.float32)
        bb_tail = rng.normal(0, 0.05, (bs, eng.tail_bias_total)).astype(np.float32)
        variants = {PLAIN: lambda: s_plain.run(None, {"image": xb}),
                    "full graph, per-sample bb": lambda: s_full.run(None, {"image": xb, "bb": bb_full}),
                    "device path, per-sample bb": lambda: eng.features(xb, bb_tail)}
        blocks = abba_ratios(lambda label: median_seconds(variants[label], 5, warmup=1),
                             [k for k in variants if k != PLAIN], max(2, int(8 * REPS["scale"])), rng)
        out[str(bs)] = {k: {"median": float(np.median(v)), "blocks": v.tolist()} for k, v in blocks.items()}
    print("CUDA bias overhead vs plain:", {b: {k: round(v["median"], 4) for k, v in o.items()} for b, o in out.items()},
          flush=True)
    return out


def time_shape_changes(rom: Path, results: dict) -> None:
    """Seconds per call while the batch size keeps changing, as on a device (last batches, per-task tails)."""
    from skill_edge.runtime.rom.engine import RomEngine

    sizes = [16, 8, 16, 8, 1, 16, 1, 5, 3, 40, 16, 2]
    out = {}
    # the engine (a session per batch bucket) against one session per graph, as onnxruntime comes
    for arm, buckets in (("buckets", None), ("one session per graph", ())):
        eng = RomEngine(rom, providers=["cuda"], batch_buckets=buckets)
        size = eng.preprocessing.crop
        rng = np.random.default_rng(5)
        for label in ("first pass", "second pass"):
            calls = []
            for n in sizes:
                x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
                bb = rng.normal(0, 0.05, (n, eng.tail_bias_total)).astype(np.float32)
                t0 = time.perf_counter()
                eng.features(x, bb)
                calls.append(time.perf_counter() - t0)
            out[f"{arm}, {label}"] = {"batch_sizes": sizes, "seconds": calls, "total_s": sum(calls)}
    results["cuda_shape_changes"] = out
    print("shape changes:", {k: round(v["total_s"], 3) for k, v in out.items()}, flush=True)


def rom_backbone(rom: Path) -> str:
    return json.loads((rom / "manifest.json").read_text())["backbone"]


def time_pipeline(rom: Path, images: list, results: dict) -> None:
    """JPEG files -> features through RomEngine.extract (parallel decode) against the raw ROM path."""
    from skill_edge.runtime.rom.engine import RomEngine

    eng = RomEngine(rom, providers=["cuda"])
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, im in enumerate(images):
            p = Path(tmp) / f"{i:04d}.jpg"
            im.convert("RGB").save(p, quality=90)
            paths.append(p)
        x = np.stack([eng.preprocess(p) for p in paths[:64]])
        raw = median_seconds(lambda: eng.features(x), 10) / 64
        from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

        decode = {}
        for kind, n in (("threads", 2), ("threads", 8), ("threads", 14), ("processes", 8), ("processes", 14)):
            pool = ThreadPoolExecutor(n) if kind == "threads" else ProcessPoolExecutor(n)
            with pool:
                list(pool.map(eng.preprocessing, paths[: 2 * n]))  # start the workers
                t0 = time.perf_counter()
                list(pool.map(eng.preprocessing, paths, chunksize=1 if kind == "threads" else 8))
                decode[f"{kind}_{n}"] = len(paths) / (time.perf_counter() - t0)
        print("decode only, images/s:", decode, flush=True)
        out = {}
        for workers in (2, 8, 14):
            eng.extract(paths[:64], batch_size=64, workers=workers)
            ex = eng.extract(paths, batch_size=64, workers=workers)
            out[str(workers)] = {"images_per_s": ex.images_per_second, "ratio_to_raw": ex.images_per_second * raw}
        results["pipeline_cuda"] = {"raw_images_per_s_batch64": 1 / raw, "extract_batch64_by_workers": out,
                                    "decode_only_images_per_s": decode, "images": len(paths)}
        print("pipeline:", json.dumps(results["pipeline_cuda"]), flush=True)


def learn_end_to_end(rom: Path, images: list, labels: list[int], names: list[str], results: dict) -> None:
    """One real task (which photo a crop came from), learned with BB on the CUDA and CPU devices."""
    from skill_edge.runtime.device import Device

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "photos"
        test_paths = []
        for i, (im, y) in enumerate(zip(images, labels)):
            split = "test" if i % 4 == 0 else "train"
            d = root / split / names[y]
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"{i:04d}.jpg"
            im.convert("RGB").save(p, quality=90)
            if split == "test":
                test_paths.append(p)
        out = {}
        preds = {}
        for p in ("cuda", "cpu"):
            dev = Device(Path(tmp) / f"home-{p}", rom, providers=[p])
            t0 = time.perf_counter()
            rep = dev.learn("photos", root, bb=True, bb_epochs=4)
            learn_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            pr = dev.classify(test_paths, mapper="maha", open_set=False)
            out[p] = {"provider": dev.engine.provider, "train_images": rep.n_train, "head_test_acc": rep.test_acc,
                      "bb_test_acc": rep.bb_test_acc, "learn_s": learn_s, "classify_s": time.perf_counter() - t0,
                      "no_oracle_acc": float(np.mean([q.label == p_.parent.name for q, p_ in zip(pr, test_paths)]))}
            preds[p] = [q.label for q in pr]
        out["prediction_agreement"] = float(np.mean([a == b for a, b in zip(preds["cuda"], preds["cpu"])]))
        results["device_learn_classify"] = out
        print("device end to end:", json.dumps(out), flush=True)


def check_tensorrt(rom: Path, x: np.ndarray, results: dict) -> None:
    from skill_edge.export import trt

    try:
        trt._require()
    except trt.TrtUnavailable as exc:
        results["tensorrt"] = {"status": "not run", "reason": str(exc)}
        return
    import shutil

    from skill_edge.runtime.rom.engine import RomEngine

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "rom"
        shutil.copytree(rom, copy)
        ref = RomEngine(copy, providers=["cpu"]).features(x[:16])
        for fp16 in (False, True):
            t0 = time.perf_counter()
            paths = trt.build_rom_engines(copy, fp16=fp16)
            eng = RomEngine(copy, providers=["tensorrt"])
            key = "fp16" if fp16 else "fp32"
            out[key] = {"build_s": time.perf_counter() - t0, "engines": [p.name for p in paths],
                        "rel_err_vs_ort_cpu": rel_err(eng.features(x[:16]), ref)}
            for bs in (1, 16):
                xb = x[:bs]
                t = median_seconds(lambda: eng.features(xb), 50 if bs == 1 else 20)
                out[key][f"images_per_s_batch{bs}"] = bs / t
            for p in paths:
                p.unlink()
    results["tensorrt"] = {"status": "ok", **out}


def shape_rows(sc: dict) -> list[list[str]]:
    """Report rows for ``cuda_shape_changes``.  Runs before the control arm existed have only the
    engine's arm, under the keys "first pass" / "second pass"."""
    arms = {"engine (a session per batch bucket)": ("buckets, first pass", "buckets, second pass"),
            "one session per graph (onnxruntime as is)": ("one session per graph, first pass",
                                                          "one session per graph, second pass")}
    if "first pass" in sc:
        arms = {"engine (a session per batch bucket)": ("first pass", "second pass")}
    sizes = next(iter(sc.values()))["batch_sizes"]
    return [[f"{len(sizes)} calls at changing batch sizes {sizes}, {arm}: first pass / second pass",
             f"{sc[a]['total_s']:.2f} s / {sc[b]['total_s']:.2f} s"] for arm, (a, b) in arms.items() if a in sc]


def report(paths: list[Path]) -> str:
    """The Markdown section benchmarks/README.md shows, from result files (made on the GPU machine)."""
    parts = []
    for path in paths:
        d = json.loads(path.read_text())
        rom = "EfficientNet-Lite0 (ImageNet weights)" if "--rom" not in d["command"] else "Xception (random weights)"
        env = d["environment"]
        parts.append(f"**{rom}**, {env.get('gpu')}, driver {env['nvidia_smi'].split(', ')[1]}, "
                     f"onnxruntime-gpu {env['onnxruntime']}, torch {env['torch']}; `{d['command']}` ({d['date']}).")
        par = d["parity_vs_ort_cpu"]
        parts.append(md_table(
            ["check", "result"],
            [["ORT CUDA vs ORT CPU, features, max per-row relative error (bb zero / mixed rows / one vector)",
              f"{par['bb_zero']:.1e} / {par['bb_mixed_rows']:.1e} / {par['bb_one_vector']:.1e}"],
             ["full `bb` graph, TF32 on (onnxruntime default) / off (the engine's setting)",
              f"{par['full_graph_mixed_bb_tf32_1']:.1e} / {par['full_graph_mixed_bb_tf32_0']:.1e}"],
             ["torch eager CUDA (TF32 convs, its default) / fp16 autocast vs ORT CPU",
              f"{d['torch_cuda_vs_ort_cpu']['fp32']:.1e} / {d['torch_cuda_vs_ort_cpu']['fp16_autocast']:.1e}"],
             *shape_rows(d["cuda_shape_changes"]),
             ["learn + classify one 6-class photo task, CUDA device vs CPU device: prediction agreement",
              f"{d['device_learn_classify']['prediction_agreement']:.3f}"],
             ["decode pipeline `extract` (batch 64, best worker count) / raw ROM at batch 64",
              "{:.0f} / {:.0f} images/s".format(max(v["images_per_s"] for v in
                                                    d["pipeline_cuda"]["extract_batch64_by_workers"].values()),
                                                d["pipeline_cuda"]["raw_images_per_s_batch64"])],
             ["TensorRT", d["tensorrt"].get("reason", d["tensorrt"]["status"])]]))
        parts.append(md_table(["path", "batch", "ms/batch", "images/s"],
                              [[r["path"], r["batch"], f"{r['ms_per_batch']:.2f}", f"{r['images_per_s']:.0f}"]
                               for r in d["throughput"]]))
        if "cuda_bias_overhead" in d:
            o = d["cuda_bias_overhead"]
            labels = list(next(iter(o.values())))
            parts.append(md_table(["batch", *(f"{k} vs plain (median of ABBA blocks)" for k in labels)],
                                  [[bs, *(f"{o[bs][k]['median']:+.1%}" for k in labels)] for bs in o]))
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rom", type=Path, help="ROM directory (default: export efficientnet_lite0 into a temp dir)")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--smoke", action="store_true", help="few repetitions (a quick try of the script itself)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the benchmarks/README.md section from results/gpu_check*.json")
    args = ap.parse_args()
    if args.report:
        from _common import RESULTS, update_readme

        update_readme("gpu_check", "### GPU check (`benchmarks/gpu_check.py`, on a lent H100)\n\n"
                      + report([RESULTS / "gpu_check.json", RESULTS / "gpu_check_xception.json"]))
        return
    if args.smoke:
        REPS["scale"] = 0.05

    results: dict = {"benchmark": "gpu_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(),
                     "command": command(), "environment": environment(), "errors": {}}
    print(json.dumps(results["environment"], indent=1), flush=True)
    tmp = Path(tempfile.mkdtemp())
    rom, plain = args.rom, None
    if rom is None:
        from skill_edge.export.rom import build_rom, export_plain

        t0 = time.perf_counter()
        rom = tmp / "efficientnet_lite0"
        build_rom("efficientnet_lite0", rom)
        results["export_s"] = time.perf_counter() - t0
        print(f"exported ROM in {results['export_s']:.1f} s", flush=True)
        try:
            plain = export_plain("efficientnet_lite0", tmp / "plain.onnx")
        except Exception:  # noqa: BLE001
            results["errors"]["export_plain"] = traceback.format_exc()
    results["rom_fingerprint"] = json.loads((rom / "manifest.json").read_text())["fingerprint"]

    from skill_edge.runtime.rom.engine import RomEngine

    images, labels, names = natural_images(args.images)
    pre = RomEngine(rom, providers=["cpu"])
    x = np.stack([pre.preprocess(im) for im in images[:64]]).astype(np.float32)
    steps = [("parity", lambda: check_parity(rom, x, results)),
             ("shape_changes", lambda: time_shape_changes(rom, results)),
             ("throughput", lambda: time_backends(rom, x, plain, results)),
             ("pipeline", lambda: time_pipeline(rom, images, results)),
             ("device", lambda: learn_end_to_end(rom, images[:160], labels[:160], names, results)),
             ("tensorrt", lambda: check_tensorrt(rom, x, results))]
    for name, step in steps:
        t0 = time.perf_counter()
        try:
            step()
        except Exception:  # noqa: BLE001 - one failing step must not hide the others' results
            results["errors"][name] = traceback.format_exc()
            print(f"step {name} failed:\n{results['errors'][name]}", flush=True)
        print(f"step {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    rows = [[r["path"], r["batch"], f"{r['ms_per_batch']:.2f}", f"{r['images_per_s']:.0f}"]
            for r in results.get("throughput", [])]
    print(md_table(["path", "batch", "ms/batch", "images/s"], rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
