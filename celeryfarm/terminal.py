"""How the command line and the demo show things on a terminal: state colours, times,
tables."""

from __future__ import annotations

import time

import click

from .records.states import JobState

STATE_COLOURS = {JobState.WAITING: "yellow", JobState.RUNNING: "cyan",
                 JobState.COMPLETED: "green", JobState.CANCELLED: "magenta",
                 JobState.FAILED: "red"}


def styled_state(state: str) -> str:
    """A state in its colour (ANSI codes, which click drops when not on a terminal)."""
    return click.style(str(state), fg=STATE_COLOURS.get(state))


def rich_state(state: str) -> str:
    """A state in its colour, as rich markup (the demo's console)."""
    return f"[{STATE_COLOURS.get(state, 'white')}]{state}[/]"


def when(ms: int | None, short: bool = False) -> str:
    """A time in milliseconds as local time, "-" for none."""
    if not ms:
        return "-"
    return time.strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S",
                         time.localtime(ms / 1000))


def table(header: list[str], rows: list[list[str]], state_col: int) -> None:
    """A plain aligned table (no extra dependency), the state column coloured on a tty."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        cells[state_col] = click.style(cells[state_col], fg=STATE_COLOURS.get(row[state_col]))
        click.echo("  ".join(cells).rstrip())
    if not rows:
        click.echo("(no jobs)")
