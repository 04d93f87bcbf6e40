"""Turn images (files, bytes or arrays) into the exact tensors the ROM expects.

The ROM manifest carries the preprocessing (resize, centre crop, interpolation, mean/std),
so every device feeds the backbone identically.  Decoding is done with PIL, which releases
the GIL, so a thread pool can decode while ONNX Runtime computes the previous batch.
"""

from __future__ import annotations

import io
import os
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Bump whenever decoding or resizing changes its output (e.g. JPEG draft mode, a new resampling
#: filter): the feature cache mixes it into its keys, so features from the old decoder are not reused.
#: 2: JPEG draft decoding that takes effect (1 set it after the pixels were read), EXIF orientation,
#: 16-bit greyscale scaled instead of clipped.  JPEGs under 4x the ROM's resize target decode as before.
#: 3: any other large image (a PNG, a camera frame) is first box-reduced by a whole factor down to 2x the
#: target too (Pillow's ``reducing_gap``).  Images under 4x the target are resized exactly as before.
DECODER_VERSION = "pil-draft-3"

#: A reduced JPEG decode, or the box reduction of any other large image before its resample, stops at
#: this many times the resize target, so the resample after it still shrinks by 2x or more (Pillow's
#: own ``thumbnail`` default).  The ROM features then stay within cosine 0.999 (JPEG) and 0.998 (camera
#: frames) of a full-resolution resample's; at 1x they drift to 0.995 (``benchmarks/decode_speed.py``).
DRAFT_GAP = 2

_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


class ImageDecodeError(ValueError):
    """An input that is not a readable image; callers skip and count it."""


@dataclass(frozen=True)
class Preprocessing:
    resize: int
    crop: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Let libjpeg decode large JPEGs at a reduced scale (``_open``), and box-reduce any other large image
    #: before its resample.  False reads and resamples every pixel, as decoder 1 did;
    #: ``benchmarks/decode_speed.py`` measures the two side by side.
    draft: bool = True

    def _target_size(self, w: int, h: int) -> tuple[int, int]:
        """Size the image is resized to before the centre crop: shorter side ``resize``, no side below ``crop``."""
        scale = self.resize / min(w, h)
        return max(self.crop, round(w * scale)), max(self.crop, round(h * scale))

    def _draft_size(self, w: int, h: int) -> tuple[int, int]:
        """The smallest decode libjpeg may make of a ``w`` x ``h`` JPEG: ``DRAFT_GAP`` times the target."""
        nw, nh = self._target_size(w, h)
        return nw * DRAFT_GAP, nh * DRAFT_GAP

    @classmethod
    def from_manifest(cls, pre: dict[str, Any]) -> "Preprocessing":
        return cls(int(pre["resize"]), int(pre["crop"]), str(pre["interpolation"]),
                   tuple(pre["mean"]), tuple(pre["std"]))

    def __call__(self, image: "ImageInput") -> np.ndarray:
        """One image -> float32 ``[3, crop, crop]``; raises ``ImageDecodeError``."""
        im = _open(image, self._draft_size if self.draft else None)
        w, h = im.size
        if w < 1 or h < 1:
            raise ImageDecodeError(f"{_name(image)}: empty image")
        nw, nh = self._target_size(w, h)
        im = im.convert("RGB").resize((nw, nh), _INTERP.get(self.interpolation, Image.BICUBIC),
                                      reducing_gap=float(DRAFT_GAP) if self.draft else None)
        left, top = (nw - self.crop) // 2, (nh - self.crop) // 2
        im = im.crop((left, top, left + self.crop, top + self.crop))
        # planar float copy, then in place: bit-identical to ((x / 255) - mean) / std on HWC,
        # at half the cost (one allocation instead of four); decoding shares the CPU with the ROM
        x = np.asarray(im).transpose(2, 0, 1).astype(np.float32, order="C")
        x *= 1.0 / 255.0
        x -= np.asarray(self.mean, np.float32)[:, None, None]
        x /= np.asarray(self.std, np.float32)[:, None, None]
        return x


ImageInput = str | Path | bytes | np.ndarray | Image.Image


def _name(image: ImageInput) -> str:
    return str(image) if isinstance(image, (str, Path)) else type(image).__name__


def _open(image: ImageInput, draft_size: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Decode ``image`` fully, upright, in a mode ``convert("RGB")`` maps faithfully.

    - A JPEG at least twice ``draft_size(w, h)`` is decoded by libjpeg at 1/2, 1/4 or 1/8 scale,
      never below that size: a 12-megapixel photo decodes about 5x faster.
      This must be set before the pixels are read, so the full decode (which makes a truncated
      file fail here, not later) comes after it.
    - EXIF orientation is applied, so a phone photo taken upright is seen upright.
    - 16-bit greyscale (PNG, TIFF) is scaled to 8 bits: ``convert`` would clip it to white.
    """
    try:
        if isinstance(image, Image.Image):
            return image
        if isinstance(image, np.ndarray):
            arr = image
            if arr.ndim == 2:
                arr = np.stack([arr] * 3, axis=-1)
            if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
                raise ImageDecodeError(f"array of shape {image.shape} is not an HxW[xC] image")
            if arr.dtype != np.uint8:
                arr = np.clip(arr, 0, 255).astype(np.uint8)
            return Image.fromarray(arr[..., :3] if arr.shape[2] != 1 else arr[..., 0])
        im = Image.open(io.BytesIO(image) if isinstance(image, bytes) else str(image))
        w, h = im.size
        if w < 1 or h < 1:
            raise ImageDecodeError(f"{_name(image)}: empty image")
        if draft_size is not None and im.format == "JPEG":
            im.draft("RGB", draft_size(w, h))
        im.load()  # force a full decode now: truncated files fail here, not later
        ImageOps.exif_transpose(im, in_place=True)
        if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit samples (mode "I" is how PIL widens them)
            im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257.0).round().clip(0, 255).astype(np.uint8))
        return im
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageDecodeError(f"{_name(image)}: not a readable image ({type(exc).__name__}: {exc})") from exc


@dataclass
class Batch:
    """A decoded batch: ``x`` holds the good images, ``index`` their positions in the input order."""

    x: np.ndarray
    index: np.ndarray
    failed: list[tuple[int, str]] = field(default_factory=list)


def lower_thread_priority(increment: int) -> bool:
    """Raise the calling thread's nice value by ``increment`` (capped at 19); Linux only.

    On Linux a nice value belongs to a thread, not the process, so this leaves the ROM's
    threads and the caller's alone.  Returns whether it took effect (other systems: no-op).
    """
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + int(increment)))
        return True
    except (AttributeError, OSError):
        return False


def iter_batches(images: Sequence[ImageInput] | Iterable[ImageInput], pre: Preprocessing, batch_size: int,
                 workers: int = 2, prefetch: int = 2, nice: int = 0) -> Iterator[Batch]:
    """Decode images on a thread pool, ``prefetch`` batches ahead of the consumer.

    ``nice`` > 0 lowers the decode threads' scheduling priority (``lower_thread_priority``), so
    that on a CPU they take the cores when the ROM's threads leave them idle instead of
    preempting them (see ``RomEngine.decode_plan``).  Corrupt inputs are reported in
    ``Batch.failed`` and left out of ``x``; they never stop the stream.
    """
    items = list(images)
    out: "queue.Queue[Batch | BaseException | None]" = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def decode(i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, pre(items[i]), ""
        except ImageDecodeError as exc:
            return i, None, str(exc)

    def produce() -> None:
        try:
            with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode",
                                    initializer=lower_thread_priority, initargs=(nice,)) as pool:
                for start in range(0, len(items), batch_size):
                    if stop.is_set():
                        return
                    results = list(pool.map(decode, range(start, min(start + batch_size, len(items)))))
                    good = [(i, x) for i, x, _ in results if x is not None]
                    failed = [(i, err) for i, x, err in results if x is None]
                    xs = np.stack([x for _, x in good]) if good else np.zeros((0, 3, pre.crop, pre.crop), np.float32)
                    out.put(Batch(xs, np.array([i for i, _ in good], dtype=np.int64), failed))
            out.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            out.put(exc)

    thread = threading.Thread(target=produce, name="decode-producer", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                out.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
