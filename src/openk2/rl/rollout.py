"""The episode driver: one task, one env, one engine -> one `Trajectory`, token-in/token-out.

    traj = await run_episode(env, task, engine, chat_format, params, budget=EpisodeBudget(max_new_tokens=12),
                             group_id="g0", request_id="g0/3", task_type="digits/sort")

The prompt is the env's first observation rendered with the model's chat format (`ChatFormat.render_ids`,
the K2 chat template); every later environment turn (tool results, user turns) is rendered as the suffix that
the chat template appends after the assistant turn, and joins the response with loss mask 0. Policy tokens are
the engine's tokens verbatim (never re-rendered), with their behaviour log-probs and the engine's version, so
the trainer scores exactly what was sampled (verl's lesson, rl-design §4.1).

Budget control (K2): at most `budget.max_new_tokens` policy tokens per episode; hitting it truncates the episode
(status "truncated", the controller applies the penalty). Partial rollouts (K1.5 §2.6.2): at most
`budget.segment_tokens` policy tokens per call (per iteration); an episode that needs more, or whose request the
engine aborted, returns with status "aborted" and resumes with `run_episode(..., resume=traj)` next iteration:
the env is rebuilt by replaying the episode's earlier actions (`metadata["actions"]`, deterministic envs), and
generation continues from prompt + response with the remaining budget.

An env step (reward) that raises or takes longer than `step_timeout_s` ends the episode with status "failed",
reward 0 and the reason in `reward_info["error"]`; the run goes on.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from typing import Any

from openk2.data.chat_format import ChatFormat
from openk2.rl.types import Env, Observation, RolloutEngine, SamplingParams, StepResult, Trajectory


@dataclass
class EpisodeBudget:
    max_new_tokens: int              # policy tokens per episode (K2 budget control)
    segment_tokens: int = 0          # policy tokens per iteration before the episode is paused (0 = no cap)
    max_context: int = 1024          # prompt + response
    step_timeout_s: float = 30.0


class StepFailed(Exception):
    """The env's step (its reward) raised or timed out."""


async def _step(env: Env, text: str, timeout_s: float) -> StepResult:
    try:
        return await asyncio.wait_for(env.step(text), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise StepFailed(f"env step timed out after {timeout_s:g} s") from None
    except Exception as e:  # noqa: BLE001 (any failure of a reward is the sample's, not the run's)
        raise StepFailed(f"env step raised {type(e).__name__}: {e}") from None


def _strip_stop(ids: list[int], stop_ids: frozenset[int]) -> list[int]:
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def _env_suffix(fmt: ChatFormat, history: list[dict[str, Any]], assistant: dict[str, Any],
                new_messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
    """The ids the chat template writes after `assistant` for `new_messages`, up to the next generation prompt."""
    base = fmt.render_ids([*history, assistant], tools, add_generation_prompt=False)
    full = fmt.render_ids([*history, assistant, *new_messages], tools, add_generation_prompt=True)
    if full[:len(base)] != base:
        raise ValueError("the chat template does not render the dialog's beginning as a prefix of the whole")
    return full[len(base):]


async def run_episode(env: Env, task: Any, engine: RolloutEngine, fmt: ChatFormat, params: SamplingParams, *,
                      budget: EpisodeBudget, group_id: str, request_id: str, task_type: str,
                      seed: int | None = None, resume: Trajectory | None = None,
                      metadata: dict[str, Any] | None = None) -> Trajectory:
    obs = await env.reset(task, seed=seed)
    history: list[dict[str, Any]] = list(obs.messages or [])
    tools = obs.tools
    if resume is None:
        prompt_ids = list(obs.prompt_ids) if obs.prompt_ids is not None else fmt.render_ids(history, tools)
        traj = Trajectory(group_id=group_id, prompt_ids=prompt_ids, task_type=task_type, n_segments=0,
                          metadata={**(metadata or {}), "actions": [], "history": history, "turn_start": 0})
    else:
        traj = dataclasses.replace(resume, metadata=dict(resume.metadata), status="completed")
        try:  # rebuild the env's state: replay the finished turns' actions (deterministic envs)
            for action in traj.metadata.get("actions", []):
                result = await _step(env, action, budget.step_timeout_s)
                if result.observation is not None:
                    tools = result.observation.tools or tools
        except StepFailed as e:
            return _failed(traj, f"replaying the episode to resume it: {e}")
    stop_ids = fmt.stop_ids
    while True:
        used = traj.n_policy_tokens
        room = min(budget.max_new_tokens - used, budget.max_context - len(traj.prompt_ids) - len(traj.response_ids))
        if room <= 0:
            traj.status = "truncated"
            traj.reward_info["truncated"] = "token budget" if budget.max_new_tokens - used <= 0 else "context"
            return traj
        ask = min(room, budget.segment_tokens - traj.metadata.get("segment_used", 0)) if budget.segment_tokens \
            else room
        if ask <= 0:  # this iteration's segment is spent: pause, resume next iteration
            traj.status = "aborted"
            traj.metadata["segment_used"] = 0
            return traj
        out = await engine.generate(traj.prompt_ids + traj.response_ids,
                                    dataclasses.replace(params, max_new_tokens=ask,
                                                        stop_token_ids=tuple(sorted(stop_ids))), request_id)
        traj.append(list(out.token_ids), list(out.logprobs), out.version, policy=True)
        traj.n_segments += 1
        if budget.segment_tokens:
            traj.metadata["segment_used"] = traj.metadata.get("segment_used", 0) + len(out.token_ids)
        if out.finish_reason == "abort":
            traj.status = "aborted"
            traj.metadata["segment_used"] = 0
            return traj
        if out.finish_reason != "stop":
            continue  # "length": the loop decides between truncation, pause and going on
        turn_ids = traj.response_ids[traj.metadata["turn_start"]:]
        text = fmt.tokenizer.decode(_strip_stop(turn_ids, stop_ids))
        try:
            result = await _step(env, text, budget.step_timeout_s)
        except StepFailed as e:
            return _failed(traj, str(e))
        traj.metadata["actions"].append(text)
        if result.terminated or result.truncated or result.observation is None:
            traj.reward = float(result.reward)
            traj.reward_info.update({k: v for k, v in result.info.items() if _jsonable(v)})
            traj.status = "truncated" if result.truncated else "completed"
            if result.truncated:
                traj.reward_info.setdefault("truncated", "env")
            return traj
        assistant = result.info.get("assistant_message") or {"role": "assistant", "content": text}
        new = list(result.observation.messages or [])
        tools = result.observation.tools or tools
        env_ids = _env_suffix(fmt, traj.metadata["history"], assistant, new, tools)
        traj.metadata["history"] = [*traj.metadata["history"], assistant, *new]
        traj.append(env_ids, None, -1, policy=False)
        traj.metadata["turn_start"] = len(traj.response_ids)


def _failed(traj: Trajectory, reason: str) -> Trajectory:
    traj.status = "failed"
    traj.reward = 0.0
    traj.reward_info["error"] = reason
    return traj


def _jsonable(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool, type(None)))


def observation_messages(obs: Observation) -> list[dict[str, Any]]:
    return list(obs.messages or [])


__all__ = ["EpisodeBudget", "StepFailed", "run_episode"]
