"""The factory: freeze a backbone into a ROM directory of ONNX graphs plus a fingerprinted manifest.

Graphs written (all opset 17, dynamic batch ``N``):

* ``full.onnx``  — ``image[N,3,H,W]`` + ``bb[N,B]`` -> ``features[N,D]``; one bias slot after every BN.
* ``trunk.onnx`` — ``image`` -> ``trunk_act[N,C,h,w]``; no bias inputs (shared by every task).
* ``tail.onnx``  — ``trunk_act`` + ``bb[N,B_tail]`` -> ``features``; a BB pass reruns only this.

``bb`` rows are per sample, so one batch may mix tasks; zeros give the plain backbone.
"""

from __future__ import annotations

import logging
import platform
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from skill_edge.models import default_rom_dir

from .backbone import Backbone, GlobalPool, build_backbone
from .bias import BiasedStages
from .manifest import GraphInfo, RomManifest, sha256_file, verify_rom
from .weights import state_dict_sha256

log = logging.getLogger(__name__)
OPSET = 17


class _Plain(nn.Module):
    def __init__(self, stages: list[nn.Module], pool: nn.Module | None) -> None:
        super().__init__()
        self.body = nn.Sequential(*stages)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return self.pool(y) if self.pool is not None else y


def count_macs(module: nn.Module, example: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates per *sample* of convolutions and linear layers (the paper's MAC count)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out[0].numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    with torch.no_grad():
        module(*[e[:1] for e in example])
    for h in handles:
        h.remove()
    return int(total)


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                input_names: list[str], output_names: list[str]) -> None:
    """TorchScript-based export with a dynamic batch axis on every input and output."""
    axes = {n: {0: "N"} for n in input_names + output_names}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)


def _shape_spec(t: torch.Tensor) -> list:
    return ["N", *t.shape[1:]]


def export_plain(backbone: str, out: Path, weights: str | Path | None = None, random_init: bool = False) -> Path:
    """A graph without any bias input: the baseline the bias-overhead benchmark compares against."""
    bk = build_backbone(backbone, weights, random_init=random_init)
    x = torch.zeros(2, 3, bk.spec.input_size, bk.spec.input_size)
    export_onnx(_Plain(bk.stages, GlobalPool()).eval(), (x,), Path(out), ["image"], ["features"])
    return Path(out)


def build_rom(backbone: str, out: Path | None = None, *, weights: str | Path | None = None,
              tail_blocks: int | None = None, random_init: bool = False,
              progress: Callable[[str], None] = lambda s: None) -> RomManifest:
    """Build and verify a ROM directory; returns its manifest.

    Each graph gets its own freshly built backbone because ``BiasedStages`` rewires the
    modules it wraps.
    """
    out = Path(out) if out is not None else default_rom_dir(backbone)
    out.mkdir(parents=True, exist_ok=True)
    progress("loading weights")
    ref = build_backbone(backbone, weights, random_init=random_init)
    spec = ref.spec
    k = spec.tail_blocks if tail_blocks is None else int(tail_blocks)
    if not 1 <= k < len(ref.stages):
        raise ValueError(f"tail_blocks must be in 1..{len(ref.stages) - 1} for {backbone}, got {k}")
    split = len(ref.stages) - k
    x = torch.zeros(2, 3, spec.input_size, spec.input_size)

    def fresh() -> Backbone:  # one copy of the same weights per graph (wrapping modifies the stages)
        return _clone(ref)

    # full graph
    progress("exporting full graph")
    full = BiasedStages(fresh().stages, GlobalPool()).eval()
    bb = torch.zeros(2, full.layout.total)
    export_onnx(full, (x, bb), out / "full.onnx", ["image", "bb"], ["features"])
    # trunk graph (no biases)
    progress("exporting trunk graph")
    trunk = _Plain(fresh().stages[:split], None).eval()
    with torch.no_grad():
        act = trunk(x)
    export_onnx(trunk, (x,), out / "trunk.onnx", ["image"], ["trunk_act"])
    # tail graph
    progress("exporting tail graph")
    tail = BiasedStages(fresh().stages[split:], GlobalPool(), first_stage=split).eval()
    bb_tail = torch.zeros(2, tail.layout.total)
    export_onnx(tail, (act, bb_tail), out / "tail.onnx", ["trunk_act", "bb"], ["features"])
    layout = full.layout
    if layout.suffix(tail.layout.total).to_list() != tail.layout.to_list():
        raise RuntimeError("internal error: tail bias layout is not the suffix of the full layout")

    progress("saving weights")
    from safetensors.torch import save_file

    sd = {k2: v.contiguous() for k2, v in ref.classifier_model.state_dict().items()}
    save_file(sd, str(out / "weights.safetensors"))

    macs_trunk = count_macs(_Plain(ref.stages[:split], None), (x,))
    macs_tail = count_macs(_Plain(ref.stages[split:], GlobalPool()), (act,))
    with torch.no_grad():
        feats = full(x, bb)
    graphs = {
        "full": GraphInfo("full.onnx", sha256_file(out / "full.onnx"),
                          {"image": _shape_spec(x), "bb": _shape_spec(bb)}, {"features": _shape_spec(feats)},
                          macs_trunk + macs_tail),
        "trunk": GraphInfo("trunk.onnx", sha256_file(out / "trunk.onnx"), {"image": _shape_spec(x)},
                           {"trunk_act": _shape_spec(act)}, macs_trunk),
        "tail": GraphInfo("tail.onnx", sha256_file(out / "tail.onnx"),
                          {"trunk_act": _shape_spec(act), "bb": _shape_spec(bb_tail)},
                          {"features": _shape_spec(feats)}, macs_tail),
    }
    manifest = RomManifest(
        backbone=spec.name,
        timm_arch=spec.timm_arch,
        weights_source=ref.weights_source,
        weights_sha256=state_dict_sha256(ref.classifier_model),
        weights_file="weights.safetensors",
        weights_file_sha256=sha256_file(out / "weights.safetensors"),
        feature_dim=int(feats.shape[1]),
        preprocessing=spec.preprocessing(),
        bias_layout=layout.to_list(),
        bias_total=layout.total,
        tail_blocks=k,
        tail_bias_total=tail.layout.total,
        trunk_output_shape=_shape_spec(act),
        graphs=graphs,
        opset=OPSET,
        tool_versions=_tool_versions(),
    )
    manifest.fingerprint = manifest.compute_fingerprint()
    # a stale engine cache from an earlier build must not survive a rebuild
    for stale in out.glob("*.engine"):
        stale.unlink()
    manifest.write(out)
    progress("verifying")
    return verify_rom(out)


def _clone(bk: Backbone) -> Backbone:
    import copy

    model = copy.deepcopy(bk.classifier_model)
    from .backbone import stages_of

    return Backbone(bk.spec, model, stages_of(model, bk.spec.timm_arch), bk.weights_source)


def _tool_versions() -> dict[str, str]:
    import onnx
    import timm

    v = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
         "onnx": onnx.__version__}
    try:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return v


def remove_rom(rom_dir: Path) -> None:
    shutil.rmtree(rom_dir, ignore_errors=True)
