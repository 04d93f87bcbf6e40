"""`skill-edge learn` and `skill-edge classify`: the device's two everyday verbs.

Both are thin callers of ``runtime.device.Device``.  A device's state lives in one home
directory (``--home``, env ``SKILL_EDGE_HOME``, default ``~/.skill-edge``): ``bank/``,
``keys/``, ``trust/``, ``outbox/``, ``captures/`` and ``cache/``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .knowledge import DEFAULT_TRANSFORM, FEATURE_TRANSFORMS

console = Console(stderr=True)
out = Console()

HomeOption = typer.Option(None, "--home", envvar="SKILL_EDGE_HOME",
                          help="Device home (bank, keys, outbox); default ~/.skill-edge.")
RomOption = typer.Option(None, "--rom", envvar="SKILL_EDGE_ROM",
                         help="ROM directory (default: models/rom/efficientnet_lite0).")
ProviderOption = typer.Option(None, "--provider", help="Backend order override: tensorrt, cuda or cpu (repeatable).")


def resolve_home(home: Optional[Path]) -> Path:
    return Path(home) if home else Path(os.environ.get("SKILL_EDGE_HOME") or Path.home() / ".skill-edge")


def resolve_rom(rom: Optional[Path]) -> Path:
    from skill_edge.models import default_rom_dir

    path = Path(rom) if rom else default_rom_dir()
    if not (path / "manifest.json").exists():
        console.print(f"[red]no ROM at {path}[/red]: build it with `skill-edge export --backbone efficientnet_lite0`"
                      f"{' --out ' + str(path) if rom else ''}")
        raise typer.Exit(2)
    return path


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, transient=True)


def open_device(home: Optional[Path], rom: Optional[Path], provider: Optional[List[str]], *, need_key: bool = False):
    from skill_edge.export.manifest import RomError

    from .device import Device
    from .keys import KeyStoreError, TrustStore, init_device_key, load_device_key

    h = resolve_home(home)
    if need_key:
        try:
            load_device_key(h)
        except KeyStoreError:
            key = init_device_key(h)
            TrustStore.at_home(h).add("self", key.public_key, overwrite=True)  # as `keys init` does
            console.print(f"created device key {key.key_id} in {h / 'keys'} (share keys/device.pub with the fleet)")
    try:
        return Device(h, resolve_rom(rom), providers=provider)
    except RomError as exc:
        console.print(f"[red]ROM problem:[/red] {exc}")
        raise typer.Exit(2) from None


def learn_command(
    task: str = typer.Option(..., "--task", "-t", help="Task name (unique in the fleet)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder: DIR/{train,val,test}/<class>/*."),
    camera: Optional[str] = typer.Option(None, "--camera", "-c",
                                         help="Video source: 0, v4l2:///dev/video0, csi://0, file://clip.mp4, rtsp://..."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels to capture (with --camera)."),
    frames: int = typer.Option(100, "--frames", help="Frames to capture per label (with --camera)."),
    countdown: float = typer.Option(3.0, "--countdown", help="Seconds of countdown before each label (headless)."),
    bb: bool = typer.Option(False, "--bb", help="Also learn beneficial biases for the ROM tail."),
    mapper: str = typer.Option("both", "--mapper", help="Task anchor(s) to fit: gmmc, mahalanobis or both."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Packet byte budget, e.g. 64KB (default: lossless)."),
    k: int = typer.Option(25, "--k", help="GMMC components."),
    exemplars: int = typer.Option(5, "--exemplars", help="Mahalanobis exemplar features per class."),
    anchor_space: str = typer.Option(DEFAULT_TRANSFORM, "--anchor-space",
                                     help=f"Space the anchors live in: {', '.join(FEATURE_TRANSFORMS)}. A fleet "
                                          "must share one; sqrt_l2 (features alone) matches banks learned before "
                                          "trunk statistics."),
    seed: int = typer.Option(0, "--seed"),
    home: Optional[Path] = HomeOption,
    rom: Optional[Path] = RomOption,
    provider: Optional[List[str]] = ProviderOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Learn a task (head, optional BB, task anchor), store it in the bank and write a signed packet to the outbox."""
    from .codec import parse_size
    from .datasets import DatasetError
    from .device import LearnError
    from .keys import load_device_key
    from .packet import BudgetError, PacketCodec

    if (data is None) == (camera is None):
        console.print("[red]give exactly one of --data DIR or --camera SRC[/red]")
        raise typer.Exit(2)
    kinds = {"gmmc": ("gmmc",), "mahalanobis": ("maha",), "maha": ("maha",), "both": ("gmmc", "maha")}.get(mapper)
    if kinds is None:
        console.print(f"[red]--mapper must be gmmc, mahalanobis or both, not {mapper!r}[/red]")
        raise typer.Exit(2)
    if anchor_space not in FEATURE_TRANSFORMS:
        console.print(f"[red]--anchor-space must be one of {', '.join(FEATURE_TRANSFORMS)}, not {anchor_space!r}[/red]")
        raise typer.Exit(2)
    try:
        budget_bytes = parse_size(budget) if budget else None
    except ValueError as exc:
        console.print(f"[red]bad --budget:[/red] {exc}")
        raise typer.Exit(2) from None
    dev = open_device(home, rom, provider, need_key=True)
    if camera is not None:
        data = _capture(dev.home, task, camera, labels, frames, countdown)
    try:
        with _progress() as prog:
            bars: dict[str, int] = {}

            def on_progress(what: str, done: int, total: int) -> None:
                if what not in bars:
                    bars[what] = prog.add_task(what, total=max(total, 1))
                prog.update(bars[what], completed=done, total=max(total, 1))

            report = dev.learn(task, data, bb=bb, mappers=kinds, transform=anchor_space, k=k, m=exemplars, seed=seed,
                               progress=on_progress)
    except (DatasetError, LearnError) as exc:
        console.print(f"[red]cannot learn {task!r}:[/red] {exc}")
        raise typer.Exit(2) from None
    knowledge = report.knowledge
    try:
        packet = PacketCodec(budget_bytes).encode(knowledge, load_device_key(dev.home))
    except BudgetError as exc:
        console.print(f"[red]task learned and stored, but no packet fits the budget:[/red] {exc}")
        raise typer.Exit(3) from None
    outbox = dev.home / "outbox"
    outbox.mkdir(parents=True, exist_ok=True)
    pkt_path = outbox / f"{task}-{knowledge.meta.seq}.skp"
    tmp = pkt_path.with_suffix(".tmp")
    tmp.write_bytes(packet)
    os.replace(tmp, pkt_path)
    plan = PacketCodec().decode(packet).plan
    summary = {
        "task": task, "classes": report.classes, "train_images": report.n_train, "test_images": report.n_test,
        "skipped_images": len(report.skipped), "head_val_acc": round(report.head_val_acc, 4),
        "test_acc": None if report.test_acc != report.test_acc else round(report.test_acc, 4),
        "bb": knowledge.bb is not None, "bb_test_acc": report.bb_test_acc,
        "anchors": [a for a in ("gmmc", "maha") if getattr(knowledge, a) is not None],
        "packet": str(pkt_path), "packet_bytes": len(packet), "packet_plan": plan.step,
        "seconds": {k2: round(v, 2) for k2, v in report.seconds.items()},
    }
    if as_json:
        out.print_json(json.dumps(summary))
        return
    t = Table(title=f"learned {task!r}")
    t.add_column("")
    t.add_column("")
    for key, val in summary.items():
        t.add_row(key, str(val))
    out.print(t)
    for path, why in report.skipped[:10]:
        console.print(f"[yellow]skipped[/yellow] {why}")
    if len(report.skipped) > 10:
        console.print(f"[yellow]... and {len(report.skipped) - 10} more unreadable images[/yellow]")


def _capture(home: Path, task: str, camera: str, labels: Optional[str], frames: int, countdown: float) -> Path:
    from .camera import VideoSource, VideoSourceError, capture_labelled

    names = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if len(names) < 2:
        console.print("[red]--camera needs --labels with at least two labels, e.g. --labels cup,mug[/red]")
        raise typer.Exit(2)
    target = home / "captures" / task
    try:
        with VideoSource(camera) as src:
            rep = capture_labelled(src, names, target, frames_per_label=frames, countdown=countdown,
                                   say=lambda s: console.print(s))
    except (VideoSourceError, ValueError) as exc:
        console.print(f"[red]capture failed:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"captured {rep.counts} into {target} ({rep.mode})")
    return target


def _expand(inputs: List[Path]) -> List[Path]:
    from .datasets import IMAGE_SUFFIXES

    files: List[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def classify_command(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files or folders."),
    camera: Optional[str] = typer.Option(None, "--camera", "-c", help="Classify frames from a video source."),
    frames: int = typer.Option(30, "--frames", help="Frames to classify from --camera."),
    mapper: str = typer.Option("gmmc", "--mapper", help="Task mapper: gmmc or mahalanobis."),
    no_open_set: bool = typer.Option(False, "--no-open-set", help="Never answer unknown."),
    home: Optional[Path] = HomeOption,
    rom: Optional[Path] = RomOption,
    provider: Optional[List[str]] = ProviderOption,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input, as a list."),
) -> None:
    """Classify images of any learned or received task, with no task oracle."""
    from .device import MAPPER_ALIASES, LearnError

    if mapper not in MAPPER_ALIASES:
        console.print(f"[red]--mapper must be gmmc or mahalanobis, not {mapper!r}[/red]")
        raise typer.Exit(2)
    dev = open_device(home, rom, provider)
    if camera is not None:
        from .camera import VideoSource, VideoSourceError

        try:
            with VideoSource(camera) as src:
                items = list(src.frames(frames))
        except VideoSourceError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        names = [f"{camera}#{i}" for i in range(len(items))]
    else:
        files = _expand(list(images or []))
        if not files:
            console.print("[red]nothing to classify: give image files/folders or --camera[/red]")
            raise typer.Exit(2)
        items, names = files, [str(f) for f in files]
    try:
        preds = dev.classify(items, mapper=mapper, open_set=not no_open_set, names=names)
    except LearnError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    if as_json:
        out.print_json(json.dumps([p.to_dict() for p in preds]))
    else:
        t = Table(title=f"{len(preds)} inputs, mapper {mapper}")
        for c in ("input", "task", "class", "task conf", "class conf", "note"):
            t.add_column(c)
        for p in preds:
            note = p.error or ("unknown: fits no stored task" if p.unknown else "")
            t.add_row(p.source, p.task or "-", p.label or "-", f"{p.task_confidence:.3f}",
                      f"{p.class_confidence:.3f}", note)
        out.print(t)
    bad = sum(p.error is not None for p in preds)
    if bad:
        console.print(f"[yellow]{bad} input(s) could not be read[/yellow]")
