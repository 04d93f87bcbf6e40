"""Decoding camera-sized images: reduced-scale decoding against reading and resampling every pixel.

A device classifies photos straight from a phone or a camera (2 to 12 megapixels) and frames from a
video source, while every skill-bench image is 160 px or less, so no other benchmark sees the cost
of a large input.  The decoder (``runtime.rom.preprocess``) asks libjpeg for a 1/2, 1/4 or 1/8 scale
decode of a JPEG, and box-reduces any other large image (a camera frame, a PNG) by a whole factor,
never below twice the ROM's resize target (``DRAFT_GAP``), before the bicubic resample.  Decoder 1
read and resampled every pixel (its draft request came after the pixels were read): the control
here, ``Preprocessing(draft=False)``.  This runs both on the same inputs, in one process:

- ``ms_per_image``: one thread preprocessing each image (decode, resize, crop, normalise), median
  of ``--reps`` passes;
- ``images_per_s``: ``RomEngine.extract`` end to end (decode threads plus the ROM), as ``classify``
  runs it, median of ``--reps`` passes after one untimed pass;
- ``feature_cosine``: the ROM features of the two decodes of each image (min and median).

The photos are scikit-learn's two sample photographs, scaled to each size and saved as JPEG
quality 92, with a different crop per copy so that no two files are the same; the frames are the
same pictures as RGB arrays, as ``VideoSource`` yields them.

    .venv/bin/python benchmarks/decode_speed.py
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import md_table, update_readme, write_result  # noqa: E402

from skill_edge.runtime.rom.engine import RomEngine  # noqa: E402
from skill_edge.runtime.rom.preprocess import DECODER_VERSION  # noqa: E402

#: (kind, width, height): JPEG files as a phone or camera writes them, RGB arrays as a video source yields them
INPUTS = [("jpeg", 640, 480), ("jpeg", 1920, 1080), ("jpeg", 4032, 3024), ("frame", 1280, 720),
          ("frame", 1920, 1080), ("frame", 3840, 2160)]


def make_inputs(folder: Path, kind: str, size: tuple[int, int], count: int) -> list:
    """``count`` JPEG files (paths) or RGB frames (arrays) of ``size``, each a different crop."""
    from sklearn.datasets import load_sample_image

    sources = [Image.fromarray(load_sample_image(n)) for n in ("china.jpg", "flower.jpg")]
    inputs = []
    for i in range(count):
        src = sources[i % 2]
        w, h = src.size
        dx, dy = (i * 7) % 40, (i * 11) % 30  # a different crop per copy
        im = src.crop((dx, dy, w - 40 + dx, h - 30 + dy)).resize(size, Image.BICUBIC)
        if kind == "frame":
            inputs.append(np.asarray(im))
            continue
        inputs.append(folder / f"{size[0]}x{size[1]}-{i:03d}.jpg")
        im.save(inputs[-1], "JPEG", quality=92)
    return inputs


def ms_per_image(pre, inputs: list, reps: int) -> float:
    passes = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for x in inputs:
            pre(x)
        passes.append((time.perf_counter() - t0) / len(inputs) * 1e3)
    return statistics.median(passes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rom", type=Path, default=Path("models/rom/efficientnet_lite0"))
    ap.add_argument("--count", type=int, default=32, help="inputs per size")
    ap.add_argument("--reps", type=int, default=7, help="passes per measurement (median)")
    args = ap.parse_args()
    rom = RomEngine(args.rom, providers=["cpu"])
    drafted = rom.preprocessing
    full = dataclasses.replace(drafted, draft=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, w, h in INPUTS:
            paths = make_inputs(Path(tmp), kind, (w, h), args.count)
            row = {"input": kind, "size": f"{w}x{h}", "megapixels": round(w * h / 1e6, 1),
                   "file_kb_median": round(statistics.median(p.stat().st_size for p in paths) / 1024, 1)
                   if kind == "jpeg" else None}
            for name, pre in (("full", full), ("reduced", drafted)):
                row[f"ms_per_image_{name}"] = round(ms_per_image(pre, paths, args.reps), 2)
                rom.preprocessing = pre
                ex = rom.extract(paths)  # untimed: warms the ROM's sessions and the page cache
                row[f"images_per_s_{name}"] = round(statistics.median(
                    len(paths) / rom.extract(paths).seconds for _ in range(args.reps)), 1)
                row[f"_features_{name}"] = ex.features
            a, b = row.pop("_features_full"), row.pop("_features_reduced")
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
            row |= {"feature_cosine_min": round(float(cos.min()), 5),
                    "feature_cosine_median": round(float(np.median(cos)), 5),
                    "decode_speedup": round(row["ms_per_image_full"] / row["ms_per_image_reduced"], 2),
                    "pipeline_speedup": round(row["images_per_s_reduced"] / row["images_per_s_full"], 2)}
            rom.preprocessing = drafted
            print(row, flush=True)
            rows.append(row)
    write_result("decode_speed", {"decoder_version": DECODER_VERSION, "rom": str(args.rom),
                                  "backend": rom.backend, "inputs_per_size": args.count, "rows": rows})
    table = md_table(
        ["input", "decode ms, full", "decode ms, reduced", "speed-up", "extract img/s, full",
         "extract img/s, reduced", "speed-up", "feature cosine (min)"],
        [[f"{'JPEG' if r['input'] == 'jpeg' else 'frame'} {r['size']} ({r['megapixels']} MP)", r["ms_per_image_full"], r["ms_per_image_reduced"],
          f"{r['decode_speedup']}x", r["images_per_s_full"], r["images_per_s_reduced"], f"{r['pipeline_speedup']}x",
          r["feature_cosine_min"]] for r in rows])
    update_readme("decode_speed", f"""### Decoding camera-sized images (`benchmarks/decode_speed.py`)

`{DECODER_VERSION}` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale, and box-reduces a large
camera frame by a whole factor, never below twice the ROM's resize target, before the bicubic resample;
"full" reads and resamples every pixel (decoder 1). Both on the same {args.count} inputs per size, in one
run, on the Lite0 ROM with `{rom.backend}`; "decode ms" is one thread (decode, resize, crop,
normalise), "extract" is `RomEngine.extract` end to end (decode threads plus the ROM). The features
of the two agree to the cosine shown; skill-bench's images (160 px at most) are decoded and resized
exactly as before.

{table}

Machine: see `results/decode_speed.json`. Command: `.venv/bin/python benchmarks/decode_speed.py`.""")


if __name__ == "__main__":
    main()
