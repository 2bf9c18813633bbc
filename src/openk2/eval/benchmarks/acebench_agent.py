"""ACEBench agent categories: multi-turn (a user-simulator model talks to the agent) and multi-step (the agent works
alone), against ACEBench's simulated phone/travel APIs, scored by end state and milestones.

The simulated API classes (`BaseApi`, `MessageApi`, `ReminderApi`, `FoodPlatform`, `Travel`) and their default
databases are ACEBench's Python code: the end state they reach is what the ground truth describes, so openk2 does
not rewrite them. Point `--acebench-repo DIR` at a checkout of github.com/chenchen0103/ACEBench (commit 56dd66c,
the one `acebench/PROVENANCE.md` names); classes are imported from `DIR/model_inference/{multi_turn,multi_step}/
scenariosen/`, and the agent policy prompts (`BASE_PROMPT_EN`, `TRAVEL_PROMPT_EN`) from `model_inference/prompt_en.py`.

The loop follows ACEBench's `apimodel_inference.py` (40 messages at most; "finish conversation" ends it):
multi-turn: user simulator -> agent -> (calls -> execution -> agent)* -> user ...; multi-step: the task is the first
user message, and every agent message goes to execution (a message that is not a call gets ACEBench's "Please do not
ask me any questions" reply). The user simulator sees its own turns as `assistant` messages (ACEBench sends them as
`system`, which chat templates reject mid-dialog).

Scoring (ACEBench's `agent_eval`): the saved attributes of every involved class after the dialog (ACEBench's
`SAVED_CLASS`, JSON round-tripped as upstream's result files are) must equal the ground truth: score 1/0
(end-to-end accuracy, the number in the overall). Process accuracy (share of milestone calls made in order, best
path) is in the details. Milestones compare parsed calls, not raw text (upstream compares the agent's message text
exactly, so a space inside the brackets loses a milestone).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import sys
import threading
from pathlib import Path
from typing import Any

from openk2.eval.benchmarks.acebench import parse_calls
from openk2.eval.task import BenchmarkUnavailable, ChatFn, Completion, Sample, Score

SAVED_CLASS = {"BaseApi": ["wifi", "logged_in"], "MessageApi": ["inbox"], "ReminderApi": ["reminder_list"],
               "FoodPlatform": ["users", "logged_in_users", "orders"], "Travel": ["users", "reservations"]}
MODULES = {"BaseApi": "phone_platform.base_api", "MessageApi": "phone_platform.message",
           "ReminderApi": "phone_platform.reminder", "FoodPlatform": "phone_platform.food_services",
           "Travel": "travel"}
MAX_MESSAGES = 40
FINISH = "finish conversation"

AGENT_TURN_SYSTEM = """You are an AI system with the role name "system." Based on the provided API specifications and conversation history from steps 1 to t, generate the appropriate content for step t+1 for the "system" role.
1. If the information provided in the previous step is complete and the API call can be executed normally, you should generate the API request. The API request should be output in the format [ApiName(key1='value1', key2='value2', ...)]. Do not include any other explanations, prompts, or API call results in the output.
   - If the API parameter description does not specify otherwise, the parameter is optional (parameters mentioned in the user input need to be included in the output; if not mentioned, they do not need to be included).
   - If the API parameter description does not specify the required format for the value, use the user's original text for the parameter value.
2. If the information you received is incomplete, you need to ask the user for more information to obtain the complete details. You should not pretend to be the user to answer some clerical questions; instead, promptly ask the user for clarification.
Please note that if an API call is required, strictly adhere to the call format rules [ApiName(key1='value1', key2='value2', ...)] and do not output any other text content.
Role Descriptions:
user: User
agent: The AI system role that makes API requests
execution: Executes the API call and returns the result
The rules you need to follow are as follows:\n
"""  # noqa: E501  (ACEBench's prompt, verbatim)
AGENT_TURN_USER = "Below is the list of APIs you can use:\n {functions}\n\nConversation history 1..t:\n{history}"
AGENT_STEP_SYSTEM = """You are an AI system with the role of 'system'. Based on the provided API documentation and the conversation history from steps 1 to t, generate the corresponding content for the 'system' role in step t+1.
1. If the information provided in the previous step is complete and allows for a successful API call, you should output the API request(s) to be called in the format [ApiName(key1='value1', key2='value2', ...)]. Replace ApiName with the actual API name, key1, key2, etc., with the actual parameter names, and value1, value2, etc., with the actual parameter values. The output should start with a square bracket "[" and end with a square bracket "]". If there are multiple API requests, separate them with commas, for example, [ApiName(key1='value1', key2='value2', ...), ApiName(key1='value1', key2='value2', ...), ...]. Do not include any additional explanations, prompts, or API call results in the output.
   - If the API parameter description does not specify otherwise, the parameter is optional (only include parameters mentioned in the user input; if not mentioned, do not include them).
   - If the API parameter description does not specify a required value format, use the user's original input for the parameter value.
2. If a task requires multiple steps to complete (with strict sequential relationships between steps), execute them step by step, and decide how to proceed based on the results returned from each execution.
3. Generally do not use parallel calls, meaning only one function is called at a time.

Please note that if an API call is needed, strictly adhere to the calling rules [ApiName(key1='value1', key2='value2', ...)] and do not output any other content.
When you believe the task is completed, return "finish conversation" to end the dialogue.

Role Descriptions:
user: The user
agent: The AI system role that performs API requests
execution: Executes API calls and returns results
"""  # noqa: E501
AGENT_STEP_USER = ("Below is the list of APIs you can call (in JSON format): {functions}. Conversation history: "
                   "{history}\n")
USER_TRAVEL = """You are a user interacting with an agent.
Instruction: {instruction}
Rules:
- Generate only one line of content each time to simulate the user's message.
- Do not reveal all instruction content at once. Only provide information needed for the current step.
- Do not speculate information not provided in the instructions. For example, if the agent asks for an order ID but it is not mentioned in the instructions, do not fabricate an order ID; instead, directly state that you do not remember or do not have it.
- When information confirmation is needed, decide whether to confirm based on the content in the Instruction.
- Do not repeat instruction content in the conversation; instead, express the same information in your own words.
- Keep the dialogue natural and maintain the user's personality as described in the instructions.
- If the goal in the instructions has been achieved, generate a separate line with the message 'finish conversation' to end the dialogue.
- If the Instruction requires booking a round-trip flight, you need to state the intention "Book a round-trip flight" at the very beginning.
"""  # noqa: E501
USER_BASE = """You are a user interacting with an agent.
Instruction: {instruction}
Rules:
- Generate only one line of content each time to simulate the user's message.
- Do not reveal all instruction content at once. Only provide information needed for the current step.
- Ensure that all information needed for the current step is provided completely. For example, when adding a reminder, you need to provide the reminder's description, title, and time, etc.
- Do not speculate information not provided in the instructions. For example, if the Instruction does not directly specify takeout content, do not fabricate takeout content.
- When asked if you need further assistance, make sure whether all main tasks in the Instruction have been completed. If not, continue to provide the next step task to the agent.
- Names appearing in the Instruction are assumed to be the user's full names.
- When the agent asks which message to delete, follow the Instruction's requirements to delete the message.
- You cannot proactively offer help to the agent. Respond to the agent's questions as per the Instruction's requirements, and do not fabricate any information you do not know.
- If all tasks are completed, generate a separate line with the message 'finish conversation' to end the dialogue.
"""  # noqa: E501
USER_OPENING = "Is there anything you need help with today?"
NOT_A_CALL = "Please do not ask me any questions, use the known conditions to solve the problem"

_import_lock = threading.Lock()


def check_repo(repo: str | None) -> Path:
    if not repo:
        raise BenchmarkUnavailable("acebench-agent needs --acebench-repo DIR: a checkout of "
                                   "github.com/chenchen0103/ACEBench (its simulated API classes define the end states)")
    path = Path(repo)
    if not (path / "model_inference" / "prompt_en.py").is_file():
        raise BenchmarkUnavailable(f"--acebench-repo {path}: no model_inference/prompt_en.py there (want an ACEBench "
                                   "checkout)")
    return path


def _import(repo: Path, module: str) -> Any:
    with _import_lock:
        if str(repo.resolve()) not in sys.path:
            sys.path.insert(0, str(repo.resolve()))  # the scenario modules import each other by package path
        return importlib.import_module(module)


class Environment:
    """Fresh instances of the involved classes, loaded with the item's initial config (as ACEBench does)."""

    def __init__(self, repo: Path, kind: str, involved: list[str], initial_config: dict[str, Any]) -> None:
        self.instances: dict[str, Any] = {}
        for name in involved:
            cls = getattr(_import(repo, f"model_inference.{kind}.scenariosen.{MODULES[name]}"), name)
            inst = cls()
            inst._load_scenario(copy.deepcopy(initial_config.get(name, {})), long_context=False)
            inst._load_scenario(copy.deepcopy(initial_config.get("BaseApi", {})), long_context=False)
            self.instances[name] = inst
        self.executed = False

    def execute(self, calls: list[dict[str, dict[str, Any]]]) -> list[Any]:
        """Run each call on every instance that has the method (ACEBench's rule); JSON-ready results."""
        results = []
        for call in calls:
            [(name, args)] = call.items()
            targets = [inst for inst in self.instances.values()
                       if not name.startswith("_") and inspect.ismethod(getattr(inst, name, None))]
            if not targets:
                results.append(f"Error during execution: no API named {name}")
                continue
            try:
                for inst in targets:
                    value = getattr(inst, name)(**args)
            except Exception as e:  # noqa: BLE001  (the model's bad arguments are feedback, as upstream)
                results.append(f"Error during execution: {e}")
                break
            self.executed = True
            results.append(json.loads(json.dumps(value, default=str)) if isinstance(value, (dict, list)) else
                           value if isinstance(value, str) else str(value))
        return results

    def state(self) -> list[dict[str, Any]]:
        if not self.executed:  # ACEBench records no state when nothing ran: the item fails
            return []
        return [{name: json.loads(json.dumps({a: v for a, v in vars(inst).items() if a in SAVED_CLASS.get(name, [])},
                                             default=str))} for name, inst in self.instances.items()]


async def run_agent(sample: Sample, chat: ChatFn, user: ChatFn | None, repo: Path) -> Completion:
    q = sample.reference["question"]
    kind = "multi_turn" if sample.category == "agent_multi_turn" else "multi_step"
    env = Environment(repo, kind, q["involved_classes"], q.get("initial_config") or {})
    functions = json.dumps(q["function"], ensure_ascii=False)
    transcript: list[dict[str, Any]] = []
    milestones: list[list[dict[str, Any]]] = []
    history = ""
    if kind == "multi_turn":
        if user is None:
            raise BenchmarkUnavailable("acebench agent_multi_turn needs --user-model (the user simulator)")
        prompts = _import(repo, "model_inference.prompt_en")
        system = AGENT_TURN_SYSTEM + (prompts.TRAVEL_PROMPT_EN if "Travel" in q["involved_classes"] else "") + (
            prompts.BASE_PROMPT_EN if "BaseApi" in q["involved_classes"] else "")
        user_messages = [{"role": "system", "content": (USER_BASE if "BaseApi" in q["involved_classes"] else
                                                        USER_TRAVEL).format(instruction=q["question"])},
                         {"role": "user", "content": USER_OPENING}]
        first = (await user(user_messages, None)).get("content") or ""
        user_messages.append({"role": "assistant", "content": first})
        message, recipient = first, "agent"
        history += f"user:{first}\n"
    else:
        system = AGENT_STEP_SYSTEM
        message, recipient = q["question"], "agent"
        history += f"user:{message}\n"
    transcript.append({"role": "user", "content": message})
    for step in range(MAX_MESSAGES):
        if recipient == "agent":
            prompt = (AGENT_TURN_USER if kind == "multi_turn" else AGENT_STEP_USER).format(functions=functions,
                                                                                        history=history)
            message = (await chat([{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                                  None)).get("content") or ""
            transcript.append({"role": "assistant", "content": message})
            history += f"agent:{message}\n"
            try:
                calls = parse_calls(message)
            except (SyntaxError, ValueError):
                calls = None
            recipient = "execution" if calls or kind == "multi_step" else "user"
            if step > 1 and FINISH in message:
                break
        elif recipient == "execution":
            if calls:
                milestones.append(calls)
                result: Any = env.execute(calls)
            else:
                result = NOT_A_CALL
            transcript.append({"role": "tool", "content": json.dumps(result, ensure_ascii=False, default=str)})
            history += f"{'execution' if kind == 'multi_turn' else 'execution result'}:{result}\n"
            recipient = "agent"
        else:
            assert user is not None
            user_messages.append({"role": "user", "content": message.removeprefix("agent:")})
            message = (await user(user_messages, None)).get("content") or ""
            user_messages.append({"role": "assistant", "content": message})
            transcript.append({"role": "user", "content": message})
            history += f"user:{message}\n"
            recipient = "agent"
            if step > 1 and FINISH in message:
                break
    return Completion(text=message, transcript=transcript,
                      extra={"state": env.state(), "milestones": milestones})


def _canonical(calls: list[dict[str, Any]]) -> str:
    return json.dumps(calls, sort_keys=True)


def process_accuracy(milestones: list[list[dict[str, Any]]], paths: list[Any]) -> float:
    """Share of milestones (one per executed call message) hit in order, best over alternative paths, as ACEBench's
    agent_eval_process; messages are compared as parsed calls."""
    made = [_canonical(calls) for calls in milestones]
    best = 0.0
    for path in (paths if paths and isinstance(paths[0], list) else [paths]):
        if not path:
            return 1.0
        i, hit = 0, 0
        for stone in path:
            try:
                want = _canonical(parse_calls(stone))
            except (SyntaxError, ValueError):
                want = stone.strip()
            while i < len(made):
                i += 1
                if made[i - 1] == want:
                    hit += 1
                    break
        best = max(best, hit / len(path))
    return best


def state_errors(state: list[dict[str, Any]], gold: list[dict[str, Any]]) -> list[str]:
    """ACEBench's agent_checker: the class count must match; each ground-truth class's attributes must equal."""
    if len(state) != len(gold):
        return [f"{len(state)} classes in the end state, expected {len(gold)}"]
    errors = []
    for want in gold:
        [(name, attrs)] = want.items()
        # Case-insensitive: agent_multi_turn_9's ground truth spells "BaseAPI" (upstream silently skips a class it
        # cannot find, so any BaseApi state passes there).
        got = next((v for s in state for k, v in s.items() if k.lower() == name.lower()), None)
        if got is None:
            errors.append(f"class {name} missing from the end state")
            continue
        for attr, value in got.items():
            if attr not in attrs:
                errors.append(f"{name}.{attr} not in the ground truth")
            elif isinstance(attrs[attr], dict):
                errors += [f"{name}.{attr}.{k} != {v!r}" for k, v in attrs[attr].items()
                           if not isinstance(value, dict) or value.get(k) != v]
            elif attrs[attr] != value:
                errors.append(f"{name}.{attr} = {value!r}, expected {attrs[attr]!r}")
    return errors


def score_agent(sample: Sample, completion: Completion) -> Score:
    gold = sample.reference["ground_truth"]
    gold = gold if isinstance(gold, list) else [gold]
    state, milestones = completion.extra.get("state", []), completion.extra.get("milestones", [])
    errors = state_errors(state, gold)
    process = 1.0 if not errors else process_accuracy(milestones, sample.reference.get("mile_stone") or [])
    return Score(float(not errors), extracted=state,
                 details={"process_accuracy": process, "errors": errors[:10]})
