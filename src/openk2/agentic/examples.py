"""A small executable tool domain (an order desk) for tests and for `openk2 synth run --executor` without the
world domain: three Python tools over a state dict, with a gold-checkable task."""

from __future__ import annotations

from typing import Any

from openk2.agentic.agents import Agent, template_prompt
from openk2.agentic.simulate import PythonToolLayer
from openk2.agentic.tasks import Rubric, Task

INITIAL_ORDERS = {"A1": {"item": "kettle", "status": "shipped"}, "B2": {"item": "lamp", "status": "pending"},
                  "C3": {"item": "chair", "status": "pending"}}


def get_order(order_id: str, state: dict) -> dict[str, Any]:
    """Look up an order by its id.

    Args:
        order_id: The order id, e.g. "A1".
    """
    if order_id not in state["orders"]:
        raise KeyError(f"no order {order_id!r}")
    return {"order_id": order_id, **state["orders"][order_id]}


def list_orders(state: dict, status: str | None = None) -> list[str]:
    """List order ids, optionally only those with a given status.

    Args:
        status: Only orders with this status ("pending", "shipped", "cancelled").
    """
    return sorted(k for k, v in state["orders"].items() if status is None or v["status"] == status)


def cancel_order(order_id: str, state: dict) -> str:
    """Cancel a pending order.

    Args:
        order_id: The order to cancel.
    """
    order = state["orders"].get(order_id)
    if order is None:
        raise KeyError(f"no order {order_id!r}")
    if order["status"] != "pending":
        raise ValueError(f"order {order_id} is {order['status']}; only pending orders can be cancelled")
    order["status"] = "cancelled"
    return f"order {order_id} cancelled"


def order_desk() -> PythonToolLayer:
    return PythonToolLayer([get_order, list_orders, cancel_order], {"orders": INITIAL_ORDERS}, domain="retail/orders")


def order_desk_agent(layer: PythonToolLayer | None = None) -> Agent:
    layer = layer or order_desk()
    specs = list(layer.specs.values())
    return Agent(id="agent-order-desk", domain="retail/orders", system_prompt=template_prompt("retail/orders", specs),
                 tools=[s.name for s in specs], seed=7)


def order_desk_tasks(agent_id: str = "agent-order-desk") -> list[Task]:
    return [Task(id="cancel-B2", agent_id=agent_id, instruction="You want to cancel your lamp order.",
                 rubric=Rubric(["order B2 is cancelled", "the user is told"], ["cancel_order"],
                               ["asks for or finds the order id"]),
                 difficulty="multi_step", persona="a busy customer", user_facts={"order_id": "B2"},
                 gold_actions=[{"name": "cancel_order", "arguments": {"order_id": "B2"}}],
                 expected_outputs=["cancelled"], seed=11),
            Task(id="status-A1", agent_id=agent_id, instruction="You want to know where your kettle order is.",
                 rubric=Rubric(["the user learns the order is shipped"], ["get_order"]),
                 difficulty="simple", user_facts={"order_id": "A1"}, gold_actions=[], expected_outputs=["shipped"],
                 seed=12)]
