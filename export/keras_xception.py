"""Load a Keras ImageNet Xception ``.h5`` file into timm's ``legacy_xception``, computing what Keras computes.

The paper's backbone is the Keras ImageNet Xception.  timm's ``legacy_xception`` has the
same layers, but three things differ and each one changes the features:

* **Tensor layouts.**  Keras stores conv kernels as HWIO (depthwise kernels as H W C 1);
  torch wants OIHW (depthwise: C 1 H W).  A Keras ``SeparableConv2D`` is one layer holding
  ``depthwise_kernel`` and ``pointwise_kernel``; timm's ``SeparableConv2d`` has them as the
  two convs ``conv1`` (depthwise) and ``pointwise``.
* **BatchNorm epsilon.**  Keras uses 1e-3, torch 1e-5.
* **Max-pool padding.**  Keras ``MaxPooling2D(3, 2, padding='same')`` pads like TensorFlow:
  one row/column at the bottom/right when the input size is even, one on each side when it
  is odd.  timm uses ``nn.MaxPool2d(3, 2, padding=1)``, which always pads one on each side,
  so at even sizes every window is shifted by one pixel (at 299x299 input this happens in
  Keras' block3, timm's ``block2``).

The other convs already agree: Keras' stem convs are 'valid' (timm: padding 0); the 3x3
stride-1 separable convs are 'same', which for an odd kernel at stride 1 is symmetric
(timm: padding 1); and a 1x1 stride-2 'same' conv needs no padding at any size
(TF pad = max((ceil(n/2)-1)*2 + 1 - n, 0) = 0), so timm's padding-0 skip convs sample the
same pixels.

Supported files (read with h5py, never unpickled):

* Keras 2 / tf.keras ``model.save('x.h5')`` and ``save_weights('x.h5')`` (the files Keras
  ships for ``weights='imagenet'``): layer groups named after the layers, datasets such as
  ``block1_conv1/block1_conv1/kernel:0``, listed in each group's ``weight_names``.
* Keras 3 legacy ``model.save('x.h5')``: the same layout without the ``:0`` suffix.
* Keras 3 ``model.save_weights('x.weights.h5')``: layers are named by class and position
  (``layers/separable_conv2d_7/vars/0``), so they are matched by their order in the Keras
  model; an Xception nested inside a bigger model (``layers/<submodel>/layers/...``) is found
  too.

``include_top=False`` files have no classifier; timm's ``fc`` is then returned as zeros.  The
pooled 2048-D features, which are all this project uses, do not depend on ``fc``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .weights import WeightsError

KERAS_BN_EPSILON = 1e-3
"""``keras.layers.BatchNormalization``'s default epsilon, used by every BN in Keras' Xception."""

FEATURE_DIM = 2048
IMAGENET_CLASSES = 1000

LayerKind = Literal["conv", "sepconv", "bn", "dense"]

# Variable order inside a Keras 3 ``.weights.h5`` layer group (``vars/0``, ``vars/1``, ...):
# the order in which each layer class creates its weights in ``build()``.
_KERAS3_VAR_NAMES: dict[LayerKind, tuple[str, ...]] = {
    "conv": ("kernel",),
    "sepconv": ("depthwise_kernel", "pointwise_kernel"),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
}
# The snake-case class name Keras 3 uses as the group name in ``.weights.h5``.
_KERAS3_CLASS_NAMES: dict[LayerKind, str] = {
    "conv": "conv2d",
    "sepconv": "separable_conv2d",
    "bn": "batch_normalization",
    "dense": "dense",
}


@dataclass(frozen=True)
class KerasLayer:
    """One weighted layer of Keras' Xception and the timm module it becomes.

    ``keras_name`` is ``None`` for the four residual 1x1 convs and their BNs: Keras' Xception
    leaves them unnamed (``conv2d``, ``conv2d_1``, ... depending on what else the Keras session
    built), so they are recognised by ``residual_width`` (128, 256, 728, 1024), which is unique.
    """

    kind: LayerKind
    timm_prefix: str
    keras_name: str | None = None
    residual_width: int | None = None

    def describe(self) -> str:
        if self.keras_name is not None:
            return repr(self.keras_name)
        what = "1x1 conv" if self.kind == "conv" else "BatchNormalization"
        return f"the unnamed residual {what} with {self.residual_width} output channels"


def xception_layer_plan(include_top: bool) -> list[KerasLayer]:
    """Every weighted layer of ``keras.applications.Xception``, in Keras' ``model.layers`` order.

    The order matters only for Keras 3 ``.weights.h5`` files, which name layers by position.
    Keras block ``k`` (2..13) is timm ``block{k-1}``; inside a timm block the ``rep`` sequence is
    ``[ReLU, SepConv, BN] * reps`` (block1 has no leading ReLU), plus a max-pool when strided.
    """
    plan = [
        KerasLayer("conv", "conv1", "block1_conv1"),
        KerasLayer("bn", "bn1", "block1_conv1_bn"),
        KerasLayer("conv", "conv2", "block1_conv2"),
        KerasLayer("bn", "bn2", "block1_conv2_bn"),
    ]
    residual_widths = {2: 128, 3: 256, 4: 728, 13: 1024}
    for k in range(2, 14):
        block = f"block{k - 1}"
        n_sepconvs = 3 if 5 <= k <= 12 else 2
        first_sepconv = 0 if k == 2 else 1  # Keras block2 / timm block1 starts without a ReLU
        for j in range(n_sepconvs):
            i = first_sepconv + 3 * j
            plan.append(KerasLayer("sepconv", f"{block}.rep.{i}", f"block{k}_sepconv{j + 1}"))
            plan.append(KerasLayer("bn", f"{block}.rep.{i + 1}", f"block{k}_sepconv{j + 1}_bn"))
        if k in residual_widths:
            plan.append(KerasLayer("conv", f"{block}.skip", residual_width=residual_widths[k]))
            plan.append(KerasLayer("bn", f"{block}.skipbn", residual_width=residual_widths[k]))
    plan += [
        KerasLayer("sepconv", "conv3", "block14_sepconv1"),
        KerasLayer("bn", "bn3", "block14_sepconv1_bn"),
        KerasLayer("sepconv", "conv4", "block14_sepconv2"),
        KerasLayer("bn", "bn4", "block14_sepconv2_bn"),
    ]
    if include_top:
        plan.append(KerasLayer("dense", "fc", "predictions"))
    return plan


# --------------------------------------------------------------------------- reading the file
LayerWeights = dict[str, np.ndarray]  # e.g. {"kernel": ...} or {"gamma": ..., "beta": ..., ...}


def _short_name(weight_name: str) -> str:
    """``'block1_conv1/kernel:0'`` -> ``'kernel'`` (Keras 2 and Keras 3 spell weight names differently)."""
    return weight_name.rsplit("/", 1)[-1].split(":", 1)[0]


def _decode(value: bytes | str) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _attr_list(group: h5py.Group, name: str) -> list[str] | None:
    """A list attribute, which Keras 2 splits into ``name0``, ``name1``, ... when it exceeds 64 KB."""
    if name in group.attrs:
        return [_decode(v) for v in group.attrs[name]]
    if f"{name}0" not in group.attrs:
        return None
    values: list[str] = []
    chunk = 0
    while f"{name}{chunk}" in group.attrs:
        values += [_decode(v) for v in group.attrs[f"{name}{chunk}"]]
        chunk += 1
    return values


def _read_legacy_group(group: h5py.Group, path: Path) -> LayerWeights:
    names = _attr_list(group, "weight_names") or []
    missing = [n for n in names if n not in group]
    if missing:
        raise WeightsError(f"{path}: layer {group.name!r} lists weights {missing} it does not hold (truncated file?)")
    return {_short_name(n): np.asarray(group[n], dtype=np.float32) for n in names}


def _read_legacy(root: h5py.Group, layer_names: list[str], path: Path) -> dict[str, LayerWeights]:
    """All layers with weights from a Keras 2 / Keras 3-legacy ``.h5`` (``layer_names`` layout)."""
    layers: dict[str, LayerWeights] = {}
    for name in layer_names:
        if name not in root:
            raise WeightsError(f"{path} lists layer {name!r} in layer_names but has no group for it (truncated file?)")
        weights = _read_legacy_group(root[name], path)
        if weights:
            layers[name] = weights
    return layers


def _match_legacy(layers: dict[str, LayerWeights], plan: list[KerasLayer], path: Path) -> list[LayerWeights]:
    """Find each planned layer by name, and the unnamed residual layers by their width."""
    named = {layer.keras_name for layer in plan if layer.keras_name is not None}
    residual: dict[tuple[LayerKind, int], list[str]] = {}
    for name, weights in layers.items():
        if name in named:
            continue
        if "kernel" in weights and weights["kernel"].ndim == 4 and weights["kernel"].shape[:2] == (1, 1):
            residual.setdefault(("conv", weights["kernel"].shape[3]), []).append(name)
        elif "gamma" in weights:
            residual.setdefault(("bn", weights["gamma"].shape[0]), []).append(name)

    found: list[LayerWeights] = []
    for layer in plan:
        if layer.keras_name is not None:
            if layer.keras_name not in layers:
                raise WeightsError(_not_xception(path, f"layer {layer.describe()} is missing", sorted(layers)))
            found.append(layers[layer.keras_name])
            continue
        candidates = residual.get((layer.kind, int(layer.residual_width or 0)), [])
        if len(candidates) != 1:
            problem = "is missing" if not candidates else f"is ambiguous ({candidates})"
            raise WeightsError(_not_xception(path, f"{layer.describe()} {problem}", sorted(layers)))
        found.append(layers[candidates[0]])
    return found


def _find_keras3_layers_group(f: h5py.File, path: Path) -> h5py.Group:
    """The ``layers`` group that holds Xception's 34 separable convs (possibly inside a bigger model)."""
    marker = "separable_conv2d_33"  # the 34th and last separable conv: only a full Xception has it
    hits: list[h5py.Group] = []

    def visit(name: str, obj: object) -> None:
        if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "layers" and marker in obj:
            hits.append(obj)

    f.visititems(visit)
    if len(hits) != 1:
        problem = "has no Xception in it" if not hits else f"holds {len(hits)} Xception-like models"
        raise WeightsError(
            f"{path} is a Keras 3 .weights.h5 file but {problem} (looked for a 'layers' group containing "
            f"{marker!r}; top-level layers: {sorted(f['layers'])[:12] if 'layers' in f else []})"
        )
    return hits[0]


def _match_keras3(layers_group: h5py.Group, plan: list[KerasLayer], path: Path) -> list[LayerWeights]:
    """Keras 3 names layers ``<class>[_<i>]`` in ``model.layers`` order, so count per class along the plan."""
    seen: dict[LayerKind, int] = {}
    found: list[LayerWeights] = []
    for layer in plan:
        i = seen.get(layer.kind, 0)
        seen[layer.kind] = i + 1
        cls = _KERAS3_CLASS_NAMES[layer.kind]
        group_name = cls if i == 0 else f"{cls}_{i}"
        var_names = _KERAS3_VAR_NAMES[layer.kind]
        group = layers_group.get(f"{group_name}/vars")
        if group is None or len(group) != len(var_names):
            raise WeightsError(
                _not_xception(
                    path,
                    f"layer {layer.describe()} (stored as {group_name!r} with {len(var_names)} variables) is missing",
                    sorted(layers_group),
                )
            )
        found.append({name: np.asarray(group[str(j)], dtype=np.float32) for j, name in enumerate(var_names)})
    return found


def _not_xception(path: Path, problem: str, present: list[str]) -> str:
    return (
        f"{path} is not a Keras ImageNet Xception: {problem}. Expected keras.applications.Xception "
        f"(include_top=False or True) saved as .h5 or .weights.h5. Layers in the file ({len(present)}): "
        f"{present[:10]}{' ...' if len(present) > 10 else ''}"
    )


def read_keras_xception(path: str | Path) -> tuple[list[KerasLayer], list[LayerWeights]]:
    """The layer plan and, for each planned layer, its Keras weights (float32 numpy arrays)."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"Keras weights file {path} does not exist")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(f"{path} is not a readable HDF5 file ({exc}); expected a Keras Xception .h5") from exc
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        layer_names = _attr_list(root, "layer_names")
        if layer_names is not None:
            layers = _read_legacy(root, layer_names, path)
            include_top = "predictions" in layers
            plan = xception_layer_plan(include_top)
            return plan, _match_legacy(layers, plan, path)
        if "layers" in f:
            group = _find_keras3_layers_group(f, path)
            include_top = "dense/vars" in group
            plan = xception_layer_plan(include_top)
            return plan, _match_keras3(group, plan, path)
        raise WeightsError(
            f"{path} is HDF5 but not a Keras weights file (no 'layer_names' attribute and no 'layers' group); "
            f"top-level keys: {sorted(f)[:10]}"
        )


# --------------------------------------------------------------------------- converting
def _hwio_to_oihw(kernel: np.ndarray) -> np.ndarray:
    return kernel.transpose(3, 2, 0, 1)


def _depthwise_to_torch(kernel: np.ndarray) -> np.ndarray:
    """Keras depthwise kernel ``H W C 1`` (depth_multiplier 1) -> torch grouped conv ``C 1 H W``."""
    return kernel.transpose(2, 3, 0, 1)


def _layer_to_torch(layer: KerasLayer, w: LayerWeights, path: Path) -> dict[str, np.ndarray]:
    try:
        if layer.kind == "conv":
            return {"weight": _hwio_to_oihw(w["kernel"])}
        if layer.kind == "sepconv":
            return {
                "conv1.weight": _depthwise_to_torch(w["depthwise_kernel"]),
                "pointwise.weight": _hwio_to_oihw(w["pointwise_kernel"]),
            }
        if layer.kind == "bn":
            return {
                "weight": w["gamma"],
                "bias": w["beta"],
                "running_mean": w["moving_mean"],
                "running_var": w["moving_variance"],
            }
        return {"weight": w["kernel"].T, "bias": w["bias"]}  # Dense: (in, out) -> Linear (out, in)
    except KeyError as exc:
        raise WeightsError(
            f"{path}: layer {layer.describe()} has weights {sorted(w)}, but a Keras {layer.kind} needs {exc}"
        ) from None


def keras_h5_to_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A timm ``legacy_xception`` state dict from a Keras Xception ``.h5`` / ``.weights.h5`` file.

    Only tensors are converted here; the model must also be passed through
    :func:`make_keras_compatible` to compute what Keras computes.  With an
    ``include_top=False`` file, ``fc.weight``/``fc.bias`` are zeros of shape (1000, 2048)/(1000,)
    so a strict load works; the pooled features do not use them.
    """
    path = Path(path)
    plan, weights = read_keras_xception(path)
    sd: dict[str, torch.Tensor] = {}
    for layer, w in zip(plan, weights):
        for key, value in _layer_to_torch(layer, w, path).items():
            sd[f"{layer.timm_prefix}.{key}"] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if "fc.weight" not in sd:
        sd["fc.weight"] = torch.zeros(IMAGENET_CLASSES, FEATURE_DIM)
        sd["fc.bias"] = torch.zeros(IMAGENET_CLASSES)
    return sd


# --------------------------------------------------------------------------- matching Keras' arithmetic
class TFSameMaxPool3x3s2(nn.Module):
    """``MaxPooling2D(3, strides=2, padding='same')`` exactly as TensorFlow/Keras computes it.

    TF pads ``total = (ceil(n/2) - 1) * 2 + 3 - n`` rows (1 if n is even, 2 if odd) and puts the
    extra one at the end, so its last window is always rows ``n-2, n-1, pad``: TF anchors the
    windows at the bottom/right edge, while ``nn.MaxPool2d(3, 2, padding=1)`` anchors them at the
    top/left.  Flipping H and W, pooling with torch's symmetric padding (which pads with -inf),
    and flipping back is therefore the TF result at every size, even or odd.  Unlike a pad whose
    amount depends on the input shape, this exports to a static ONNX graph (Slice, MaxPool,
    Slice) that stays correct for dynamic H/W.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x.flip(-2, -1), kernel_size=3, stride=2, padding=1).flip(-2, -1)


def _is_legacy_xception(model: nn.Module) -> bool:
    return all(hasattr(model, n) for n in ("conv1", "conv2", "conv3", "conv4", "fc")) and all(
        hasattr(model, f"block{i}") for i in range(1, 13)
    )


def make_keras_compatible(model: nn.Module) -> nn.Module:
    """Make a timm ``legacy_xception`` compute what Keras' Xception computes (in place; idempotent).

    Sets every BatchNorm's eps to Keras' 1e-3 and swaps the strided blocks' ``nn.MaxPool2d(3, 2, 1)``
    for :class:`TFSameMaxPool3x3s2`.  Conv paddings already agree (see the module docstring).
    Returns ``model`` for chaining.
    """
    if not _is_legacy_xception(model):
        raise TypeError(f"make_keras_compatible expects timm's legacy_xception, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = KERAS_BN_EPSILON
    for i in range(1, 13):
        rep: nn.Sequential = getattr(model, f"block{i}").rep
        for j, module in enumerate(rep):
            if isinstance(module, nn.MaxPool2d):
                if (module.kernel_size, module.stride) not in ((3, 2), ((3, 3), (2, 2))):
                    raise TypeError(f"block{i}.rep.{j} is {module}, not the 3x3 stride-2 pool Xception has")
                rep[j] = TFSameMaxPool3x3s2()
    return model
