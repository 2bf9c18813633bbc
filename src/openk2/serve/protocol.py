"""The OpenAI wire format: pydantic request models, request validation, and response builders.

Requests are strict pydantic models (unknown fields are ignored, as clients send many optional ones; known ones
must have OpenAI's JSON types, with no coercion of strings or booleans into numbers); semantic checks
that pydantic cannot express (tool schemas, logit bias keys, unsupported options) live in the `check_*`
functions here and raise `APIError`, which the app turns into an OpenAI error body. Responses are plain dicts
built by the functions at the end, so their shape (including explicit nulls) is exactly OpenAI's; the tests
parse them with the official `openai` client.

openk2 extensions (send them with the `openai` client's `extra_body`):
- `ignore_eos` (chat and completions): do not stop at the end-of-turn / end-of-document tokens.
- `skip_special_tokens` (both, default true, as in vLLM): special tokens such as `[BOS]` or `<|im_end|>` that
  the model generates are left out of the returned text; false keeps them. (A malformed tool-call section that
  comes back as content keeps its markers either way: it is returned raw so the client can see what failed.)
- `add_bos` (completions): prepend `[BOS]` to the prompt; the default is true for text prompts (pretraining
  documents start with `[BOS]`) and false for token-id prompts, which are used verbatim.
- Token-in/token-out for RL rollouts (completions; vLLM's fields): `stop_token_ids` (more token ids that end a
  choice; with `ignore_eos` they are the only ones), `return_token_ids` (each choice carries `prompt_token_ids`
  (in the first streamed chunk) and `token_ids`, the generated ids, a stop token included, and the logprobs,
  when asked for, cover exactly those ids), `return_tokens_as_token_ids` (logprob tokens as "token_id:{id}").
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_N = 16
MAX_STOP = 4
MAX_LOGIT_BIAS = 300  # OpenAI's limit; the bias is applied at every step, so its size must be bounded
MAX_TOP_LOGPROBS = 20
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1  # OpenAI's seed is an int64
_TOOL_NAME_RE = re.compile(r"[\w.]{1,64}")  # K2 call ids `functions.NAME:IDX` must parse back ([\w.]+)
_JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class APIError(Exception):
    """An error returned to the client as `{"error": {...}}` with HTTP status `status` (and `headers`, e.g.
    `Retry-After` on a 503)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Model(BaseModel):
    # strict: JSON types as the OpenAI reference has them ("max_tokens": "2", "stream": "false", "seed": true and
    # "logprobs": false for an integer are 400s, not coerced); an integer is still a valid number.
    model_config = ConfigDict(extra="ignore", strict=True)


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
    include_usage: bool | None = None


class _Sampling(_Model):
    """Fields both endpoints share. As in OpenAI's reference, the optional ones may also be sent as null,
    which means the default (the `resolved_*` properties)."""

    model: str
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or below 1e-5: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="the most likely token is always kept")
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=MIN_SEED, le=MAX_SEED)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, description="only 0 is supported")
    user: str | None = None
    ignore_eos: bool = Field(False, description="openk2/vLLM extension: do not stop at end-of-turn tokens")
    skip_special_tokens: bool = Field(True, description="vLLM extension: leave special tokens out of the text")

    @property
    def resolved_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    @property
    def resolved_top_p(self) -> float:
        return 1.0 if self.top_p is None else self.top_p

    @property
    def resolved_n(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    add_bos: bool | None = None
    stop_token_ids: list[int] | None = Field(None, description="vLLM extension: token ids that end a choice")
    return_token_ids: bool | None = Field(None, description="vLLM extension: prompt_token_ids and token_ids per "
                                                            "choice")
    return_tokens_as_token_ids: bool | None = Field(None, description="vLLM extension: logprob tokens as "
                                                                      "'token_id:{id}'")


MAX_JSON_DEPTH = 64
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


def check_json_value(obj: Any, max_depth: int = MAX_JSON_DEPTH) -> None:
    """Reject what JSON allows but no request needs: nesting deeper than `max_depth` (deep structures make
    recursive code downstream, from deepcopy to rendering, raise RecursionError) and lone UTF-16 surrogates
    ("\\ud800", which no tokenizer can encode). Iterative, so it is safe on any input."""
    stack: list[tuple[Any, int, str]] = [(obj, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, str):
            if _SURROGATE_RE.search(value):
                raise APIError(400, f"'{path or 'body'}' contains a lone UTF-16 surrogate, which is not valid "
                                    f"Unicode text", param=path or None)
            continue
        if not isinstance(value, dict | list):
            continue
        if depth > max_depth:
            raise APIError(400, f"the request body is nested deeper than {max_depth} levels", param=path or None)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, sub in items:
            sub_path = f"{path}.{key}" if path else str(key)
            if isinstance(key, str) and _SURROGATE_RE.search(key):
                raise APIError(400, f"a key in '{path or 'body'}' contains a lone UTF-16 surrogate", param=path or None)
            stack.append((sub, depth + 1, sub_path))


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
    if req.presence_penalty or req.frequency_penalty:  # None and 0 mean no penalty
        raise APIError(400, "presence_penalty and frequency_penalty are not supported", param="presence_penalty")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop sequences are allowed", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must be non-empty", param="stop")
    bias: list[tuple[int, float]] = []
    if len(req.logit_bias or {}) > MAX_LOGIT_BIAS:
        raise APIError(400, f"logit_bias may have at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
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
        bad = [x for x in types if not isinstance(x, str) or x not in _JSON_TYPES]  # {"type": {}} is unhashable
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
