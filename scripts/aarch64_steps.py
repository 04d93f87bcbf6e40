"""The steps of ``scripts/aarch64_check.sh``, on both sides of the emulated arm64 root.

    make-task DIR                   (x86) a small two-class ImageFolder task
    features ROM TASK OUT.npy       (either) ROM features of TASK's test images, in sorted file order
    run DIR                         (arm64) every device step, timed; writes DIR/steps.json
    report WORK OUT.json ...        (x86) compares features, gathers wheels and steps, writes the result

``run`` uses only what the base install has (the device: ONNX Runtime, numpy, scipy, ...), and
drives the real ``skill-edge`` command for every verb, as a user on the board would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LABELS = {"red": (200, 40, 40), "blue": (40, 40, 200)}
FEATURE_RTOL = 1e-4
HEAVY = ("torch", "timm", "sklearn", "scipy", "matplotlib", "ray", "cv2", "onnx")


def make_task(root: Path, n_train: int = 12, n_test: int = 4, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, rgb in LABELS.items():
            d = root / split / label
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                img = (rng.random((64, 64, 3)) * 90).astype(np.uint8) + np.array(rgb, np.uint8) // 2
                Image.fromarray(img).save(d / f"{j}.png")


def test_images(task: Path) -> list[Path]:
    return sorted((task / "test").rglob("*.png"))


def features(rom: Path, task: Path, out: Path) -> None:
    from skill_edge.runtime.rom.engine import RomEngine

    ex = RomEngine(rom, providers=["cpu"]).extract(test_images(task))
    np.save(out, np.concatenate([ex.features, ex.trunk_stats], axis=1))


# ----------------------------------------------------------------------------- inside the arm64 root
class Steps:
    """Runs named steps, times them, and keeps going after a failure so the result lists them all."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def run(self, name: str, fn) -> object:
        t0 = time.perf_counter()
        try:
            detail = fn()
            passed = True
        except Exception as exc:  # noqa: BLE001 - every failure is recorded with its message
            detail, passed = f"{type(exc).__name__}: {exc}", False
        row = {"name": name, "passed": passed, "seconds": round(time.perf_counter() - t0, 1), "detail": detail}
        print(json.dumps(row), flush=True)
        self.rows.append(row)
        return detail if passed else None


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SKILL_EDGE_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "skill_edge", *args], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"skill-edge {' '.join(args)} exited {proc.returncode}: {proc.stderr[-800:]}")
    return proc


def wheel_tags() -> list[dict]:
    """Every installed distribution with its version and wheel tag (what PyPI served for this CPU)."""
    from importlib import metadata

    out = []
    for dist in metadata.distributions():
        wheel = dist.read_text("WHEEL") or ""
        tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines() if line.startswith("Tag:")]
        out.append({"name": dist.metadata["Name"], "version": dist.version, "tags": tags})
    return sorted(out, key=lambda d: d["name"].lower())


def run_all(base: Path) -> None:
    rom, task, fleet = base / "rom", base / "task", base / "fleet"
    a, b = base / "homes" / "a", base / "homes" / "b"
    steps = Steps()
    rom_args = ["--rom", str(rom)]

    steps.run("heavy modules absent", lambda: _absent(HEAVY))
    steps.run("rom verify", lambda: cli(a, "rom", "verify", str(rom)).stdout.strip()[-200:])
    steps.run("learn", lambda: _learn(a, task, rom_args))
    steps.run("classify", lambda: _classify(a, task, rom_args))
    steps.run("packet encode and inspect", lambda: _packet(a))
    steps.run("directory sync between two homes", lambda: _sync(a, b, fleet, task, rom_args))
    steps.run("features", lambda: features(rom, task, base / "features-aarch64.npy") or "saved")
    (base / "steps.json").write_text(json.dumps({
        "machine": platform.machine(), "python": platform.python_version(), "platform": platform.platform(),
        "steps": steps.rows, "wheels": wheel_tags()}, indent=1))


def _absent(names: tuple[str, ...]) -> str:
    import importlib.util

    present = [n for n in names if importlib.util.find_spec(n) is not None]
    if present:
        raise RuntimeError(f"the base install brought {present}")
    return f"none of {', '.join(names)} is installed"


def _learn(home: Path, task: Path, rom_args: list[str]) -> str:
    proc = cli(home, "learn", "--task", "colours", "--data", str(task), "--json", *rom_args)
    report = json.loads(proc.stdout)
    if report["test_acc"] is None or report["test_acc"] < 0.99:
        raise RuntimeError(f"test accuracy {report['test_acc']} on an easy two-colour task")
    return f"test_acc {report['test_acc']}, packet {report['packet_bytes']} B"


def _classify(home: Path, task: Path, rom_args: list[str]) -> str:
    """Closed set: every test image right.  Open set (the default): the same, except images the
    one-task bank's threshold calls unknown (its 1st-percentile cut marks a few of its own)."""
    closed = json.loads(cli(home, "classify", str(task / "test"), "--json", "--no-open-set", *rom_args).stdout)
    right = sum(p["label"] == Path(p["source"]).parent.name for p in closed)
    if right != len(closed) or not closed:
        raise RuntimeError(f"closed set: {right} of {len(closed)} right")
    opened = json.loads(cli(home, "classify", str(task / "test"), "--json", *rom_args).stdout)
    wrong = [p for p in opened if not p["unknown"] and p["label"] != Path(p["source"]).parent.name]
    if wrong:
        raise RuntimeError(f"open set: {len(wrong)} known images classified wrong")
    unknown = sum(p["unknown"] for p in opened)
    return f"closed set {right}/{len(closed)} right; open set {len(opened) - unknown} right, {unknown} called unknown"


def _packet(home: Path) -> str:
    from skill_edge.runtime.knowledge.bank import KnowledgeBank
    from skill_edge.runtime.exchange.keys import load_device_key
    from skill_edge.runtime.exchange.packet import PacketCodec

    knowledge = KnowledgeBank(home / "bank").load_all()[0]
    data = PacketCodec(16 * 1024).encode(knowledge, load_device_key(home))
    path = home / "budget.skp"
    path.write_bytes(data)
    shown = cli(home, "packet", "inspect", str(path)).stdout
    if "colours" not in shown:
        raise RuntimeError("packet inspect does not show the task")
    return f"encoded under a 16 KB budget: {len(data)} B; inspect ok"


def _sync(a: Path, b: Path, fleet: Path, task: Path, rom_args: list[str]) -> str:
    cli(b, "keys", "init")
    cli(b, "keys", "add", "device-a", str(a / "keys" / "device.pub"))
    cli(a, "sync", "--transport", f"dir:{fleet}", *rom_args)
    cli(b, "sync", "--transport", f"dir:{fleet}", *rom_args)
    mine = json.loads(cli(a, "classify", str(task / "test"), "--json", *rom_args).stdout)
    theirs = json.loads(cli(b, "classify", str(task / "test"), "--json", *rom_args).stdout)
    same = [(p["task"], p["label"]) for p in mine] == [(p["task"], p["label"]) for p in theirs]
    if not same:
        raise RuntimeError("device b classifies the synced task differently from device a")
    return f"device b received the packet and classifies {len(theirs)} images as device a does"


# ----------------------------------------------------------------------------- back on x86
def report(work: Path, out: Path, install_seconds: int, command: str, suite: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from skill_edge.runtime.machine import describe_machine

    steps = json.loads((work / "steps.json").read_text())
    x86, arm = np.load(work / "features-x86_64.npy"), None
    rows = list(steps["steps"])
    if (work / "features-aarch64.npy").exists():
        arm = np.load(work / "features-aarch64.npy")
    if arm is None or arm.shape != x86.shape:
        rows.append({"name": "features match x86", "passed": False, "seconds": 0.0,
                     "detail": f"shapes {None if arm is None else arm.shape} vs {x86.shape}"})
        rel = None
    else:
        rel = float(np.max(np.linalg.norm(arm - x86, axis=1) / np.maximum(np.linalg.norm(x86, axis=1), 1e-12)))
        rows.append({"name": "features match x86", "passed": rel <= FEATURE_RTOL, "seconds": 0.0,
                     "detail": f"max per-image relative L2 difference {rel:.2e} (limit {FEATURE_RTOL:g}) over "
                               f"{x86.shape[0]} images x {x86.shape[1]} values (features + trunk statistics)"})
    wheels = steps["wheels"]
    result = {
        "benchmark": "aarch64_check", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command,
        "machine": describe_machine(), "emulated": {"machine": steps["machine"], "python": steps["python"],
                                                    "platform": steps["platform"], "debian_suite": suite,
                                                    "how": "debootstrap --arch=arm64 + qemu-user-static (binfmt_misc)"},
        "passed": all(r["passed"] for r in rows), "steps": rows,
        "features_max_rel_err": rel, "install_seconds": install_seconds,
        "wheels": wheels, "aarch64_wheels": [w for w in wheels if any("aarch64" in t for t in w["tags"])],
        "note": "times are under qemu emulation of arm64 on x86: they are not performance figures",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"aarch64 check {'PASSED' if result['passed'] else 'FAILED'}: "
          + ", ".join(f"{r['name']} {'ok' if r['passed'] else 'FAIL'}" for r in rows) + f" -> {out}")
    if not result["passed"]:
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("make-task").add_argument("dir", type=Path)
    f = sub.add_parser("features")
    for name in ("rom", "task", "out"):
        f.add_argument(name, type=Path)
    sub.add_parser("run").add_argument("dir", type=Path)
    r = sub.add_parser("report")
    r.add_argument("work", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--install-seconds", type=int, default=0)
    r.add_argument("--command", default="bash scripts/aarch64_check.sh")
    r.add_argument("--suite", default="bookworm")
    args = ap.parse_args()
    if args.cmd == "make-task":
        make_task(args.dir)
    elif args.cmd == "features":
        features(args.rom, args.task, args.out)
    elif args.cmd == "run":
        run_all(args.dir)
    else:
        report(args.work, args.out, args.install_seconds, args.command, args.suite)


if __name__ == "__main__":
    main()
