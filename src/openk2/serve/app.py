"""The HTTP server: FastAPI routes over `OpenAIService`, OpenAI-style errors, auth, and disconnect handling.

Routes: `GET /health`, `GET /v1/models`, `GET /v1/models/{model}`, `POST /v1/chat/completions`,
`POST /v1/completions` (both with `stream: true` as server-sent events ending in `data: [DONE]`), and
`POST /v1/responses` and `GET /v1/responses/{id}` (the Responses API, `serve/responses.py`), and
`GET /openapi.json`, the contract generated from the request and response models (`serve/openapi.py`).

Every error is `{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON and invalid requests,
401 for a missing/wrong API key (when the server has one), 404 for unknown models and routes, 405, 413 for
oversized bodies, 503 with `Retry-After` when overloaded right now, 500 for anything unexpected (the server keeps
running). A 405 carries `Allow`. Everything is validated before a streamed response starts; after that, an error
is an OpenAI-style error event followed by `data: [DONE]`. A client that
disconnects, streaming or not, cancels its generations, which frees their cache rows at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openk2.serve import openapi as O
from openk2.serve import protocol as P
from openk2.serve.openapi import install_openapi
from openk2.serve.protocol import MAX_JSON_DEPTH, APIError, check_json_value, error_body
from openk2.serve.responses import ResponseObject, ResponsesAPI, ResponsesRequest
from openk2.serve.service import OpenAIService

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 2**20


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def create_app(service: OpenAIService, api_key: str | None = None, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. With `manage_engine`, the app's lifespan starts and stops the engine."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            service.start()
        try:
            yield
        finally:
            if manage_engine:
                service.stop()

    app = FastAPI(title="openk2", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.service = service
    responses_api = app.state.responses = ResponsesAPI(service)
    install_openapi(app, service.model_name, api_key is not None, extra_models=[ResponsesRequest])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        # Keep the exception's headers: a 405 must say which methods are allowed (`Allow`, RFC 9110 15.5.6).
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, f"invalid request: {exc.errors()}")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {exc!r}", "server_error")

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes")
        try:
            obj = json.loads(body, parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
        check_json_value(obj)
        return obj

    @app.get("/health", response_model=None, responses={200: {"model": O.Health}})
    async def health() -> dict[str, Any]:
        return service.health()

    @app.get("/v1/models", response_model=None, responses={200: {"model": O.ModelList}, **O.error_responses(401)})
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return service.models()

    @app.get("/v1/models/{model:path}", response_model=None,
             responses={200: {"model": O.ModelCard}, **O.error_responses(401, 404)})
    async def model(model: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        return service.model(model)

    @app.post("/v1/chat/completions", responses=O.generation_responses(O.ChatCompletion),
              openapi_extra=O.request_body(P.ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        check_auth(request)
        job = service.prepare_chat(await read_json(request))
        if job.stream:
            return _sse(service.stream_chat(job))
        return await _unless_disconnected(request, lambda: service.run_chat(job))

    @app.post("/v1/completions", responses=O.generation_responses(O.Completion),
              openapi_extra=O.request_body(P.CompletionRequest))
    async def completions(request: Request) -> Response:
        check_auth(request)
        job = service.prepare_completion(await read_json(request))
        if job.stream:
            return _sse(service.stream_completion(job))
        return await _unless_disconnected(request, lambda: service.run_completion(job))

    @app.post("/v1/responses", responses=O.generation_responses(ResponseObject),
              openapi_extra=O.request_body(ResponsesRequest))
    async def responses(request: Request) -> Response:
        check_auth(request)
        job = responses_api.prepare(await read_json(request))
        if job.req.stream:
            return _sse(responses_api.stream(job), named_events=True)
        return await _unless_disconnected(request, lambda: responses_api.run(job))

    @app.get("/v1/responses/{response_id}", response_model=None,
             responses={200: {"model": ResponseObject}, **O.error_responses(401, 404)})
    async def get_response(response_id: str, request: Request) -> dict[str, Any]:
        check_auth(request)
        return responses_api.get(response_id)

    return app


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259) and would slip past range checks.
    raise APIError(400, f"the request body is not valid JSON: {name} is not a JSON number")


def _sse(chunks: AsyncIterator[dict[str, Any]], named_events: bool = False) -> StreamingResponse:
    """Server-sent events. Chat and completions: `data:` lines ending with `data: [DONE]`. Responses
    (`named_events`): `event: <type>` before each `data:`, and no [DONE], as OpenAI sends them."""

    def error_event(e: APIError) -> str:
        if named_events:
            body = {"type": "error", "code": e.code or e.type, "message": e.message, "param": e.param}
            return f"event: error\ndata: {json.dumps(body)}\n\n"
        return f"data: {json.dumps(e.body())}\n\n"

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                name = f"event: {chunk['type']}\n" if named_events else ""
                yield f"{name}data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:  # after the headers went out, an error can only be an event
            yield error_event(e)
        except Exception as e:
            log.exception("stream failed")
            yield error_event(APIError(500, f"internal error: {e!r}", type="server_error"))
        finally:
            # On disconnect Starlette cancels this generator; closing the chunks cancels the generations.
            await chunks.aclose()
        if not named_events:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _unless_disconnected(request: Request, run: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """The JSON response of `run()`, which is cancelled (and so are its generations) if the client disconnects
    first; then the response (status 499, nginx's "client closed request") goes nowhere."""
    work = asyncio.ensure_future(run())

    async def watch() -> None:
        # The body has been read, so the next ASGI message is the disconnect (uvicorn sends it when the
        # connection drops, or once our response is complete).
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
    if work.cancelled():
        return Response(status_code=499)
    return JSONResponse(work.result())
