"""The single-controller RL loop (rl-design §6.5, HybridFlow style), colocated on one process:

    sample prompts (curriculum + prioritized) -> rollouts on the engine (asyncio.gather, K per prompt, T schedule,
    per-task token budgets, partial rollouts) -> rewards (env rewards, truncation penalty) -> advantages (registry)
    -> policy update (loss registry, AdamW or MuonClip, + PTX) -> weight sync to the engine -> version += 1

    controller = RLController(load_rl_config("recipes/rl-nano.toml", ["run.dir='runs/nano/rl'"]))
    summary = controller.run()          # resumes from <run>/checkpoints if present

Outputs in `run.dir`: `metrics.jsonl` (+ TensorBoard) with one record per step, `checkpoints/step_N` (the whole RL
state: `openk2.rl.checkpoint`), `rl_config.json`, `tokenizer/` and `train_config.json` (so `openk2 eval --model
<run>` loads the policy), `eval.jsonl` (greedy pass@1 on held-out tasks at step 0, every `eval.every` steps and
at the end) and `summary.json`.

Partial rollouts: a group (one prompt, K samples) whose members are not all finished stays in the buffer; its
paused members resume next iteration (`rollout.run_episode(resume=...)`); it is trained on once all K are done.
Failed samples (a reward that raised or hung) are logged with the reason and left out of their group.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from openk2.rl.advantages import AdvantageConfig, get_advantage_estimator
from openk2.rl.checkpoint import RLState, load_rl_checkpoint, restore_rng, save_rl_checkpoint
from openk2.rl.config import RLConfig, RLConfigError, config_json
from openk2.rl.envs import TaskFamily, make_family
from openk2.rl.rollout import EpisodeBudget, run_episode
from openk2.rl.sampler import TaskSampler
from openk2.rl.types import RolloutEngine, SamplingParams, Trajectory
from openk2.rl.update import PolicyUpdater, PTXData
from openk2.rl.weight_sync import InProcessSync

FINISHED = ("completed", "truncated", "failed")


@dataclass
class Group:
    """One prompt and its K samples; `trajs[k]` is None until sample k first runs."""

    group_id: str
    family: str
    index: int
    trajs: list[Trajectory | None] = field(default_factory=list)

    def done(self) -> bool:
        return all(t is not None and t.status in FINISHED for t in self.trajs)

    def to_dict(self) -> dict[str, Any]:
        return {"group_id": self.group_id, "family": self.family, "index": self.index,
                "trajs": [t.to_dict() if t is not None else None for t in self.trajs]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        return cls(d["group_id"], d["family"], d["index"],
                   [Trajectory.from_dict(t) if t is not None else None for t in d["trajs"]])


def default_engine(model: torch.nn.Module, tokenizer: Any, max_batch: int = 128, compile: bool = False
                   ) -> RolloutEngine:
    """The in-process batched, KV-cached engine (`openk2.rl.engine.TorchEngine`) on a copy of the policy."""
    from openk2.rl.engine import TorchEngine

    return TorchEngine(model, max_batch=max_batch, compile=compile)


class RLController:
    def __init__(self, cfg: RLConfig, engine_factory: Any = None, log: Any = print) -> None:
        from openk2.model_dir import load_model_dir

        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.run.dir)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.manual_seed(cfg.run.seed)
        init = Path(cfg.run.init)
        if not init.exists():
            raise RLConfigError(f"run.init={init} does not exist (the starting model: an SFT run directory "
                                "or a HF checkpoint)")
        loaded = load_model_dir(init, device="cpu" if not torch.cuda.is_available() else "auto")
        self.model, self.tokenizer, self.fmt = loaded.model, loaded.tokenizer, loaded.chat_format
        self.init_source = loaded.source
        names = list(dict.fromkeys([*cfg.tasks.mix, *cfg.eval.families]))
        try:
            self.families: dict[str, TaskFamily] = {n: make_family(n, cfg.tasks, self.fmt) for n in names}
            self.pools = {n: self.families[n].train_tasks(cfg.tasks.train_pool, cfg.run.seed)
                          for n, w in cfg.tasks.mix.items() if w > 0}
        except ValueError as e:
            raise RLConfigError(str(e)) from None
        self.heldout: dict[str, list[Any]] = {}
        levels = {n: [self.families[n].level(t) for t in pool] for n, pool in self.pools.items()}
        self.sampler = TaskSampler(levels, {n: cfg.tasks.mix[n] for n in self.pools}, cfg.sampler, cfg.run.seed)
        ptx = PTXData.from_files(cfg.ptx_paths(), self.fmt, cfg.train.ptx_batch, cfg.train.ptx_seq_len,
                                 seed=cfg.run.seed) if cfg.train.ptx_coef > 0 else None
        self.updater = PolicyUpdater(self.model, cfg.train, ptx)
        self.adv_fn = get_advantage_estimator(cfg.train.advantage)
        self.budget_penalty = cfg.budget_penalty()
        self.step, self.version = 0, 0
        self.buffer: list[Group] = []
        self.counters: Counter[str] = Counter()
        self._prepare_run_dir()
        self._resume()
        engine_model = copy.deepcopy(self.model).eval()
        if engine_factory is None:
            self.engine = default_engine(engine_model, self.tokenizer,
                                         max_batch=cfg.rollout.group_size * cfg.rollout.prompts_per_step,
                                         compile=cfg.rollout.compile)
        else:
            self.engine = engine_factory(engine_model, self.tokenizer)
        self.weight_sync = InProcessSync(self.engine)
        self._sync(self.version)

    # ---------------------------------------------------------------------------------------------- run dir
    def _prepare_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stored = self.run_dir / "rl_config.json"
        current = config_json(self.cfg)
        if stored.is_file() and not self.cfg.run.force:
            old, new = json.loads(stored.read_text()), json.loads(current)
            free = {"steps", "progress", "force", "threads", "tensorboard", "every", "time_limit_min"}
            diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items() for k, v in sec.items()
                    if old.get(s, {}).get(k) != v and k not in free]
            if diff:
                raise RLConfigError(f"{self.run_dir} holds a run with another config:\n  " + "\n  ".join(diff)
                                    + "\nUse a new --out, or --set run.force=true to resume anyway.")
        stored.write_text(current)
        # What a run directory needs so that eval/serve/load_model_dir accept it (see model_dir.py).
        tok_src = self.init_source / "tokenizer" if (self.init_source / "tokenizer").is_dir() else self.init_source
        if not (self.run_dir / "tokenizer").is_dir():
            (self.run_dir / "tokenizer").mkdir()
            for f in ("tokenizer.json", "tiktoken.model", "tokenizer_config.json", "chat_template.jinja",
                      "special_tokens_map.json", "generation_config.json"):
                if (tok_src / f).is_file():
                    shutil.copy2(tok_src / f, self.run_dir / "tokenizer" / f)
        init_cfg = self.init_source / "train_config.json"
        if init_cfg.is_file() and not (self.run_dir / "train_config.json").is_file():
            shutil.copy2(init_cfg, self.run_dir / "train_config.json")

    def _resume(self) -> None:
        state = load_rl_checkpoint(self.run_dir)
        if state is None:
            return
        self.model.load_state_dict(state.model)
        self.updater.optimizer.load_state_dict(state.optimizer)
        self.sampler.load_state_dict(state.sampler)
        self.buffer = [Group.from_dict(g) for g in state.buffer]
        self.counters = Counter(state.counters)
        if self.updater.ptx is not None and state.ptx:
            self.updater.ptx.load_state_dict(state.ptx)
        self.step, self.version = state.step, state.version
        restore_rng(state)
        self.log(f"rl: resumed {self.run_dir} at step {self.step} (policy version {self.version}, "
                 f"{len(self.buffer)} groups in the partial-rollout buffer)")

    def close(self) -> None:
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def save(self) -> Path:
        return save_rl_checkpoint(self.run_dir, RLState(
            step=self.step, version=self.version, model=self.model.state_dict(),
            model_config=self.model.config.to_hf_dict(), optimizer=self.updater.optimizer.state_dict(),
            sampler=self.sampler.state_dict(), buffer=[g.to_dict() for g in self.buffer],
            counters=dict(self.counters), ptx=self.updater.ptx.state_dict() if self.updater.ptx is not None else {}),
            self.cfg.run.keep_last)

    def _sync(self, version: int) -> float:
        """In-process weight sync: the trainer's tensors into the engine's copy (rl-design §6.2 WeightSync)."""
        t0 = time.perf_counter()
        self.weight_sync.send(self.model.state_dict().items(), version)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------------- rollouts
    def _budget(self, task_type: str) -> EpisodeBudget:
        r = self.cfg.rollout
        return EpisodeBudget(self.budget_penalty.max_new_tokens(task_type), r.segment_tokens, r.max_context,
                             r.reward_timeout_s)

    def _request_seed(self, *parts: Any) -> int:
        """A per-request sampling seed from the run seed and the request's identity: rollouts do not depend on
        the order the engine serves requests in, and a resumed run samples exactly what the killed one would."""
        import zlib

        return zlib.crc32("/".join(str(p) for p in (self.cfg.run.seed, *parts)).encode())

    async def _episode(self, group: Group, k: int, params: SamplingParams) -> Trajectory:
        family = self.families[group.family]
        task = self.pools[group.family][group.index]
        resume = group.trajs[k]
        env = family.make_env()
        n_seg = resume.n_segments if resume is not None else 0
        try:
            return await run_episode(
                env, task, self.engine, self.fmt,
                SamplingParams(temperature=params.temperature, top_p=params.top_p,
                               seed=self._request_seed(group.group_id, k, n_seg)),
                budget=self._budget(family.task_type(task)), group_id=group.group_id,
                request_id=f"{group.group_id}/{k}/{n_seg}", task_type=family.task_type(task), resume=resume,
                metadata={"family": group.family, "task_id": family.task_id(task), "sample": k})
        finally:
            await env.close()

    async def _rollout(self, groups: list[Group], temperature: float) -> None:
        params = SamplingParams(temperature=temperature, top_p=self.cfg.rollout.top_p)
        jobs = [(g, k) for g in groups for k in range(len(g.trajs))
                if g.trajs[k] is None or g.trajs[k].status == "aborted"]
        results = await asyncio.gather(*(self._episode(g, k, params) for g, k in jobs))
        for (g, k), traj in zip(jobs, results, strict=True):
            g.trajs[k] = traj

    # ---------------------------------------------------------------------------------------------- rewards
    def _shaped_reward(self, t: Trajectory) -> float:
        return float(t.reward or 0.0) + self.budget_penalty.score(t)

    def _train_batch(self, groups: list[Group]) -> tuple[list[Trajectory], torch.Tensor, dict[str, Any]]:
        trajs: list[Trajectory] = []
        gids: list[int] = []
        rewards: list[float] = []
        zero_adv = 0
        stats: dict[str, Any] = {}
        by_type: dict[str, list[float]] = defaultdict(list)
        passes: dict[str, list[float]] = defaultdict(list)
        lengths, truncated, failed = [], 0, 0
        for gi, g in enumerate(groups):
            members = [t for t in g.trajs if t is not None]
            valid = [t for t in members if t.status != "failed"]
            failed += len(members) - len(valid)
            for t in members:
                if t.status == "failed":
                    self.log(f"rl: sample {g.group_id}/{t.metadata.get('sample')} failed: {t.reward_info.get('error')}")
            shaped = [self._shaped_reward(t) for t in valid]
            for t, r in zip(valid, shaped, strict=True):
                by_type[t.task_type].append(r)
                passes[g.family].append(float((t.reward or 0.0) >= 1.0))
                lengths.append(t.n_policy_tokens)
                truncated += t.status == "truncated"
            if valid:
                self.sampler.update(g.family, g.index, sum(float((t.reward or 0) >= 1.0) for t in valid) / len(valid))
            if len(valid) < 2:
                continue
            no_signal = max(shaped) - min(shaped) < 1e-9
            zero_adv += no_signal
            if no_signal and self.cfg.train.drop_zero_advantage_groups:
                continue
            trajs += valid
            gids += [gi] * len(valid)
            rewards += shaped
        n = max(len(lengths), 1)
        all_rewards = [r for rs in by_type.values() for r in rs]
        stats.update({"reward/mean": sum(all_rewards) / max(len(all_rewards), 1),
                      "pass_rate": sum(sum(v) for v in passes.values()) / max(sum(len(v) for v in passes.values()), 1),
                      "response_len": sum(lengths) / n, "truncation_rate": truncated / n, "failed_samples": failed,
                      "zero_adv_groups": zero_adv / max(len(groups), 1), "groups_trained": len(groups)})
        stats.update({f"reward/{k}": sum(v) / len(v) for k, v in sorted(by_type.items())})
        stats.update({f"pass_rate/{k}": sum(v) / len(v) for k, v in sorted(passes.items())})
        if not trajs:
            return [], torch.zeros(0), stats
        adv = self.adv_fn(torch.tensor(rewards), torch.tensor(gids), AdvantageConfig(tau=self.cfg.train.tau))
        return trajs, adv, stats

    # ---------------------------------------------------------------------------------------------- the loop
    def rl_step(self) -> dict[str, Any]:
        cfg = self.cfg
        temperature = cfg.temperature_at(self.step)
        t0 = time.perf_counter()
        n_new = max(cfg.rollout.prompts_per_step - len(self.buffer), 0)
        for j, (family, index) in enumerate(self.sampler.sample(n_new)):
            self.buffer.append(Group(f"s{self.step}-p{j}", family, index, [None] * cfg.rollout.group_size))
        asyncio.run(self._rollout(self.buffer, temperature))
        t_rollout = time.perf_counter() - t0
        ready = [g for g in self.buffer if g.done()]
        self.buffer = [g for g in self.buffer if not g.done()]
        t0 = time.perf_counter()
        trajs, adv, record = self._train_batch(ready)
        t_reward = time.perf_counter() - t0
        t0 = time.perf_counter()
        record.update(self.updater.update(trajs, adv, temperature, self.version) if trajs else {})
        t_update = time.perf_counter() - t0
        self.version += 1
        t_sync = self._sync(self.version)
        self.step += 1
        record.update({"step": self.step, "version": self.version, "temperature": temperature,
                       "partial_groups": len(self.buffer),
                       "paused_samples": sum(t is not None and t.status == "aborted" for g in self.buffer
                                             for t in g.trajs),
                       "time/rollout": t_rollout, "time/reward": t_reward, "time/update": t_update,
                       "time/sync": t_sync, **self.sampler.stats()})
        return record

    def evaluate(self) -> dict[str, Any]:
        """Greedy pass@1 on each evaluation family's held-out tasks (the same tasks every time)."""
        out: dict[str, Any] = {}
        for name in self.cfg.eval.families:
            if name not in self.heldout:
                sizes = self.cfg.eval.n_heldout
                self.heldout[name] = self.families[name].heldout_tasks(sizes.get(name, sizes.get("default", 200)),
                                                                       self.cfg.eval.seed)
            out.update(asyncio.run(self._eval_family(name, self.heldout[name])))
        return out

    async def _eval_family(self, name: str, tasks: list[Any]) -> dict[str, Any]:
        family = self.families[name]

        async def one(i: int, task: Any) -> Trajectory:
            env = family.make_env()
            try:
                budget = self._budget(family.task_type(task))
                budget.segment_tokens = 0
                return await run_episode(env, task, self.engine, self.fmt, SamplingParams(temperature=0.0),
                                         budget=budget, group_id=f"eval-{name}-{i}", request_id=f"eval-{name}-{i}",
                                         task_type=family.task_type(task))
            finally:
                await env.close()

        trajs = await asyncio.gather(*(one(i, t) for i, t in enumerate(tasks)))
        ok: dict[str, list[float]] = defaultdict(list)
        for t in trajs:
            passed = float((t.reward or 0.0) >= 1.0)
            ok[name].append(passed)
            ok[t.task_type].append(passed)
        return {f"eval/{k}/pass@1": sum(v) / len(v) for k, v in sorted(ok.items())}

    def run(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        from openk2.train.metrics import MetricsLogger

        cfg = self.cfg
        metrics = MetricsLogger(self.run_dir, tensorboard=cfg.run.tensorboard, resume_step=self.step)
        evals_path = self.run_dir / "eval.jsonl"
        evals = _read_jsonl(evals_path, upto=self.step)
        _write_jsonl(evals_path, evals)
        t_start = time.perf_counter()
        if not evals:
            evals.append({"step": 0, **self.evaluate()})
            _write_jsonl(evals_path, evals)
            self.log(f"rl: step 0 held-out greedy pass@1: {_fmt_eval(evals[-1])}")
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="rl", unit="step",
                   disable=not cfg.run.progress, dynamic_ncols=True)
        deadline = t_start + 60 * cfg.run.time_limit_min if cfg.run.time_limit_min > 0 else float("inf")
        try:
            while self.step < cfg.train.steps:
                record = self.rl_step()
                last = self.step == cfg.train.steps or time.perf_counter() >= deadline
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or last:
                    evals.append({"step": self.step, **self.evaluate()})
                    _write_jsonl(evals_path, evals)
                    record.update({k: v for k, v in evals[-1].items() if k != "step"})
                record["time/wall_this_process"] = time.perf_counter() - t_start
                metrics.log(record)
                if self.step % cfg.run.checkpoint_every == 0 or last:
                    self.save()
                if os.environ.get("OPENK2_FAULT_KILL_AT_STEP") == str(self.step):  # crash-resume tests
                    os.kill(os.getpid(), signal.SIGKILL)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward/mean']:.2f}", pass_rate=f"{record['pass_rate']:.2f}",
                                T=f"{record['temperature']:.2f}")
                if last and self.step < cfg.train.steps:
                    self.log(f"rl: time limit of {cfg.run.time_limit_min:g} min reached at step {self.step}")
                    break
        finally:
            bar.close()
            metrics.close()
            self.close()
        if evals:
            self.log(f"rl: step {evals[-1]['step']} held-out greedy pass@1: {_fmt_eval(evals[-1])}")
        summary = {"steps": self.step, "version": self.version, "wall_s_this_process": time.perf_counter() - t_start,
                   "before": evals[0] if evals else {}, "after": evals[-1] if evals else {},
                   "skipped_updates": self.updater.skipped_updates, "config": cfg.to_dict()}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        return summary


def _fmt_eval(record: dict[str, Any]) -> str:
    return ", ".join(f"{k.removeprefix('eval/').removesuffix('/pass@1')} {v:.1%}" for k, v in record.items()
                     if k.startswith("eval/") and k.count("/") == 2)


def _read_jsonl(path: Path, upto: int) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def run_rl(cfg: RLConfig, engine_factory: Any = None, log: Any = print) -> dict[str, Any]:
    threads = torch.get_num_threads()  # `run.threads` is for this run only, not for the rest of the caller's process
    try:
        return RLController(cfg, engine_factory=engine_factory, log=log).run()
    finally:
        torch.set_num_threads(threads)


__all__ = ["Group", "RLController", "default_engine", "run_rl"]
