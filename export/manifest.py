"""The ROM manifest: what a ROM directory holds and the fingerprint that names it.

Devices only trust knowledge made against the *same* ROM, so the fingerprint covers
everything that changes what the ROM computes: backbone, weights, every graph's bytes,
preprocessing, bias layout and split point.  The manifest file itself is stored in a
canonical serialisation, so a changed byte anywhere in it is detected too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
ROM_FORMAT = "skill-edge-rom/1"


class RomError(RuntimeError):
    """A ROM directory that is missing, modified or made for something else."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass
class GraphInfo:
    file: str
    sha256: str
    inputs: dict[str, list]  # name -> shape with "N" for the dynamic batch
    outputs: dict[str, list]
    macs_per_image: int


@dataclass
class RomManifest:
    backbone: str
    timm_arch: str
    weights_source: str
    weights_sha256: str  # hash of the baked tensors (format independent)
    weights_file: str  # safetensors copy of the weights, for on-device BB training
    weights_file_sha256: str
    feature_dim: int
    preprocessing: dict[str, Any]
    bias_layout: list[list]  # [[layer, channels], ...] for the full graph, trunk layers first
    bias_total: int
    tail_blocks: int
    tail_bias_total: int  # the last `tail_bias_total` entries of the layout belong to the tail
    trunk_output_shape: list  # [N, C, H, W]
    graphs: dict[str, GraphInfo]  # "full", "trunk", "tail"
    opset: int
    tool_versions: dict[str, str]
    format: str = ROM_FORMAT
    engines: dict[str, dict] = field(default_factory=dict)  # TensorRT engines built later, not fingerprinted
    fingerprint: str = ""

    # ------------------------------------------------------------------ identity
    def fingerprinted_fields(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("fingerprint")
        d.pop("engines")  # engines are derived, per-GPU caches of the same graphs
        return d

    def compute_fingerprint(self) -> str:
        blob = json.dumps(self.fingerprinted_fields(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @property
    def macs_per_image(self) -> dict[str, int]:
        return {name: g.macs_per_image for name, g in self.graphs.items()}

    def tail_layout_hash(self) -> str:
        """Identifies the bias vector a BB-carrying task was trained for."""
        tail = self.bias_layout[len(self.bias_layout) - self._tail_slot_count():]
        return hashlib.sha256(json.dumps([self.fingerprint, tail]).encode()).hexdigest()[:32]

    # ------------------------------------------------------------------ BB split points
    # A BB split point is the index of the first stage whose biases a task learns (issue 16): the
    # tail split (``tail_split``), an earlier stage, or 0 (the whole network).  Bias slots are
    # named ``<stage>.<path>`` in layout order, so a split's biases are a suffix of the layout.
    @property
    def stage_count(self) -> int:
        return 1 + max(int(layer.split(".", 1)[0]) for layer, _ in self.bias_layout)

    @property
    def tail_split(self) -> int:
        """The stage ``tail.onnx`` starts at."""
        return self.stage_count - self.tail_blocks

    def bias_suffix_total(self, split: int) -> int:
        """How many bias values the stages from ``split`` on hold (``bias_total`` for 0)."""
        return sum(int(ch) for layer, ch in self.bias_layout if int(layer.split(".", 1)[0]) >= int(split))

    def split_of_bias_total(self, n: int) -> int | None:
        """The split point whose suffix holds exactly ``n`` biases, None if no stage boundary does."""
        for s in range(self.stage_count):
            if self.bias_suffix_total(s) == int(n):
                return s
        return None

    def bb_splits(self) -> dict[int, tuple[int, str]]:
        """Every BB split point a device can rerun -> (bias values, layout hash): the tail split through
        ``tail.onnx``, every earlier stage through ``full.onnx`` with the biases before it zero."""
        if "full" not in self.graphs:
            return {self.tail_split: (self.tail_bias_total, self.tail_layout_hash())}
        return {s: (self.bias_suffix_total(s), self.bias_layout_hash(s)) for s in range(self.tail_split + 1)}

    def bias_layout_hash(self, split: int) -> str:
        """Identifies the layout of the biases learned from stage ``split`` on (32 hex digits); for the
        tail split it equals ``tail_layout_hash()``."""
        suffix = [list(x) for x in self.bias_layout if int(x[0].split(".", 1)[0]) >= int(split)]
        return hashlib.sha256(json.dumps([self.fingerprint, suffix]).encode()).hexdigest()[:32]

    def _tail_slot_count(self) -> int:
        n, total = 0, 0
        for _, ch in reversed(self.bias_layout):
            if total >= self.tail_bias_total:
                break
            total += ch
            n += 1
        return n

    # ------------------------------------------------------------------ files
    def canonical_bytes(self) -> bytes:
        return (json.dumps(asdict(self), sort_keys=True, indent=2) + "\n").encode()

    def write(self, rom_dir: Path) -> Path:
        path = Path(rom_dir) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_bytes(self.canonical_bytes())
        tmp.replace(path)
        return path

    @classmethod
    def read(cls, rom_dir: Path) -> "RomManifest":
        path = Path(rom_dir) / MANIFEST_NAME
        if not path.exists():
            raise RomError(f"{rom_dir} is not a ROM directory: {MANIFEST_NAME} is missing "
                           f"(build one with `skill-edge export`)")
        raw = path.read_bytes()
        try:
            d = json.loads(raw)
            if d.get("format") != ROM_FORMAT:
                raise RomError(f"{path}: unsupported ROM format {d.get('format')!r}, expected {ROM_FORMAT}")
            d["graphs"] = {k: GraphInfo(**v) for k, v in d["graphs"].items()}
            m = cls(**d)
        except RomError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise RomError(f"{path} is damaged or not a skill-edge manifest: {exc}") from exc
        if m.canonical_bytes() != raw:
            raise RomError(f"{path} was modified: its bytes differ from the canonical manifest")
        return m


def verify_rom(rom_dir: Path, *, check_files: bool = True) -> RomManifest:
    """Recompute the fingerprint and every file hash; raise ``RomError`` naming the first bad file."""
    rom_dir = Path(rom_dir)
    m = RomManifest.read(rom_dir)
    if m.compute_fingerprint() != m.fingerprint:
        raise RomError(f"{rom_dir / MANIFEST_NAME}: fingerprint does not match its contents (manifest modified)")
    if check_files:
        files = {g.file: g.sha256 for g in m.graphs.values()} | {m.weights_file: m.weights_file_sha256}
        for name, want in files.items():
            path = rom_dir / name
            if not path.exists():
                raise RomError(f"{path}: ROM file is missing")
            if sha256_file(path) != want:
                raise RomError(f"{path}: ROM file was modified (sha256 differs from the manifest)")
    return m
