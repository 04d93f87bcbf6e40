"""`skill-edge demo` and `skill-edge fleet`: run a simulated fleet end to end and report it.

``demo`` with no arguments uses the embedded default: six devices, Fashion-MNIST split into
five 2-class tasks (Debian's ``dataset-fashion-mnist``) plus scikit-learn's digits.
``--data DIR`` runs every task folder in DIR instead (e.g. the 21-task skill-bench); ``--data``
given several times runs every root's tasks in one fleet, root by root in the order given (each
in its ``tasks.json`` order), and ``--features ROOT`` (repeatable) lets the devices learn from
features cached by ``benchmarks/extract_features.py`` instead of images.  ``--resume`` continues
an interrupted run in the same ``--out`` (finished devices are not run again, the others recover
from their banks); ``--report-only`` rebuilds the report from the saved fleet result.  The
steps are: export the ROM if it is absent, learn in parallel, make packets, sync them through
the directory transport (or MQTT), classify with no oracle, then print a table and write the
report and plots.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from skill_edge.tables import print_table

console = Console(emoji=False, soft_wrap=True)  # a long line stays whole in a log


def _task_dirs(data: list[Path]) -> dict[str, Path]:
    """Every task of every root, root by root, in a fixed order (``tasks.discover_tasks``)."""
    from .tasks import TaskRootError, discover_tasks

    try:
        return {t.name: t.path for t in discover_tasks(data)}
    except TaskRootError as exc:
        raise typer.BadParameter(str(exc)) from None


def _feature_tasks(tasks: dict[str, Path], features: list[Path], rom_dir: Path, out: Path) -> dict[str, Path]:
    """The same tasks as feature-task files made from cached features (``tasks.feature_task_files``)."""
    from skill_edge.export.manifest import RomManifest

    from .tasks import TaskRootError, feature_task_files

    try:
        return feature_task_files(features, list(tasks), RomManifest.read(rom_dir).fingerprint, out)
    except TaskRootError as exc:
        raise typer.BadParameter(str(exc)) from None


def run(tasks: dict[str, Path], out: Path, *, rom: Optional[Path], engine: str, transport: Optional[str],
        agents: Optional[int], budget: Optional[str], bb: bool, baselines: bool, equivalence: Optional[Path],
        builtin_equivalence: bool, kill: Optional[List[str]], title: str, threads: int, fresh: bool,
        cache: Optional[Path] = None, baseline_epochs: int = 5, converge_timeout: float = 300.0,
        features: Optional[List[Path]] = None, report_only: bool = False) -> dict:
    from skill_edge.models import default_rom_dir

    from .equivalence import EquivalenceMap
    from .fleet import FleetConfig
    from .report import build_report

    rom_dir = rom or default_rom_dir()
    if not (rom_dir / "manifest.json").exists():
        from skill_edge.export.rom import build_rom

        with console.status(f"exporting the ROM to {rom_dir}"):
            build_rom("efficientnet_lite0", rom_dir)
        console.print(f"exported ROM {rom_dir}")
    work = out / "work"
    if fresh and work.exists() and not report_only:
        shutil.rmtree(work)
    saved = out / "fleet_result.json"
    if report_only and not saved.exists():
        raise typer.BadParameter(f"--report-only needs a finished run in {out} (no fleet_result.json)")
    if features:
        tasks = _feature_tasks(tasks, features, rom_dir, work / "feature-tasks")
    kills = {}
    for spec in kill or []:
        dev, _, point = spec.partition(":")
        kills[dev] = point or "after_learn"
    cfg = FleetConfig(rom_dir=rom_dir, tasks={k: str(v) for k, v in tasks.items()}, workdir=work, agents=agents,
                      transport=transport, engine=engine, budget=budget, bb=bb, kill=kills, threads=threads,
                      cache_dir=cache, converge_timeout=converge_timeout,
                      resume=not fresh and (work / "devices").exists())
    t0 = time.perf_counter()
    if report_only:
        from .fleet import FleetResult

        result = FleetResult.load(saved)
    else:
        from .engines import FleetError
        from .fleet import FleetConfigError

        try:
            result = _run_with_progress(cfg)
        except FleetConfigError as exc:
            console.print(f"[red]cannot run the fleet:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from None
        except FleetError as exc:
            console.print(f"[red]the fleet failed:[/red] {escape(str(exc))}")
            console.print(f"every device's log is under {work / 'devices'}; --resume continues from where it stopped")
            raise typer.Exit(1) from None
        result.save(saved)
    t_fleet = time.perf_counter() - t0
    eq = None
    if equivalence is not None:
        eq = EquivalenceMap.load(equivalence)
    elif builtin_equivalence:
        eq = EquivalenceMap.skill_bench().restricted_to(list(tasks))
    with console.status("report: curves, baselines, plots") as status:
        rep = build_report(result, out, baselines=baselines, equivalence=eq, title=title, baseline_epochs=baseline_epochs,
                           progress=lambda s: status.update(f"report: {s}"))
    rep.summary["seconds"] = {"fleet": t_fleet, "total": time.perf_counter() - t0}
    _print_summary(result, rep.summary, out)
    return rep.summary


def _run_with_progress(cfg):
    from .fleet import run_fleet

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        bars: dict[str, int] = {}

        def on_progress(stage: str, device: str, done: int, total: int) -> None:
            key = f"{device:>9s} {stage}"
            if key not in bars:
                bars[key] = prog.add_task(key, total=max(total, 1))
            prog.update(bars[key], completed=done, total=max(total, 1))

        return run_fleet(cfg, progress=on_progress)


def _print_summary(result, s: dict, out: Path) -> None:
    columns = ["task", "oracle"] + [f"{mp} {what}" for mp in result.mappers for what in ("task-ID", "no-oracle")]
    ref = result.reference_device
    rows = []
    for task in result.tasks:
        row = [task, f"{result.per_task_oracle_accuracy[ref].get(task, float('nan')):.3f}"]
        for mp in result.mappers:
            row += [f"{result.per_task_task_id_accuracy[ref].get(mp, {}).get(task, float('nan')):.3f}",
                    f"{result.per_task_accuracy[ref].get(mp, {}).get(task, float('nan')):.3f}"]
        rows.append(row)
    row = ["mean", f"{s['mean_oracle_acc']:.3f}"]
    for mp in result.mappers:
        row += [f"{s['mean_task_id_acc'].get(mp, float('nan')):.3f}", f"{s['mean_no_oracle_acc'].get(mp, float('nan')):.3f}"]
    rows.append(row)
    print_table(console, f"{s['agents']} devices, {s['tasks']} tasks, no task oracle", columns, rows, right=columns[1:])
    console.print(f"banks converged: {s['converged']}, devices agree: {s['devices_agree']}, "
                  f"speedup (MACs): {', '.join(f'{k} {v:.3f}N' for k, v in s['speedup_xN_by_mapper'].items())}, "
                  f"wall-clock speedup: {s['wallclock_speedup']:.2f}x, "
                  f"packet bytes/task: {s['comm_bytes_per_task']:,.0f}")
    if s.get("equivalence"):
        for mp, d in s["equivalence"].items():
            console.print(f"{mp}: strict {d['strict']:.4f}, equivalence-aware {d['equivalence_aware']:.4f}")
    if s.get("baselines_final_mean_acc"):
        console.print("baselines (final mean acc): " + ", ".join(f"{k} {v:.3f}"
                                                                 for k, v in s["baselines_final_mean_acc"].items()))
    console.print(f"report: {out / 'report.md'}  fleet.json: {out / 'fleet.json'}  plots: {out}/*.png")
    for p in s.get("problems", []):
        console.print(f"[yellow]problem:[/yellow] {p}")


def demo_command(
    data: Optional[List[Path]] = typer.Option(
        None, "--data", help="Folder of task folders (e.g. ../shared/data/skill-bench); repeat it to run several "
                             "roots as one fleet, in the order given. Default: embedded Fashion-MNIST x5 + digits."),
    features: Optional[List[Path]] = typer.Option(
        None, "--features", help="Cached features <root>/<task>/{train,test}.npz (benchmarks/extract_features.py); "
                                 "repeatable. The devices learn from them instead of the images."),
    report_only: bool = typer.Option(False, "--report-only", help="Rebuild the report of the run in --out."),
    out: Path = typer.Option(Path("demo-out"), "--out", help="Where the report, plots and fleet.json go."),
    rom: Optional[Path] = typer.Option(None, "--rom", help="ROM directory (exported if absent)."),
    engine: str = typer.Option("process", "--engine", help="process (default) or ray."),
    transport: Optional[str] = typer.Option(None, "--transport", help="dir:PATH (default) or mqtt://host:port."),
    agents: Optional[int] = typer.Option(None, "--agents", min=1, help="Devices (default: one per task)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="Packet byte budget, e.g. 56KB."),
    bb: bool = typer.Option(False, "--bb", help="Learn beneficial biases too."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Run EWC/ER/DER++ on the same features."),
    equivalence: Optional[Path] = typer.Option(None, "--equivalence", help="Label equivalence map (CSV or JSON)."),
    kill: Optional[List[str]] = typer.Option(None, "--kill", help="DEVICE[:POINT], e.g. agent-2:after_learn."),
    threads: int = typer.Option(1, "--threads", help="Threads per device."),
    train_per_class: int = typer.Option(300, "--train-per-class", help="Embedded data: training images per class."),
    test_per_class: int = typer.Option(100, "--test-per-class", help="Embedded data: test images per class."),
    fresh: bool = typer.Option(True, "--fresh/--resume", help="Start from empty device homes (default) or resume."),
    cache: Optional[Path] = typer.Option(None, "--cache", envvar="SKILL_EDGE_CACHE",
                                         help="Feature cache shared by the devices (keyed by ROM fingerprint)."),
    baseline_epochs: int = typer.Option(5, "--baseline-epochs", help="Epochs per task for the baselines."),
    converge_timeout: float = typer.Option(300.0, "--converge-timeout",
                                           help="Seconds each device waits for the others' packets after learning "
                                                "(many devices sharing few cores check packets slowly)."),
) -> None:
    """Run a whole simulated fleet: export, learn in parallel, share packets, classify with no oracle, report."""
    from .demo_data import DemoDataError, build_demo_tasks

    if not data:
        try:
            with console.status("writing the embedded demo tasks (Fashion-MNIST x5 + digits)"):
                dirs = build_demo_tasks(out / "data", train_per_class=train_per_class, test_per_class=test_per_class)
        except DemoDataError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(2) from None
        tasks = {d.name: d for d in dirs}
        title, builtin_eq = "skill-edge demo: Fashion-MNIST x5 + digits", False
    else:
        tasks = _task_dirs(data)
        title = f"skill-edge fleet on {' + '.join(d.name for d in data)} ({len(tasks)} tasks)"
        builtin_eq = any(d.name == "skill-bench" for d in data)
    run(tasks, out, rom=rom, engine=engine, transport=transport, agents=agents, budget=budget, bb=bb,
        baselines=baselines, equivalence=equivalence, builtin_equivalence=builtin_eq, kill=kill, title=title,
        threads=threads, fresh=fresh, cache=cache, baseline_epochs=baseline_epochs,
        converge_timeout=converge_timeout, features=features, report_only=report_only)


def fleet_command(
    task_dirs: List[Path] = typer.Argument(..., help="Task folders (each <task>/{train,test}/<class>/*)."),
    out: Path = typer.Option(Path("fleet-out"), "--out"),
    rom: Optional[Path] = typer.Option(None, "--rom"),
    engine: str = typer.Option("process", "--engine"),
    transport: Optional[str] = typer.Option(None, "--transport"),
    agents: Optional[int] = typer.Option(None, "--agents", min=1, help="Devices (default: one per task)."),
    budget: Optional[str] = typer.Option(None, "--budget"),
    bb: bool = typer.Option(False, "--bb"),
    baselines: bool = typer.Option(False, "--baselines/--no-baselines"),
    equivalence: Optional[Path] = typer.Option(None, "--equivalence"),
    threads: int = typer.Option(1, "--threads"),
) -> None:
    """Run a fleet over explicit task folders (one device per task unless --agents)."""
    tasks = {p.name: p for p in task_dirs}
    run(tasks, out, rom=rom, engine=engine, transport=transport, agents=agents, budget=budget, bb=bb,
        baselines=baselines, equivalence=equivalence, builtin_equivalence=False, kill=None,
        title=f"skill-edge fleet ({len(tasks)} tasks)", threads=threads, fresh=True)
