"""The world domain's SFT data: expert dialogs with several requests each, over the pretraining world and over
extra *registry worlds*, so that the model learns to copy names and values instead of memorising them.

    records = sft_records(World.generate(0, 100), n_tasks=1920, registry_worlds=4, tasks_per_dialog=2)

Why the extra worlds: the pretraining world has only ~90 training people, and a small model fine-tuned on a few
hundred dialogs about them learns their names (it then calls `lookup` with a training person's name when asked
about a held-out one). Registry worlds (`World.generate(REGISTRY_SEED + k, ...)`) are other draws of the same
generator: new people, companies and cities, in no pretraining document and in no evaluation task. Their dialogs
run against their own real `WorldEnv`, so every tool result is true in its world; what transfers is the skill
(read the name from the request, copy the tool's value into the answer). People whose full name is also a held-out
person of the pretraining world are dropped, so held-out people stay in no SFT dialog.

Why several requests per dialog: every prompt starts with the same tool declarations (~260 tokens with the
speedrun's chat-aware tokenizer, `data.tokenizer_chat_dialogs`; ~710 with one trained on prose alone), so a
one-request dialog is only ~15% assistant tokens (two requests: ~24%). The scripted user asks `tasks_per_dialog`
requests in turn (the next after the agent's answer), on one database, as tau-bench users do; the first request
of each dialog is exactly an evaluation episode's prompt.

Why copy-friendly text (`copy_friendly`): the byte-level BPE glues a word to the space before it, so a name in the
user's message (" Kiamiarn" is one token) and the same name at the start of a JSON string ("K", "iamiarn") are
different tokens. Copying it into a tool call then means re-spelling it, which the nano model cannot do for a name
it has never seen (it invents one); the same holds for a value copied from a tool result (which starts its
message: "T", "reikraev") into a sentence (" Treikraev"). So the expert writes a tool argument that it copies from
the request with the request's leading space (the tools strip whitespace: the call means the same), and quotes a
value it copies from a tool result (`born in "Treikraev".`: the same tokens as the result). Every copy is then a
copy of identical tokens (docs/experiments.md, "SFT stage: copying names").
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence
from typing import Any

from openk2.agentic.world_domain import TOOLS, WorldEnv
from openk2.agentic.world_tasks import (
    ExpertAgent,
    Message,
    WorldTask,
    answer_ok,
    make_tasks,
    run_episode,
)
from openk2.data.world import World

#: Registry world k is `World.generate(REGISTRY_SEED + k, n_people)`: far from the pretraining seeds in use (0-9).
REGISTRY_SEED = 1000
#: Tool arguments that hold free text copied from the request (the tools strip whitespace from these; `attribute`
#: is an enum and is matched exactly).
COPIED_ARGUMENTS = ("name", "value", "company")


class DialogUser:
    """A scripted user with several requests: the first, then the next after each answer of the agent."""

    def __init__(self, tasks: Sequence[WorldTask]) -> None:
        self.tasks = list(tasks)

    async def __call__(self, messages: list[Message]) -> Message | None:
        asked = sum(m.get("role") == "user" for m in messages)
        return {"role": "user", "content": self.tasks[asked].instruction} if asked < len(self.tasks) else None


class DialogExpert:
    """The programmatic expert of the request the user made last (`world_tasks.ExpertAgent`)."""

    def __init__(self, tasks: Sequence[WorldTask]) -> None:
        self.experts = [ExpertAgent(t) for t in tasks]

    async def __call__(self, messages: list[Message], tools: list[dict[str, Any]] | None = None) -> Message:
        asked = sum(m.get("role") == "user" for m in messages)
        return self.experts[asked - 1].act(messages)


def _segment_answers(messages: Sequence[Message]) -> list[str]:
    """The agent's last text reply before each following user turn (and at the end)."""
    answers, last = [], ""
    for m in messages[2:]:
        if m.get("role") == "user":
            answers.append(last)
        elif m.get("role") == "assistant" and not m.get("tool_calls"):
            last = str(m.get("content") or "")
    return [*answers, last]


def _gold_hash(world: World, tasks: Sequence[WorldTask]) -> str:
    env = WorldEnv(world)
    for t in tasks:
        for a in t.gold_actions:
            env.call(a["name"], a["arguments"])
    return env.state_hash()


def copy_friendly(messages: Sequence[Message]) -> list[Message]:
    """`messages` with every copy made of identical tokens (see the module docstring): a free-text tool argument
    (`COPIED_ARGUMENTS`) that the current request contains after a space (and no tool result of the request
    returned) gets that leading space; a tool result of the request that the answer repeats after a space is quoted
    in the answer."""
    out: list[Message] = []
    request, results = "", []
    for m in messages:
        m = dict(m)
        if m.get("role") == "user":
            request, results = str(m.get("content") or ""), []
        elif m.get("role") == "tool":
            results.append(str(m.get("content") or ""))
        elif m.get("role") == "assistant" and m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                args = json.loads(call["function"]["arguments"])
                args = {k: " " + v if k in COPIED_ARGUMENTS and v and f" {v}" in request and v not in results else v
                        for k, v in args.items()}
                calls.append({**call, "function": {**call["function"], "arguments": json.dumps(args)}})
            m["tool_calls"] = calls
        elif m.get("role") == "assistant":
            text = str(m.get("content") or "")
            for r in sorted({r for r in results if r and f" {r}" in text}, key=len, reverse=True):
                text = text.replace(f" {r}", f' "{r}"')
            m["content"] = text
        out.append(m)
    return out


def expert_dialog(world: World, tasks: Sequence[WorldTask], max_steps: int = 6,
                  copy_format: bool = True) -> dict[str, Any] | None:
    """One dialog of the expert serving `tasks` in turn on one database, as an SFT record; None unless every
    answer holds its task's expected text and the end state is the gold actions' (replayed in order).
    `copy_format`: written with `copy_friendly`."""
    env = WorldEnv(world)
    ep = asyncio.run(run_episode(env, tasks[0], DialogExpert(tasks), DialogUser(tasks),
                                 max_steps=max_steps * len(tasks)))
    answers = _segment_answers(ep.messages)
    if ep.error or len(answers) != len(tasks) or not all(answer_ok(t, a) for t, a in zip(tasks, answers,
                                                                                             strict=True)):
        return None
    if env.state_hash() != _gold_hash(world, tasks):
        return None
    return {"messages": copy_friendly(ep.messages) if copy_format else ep.messages, "tools": TOOLS,
            "metadata": {"tasks": [t.id for t in tasks], "kinds": [t.kind for t in tasks], "agent": "expert",
                         "user": "scripted", "domain": "world", "world_seed": world.seed}}


def sft_records(world: World, n_tasks: int, *, registry_worlds: int = 4, tasks_per_dialog: int = 2,
                own_fraction: float = 0.25, seed: int = 0, copy_format: bool = True) -> list[dict[str, Any]]:
    """SFT records of about `n_tasks` requests: `own_fraction` of them about `world`'s training people, the rest
    spread over `registry_worlds` registry worlds of the same size; `tasks_per_dialog` requests per dialog;
    shuffled with `seed`; written with `copy_friendly` if `copy_format`. No record mentions a held-out person of
    `world`."""
    if tasks_per_dialog < 1:
        raise ValueError(f"tasks_per_dialog must be >= 1, got {tasks_per_dialog}")
    if registry_worlds < 0 or not 0.0 <= own_fraction <= 1.0:
        raise ValueError(f"need registry_worlds >= 0 and 0 <= own_fraction <= 1, got {registry_worlds}, "
                         f"{own_fraction}")
    heldout = {p.name for p in world.heldout_people}
    n_own = n_tasks if registry_worlds == 0 else round(n_tasks * own_fraction)
    plan = [(world, "train", n_own)]
    for k in range(registry_worlds):
        other = World.generate(seed=REGISTRY_SEED + k, n_people=len(world.people))
        # every person of a registry world is unseen in pretraining; its "train" split is as good as any
        plan.append((other, "train", (n_tasks - n_own) // registry_worlds + (k < (n_tasks - n_own) % registry_worlds)))
    records = []
    for w, split, n in plan:
        tasks = [t for t in make_tasks(w, split, n, seed=seed)
                 if w is world or (t.person not in heldout and not any(h in t.instruction for h in heldout))]
        for i in range(0, len(tasks), tasks_per_dialog):
            rec = expert_dialog(w, tasks[i: i + tasks_per_dialog], copy_format=copy_format)
            if rec is not None and (w is world or not any(h in json.dumps(rec["messages"]) for h in heldout)):
                records.append(rec)
    random.Random(seed).shuffle(records)
    return records


def tokenizer_chat_texts(world: World, n_dialogs: int, *, tasks_per_dialog: int = 2,
                         seed: int = 0) -> list[str]:
    """`n_dialogs` expert dialogs about registry-world people (none of `world`'s), rendered as K2 chat text with
    the tool declarations: extra training text for the *tokenizer* (`data.tokenizer_chat_dialogs`), so that it
    learns merges for the chat and tool-call format. A tokenizer trained on `world`'s prose alone spends 762
    tokens on the declarations and system prompt; with 20 such dialogs (+7% bytes) 275, for +3% tokens on the
    prose itself (docs/experiments.md, "SFT stage: a tokenizer that knows the tool format")."""
    from openk2.data.chat import render_chat
    from openk2.data.tokenizer import SPECIAL_TOKENS

    if n_dialogs <= 0:
        return []
    # The plain expert format: the tokenizer (and so pretraining) is the same as before `copy_friendly` existed.
    records = sft_records(world, n_dialogs * tasks_per_dialog, registry_worlds=2,
                          tasks_per_dialog=tasks_per_dialog, own_fraction=0.0, seed=seed, copy_format=False)
    # Control tokens enter sequences as ids, never as text: the text between them is what the tokenizer sees.
    control = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
    return [piece for r in records[:n_dialogs] for piece in control.split(render_chat(r["messages"], r["tools"]))
            if piece]


__all__ = ["COPIED_ARGUMENTS", "REGISTRY_SEED", "DialogExpert", "DialogUser", "copy_friendly", "expert_dialog",
           "sft_records", "tokenizer_chat_texts"]
