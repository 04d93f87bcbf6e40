"""RomEngine: the device's read-only backbone, with a small InferenceSession-like surface.

It verifies the ROM fingerprint on load, then runs the trunk once per image and the tail
with per-sample beneficial biases.  Backends, in order of preference: a TensorRT engine
built for this GPU (``export.trt``), ONNX Runtime CUDA, ONNX Runtime CPU; ``providers=``
overrides the order, as in ``onnxruntime.InferenceSession``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from skill_edge.export.manifest import RomError, RomManifest, verify_rom

from .preprocess import ImageInput, Preprocessing, iter_batches

log = logging.getLogger(__name__)

PROVIDER_NAMES = ("tensorrt", "cuda", "cpu")
_ORT = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


@dataclass
class Extraction:
    """Features of the images that decoded, in input order, plus what was skipped and why."""

    features: np.ndarray  # [M, D]
    index: np.ndarray  # [M] positions in the input sequence
    failed: list[tuple[int, str]] = field(default_factory=list)
    trunk_acts: np.ndarray | None = None  # [M, C, h, w] when asked for (BB training)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.index) / self.seconds if self.seconds > 0 else 0.0


class _OrtGraph:
    def __init__(self, path: Path, provider: str, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=[_ORT[provider]])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, **feeds: np.ndarray) -> np.ndarray:
        return self.session.run(None, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in feeds.items()})[0]


def available_providers() -> list[str]:
    """Backends usable on this machine, best first."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    out = []
    try:
        from skill_edge.export import trt

        if trt.gpu_available():
            out.append("tensorrt")
    except ImportError:
        pass
    if "CUDAExecutionProvider" in have and _cuda_device_present():
        out.append("cuda")
    out.append("cpu")
    return out


def _cuda_device_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False


class RomEngine:
    """Load a ROM directory, verify it, and run its trunk/tail graphs."""

    def __init__(self, rom_dir: str | Path, providers: Sequence[str] | None = None, *, threads: int | None = None,
                 verify: bool = True) -> None:
        self.rom_dir = Path(rom_dir)
        self.manifest: RomManifest = verify_rom(self.rom_dir) if verify else RomManifest.read(self.rom_dir)
        self.preprocessing = Preprocessing.from_manifest(self.manifest.preprocessing)
        self.threads = threads or int(os.environ.get("SKILL_EDGE_THREADS", "0")) or None
        wanted = [p.lower() for p in (providers or available_providers())]
        bad = [p for p in wanted if p not in PROVIDER_NAMES]
        if bad:
            raise ValueError(f"unknown provider(s) {bad}; choose from {', '.join(PROVIDER_NAMES)}")
        self.provider, self._graphs = self._open(wanted)

    # ------------------------------------------------------------------ setup
    def _open(self, wanted: list[str]) -> tuple[str, dict[str, Callable[..., np.ndarray]]]:
        errors = []
        for p in wanted:
            try:
                if p == "tensorrt":
                    from skill_edge.export import trt

                    return p, trt.load_rom_engines(self.rom_dir, self.manifest)
                graphs = {name: _OrtGraph(self.rom_dir / g.file, p, self.threads)
                          for name, g in self.manifest.graphs.items() if name in ("trunk", "tail")}
                return p, graphs
            except (ImportError, RuntimeError, OSError) as exc:
                errors.append(f"{p}: {exc}")
                log.info("provider %s unavailable: %s", p, exc)
        raise RomError("no usable backend for this ROM: " + "; ".join(errors))

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    @property
    def feature_dim(self) -> int:
        return self.manifest.feature_dim

    @property
    def tail_bias_total(self) -> int:
        return self.manifest.tail_bias_total

    # ------------------------------------------------------------------ compute
    def trunk(self, images: np.ndarray) -> np.ndarray:
        """Preprocessed ``[N,3,H,W]`` -> trunk activations ``[N,C,h,w]`` (task independent)."""
        return self._graphs["trunk"](image=images)

    def tail(self, acts: np.ndarray, bb: np.ndarray | None = None) -> np.ndarray:
        """Trunk activations + per-sample tail biases (``[N,B]``, ``[B]`` or None for zeros) -> features."""
        n = acts.shape[0]
        b = self.manifest.tail_bias_total
        if bb is None:
            bb = np.zeros((n, b), np.float32)
        bb = np.asarray(bb, np.float32)
        if bb.ndim == 1:
            bb = np.broadcast_to(bb, (n, b))
        if bb.shape != (n, b):
            raise ValueError(f"tail biases must have shape [{n}, {b}] for this ROM, got {list(bb.shape)}")
        return self._graphs["tail"](trunk_act=acts, bb=bb)

    def features(self, images: np.ndarray, bb: np.ndarray | None = None) -> np.ndarray:
        return self.tail(self.trunk(images), bb)

    def preprocess(self, image: ImageInput) -> np.ndarray:
        return self.preprocessing(image)

    def extract(self, images: Sequence[ImageInput] | Iterable[ImageInput], *, batch_size: int = 16,
                keep_trunk: bool = False, workers: int = 2,
                progress: Callable[[int], None] | None = None) -> Extraction:
        """Decode (in parallel) and run every image; corrupt ones are skipped and listed."""
        feats, index, failed, acts = [], [], [], []
        t0 = time.perf_counter()
        for batch in iter_batches(images, self.preprocessing, batch_size, workers=workers):
            failed.extend(batch.failed)
            if len(batch.index):
                a = self.trunk(batch.x)
                feats.append(self.tail(a))
                index.append(batch.index)
                if keep_trunk:
                    acts.append(a)
            if progress:
                progress(len(batch.index) + len(batch.failed))
        d = self.manifest.feature_dim
        return Extraction(
            features=np.concatenate(feats) if feats else np.zeros((0, d), np.float32),
            index=np.concatenate(index) if index else np.zeros(0, np.int64),
            failed=failed,
            trunk_acts=(np.concatenate(acts) if acts else None) if keep_trunk else None,
            seconds=time.perf_counter() - t0,
        )
