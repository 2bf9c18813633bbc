"""Benchmark registry: `openk2 eval --bench NAME` and `openk2 eval --list` read it.

Each module in `BENCHMARK_MODULES` defines `BENCHMARKS: list[Benchmark]`; modules are imported on first use, so
`openk2 --help` stays fast.
"""

from __future__ import annotations

import importlib

from openk2.eval.task import Benchmark

BENCHMARK_MODULES: list[str] = [
    "openk2.eval.benchmarks.math",
    "openk2.eval.benchmarks.code",
    "openk2.eval.benchmarks.acebench",
    "openk2.eval.benchmarks.gpqa",
    "openk2.eval.benchmarks.swebench",
    "openk2.eval.benchmarks.tau2",
    "openk2.eval.benchmarks.world_agent",
    "openk2.eval.benchmarks.world",
    "openk2.eval.benchmarks.digits",
    "openk2.eval.benchmarks.world_facts",
]

_registry: dict[str, Benchmark] | None = None


def all_benchmarks() -> dict[str, Benchmark]:
    global _registry
    if _registry is None:
        found: dict[str, Benchmark] = {}
        for module in BENCHMARK_MODULES:
            for bench in importlib.import_module(module).BENCHMARKS:
                if bench.name in found:
                    raise RuntimeError(f"benchmark {bench.name!r} is registered twice ({module})")
                found[bench.name] = bench
        _registry = found
    return _registry


def get_benchmark(name: str) -> Benchmark:
    benches = all_benchmarks()
    if name not in benches:
        raise KeyError(f"unknown benchmark {name!r}; valid: {', '.join(sorted(benches))}")
    return benches[name]
