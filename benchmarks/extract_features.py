"""Extract pooled ROM features of every skill-bench task once, for the feature-level benchmarks.

``mapper_tuning.py``, ``maha_rows.py`` and ``packet_budget.py --features`` read
``<out>/<task>/{train,test}.npz`` (``features`` [N, D], ``labels`` [N], ``classes``) instead of
decoding 50,000 images per run.  Extraction goes through ``RomEngine`` and its feature cache,
exactly like ``skill-edge learn``; a re-run only writes the npz files again.

    python benchmarks/extract_features.py --out /work/cache/features [--data ../shared/data/skill-bench]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SKILL_BENCH  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=SKILL_BENCH)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rom", type=Path, default=None, help="ROM dir (default models/rom/efficientnet_lite0; built if absent)")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache dir (default <out>/.cache)")
    args = ap.parse_args()

    from skill_edge.models import default_rom_dir
    from skill_edge.runtime.datasets import load_image_folder
    from skill_edge.runtime.feature_cache import FeatureCache
    from skill_edge.runtime.rom_engine import RomEngine

    rom = args.rom or default_rom_dir()
    if not (rom / "manifest.json").exists():
        from skill_edge.export.rom import build_rom

        build_rom("efficientnet_lite0", rom)
    engine = RomEngine(rom)
    cache = FeatureCache(args.cache or args.out / ".cache", engine.fingerprint)
    meta = args.data / "tasks.json"
    tasks = ([t["task"] for t in json.loads(meta.read_text())] if meta.exists()
             else sorted(p.name for p in args.data.iterdir() if (p / "train").is_dir()))
    for name in tasks:
        ds = load_image_folder(args.data / name)
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            s = getattr(ds, split)
            key = cache.key(s.paths)
            ex = cache.load(key)
            if ex is None:
                ex = engine.extract(s.paths, batch_size=16)
                cache.save(key, ex)
            labels = np.asarray(s.labels)[ex.index]
            np.savez(out / f"{split}.npz", features=ex.features, labels=labels, classes=np.array(ds.classes))
            print(f"{name} {split}: {ex.features.shape[0]} features, {len(ex.failed)} unreadable", flush=True)


if __name__ == "__main__":
    main()
