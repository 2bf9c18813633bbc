"""Serving benchmark: aggregate decode throughput of `openk2 serve` with 1 vs N concurrent streaming clients,
time to first token (TTFT) and inter-token latency (ITL) percentiles.

    .venv/bin/python bench/serve.py [--clients 8] [--requests 4] [--prompt-tokens 64] [--max-tokens 128]
                                    [--max-batch 8] [--threads 1] [--json out.json]

Model: the `nano` preset with RANDOM weights (seed 0): throughput does not depend on what the weights say, and
`ignore_eos` makes every request generate exactly `--max-tokens` tokens. Tokenizer: a 4096-token BPE trained
on the interpreter's standard library (the nano vocabulary). The server is a real `python -m openk2 serve`
subprocess on 127.0.0.1; the clients are asyncio + httpx streaming `/v1/completions` (token-id prompts of
exactly `--prompt-tokens` tokens, cut from stdlib text, greedy) in this process.

Scenario "1 client": one client sends `--requests` requests one after another. Scenario "N clients": N clients
do the same at the same time. Aggregate tokens/s = completion tokens / wall time of the scenario. TTFT = time
from sending a request to its first text chunk; ITL = gaps between consecutive text chunks of one request.
Target: N-client aggregate >= 3x the 1-client rate.

On a shared machine other jobs steal CPU at random, so the pair of scenarios runs `--repeats` times, alternating,
and the table shows each scenario's least disturbed run (highest tokens/s); every run is in the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from openk2.data.tokenizer import train_tokenizer
from openk2.model import build_model, get_preset
from openk2.serve.testing import make_model_dir, serve_subprocess

sys.path.insert(0, str(Path(__file__).parent))
from common import machine_info  # noqa: E402
from tokenizer import stdlib_corpus  # noqa: E402


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by process `pid` (default: this one)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def _one_request(client: httpx.AsyncClient, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": "nano", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk["choices"]):
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    return {"ttft": first - t0, "itl": gaps, "tokens": tokens, "latency": time.perf_counter() - t0}


async def _scenario(base_url: str, clients: int, requests: int, prompts: list[list[int]], max_tokens: int,
                    server_pid: int | None = None) -> dict:
    async def run_client(c: int, http: httpx.AsyncClient) -> list[dict]:
        return [await _one_request(http, prompts[(c * requests + r) % len(prompts)], max_tokens)
                for r in range(requests)]

    async with httpx.AsyncClient(base_url=base_url, timeout=600,
                                 limits=httpx.Limits(max_connections=clients + 2)) as http:
        cpu0 = (_cpu_s(), _cpu_s(server_pid) if server_pid else 0.0)
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(run_client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
        cpu1 = (_cpu_s(), _cpu_s(server_pid) if server_pid else 0.0)
    results = [r for rs in per_client for r in rs]
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    return {
        "clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
        "ttft_ms": {f"p{q}": 1e3 * _pct(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": 1e3 * _pct(itl, q) for q in (50, 90, 99)} | {"mean": 1e3 * statistics.fmean(itl)},
        "per_client_tokens_per_s": statistics.fmean(r["tokens"] / r["latency"] for r in results),
        "client_cpu_s": cpu1[0] - cpu0[0], "server_cpu_s": cpu1[1] - cpu0[1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=4, help="requests per client in each scenario")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (1 on shared CPUs)")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs of both scenarios")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    docs = stdlib_corpus(3.0)
    tok = train_tokenizer(docs, 4096, show_progress=False)
    ids = tok.encode("\n".join(docs[:50]))
    n = args.prompt_tokens
    prompts = [ids[i * n:(i + 1) * n] for i in range(args.clients * args.requests)]
    model = build_model(get_preset("nano", vocab_size=4096), seed=0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model_dir(Path(tmp) / "nano", model, tok)
        with serve_subprocess(model_dir, "--max-batch", str(args.max_batch), "--threads", str(args.threads),
                              "--device", "cpu", log_path=Path(tmp) / "server.log", startup_s=180) as (url, server):
            base = url.removesuffix("/v1")
            asyncio.run(_scenario(base, 2, 1, prompts, 16))  # warm-up
            load_before = _loadavg()
            singles, multis = [], []
            for _ in range(args.repeats):
                singles.append(asyncio.run(_scenario(base, 1, args.requests, prompts, args.max_tokens, server.pid)))
                multis.append(asyncio.run(_scenario(base, args.clients, args.requests, prompts, args.max_tokens,
                                                    server.pid)))
            health = httpx.get(f"{base}/health", timeout=5).json()
            load_after = _loadavg()

    single = max(singles, key=lambda r: r["tokens_per_s"])
    multi = max(multis, key=lambda r: r["tokens_per_s"])
    ratio = multi["tokens_per_s"] / single["tokens_per_s"]
    paired = [m["tokens_per_s"] / s["tokens_per_s"] for s, m in zip(singles, multis, strict=True)]
    out = {"machine": machine_info(), "cpus": os.cpu_count(), "server_threads": args.threads,
           "args": vars(args) | {"json": str(args.json) if args.json else None},
           "single_runs": singles, "multi_runs": multis, "speedup_best": ratio, "speedup_paired": paired,
           "mean_decode_batch": health["mean_batch"], "loadavg_before": load_before, "loadavg_after": load_after}
    print(f"{machine_info()}; {os.cpu_count()} CPUs; server threads {args.threads}; "
          f"load average before/after {load_before} / {load_after}")
    print("| clients | requests | tokens | wall s | tokens/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms "
          "| server CPU s | client CPU s |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for r in (single, multi):
        t, i = r["ttft_ms"], r["itl_ms"]
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{t['p50']:.0f} / {t['p90']:.0f} / {t['p99']:.0f} | {i['p50']:.1f} / {i['p90']:.1f} / {i['p99']:.1f} | "
              f"{r['server_cpu_s']:.1f} | {r['client_cpu_s']:.1f} |")
    print(f"aggregate speedup {args.clients} clients vs 1 (best runs): {ratio:.2f}x (target >= 3x: "
          f"{'met' if ratio >= 3 else 'NOT met'}); per repeat: {', '.join(f'{x:.2f}x' for x in paired)}")
    print("tokens/s per run: 1 client " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in singles)
          + f"; {args.clients} clients " + ", ".join(f"{r['tokens_per_s']:.0f}" for r in multis)
          + f"; mean decode batch over everything {health['mean_batch']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
