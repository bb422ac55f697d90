"""The Typer settings shared by the root ``ttcompress`` app and every command module.

A command module builds its own single-command app with :func:`command_app` and decorates its
function with ``@app.command(NAME)``; :mod:`ttcompress.cli` loads that module only when NAME is
invoked (or its help is asked for). Nothing here imports torch or a command module.
"""

from __future__ import annotations

from typing import Any

import typer

__all__ = ["command_app"]

#: Settings of every Typer app of the CLI: same help rendering and error behaviour everywhere.
TYPER_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "pretty_exceptions_enable": False,
    "rich_markup_mode": "rich",
}


def command_app() -> typer.Typer:
    """A Typer app for the command(s) of one CLI module, with the shared settings."""
    return typer.Typer(**TYPER_SETTINGS)
