"""Model commands: presets and parameter counts."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from openk2.cli.app import app, console, fail


@app.command()
def params(
    preset: str = typer.Option(None, help="Preset name; omit to list every preset."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Total and activated parameters of a preset, computed analytically."""
    from openk2.model import ConfigError, count_params, get_preset, preset_names

    names = [preset] if preset else preset_names()
    try:
        rows = {n: count_params(get_preset(n)).as_dict() for n in names}
    except ConfigError as e:
        fail(str(e))
    if as_json:
        print(json.dumps(rows[preset] if preset else rows, indent=2))
        return
    table = Table(title="openk2 presets (embeddings included)")
    for col in ("preset", "total", "activated", "routed experts", "attention"):
        table.add_column(col, justify="right" if col != "preset" else "left")
    for n, r in rows.items():
        table.add_row(n, _human(r["total"]), _human(r["activated"]), _human(r["routed_experts"]),
                      _human(r["attention"]))
    console.print(table)


def _human(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
