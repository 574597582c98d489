"""How the cluster commands print: tables like kubectl's (colour on a terminal only, never with NO_COLOR),
-o json / yaml for scripts, and `key: value` sections for describe.

rich decides about colour: it writes none when stdout is not a terminal and none when NO_COLOR is set
(https://no-color.org); FORCE_COLOR forces it. Output that is not a terminal is never wrapped or cut.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml

OUTPUT_FORMATS = ("json", "yaml", "name", "wide")

# Phases and condition states by how a user should feel about them.
_STYLES = {
    "Succeeded": "green",
    "Ready": "green",
    "Available": "green",
    "True": "green",
    "Running": "cyan",
    "Pending": "yellow",
    "Restarting": "yellow",
    "Suspended": "magenta",
    "Pruned": "dim",
    "Failed": "bold red",
    "Missing": "bold red",
    "Warning": "yellow",
}


def console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    con = Console(file=stream, highlight=False, soft_wrap=True)
    if not con.is_terminal:
        # A pipe or a file: no width to fit, so never wrap or truncate a column.
        con = Console(file=stream, highlight=False, soft_wrap=True, width=1 << 16)
    return con


def styled(value: str) -> str:
    """Rich markup for a phase-like value (escaped otherwise)."""
    from rich.markup import escape

    style = _STYLES.get(value)
    return f"[{style}]{escape(value)}[/]" if style else escape(value)


def table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    styled_columns: Sequence[str] = (),
    header: bool = True,
) -> None:
    """Print a kubectl-style table: upper-case headers, columns separated by spaces, no borders."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        box=None,
        pad_edge=False,
        show_edge=False,
        show_header=header,
        header_style="bold",
        padding=(0, 3, 0, 0),
    )
    for h in headers:
        t.add_column(h, no_wrap=True, overflow="ignore")
    for row in rows:
        t.add_row(
            *(styled(v) if h in styled_columns else escape(v) for h, v in zip(headers, row, strict=True))
        )
    print_lines(t)


def print_lines(renderable: Any) -> None:
    """Print without the trailing spaces rich pads its last column with."""
    con = console()
    with con.capture() as captured:
        con.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    sys.stdout.write(text + ("\n" if text else ""))


def dump(objects: list[dict[str, Any]], fmt: str, as_list: bool) -> None:
    """-o json / yaml: one object as itself, several as a v1 List (as kubectl does)."""
    doc: Any = (
        {"apiVersion": "v1", "kind": "List", "items": objects, "metadata": {"resourceVersion": ""}}
        if as_list
        else objects[0]
    )
    if fmt == "json":
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))


def section(title: str) -> str:
    return f"[bold]{title}[/]"


def fields(pairs: Sequence[tuple[str, str | None]], indent: int = 0) -> list[str]:
    """`Key:  value` lines (values escaped; None left out), aligned like kubectl describe."""
    from rich.markup import escape

    shown = [(k, v) for k, v in pairs if v is not None and v != ""]
    width = max((len(k) for k, _ in shown), default=0) + 2
    pad = " " * indent
    return [f"{pad}{escape(k + ':'):<{width}}{styled(v) if k == 'Phase' else escape(v)}" for k, v in shown]


def number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)
