"""Results as tables on a terminal and as plain text everywhere else.

Shared by every command line (the factory's ``export``/``rom``, the device verbs, the fleet lab),
so it imports nothing of the project.  A rich table is cut to the terminal's width; off a
terminal (a pipe, ``| tee log``, CI) rich would cut it to 80 columns and put ellipses into
fingerprints and paths, so there the same rows are written as aligned columns, or ``key: value``
lines, with every cell whole.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text


def print_table(console: Console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                right: Sequence[str] = (), no_wrap: Sequence[str] = ()) -> None:
    """``rows`` of strings under ``columns``; ``right``: the columns (by name) aligned right, such as
    counts and sizes; ``no_wrap``: columns a terminal table keeps on one line.  Cells are text,
    never markup (a ``[tag]`` in a file name stays as it is)."""
    if not console.is_terminal:
        widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(columns)]
        console.print(title, markup=False, highlight=False, soft_wrap=True)
        for r in [list(columns), *rows]:
            line = "  ".join(cell.rjust(w) if c in right else cell.ljust(w)
                             for cell, w, c in zip(r, widths, columns)).rstrip()
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c, no_wrap=c in no_wrap or c in right, overflow="fold", justify="right" if c in right else "left")
    for r in rows:
        t.add_row(*(Text(c) for c in r))
    console.print(t)


def print_record(console: Console, title: str, record: Mapping[str, object]) -> None:
    """One result as a two-column table on a terminal, ``key: value`` lines otherwise."""
    if not console.is_terminal:
        console.print(title, markup=False, highlight=False, soft_wrap=True)
        for k, v in record.items():
            console.print(f"{k}: {v}", markup=False, highlight=False, soft_wrap=True)
        return
    t = Table(title=title, show_header=False)
    t.add_column("")
    t.add_column("", overflow="fold")
    for k, v in record.items():
        t.add_row(Text(str(k)), Text(str(v)))
    console.print(t)
