"""How the device verbs talk to people: results on stdout, progress and messages on stderr.

On a terminal, results are rich tables and progress is a live bar.  When stdout or stderr is a
pipe or a file (a script, ``| tee log``, a service), the same information is written as plain
text: results as aligned columns or ``key: value`` lines with nothing cut off, and progress as
one log line per stage at its start and end (and at most one every few seconds in between), so
a log shows what ran and how far it got.  Kept free of heavy imports, as every CLI module is.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

from skill_edge import tables

console = Console(stderr=True, soft_wrap=True, emoji=False)  # messages, warnings, progress (long lines are not cut)
out = Console(soft_wrap=True, emoji=False)  # results; names are text, never emoji codes

#: Seconds between two progress lines of one stage when stderr is not a terminal.
PLAIN_PROGRESS_EVERY_S = 5.0


def _json_default(obj: object) -> object:
    """numpy scalars and arrays as plain numbers and lists; anything else by its text."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def print_json(data: object, *, line: bool = False) -> None:
    """``data`` as JSON on stdout, for scripts: never coloured, wrapped or cut.

    ``line``: one compact object on one line, for a stream of them (``sync --watch --json``)."""
    import json
    import sys

    text = (json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=_json_default) if line
            else json.dumps(data, ensure_ascii=False, indent=1, default=_json_default))
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def iso_time(t: float) -> str:
    """A Unix time as ISO 8601 in UTC (``2026-12-07T03:10:05+00:00``): what ``--json`` output carries."""
    import datetime as dt

    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def say_error(prefix: str, detail: object = "", *, style: str = "red") -> None:
    """``prefix`` in colour on stderr, then ``detail`` (an exception, a path) as literal text.

    Details carry file names and task names, and a ``[b]`` in one of them must neither vanish
    as rich markup nor break the line as a markup error."""
    text = Text(prefix, style=style)
    if str(detail):
        text.append(" " + str(detail))
    console.print(text, highlight=False)


def shorten_path(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, cut at the start (``…/class/img.jpg``) so the end stays.

    The end of a path (its class folder and file name) is what tells rows apart; a cut from
    the right leaves every row of one folder reading the same."""
    if width < 2 or len(name) <= width:
        return name
    return "…" + name[-(width - 1):]


def relative_names(names: Sequence[str]) -> tuple[str | None, list[str]]:
    """(the folder every name lies in, each name relative to it), or (None, names) when they share none."""
    paths = [n for n in names if os.path.isabs(n) or os.sep in n]
    if len(names) < 2 or len(paths) != len(names):
        return None, list(names)
    try:
        common = os.path.commonpath([os.path.dirname(n) for n in names])
    except ValueError:  # a mix of absolute and relative paths
        return None, list(names)
    if not common or common == os.sep:
        return None, list(names)
    return common, [os.path.relpath(n, common) for n in names]


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                shorten: int | None = None, right: Sequence[str] = ()) -> None:
    """Rows on stdout: a rich table on a terminal, plain aligned columns otherwise, with every cell
    whole (``skill_edge.tables``).  ``right``: the columns (by name) aligned right.

    ``shorten`` is the column whose cells are paths: on a terminal they are shown relative to the
    folder they share (named in the title) and cut at the start to what fits (``shorten_path``);
    plain output keeps them whole."""
    cells = [list(r) for r in rows]
    if out.is_terminal and shorten is not None and cells:
        common, rel = relative_names([r[shorten] for r in cells])
        if common is not None:
            title = f"{title}, in {common}"
            for r, name in zip(cells, rel):
                r[shorten] = name
        others = sum(max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns) if i != shorten)
        room = max(16, out.width - others - 3 * len(columns) - 1)
        for r in cells:
            r[shorten] = shorten_path(r[shorten], room)
    tables.print_table(out, title, columns, cells, right=right,
                       no_wrap=[columns[shorten]] if shorten is not None else ())


def print_record(title: str, record: Mapping[str, object]) -> None:
    """One result on stdout: a two-column table on a terminal, ``key: value`` lines otherwise."""
    tables.print_record(out, title, record)


@dataclass
class _Stage:
    total: int
    done: int = 0
    bar: int | None = None
    last_line: float = 0.0
    finished: bool = False


@dataclass
class StageProgress:
    """Progress of named stages (``extract train``, ``train head``...), in the order they start.

    A stage that starts marks every earlier one complete, because a caller reports a stage's
    start (``0/1``) and not always its end; ``close`` completes the rest.  On a terminal each
    stage is a rich bar on stderr; otherwise each stage writes ``<verb>: <stage> <done>/<total>``
    lines to stderr (start, end, and every ``PLAIN_PROGRESS_EVERY_S`` seconds in between)."""

    verb: str
    stages: dict[str, _Stage] = field(default_factory=dict)
    _progress: Progress | None = None

    def __enter__(self) -> "StageProgress":
        if console.is_terminal:
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), console=console)
            self._progress.start()
        return self

    def __exit__(self, exc_type, *_exc) -> None:
        self.close(complete=exc_type is None)

    def update(self, what: str, done: int, total: int) -> None:
        total = max(int(total), 1)
        stage = self.stages.get(what)
        if stage is None:
            for other in self.stages.values():
                self._finish(other)
            stage = self.stages[what] = _Stage(total)
            if self._progress is not None:
                stage.bar = self._progress.add_task(what, total=total)
        stage.total, stage.done = total, min(int(done), total)
        self._show(what, stage, force=stage.done in (0, total) and not stage.finished)
        if stage.done >= total:
            stage.finished = True

    def close(self, *, complete: bool = True) -> None:
        """Complete every stage (unless the work failed), then stop the live display."""
        if complete:
            for stage in self.stages.values():
                self._finish(stage)
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _finish(self, stage: _Stage) -> None:
        if not stage.finished:
            stage.done, stage.finished = stage.total, True
            name = next(k for k, v in self.stages.items() if v is stage)
            self._show(name, stage, force=True)

    def _show(self, what: str, stage: _Stage, *, force: bool) -> None:
        if self._progress is not None:
            self._progress.update(stage.bar, completed=stage.done, total=stage.total)
            return
        now = time.monotonic()
        if force or now - stage.last_line >= PLAIN_PROGRESS_EVERY_S:
            stage.last_line = now
            console.print(f"{self.verb}: {what} {stage.done}/{stage.total}", markup=False, highlight=False,
                          soft_wrap=True)
