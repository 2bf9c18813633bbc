"""Import tools: from a live MCP server over stdio (the `mcp` SDK's tools/list), from schema files, from callables.

Every importer returns `(tools, rejections)` and never raises for bad input: a server that cannot start, dies or
times out is one rejection for the whole source (with the server's error), a malformed tool is a rejection for
that tool, and an unreadable file is a rejection naming the file (and line, for JSONL).

    tools, rejected = import_mcp_server(["python", "my_server.py"], domain="files")
    tools, rejected = load_schema_file("tools.json", domain="weather")
    spec = tool_from_callable(get_weather, domain="weather")
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import tempfile
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from openk2.agentic.common import Rejection
from openk2.agentic.tools import ToolSchemaError, ToolSpec, load_tools, validate_tool

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array",
               type(None): "null"}


def _leaf_errors(e: BaseException) -> list[BaseException]:
    subs = getattr(e, "exceptions", None)  # an (anyio task-group) exception group
    if isinstance(subs, tuple):
        return [leaf for sub in subs for leaf in _leaf_errors(sub)]
    return [e]


def describe_error(e: BaseException) -> str:
    """One line for an exception, unwrapping anyio's task-group exception groups."""
    leaves = _leaf_errors(e)
    return "; ".join(f"{type(x).__name__}: {x}" if str(x) else type(x).__name__ for x in leaves)


async def list_mcp_tools(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                         cwd: str | os.PathLike | None = None, timeout: float = 60.0,
                         errlog: Any = None) -> list[dict[str, Any]]:
    """The raw tools/list of an MCP server started as `command` (all pages), as MCP tool dicts. The server's
    stderr goes to `errlog` (a file; default: discarded)."""
    import anyio
    from mcp import ClientSession, StdioServerParameters, stdio_client
    from mcp.types import PaginatedRequestParams

    params = StdioServerParameters(command=command[0], args=list(command[1:]), env=dict(env) if env else None,
                                   cwd=cwd)
    tools: list[dict[str, Any]] = []
    with open(os.devnull, "w") as devnull, anyio.fail_after(timeout):
        async with stdio_client(params, errlog=errlog or devnull) as (read, write), \
                ClientSession(read, write) as session:
            await session.initialize()
            cursor = None
            while True:
                page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor) if cursor else None)
                tools += [t.model_dump(by_alias=True, exclude_none=True) for t in page.tools]
                cursor = page.next_cursor
                if not cursor:
                    break
    return tools


async def import_mcp_server_async(command: Sequence[str], *, domain: str = "general", name: str | None = None,
                                  env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                                  timeout: float = 60.0) -> tuple[list[ToolSpec], list[Rejection]]:
    source = f"mcp:{name or Path(command[-1]).name}"
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as errlog:
        try:
            raw = await list_mcp_tools(command, env=env, cwd=cwd, timeout=timeout, errlog=errlog)
        except Exception as e:  # a dead, hung or broken server: one rejection for the source, never a crash
            reason = "timed out" if isinstance(e, TimeoutError) else describe_error(e)
            errlog.seek(0)
            stderr = " ".join(errlog.read()[-400:].split())
            return [], [Rejection("import", source, f"MCP server {' '.join(command)!r} failed: {reason}"
                                  + (f"; its stderr ends: {stderr}" if stderr else ""))]
    return load_tools(raw, domain=domain, source=source)


def import_mcp_server(command: Sequence[str], **kw: Any) -> tuple[list[ToolSpec], list[Rejection]]:
    """Synchronous `import_mcp_server_async` (runs its own event loop)."""
    return asyncio.run(import_mcp_server_async(command, **kw))


def _tool_list(data: Any) -> list[Any] | None:
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        if isinstance(data.get("tools"), list):  # an MCP tools/list result
            return data["tools"]
        if isinstance(data.get("result"), Mapping) and isinstance(data["result"].get("tools"), list):
            return data["result"]["tools"]  # a JSON-RPC response carrying one
        return [data]
    return None


def load_schema_file(path: str | os.PathLike, *, domain: str = "general") -> tuple[list[ToolSpec], list[Rejection]]:
    """Tools from a JSON file (a tool, a list, an MCP tools/list result) or a JSONL file (one tool per line).

    A tool's own "domain" key, when present, overrides `domain`."""
    path = Path(path)
    source = f"file:{path.name}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        return [], [Rejection("import", source, f"cannot read {path}: {e}")]
    items: list[tuple[str, Any]] = []
    rejections: list[Rejection] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{source}:{i}", json.loads(line)))
                except ValueError as e:
                    rejections.append(Rejection("import", f"{path}:{i}", f"not JSON: {e}"))
    else:
        try:
            data = json.loads(text)
        except ValueError as e:
            return [], [Rejection("import", str(path), f"not JSON: {e}")]
        listed = _tool_list(data)
        if listed is None:
            return [], [Rejection("import", str(path), f"expected a tool, a list of tools or {{'tools': [...]}}, "
                                                       f"got {type(data).__name__}")]
        items = [(f"{source}#{i}", t) for i, t in enumerate(listed)]
    specs: list[ToolSpec] = []
    for item, obj in items:
        own = obj.get("domain") if isinstance(obj, Mapping) and isinstance(obj.get("domain"), str) else domain
        try:
            specs.append(validate_tool(obj, domain=own, source=source))
        except ToolSchemaError as e:
            rejections.append(Rejection("import", item, str(e)))
    return specs, rejections


# ---- Python callables -> schema ---------------------------------------------------------------------------------

_ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters|Params)\s*:\s*$")
_SECTION = re.compile(r"^\s*(Returns|Return|Raises|Yields|Examples?|Notes?)\s*:\s*$")
_ARG_LINE = re.compile(r"^\s*(\*{0,2}\w+)\s*(?:\(([^)]*)\))?\s*:\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(summary, {param: description}) from a Google-style docstring (`Args:` section) or `:param x:` lines."""
    if not doc:
        return "", {}
    lines = inspect.cleandoc(doc).splitlines()
    summary_lines: list[str] = []
    params: dict[str, str] = {}
    in_args, current, indent = False, None, None
    for line in lines:
        m = re.match(r"^\s*:param\s+(?:\w+\s+)?(\w+)\s*:\s*(.*)$", line)
        if m:
            params[m.group(1)] = m.group(2).strip()
            continue
        if _ARGS_HEADER.match(line):
            in_args = True
            continue
        if _SECTION.match(line) or line.lstrip().startswith(":"):
            in_args = False
            continue
        if in_args:
            if not line.strip():
                continue
            lead = len(line) - len(line.lstrip())
            m = _ARG_LINE.match(line)
            if m and (indent is None or lead <= indent):
                indent = lead
                current = m.group(1).lstrip("*")
                params[current] = m.group(3).strip()
            elif current:
                params[current] = (params[current] + " " + line.strip()).strip()
        elif not params and (line.strip() or summary_lines):
            summary_lines.append(line.strip())
    first_paragraph = "\n".join(summary_lines).strip().split("\n\n")[0]  # the summary is the first paragraph
    return " ".join(first_paragraph.split()), params


def type_schema(annotation: Any) -> dict[str, Any]:
    """JSON Schema for a Python annotation (builtins, Optional/Union, list[...], dict[...], Literal, Enum)."""
    import enum

    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) == 1:
            return type_schema(non_null[0])  # Optional[X]: not required, same type
        return {"anyOf": [type_schema(a) or {} for a in args]}
    if origin in (list, tuple, set, frozenset, Sequence) or annotation in (list, tuple, set):
        out: dict[str, Any] = {"type": "array"}
        if args and args[0] is not Ellipsis:
            item = type_schema(args[0])
            if item:
                out["items"] = item
        return out
    if origin in (dict, Mapping) or annotation is dict:
        return {"type": "object"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": [m.value for m in annotation]}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    return {"type": "string"}  # anything else travels as text


def tool_from_callable(fn: Callable[..., Any], *, name: str | None = None, domain: str = "general",
                       skip: Sequence[str] = ("state", "self", "cls")) -> ToolSpec:
    """A ToolSpec from a function's signature, type hints and docstring.

    Parameters named in `skip` (the injected tool-layer `state`, for one) and *args/**kwargs are not part of the
    schema. A parameter without a default is required. Raises ToolSchemaError when the result fails validation
    (e.g. no docstring: a tool needs a description)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    summary, docs = parse_docstring(inspect.getdoc(fn))
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, p in sig.parameters.items():
        if pname in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        schema = type_schema(hints.get(pname, p.annotation)) or {"type": "string"}
        if pname in docs:
            schema["description"] = docs[pname]
        if p.default is not p.empty:
            if p.default is None or isinstance(p.default, (str, int, float, bool, list, dict)):
                schema["default"] = p.default
        else:
            required.append(pname)
        properties[pname] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    tool_name = name or fn.__name__
    return validate_tool({"name": tool_name, "description": summary, "parameters": parameters}, domain=domain,
                         source=f"python:{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', tool_name)}")


def tools_from_callables(fns: Sequence[Callable[..., Any]], *, domain: str = "general"
                         ) -> tuple[list[ToolSpec], list[Rejection]]:
    specs: list[ToolSpec] = []
    rejections: list[Rejection] = []
    for fn in fns:
        try:
            specs.append(tool_from_callable(fn, domain=domain))
        except (ToolSchemaError, ValueError, TypeError) as e:
            rejections.append(Rejection("import", f"python:{getattr(fn, '__qualname__', fn)}", str(e)))
    return specs, rejections
