"""`openk2 eval`: score a run, a HF checkpoint or any OpenAI-compatible endpoint on the K2 report's benchmarks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from openk2.cli.app import app, console, fail

DEFAULT_DATA_DIR = "../shared/data"


def _list_benchmarks() -> None:
    from rich.table import Table

    from openk2.eval.registry import all_benchmarks

    table = Table(title="openk2 eval benchmarks")
    for col in ("name", "data source", "metric", "sampling", "K2-Instruct"):
        table.add_column(col)
    for name, b in sorted(all_benchmarks().items()):
        metric = b.metric.replace("k", str(b.k)) if b.metric.endswith("k") else b.metric
        sampling = f"T={b.temperature:g} top_p={b.top_p:g} max_tokens={b.max_tokens}"
        table.add_row(name, b.data_source, metric, sampling, "–" if b.k2_score is None else f"{b.k2_score:g}")
    console.print(table)


@app.command("eval")
def eval_command(
    model: str = typer.Option(None, "--model", help="Run directory, HF model directory, openai:URL or replay:FILE."),
    bench: str = typer.Option(None, "--bench", help="Comma-separated benchmark names (see --list)."),
    list_: bool = typer.Option(False, "--list", help="List every benchmark with its data, metric and K2's number."),
    k: int = typer.Option(None, "--k", help="Samples per item (default: the benchmark's K2 setting)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N items of each benchmark."),
    concurrency: int = typer.Option(8, "--concurrency", help="Requests in flight (and in-process batch rows)."),
    out: Path = typer.Option(None, "--out", help="Output directory (default runs/eval/<model name>); rerunning "
                                                 "with the same directory resumes."),
    data_dir: Path = typer.Option(None, "--data-dir", envvar="OPENK2_EVAL_DATA",
                                  help=f"Benchmark data directory (default {DEFAULT_DATA_DIR})."),
    model_name: str = typer.Option(None, "--model-name", help="Model id to send to an openai: endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env",
                                    help="Environment variable holding the endpoint's API key."),
    user_model: str = typer.Option(None, "--user-model", help="User-simulator model spec (ACEBench agent)."),
    user_model_name: str = typer.Option(None, "--user-model-name", help="Model id for an openai: user model."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed; procedurally generated benchmarks draw a fresh "
                                               "item set for seeds other than 0."),
    temperature: float = typer.Option(None, "--temperature", help="Override every benchmark's temperature."),
    top_p: float = typer.Option(None, "--top-p", help="Override every benchmark's top_p."),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Override the output cap (K2: 8192)."),
    max_steps: int = typer.Option(None, "--max-steps", help="Step limit of a tau2 episode (default: the "
                                                            "reference's 200); lower it for smoke runs."),
    world: Path = typer.Option(None, "--world", help="World for the world-* benchmarks: run dir, train config, "
                                                     "or World JSON (default: the --model run's, else nano's)."),
    acebench_repo: Path = typer.Option(None, "--acebench-repo", help="ACEBench checkout whose simulated APIs the "
                                                                     "agent categories run (acebench-agent)."),
    swe_agent: str = typer.Option(None, "--swe-agent", help="SWE-bench patch agent as module:Class "
                                                            "(default: one prompt, one diff)."),
    price: str = typer.Option(None, "--price", help="USD per million input,output tokens of --model (e.g. "
                                                    "0.6,2.5) for the cost in results.json."),
    max_retries: int = typer.Option(3, "--max-retries", help="Retries per failed request (HTTP backends)."),
    timeout: float = typer.Option(600.0, "--timeout", help="Seconds per HTTP request."),
    device: str = typer.Option("auto", help="Device for in-process models: auto, cpu or cuda."),
    tool_call_parser: str = typer.Option(None, "--tool-call-parser", help="Tool-call format of an in-process "
                                                                          "third-party checkpoint (as openk2 serve)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
) -> None:
    """Evaluate a model on benchmarks; writes results.json, samples.jsonl and report.md."""
    from openk2.eval.registry import all_benchmarks

    if list_:
        _list_benchmarks()
        return
    if not model or not bench:
        fail("pass --model and --bench (or --list to see the benchmarks)")
    names = [b.strip() for b in bench.split(",") if b.strip()]
    valid = all_benchmarks()
    unknown = [n for n in names if n not in valid]
    if unknown:
        fail(f"unknown benchmark(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    if concurrency < 1:
        fail(f"--concurrency must be >= 1, got {concurrency}")
    if k is not None and k < 1:
        fail(f"--k must be >= 1, got {k}")
    if max_steps is not None and max_steps < 1:
        fail(f"--max-steps must be >= 1, got {max_steps}")
    data_dir = data_dir or Path(DEFAULT_DATA_DIR)
    if not data_dir.is_dir() and any(valid[n].data_files(data_dir) for n in names):
        fail(f"data directory {data_dir} does not exist; pass --data-dir (layout: see ../shared/data/README.md)")
    asyncio.run(_run(model, names, k=k, limit=limit, concurrency=concurrency, out=out, data_dir=data_dir,
                     model_name=model_name, api_key_env=api_key_env, user_model=user_model,
                     user_model_name=user_model_name, seed=seed, temperature=temperature, top_p=top_p,
                     max_tokens=max_tokens, max_steps=max_steps, world=world, swe_agent=swe_agent,
                     acebench_repo=acebench_repo,
                     price=price, max_retries=max_retries, timeout=timeout, device=device, progress=progress,
                     tool_call_parser=tool_call_parser))


async def _run(model: str, names: list[str], *, out: Path | None, model_name: str | None, api_key_env: str,
               user_model: str | None, user_model_name: str | None, world: Path | None, swe_agent: str | None,
               acebench_repo: Path | None, price: str | None, max_retries: int, timeout: float, device: str,
               progress: bool, data_dir: Path, tool_call_parser: str | None = None, **settings: object) -> None:
    from openk2.eval.harness import EvalSettings, run_eval
    from openk2.eval.models import ModelSpecError, open_model
    from openk2.eval.task import BenchmarkDataError

    if out is None:
        stem = model_name or Path(model.split(":", 1)[-1].rstrip("/")).name or "model"
        out = Path("runs") / "eval" / stem
    out.mkdir(parents=True, exist_ok=True)
    try:
        handle = open_model(model, model_name=model_name, api_key_env=api_key_env,
                            concurrency=int(settings["concurrency"]), cache_dir=out / "llm_cache",
                            max_retries=max_retries, timeout=timeout, device=device, tool_call_parser=tool_call_parser)
        if user_model is None:
            user = None
        elif user_model == model and (user_model_name or model_name) == model_name:
            user = handle  # the same model plays both sides: one copy in memory, one batching engine
        else:
            user = open_model(user_model, model_name=user_model_name, api_key_env=api_key_env,
                              cache_dir=out / "llm_cache", concurrency=int(settings["concurrency"]),
                              max_retries=max_retries, timeout=timeout, device=device)
    except ModelSpecError as e:
        fail(str(e))
    if price:
        from openk2.llm import Price

        try:
            handle.client.usage.prices[handle.name] = Price.parse(price)
        except ValueError as e:
            fail(str(e))
    options = {"world": str(world) if world else None, "swe_agent": swe_agent,
               "acebench_repo": str(acebench_repo) if acebench_repo else None}
    s = EvalSettings(benches=names, data_dir=data_dir, out_dir=out, progress=progress, options=options,
                     **settings)  # type: ignore[arg-type]
    try:
        results = await run_eval(s, handle, user)
    except (BenchmarkDataError, ValueError) as e:
        fail(str(e))
    finally:
        await handle.aclose()
        if user is not None and user is not handle:
            await user.aclose()
    for name, b in results["benchmarks"].items():
        if name in names:
            trunc = "" if b["truncation_rate"] is None else f", truncated {100 * b['truncation_rate']:.1f}%"
            k2 = "" if b["k2_score"] is None else f" (K2-Instruct {b['k2_score']:g})"
            score = "no score" if b["score"] is None else f"{b['score']:.1f}"
            console.print(f"{name}: {score}{k2} over {b['scored']} samples{trunc}, "
                          f"{b['infra_errors']} infrastructure errors")
    for group, g in results.get("groups", {}).items():
        k2 = "" if g["k2_score"] is None else f" (K2-Instruct {g['k2_score']:.1f})"
        console.print(f"{group} overall (task-weighted over {', '.join(g['members'])}): {g['score']:.1f}{k2} over "
                      f"{g['items']} items")
    console.print(f"results: {out / 'results.json'}, report: {out / 'report.md'}")
