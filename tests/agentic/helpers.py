"""Shared builders for the agentic tests: a small repository and scripted LLM replies."""

from __future__ import annotations

import json

from openk2.agentic.repository import ToolRepository
from openk2.agentic.tools import validate_tool


def tool(name: str, description: str, domain: str, **props: str) -> dict:
    return {"name": name, "description": description, "domain": domain,
            "parameters": {"type": "object", "properties": {p: {"type": t} for p, t in props.items()},
                           "required": list(props)}}


def small_repository() -> ToolRepository:
    specs = [
        tool("get_quote", "Latest price quote of a stock ticker.", "finance/trading", ticker="string"),
        tool("place_order", "Place a buy or sell order for shares.", "finance/trading", ticker="string",
             shares="integer"),
        tool("cancel_trade", "Cancel an open trade order.", "finance/trading", order_id="string"),
        tool("get_balance", "Balance of a bank account.", "finance/banking", account="string"),
        tool("transfer_money", "Move money between two accounts.", "finance/banking", source="string",
             target="string", amount="number"),
        tool("move_arm", "Move the robot arm joint to an angle.", "robotics/arm", joint="string", angle="number"),
        tool("read_sensor", "Read a robot sensor value.", "robotics/sensors", sensor="string"),
        tool("calibrate_gripper", "Calibrate the gripper force.", "robotics/arm", force="number"),
    ]
    return ToolRepository([validate_tool(s, domain=s["domain"], source="synthetic:test") for s in specs])


def call(name: str, args: dict, cid: str = "call_1") -> dict:
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def _value(schema: dict):
    t = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    return {"string": "x", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}.get(t, "x")


def fake_llm(endpoint: str, payload: dict, *, fail_user: bool = False) -> str | dict:
    """A deterministic stand-in for every LLM role of the pipeline, recognised by its prompt."""
    from openk2.agentic.simulate import STOP
    from openk2.llm import chat_response

    msgs = payload["messages"]
    first = msgs[0]["content"] or ""
    if payload.get("tools"):  # the agent
        tools = payload["tools"]
        if msgs[-1]["role"] == "user":
            fn = tools[0]["function"]
            args = {p: _value(s) for p, s in fn["parameters"].get("properties", {}).items()}
            n = sum(len(m.get("tool_calls") or []) for m in msgs)
            return chat_response(None, [{"id": f"call_{n}", "type": "function",
                                         "function": {"name": fn["name"], "arguments": json.dumps(args)}}])
        return f"Done: {msgs[-1]['content']}"
    if first.startswith("You design evaluation tasks"):
        tools = json.loads(first.split("Its tools (OpenAI JSON schemas): ")[1].split("\n")[0])
        fn = tools[0]["function"]
        args = {p: _value(s) for p, s in fn["parameters"].get("properties", {}).items()}
        level = first.split("distinct ")[1].split(" tasks")[0]
        return json.dumps({"tasks": [{"instruction": f"You want to use {fn['name']} ({level}).", "persona": "calm",
                                      "user_facts": {}, "rubric": {"success_criteria": ["it is done"],
                                                                   "expected_tools": [fn["name"]]},
                                      "gold_actions": [{"name": fn["name"], "arguments": args}]}]})
    if first.startswith("You simulate the backend"):
        state = json.loads(first.split("Current state of the backend (JSON): ")[1].split("\n")[0])
        state["calls"] = state.get("calls", 0) + 1
        return json.dumps({"result": {"ok": True}, "state": state})
    if first.startswith("You play a user"):
        if fail_user:
            raise RuntimeError("user simulator down")
        return "Please help me with my request." if len(msgs) <= 2 else STOP
    if first.startswith("You grade a conversation"):
        return json.dumps({"criteria": [], "score": 0.9, "pass": True, "reason": "fine"})
    if first.startswith("List "):
        cat = first.split('category "')[1].split('"')[0]
        return json.dumps({"domains": [{"name": f"{cat} desk", "description": "d"},
                                       {"name": f"{cat} desk", "description": "dup"}]})
    if first.startswith("Design "):
        dom = first.split('domain "')[1].split('"')[0]
        return json.dumps({"tools": [
            {"name": f"{dom}_lookup", "description": f"Look up a record in {dom}.",
             "parameters": {"type": "object", "properties": {"record_id": {"type": "string"}},
                            "required": ["record_id"]}},
            {"name": f"{dom}_lookup_record", "description": f"Look up a record in {dom}.",
             "parameters": {"type": "object", "properties": {"record_id": {"type": "string"}}}},
            {"name": f"{dom}_broken", "description": "Broken.", "parameters": {"type": "object",
                                                                              "required": ["nope"]}},
            {"name": f"{dom}_update", "description": f"Update the status of a {dom} ticket.",
             "parameters": {"type": "object", "properties": {"ticket": {"type": "string"},
                                                             "status": {"type": "string"}}}}]})
    raise AssertionError(f"unexpected prompt: {first[:80]}")
