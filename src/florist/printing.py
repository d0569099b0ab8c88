"""The one console florist prints through, so that a table piped to a file or to `tee` keeps every figure.

Written anywhere but a terminal, rich assumes 80 columns and shortens the cells of a wider table
(`4,35…`, `0.08…`). There nothing needs the text to fit a window, so the console is wider than any
table florist prints and each table takes its natural width. On a terminal, rich fits tables to the
window as usual.
"""

from __future__ import annotations

from rich.console import Console

UNCAPPED_WIDTH = 10_000
"""Columns off a terminal: far beyond any table's natural width. Nothing florist prints pads a line to
the console's width (rich's `Console.log` would, which is why florist does not use it)."""


def make_console(stderr: bool = False, markup: bool = True) -> Console:
    """A rich console on stdout (stderr with `stderr`), whose width is the terminal's on a terminal and
    uncapped anywhere else. Without `markup` it prints every string as it is: no `[style]` tags, no
    `:emoji:` codes, for text that others wrote."""
    console = Console(stderr=stderr, markup=markup, emoji=markup)
    if not console.is_terminal:
        console.width = UNCAPPED_WIDTH
    return console
