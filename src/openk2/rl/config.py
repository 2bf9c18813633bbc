"""The RL run's typed configuration (`openk2 rl --config recipes/rl-nano.toml --set train.lr=3e-4`).

Every key is a dataclass field; an unknown key, a wrong type or a bad value is a `RLConfigError` that lists the
valid keys or says what is allowed. Values marked "openk2 choice" are not given by K1.5/K2 (rl-design §9).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from openk2.train.config import parse_override, set_typed_field, tomllib

if TYPE_CHECKING:
    from openk2.rl.rewards.shaping import BudgetPenalty


class RLConfigError(ValueError):
    """An invalid RL configuration or override; the message says which key and what is allowed."""


@dataclass
class RunSection:
    dir: str = "runs/nano/rl"
    init: str = "runs/nano/sft"      # the starting model: a run directory (SFT) or a HF checkpoint
    seed: int = 0
    tensorboard: bool = True
    progress: bool = True
    checkpoint_every: int = 10       # RL steps between checkpoints (and always at the last step)
    keep_last: int = 2
    force: bool = False              # resume even if the stored config differs
    threads: int = 0                 # torch threads; 0 = torch's default
    time_limit_min: float = 0.0      # stop (final evaluation and checkpoint) after this many minutes; 0 = none


@dataclass
class TasksSection:
    # Task families and their sampling weights: digits (procedural), world (multi-turn tools),
    # bench:<name> (an eval-harness benchmark as single-turn tasks), tau2:<domain> (train split, needs a user LLM).
    mix: dict[str, float] = field(default_factory=lambda: {"digits": 1.0})
    train_pool: int = 2000           # tasks per family in the sampler's pool
    digits_kinds: list[str] = field(default_factory=lambda: ["reverse", "sort", "add"])
    digits_levels: list[int] = field(default_factory=lambda: [1, 2])
    digits_partial_credit: bool = False   # wrong answers earn 0.5 x the fraction of right digit positions (training)
    world_seed: int = 0              # the pretraining world (facts, world): recipes/nano.toml's data.world_*
    world_people: int = 100
    world_qa_fraction: float = 0.5   # facts: people with Q/A documents in pretraining train, the others are held out
    facts_attributes: list[str] = field(default_factory=lambda: ["birth_city", "birth_date", "university", "field",
                                                                 "employer", "hobby"])
    # facts: a wrong answer of the right kind (one value of the asked attribute, none of another) earns 0.25 (training)
    facts_partial_credit: bool = False
    # facts: whom RL trains on: "qa" (the Q/A-document people; held out: the biography-only people) or "biography"
    # (half of the biography-only people; held out: their other half)
    facts_train_people: str = "qa"
    world_max_turns: int = 4         # model turns per world episode
    # world: train tasks also about the people of this many registry worlds (unseen names: the model must copy them
    # from the request, as on held-out people), evenly mixed with the world's own training people
    world_registry_worlds: int = 0
    world_kinds: dict[str, float] = field(default_factory=dict)  # train task-kind weights; {} = world_tasks' mix
    world_partial_credit: bool = False   # failed episodes earn 0.5 x the fraction of gold tool calls made (training)
    bench_data_dir: str = "../shared/data"
    tau2_user_model: str = ""        # "URL#model" of an OpenAI-compatible endpoint: τ²'s user simulator


@dataclass
class RolloutSection:
    group_size: int = 8              # K samples per prompt
    prompts_per_step: int = 16
    temperature: float = 1.0         # T0 (exploration) ...
    temperature_min: float = 1.0     # ... decayed linearly to T_min over temperature_decay_steps (openk2 choice)
    temperature_decay_steps: int = 0
    top_p: float = 1.0
    # Budget control (K2): max new tokens per task type (family name or family/kind); truncation is penalised.
    max_new_tokens: dict[str, int] = field(default_factory=lambda: {"digits": 12, "facts": 16, "world": 128,
                                                                     "facts_paraphrase": 16, "facts_linked": 16,
                                                                     "bench": 256, "tau2": 128})
    default_max_new_tokens: int = 64
    truncation_penalty: float = 0.5  # subtracted from a truncated response's reward (openk2 choice)
    # Partial rollouts (K1.5 §2.6.2): at most this many policy tokens per trajectory per iteration; longer ones are
    # kept as "aborted" and resumed next iteration. 0 = no per-iteration cap.
    segment_tokens: int = 0
    max_context: int = 1024          # prompt + response tokens; an episode that outgrows it ends truncated
    reward_timeout_s: float = 30.0   # a reward/env step slower than this fails the sample (the run continues)
    # Compile the engine's decode step: pays off for long decodes on GPU; on CPU with short answers the compile
    # time (minutes) exceeds the whole run's decoding.
    compile: bool = False


@dataclass
class TrainSection:
    steps: int = 100
    loss: str = "kimi_k15"
    advantage: str = "mean"
    tau: float = 0.05
    length_normalize: bool = False
    clip_low: float = 0.2
    clip_high: float = 0.2
    old_logprobs: str = "recompute"  # π_old for the loss: "recompute" (trainer, T=1, before the update) or "behaviour"
    mask_old_segments: bool = False  # partial rollouts: no loss on segments sampled by an older policy
    optimizer: str = "adamw"         # adamw | muonclip
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    micro_batch: int = 64            # sequences per forward/backward (gradient accumulation)
    minibatches: int = 1             # optimizer steps per rollout batch (K1.5: off-policy within an iteration)
    # Leave groups whose rewards are all equal out of the update: no cost for them. Exact for the PPO-style losses
    # (A = 0 contributes nothing) and for kimi_k15 with one minibatch; with several minibatches kimi_k15 loses their
    # τΔ² anchor on the later minibatches (openk2 choice, a CPU saving when most groups carry no signal)
    drop_zero_advantage_groups: bool = False
    ptx_coef: float = 0.0            # λ_ptx: weight of the LM loss on held-out SFT data (openk2 choice)
    # chat JSONL (assistant tokens are the targets); [] = the starting SFT run's own data, <run.init>/data/train.jsonl
    ptx_files: list[str] = field(default_factory=list)
    ptx_batch: int = 8               # PTX rows per optimizer step (one batch per minibatch)
    # PTX row length: a world-domain SFT dialog is ~480 tokens (its prompt alone ~260), so rows of the SFT stage's
    # 512; longer conversations are split at their user turns (`openk2.train.sft_data.split_requests`)
    ptx_seq_len: int = 512


@dataclass
class EvalSection:
    every: int = 20                  # RL steps between held-out evaluations (also at step 0 and the end); 0 = ends
    # held-out tasks per family (greedy pass@1); families not listed get `default`
    n_heldout: dict[str, int] = field(default_factory=lambda: {"default": 200, "world": 40})
    seed: int = 0
    families: list[str] = field(default_factory=lambda: ["digits"])


@dataclass
class SamplerSection:
    curriculum: bool = True          # admit harder levels once the easier ones pass often enough
    curriculum_threshold: float = 0.5
    start_level: int = 1
    prioritized: bool = True         # p ∝ (1 − success) + floor (K1.5 §2.3.4)
    priority_floor: float = 0.05
    success_ema: float = 0.5         # weight of the newest group's pass rate in a task's success estimate


@dataclass
class RLConfig:
    run: RunSection = field(default_factory=RunSection)
    tasks: TasksSection = field(default_factory=TasksSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    sampler: SamplerSection = field(default_factory=SamplerSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RLConfig:
        cfg = cls()
        for section, values in d.items():
            if not isinstance(values, dict):
                raise RLConfigError(f"[{section}] must be a table; valid keys: {', '.join(valid_keys())}")
            for key, value in values.items():
                _assign(cfg, f"{section}.{key}", value)
        return cfg

    def budget_penalty(self) -> BudgetPenalty:
        """Budget control (K2): rollout.max_new_tokens per task type and the truncation penalty, as a reward."""
        from openk2.rl.rewards.shaping import BudgetPenalty

        r = self.rollout
        return BudgetPenalty(dict(r.max_new_tokens), r.truncation_penalty, r.default_max_new_tokens)

    def max_new_tokens_for(self, task_type: str) -> int:
        """The budget of a task type "family/kind": the most specific entry of rollout.max_new_tokens."""
        return self.budget_penalty().max_new_tokens(task_type)

    def ptx_paths(self) -> list[str]:
        """The PTX loss's chat JSONL: train.ptx_files, or when that is empty the starting SFT run's own training data
        (`<run.init>/data/train.jsonl`, which the speedrun's SFT stage writes); [] when neither exists."""
        if self.train.ptx_files:
            return list(self.train.ptx_files)
        own = Path(self.run.init) / "data" / "train.jsonl"
        return [str(own)] if own.is_file() else []

    def temperature_at(self, step: int) -> float:
        r = self.rollout
        if r.temperature_decay_steps <= 0:
            return r.temperature
        frac = min(step / r.temperature_decay_steps, 1.0)
        return r.temperature + frac * (r.temperature_min - r.temperature)

    def validate(self) -> None:
        from openk2.rl.advantages import ADVANTAGE_ESTIMATORS
        from openk2.rl.losses import POLICY_LOSSES

        r, t = self.rollout, self.train
        checks = [
            (r.group_size >= 2,
             f"rollout.group_size must be >= 2 (a group baseline needs 2 samples), got {r.group_size}"),
            (r.prompts_per_step >= 1, f"rollout.prompts_per_step must be >= 1, got {r.prompts_per_step}"),
            (r.temperature > 0 and r.temperature_min > 0, "rollout.temperature and temperature_min must be > 0"),
            (0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1], got {r.top_p}"),
            (t.steps >= 0, f"train.steps must be >= 0, got {t.steps}"),
            (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
            (t.tau > 0, f"train.tau must be > 0, got {t.tau}"),
            (t.micro_batch >= 1 and t.minibatches >= 1, "train.micro_batch and train.minibatches must be >= 1"),
            (t.optimizer in ("adamw", "muonclip"), f"train.optimizer must be adamw or muonclip, got {t.optimizer!r}"),
            (t.old_logprobs in ("recompute", "behaviour"),
             f"train.old_logprobs must be recompute or behaviour, got {t.old_logprobs!r}"),
            (t.loss in POLICY_LOSSES,
             f"train.loss {t.loss!r} is not registered; losses: {', '.join(sorted(POLICY_LOSSES))}"),
            (t.advantage in ADVANTAGE_ESTIMATORS, f"train.advantage {t.advantage!r} is not registered; estimators: "
                                                  f"{', '.join(sorted(ADVANTAGE_ESTIMATORS))}"),
            (t.ptx_coef == 0 or bool(self.ptx_paths()),
             f"train.ptx_coef > 0 needs train.ptx_files (chat JSONL) or an SFT run as run.init with its data in "
             f"data/train.jsonl ({Path(self.run.init) / 'data' / 'train.jsonl'} does not exist)"),
            (t.ptx_batch >= 1 and t.ptx_seq_len >= 8, "train.ptx_batch must be >= 1 and train.ptx_seq_len >= 8"),
            (bool(self.tasks.mix) and all(w >= 0 for w in self.tasks.mix.values()) and sum(self.tasks.mix.values()) > 0,
             f"tasks.mix needs at least one family with a positive weight, got {self.tasks.mix}"),
            (self.run.checkpoint_every >= 1 and self.run.keep_last >= 1, "run.checkpoint_every and keep_last >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RLConfigError(msg)
        try:
            self.budget_penalty()
        except ValueError as e:
            raise RLConfigError(f"rollout.max_new_tokens / default_max_new_tokens: {e}") from None
        from openk2.rl.envs import check_family

        for family in [*self.tasks.mix, *self.eval.families]:
            try:
                check_family(family)
            except ValueError as e:
                raise RLConfigError(str(e)) from None


_SECTIONS = {f.name for f in dataclasses.fields(RLConfig)}


def valid_keys() -> list[str]:
    cfg = RLConfig()
    return [f"{s}.{f.name}" for s in _SECTIONS for f in dataclasses.fields(getattr(cfg, s))]


def _assign(cfg: RLConfig, dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    target = getattr(cfg, section) if section in _SECTIONS else None
    fields = {f.name for f in dataclasses.fields(target)} if target is not None else set()
    if key not in fields:
        raise RLConfigError(f"unknown key {dotted!r}; valid keys: {', '.join(sorted(valid_keys()))}")
    set_typed_field(target, key, value, dotted, RLConfigError)


def load_rl_config(path: str | Path | None, overrides: list[str] = ()) -> RLConfig:
    """The config of a TOML file (or the defaults) with dotted `key=value` overrides; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RLConfigError(f"config file {p} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise RLConfigError(f"{p}: invalid TOML: {e}") from e
    cfg = RLConfig.from_dict(data)
    for text in overrides:
        try:
            key, value = parse_override(text)
        except ValueError as e:
            raise RLConfigError(str(e)) from None
        _assign(cfg, key, value)
    cfg.validate()
    return cfg


def config_json(cfg: RLConfig) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


__all__ = ["RLConfig", "RLConfigError", "config_json", "load_rl_config", "valid_keys"]
