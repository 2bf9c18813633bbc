"""Tool machinery shared by the τ²-bench domains: the `@tool` marker, the toolkit base, the text form of a tool
result, OpenAI tool schemas, nested-dict model updates and the canonical database hash.

Behaviour that the shipped gold end states and texts depend on (reproduced from the reference,
sierra-research/tau2-bench v0.1.0, our own code):
- a tool is the plain Python method, called with the model's keyword arguments as they are (no schema
  validation first): a missing or unexpected argument gives Python's own TypeError text, e.g.
  `Error: AirlineTools.get_user_details() missing 1 required positional argument: 'user_id'`, which is why the
  toolkit classes carry the reference's class names, and why tools that several domains share word for word
  (`calculate`, `transfer_to_human_agents`) are defined in each class rather than in a mixin (whose name would
  appear in those texts instead);
- an unknown tool raises `Tool 'NAME' not found.`;
- a result that is a string stays as it is; anything else becomes JSON where a pydantic model is its
  `model_dump()` as is, while plain ints, floats and bools (top level, or directly inside lists, tuples and
  dicts) become strings, dates become ISO strings and anything else falls back to `str` (`to_text`);
- an exception becomes `Error: <message>`; whatever the tool changed before raising stays changed.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import inspect
import json
import operator
import re
import typing
from collections.abc import Callable
from datetime import date, datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

TOOL_ATTR = "__tau2_tool__"
M = TypeVar("M", bound=BaseModel)


class NoExtra(BaseModel):
    model_config = ConfigDict(extra="forbid")


def tool(kind: str = "read") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark a toolkit method as a tool the model may call; `kind` is read / write / generic."""

    def mark(func: Callable[..., Any]) -> Callable[..., Any]:
        setattr(func, TOOL_ATTR, kind)
        return func

    return mark


class ToolKit:
    """A set of tools over one pydantic database. Subclasses mark their tools with `@tool(...)`.

    Copy-on-access: a toolkit may start from a *shared* pristine database whose dict-valued fields (`COW_FIELDS`)
    are fresh dicts holding the pristine entries. `_own(field, key)` swaps an entry for a private deep copy
    before the tools read it for a change, so building an environment costs no copy of the whole database and the
    hash reuses the pristine entries' cached hashes (`db_hash`). Every path that changes an entry goes through
    `_own` (the domain's `_get_*` lookups)."""

    db: Any
    COW_FIELDS: tuple[str, ...] = ()

    def __init__(self, db: Any, pristine: Any = None) -> None:
        self.db = db
        self.pristine = pristine

    def _own(self, field: str, key: str) -> Any:
        entries = getattr(self.db, field)
        value = entries[key]
        if self.pristine is not None and value is getattr(self.pristine, field).get(key):
            value = entries[key] = value.model_copy(deep=True)
        return value

    @classmethod
    def tool_names(cls) -> list[str]:
        return sorted(name for name in dir(cls) if hasattr(getattr(cls, name, None), TOOL_ATTR))

    def has_tool(self, name: str) -> bool:
        return name in self.tool_names()

    def use_tool(self, tool_name: str, **kwargs: Any) -> Any:
        if not self.has_tool(tool_name):
            raise ValueError(f"Tool '{tool_name}' not found.")
        return getattr(self, tool_name)(**kwargs)

    def schemas(self) -> list[dict[str, Any]]:
        """OpenAI-format tool schemas, in name order (built once per toolkit class; copies returned)."""
        cls = type(self)
        if cls not in _SCHEMAS:
            _SCHEMAS[cls] = [tool_schema(getattr(self, name)) for name in self.tool_names()]
        return copy.deepcopy(_SCHEMAS[cls])

    def db_hash(self) -> str | None:
        if self.pristine is None or not self.COW_FIELDS:
            return model_hash(self.db)
        digest = hashlib.sha256()
        for name in type(self.db).model_fields:
            value = getattr(self.db, name)
            if name not in self.COW_FIELDS:
                digest.update(f"{name}={model_hash_json(value)}\n".encode())
                continue
            cached = _entry_hashes(self.pristine, name)
            base = getattr(self.pristine, name)
            for key, entry in value.items():
                h = cached[key] if entry is base.get(key) else _sha(entry.model_dump_json())
                digest.update(f"{name}[{key}]={h}\n".encode())
        return digest.hexdigest()


_HASHES: dict[tuple[int, str], dict[str, str]] = {}
_SCHEMAS: dict[type, list[dict[str, Any]]] = {}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _entry_hashes(pristine: Any, name: str) -> dict[str, str]:
    """Per-entry hashes of a pristine database's dict field, computed once (pristine objects never change)."""
    cache_key = (id(pristine), name)
    if cache_key not in _HASHES:
        _HASHES[cache_key] = {k: _sha(v.model_dump_json()) for k, v in getattr(pristine, name).items()}
    return _HASHES[cache_key]


def model_hash_json(value: Any) -> str:
    return _sha(json.dumps(value if not isinstance(value, BaseModel) else value.model_dump(mode="json"),
                           sort_keys=True, default=str))


# ---- tool results as text ---------------------------------------------------------------------------------------


def _process(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, str) or value is None:
        return value
    if isinstance(value, (int, float, bool)):
        return str(value)
    if isinstance(value, list):
        return [_process(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_process(v) for v in value)
    if isinstance(value, dict):
        return {k: _process(v) for k, v in value.items()}
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    raise ValueError(f"Unsupported type: {type(value)}")


def to_text(value: Any) -> str:
    """A tool's result as the text the model sees (the reference's rules, see the module docstring)."""
    if isinstance(value, str):
        return value
    return json.dumps(_process(value), default=str)


# ---- schemas ----------------------------------------------------------------------------------------------------

_ARG_LINE = re.compile(r"^\s*(\w+):\s*(.*)$")


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(description, {arg: description}) from a Google-style docstring (`Args:` section)."""
    text = inspect.cleandoc(doc or "")
    parts = re.split(r"^\s*(Args|Returns|Raises):\s*$", text, flags=re.M)
    description = parts[0].strip()
    args: dict[str, str] = {}
    for head, body in zip(parts[1::2], parts[2::2], strict=False):
        if head != "Args":
            continue
        lines = [line for line in body.splitlines() if line.strip()]
        indent = min((len(line) - len(line.lstrip()) for line in lines), default=0)
        current = None
        for line in lines:
            m = _ARG_LINE.match(line)
            if m and len(line) - len(line.lstrip()) == indent:
                current = m.group(1)
                args[current] = m.group(2).strip()
            elif current:
                args[current] += " " + line.strip()
    return description, args


def tool_schema(method: Callable[..., Any]) -> dict[str, Any]:
    """The OpenAI function schema of a bound tool method, from its signature and docstring."""
    description, arg_docs = parse_docstring(method.__doc__)
    fields: dict[str, Any] = {}
    hints = typing.get_type_hints(method)  # resolves the string annotations of `from __future__ import annotations`
    for name, param in inspect.signature(method).parameters.items():
        anno = hints.get(name, Any)
        default = ... if param.default is param.empty else param.default
        fields[name] = (anno, Field(default, description=arg_docs.get(name)))
    params = create_model("parameters", **fields)
    return {"type": "function",
            "function": {"name": method.__name__, "description": description or method.__name__,
                         "parameters": params.model_json_schema()}}


# ---- database helpers -------------------------------------------------------------------------------------------


def deep_update(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Merge `update` into `base` recursively (dicts merge, everything else replaces): the reference's addict
    update used for `initialization_data` and device updates."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value
    return base


def update_model(model: M, update: dict[str, Any]) -> M:
    data = deep_update(model.model_dump(), json.loads(json.dumps(update)))
    return type(model).model_validate(data)


def model_hash(model: BaseModel | None) -> str | None:
    """Canonical hash of a database: sha256 of pydantic's JSON dump (field order fixed by the schema; dict
    entries in insertion order, which equal operations reproduce)."""
    if model is None:
        return None
    return hashlib.sha256(model.model_dump_json().encode()).hexdigest()


# ---- calculate --------------------------------------------------------------------------------------------------

def _power(base: float, exponent: float) -> float:
    if abs(exponent) > 1000 or abs(base) > 1e6 and abs(exponent) > 10:  # the reference's eval would hang here
        raise ValueError("exponent too large")
    return operator.pow(base, exponent)


_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Pow: _power}
_UNOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval_node(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _eval_node(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval_node(node.left), _eval_node(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNOPS:
        return _UNOPS[type(node.op)](_eval_node(node.operand))
    raise ValueError("Invalid characters in expression")


def calculate(expression: str) -> str:
    """The reference's `calculate` tool (digits, + - * /, parentheses, spaces; result rounded to 2 places),
    evaluated over the syntax tree instead of `eval` (so `**` and `//`, which those characters allow, work as
    there; only exponents that would make `eval` hang are refused). Errors keep Python's texts
    (`division by zero`, `invalid syntax (<string>, line 1)`)."""
    if not all(char in "0123456789+-*/(). " for char in expression):
        raise ValueError("Invalid characters in expression")
    tree = ast.parse(expression, filename="<string>", mode="eval")
    return str(round(float(_eval_node(tree)), 2))
