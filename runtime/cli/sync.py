"""``skill-edge sync``: publish this device's outbox and take in the fleet's packets.

One-shot (default): publish every packet in the outbox, receive until the transport has been
quiet for ``--idle`` seconds, print what happened, exit.  ``--watch``: keep going, with a live
table of what arrived, what was accepted and what was rejected; Ctrl-C stops.

Where things live (``--home``/``--keys``, default ``$SKILL_EDGE_HOME`` or ``~/.skill-edge``)::

    trust/      public keys this device accepts packets from (``skill-edge keys add``)
    bank/       the knowledge bank (``--bank``)
    outbox/     packets to publish; moved to outbox/sent/ once the transport holds them
    sync/       receive state (newest seq per agent and task) and the folder transport's memory

Exit status (also in ``--help``): 0 when everything that arrived was taken in; 1 when something
could not be published, stored or received intact (it is retried next time), or the transport or
a setting failed; 2 for bad command-line usage; 3 when there were no such failures but some
packets were refused (rejected, or quarantined and not released).  Every packet is reported on
one line, then one summary line; off a terminal the lines are plain text, never wrapped.

Wire into the root command with ``app.command("sync")(sync_command)``.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from skill_edge.export.manifest import RomError, RomManifest
from skill_edge.runtime.cli.output import iso_time, print_json
from skill_edge.runtime.knowledge.bank import BankError, KnowledgeBank
from skill_edge.runtime.exchange.codec import format_size, parse_size
from skill_edge.runtime.exchange.keys import (DEVICE_KEY_FILE, HOME_ENV, KeyStoreError, TrustStore, key_dir,
                                              load_device_key, skill_edge_home)
from skill_edge.runtime.exchange.seq_ledger import LEDGER_FILE, SeqLedger
from skill_edge.runtime.knowledge.records import RomShape
from skill_edge.runtime.exchange.receive import PacketReceiver
from skill_edge.runtime.exchange.sync import BankPlausibility, SyncEvent, SyncService, SyncStats
from skill_edge.runtime.exchange.transport import TransportError, open_transport

app = typer.Typer(help="Share knowledge packets with the fleet.", no_args_is_help=False)
# emoji=False: a fleet, path or task name such as "lab:x:" is text, not an emoji code
console = Console(emoji=False)
err = Console(stderr=True, emoji=False)

STYLE = {"published": "cyan", "accepted": "green", "released": "green", "duplicate": "dim", "rejected": "red",
         "quarantined": "yellow", "own": "dim", "resigned": "magenta", "error": "bold red"}


#: Ctrl-C must stop the device promptly even if the broker connection hangs on the way out.
CLOSE_TIMEOUT_S = 5.0


def _close_within(tx, seconds: float) -> None:
    """Close the transport on a helper thread and give up waiting after ``seconds``.

    Everything accepted is already in the bank (stored atomically before it was acknowledged),
    so abandoning a stuck disconnect loses nothing; the next run resumes from the transport.
    """
    def close() -> None:
        try:
            tx.close()
        except (TransportError, OSError) as exc:  # e.g. a full disk when the delivery marks are saved
            err.print(f"[yellow]warning:[/] closing the transport: {escape(str(exc))} (what was accepted is "
                      "in the bank; the rest is offered again next time)")

    t = threading.Thread(target=close, name="transport-close", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        err.print(f"[yellow]warning:[/] the transport did not close within {seconds:g} s; exiting anyway")


#: Exit codes of ``skill-edge sync`` (see the module docstring and the command's help).
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


def exit_code(stats: SyncStats) -> int:
    """Failures (retried next time) outrank refusals; a run with neither exits 0."""
    if stats.failed:
        return EXIT_FAILED
    return EXIT_REFUSED if stats.refused else EXIT_OK


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


def resolve_rom_identity(rom: Path | None, fingerprint: str | None,
                         bank: KnowledgeBank) -> tuple[str, RomShape | None]:
    """The fingerprint of the ROM this device runs, and its shape where a manifest was read (the widths
    packets are checked against): ``--rom-fingerprint``; else ``--rom`` (or ``SKILL_EDGE_ROM``); else the
    fingerprint every bank task shares; else, for a device that has learned and received nothing yet,
    the default ROM folder, as ``learn`` and ``classify`` use it."""
    if fingerprint and rom is None:
        return fingerprint, None
    if rom is None:
        fps = bank.rom_fingerprints()
        if len(fps) == 1:
            return fps.pop(), None
        if len(fps) > 1:
            _fail(f"cannot tell which ROM this device runs: the bank mixes {len(fps)} ROM fingerprints; "
                  "pass --rom ROM_DIR (or --rom-fingerprint HEX)", EXIT_USAGE)
        from skill_edge.models import default_rom_dir

        rom = default_rom_dir()
        if not (rom / "manifest.json").exists():
            _fail(f"cannot tell which ROM this device runs: the bank is empty and there is no ROM at {rom}; "
                  "pass --rom ROM_DIR (or --rom-fingerprint HEX)", EXIT_USAGE)
    try:
        manifest = RomManifest.read(rom)
    except RomError as exc:
        _fail(str(exc), EXIT_USAGE)
    return fingerprint or manifest.fingerprint, RomShape.from_manifest(manifest)


def sync_command(
    transport: str = typer.Option(..., "--transport", "-t", envvar="SKILL_EDGE_TRANSPORT", show_envvar=True,
                                  help="dir:PATH (shared folder, USB stick) or mqtt://host[:port] / mqtts://..."),
    fleet: str = typer.Option("default", "--fleet", envvar="SKILL_EDGE_FLEET", show_envvar=True,
                              help="fleet name: devices only exchange packets within one fleet"),
    watch: bool = typer.Option(False, "--watch", help="keep running with a live view (Ctrl-C stops)"),
    chunk_size: str = typer.Option("256KiB", "--chunk-size", help="MQTT: packets larger than this go as chunks"),
    tls_ca: Path | None = typer.Option(None, "--tls-ca", exists=True, dir_okay=False,
                                       help="MQTT: CA certificate that signed the broker's certificate"),
    tls_cert: Path | None = typer.Option(None, "--tls-cert", exists=True, dir_okay=False,
                                         help="MQTT: this device's client certificate"),
    tls_key: Path | None = typer.Option(None, "--tls-key", exists=True, dir_okay=False,
                                        help="MQTT: the client certificate's private key"),
    username: str | None = typer.Option(None, "--username", envvar="SKILL_EDGE_MQTT_USERNAME"),
    password: str | None = typer.Option(None, "--password", envvar="SKILL_EDGE_MQTT_PASSWORD",
                                        help="MQTT password (prefer the env var: argv is visible to others)"),
    bank_dir: Path | None = typer.Option(None, "--bank", help="knowledge bank (default HOME/bank)"),
    home: Path | None = typer.Option(None, "--keys", "--home", envvar=HOME_ENV, show_envvar=True,
                                     help="skill-edge home holding trust/ (and keys/); default ~/.skill-edge"),
    trust_dir: Path | None = typer.Option(None, "--trust", help="trust store folder (default HOME/trust)"),
    outbox: Path | None = typer.Option(None, "--outbox", help="packets to publish (default HOME/outbox)"),
    state_dir: Path | None = typer.Option(None, "--state", help="sync state folder (default HOME/sync)"),
    rom: Path | None = typer.Option(None, "--rom", envvar="SKILL_EDGE_ROM", show_envvar=True,
                                    help="this device's ROM folder, for its fingerprint (default: the one every "
                                         "bank task shares, else models/rom/efficientnet_lite0)"),
    rom_fingerprint: str | None = typer.Option(None, "--rom-fingerprint", help="the ROM fingerprint, if no --rom"),
    publish_bank_of: str | None = typer.Option(None, "--publish-bank-of", metavar="AGENT_ID",
                                               help="also publish the stored packets of bank tasks learned by "
                                                    "this agent id"),
    republish_own: bool = typer.Option(False, "--republish-own",
                                       help="when peers hold a newer version of an own task signed by this device's "
                                            "key (a bank restored from a backup), sign the bank's version again past "
                                            "it and publish it; without: it is reported and the next learn goes past it"),
    plausibility: bool = typer.Option(True, "--plausibility/--no-plausibility",
                                      help="quarantine anchors that would hijack the bank's tasks"),
    idle: float = typer.Option(2.0, "--idle", min=0.0, help="one-shot: stop after this many quiet seconds"),
    timeout: float = typer.Option(300.0, "--timeout", min=0.0,
                                  help="one-shot: stop receiving after this many seconds"),
    connect_timeout: float = typer.Option(15.0, "--connect-timeout", min=0.0,
                                          help="MQTT: give up connecting after this"),
    as_json: bool = typer.Option(False, "--json", help="one-shot: print one JSON object (events, counts, exit "
                                                       "code); with --watch: one JSON object a line per event, "
                                                       "then a summary line"),
) -> None:
    """Publish this device's packets and store what the fleet sends (one-shot, or --watch).

    Prints one line per packet and a summary line.  Exit status: 0 everything that arrived was
    taken in (or nothing new came); 1 something could not be published, stored or received
    intact (retried on the next run), or the transport or a setting failed; 2 bad usage; 3 no
    failures, but some packets were refused (rejected, or left in quarantine).
    """
    home_dir = skill_edge_home(home)
    bank_dir = bank_dir or home_dir / "bank"
    trust_dir = trust_dir or home_dir / "trust"
    outbox = outbox or home_dir / "outbox"
    state_dir = state_dir or home_dir / "sync"
    try:
        chunk = parse_size(chunk_size)
        bank = KnowledgeBank(bank_dir)
        trust = TrustStore(trust_dir)
        if not trust.keys():
            err.print(f"[yellow]warning:[/] trust store {trust_dir} is empty: every packet will be rejected "
                      "(add peers with: skill-edge keys add NAME FILE)", soft_wrap=True)
        fingerprint, shape = resolve_rom_identity(rom, rom_fingerprint, bank)
        check = BankPlausibility(bank) if plausibility else None
        receiver = PacketReceiver(trust, fingerprint, state_dir / "receive", plausibility=check, bank=bank,
                                  rom_shape=shape)
        mqtt_options = dict(chunk_size=chunk, username=username, password=password, tls_ca=tls_ca,
                            tls_cert=tls_cert, tls_key=tls_key, connect_timeout=connect_timeout)
        key = load_device_key(home_dir) if (key_dir(home_dir) / DEVICE_KEY_FILE).exists() else None
        if republish_own and key is None:
            _fail(f"--republish-own signs with the device key, and {key_dir(home_dir)} holds none", EXIT_USAGE)
        ledger = SeqLedger(key_dir(home_dir) / LEDGER_FILE, key.key_id) if key is not None else None
        tx = open_transport(transport, fleet, state_dir=state_dir, **mqtt_options)
    except (KeyStoreError, BankError, TransportError, OSError, RomError) as exc:
        _fail(str(exc))
    except ValueError as exc:  # a malformed option: the transport spec, a broker URL, --chunk-size
        _fail(str(exc), EXIT_USAGE)
    view = WatchView(fleet, transport) if watch and not as_json else None
    events: list[dict] = []  # one-shot --json: printed with the counts at the end

    def on_event(e: SyncEvent) -> None:
        if not as_json:
            (view.add if view else _print_event)(e)
        elif watch:
            print_json(_event_json(e), line=True)  # as it happens: a stream a script can follow
        else:
            events.append(_event_json(e))

    service = SyncService(tx, bank, receiver, fleet=fleet, outbox=outbox, on_event=on_event, signed_seqs=ledger,
                          republish_key=key if republish_own else None)
    stop = threading.Event()
    try:
        if publish_bank_of:
            service.publish_bank(publish_bank_of)
        if not watch:
            service.sync_once(idle=idle, timeout=timeout)
        else:
            # Ctrl-C and SIGTERM both stop after the current poll.  Installing a SIGINT handler also
            # matters when the process starts with SIGINT ignored (a background job of a
            # non-interactive shell, as in CI): Python then raises no KeyboardInterrupt at all.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
            if view is None:
                service.run(stop)
            else:
                view.run(service, stop)
    except KeyboardInterrupt:
        pass
    except (TransportError, BankError) as exc:
        _close_within(tx, CLOSE_TIMEOUT_S)
        _fail(str(exc))
    _close_within(tx, CLOSE_TIMEOUT_S)
    code = exit_code(service.stats)
    if as_json:
        summary = {"fleet": fleet, "transport": transport, "counts": _counts_json(service.stats), "exit_code": code}
        if watch:
            print_json({"summary": summary}, line=True)
        else:
            print_json({**summary, "events": events})
        raise typer.Exit(code)
    if view is None or not view.used_live:  # the live view's last frame already shows the counts
        console.print(_stats_line(service.stats, transport, fleet) + _verdict(service.stats, code), soft_wrap=True)
    raise typer.Exit(code)


app.command("sync")(sync_command)


def _print_event(e: SyncEvent) -> None:
    style = STYLE.get(e.kind, "")
    seq = "?" if e.seq < 0 else str(e.seq)
    console.print(Text.assemble((f"{e.kind:<11}", style), f" {e.task}/{e.agent_id} seq {seq} "
                                f"({format_size(e.size)})", (f"  {e.reason}" if e.kind != "published" else "", "dim")),
                  soft_wrap=True)


def _event_json(e: SyncEvent) -> dict:
    return {"event": e.kind, "task": e.task, "agent": e.agent_id, "seq": None if e.seq < 0 else e.seq,
            "bytes": e.size, "reason": e.reason, "origin": e.origin, "at": iso_time(e.at)}


def _counts_json(s: SyncStats) -> dict:
    return {**dataclasses.asdict(s), "failed": s.failed, "refused": s.refused}


def _stats_line(s: SyncStats, transport: str, fleet: str) -> str:
    corrupt = f" ({s.corrupt} damaged in transit)" if s.corrupt else ""
    return (f"sync {escape(fleet)} via {escape(transport)}: published {s.published}, arrived {s.arrived}, "
            f"accepted [green]{s.accepted}[/], duplicate {s.duplicate}, rejected [red]{s.rejected}[/], "
            f"quarantined [yellow]{s.quarantined}[/] (released later {s.released}), own {s.own}, "
            + (f"signed again {s.resigned}, " if s.resigned else "") + f"errors {s.failed}{corrupt}")


def _verdict(s: SyncStats, code: int) -> str:
    """Why the exit status is what it is, in words, at the end of the summary line."""
    if code == EXIT_FAILED:
        return f"; exit {code}: {s.failed} failed and will be retried"
    if code == EXIT_REFUSED:
        return f"; exit {code}: {s.refused} packet(s) refused"
    return ""


class WatchView:
    """A live table of the latest events plus running counts; plain lines when not on a terminal."""

    def __init__(self, fleet: str, transport: str, rows: int = 20) -> None:
        self.fleet = fleet
        self.transport = transport
        self.recent: deque[SyncEvent] = deque(maxlen=rows)
        self.live: Live | None = None
        self.used_live = False
        self.service: SyncService | None = None

    def add(self, event: SyncEvent) -> None:
        self.recent.append(event)
        if self.live is not None:
            self.live.update(self.render())
        else:
            _print_event(event)

    def render(self) -> Group:
        table = Table(title=f"skill-edge sync: fleet {self.fleet!r} via {self.transport} (Ctrl-C to stop)",
                      expand=True)
        for col in ("time", "event", "task", "agent", "seq", "size", "reason"):
            table.add_column(col, overflow="fold" if col == "reason" else "ellipsis")
        for e in self.recent:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(e.at)), Text(e.kind, STYLE.get(e.kind, "")),
                          e.task, e.agent_id, "?" if e.seq < 0 else str(e.seq), format_size(e.size),
                          "" if e.kind == "published" else e.reason)
        stats = self.service.stats if self.service else SyncStats()
        return Group(table, Text.from_markup(_stats_line(stats, self.transport, self.fleet)))

    def run(self, service: SyncService, stop: threading.Event) -> None:
        self.service = service
        if not console.is_terminal:
            console.print(f"watching fleet {self.fleet!r} via {self.transport}; Ctrl-C stops")
            service.run(stop)
            return
        with Live(self.render(), console=console, refresh_per_second=4, transient=False) as live:
            self.live = live
            self.used_live = True
            try:
                service.run(stop)
            finally:
                self.live = None


if __name__ == "__main__":
    import logging
    import os

    logging.basicConfig(level=os.environ.get("SKILL_EDGE_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    app()
