"""Extract pooled ROM features of every skill-bench task once, for the feature-level benchmarks.

``mapper_tuning.py``, ``maha_rows.py``, ``mapper_ideas.py`` and ``packet_budget.py --features`` read
``<out>/<task>/{train,test}.npz`` (``features`` [N, D], ``labels`` [N], ``classes``, and the
ROM's ``trunk_stats`` [N, 2C]) instead of
decoding 50,000 images per run.  Extraction is ``packet_budget.load_from_images``: a ``Device``
and its feature cache, exactly like ``skill-edge learn``.

    python benchmarks/extract_features.py --out /work/cache/features [--data ../shared/data/skill-bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import FEATURES_ROM, SKILL_BENCH, check_same_rom, features_rom, task_order  # noqa: E402
from packet_budget import DEFAULT_ROM, load_from_images  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SKILL_BENCH)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rom", type=Path, default=DEFAULT_ROM, help="ROM dir (built if absent)")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache dir (default <out>/.cache)")
    ap.add_argument("--tasks", nargs="*", help="subset of tasks (default: all in tasks.json)")
    args = ap.parse_args()

    from skill_edge.runtime.device import Device

    if not (args.rom / "manifest.json").exists():
        from skill_edge.export.rom import build_rom

        build_rom("efficientnet_lite0", args.rom)
    with tempfile.TemporaryDirectory(prefix="extract-features-") as home:
        device = Device(home, args.rom, cache_dir=args.cache or args.out / ".cache")
        record_rom(args.out, {"backbone": device.engine.manifest.backbone,
                               "fingerprint": device.engine.manifest.fingerprint})
        for t in load_from_images(device, args.data, args.tasks or task_order(args.data)):
            (args.out / t.name).mkdir(parents=True, exist_ok=True)
            for split, x, y, s in (("train", t.x_train, t.y_train, t.s_train), ("test", t.x_test, t.y_test, t.s_test)):
                np.savez(args.out / t.name / f"{split}.npz", features=x, labels=y, classes=np.array(t.classes),
                         trunk_stats=s)


def record_rom(out: Path, rom: dict) -> None:
    """Write ``out/rom.json``, or refuse when ``out`` already holds another ROM's features."""
    check_same_rom(features_rom([out]) if out.exists() else None, rom, f"the features already in {out}")
    from skill_edge.runtime.atomic import write_atomically

    out.mkdir(parents=True, exist_ok=True)
    write_atomically(out / FEATURES_ROM, (json.dumps(rom) + "\n").encode())


if __name__ == "__main__":
    main()
