"""The published contract: `/openapi.json`, generated from the pydantic request models in `protocol` (and
`responses`) and the response models below, so that clients, SDK generators and fuzzers read the same types
the server enforces.

The response models describe exactly the dicts `protocol` builds (the tests validate real responses against
them); openk2's own additions (`tool_call_error`, `max_model_len`) are declared fields. Unknown fields are
allowed, as in OpenAI's own schema. The request schemas' `model` is the one model this server serves.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from openk2.serve import protocol as P

REF = "#/components/schemas/{model}"


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int = Field(description="context length in tokens (prompt + completion)")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "stopped"]
    model: str
    active: int
    waiting: int
    max_batch: int
    max_model_len: int
    submitted: int
    completed: int
    cancelled: int
    errors: int
    decode_steps: int
    mean_batch: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None


class ToolCallFunctionOut(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object in a string")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"]
    function: ToolCallFunctionOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason
    tool_call_error: str | None = Field(None, description="openk2: why a tool-call section came back as content")


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    prompt_token_ids: list[int] | None = Field(None, description="vLLM extension (return_token_ids)")
    token_ids: list[int] | None = Field(None, description="vLLM extension (return_token_ids): the generated ids")


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None


# With `stream: true`, server-sent events. In OpenAPI 3.1 the event-stream `schema` describes one event.
_STREAM = {"text/event-stream": {"schema": {
    "type": "object", "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a JSON chunk (the response object with `choices` "
                                                                "holding deltas), an error object, or `[DONE]` last"},
                   "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}}}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    why = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or route",
           413: "request body too large", 500: "internal error",
           503: "overloaded right now (see Retry-After) or shutting down"}
    return {s: {"model": ErrorResponse, "description": why[s]} for s in statuses}


def generation_responses(model: type[BaseModel], *, stream: bool = True) -> dict[int | str, dict[str, Any]]:
    ok: dict[str, Any] = {"model": model, "description": "the result"}
    if stream:
        ok["content"] = _STREAM
    return {200: ok, **error_responses(400, 401, 404, 413, 500, 503)}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses its own body (for OpenAI-style errors) as `model`."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": REF.format(model=model.__name__)}}}}}


REQUEST_MODELS: list[type[BaseModel]] = [P.ChatCompletionRequest, P.CompletionRequest]


def install_openapi(app: FastAPI, model_name: str, api_key: bool, extra_models: list[type[BaseModel]]) -> None:
    """Serve `/openapi.json` built from the routes plus the request models (cached after the first call)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title="openk2", version="1", routes=app.routes,
                             description="OpenAI-compatible API of `openk2 serve`")
        _, defs = models_json_schema([(m, "validation") for m in REQUEST_MODELS + extra_models], ref_template=REF)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, sub in defs.get("$defs", {}).items():
            components.setdefault(name, sub)
        for m in REQUEST_MODELS + extra_models:  # the one model id this server accepts
            props = components[m.__name__].get("properties", {})
            if "model" in props:
                props["model"] = {"type": "string", "enum": [model_name], "title": "Model"}
        if api_key:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema["paths"].items():
                if path.startswith("/v1/"):
                    for op in ops.values():
                        op["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
