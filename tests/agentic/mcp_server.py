"""A small MCP server for the import test, run as a subprocess over stdio: `python mcp_server.py`."""

from typing import Literal

from mcp.server.mcpserver import MCPServer

app = MCPServer("openk2-test-tools")


@app.tool()
def get_forecast(city: str, days: int = 3, units: Literal["metric", "imperial"] = "metric") -> str:
    """Weather forecast for a city."""
    return f"{city}: sunny for {days} days ({units})"


@app.tool()
def convert_currency(amount: float, source: str, target: str) -> float:
    """Convert an amount of money between two currencies."""
    return amount * 1.1


if __name__ == "__main__":
    app.run("stdio")
