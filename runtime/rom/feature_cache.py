"""Per-task feature cache (safetensors), so heads and anchors can be refit without the backbone.

A cache entry is keyed by the ROM fingerprint, the decoder version and the exact file list
(path, size, mtime), so a changed image, a different ROM or a changed decoder never returns
stale features.  An entry holds the pooled features and the trunk statistics the mappers use
(plus the trunk activations when BB training asked for them); an entry written before trunk
statistics existed is treated as a miss and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from skill_edge.runtime.rom import preprocess
from skill_edge.runtime.rom.engine import Extraction

log = logging.getLogger(__name__)


class FeatureCache:
    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.root = Path(root) / fingerprint[:16]
        self.fingerprint = fingerprint

    def key(self, paths: Sequence[Path | str], *, with_trunk: bool = False) -> str:
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(preprocess.DECODER_VERSION.encode())
        h.update(b"trunk" if with_trunk else b"feat")
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:32]

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> Extraction | None:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        path = self._path(key)
        if not path.exists():
            return None
        try:
            t = load_file(str(path))
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(n)).get("__metadata__", {})
        except (SafetensorError, OSError, ValueError):
            path.unlink(missing_ok=True)  # a damaged cache entry is just recomputed
            return None
        if "trunk_stats" not in t:
            return None  # written by an older version: recompute rather than fit anchors without them
        failed = [tuple(x) for x in json.loads(meta.get("failed", "[]"))]
        return Extraction(t["features"], t["index"].astype(np.int64), failed, t.get("trunk_acts"),
                          float(meta.get("seconds", 0)), t["trunk_stats"])

    def save(self, key: str, ex: Extraction) -> Path | None:
        """Store ``ex`` under ``key``; returns the entry's path, or None when it could not be written.

        The cache only saves time, so a cache that cannot be written (a full disk, a read-only
        or quota-limited folder) must not fail the learn that computed the features: it logs one
        warning and returns None, and no half-written temp file is left behind."""
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        tensors = {"features": np.ascontiguousarray(ex.features, np.float32), "index": ex.index.astype(np.int64)}
        if ex.trunk_stats is not None:
            tensors["trunk_stats"] = np.ascontiguousarray(ex.trunk_stats, np.float32)
        if ex.trunk_acts is not None:
            tensors["trunk_acts"] = np.ascontiguousarray(ex.trunk_acts, np.float32)
        path = self._path(key)
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # a unique temp name: several devices may share one cache and write the same key at once
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.root)
            os.close(fd)
            save_file(tensors, tmp, metadata={"failed": json.dumps(ex.failed), "seconds": str(ex.seconds)})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning("feature cache %s not written (%s); carrying on without it", self.root, reason)
            return None
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
        return path
