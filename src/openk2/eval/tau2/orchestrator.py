"""τ²-bench orchestrator: agent ↔ user simulator ↔ environment, half-duplex turns with native (OpenAI-format)
tool calls, the reference's limits (200 steps, 10 errors) and the user's stop signals.

The agent and the user simulator are `ChatFn`s (messages, tools) -> assistant message. The agent sees the domain
policy as its system prompt and its own tools; the user simulator sees the shipped simulation guidelines plus the
task's scenario, the conversation with roles flipped, and (telecom) its phone tools. The transcript is kept in
the agent's perspective (OpenAI format); user-side tool calls are stored as `user` messages with `tool_calls`
and their results as `tool` messages with `"requestor": "user"`.

Termination reasons: `user_stop` (###STOP###, ###TRANSFER### or ###OUT-OF-SCOPE### in the user's text),
`max_steps`, `too_many_errors` (tool calls that returned an error, agent and user side), `agent_error` /
`user_error` (a message with neither text nor tool calls, or a chat call that raised).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openk2.eval.task import ChatFn, Message
from openk2.eval.tau2.env import Tau2Env
from openk2.eval.tau2.tasks import DEFAULT_DATA_DIR

STOP, TRANSFER, OUT_OF_SCOPE = "###STOP###", "###TRANSFER###", "###OUT-OF-SCOPE###"
FIRST_AGENT_MESSAGE = "Hi! How can I help you today?"
MAX_STEPS, MAX_ERRORS = 200, 10

AGENT_INSTRUCTION = """
You are a customer service agent that helps the user according to the <policy> provided below.
In each turn you can either:
- Send a message to the user.
- Make a tool call.
You cannot do both at the same time.

Try to be helpful and always follow the policy. Always make sure you generate valid JSON only.
""".strip()


def agent_system_prompt(policy: str) -> str:
    return f"<instructions>\n{AGENT_INSTRUCTION}\n</instructions>\n<policy>\n{policy}\n</policy>"


def user_system_prompt(env: Tau2Env, data_dir: Path | None = None) -> str:
    name = "simulation_guidelines_tools.md" if env.user_tools is not None else "simulation_guidelines.md"
    guidelines = (Path(data_dir or DEFAULT_DATA_DIR) / "tau2" / "user_simulator" / name).read_text()
    return f"{guidelines}\n<scenario>\n{env.task.user_scenario}\n</scenario>"


def is_user_stop(text: str | None) -> bool:
    return bool(text) and (STOP in text or TRANSFER in text or OUT_OF_SCOPE in text)


def parse_arguments(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """A tool call's arguments as a dict, or (None, error text) for malformed JSON / a non-object."""
    if raw is None or raw == "":
        return {}, None
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            return None, f"Error: arguments are not valid JSON: {e}"
    if not isinstance(raw, dict):
        return None, f"Error: arguments must be a JSON object, got {type(raw).__name__}"
    return raw, None


def client_chat(client: Any, **params: Any) -> ChatFn:
    """A `ChatFn` over an `openk2.llm.LLMClient` (an `openk2 serve` endpoint, a local openk2 model, a replay),
    with fixed sampling parameters (temperature, max_tokens, ...)."""

    async def chat(messages: list[Message], tools: list[dict[str, Any]] | None) -> Message:
        return (await client.chat(messages, tools=tools, **params)).message

    return chat


@dataclass
class Episode:
    transcript: list[Message] = field(default_factory=list)
    termination: str | None = None
    steps: int = 0
    errors: int = 0
    error: str | None = None  # what ended an agent_error / user_error episode


def agent_view(transcript: list[Message]) -> list[Message]:
    """The agent's messages: everything except the user's tool calls and their results."""
    out = []
    for m in transcript:
        if m.get("requestor") == "user":
            continue
        if m["role"] == "user" and m.get("tool_calls"):
            if m.get("content"):
                out.append({"role": "user", "content": m["content"]})
            continue
        out.append({k: v for k, v in m.items() if k not in ("requestor", "error")})
    return out


def user_view(transcript: list[Message]) -> list[Message]:
    """The user simulator's messages with roles flipped: the agent's texts become `user`, the user's own turns
    `assistant`, its tool results `tool`; the agent's tool calls and results are hidden."""
    out: list[Message] = []
    for m in transcript:
        if m["role"] == "assistant":
            if m.get("content") and not m.get("tool_calls"):  # the agent's tool calls go to the environment
                out.append({"role": "user", "content": m["content"]})
        elif m["role"] == "user":
            flipped: Message = {"role": "assistant", "content": m.get("content")}
            if m.get("tool_calls"):
                flipped["tool_calls"] = m["tool_calls"]
            out.append(flipped)
        elif m["role"] == "tool" and m.get("requestor") == "user":
            out.append({"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": m["content"]})
    return out


async def run_episode(env: Tau2Env, agent: ChatFn, user: ChatFn, max_steps: int = MAX_STEPS,
                      max_errors: int = MAX_ERRORS, data_dir: Path | None = None) -> Episode:
    """Run one conversation on `env` (already set up for its task) until a stop signal or a limit."""
    ep = Episode(transcript=[{"role": "assistant", "content": FIRST_AGENT_MESSAGE}])
    agent_system = {"role": "system", "content": agent_system_prompt(env.policy)}
    user_system = {"role": "system", "content": user_system_prompt(env, data_dir)}
    agent_tools, user_tools = env.tool_schemas(), env.user_tool_schemas()
    to = "user"
    while ep.termination is None:
        if to == "user":
            try:
                msg = await user([user_system, *user_view(ep.transcript)], user_tools)
            except Exception as e:  # a failing user model ends the episode with a recorded reason
                ep.termination, ep.error = "user_error", f"{type(e).__name__}: {e}"
                break
            calls = msg.get("tool_calls") or []
            entry: Message = {"role": "user", "content": msg.get("content")}
            if calls:
                entry["tool_calls"] = calls
            ep.transcript.append(entry)
            if not calls and not msg.get("content"):
                ep.termination, ep.error = "user_error", "user message with neither text nor tool calls"
                break
            if not calls and is_user_stop(msg.get("content")):
                ep.termination = "user_stop"
            elif calls:
                ep.steps += 1
                ep.transcript.extend(_run_tools(env, calls, "user", ep))
                to = "user"
            else:
                to = "agent"
        else:
            try:
                msg = await agent([agent_system, *agent_view(ep.transcript)], agent_tools)
            except Exception as e:
                ep.termination, ep.error = "agent_error", f"{type(e).__name__}: {e}"
                break
            calls = msg.get("tool_calls") or []
            entry = {"role": "assistant", "content": msg.get("content")}
            if calls:
                entry["tool_calls"] = calls
            ep.transcript.append(entry)
            if not calls and not msg.get("content"):
                ep.termination, ep.error = "agent_error", "agent message with neither text nor tool calls"
                break
            if calls:
                ep.steps += 1
                ep.transcript.extend(_run_tools(env, calls, "assistant", ep))
                to = "agent"
            else:
                to = "user"
        ep.steps += 1
        if ep.termination is None and ep.steps >= max_steps:
            ep.termination = "max_steps"
        if ep.termination is None and ep.errors >= max_errors:
            ep.termination = "too_many_errors"
    return ep


def _run_tools(env: Tau2Env, calls: list[dict[str, Any]], requestor: str, ep: Episode) -> list[Message]:
    out = []
    for i, call in enumerate(calls):
        fn = call.get("function") or {}
        name = fn.get("name") or ""
        args, error = parse_arguments(fn.get("arguments"))
        if error is None:
            text = (env.user_call if requestor == "user" else env.call)(name, args)
            error = env.last_error
        else:
            text, error = error, True
        ep.errors += bool(error)
        message: Message = {"role": "tool", "tool_call_id": call.get("id") or f"call_{len(ep.transcript)}_{i}",
                            "name": name, "content": text}
        if requestor == "user":
            message["requestor"] = "user"
        if error:
            message["error"] = True
        out.append(message)
    return out
