"""The `skill-edge` command: one verb per job, each a thin caller of the Python API.

Sub-commands are registered from the package that owns them (export -> factory verbs,
runtime -> device verbs, firmware_sim -> fleet verbs); this module only composes them.
Modules that a machine cannot import (e.g. an optional dependency is missing) are left
out with a note instead of breaking every other verb.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import typer

app = typer.Typer(help="skill-edge: shared-knowledge lifelong learning on edge devices.\n\n"
                       "Environment: SKILL_EDGE_HOME (device home, default ~/.skill-edge), SKILL_EDGE_ROM (ROM "
                       "directory), SKILL_EDGE_LOG (log level: DEBUG, INFO, WARNING (default), ERROR; log "
                       "lines go to stderr).",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool) -> None:
    if value:
        from skill_edge import __version__

        typer.echo(f"skill-edge {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass

# (module, attribute, how to register, name)
_COMMANDS: list[tuple[str, str, str, str]] = [
    ("skill_edge.export.cli", "export_command", "command", "export"),
    ("skill_edge.export.cli", "rom_app", "group", "rom"),
    ("skill_edge.runtime.cli.main", "learn_command", "command", "learn"),
    ("skill_edge.runtime.cli.main", "classify_command", "command", "classify"),
    ("skill_edge.runtime.cli.evaluate", "eval_command", "command", "eval"),
    ("skill_edge.runtime.cli.bank", "app", "group", "bank"),
    ("skill_edge.runtime.cli.packets", "keys_app", "group", "keys"),
    ("skill_edge.runtime.cli.packets", "packet_app", "group", "packet"),
    ("skill_edge.runtime.cli.sync", "sync_command", "command", "sync"),
    ("skill_edge.firmware_sim.cli", "demo_command", "command", "demo"),
    ("skill_edge.firmware_sim.cli", "fleet_command", "command", "fleet"),
]

_missing: list[str] = []
for module_name, attr, kind, name in _COMMANDS:
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        _missing.append(f"{name} ({exc})")
        continue
    if kind == "command":
        app.command(name)(obj)
    else:
        app.add_typer(obj, name=name)


def log_level(value: str | None) -> tuple[int, str | None]:
    """SKILL_EDGE_LOG as a logging level (a name such as INFO, or a number), and a complaint if it is neither."""
    text = (value or "WARNING").strip()
    if text.isdigit():
        return int(text), None
    level = logging.getLevelName(text.upper())
    if isinstance(level, int):
        return level, None
    return logging.WARNING, f"SKILL_EDGE_LOG={value!r} is not a log level (DEBUG, INFO, WARNING, ERROR); using WARNING"


def main() -> None:
    level, complaint = log_level(os.environ.get("SKILL_EDGE_LOG"))
    logging.basicConfig(level=level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    if complaint:
        logging.getLogger("skill_edge").warning(complaint)
    if _missing and os.environ.get("SKILL_EDGE_DEBUG"):
        print("commands unavailable: " + "; ".join(_missing), file=sys.stderr)
    app()


if __name__ == "__main__":
    main()
