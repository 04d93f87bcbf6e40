"""`skill-edge learn` and `skill-edge classify`: the device's two everyday verbs.

Both are thin callers of ``runtime.device.Device``.  A device's state lives in one home
directory (``--home``, env ``SKILL_EDGE_HOME``, default ``~/.skill-edge``): ``bank/``,
``keys/``, ``trust/``, ``outbox/``, ``captures/`` and ``cache/``.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from skill_edge.runtime.cli.output import StageProgress, console, out, print_json, print_record, print_table, say_error
from skill_edge.runtime.knowledge.records import DEFAULT_TRANSFORM, FEATURE_TRANSFORMS

#: Exit codes of the device verbs (``--help`` and README.md list them too).
EXIT_OK = 0
EXIT_INPUT_FAILED = 1  # classify/eval: some inputs missing or unreadable; learn: a file could not be written
EXIT_USAGE = 2  # a bad option or argument, no ROM, a task that cannot be learned, an empty bank
EXIT_NO_PACKET = 3  # learn: no packet fits --budget, so nothing is stored

#: Images classified per call, so that a long run shows progress (the mapper is built once).
CLASSIFY_CHUNK = 64

HomeOption = typer.Option(None, "--home", envvar="SKILL_EDGE_HOME",
                          help="Device home (bank, keys, outbox); default ~/.skill-edge.")
RomOption = typer.Option(None, "--rom", envvar="SKILL_EDGE_ROM",
                         help="ROM directory (default: models/rom/efficientnet_lite0).")
ProviderOption = typer.Option(None, "--provider",
                              help="Backend order override (repeatable): tensorrt, cuda, cpu, or ONNX Runtime's "
                                   "names TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider. "
                                   "The backend that runs is printed to stderr ('backend: ...').")
MapperOption = typer.Option("auto", "--mapper", help="Task mapper: auto (Mahalanobis when every stored task "
                            "carries its anchor, else GMMC), gmmc or mahalanobis.")
NoOpenSetOption = typer.Option(False, "--no-open-set", help="Never answer unknown.")
CameraHelp = ("Video source: 0 (= V4L2 /dev/video0; a CSI camera is csi://0, unlike jetson-inference where 0 "
              "means CSI), v4l2:///dev/video0, csi://0, file://clip.mp4, rtsp://...")


def resolve_home(home: Optional[Path]) -> Path:
    return Path(home) if home else Path(os.environ.get("SKILL_EDGE_HOME") or Path.home() / ".skill-edge")


def resolve_rom(rom: Optional[Path]) -> Path:
    from skill_edge.models import default_rom_dir

    path = Path(rom) if rom else default_rom_dir()
    if not (path / "manifest.json").exists():
        say_error(f"no ROM at {path}:", "build it with `skill-edge export --backbone efficientnet_lite0"
                  f"{' --out ' + str(path) if rom else ''}`")
        raise typer.Exit(2)
    return path


def check_providers(provider: Optional[List[str]]) -> Optional[List[str]]:
    """``--provider`` values as the engine's short names; an unknown name is a usage error (exit 2)."""
    from skill_edge.runtime.rom.engine import ProviderError, normalize_providers

    if not provider:
        return None
    try:
        return normalize_providers(provider)
    except ProviderError as exc:
        say_error("bad --provider:", exc)
        raise typer.Exit(EXIT_USAGE) from None


def check_mapper(mapper: str) -> None:
    """``--mapper`` of classify and eval: auto, gmmc, maha or mahalanobis, else a usage error (exit 2)."""
    from skill_edge.runtime.device import MAPPER_ALIASES

    if mapper != "auto" and mapper not in MAPPER_ALIASES:
        say_error(f"--mapper must be auto, gmmc or mahalanobis, not {mapper!r}")
        raise typer.Exit(EXIT_USAGE)


def open_device(home: Optional[Path], rom: Optional[Path], provider: Optional[List[str]], *, need_key: bool = False):
    """The device, with its backend named on stderr; ROM, backend and key problems exit with one line."""
    from skill_edge.export.manifest import RomError

    from skill_edge.runtime.device import Device
    from skill_edge.runtime.exchange.keys import KeyStoreError, TrustStore, init_device_key, load_device_key

    providers = check_providers(provider)
    h = resolve_home(home)
    if need_key:
        try:
            load_device_key(h)
        except KeyStoreError:
            try:
                key = init_device_key(h)
                TrustStore.at_home(h).add("self", key.public_key, overwrite=True)  # as `keys init` does
            except (KeyStoreError, OSError) as exc:
                say_error(f"cannot create the device key in {h / 'keys'}:", _os_reason(exc))
                raise typer.Exit(EXIT_INPUT_FAILED) from None
            console.print(f"created device key {key.key_id} in {h / 'keys'} (share keys/device.pub with the fleet)",
                          markup=False, highlight=False)
    from skill_edge.runtime.knowledge.bank import BankError

    try:
        dev = Device(h, resolve_rom(rom), providers=providers)
    except RomError as exc:
        say_error("ROM problem:", exc)
        raise typer.Exit(EXIT_USAGE) from None
    except BankError as exc:  # e.g. a full disk while the bank repairs its index on opening
        say_error("cannot open the bank:", exc)
        raise typer.Exit(EXIT_INPUT_FAILED) from None
    console.print(f"backend: {dev.engine.backend}", highlight=False)
    return dev


def _os_reason(exc: BaseException) -> str:
    """An OSError as one line ("No space left on device: /path"), anything else as its message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def write_outbox(outbox: Path, name: str, packet: bytes) -> Path:
    """Write ``packet`` as ``outbox/name`` atomically; on failure no ``.tmp`` is left and OSError is raised."""
    outbox.mkdir(parents=True, exist_ok=True)
    path = outbox / name
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_bytes(packet)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def learn_command(
    task: str = typer.Option(..., "--task", "-t", help="Task name (unique in the fleet)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="ImageFolder: DIR/{train,val,test}/<class>/*."),
    camera: Optional[str] = typer.Option(None, "--camera", "-c", help=CameraHelp),
    labels: Optional[str] = typer.Option(None, "--labels", help="Comma-separated labels to capture (with --camera)."),
    frames: int = typer.Option(100, "--frames", min=1, help="Frames to capture per label (with --camera)."),
    countdown: float = typer.Option(3.0, "--countdown", min=0.0,
                                    help="Seconds of countdown before each label (headless capture from a camera; "
                                         "file:// sources start at once)."),
    headless: bool = typer.Option(False, "--headless",
                                  help="Capture without a preview window (timed bursts per label). Automatic when "
                                       "there is no display or OpenCV has no GUI (opencv-python-headless)."),
    append: bool = typer.Option(False, "--append", help="Add the new frames to an earlier capture of this task "
                                                        "(with --camera), and relearn it."),
    replace: bool = typer.Option(False, "--replace", help="Relearn a task this device learned before (the new "
                                                          "version replaces it at every peer); with --camera, "
                                                          "delete its earlier capture first."),
    bb: bool = typer.Option(False, "--bb", help="Also learn beneficial biases (kept only if they beat the plain "
                                                "head on validation)."),
    bb_split: str = typer.Option("auto", "--bb-split",
                                 help="Where BB starts: auto (tries the tail and stage 5, keeps the best on "
                                      "validation), tail, full (the whole network) or a stage index."),
    mapper: str = typer.Option("both", "--mapper", help="Task anchor(s) to fit: gmmc, mahalanobis or both."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Packet byte budget, e.g. 64KB (default: lossless)."),
    k: int = typer.Option(25, "--k", min=1, help="GMMC components."),
    exemplars: int = typer.Option(5, "--exemplars", min=1, help="Mahalanobis exemplar features per class."),
    anchor_space: str = typer.Option(DEFAULT_TRANSFORM, "--anchor-space",
                                     help=f"Space the anchors live in: {', '.join(FEATURE_TRANSFORMS)}. A fleet "
                                          "must share one; sqrt_l2 (features alone) matches banks learned before "
                                          "trunk statistics."),
    seed: int = typer.Option(0, "--seed", min=0,
                             help="Seed of the hold-out split (a folder without test/), the head and the anchors."),
    home: Optional[Path] = HomeOption,
    rom: Optional[Path] = RomOption,
    provider: Optional[List[str]] = ProviderOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Learn a task (head, optional BB, task anchor), store it in the bank and write a signed packet to the outbox.

    Exit codes:
    0 learned, stored, and its packet written to the outbox;
    1 a file could not be written (disk full, permissions), and nothing half-written is left;
    2 a bad option, no ROM, data that a task cannot be learned from, or a task this device already
      learned, without --replace;
    3 no packet fits --budget, so nothing is stored.
    """
    from skill_edge.runtime.knowledge.bank import BankError
    from skill_edge.runtime.exchange.codec import parse_size
    from skill_edge.runtime.sources.datasets import DatasetError
    from skill_edge.runtime.device import LearnError
    from skill_edge.runtime.exchange.keys import load_device_key
    from skill_edge.runtime.exchange.packet import BudgetError, PacketCodec

    if (data is None) == (camera is None):
        console.print("[red]give exactly one of --data DIR or --camera SRC[/red]")
        raise typer.Exit(EXIT_USAGE)
    if append and replace:
        console.print("[red]give at most one of --append and --replace[/red]")
        raise typer.Exit(EXIT_USAGE)
    if append and camera is None:
        say_error("--append adds frames to a camera capture; a --data folder is the whole task "
                  "(relearn it with --replace)")
        raise typer.Exit(EXIT_USAGE)
    if bb_split != "auto" and not bb:
        say_error(f"--bb-split {bb_split} chooses where beneficial biases start; it needs --bb")
        raise typer.Exit(EXIT_USAGE)
    kinds = {"gmmc": ("gmmc",), "mahalanobis": ("maha",), "maha": ("maha",), "both": ("gmmc", "maha")}.get(mapper)
    if kinds is None:
        say_error(f"--mapper must be gmmc, mahalanobis or both, not {mapper!r}")
        raise typer.Exit(EXIT_USAGE)
    if anchor_space not in FEATURE_TRANSFORMS:
        say_error(f"--anchor-space must be one of {', '.join(FEATURE_TRANSFORMS)}, not {anchor_space!r}")
        raise typer.Exit(EXIT_USAGE)
    try:
        budget_bytes = parse_size(budget) if budget else None
    except ValueError as exc:
        say_error("bad --budget:", exc)
        raise typer.Exit(EXIT_USAGE) from None
    from skill_edge.runtime.knowledge.records import KnowledgeError, validate_name

    try:  # before anything is written: the name becomes a folder (captures/<task>) and a file name
        validate_name(task)
        for label in (labels or "").split(",") if camera is not None else ():
            if label.strip():
                validate_name(label.strip(), "label")
    except KnowledgeError as exc:
        say_error("cannot learn:", exc)
        raise typer.Exit(EXIT_USAGE) from None
    dev = open_device(home, rom, provider, need_key=True)
    replaced = _confirm_relearn(dev, task, replace=replace, append=append, camera=camera is not None)
    if camera is not None:
        data = _capture(dev.home, task, camera, labels, frames, countdown, headless=headless,
                        previous="append" if append else "replace" if replace else None)
    try:
        with StageProgress("learn") as prog:
            report = dev.learn(task, data, bb=bb, bb_split=bb_split, mappers=kinds, transform=anchor_space, k=k,
                               m=exemplars, seed=seed, progress=prog.update, key=load_device_key(dev.home),
                               budget=budget_bytes)
    except (DatasetError, LearnError) as exc:
        console.print(f"[red]cannot learn {task!r}:[/red] {escape(str(exc))}")
        raise typer.Exit(EXIT_USAGE) from None
    except BudgetError as exc:
        console.print(f"[red]cannot learn {task!r}: no packet fits the budget, so nothing was stored:[/red] {exc}")
        raise typer.Exit(EXIT_NO_PACKET) from None
    except (BankError, OSError) as exc:
        say_error(f"cannot store {task!r}:", _os_reason(exc))
        raise typer.Exit(EXIT_INPUT_FAILED) from None
    knowledge, packet = report.knowledge, report.packet  # stored together in the bank
    try:
        pkt_path = write_outbox(dev.home / "outbox", f"{task}-{knowledge.meta.seq}.skp", packet)
    except OSError as exc:
        console.print(f"[red]stored with its packet (sync publishes it), but the outbox copy failed:[/red] "
                      f"{_os_reason(exc)}")
        raise typer.Exit(EXIT_INPUT_FAILED) from None
    plan = PacketCodec().decode(packet).plan
    summary = {
        "task": task, "classes": report.classes, "train_images": report.n_train, "test_images": report.n_test,
        "skipped_images": len(report.skipped), "head_val_acc": round(report.head_val_acc, 4),
        "test_acc": None if report.test_acc != report.test_acc else round(report.test_acc, 4),
        "bb": knowledge.bb is not None, "bb_test_acc": report.bb_test_acc,
        **({"bb_val_acc": round(float(report.bb_val_acc), 4),
            "bb_val_acc_without": round(float(knowledge.meta.metrics.get("bb_val_acc_without", float("nan"))), 4),
            "bb_split": int(knowledge.meta.bb_split) if knowledge.bb is not None else None,
            "bb_biases": int(knowledge.bb.size) if knowledge.bb is not None else 0} if bb else {}),
        "anchors": [a for a in ("gmmc", "maha") if getattr(knowledge, a) is not None],
        "open_set_calibration_images": report.open_set_calibration_images,
        "replaced_seq": None if replaced is None else int(replaced.seq),
        "packet": str(pkt_path), "packet_bytes": len(packet), "packet_plan": plan.step,
        "backend": dev.engine.backend,
        "seconds": {k2: round(v, 2) for k2, v in report.seconds.items()},
    }
    if as_json:
        print_json(summary)
        return
    print_record(f"learned {task!r}", summary)
    if bb:
        without = knowledge.meta.metrics.get("bb_val_acc_without", float("nan"))
        if knowledge.bb is not None:
            console.print(f"BB kept: validation accuracy {report.bb_val_acc:.4f} with biases, {without:.4f} without "
                          f"({knowledge.bb.size} biases from stage {knowledge.meta.bb_split})")
        else:
            console.print(f"BB not kept: validation accuracy {report.bb_val_acc:.4f} with biases did not beat "
                          f"{without:.4f} without; the plain head ships")
    if report.open_set_calibration_thin:
        console.print(f"[yellow]the open-set threshold rests on {report.open_set_calibration_images} held-out "
                      f"images: expect 'unknown' to be noisy for this task until it is learned from more "
                      f"images[/yellow]")
    for path, why in report.skipped[:10]:
        say_error("skipped", why, style="yellow")
    if len(report.skipped) > 10:
        console.print(f"[yellow]... and {len(report.skipped) - 10} more unreadable images[/yellow]")


def _confirm_relearn(dev, task: str, *, replace: bool, append: bool, camera: bool):
    """The entry a relearn of ``task`` will replace, None if this device never learned it.

    A device's own work is never replaced by accident: relearning a task it holds needs
    ``--replace`` (or ``--append`` to a camera capture), or a "yes" on a terminal.  A camera
    capture that already holds frames asks its own append-or-replace question, which answers
    this one too.  Otherwise exits with EXIT_USAGE before anything is captured or written."""
    from datetime import datetime

    old = dev.own_entry(task)
    if old is None or replace or append:
        return old
    if camera:
        from skill_edge.runtime.sources.camera import captured_frames

        if captured_frames(dev.home / "captures" / task):
            return old  # the capture's own prompt (or its refusal) decides
    when = datetime.fromtimestamp(old.created).strftime("%Y-%m-%d %H:%M")
    what = (f"this device already learned {task!r} (seq {old.seq}, {old.classes} classes, {when}, "
            f"{old.source}); relearning replaces it at every peer, and the old version is not kept")
    if _stdin_is_terminal():
        answer = typer.prompt(f"{what}. [r]eplace or [q]uit", default="q", err=True).strip().lower()[:1]
        if answer == "r":
            return old
        raise typer.Exit(EXIT_USAGE)
    say_error(f"{what}: pass --replace to relearn it, or pick another --task name")
    raise typer.Exit(EXIT_USAGE)


def _capture(home: Path, task: str, camera: str, labels: Optional[str], frames: int, countdown: float, *,
             headless: bool, previous: Optional[str]) -> Path:
    """Capture labelled frames into ``captures/<task>``; an earlier capture is kept only on ``--append``."""
    from skill_edge.runtime.sources.camera import (CaptureExistsError, VideoSource, VideoSourceError, capture_labelled, gui_available,
                         prepare_capture_dir)

    names = [x.strip() for x in (labels or "").split(",") if x.strip()]
    if len(names) < 2:
        console.print("[red]--camera needs --labels with at least two labels, e.g. --labels cup,mug[/red]")
        raise typer.Exit(EXIT_USAGE)
    target = home / "captures" / task
    if previous is None and _stdin_is_terminal():
        old = prepare_capture_dir(target, "check")
        if old:
            answer = typer.prompt(f"{target} already holds {old} captured frames: [a]ppend, [r]eplace or [q]uit",
                                  default="q", err=True).strip().lower()[:1]
            previous = {"a": "append", "r": "replace"}.get(answer)
            if previous is None:
                raise typer.Exit(EXIT_USAGE)
    interactive = False if headless else None
    if interactive is None and not gui_available():
        interactive = False
        if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
            console.print("OpenCV has no GUI support here (opencv-python-headless): capturing headless")
    try:
        prepare_capture_dir(target, previous or "refuse")
        with VideoSource(camera) as src:
            rep = capture_labelled(src, names, target, frames_per_label=frames, countdown=countdown,
                                   interactive=interactive,
                                   say=lambda s: console.print(s, markup=False, highlight=False))
    except CaptureExistsError as exc:
        say_error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    except (VideoSourceError, ValueError) as exc:
        say_error("capture failed:", exc)
        raise typer.Exit(EXIT_USAGE) from None
    except OSError as exc:
        say_error("capture failed:", _os_reason(exc))
        raise typer.Exit(EXIT_INPUT_FAILED) from None
    console.print(f"captured {rep.counts} into {target} ({rep.mode})", markup=False, highlight=False)
    return target


def _stdin_is_terminal() -> bool:
    import sys

    try:
        return sys.stdin.isatty()
    except (AttributeError, ValueError):
        return False


def _expand(inputs: List[Path]) -> tuple[List[Path], List[tuple[str, str]]]:
    """Image files under ``inputs`` (folders recursively), and (input, why) for inputs that give none."""
    from skill_edge.runtime.sources.datasets import IMAGE_SUFFIXES

    files: List[Path] = []
    missing: List[tuple[str, str]] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                missing.append((str(p), f"folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})"))
            files += found
        elif p.exists():
            files.append(p)
        else:
            missing.append((str(p), "no such file or directory"))
    return files, missing


def classify_items(dev, items: list, names: List[str], *, mapper: str, open_set: bool, verb: str = "classify"):
    """``Device.classify`` in chunks of ``CLASSIFY_CHUNK``, with a progress bar (or log lines) on stderr."""
    preds = []
    with StageProgress(verb) as prog:
        for i in range(0, len(items), CLASSIFY_CHUNK):
            prog.update("images", i, len(items))
            preds += dev.classify(items[i:i + CLASSIFY_CHUNK], mapper=mapper, open_set=open_set,
                                  names=names[i:i + CLASSIFY_CHUNK])
        prog.update("images", len(items), len(items))
    return preds


def _task_shown(p) -> str:
    """A prediction's task as listings show it: ``task@agent`` when several stored tasks share the name."""
    return getattr(p, "task_label", None) or p.task or "-"


def classify_summary(preds) -> str:
    """``48 inputs: shapes 20, digits-low 24, unknown 2, unreadable 2``: what a run found, in one line."""
    tasks = Counter(_task_shown(p) for p in preds if p.error is None and not p.unknown)
    parts = [f"{t} {n}" for t, n in sorted(tasks.items())]
    parts += [f"unknown {sum(p.unknown and p.error is None for p in preds)}",
              f"unreadable {sum(p.error is not None for p in preds)}"]
    return f"{len(preds)} inputs: " + ", ".join(parts)


def classify_command(
    images: Optional[List[Path]] = typer.Argument(None, help="Image files or folders."),
    camera: Optional[str] = typer.Option(None, "--camera", "-c", help="Classify frames from a video source. "
                                         + CameraHelp.split(": ", 1)[1]),
    frames: int = typer.Option(30, "--frames", min=1, help="Frames to classify from --camera."),
    mapper: str = MapperOption,
    no_open_set: bool = NoOpenSetOption,
    home: Optional[Path] = HomeOption,
    rom: Optional[Path] = RomOption,
    provider: Optional[List[str]] = ProviderOption,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per input, as a list."),
) -> None:
    """Classify images of any learned or received task, with no task oracle.

    Exit codes:
    0 every input classified ("unknown" is an answer);
    1 some inputs missing or unreadable (the others are still classified and printed);
    2 a bad option, no ROM, nothing to classify, or no task in the bank.
    """
    from skill_edge.runtime.device import LearnError, Prediction

    check_mapper(mapper)
    if camera is None and not images:
        console.print("[red]nothing to classify: give image files/folders or --camera[/red]")
        raise typer.Exit(EXIT_USAGE)
    dev = open_device(home, rom, provider)
    missing: List[tuple[str, str]] = []
    if camera is not None:
        from skill_edge.runtime.sources.camera import VideoSource, VideoSourceError

        try:
            with VideoSource(camera) as src:
                items = list(src.frames(frames))
        except VideoSourceError as exc:
            say_error(str(exc))
            raise typer.Exit(EXIT_USAGE) from None
        names = [f"{camera}#{i}" for i in range(len(items))]
    else:
        files, missing = _expand(list(images or []))
        items, names = files, [str(f) for f in files]
    try:
        preds = classify_items(dev, items, names, mapper=mapper, open_set=not no_open_set) if items else []
    except LearnError as exc:
        say_error(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    preds += [Prediction(name, None, None, 0.0, 0.0, error=why) for name, why in missing]
    if as_json:
        print_json([p.to_dict() for p in preds])
    else:
        rows = [[p.source, _task_shown(p), p.label or "-", f"{p.task_confidence:.3f}", f"{p.class_confidence:.3f}",
                 p.error or (f"unknown: fits no stored task (nearest {p.nearest_task} / {p.nearest_label})"
                             if p.unknown else "")] for p in preds]
        from skill_edge.runtime.device import MAPPER_NAMES

        shown = MAPPER_NAMES[dev.resolve_mapper(mapper)] if preds else mapper
        print_table(f"{len(preds)} inputs, mapper {shown}", ("input", "task", "class", "task conf", "class conf",
                                                               "note"), rows, shorten=0)
    summary = classify_summary(preds)
    (console if as_json else out).print(summary, markup=False, highlight=False, soft_wrap=True)
    bad = sum(p.error is not None for p in preds)
    if bad:
        console.print(f"[yellow]{bad} input(s) missing or unreadable[/yellow]")
        raise typer.Exit(EXIT_INPUT_FAILED)
