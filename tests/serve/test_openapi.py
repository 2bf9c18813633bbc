"""`/openapi.json` is generated from the request and response models, and real responses conform to it."""

from __future__ import annotations

import httpx

from openk2.serve import openapi as O
from openk2.serve.responses import ResponseObject
from openk2.serve.testing import SYSTEM, WEATHER_TOOL

MODEL = "toy-k2"


def _post(server, path: str, body: dict) -> dict:
    r = httpx.post(f"{server.base_url}{path}", json=body, timeout=60,
                   headers={"Authorization": f"Bearer {server.api_key}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_contract_is_published(server):
    spec = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    for path, request in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                          ("/v1/responses", "ResponsesRequest")]:
        op = spec["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + request)
        assert schemas[request]["properties"]["model"]["enum"] == [MODEL]
        assert {"200", "400", "401", "404", "503"} <= set(op["responses"])
        assert op["security"] == [{"bearer": []}]
    # Strict types are in the contract too: max_tokens is an integer (or null), never a string.
    assert {"type": "string"} not in schemas["CompletionRequest"]["properties"]["max_tokens"]["anyOf"]


def test_responses_conform_to_the_models(server):
    ask = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the weather in Paris?"}]
    chat = _post(server, "/chat/completions", {"model": MODEL, "temperature": 0, "logprobs": True, "top_logprobs": 2,
                                               "messages": ask, "tools": [WEATHER_TOOL]})
    assert chat["choices"][0]["message"]["tool_calls"]
    O.ChatCompletion.model_validate(chat, strict=True)
    completion = _post(server, "/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "echo": True,
                                                "logprobs": 2})
    O.Completion.model_validate(completion, strict=True)
    response = _post(server, "/responses", {"model": MODEL, "input": "Hello", "instructions": SYSTEM})
    ResponseObject.model_validate(response, strict=True)
    models = httpx.get(f"{server.base_url}/models", headers={"Authorization": f"Bearer {server.api_key}"}).json()
    O.ModelList.model_validate(models, strict=True)
    O.Health.model_validate(httpx.get(f"{server.url}/health").json(), strict=True)
