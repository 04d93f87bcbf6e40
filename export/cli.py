"""`skill-edge export` and `skill-edge rom info|verify`: the factory's command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from skill_edge.tables import print_record, print_table

console = Console(emoji=False, soft_wrap=True)  # a long line stays whole in a log
rom_app = typer.Typer(help="Inspect and verify ROM directories.", no_args_is_help=True)


def export_command(
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", "-b", help="Catalogue name (skill-edge rom list)."),
    weights: Optional[str] = typer.Option(None, "--weights", "-w",
                                          help="Weights file (.pth/.pt/.safetensors, Keras .h5 for xception) or 'hub'."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="ROM directory (default: models/rom/<backbone>)."),
    tail_blocks: Optional[int] = typer.Option(None, "--tail-blocks",
                                              help="How many final stages form the tail (default from the catalogue)."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT engines (needs a GPU and `tensorrt`)."),
    fp16: bool = typer.Option(False, "--fp16", help="TensorRT engines in fp16."),
    max_batch: int = typer.Option(32, "--max-batch", help="Largest batch of the TensorRT optimisation profile."),
    random_init: bool = typer.Option(False, "--random-init", hidden=True, help="Timing/testing only: no weights."),
) -> None:
    """Freeze a pretrained backbone into a fingerprinted ROM (ONNX graphs + manifest)."""
    from skill_edge.models import default_rom_dir

    from .manifest import RomError
    from .rom import build_rom
    from .weights import WeightsError

    target = out or default_rom_dir(backbone)
    try:
        with console.status(f"building ROM for {backbone}") as status:
            m = build_rom(backbone, target, weights=weights, tail_blocks=tail_blocks, random_init=random_init,
                          progress=lambda s: status.update(f"{backbone}: {s}"))
    except (WeightsError, RomError, KeyError, ValueError) as exc:
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # str(KeyError) adds quotes
        console.print(f"[red]export failed:[/red] {escape(str(reason))}")
        raise typer.Exit(2) from None
    _print_summary(m, target)
    if trt:
        from . import trt as trt_mod

        try:
            for path in trt_mod.build_rom_engines(target, fp16=fp16, max_batch=max_batch, progress=console.print):
                console.print(f"TensorRT engine: {path}")
        except trt_mod.TrtUnavailable as exc:
            console.print(f"[red]TensorRT build failed:[/red] {exc}")
            raise typer.Exit(3) from None


def _print_summary(m, target: Path) -> None:
    print_record(console, f"ROM {target}", {
        "backbone": f"{m.backbone} ({m.timm_arch})", "weights": m.weights_source, "fingerprint": m.fingerprint,
        "feature dim": m.feature_dim,
        "bias slots B": f"{m.bias_total} in {len(m.bias_layout)} layers (tail: {m.tail_bias_total})",
        "MACs/image": ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in m.macs_per_image.items()),
        "input": f"{m.preprocessing['input_size']} {m.preprocessing['interpolation']} "
                 f"crop {m.preprocessing['crop_pct']}"})


@rom_app.command("info")
def info(rom_dir: Path = typer.Argument(..., help="ROM directory"),
         as_json: bool = typer.Option(False, "--json", help="Print the raw manifest.")) -> None:
    """Print a ROM's manifest."""
    from .manifest import RomError, RomManifest

    try:
        m = RomManifest.read(rom_dir)
    except RomError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(m.canonical_bytes().decode(), nl=False)
        return
    _print_summary(m, rom_dir)
    print_table(console, "graphs", ["graph", "file", "inputs", "outputs", "MACs/image", "sha256"],
                [[name, g.file, json.dumps(g.inputs), json.dumps(g.outputs), f"{g.macs_per_image:,}", g.sha256[:16]]
                 for name, g in m.graphs.items()], right=("MACs/image",))
    console.print(f"tool versions: {m.tool_versions}")
    if m.engines:
        console.print(f"TensorRT engines: {list(m.engines)}")


@rom_app.command("verify")
def verify(rom_dir: Path = typer.Argument(..., help="ROM directory")) -> None:
    """Recompute the fingerprint and every file hash; non-zero exit names the damaged file."""
    from .manifest import RomError, verify_rom

    try:
        m = verify_rom(rom_dir)
    except RomError as exc:
        console.print(f"[red]ROM verification FAILED:[/red] {exc}")
        raise typer.Exit(1) from None
    console.print(f"[green]ROM OK[/green] {m.backbone} fingerprint {m.fingerprint}")


@rom_app.command("list")
def list_backbones() -> None:
    """List the backbone catalogue."""
    from skill_edge.models import REGISTRY

    print_table(console, "backbone catalogue", ["name", "timm arch", "input", "dim", "weights"],
                [[s.name, s.timm_arch, f"{s.input_size}px {s.interpolation} crop {s.crop_pct}", str(s.feature_dim),
                  "; ".join(f"{w.kind}:{w.ref}" for w in s.weight_sources)] for s in REGISTRY.values()],
                right=("dim",))
