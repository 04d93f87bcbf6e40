"""What the light device costs, against today's stack, side by side in one run.

Each install profile goes into a fresh venv holding only that profile (``base`` is the device;
``camera``, ``gpu``, ``bb``, ``factory`` and ``lab`` add their extras).  The control is the code and
dependency list of the last commit before the device was split from the factory (``--control-rev``),
installed the same way, so it imports today's stack (torch, scikit-learn, ...) on every verb.

Measured for the base profile and the control, alternating run by run:
- installed size of the venv;
- a cold ``skill-edge classify ONE_IMAGE`` on a bank of 21 skill-bench tasks: wall time and peak RSS
  (``wait4``), median of ``--runs`` runs;
- steady RSS of ``skill-edge sync --watch`` holding those 21 tasks;
- time and peak RSS of ``skill-edge learn`` on a 2,560-image task, with its features already in the
  feature cache (the time after extraction, which is what the device code changed);
- warm per-image latency of ``Device.classify`` at batch 1 (the camera case).

Each venv builds its own bank with its own code (``learn_features`` on the features that
``extract_features.py`` wrote), so the control reads a bank in its own format.

    python benchmarks/device_footprint.py --features /work/cache/features [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROFILES = {  # profile -> extras installed with the project wheel (gpu swaps onnxruntime afterwards)
    "base": "", "camera": "camera", "gpu": "", "bb": "bb", "factory": "factory", "lab": "lab",
}
GOALS = {"device_install_mb": 350.0, "cold_classify_s": 1.0, "cold_classify_rss_mb": 250.0}
LEARN_TASK = "fashion-mnist"  # 2,560 training images


def log(msg: str) -> None:
    print(f"[footprint {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- venvs
def du_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root, f)
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 2**20


def build_wheel(src: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)], check=True)
    return next(out.glob("*.whl"))


def make_venv(path: Path, wheel: Path, extras: str, *, swap_gpu: bool = False, reuse: bool = True) -> float:
    """A fresh venv holding ``wheel[extras]`` and what it depends on; returns the install seconds."""
    py, marker, stamp = path / "bin" / "python", path / ".installed", f"{wheel.name}[{extras}] gpu={swap_gpu}"
    if reuse and py.exists() and marker.exists() and marker.read_text() == stamp:  # same deps: new code only
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True)
        return float("nan")
    shutil.rmtree(path, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    target = f"{wheel}[{extras}]" if extras else str(wheel)
    subprocess.run([str(py), "-m", "pip", "install", "-q", target], check=True)
    if swap_gpu:  # README, "Install profiles": never leave both onnxruntime distributions in one venv
        subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "onnxruntime"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "onnxruntime-gpu"], check=True)
    marker.write_text(stamp)
    return time.perf_counter() - t0


def pip_names(venv: Path) -> list[str]:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(f"{d['name']}=={d['version']}" for d in json.loads(out))


# ----------------------------------------------------------------------------- processes
def run_measured(cmd: list[str], env: dict[str, str]) -> tuple[float, float, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS MB, result) of one child process, from its own rusage."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        code = os.waitstatus_to_exitcode(status)
        done = subprocess.CompletedProcess(cmd, code, out.read().decode(), err.read().decode())
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... exited {code}: {done.stderr[-600:]}")
    return wall, usage.ru_maxrss / 1024, done


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def steady_sync_rss(venv: Path, env: dict[str, str], seconds: float) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="footprint-fleet-"))
    proc = subprocess.Popen([str(venv / "bin" / "skill-edge"), "sync", "--transport", f"dir:{folder}", "--watch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    samples = []
    try:
        t0 = time.time()
        while time.time() - t0 < seconds:
            time.sleep(1.0)
            if proc.poll() is not None:
                raise RuntimeError(f"sync --watch exited {proc.returncode}")
            samples.append(rss_mb(proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    tail = samples[len(samples) // 2:]
    return {"steady_rss_mb": round(statistics.median(tail), 1), "samples_mb": [round(s, 1) for s in samples]}


# ----------------------------------------------------------------------------- worker (runs in each venv)
WORKER = r'''
import json, sys, time
from pathlib import Path
import numpy as np
from skill_edge.runtime.device import Device
cmd, home, rom = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if cmd == "bank":
    features, tasks = Path(sys.argv[4]), sys.argv[5:]
    dev = Device(home, rom)
    t0 = time.perf_counter()
    for name in tasks:
        d = np.load(features / name / "train.npz", allow_pickle=False)
        k, _ = dev.learn_features(name, [str(c) for c in d["classes"]], d["features"], d["labels"],
                                  trunk_stats=d["trunk_stats"])
        dev.bank.put(k)
    print(json.dumps({"tasks": len(tasks), "seconds": time.perf_counter() - t0}))
elif cmd == "latency":
    image, n = Path(sys.argv[4]), int(sys.argv[5])
    dev = Device(home, rom, threads=int(sys.argv[6]) if len(sys.argv) > 6 else None)
    for _ in range(5):
        dev.classify([image])
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        dev.classify([image])
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": 1000 * float(np.median(times)), "p90_ms": 1000 * float(np.percentile(times, 90))}))
'''


def worker(venv: Path, env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([str(venv / "bin" / "python"), "-c", WORKER, *args], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())  # not the repo: its skill_edge/ folder would shadow the install
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} in {venv.name} failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import SKILL_BENCH, md_table, task_order, update_readme, write_result

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", type=Path, required=True, help="DIR/<task>/train.npz (extract_features.py)")
    ap.add_argument("--data", type=Path, default=SKILL_BENCH)
    ap.add_argument("--rom", type=Path, default=REPO / "models/rom/efficientnet_lite0")
    ap.add_argument("--work", type=Path, default=REPO / ".cache/footprint")
    ap.add_argument("--control-rev", default="53df183", help="the last commit before the device/factory split")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--sync-seconds", type=float, default=20.0)
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    ap.add_argument("--fresh", action="store_true", help="rebuild every venv (default: reuse, reinstall the wheel)")
    ap.add_argument("--venvs-only", action="store_true", help="build the venvs and stop (they take the longest)")
    args = ap.parse_args()
    work = args.work.resolve()
    tasks = task_order(args.data)
    if not args.venvs_only and not all((args.features / t / "train.npz").exists() for t in tasks):
        sys.exit(f"features for the {len(tasks)} skill-bench tasks are missing in {args.features}: "
                 f"run python benchmarks/extract_features.py --out {args.features}")

    # -- venvs: every profile, and the control (its own source tree and wheel)
    wheel = build_wheel(REPO, work / "wheel")
    control_src = work / "control-src"
    shutil.rmtree(control_src, ignore_errors=True)
    control_src.mkdir(parents=True)
    subprocess.run(f"git -C {REPO} archive {args.control_rev} | tar -x -C {control_src}", shell=True, check=True)
    control_wheel = build_wheel(control_src, work / "control-wheel")
    installs: dict[str, dict] = {}
    for name in args.profiles:
        log(f"venv {name}")
        secs = make_venv(work / "venvs" / name, wheel, PROFILES[name], swap_gpu=name == "gpu", reuse=not args.fresh)
        installs[name] = {"size_mb": round(du_mb(work / "venvs" / name), 1), "install_s": round(secs, 1),
                          "extras": PROFILES[name] or ("swap onnxruntime -> onnxruntime-gpu" if name == "gpu" else ""),
                          "packages": pip_names(work / "venvs" / name)}
    log("venv control")
    secs = make_venv(work / "venvs" / "control", control_wheel, "", reuse=not args.fresh)
    installs["control"] = {"size_mb": round(du_mb(work / "venvs" / "control"), 1), "install_s": round(secs, 1),
                           "extras": f"the dependencies of {args.control_rev}",
                           "packages": pip_names(work / "venvs" / "control")}
    arms = {"base": work / "venvs" / "base", "control": work / "venvs" / "control"}
    if args.venvs_only:
        print(json.dumps({n: i["size_mb"] for n, i in installs.items()}))
        return

    # -- a bank of 21 tasks per arm, each built by its own code
    homes, env = {}, {}
    for arm, venv in arms.items():
        homes[arm] = work / "homes" / arm
        shutil.rmtree(homes[arm], ignore_errors=True)
        env[arm] = {**os.environ, "SKILL_EDGE_HOME": str(homes[arm]), "SKILL_EDGE_ROM": str(args.rom.resolve()),
                    "SKILL_EDGE_CACHE": str(work / "cache" / arm)}
        log(f"{arm}: bank of {len(tasks)} tasks")
        worker(venv, env[arm], "bank", str(homes[arm]), str(args.rom), str(args.features), *tasks)
        subprocess.run([str(venv / "bin" / "skill-edge"), "keys", "init"], env=env[arm], check=True,
                       capture_output=True)

    image = sorted((args.data / "flowers102" / "test").rglob("*.jpg"))[0]
    results: dict[str, dict] = {arm: {"cold_classify": [], "learn": []} for arm in arms}
    # -- cold classify, alternating arms run by run
    for r in range(args.runs):
        for arm, venv in (list(arms.items()) if r % 2 == 0 else list(arms.items())[::-1]):
            wall, rss, _ = run_measured([str(venv / "bin" / "skill-edge"), "classify", str(image), "--json"], env[arm])
            results[arm]["cold_classify"].append({"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1)})
        log(f"cold classify run {r + 1}/{args.runs}: " + ", ".join(
            f"{a} {results[a]['cold_classify'][-1]['wall_s']} s" for a in arms))
    # -- the device's first cold classify after a bank change: the Mahalanobis student's saved state is
    # gone (a new bank digest), so the process builds it from the records and writes it back
    after_change = []
    for r in range(args.runs):
        shutil.rmtree(homes["base"] / "mapper", ignore_errors=True)
        wall, rss, _ = run_measured([str(arms["base"] / "bin" / "skill-edge"), "classify", str(image), "--json"],
                                    env["base"])
        after_change.append({"wall_s": round(wall, 3), "peak_rss_mb": round(rss, 1)})
        log(f"base: cold classify after a bank change, run {r + 1}/{args.runs}: {wall:.2f} s, {rss:.0f} MB")
    results["base"]["cold_classify_after_bank_change"] = after_change
    # -- sync --watch holding the bank
    for arm, venv in arms.items():
        results[arm]["sync_watch"] = steady_sync_rss(venv, env[arm], args.sync_seconds)
        log(f"{arm}: sync --watch steady RSS {results[arm]['sync_watch']['steady_rss_mb']} MB")
    # -- learn a 2,560-image task with a warm feature cache (one unmeasured run fills the cache)
    data = args.data / LEARN_TASK
    for r in range(4):
        for arm, venv in arms.items():
            home = work / "learn-homes" / f"{arm}-{r}"
            shutil.rmtree(home, ignore_errors=True)
            wall, rss, done = run_measured([str(venv / "bin" / "skill-edge"), "learn", "--task", LEARN_TASK,
                                            "--data", str(data), "--json"], {**env[arm], "SKILL_EDGE_HOME": str(home)})
            if r == 0:
                continue
            rep = json.loads(done.stdout[done.stdout.index("{"):])
            results[arm]["learn"].append({"wall_s": round(wall, 2), "peak_rss_mb": round(rss, 1),
                                          "fit_s": round(rep["seconds"]["fit"], 2),
                                          "extract_s": round(rep["seconds"]["extract"], 2),
                                          "test_acc": rep["test_acc"]})
            log(f"learn {arm} run {r}: {wall:.1f} s wall, fit {rep['seconds']['fit']:.1f} s, {rss:.0f} MB")
    # -- warm latency at batch 1
    for arm, venv in arms.items():
        results[arm]["warm_latency_b1"] = worker(venv, env[arm], "latency", str(homes[arm]), str(args.rom),
                                                 str(image), "50")
        log(f"{arm}: warm batch-1 latency {results[arm]['warm_latency_b1']['median_ms']:.1f} ms")

    def keys(arm: str) -> dict:
        cold = results[arm]["cold_classify"]
        learn = results[arm]["learn"]
        return {"device_install_mb": installs[arm]["size_mb"],
                "cold_classify_s": round(statistics.median(c["wall_s"] for c in cold), 3),
                "cold_classify_rss_mb": round(statistics.median(c["peak_rss_mb"] for c in cold), 1),
                "sync_watch_steady_rss_mb": results[arm]["sync_watch"]["steady_rss_mb"],
                "learn_fit_s": round(statistics.median(x["fit_s"] for x in learn), 2),
                "learn_wall_s": round(statistics.median(x["wall_s"] for x in learn), 2),
                "learn_peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in learn), 1),
                "warm_latency_b1_ms": round(results[arm]["warm_latency_b1"]["median_ms"], 2)}

    summary, control = keys("base"), keys("control")
    goals = {"device_install_mb<=350": summary["device_install_mb"] <= GOALS["device_install_mb"],
             "cold_classify_s<=1.0": summary["cold_classify_s"] <= GOALS["cold_classify_s"],
             "cold_classify_rss_mb<=250": summary["cold_classify_rss_mb"] <= GOALS["cold_classify_rss_mb"],
             "learn_fit_no_slower": summary["learn_fit_s"] <= control["learn_fit_s"] * 1.05}
    first = {"cold_classify_s": round(statistics.median(c["wall_s"] for c in after_change), 3),
             "cold_classify_rss_mb": round(statistics.median(c["peak_rss_mb"] for c in after_change), 1)}
    payload = {"summary": {**summary, "goals": goals}, "control": control, "after_bank_change": first,
               "control_rev": args.control_rev, "bank_tasks": len(tasks), "image": str(image.relative_to(args.data)),
               "learn_task": LEARN_TASK, "runs": args.runs, "profiles": installs, "raw": results}
    path = write_result("device_footprint", payload)
    log(f"wrote {path}")

    rows = [[k, control[k], summary[k], f"{summary[k] / control[k]:.2f}x" if control[k] else "-"] for k in summary]
    sizes = [[n, installs[n]["extras"] or "-", f"{installs[n]['size_mb']:.0f}"] for n in installs]
    update_readme("device_footprint", f"""## The light device against today's stack (`device_footprint.py`)

Base profile (the device) against the control ({args.control_rev}: the code and dependencies before the device was
split from the factory), measured side by side in one run; cold runs alternate between the two. Bank of
{len(tasks)} skill-bench tasks; cold classify of one JPEG, median of {args.runs} runs; `learn` on
{LEARN_TASK} (2,560 images) with its features already cached, median of 3.

{md_table(["", "control (today's stack)", "base (device)", "ratio"], rows)}

Goals: install <= 350 MB: {goals['device_install_mb<=350']}; cold classify <= 1.0 s: {goals['cold_classify_s<=1.0']};
peak RSS <= 250 MB: {goals['cold_classify_rss_mb<=250']}; learning after extraction no slower:
{goals['learn_fit_no_slower']}.

The first cold classify after the bank changed (the Mahalanobis student's saved state no longer matches, so the
process builds it from the records and writes it back), median of {args.runs}: {first['cold_classify_s']} s,
{first['cold_classify_rss_mb']} MB peak RSS.

Installed size of each profile, each in a fresh venv holding only it (MB, whole venv):

{md_table(["profile", "extras", "MB"], sizes)}

Machine: {payload_machine()}. Command: `python benchmarks/device_footprint.py --features <features dir>`.
""")


def payload_machine() -> str:
    from _common import machine

    m = machine()
    return f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, load {m.get('load_avg_at_start')}"


if __name__ == "__main__":
    main()
