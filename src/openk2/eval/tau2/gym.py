"""A gym-style interface over the τ²-bench environments for the RL stage: the policy being trained is the agent;
the user simulator (a `ChatFn`) and the NL-assertion judge are part of the environment.

    gym = Tau2GymEnv("retail", user=user_chat, split="train")
    obs = gym.reset("0")                      # {"messages": [...agent view...], "tools": [...]}
    obs, reward, terminated, truncated, info = gym.step({"role": "assistant", "content": "..."})

`step` takes one assistant message (text, or tool calls in OpenAI format). Tool calls run at once and the
observation returns to the agent; a text goes to the user simulator, which answers (running its own phone tools
in telecom) until it is the agent's turn again or it stops. The reward (0..1, the benchmark's) comes with the
step that terminates; truncation is the step / error limit (reward 0, as in the reference). The train splits
(`split_tasks.json`) are the default for RL; `split="test"` stays for evaluation. Async code uses
`areset` / `astep`.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

from openk2.eval.task import ChatFn, Message
from openk2.eval.tau2.env import Tau2Env, make_env
from openk2.eval.tau2.orchestrator import (
    FIRST_AGENT_MESSAGE,
    MAX_ERRORS,
    MAX_STEPS,
    Episode,
    _run_tools,
    agent_system_prompt,
    agent_view,
    is_user_stop,
    user_system_prompt,
    user_view,
)
from openk2.eval.tau2.scoring import score_episode
from openk2.eval.tau2.tasks import Task, load_tasks


class Tau2GymEnv:
    def __init__(self, domain: str, user: ChatFn, split: str = "train", judge: ChatFn | None = None,
                 data_dir: Path | None = None, max_steps: int = MAX_STEPS, max_errors: int = MAX_ERRORS,
                 seed: int = 0) -> None:
        self.domain, self.user, self.judge, self.data_dir = domain, user, judge, data_dir
        self.tasks: list[Task] = load_tasks(domain, data_dir, split=split)
        self.max_steps, self.max_errors = max_steps, max_errors
        self.rng = random.Random(seed)
        self.env: Tau2Env | None = None
        self.episode = Episode()

    # -- observations --
    def observation(self) -> dict[str, Any]:
        assert self.env is not None
        system = {"role": "system", "content": agent_system_prompt(self.env.policy)}
        return {"messages": [system, *agent_view(self.episode.transcript)], "tools": self.env.tool_schemas()}

    # -- async API --
    async def areset(self, task: str | Task | None = None) -> dict[str, Any]:
        if task is None:
            task = self.rng.choice(self.tasks)
        elif isinstance(task, str):
            task = next(t for t in self.tasks if t.id == task)
        self.env = make_env(self.domain, task=task, data_dir=self.data_dir)
        self.episode = Episode(transcript=[{"role": "assistant", "content": FIRST_AGENT_MESSAGE}])
        await self._user_turns()
        return self.observation()

    async def astep(self, action: Message) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        if self.env is None or self.episode.termination is not None:
            raise RuntimeError("call reset() before step() (the episode is over)")
        ep = self.episode
        calls = action.get("tool_calls") or []
        entry: Message = {"role": "assistant", "content": action.get("content")}
        if calls:
            entry["tool_calls"] = calls
        ep.transcript.append(entry)
        ep.steps += 1
        if calls:
            ep.transcript.extend(_run_tools(self.env, calls, "assistant", ep))
            ep.steps += 1
        elif not action.get("content"):
            ep.termination, ep.error = "agent_error", "agent message with neither text nor tool calls"
        else:
            await self._user_turns()
        self._limits()
        return await self._result()

    async def _user_turns(self) -> None:
        """Let the user simulator act until it addresses the agent or stops."""
        ep, env = self.episode, self.env
        system = {"role": "system", "content": user_system_prompt(env, self.data_dir)}
        while ep.termination is None:
            try:
                msg = await self.user([system, *user_view(ep.transcript)], env.user_tool_schemas())
            except Exception as e:
                ep.termination, ep.error = "user_error", f"{type(e).__name__}: {e}"
                return
            calls = msg.get("tool_calls") or []
            entry: Message = {"role": "user", "content": msg.get("content")}
            if calls:
                entry["tool_calls"] = calls
            ep.transcript.append(entry)
            ep.steps += 1
            if calls:
                ep.transcript.extend(_run_tools(env, calls, "user", ep))
                ep.steps += 1
                self._limits()
                continue
            if is_user_stop(msg.get("content")):
                ep.termination = "user_stop"
            elif not msg.get("content"):
                ep.termination, ep.error = "user_error", "user message with neither text nor tool calls"
            return

    def _limits(self) -> None:
        ep = self.episode
        if ep.termination is None and ep.steps >= self.max_steps:
            ep.termination = "max_steps"
        if ep.termination is None and ep.errors >= self.max_errors:
            ep.termination = "too_many_errors"

    async def _result(self) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        ep = self.episode
        info: dict[str, Any] = {"task_id": self.env.task.id, "termination": ep.termination, "steps": ep.steps,
                                "errors": ep.errors}
        if ep.termination is None:
            return self.observation(), 0.0, False, False, info
        truncated = ep.termination in {"max_steps", "too_many_errors"}
        result = await score_episode(self.env, ep.transcript, ep.termination, judge=self.judge,
                                     data_dir=str(self.data_dir) if self.data_dir else None)
        info["score"] = result
        return self.observation(), float(result["reward"]), not truncated, truncated, info

    # -- sync API (not from inside a running event loop) --
    def reset(self, task: str | Task | None = None) -> dict[str, Any]:
        return asyncio.run(self.areset(task))

    def step(self, action: Message) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        return asyncio.run(self.astep(action))
