"""Tool specifications: one normal form for MCP, OpenAI and synthetic tools, validated with `jsonschema`.

Accepted inputs (`validate_tool`):
    OpenAI   {"type": "function", "function": {"name", "description", "parameters"}}
    bare     {"name", "description", "parameters"}
    MCP      {"name", "description", "inputSchema" | "input_schema"}   (a tools/list entry)

Rule checks (ToolACE's rule layer, APIGen's format layer): the name is a K2 call-id name (`[A-Za-z_][\\w.]*`,
at most 64 characters, so `functions.{name}:{idx}` parses back), the description is non-empty, the parameters
are a valid JSON Schema (`Draft202012Validator.check_schema`) of type "object" whose `required` names only
declared properties and whose every property says what it holds (a type, enum, const, $ref or a combinator).
A failure raises `ToolSchemaError` with the reason; `load_tools` turns those into `Rejection`s.

Deduplication (`dedupe`): exact duplicates (same name and parameters), name clashes, and near-duplicates whose
name + description + parameter-name word sets overlap by at least `threshold` (Jaccard) are dropped.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jsonschema

from openk2.agentic.common import Rejection, jaccard, stable_hash, words

NAME_RE = re.compile(r"[A-Za-z_][\w.]{0,63}")
_TYPED_KEYS = ("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf")


class ToolSchemaError(ValueError):
    """A tool specification that fails a rule check; the message is the reason."""


@dataclass
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]
    domain: str = "general"  # taxonomy path, "category/sub-domain"
    source: str = "unknown"  # "mcp:<server>", "file:<path>", "python:<module.func>", "synthetic:<model>"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": copy.deepcopy(self.parameters)}}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters,
                "domain": self.domain, "source": self.source, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ToolSpec:
        spec = validate_tool(d, domain=d.get("domain", "general"), source=d.get("source", "unknown"))
        spec.meta = dict(d.get("meta") or {})
        return spec

    @property
    def words(self) -> list[str]:
        return words(self.name) + words(self.description) + [w for p in self.parameters.get("properties", {})
                                                             for w in words(p)]

    @property
    def signature(self) -> str:
        return stable_hash({"name": self.name, "parameters": self.parameters})


def _check_property(path: str, prop: Any) -> None:
    if not isinstance(prop, Mapping):
        raise ToolSchemaError(f"{path} is not an object schema")
    if not any(k in prop for k in _TYPED_KEYS):
        raise ToolSchemaError(f"{path} has no type (nor enum/const/$ref/anyOf/oneOf/allOf)")
    if prop.get("type") == "object" and isinstance(prop.get("properties"), Mapping):
        _check_object(path, prop)
    if prop.get("type") == "array" and isinstance(prop.get("items"), Mapping) and prop["items"]:
        _check_property(f"{path}.items", prop["items"])


def _check_object(path: str, schema: Mapping[str, Any]) -> None:
    props = schema.get("properties", {})
    if not isinstance(props, Mapping):
        raise ToolSchemaError(f"{path}.properties is not an object")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ToolSchemaError(f"{path}.required is not a list of names")
    missing = [r for r in required if r not in props]
    if missing:
        raise ToolSchemaError(f"{path}.required names undeclared properties {missing}")
    for name, prop in props.items():
        _check_property(f"{path}.properties.{name}", prop)


def validate_parameters(parameters: Any) -> dict[str, Any]:
    """Check a parameters schema (see the module docstring); returns it, raises ToolSchemaError."""
    if not isinstance(parameters, Mapping):
        raise ToolSchemaError(f"parameters must be a JSON object schema, got {type(parameters).__name__}")
    try:
        jsonschema.Draft202012Validator.check_schema(parameters)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path) or "(root)"
        raise ToolSchemaError(f"parameters is not a valid JSON Schema at {where}: {e.message}") from None
    if parameters.get("type") != "object":
        raise ToolSchemaError(f"parameters.type must be 'object', got {parameters.get('type')!r}")
    _check_object("parameters", parameters)
    return dict(parameters)


def validate_tool(obj: Any, *, domain: str = "general", source: str = "unknown") -> ToolSpec:
    """A ToolSpec from an OpenAI, bare or MCP tool dict; raises ToolSchemaError with the reason."""
    if not isinstance(obj, Mapping):
        raise ToolSchemaError(f"a tool must be a JSON object, got {type(obj).__name__}")
    fn = obj.get("function") if obj.get("type") == "function" else obj
    if not isinstance(fn, Mapping):
        raise ToolSchemaError("'function' must be an object")
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ToolSchemaError("missing tool name")
    if not NAME_RE.fullmatch(name):
        raise ToolSchemaError(f"tool name {name!r} must match [A-Za-z_][\\w.]* (at most 64 characters)")
    description = fn.get("description")
    if not isinstance(description, str) or not description.strip():
        raise ToolSchemaError(f"tool {name!r} has no description")
    if "parameters" in fn:
        parameters = fn["parameters"]
    elif "inputSchema" in fn or "input_schema" in fn:
        parameters = fn.get("inputSchema", fn.get("input_schema"))
    else:
        parameters = {"type": "object", "properties": {}}
    try:
        parameters = validate_parameters(parameters)
    except ToolSchemaError as e:
        raise ToolSchemaError(f"tool {name!r}: {e}") from None
    return ToolSpec(name, description.strip(), copy.deepcopy(parameters), domain=domain, source=source)


def validate_arguments(spec: ToolSpec, arguments: Any) -> list[str]:
    """Why `arguments` do not satisfy the tool's schema ([] when they do)."""
    if not isinstance(arguments, Mapping):
        return [f"arguments must be a JSON object, got {type(arguments).__name__}"]
    validator = jsonschema.Draft202012Validator(spec.parameters)
    return [f"{'/'.join(str(p) for p in e.path) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(dict(arguments)), key=lambda e: list(map(str, e.path)))]


def load_tools(objs: Iterable[Any], *, domain: str = "general", source: str = "unknown",
               stage: str = "import") -> tuple[list[ToolSpec], list[Rejection]]:
    """Validate many tool dicts; the malformed ones come back as rejections with their reasons."""
    specs: list[ToolSpec] = []
    rejections: list[Rejection] = []
    for i, obj in enumerate(objs):
        try:
            specs.append(validate_tool(obj, domain=domain, source=source))
        except ToolSchemaError as e:
            name = obj.get("name") or (obj.get("function") or {}).get("name") if isinstance(obj, Mapping) else None
            rejections.append(Rejection(stage, f"{source}#{i}" + (f":{name}" if name else ""), str(e)))
    return specs, rejections


def near_duplicate(spec: ToolSpec, others: Iterable[ToolSpec], threshold: float = 0.8) -> tuple[ToolSpec, str] | None:
    """The first of `others` that `spec` duplicates, with why; None if it is new."""
    mine = spec.words
    for other in others:
        if other.name == spec.name:
            same = other.signature == spec.signature
            return other, "exact duplicate" if same else f"name {spec.name!r} already taken ({other.source})"
        sim = jaccard(mine, other.words)
        if sim >= threshold:
            return other, f"near-duplicate of {other.name!r} (word overlap {sim:.2f} >= {threshold})"
    return None


class DedupIndex:
    """`near_duplicate` over many tools without comparing every pair: prefix filtering (Bayardo et al., "Scaling
    up all pairs similarity search", 2007). Under one fixed word order, two sets with Jaccard >= t share a word
    among the first |A| - ceil(t |A|) + 1 words of each, so only tools sharing such a word are compared; the
    answer is exactly `near_duplicate`'s (the earliest added tool that matches)."""

    def __init__(self, threshold: float = 0.8) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        self.threshold = threshold
        self.tools: dict[str, ToolSpec] = {}  # insertion ordered
        self._order: dict[str, int] = {}
        self._sets: dict[str, frozenset[str]] = {}
        self._index: dict[str, set[str]] = {}

    def _prefix(self, ws: frozenset[str]) -> list[str]:
        ordered = sorted(ws)
        return ordered[: len(ordered) - math.ceil(self.threshold * len(ordered)) + 1] if ordered else []

    def find(self, spec: ToolSpec) -> tuple[ToolSpec, str] | None:
        ws = frozenset(spec.words)
        names = {n for w in self._prefix(ws) for n in self._index.get(w, ())}
        if spec.name in self.tools:
            names.add(spec.name)
        for name in sorted(names, key=self._order.__getitem__):
            other = self.tools[name]
            if other.name == spec.name:
                same = other.signature == spec.signature
                return other, "exact duplicate" if same else f"name {spec.name!r} already taken ({other.source})"
            sim = jaccard(ws, self._sets[name])
            if sim >= self.threshold:
                return other, f"near-duplicate of {other.name!r} (word overlap {sim:.2f} >= {self.threshold})"
        return None

    def add(self, spec: ToolSpec) -> None:
        ws = frozenset(spec.words)
        self._order[spec.name] = len(self._order)
        self.tools[spec.name] = spec
        self._sets[spec.name] = ws
        for w in self._prefix(ws):
            self._index.setdefault(w, set()).add(spec.name)


def dedupe(specs: Iterable[ToolSpec], threshold: float = 0.8, existing: Iterable[ToolSpec] = (),
           stage: str = "dedupe") -> tuple[list[ToolSpec], list[Rejection]]:
    """Keep the first of each group of duplicates (exact, same name, or near-duplicate); reject the rest."""
    index = DedupIndex(threshold)
    for spec in existing:
        index.add(spec)
    kept: list[ToolSpec] = []
    rejections: list[Rejection] = []
    for spec in specs:
        dup = index.find(spec)
        if dup is None:
            kept.append(spec)
            index.add(spec)
        else:
            rejections.append(Rejection(stage, spec.name, dup[1], {"source": spec.source, "duplicate_of": dup[0].name}))
    return kept, rejections
