"""``skill-edge bank ls|show|rm|verify``: look into and tidy the device's knowledge bank.

Tasks are named as users know them: ``TASK`` when one agent taught that name, ``TASK@AGENT`` (an
agent id prefix is enough) when several did; listings show the origin agent of every task.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from skill_edge.runtime.cli.output import iso_time, print_json, print_record, print_table
from skill_edge.runtime.knowledge.bank import BankEntry, BankError, KnowledgeBank, VerifyReport
from skill_edge.runtime.knowledge.identity import display_names, short_agent

app = typer.Typer(help="Inspect and manage the on-device knowledge bank.", no_args_is_help=True)
console = Console(emoji=False)  # results
err = Console(stderr=True, soft_wrap=True, emoji=False)  # errors: stdout stays clean for --json
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]

BankOption = Annotated[
    Optional[Path],
    typer.Option("--bank", help="Bank directory [default: HOME/bank]"),
]
HomeOption = Annotated[
    Optional[Path],
    typer.Option("--home", envvar="SKILL_EDGE_HOME",
                 help="Device home (bank, keys, outbox); default ~/.skill-edge. --bank overrides its bank/."),
]
TaskArgument = Annotated[str, typer.Argument(help="Task name, or TASK@AGENT (agent id prefix) when several "
                                                  "agents taught that name")]


def default_bank_dir(home: Path | None = None) -> Path:
    """``HOME/bank``: ``--home``, else ``$SKILL_EDGE_HOME``, else ``~/.skill-edge``."""
    home = home or (Path(os.environ["SKILL_EDGE_HOME"]) if os.environ.get("SKILL_EDGE_HOME") else None)
    return (home or Path.home() / ".skill-edge") / "bank"


def _open(bank: Path | None, home: Path | None = None) -> KnowledgeBank:
    root = bank or default_bank_dir(home)
    if not (root / "index.json").exists() and not (root / "index.prev.json").exists():
        err.print(f"[yellow]no bank at {escape(str(root))}[/]")
        raise typer.Exit(1)
    try:
        return KnowledgeBank(root)
    except BankError as exc:
        _fail(exc)


def _fail(exc: BankError) -> NoReturn:
    err.print(f"[red]{escape(str(exc))}[/]")
    raise typer.Exit(1) from exc


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def _origin(e: BankEntry) -> str:
    """Who taught it: ``own`` for this device's tasks, else ``received``; with or without its packet."""
    return f"{'own' if e.own else 'received'}{'' if e.has_packet else ', no packet'}"


def _entry_json(e: BankEntry, label: str) -> dict:
    return {"task": e.task, "name": label, "agent": e.agent, "own": e.own, "has_packet": e.has_packet,
            "classes": e.classes, "anchors": list(e.anchors), "bb": e.has_bb, "seq": e.seq, "source": e.source,
            "created": iso_time(e.created), "stored": iso_time(e.stored), "bytes": e.bytes,
            "content_hash": e.content_hash, "record": e.record}


@app.command("ls")
def list_tasks(bank: BankOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """List stored tasks with their origin agent (and quarantined items)."""
    root = bank or default_bank_dir(home)
    if not (root / "index.json").exists() and not (root / "index.prev.json").exists():
        if as_json:
            print_json({"bank": str(root), "exists": False, "tasks": [], "quarantined": [], "used_bytes": 0,
                        "quota_bytes": None})
        else:
            console.print(f"no bank at {root} (it is created by the first stored task)")
        return
    kb = _open(root)
    if as_json:
        entries = kb.entries()
        print_json({"bank": str(root), "exists": True,
                    "tasks": [_entry_json(e, label) for e, label in
                              zip(entries, display_names([e.key for e in entries]))],
                    "quarantined": [{"id": q.id, "task": q.task, "reason": q.reason,
                                     "quarantined_at": iso_time(q.quarantined_at), "bytes": q.bytes}
                                    for q in kb.quarantined()],
                    "used_bytes": kb.used_bytes(), "quota_bytes": kb.quota_bytes or None})
        return
    entries = kb.entries()
    print_table(f"Knowledge bank {root}",
                ["task", "agent", "origin", "classes", "anchors", "BB", "seq", "source", "created", "bytes"],
                [[label, short_agent(e.agent), _origin(e), str(e.classes), " ".join(e.anchors) or "-",
                  "yes" if e.has_bb else "-", str(e.seq), e.source, _when(e.created), f"{e.bytes:,}"]
                 for e, label in zip(entries, display_names([e.key for e in entries]))],
                right=("classes", "seq", "bytes"))
    quarantined = kb.quarantined()
    if quarantined:
        print_table("Quarantined (never activated)", ["id", "task", "reason", "when", "bytes"],
                    [[q.id[:12], q.task or "?", q.reason, _when(q.quarantined_at), f"{q.bytes:,}"] for q in quarantined],
                    right=("bytes",))
    quota = f" of {kb.quota_bytes:,}" if kb.quota_bytes else ""
    console.print(f"{len(kb.entries())} task(s), {kb.used_bytes():,}{quota} bytes used")


@app.command()
def show(task: TaskArgument, bank: BankOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Print one task: origin, labels, tensor shapes, metadata, metrics, source."""
    kb = _open(bank, home)
    try:
        entry = kb.resolve(task)
        knowledge = kb.get(entry.key)
    except BankError as exc:
        _fail(exc)
    m = knowledge.meta
    if as_json:
        entries = kb.entries()
        name = dict(zip([e.key for e in entries], display_names([e.key for e in entries])))[entry.key]
        print_json({**_entry_json(entry, name), "labels": list(knowledge.labels),
                    "feature_dim": knowledge.feature_dim, "n_train": m.n_train,
                    "feature_transform": m.feature_transform, "rom_fingerprint": m.rom_fingerprint or None,
                    "bb_layout_hash": m.bb_layout_hash or None, "thresholds": dict(knowledge.thresholds),
                    "metrics": dict(m.metrics),
                    "tensors": {name: {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": int(arr.nbytes)}
                                for name, arr in knowledge.tensors().items()}})
        return
    console.print(f"[bold]{escape(entry.key.short)}[/]  {knowledge.num_classes} classes, feature dim "
                  f"{knowledge.feature_dim}, {_origin(entry)}")
    console.print(f"labels: {', '.join(knowledge.labels)}")
    print_table("tensors", ["name", "shape", "bytes"],
                [[name, str(tuple(arr.shape)), f"{arr.nbytes:,}"] for name, arr in knowledge.tensors().items()],
                right=("bytes",))
    thresholds = ", ".join(f"{k}={v:.4g}" for k, v in sorted(knowledge.thresholds.items())) or "-"
    print_record("metadata", {
        "task": entry.task, "agent": m.agent_id, "origin": _origin(entry), "source": m.source, "seq": m.seq,
        "created": _when(m.created), "stored": _when(entry.stored), "n_train": m.n_train,
        "feature transform": m.feature_transform, "ROM fingerprint": m.rom_fingerprint or "-",
        "BB layout": m.bb_layout_hash or "-", "thresholds": thresholds,
        "packet bytes": "yes" if entry.has_packet else "no", "content hash": entry.content_hash,
        "record": entry.record})
    if m.metrics:
        print_table("metrics", ["metric", "value"], [[k, f"{v:.4g}"] for k, v in sorted(m.metrics.items())],
                    right=("value",))


@app.command("rm")
def remove(
    name: Annotated[str, typer.Argument(help="Task name (TASK@AGENT when several agents taught it), or a "
                                              "quarantine id with --quarantined")],
    quarantined: Annotated[bool, typer.Option("--quarantined", help="Remove a quarantined item")] = False,
    bank: BankOption = None,
    home: HomeOption = None,
) -> None:
    """Remove a task (or, with --quarantined, a quarantined item by id or id prefix)."""
    kb = _open(bank, home)
    try:
        if quarantined:
            matches = [q.id for q in kb.quarantined() if q.id.startswith(name)]
            if len(matches) != 1:
                raise BankError(f"{len(matches)} quarantined items match {name!r}; give more of the id")
            kb.remove_quarantined(matches[0])
            what = f"quarantined item {name}"
        else:
            entry = kb.remove(name)
            what = f"task {entry.key.short} ({'learned here' if entry.own else 'received'}, seq {entry.seq})"
            what += (f"; peers keep that version, and learning {entry.task!r} again publishes seq {entry.seq + 1}, "
                     "which replaces it there" if entry.own else
                     "; the next sync takes it in again while its signer is trusted (skill-edge keys rm NAME "
                     "stops that)")
    except BankError as exc:
        _fail(exc)
    console.print(f"removed {escape(what)}", soft_wrap=True)


@app.command()
def verify(bank: BankOption = None, home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Check every record against its sha256; exit 1 on any problem."""
    kb = _open(bank, home)
    try:
        report = kb.verify()
    except BankError as exc:
        _fail(exc)
    if as_json:
        _verify_json(report)
        return
    for note in report.repaired:
        console.print(f"[yellow]repaired: {note}[/]")
    for problem in report.problems:
        console.print(f"[red]problem: {problem}[/]")
    if report.orphans:
        console.print(f"{len(report.orphans)} unreferenced record dir(s) (crash leftovers, collected on next write)")
    console.print(f"{len(report.tasks_checked)} task(s) verified, {report.quarantined} quarantined, "
                  f"index: {report.index_file}")
    if not report.ok:
        console.print("[red]bank verify FAILED[/]")
        raise typer.Exit(1)
    console.print("[green]bank OK[/]")


def _verify_json(report: VerifyReport) -> None:
    print_json({"ok": report.ok, "index_file": report.index_file, "tasks_checked": report.tasks_checked,
                "problems": report.problems, "repaired": report.repaired, "orphans": report.orphans,
                "staging_leftovers": report.staging_leftovers, "quarantined": report.quarantined})
    if not report.ok:
        raise typer.Exit(1)
