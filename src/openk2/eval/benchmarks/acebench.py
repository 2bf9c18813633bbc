"""ACEBench (English): tool use scored by ACEBench's rules, with its weighted overall score.

Data: `acebench/data_en/data_<category>.json` (questions) and `acebench/data_en/possible_answer/...` (ground
truth), both JSON Lines. Prompts are ACEBench's (`model_inference/prompt_en.py`): the model answers in bracketed
Python-call syntax, `[ApiName(key='value', ...)]`, or with fixed phrases in the special categories.

Scoring (our implementation of the rules in ACEBench's `eval_main.py` / `model_eval/checker.py`):
- normal: the first outermost `[...]` is parsed as a list of calls. The multiset of function names must equal the
  ground truth's (`Name_1`-style keys mark repeated calls); each ground-truth call needs its own matching output
  call: required parameters present, no parameter outside the ground truth, values equal. Strings compare after
  ACEBench's normalization (drop spaces and , . / - _ * ^, lowercase) by substring (the answer inside the output),
  lists element by element, dicts key by key, numbers by value (int == float), booleans exactly. A ground-truth
  value "" marks an optional parameter. Several ground truths (a list) mean any one may match.
  Multi-turn categories (`normal_multi_turn_*`, one item per turn `<dialogue>_<turn>`) count a dialogue as solved
  when all its turns are (ACEBench's end accuracy).
- special: incomplete needs "Missing necessary parameters", the API name and every missing parameter; error_param
  needs "There is incorrect value" and every wrong value; irrelevant needs "the limitations of the function".
- overall = 0.2676 special + 0.578 normal + 0.1545 agent, each group the unweighted mean of its categories.

Where upstream's checker fails its own ground truth or accepts wrong answers, we differ (docs/evaluation.md):
1. Upstream skips the value check whenever the ground truth's Python type differs from the schema's declared type
   (its "is_variable" branch: e.g. a float answer for a "number" parameter, a dict for a "string"), so any value
   passes; we always compare values.
2. Upstream accepts an output that omits optional parameters the ground truth sets; we require every ground-truth
   parameter whose value is not "" (the prompt tells the model to include every parameter the user mentioned).
3. Upstream matches each ground-truth call against any output call of that name (two identical outputs can
   satisfy two different expected calls); we match one to one.
4. Upstream compares nested dict values as substrings of the `str()` of Python objects, so {"a": 1} passes for
   an expected {"a": 10} only by accident of formatting; we compare nested values by type as above.
5. Upstream removes all whitespace from multi-turn outputs before parsing (so 'John Doe' parses as 'JohnDoe');
   we parse the text as written (string comparison ignores spaces anyway).
6. Upstream's parser fails on JSON literals (true/false/null) inside the call; we accept them.
7. Upstream requires every parameter the schema marks required, even where the ground truth leaves it out (so
   the ground truth itself fails); we require the ground truth's parameters (every required one it names).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openk2.eval.benchmarks.math import read_jsonl
from openk2.eval.task import Benchmark, BenchmarkDataError, BenchmarkUnavailable, ChatFn, Completion, Sample, Score

NORMAL = ["normal_atom_bool", "normal_atom_enum", "normal_atom_list", "normal_atom_number", "normal_atom_object_deep",
          "normal_atom_object_short", "normal_single_turn_single_function", "normal_single_turn_parallel_function",
          "normal_multi_turn_user_adjust", "normal_multi_turn_user_switch", "normal_similar_api", "normal_preference"]
SPECIAL = ["special_incomplete", "special_error_param", "special_irrelevant"]
AGENT = ["agent_multi_turn", "agent_multi_step"]
GROUP_WEIGHTS = {"special": 0.2676, "normal": 0.578, "agent": 0.1545}

SYSTEM_NORMAL = """You are an AI assistant with the role name "assistant." Based on the provided API specifications and conversation history from steps 1 to t, generate the API requests that the assistant should call in step t+1. The API requests should be output in the format [ApiName(key1='value1', key2='value2', ...)], replacing ApiName with the actual API name, key1, key2, etc., with the actual parameter names, and value1, value2, etc., with the actual parameter values. The output should start with a square bracket "[" and end with a square bracket "]".
If there are multiple API requests, separate them with commas, for example: [ApiName(key1='value1', key2='value2', ...), ApiName(key1='value1', key2='value2', ...), ...]. Do not include any other explanations, prompts, or API call results in the output.
If the API parameter description does not specify otherwise, the parameter is optional (parameters mentioned in the user input need to be included in the output; if not mentioned, they do not need to be included).
If the API parameter description does not specify the required format for the value, use the user's original text for the parameter value.
If the API requires no parameters, output the API request directly in the format [ApiName()], and do not invent any nonexistent parameter names.

{time}

Role Descriptions:
user: User
assistant: The AI assistant role that makes API requests
tool: Provides the results returned from tool calls

API Specifications:
{function}"""  # noqa: E501  (prompt text kept verbatim)

SYSTEM_PREFERENCE = """You are an AI assistant, and your role is called assistant. Based on the given API description, dialogue history 1..t, and character profile, generate the API requests that the assistant should call in step t+1. The API requests should be output in the format [ApiName(key1='value1', key2='value2', ...)], where ApiName is replaced with the actual API name, and key1, key2, etc., are replaced with the actual parameter names, and value1, value2 are replaced with the actual parameter values. The output should start with a "[" and end with a "]".
If there are multiple API requests, they should be separated by commas, e.g., [ApiName(key1='value1', key2='value2', ...), ApiName(key1='value1', key2='value2', ...), ...]. Do not output any other explanations, hints, or results of the API calls in the output.
If the API parameter description does not specify special instructions, the parameter is optional (parameters mentioned in the user input or character profile should be included in the output, and if not mentioned, they should not be included).
If the API parameter description does not specify the format for the parameter value, the parameter value should be taken from the user's original text or character profile.
If the API requires no parameters, the API request should be output as [ApiName()], with no fabricated parameter names.

Character Profile:
{profile}

Role Description:
user: User
assistant: AI assistant performing API calls
tool: Provides the results of tool calls

API Description:
{function}"""  # noqa: E501

SYSTEM_SPECIAL = """You are an AI assistant with the role name "assistant". Based on the provided API specifications and conversation history from steps 1 to t, generate the API requests that the assistant should call in step t+1. Below are two specific scenarios:
1. When the information provided by the user is clear and unambiguous, and the problem can be resolved using the list of candidate functions:
   - If the API parameter description does not specify the required format for the value, use the user's original text for the parameter value.
   - When multiple tools in the candidate list can satisfy the user's needs, output all API requests.
   - API requests should be output in the format [ApiName(key1='value1', key2='value2', ...), ApiName(key1='value1', key2='value2', ...), ...], replacing ApiName with the actual API name, key1, key2, etc., with the actual parameter names, and value1, value2, etc., with the actual parameter values. The output should start with a square bracket "[" and end with a square bracket "]". At this time, the output must not contain any other content.

2. When the information provided by the user is unclear, incomplete, or incorrect, or the user's question exceeds the capabilities of the provided functions, you need to clearly point out these issues. The following is your strategy:
   (1) If the user's instructions include the key details required to call the API, but the type or form of the parameter values does not match the API's definitions, ask in-depth questions to clarify and correct the details. The output format should be: ["There is incorrect value (value) for the parameters (key) in the conversation history."]
   (2) If the user's instructions lack the key details required by the API, ask questions to obtain the necessary information. The output format should be: ["Missing necessary parameters (key1, key2, ...) for the api (ApiName)"], replacing key1, key2 with the names of the missing parameters and ApiName with the actual API name.
   (3) If the user's request exceeds the current capabilities of your APIs, inform them that you cannot fulfill the request. The output format should be: ["Due to the limitations of the function, I cannot solve this problem."]
   Note: The above steps have a priority order. You need to first determine whether scenario (1) applies. If it does, output according to the requirements in (1). Pay attention to distinguishing between scenarios (1) and (2).

{time}

Role Descriptions:
user: User
assistant: The AI assistant role that makes API requests

API Specifications:
{function}"""  # noqa: E501
USER = "Conversation history 1..t:\n{question}"

IRRELEVANT_PHRASE = "Due to the limitations of the function, I cannot solve this problem."


# ---- parsing the bracketed call syntax ------------------------------------------------------------------------------

def outermost_brackets(text: str) -> str | None:
    """The first balanced outermost [...] in `text` (brackets inside quotes are skipped)."""
    start, depth, quote = -1, 0, None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote and text[i - 1] != "\\":
                quote = None
        elif ch in "'\"" and depth > 0:
            quote = ch
        elif ch == "[":
            start = i if depth == 0 else start
            depth += 1
        elif ch == "]" and depth > 0:
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None


_JSON_NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def _value(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_value(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_value(k): _value(v) for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, (ast.Name, ast.Attribute)):
        return ast.unparse(node)  # an unquoted word: keep its text
    raise ValueError(f"unsupported value {ast.unparse(node)!r}")


def _call(node: ast.Call) -> dict[str, dict[str, Any]]:
    if node.args:
        raise ValueError(f"positional arguments in {ast.unparse(node)[:80]!r}; use key=value")
    return {ast.unparse(node.func): {kw.arg: _value(kw.value) for kw in node.keywords if kw.arg is not None}}


def parse_calls(text: str) -> list[dict[str, dict[str, Any]]]:
    """`[F(a=1), G(b='x')]` in `text` -> [{"F": {"a": 1}}, {"G": {"b": "x"}}]; ValueError if there is none."""
    block = outermost_brackets(text)
    if block is None:
        raise ValueError("no [ApiName(...)] list in the output")
    tree = ast.parse(block, mode="eval").body
    if not isinstance(tree, ast.List) or not all(isinstance(e, ast.Call) for e in tree.elts):
        raise ValueError("the [...] list does not hold only calls")
    return [_call(e) for e in tree.elts]


def render_calls(calls: dict[str, dict[str, Any]]) -> str:
    """Ground truth {"F": {...}, "G_1": {...}} rendered the way the prompt asks the model to answer."""
    parts = [f"{re.sub(r'_[0-9]+$', '', name)}({', '.join(f'{k}={v!r}' for k, v in params.items())})"
             for name, params in calls.items()]
    return "[" + ", ".join(parts) + "]"


# ---- comparing ------------------------------------------------------------------------------------------------------

def standardize(s: str) -> str:
    return re.sub(r"[ ,./\-_*^]", "", s).lower().replace("'", '"')


def values_match(value: Any, gold: Any, *, in_list: bool = False) -> bool:
    if isinstance(gold, bool) or isinstance(value, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        return value is gold if isinstance(gold, bool) else False
    if isinstance(gold, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return False
        return isinstance(value, (int, float)) and abs(value - gold) <= 1e-9 * max(1.0, abs(gold))
    if isinstance(gold, str):
        if not isinstance(value, (str, int, float)):
            return False
        v, g = standardize(str(value)), standardize(gold)
        return v == g if in_list else g in v
    if isinstance(gold, list):
        if not isinstance(value, list):
            return len(gold) == 1 and values_match(value, gold[0])  # ["2024-01-01"] for a scalar (flatten_dates)
        return len(value) == len(gold) and all(values_match(v, g, in_list=True) for v, g in zip(value, gold,
                                                                                                  strict=True))
    if isinstance(gold, dict):
        if not isinstance(value, dict) or set(value) != set(gold):
            return False
        return all(values_match(value[k], g) for k, g in gold.items())
    return value == gold


def call_error(name: str, params: dict[str, Any], gold: dict[str, Any], functions: list[dict[str, Any]]) -> str | None:
    """Why the output call `name(**params)` does not match the ground-truth parameters `gold` (None: it does)."""
    for p in params:
        if p not in gold:
            return f"{name}: parameter {p} is not in the ground truth"
    for p, g in gold.items():
        if p not in params:
            if g == "":
                continue  # optional
            return f"{name}: missing parameter {p}"
        if g != "" and not values_match(params[p], g):
            return f"{name}: wrong value for {p}: {params[p]!r} (expected {g!r})"
    return None


def normal_error(calls: list[dict[str, dict[str, Any]]], gold: dict[str, Any],
                 functions: list[dict[str, Any]]) -> str | None:
    expected = [(re.sub(r"_[0-9]+$", "", k), v) for k, v in gold.items()]
    got = [next(iter(c.items())) for c in calls]
    if Counter(n for n, _ in got) != Counter(n for n, _ in expected):
        return f"functions {sorted(n for n, _ in got)} != expected {sorted(n for n, _ in expected)}"
    unused = list(range(len(got)))
    for name, params in expected:
        errors = []
        for j in unused:
            if got[j][0] == name:
                err = call_error(name, got[j][1], params, functions)
                if err is None:
                    unused.remove(j)
                    break
                errors.append(err)
        else:
            return errors[0] if errors else f"no call to {name}"
    return None


def special_error(category: str, text: str, gold: Any) -> str | None:
    if category == "special_irrelevant":
        return None if "the limitations of the function" in text else "did not say the request is out of scope"
    phrase = "Missing necessary parameters" if category == "special_incomplete" else "There is incorrect value"
    if phrase not in text:
        return f"no {phrase!r}"
    for name, values in gold.items():
        if category == "special_incomplete" and name not in text:
            return f"did not name the API {name}"
        for v in values:
            if str(v) not in text:
                return f"did not name {v!r}"
    return None


def render_special(category: str, gold: Any) -> str:
    """The ground truth in the phrase the special prompt asks for."""
    if category == "special_irrelevant":
        return f'["{IRRELEVANT_PHRASE}"]'
    if category == "special_incomplete":
        [(name, params)] = gold.items()
        return f'["Missing necessary parameters ({", ".join(params)}) for the api ({name})"]'
    return "[" + ", ".join(f'"There is incorrect value ({", ".join(map(str, vals))}) for the parameters ({key}) in the '
                           f'conversation history."' for key, vals in gold.items()) + "]"


# ---- the benchmark --------------------------------------------------------------------------------------------------

def category_of(item_id: str) -> str:
    return re.sub(r"(_[0-9]+)+$", "", item_id)


def dialogue_of(item_id: str) -> str:
    """Multi-turn items are '<category>_<dialogue>_<turn>': the dialogue they belong to."""
    return item_id.rsplit("_", 1)[0]


@dataclass
class ACEBench(Benchmark):
    groups: tuple[str, ...] = ("normal", "special")

    def categories_list(self) -> list[str]:
        return [c for g in self.groups for c in {"normal": NORMAL, "special": SPECIAL, "agent": AGENT}[g]]

    def data_files(self, data_dir: Path) -> list[Path]:
        base = data_dir / "acebench" / "data_en"
        return [p for c in self.categories_list() for p in (base / f"data_{c}.json",
                                                            base / "possible_answer" / f"data_{c}.json")]

    def load(self, data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Sample]:
        base = data_dir / "acebench" / "data_en"
        samples = []
        skip_agent = None
        if "agent" in self.groups:
            from openk2.eval.benchmarks.acebench_agent import check_repo

            try:
                check_repo(self.options.get("acebench_repo"))
                if not self.options.get("has_user_model"):
                    raise BenchmarkUnavailable("the agent_multi_turn category needs --user-model (the user simulator)")
            except BenchmarkUnavailable as e:
                if self.groups == ("agent",):
                    raise
                skip_agent = str(e)
                self.options.setdefault("notes", []).append(f"agent group not run ({e}); the overall is "
                                                            "renormalized over normal and special")
                print(f"{self.name}: {self.options['notes'][-1]}", file=sys.stderr)
        for cat in self.categories_list():
            if skip_agent and cat in AGENT:
                continue
            questions = read_jsonl(base / f"data_{cat}.json", ("id", "question", "function"))
            answers = {r["id"]: r for r in read_jsonl(base / "possible_answer" / f"data_{cat}.json",
                                                      ("id", "ground_truth"))}
            for n, q in enumerate(questions, 1):
                if q["id"] not in answers:
                    raise BenchmarkDataError(f"{base / 'possible_answer' / f'data_{cat}.json'}: no ground truth for "
                                             f"{q['id']} (question line {n})")
                samples.append(self.sample_of(cat, q, answers[q["id"]]))
        if limit is not None:  # the first `limit` items of every category, so each group is represented
            by_cat: dict[str, list[Sample]] = {}
            for smp in samples:
                by_cat.setdefault(smp.category or "", []).append(smp)
            samples = [smp for group in by_cat.values() for smp in group[:limit]]
        return samples

    def sample_of(self, category: str, q: dict[str, Any], answer: dict[str, Any]) -> Sample:
        if category in AGENT:  # multi-message rollouts: `rollout` builds the prompts
            return Sample(id=q["id"], category=category, messages=[],
                          reference={"ground_truth": answer["ground_truth"], "question": q,
                                     "mile_stone": answer.get("mile_stone") or q.get("path") or []})
        functions = json.dumps(q["function"], ensure_ascii=False)
        if category.startswith("special"):
            system = SYSTEM_SPECIAL.format(time=q.get("time", ""), function=functions)
        elif category == "normal_preference":
            system = SYSTEM_PREFERENCE.format(profile=q.get("profile", ""), function=functions)
        else:
            system = SYSTEM_NORMAL.format(time=q.get("time", ""), function=functions)
        return Sample(id=q["id"], category=category,
                      messages=[{"role": "system", "content": system},
                                {"role": "user", "content": USER.format(question=q["question"])}],
                      reference={"ground_truth": answer["ground_truth"], "function": q["function"]})

    def gold_text(self, sample: Sample) -> str:
        """The ground truth rendered in the expected output format (for tests and sanity checks)."""
        gt = sample.reference["ground_truth"]
        if sample.category.startswith("special"):
            return render_special(sample.category, gt)
        return render_calls(gt[0] if isinstance(gt, list) else gt)

    async def rollout(self, sample: Sample, chat: ChatFn, user: ChatFn | None = None) -> Completion:
        if sample.category in AGENT:
            from openk2.eval.benchmarks.acebench_agent import check_repo, run_agent

            return await run_agent(sample, chat, user, check_repo(self.options.get("acebench_repo")))
        return await super().rollout(sample, chat, user)

    def score(self, sample: Sample, completion: Completion) -> Score:
        text, cat = completion.text, sample.category or ""
        gold = sample.reference["ground_truth"]
        if cat in AGENT:
            from openk2.eval.benchmarks.acebench_agent import score_agent

            return score_agent(sample, completion)
        if cat.startswith("special"):
            err = special_error(cat, text, gold)
            return Score(float(err is None), extracted=text.strip()[:500], details={"error": err} if err else {})
        try:
            calls = parse_calls(text)
        except (SyntaxError, ValueError) as e:
            return Score(0.0, extracted=None, details={"error": f"wrong output format: {e}"})
        errors = [normal_error(calls, g, sample.reference["function"]) for g in (gold if isinstance(gold, list)
                                                                                 else [gold])]
        ok = any(e is None for e in errors)
        return Score(float(ok), extracted=calls, details={} if ok else {"error": errors[0]})

    def aggregate(self, scores: dict[str, list[float]]) -> float | None:
        """ACEBench's summary: per category accuracy (dialogue end accuracy for multi-turn), unweighted mean per
        group, groups weighted 0.2676 / 0.578 / 0.1545 (renormalized over the groups this benchmark runs)."""
        per_cat = category_accuracy(scores)
        groups = {}
        for g in self.groups:
            cats = [per_cat[c] for c in {"normal": NORMAL, "special": SPECIAL, "agent": AGENT}[g] if c in per_cat]
            if cats:
                groups[g] = sum(cats) / len(cats)
        if not groups:
            return None
        weight = sum(GROUP_WEIGHTS[g] for g in groups)
        return 100 * sum(GROUP_WEIGHTS[g] * v for g, v in groups.items()) / weight


def category_accuracy(scores: dict[str, list[float]]) -> dict[str, float]:
    """Accuracy (0-1) per category; multi-turn categories count a dialogue as solved when every turn is."""
    items: dict[str, dict[str, float]] = {}
    for item_id, s in scores.items():
        if not s:
            continue
        cat = category_of(item_id)
        value = sum(s) / len(s)
        if "multi_turn" in cat and cat.startswith("normal"):
            d = dialogue_of(item_id)
            items.setdefault(cat, {})[d] = min(items.get(cat, {}).get(d, 1.0), value)
        else:
            items.setdefault(cat, {})[item_id] = value
    return {c: sum(v.values()) / len(v) for c, v in items.items()}


_ACE: dict[str, Any] = dict(metric="avg@k", temperature=0.0, max_tokens=8192, k=1, categories=True)
BENCHMARKS: list[Benchmark] = [
    ACEBench(name="acebench", data_source="acebench/data_en (ACEBench En, 774 of 1,023 items)", k2_score=76.5,
             groups=("normal", "special", "agent"), **_ACE),
    ACEBench(name="acebench-normal", data_source="acebench/data_en normal (12 categories)", k2_score=None,
             groups=("normal",), **_ACE),
    ACEBench(name="acebench-special", data_source="acebench/data_en special (3 categories)", k2_score=None,
             groups=("special",), **_ACE),
    ACEBench(name="acebench-agent", data_source="acebench/data_en agent (multi-turn, multi-step); --acebench-repo, "
             "--user-model", k2_score=None, groups=("agent",), **_ACE),
]
