"""The OpenAI wire format: pydantic request models, request validation, and response builders.

Requests are pydantic models (unknown fields are ignored, as clients send many optional ones); semantic checks
that pydantic cannot express (tool schemas, logit bias keys, unsupported options) live in the `check_*`
functions here and raise `APIError`, which the app turns into an OpenAI error body. Responses are plain dicts
built by the functions at the end, so their shape (including explicit nulls) is exactly OpenAI's; the tests
parse them with the official `openai` client.

openk2 extensions (send them with the `openai` client's `extra_body`):
- `ignore_eos` (chat and completions): do not stop at the end-of-turn / end-of-document tokens.
- `add_bos` (completions): prepend `[BOS]` to the prompt; the default is true for text prompts (pretraining
  documents start with `[BOS]`) and false for token-id prompts, which are used verbatim.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20
_TOOL_NAME_RE = re.compile(r"[\w.]{1,64}")  # K2 call ids `functions.NAME:IDX` must parse back ([\w.]+)
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with HTTP status `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    add_bos: bool | None = None


def parse_request(cls: type[_Model], obj: Any) -> Any:
    """Validate a decoded JSON body; pydantic's errors become one 400 naming the offending field."""
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return cls.model_validate(obj)
    except ValidationError as e:
        # For a union field pydantic reports every branch; the deepest location is the most specific complaint.
        err = max(e.errors(), key=lambda x: len(x["loc"]))
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        raise APIError(400, f"invalid value for '{loc}': {err['msg']}", param=loc or None) from None


def _is_union_tag(part: Any) -> bool:
    """Location parts such as 'str' or 'list[TextPart]' name a union branch, not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)


# ---------------------------------------------------------------------------------------------- checks
def check_sampling(req: _Sampling, vocab_size: int) -> tuple[list[str], tuple[tuple[int, float], ...]]:
    """Checks shared by both endpoints; returns (stop strings, logit bias pairs)."""
    if req.presence_penalty or req.frequency_penalty:
        raise APIError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must be non-empty", param="stop")
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
        if not 0 <= tok < vocab_size:
            raise APIError(400, f"logit_bias token id {tok} is outside [0, {vocab_size})", param="logit_bias")
        if not -100 <= value <= 100:
            raise APIError(400, f"logit_bias values must be in [-100, 100], got {value}", param="logit_bias")
        bias.append((tok, float(value)))
    return stops, tuple(bias)


def _check_schema(schema: Any, path: str) -> None:
    if not isinstance(schema, dict):
        raise APIError(400, f"{path} must be a JSON schema object", param=path)
    t = schema.get("type")
    if t is not None:
        types = t if isinstance(t, list) else [t]
        bad = [x for x in types if x not in _JSON_TYPES]
        if bad or not types:
            raise APIError(400, f"{path}.type {t!r} is not a JSON schema type", param=f"{path}.type")
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise APIError(400, f"{path}.properties must be an object", param=f"{path}.properties")
        for key, sub in props.items():
            _check_schema(sub, f"{path}.properties.{key}")
    required = schema.get("required")
    if required is not None:
        if not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
            raise APIError(400, f"{path}.required must be a list of property names", param=f"{path}.required")
        missing = [r for r in required if props is not None and r not in props]
        if missing:
            raise APIError(400, f"{path}.required names undeclared properties {missing}", param=f"{path}.required")
    items = schema.get("items")
    if items is not None:
        for j, sub in enumerate(items if isinstance(items, list) else [items]):
            _check_schema(sub, f"{path}.items" + (f"[{j}]" if isinstance(items, list) else ""))
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            subs = schema[key]
            if not isinstance(subs, list) or not subs:
                raise APIError(400, f"{path}.{key} must be a non-empty list", param=f"{path}.{key}")
            for j, sub in enumerate(subs):
                _check_schema(sub, f"{path}.{key}[{j}]")
    if "enum" in schema and not isinstance(schema["enum"], list):
        raise APIError(400, f"{path}.enum must be a list", param=f"{path}.enum")


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validate OpenAI function tools; returns them unchanged (they are rendered as given). [] means none."""
    if not tools:
        return []
    names: set[str] = set()
    for i, tool in enumerate(tools):
        p = f"tools[{i}]"
        if tool.get("type") != "function":
            raise APIError(400, f"{p}.type must be 'function'", param=f"{p}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{p}.function must be an object", param=f"{p}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME_RE.fullmatch(name):
            raise APIError(400, f"{p}.function.name must be 1-64 characters of letters, digits, '_' or '.' "
                                f"(got {name!r})", param=f"{p}.function.name")
        if name in names:
            raise APIError(400, f"duplicate tool name {name!r}", param=f"{p}.function.name")
        names.add(name)
        if "description" in fn and not isinstance(fn["description"], str):
            raise APIError(400, f"{p}.function.description must be a string", param=f"{p}.function.description")
        if "parameters" in fn:
            params = fn["parameters"]
            _check_schema(params, f"{p}.function.parameters")
            if params.get("type", "object") != "object":
                raise APIError(400, f"{p}.function.parameters must describe an object",
                               param=f"{p}.function.parameters.type")
    return tools


def check_tool_choice(choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> str | tuple[str, str]:
    """'none' | 'auto' | 'required' | ('function', name)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}",
                           param="tool_choice")
        if choice == "required" and not tools:
            raise APIError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return choice
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise APIError(400, "tool_choice must be {'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return ("function", name)


# ---------------------------------------------------------------------------------------------- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict[str, Any]:
    return {"id": id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage_, "system_fingerprint": None}


def chat_chunk(id: str, created: int, model: str, choices: list[dict], usage_: dict | None = None) -> dict[str, Any]:
    out = {"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def completion(id: str, created: int, model: str, choices: list[dict], usage_: dict | None) -> dict[str, Any]:
    out = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if usage_ is not None:
        out["usage"] = usage_
    return out


def model_card(name: str, created: int, max_model_len: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "openk2", "max_model_len": max_model_len}
