"""`openk2 rephrase IN... OUT --model M --styles ...`: knowledge rephrasing for pretraining (K2 §2.2)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from openk2.cli.app import app, console, fail


def open_rephraser(model: str, *, model_name: str | None, api_key_env: str, concurrency: int, cache_dir: Path,
                   max_retries: int, timeout: float, device: str, language: str = "English"):
    """A `Rephraser` for a model spec: `world[:...]` (the programmatic world renderer, CPU, no LLM) or any spec
    `openk2 eval` accepts (`openk2.eval.models.open_model`: run dir, HF dir, openai:URL, replay:FILE)."""
    from openk2.data.rephrase.pipeline import LLMRephraser

    if model == "world" or model.startswith("world:"):
        from openk2.data.rephrase.world_rephraser import WorldRephraser, world_from_spec

        return WorldRephraser(world_from_spec(model))
    from openk2.eval.models import open_model

    handle = open_model(model, model_name=model_name, api_key_env=api_key_env, concurrency=concurrency,
                        cache_dir=cache_dir, max_retries=max_retries, timeout=timeout, device=device)
    rephraser = LLMRephraser(handle.client, language=language)
    rephraser.name = handle.name
    return rephraser


def _list_styles(prompts: list[Path]) -> None:
    from rich.table import Table

    from openk2.data.rephrase.prompts import load_library

    table = Table(title="openk2 rephrase styles")
    for col in ("name", "version", "description", "source"):
        table.add_column(col)
    for name, s in load_library(prompts).items():
        table.add_row(name, s.version, s.description, Path(s.source).name)
    console.print(table)


@app.command("rephrase")
def rephrase_command(
    paths: list[Path] = typer.Argument(None, help="Input files or directories (text, JSONL, parquet), then OUT "
                                                  "(output directory)."),
    model: str = typer.Option(None, "--model", help="world[:WORLD.json|:seed=S,people=N] (programmatic, CPU), a run "
                                                    "dir, HF dir, openai:URL or replay:FILE."),
    styles: str = typer.Option("wrap-medium", "--styles", help="Comma-separated styles (see --list-styles)."),
    prompts: list[Path] = typer.Option(None, "--prompts", help="User prompt file(s) (TOML, like the built-in "
                                                               "library); repeatable."),
    list_styles: bool = typer.Option(False, "--list-styles", help="List the prompt library and exit."),
    n: int = typer.Option(1, "--n", help="Rephrasings per document and style (seeds seed..seed+n-1)."),
    seed: int = typer.Option(0, "--seed"),
    model_name: str = typer.Option(None, "--model-name", help="Model id for an openai: endpoint."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env"),
    checks: str = typer.Option("format,numbers,dates,entities,length", "--checks",
                               help="Fidelity checks: format,numbers,dates,entities,length,embedding,judge ('none')."),
    judge_model: str = typer.Option(None, "--judge-model", help="Model spec of the LLM judge (default: --model)."),
    judge_model_name: str = typer.Option(None, "--judge-model-name"),
    embedding_model: str = typer.Option("wordllama", "--embedding-model",
                                        help="Embedder of the embedding check: wordllama (static, shipped in the "
                                             "wordllama package), hashing (char n-grams), or a local model dir."),
    embedding_threshold: float = typer.Option(0.5, "--embedding-threshold"),
    max_tokens: int = typer.Option(None, "--max-tokens", help="Cap on each style's output tokens per chunk."),
    chunk_tokens: int = typer.Option(None, "--chunk-tokens", help="Input tokens per chunk (default: the style's)."),
    context_tokens: int = typer.Option(256, "--context-tokens", help="Rewritten-text tokens carried to the next "
                                                                     "chunk."),
    dedup: float = typer.Option(0.9, "--dedup", help="Near-duplicate Jaccard threshold (0 disables)."),
    language: str = typer.Option("English", "--language", help="Target language of the translate style."),
    kind: str = typer.Option("auto", "--kind", help="Input format: auto, text, jsonl, parquet."),
    text_field: str = typer.Option("text", "--text-field"),
    shard: str = typer.Option("0/1", "--shard", help="i/N: process the documents whose id hashes to i mod N."),
    limit: int = typer.Option(None, "--limit", help="First N documents (of this shard)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Documents in flight."),
    price: str = typer.Option(None, "--price", help="USD per million input,output tokens of --model."),
    max_retries: int = typer.Option(3, "--max-retries"),
    format_retries: int = typer.Option(1, "--format-retries", help="Retries (new seed) of a reply that ignores "
                                                                   "the format or is truncated."),
    timeout: float = typer.Option(600.0, "--timeout"),
    device: str = typer.Option("auto", "--device"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Rewrite documents in diverse styles (chunk-wise, autoregressive), verify fidelity, write JSONL with
    provenance. Rerun the same command to resume."""
    from openk2.data.rephrase.embedding import load_embedder
    from openk2.data.rephrase.fidelity import ALL_CHECKS, FidelityConfig
    from openk2.data.rephrase.pipeline import RephraseConfig, run_rephrase
    from openk2.data.rephrase.prompts import PromptLibraryError, load_library
    from openk2.data.sources import SourceError
    from openk2.eval.models import ModelSpecError

    prompts = prompts or []
    if list_styles:
        try:
            _list_styles(prompts)
        except PromptLibraryError as e:
            fail(str(e))
        return
    if not paths or len(paths) < 2 or not model:
        fail("usage: openk2 rephrase IN... OUT --model M [--styles ...] (or --list-styles)")
    *inputs, out = paths
    try:
        library = load_library(prompts)
    except PromptLibraryError as e:
        fail(str(e))
    names = [s.strip() for s in styles.split(",") if s.strip()]
    unknown = [s for s in names if s not in library]
    if unknown or not names:
        fail(f"unknown style(s) {', '.join(unknown) or '(none)'}; valid: {', '.join(library)}")
    check_list = () if checks == "none" else tuple(c.strip() for c in checks.split(",") if c.strip())
    bad = [c for c in check_list if c not in ALL_CHECKS]
    if bad:
        fail(f"unknown check(s) {', '.join(bad)}; valid: {', '.join(ALL_CHECKS)}")
    try:
        i, num = (int(x) for x in shard.split("/"))
        assert 0 <= i < num
    except (ValueError, AssertionError):
        fail(f"--shard wants i/N with 0 <= i < N, got {shard!r}")
    if n < 1 or concurrency < 1:
        fail("--n and --concurrency must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    common = dict(api_key_env=api_key_env, concurrency=concurrency, cache_dir=out / "cache", max_retries=max_retries,
                  timeout=timeout, device=device)
    try:
        rephraser = open_rephraser(model, model_name=model_name, language=language, **common)
        judge = None
        if "judge" in check_list:
            judge_spec = judge_model or model
            if judge_spec.startswith("world"):
                fail("the judge check needs an LLM: pass --judge-model")
            judge = (rephraser.client if judge_model is None else
                     open_rephraser(judge_spec, model_name=judge_model_name or model_name, **common).client)
    except ModelSpecError as e:
        fail(str(e))
    if price:
        from openk2.llm import Price

        try:
            rephraser.usage.prices[rephraser.name] = Price.parse(price)
        except ValueError as e:
            fail(str(e))
    embedder = None
    if "embedding" in check_list:
        try:
            embedder = load_embedder(embedding_model)
        except (ValueError, OSError) as e:
            fail(f"--embedding-model: {e}")
    fidelity = FidelityConfig(checks=check_list, embedder=embedder, judge=judge,
                              embedding_threshold=embedding_threshold)
    chosen = [library[s] for s in names]
    if max_tokens:
        import dataclasses

        chosen = [dataclasses.replace(s, max_output_tokens=min(s.max_output_tokens, max_tokens)) for s in chosen]
    cfg = RephraseConfig(inputs=inputs, out=out, styles=chosen, n=n, seed=seed, kind=kind,
                         text_field=text_field, chunk_tokens=chunk_tokens, context_tokens=context_tokens,
                         fidelity=fidelity, dedup_threshold=dedup, format_retries=format_retries,
                         concurrency=concurrency, shard=(i, num), limit=limit, progress=progress)

    async def go():
        try:
            return await run_rephrase(cfg, rephraser)
        finally:
            await rephraser.aclose()
            if judge is not None and judge_model is not None:
                await judge.aclose()

    try:
        summary = asyncio.run(go())
    except SourceError as e:
        fail(str(e))
    c, u = summary["counts"], summary["usage_total"]
    console.print(f"{c['documents']} documents, {c['tasks']} rewrites: {c['accepted']} accepted, {c['rejected']} "
                  f"rejected, {c['skipped_done']} already done; tokens in {u['prompt_tokens']:,} out "
                  f"{u['completion_tokens']:,}, ${u['cost_usd']:.4f}; {summary['seconds']:.1f}s")
    if summary["reject_reasons"]:
        console.print("rejections by check: " + ", ".join(f"{k} {v}" for k, v in summary["reject_reasons"].items()))
    console.print(f"wrote {out / summary['files']['accepted']} and {out / summary['files']['rejected']}")
