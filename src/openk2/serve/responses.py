"""The OpenAI Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`), as vLLM and SGLang serve it.

A response request is translated into a chat request and served by `OpenAIService` (the same validation,
template, tool-call parsing and engine), then its result is reshaped into Responses output items:

- `input` is a string (one user message) or a list of items: messages (roles user, assistant, system,
  developer; content a string or `input_text`/`output_text` parts), `function_call` items (consecutive ones,
  and one right after an assistant message, form that assistant turn's tool calls) and `function_call_output`
  items (tool messages answering `call_id`). `instructions` becomes the system message; as in OpenAI's API it is
  not carried over by `previous_response_id`.
- Function tools (`{"type": "function", "name", "parameters"}`) and `tool_choice` ("auto", "none", "required",
  `{"type": "function", "name"}`) mean what they mean for chat. A tool call comes back as a `function_call` item
  whose `call_id` is K2's own id (`functions.NAME:IDX`).
- `max_output_tokens` is chat's `max_tokens`; a response cut by it has status "incomplete".
- `previous_response_id` continues a stored response: its input items and output items come before the new
  input. Responses are stored (unless `store: false`) in a bounded in-memory LRU store (`store_size` entries);
  an id that is unknown or was evicted is a 400 naming `previous_response_id`.
- With `stream: true` the events are OpenAI's: `response.created`, `response.in_progress`,
  `response.output_item.added`, `response.content_part.added`, `response.output_text.delta`/`.done`,
  `response.content_part.done`, `response.function_call_arguments.delta`/`.done`, `response.output_item.done`,
  then `response.completed` (or `response.incomplete`); an error after the first byte is an `error` event.
"""

from __future__ import annotations

import collections
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag

from openk2.serve.protocol import APIError, _Model, parse_request
from openk2.serve.service import OpenAIService, _Job

DEFAULT_STORE_SIZE = 1024


# ---------------------------------------------------------------------------------------------- requests
class TextPart(_Model):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[TextPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[TextPart]
    id: str | None = None
    status: str | None = None


def _item_kind(value: Any) -> str:
    # A message item may leave out "type" (OpenAI's "easy input message").
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "invalid"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")] | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_kind),
]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Model):
    type: Literal["function"]
    name: str


class TextFormat(_Model):
    type: Literal["text"] = Field(description="only plain text output is supported")


class TextConfig(_Model):
    format: TextFormat | None = None


class ResponsesRequest(_Model):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="0 or below 1e-5: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_output_tokens: int | None = None
    stream: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    user: str | None = None
    skip_special_tokens: bool = True


# ---------------------------------------------------------------------------------------------- responses
class OutputText(BaseModel):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]]


class OutputMessage(BaseModel):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: dict[str, int]
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["in_progress", "completed", "incomplete"]
    error: dict[str, Any] | None
    incomplete_details: dict[str, str] | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float
    top_p: float
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    truncation: str
    usage: ResponseUsage | None
    user: str | None
    metadata: dict[str, str]


@dataclass
class _ResponseJob:
    id: str
    created: int
    req: ResponsesRequest
    chat: _Job
    items: list[dict[str, Any]]  # the conversation as input items: stored history + this request's input


@dataclass
class _Stored:
    response: dict[str, Any]
    items: list[dict[str, Any]]  # input items followed by the response's output items


class ResponsesAPI:
    """`/v1/responses` over an `OpenAIService`, with a bounded store for `previous_response_id`."""

    def __init__(self, service: OpenAIService, store_size: int = DEFAULT_STORE_SIZE) -> None:
        self.service = service
        self.store_size = store_size
        self._store: collections.OrderedDict[str, _Stored] = collections.OrderedDict()

    # ------------------------------------------------------------------ store
    def get(self, response_id: str) -> dict[str, Any]:
        stored = self._store.get(response_id)
        if stored is None:
            raise APIError(404, f"no stored response with id {response_id!r}", type="not_found_error",
                           param="response_id", code="response_not_found")
        self._store.move_to_end(response_id)
        return stored.response

    def _save(self, job: _ResponseJob, response: dict[str, Any]) -> None:
        if job.req.store is False:
            return
        self._store[job.id] = _Stored(response, job.items + response["output"])
        while len(self._store) > self.store_size:  # least recently used first
            self._store.popitem(last=False)

    # ------------------------------------------------------------------ requests
    def prepare(self, body: Any) -> _ResponseJob:
        req: ResponsesRequest = parse_request(ResponsesRequest, body)
        self.service._check_model(req.model)
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            stored = self._store.get(req.previous_response_id)
            if stored is None:
                raise APIError(400, f"previous response {req.previous_response_id!r} not found (unknown, stored "
                                    f"with store: false, or evicted from the {self.store_size}-entry store)",
                               param="previous_response_id", code="previous_response_not_found")
            self._store.move_to_end(req.previous_response_id)
            history = stored.items
        if isinstance(req.input, str):
            new = [{"type": "message", "role": "user", "content": req.input}]
        else:
            new = [item.model_dump(exclude_none=True) for item in req.input]
        items = history + new
        chat = {"model": req.model, "messages": _messages(req.instructions, items), "n": 1,
                "temperature": req.temperature, "top_p": req.top_p, "max_tokens": req.max_output_tokens,
                "skip_special_tokens": req.skip_special_tokens}
        if req.tools:
            chat["tools"] = [{"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type",
                                                                                                       "strict"})}
                             for t in req.tools]
        if req.tool_choice is not None:
            chat["tool_choice"] = (req.tool_choice if isinstance(req.tool_choice, str)
                                   else {"type": "function", "function": {"name": req.tool_choice.name}})
        try:
            job = self.service.prepare_chat(chat)
        except APIError as e:
            e.param = _responses_param(e.param)
            raise
        return _ResponseJob(f"resp_{uuid.uuid4().hex}", int(time.time()), req, job, items)

    def _response(self, job: _ResponseJob, output: list[dict[str, Any]], status: str,
                  usage: dict[str, int] | None) -> dict[str, Any]:
        req = job.req
        choice = req.tool_choice
        return {
            "id": job.id, "object": "response", "created_at": job.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.service.model_name, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p, "text": {"format": {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, BaseModel) else (choice or "auto"),
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []], "truncation": "disabled",
            "usage": None if usage is None else {
                "input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage["total_tokens"]},
            "user": req.user, "metadata": req.metadata or {},
        }

    async def run(self, job: _ResponseJob) -> dict[str, Any]:
        result = await self.service.run_chat(job.chat)
        choice = result["choices"][0]
        msg = choice["message"]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        output = []
        if msg["content"] or not msg.get("tool_calls"):
            output.append(_message_item(f"msg_{uuid.uuid4().hex}", msg["content"] or "", status))
        output += [_call_item(c, "completed") for c in msg.get("tool_calls") or []]
        response = self._response(job, output, status, result["usage"])
        self._save(job, response)
        return response

    async def stream(self, job: _ResponseJob) -> AsyncIterator[dict[str, Any]]:
        """The streaming events; each has `type` and `sequence_number`."""
        seq = itertools.count()

        def event(kind: str, **fields: Any) -> dict[str, Any]:
            return {"type": kind, "sequence_number": next(seq), **fields}

        started = self._response(job, [], "in_progress", None)
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        output: list[dict[str, Any]] = []
        message: dict[str, Any] | None = None
        text, calls, finish, usage = "", [], None, None

        def open_message() -> list[dict[str, Any]]:
            nonlocal message
            message = _message_item(f"msg_{uuid.uuid4().hex}", "", "in_progress")
            message["content"] = []
            output.append(message)
            where = {"item_id": message["id"], "output_index": len(output) - 1}
            return [event("response.output_item.added", output_index=where["output_index"], item=dict(message)),
                    event("response.content_part.added", **where, content_index=0, part=_text_part(""))]

        chunks = self.service.stream_chat(job.chat)
        try:
            async for chunk in chunks:
                usage = chunk.get("usage") or usage
                for c in chunk["choices"]:
                    piece = c["delta"].get("content") or ""
                    if piece:
                        if message is None:
                            for e in open_message():
                                yield e
                        text += piece
                        yield event("response.output_text.delta", item_id=message["id"],
                                    output_index=output.index(message), content_index=0, delta=piece, logprobs=[])
                    calls = c["delta"].get("tool_calls") or calls
                    finish = c["finish_reason"] or finish
        except APIError as e:
            yield event("error", code=e.code or e.type, message=e.message, param=e.param)
            return
        finally:
            await chunks.aclose()
        status = "incomplete" if finish == "length" else "completed"
        if message is None and not calls:
            for e in open_message():
                yield e
        if message is not None:
            where = {"item_id": message["id"], "output_index": output.index(message)}
            message["content"], message["status"] = [_text_part(text)], status
            yield event("response.output_text.done", **where, content_index=0, text=text, logprobs=[])
            yield event("response.content_part.done", **where, content_index=0, part=_text_part(text))
            yield event("response.output_item.done", output_index=where["output_index"], item=message)
        for call in calls:
            item = _call_item(call, "in_progress")
            output.append(item)
            where = {"item_id": item["id"], "output_index": len(output) - 1}
            yield event("response.output_item.added", output_index=where["output_index"],
                        item={**item, "arguments": ""})
            yield event("response.function_call_arguments.delta", **where, delta=item["arguments"])
            yield event("response.function_call_arguments.done", **where, name=item["name"],
                        arguments=item["arguments"])
            item["status"] = "completed"
            yield event("response.output_item.done", output_index=where["output_index"], item=item)
        response = self._response(job, output, status, usage)
        self._save(job, response)
        yield event("response.completed" if status == "completed" else "response.incomplete", response=response)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _call_item(call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def _text(content: str | list[dict[str, Any]]) -> str:
    return content if isinstance(content, str) else "".join(p["text"] for p in content)


def _messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the conversation `items`; function calls join the assistant turn they belong to."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    assistant_turn = False  # the last message is an assistant turn that following function calls extend
    for item in items:
        kind = item["type"]
        if kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if assistant_turn:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            assistant_turn = True
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": _text(item["output"])})
            assistant_turn = False
        else:
            messages.append({"role": item["role"], "content": _text(item["content"])})
            assistant_turn = item["role"] == "assistant"
    return messages


def _responses_param(param: str | None) -> str | None:
    """A chat request's parameter name as the Responses request calls it."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    if param == "max_tokens":
        return "max_output_tokens"
    return param.replace(".function.", ".")
