"""τ²-bench environments: one domain's database(s) and tools set up for one task.

    env = make_env("retail", "0")
    env.call("find_user_id_by_email", {"email": "..."})   # -> the tool's text, or "Error: ..."
    env.user_call("toggle_airplane_mode", {})             # telecom: the simulated user's phone
    env.state()                                           # {"db": ..., "user_db": ...} JSON-ready
    env.db_hash(), env.user_db_hash()                     # canonical hashes the DB reward compares

`call` never raises for a model's bad call: unknown tools, missing/unexpected/mistyped arguments and tool
errors all come back as the reference's `Error: ...` text (and `last_error` is set, for the error limit).
Telecom syncs the user's phone with the network after every tool call and every initialization action.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from openk2.eval.tau2 import airline, retail, telecom, telecom_device, telecom_user
from openk2.eval.tau2.tasks import EnvAssertion, EnvFunctionCall, Task, domain_dir, get_task
from openk2.eval.tau2.toolkit import ToolKit, to_text, update_model


@cache
def _db_text(path: str) -> str:
    return Path(path).read_text()


@cache
def _toml(path: str) -> dict[str, Any]:
    return tomllib.loads(_db_text(path))


def _policy(domain: str, data_dir: Path | None) -> str:
    root = domain_dir(domain, data_dir)
    if domain != "telecom":
        return _db_text(str(root / "policy.md"))
    # the reference's telecom policy: main policy + tech-support manual
    return ("<main_policy>\n" + _db_text(str(root / "main_policy.md")) + "\n</main_policy>\n"
            + "<tech_support_policy>\n" + _db_text(str(root / "tech_support_manual.md"))
            + "\n</tech_support_policy>")


@cache
def _pristine(domain: str, data_dir: str) -> Any:
    """The validated shipped database, shared read-only by every environment of the process."""
    root = Path(data_dir)
    model = airline.FlightDB if domain == "airline" else retail.RetailDB
    return model.model_validate_json(_db_text(str(root / "db.json")))


def fresh_toolkits(domain: str, data_dir: Path | None = None) -> tuple[ToolKit, ToolKit | None]:
    """New agent (and, for telecom, user) toolkits over fresh copies of the shipped databases (airline and
    retail: copy-on-access views of one shared pristine database, see `ToolKit`)."""
    root = domain_dir(domain, data_dir)
    if domain in ("airline", "retail"):
        pristine = _pristine(domain, str(root))
        db = type(pristine).model_construct(**{f: dict(getattr(pristine, f)) for f in type(pristine).model_fields})
        kit = airline.AirlineTools if domain == "airline" else retail.RetailTools
        return kit(db, pristine), None
    db = telecom.TelecomDB.model_validate(_toml(str(root / "db.toml")))
    user_db = telecom_device.TelecomUserDB.model_validate(_toml(str(root / "user_db.toml")))
    return telecom.TelecomTools(db), telecom_user.TelecomUserTools(user_db)


class Tau2Env:
    """One task's environment (agent tools, optional user tools, policy)."""

    def __init__(self, domain: str, task: Task | None = None, data_dir: Path | None = None) -> None:
        self.domain = domain
        self.task = task
        self.policy = _policy(domain, data_dir)
        self.tools, self.user_tools = fresh_toolkits(domain, data_dir)
        self.last_error = False
        if task is not None and task.initial_state is not None:
            init = task.initial_state
            if init.initialization_data is not None:
                if init.initialization_data.agent_data:
                    self.tools.db = update_model(self.tools.db, init.initialization_data.agent_data)
                    self.tools.pristine = None  # a rebuilt database shares nothing
                if init.initialization_data.user_data:
                    self.user_tools.db = update_model(self.user_tools.db, init.initialization_data.user_data)
            for action in init.initialization_actions or []:
                self.run_function(action)
        self.sync()

    # -- the model-facing interface --
    def call(self, tool_name: str, arguments: dict[str, Any] | None = None) -> str:
        """An agent tool call: the tool's text result or `Error: <message>` (never raises)."""
        return self._respond(self.tools, tool_name, arguments)

    def user_call(self, tool_name: str, arguments: dict[str, Any] | None = None) -> str:
        """A user tool call (telecom's phone): the tool's text result or `Error: <message>`."""
        if self.user_tools is None:
            self.last_error = True
            return "Error: User tools not available"
        return self._respond(self.user_tools, tool_name, arguments)

    def _respond(self, kit: ToolKit, tool_name: str, arguments: dict[str, Any] | None) -> str:
        self.last_error = False
        try:
            if arguments is not None and not isinstance(arguments, dict):
                raise TypeError(f"arguments must be a JSON object, got {type(arguments).__name__}")
            result = kit.use_tool(tool_name, **(arguments or {}))
            self.sync()
        except Exception as e:  # a model's bad call is an observation, never a crash
            self.last_error = True
            result = f"Error: {e}"
        try:
            return to_text(result)
        except Exception as e:
            self.last_error = True
            return f"Error: {e}"

    def tool_schemas(self) -> list[dict[str, Any]]:
        return self.tools.schemas()

    def user_tool_schemas(self) -> list[dict[str, Any]] | None:
        return self.user_tools.schemas() if self.user_tools is not None else None

    def state(self) -> dict[str, Any]:
        """The JSON-ready databases the DB hash is computed from."""
        out: dict[str, Any] = {"db": self.tools.db.model_dump(mode="json")}
        if self.user_tools is not None:
            out["user_db"] = self.user_tools.db.model_dump(mode="json")
        return out

    def db_hash(self) -> str | None:
        return self.tools.db_hash()

    def user_db_hash(self) -> str | None:
        return self.user_tools.db_hash() if self.user_tools is not None else None

    # -- environment functions (initialization actions, assertions) --
    def run_function(self, call: EnvFunctionCall) -> Any:
        kit = self.user_tools if call.env_type == "user" else self.tools
        if kit is None:
            raise ValueError(f"no {call.env_type} tools in {self.domain}")
        result = getattr(kit, call.func_name)(**call.arguments)
        self.sync()
        return result

    def run_assertion(self, assertion: EnvAssertion) -> bool:
        result = self.run_function(assertion)
        if not isinstance(result, bool):
            raise ValueError(f"Function {assertion.func_name} returned {type(result)} instead of bool")
        return result == assertion.assert_value

    def sync(self) -> None:
        """Telecom: bring the user's phone in line with the network (the reference's sync_tools)."""
        if self.user_tools is None:
            return
        surroundings = self.user_tools.db.surroundings
        if surroundings.phone_number is None:
            return
        agent: telecom.TelecomTools = self.tools  # type: ignore[assignment]
        line = agent._get_line_by_phone(surroundings.phone_number)
        surroundings.line_active = line.status == telecom.LineStatus.ACTIVE
        surroundings.roaming_allowed = bool(line.roaming_enabled)
        plan = agent._get_plan_by_id(line.plan_id)
        surroundings.mobile_data_usage_exceeded = line.data_used_gb >= plan.data_limit_gb + line.data_refueling_gb
        request = surroundings.payment_request
        if request is not None and request.paid:
            agent._set_bill_to_paid(request.bill_id)
            surroundings.payment_request = None
        if surroundings.payment_request is None:
            customer = agent.get_customer_by_phone(surroundings.phone_number)
            bills = agent._get_bills_awaiting_payment(customer)
            if bills:
                surroundings.payment_request = telecom_device.PaymentRequest(bill_id=bills[0].bill_id,
                                                                           amount_due=bills[0].total_due)


def make_env(domain: str, task_id: str | None = None, data_dir: Path | None = None,
             task: Task | None = None) -> Tau2Env:
    """A fresh environment for `task_id` of `domain` (initial state and initialization actions applied), or the
    bare domain when neither `task_id` nor `task` is given."""
    if task is None and task_id is not None:
        task = get_task(domain, task_id, data_dir)
    return Tau2Env(domain, task, data_dir)


def replay(env: Tau2Env, actions: list[Any]) -> list[str]:
    """Run actions (agent or user side, as the gold actions name them) through the tool interface."""
    out = []
    for action in actions:
        fn = env.user_call if action.requestor == "user" else env.call
        out.append(fn(action.name, dict(action.arguments)))
    return out


__all__ = ["Tau2Env", "make_env", "replay", "fresh_toolkits"]
