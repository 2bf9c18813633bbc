"""The shared Typer app; each area registers its commands in its own module of this package."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console

app = typer.Typer(help="openk2: the Kimi K2 recipe, end to end.", no_args_is_help=True, add_completion=False)
console = Console()


def fail(msg: str) -> NoReturn:
    """Print an actionable error and exit with status 2."""
    console.print(f"[red]error:[/red] {msg}")
    raise typer.Exit(2)
