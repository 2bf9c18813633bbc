"""τ²-bench (airline, retail, telecom) inside openk2: domain environments, orchestrator, scoring, gym.

Our own implementation of sierra-research/tau2-bench v0.1.0's tool semantics over the shipped task files in
`../shared/data/tau2/` (MIT). Entry points: `make_env`, `load_tasks`, `score_episode`, `run_episode`,
`Tau2GymEnv`; the benchmarks are in `openk2.eval.benchmarks.tau2`.
"""

from openk2.eval.tau2.env import Tau2Env, make_env, replay
from openk2.eval.tau2.tasks import DOMAINS, Task, get_task, load_splits, load_tasks

__all__ = ["DOMAINS", "Task", "Tau2Env", "get_task", "load_splits", "load_tasks", "make_env", "replay"]
