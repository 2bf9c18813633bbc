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
