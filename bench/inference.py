"""Inference benchmark: openk2 (compiled and eager decode) beside llama.cpp and transformers, against the
machine's memory roofline, on the same checkpoint.

    bench/build_llamacpp.sh                                   # once: llama.cpp into ~/.cache/openk2/llamacpp
    .venv/bin/python bench/inference.py [--configs A C] [--threads 2] [--rounds 5] [--quick]

For each config: the bench model (seed 0) is exported as a HF checkpoint (+ a small tokenizer, which
llama.cpp's converter needs), converted to an F32 GGUF with llama.cpp's own `convert_hf_to_gguf.py`, then
each round runs, back to back (interleaved, so machine load hits every system alike), each measurement after
one untimed call of the same work (llama-bench and llama-batched-bench warm up the same way):

* decode, batch 1: `llama-bench -n 128` (tg128, decode only: llama-bench times no prompt with `-p 0`); openk2 and
  transformers `generate` of 128 tokens after a 16-token prompt, as the whole call (`*_b1`, prompt included: ~3%
  of the call on config C) and decode only (`*_b1_decode`: the call minus a `generate` of 1 token);
* decode, batch 8 (tokens/s summed over the 8 sequences): `llama-batched-bench -npp 32 -ntg 64 -npl 8`
  (S_TG, decode only); openk2 and transformers `generate` of 64 tokens after 8 prompts of 32 tokens, as the whole
  call (`*_b8`) and decode only (`*_b8_decode`: the call minus a `generate` of 1 token, i.e. the prefill and first
  token, which S_TG does not count either);
* prefill of 512 tokens: `llama-bench -p 512` (pp512); openk2 and transformers forward over 512 tokens.

Reported: medians over rounds, ratios within the run (the median of the rounds' ratios), the compile time of
openk2's decode step (first call per graph, separately), and the memory roofline: bandwidth (numpy copy of 1 GiB,
best of 5, bytes read + written) over the fp32 bytes one decode token reads (attention, dense and shared MLPs, the
top-k routed experts, routers, norms, LM head, one embedding row), and each system's fraction of it.

Without llama.cpp built, the bench says how to build it and measures the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from openk2.model import build_model, count_params
from openk2.model.config import ModelConfig
from openk2.model.decode import decode_step
from openk2.model.hf import save_hf

sys.path.insert(0, str(Path(__file__).parent))
from common import bench_config, machine_info  # noqa: E402

LLAMACPP_DIR = Path(os.environ.get("OPENK2_LLAMACPP_DIR", Path.home() / ".cache/openk2/llamacpp"))
DECODE_B1_TOKENS, DECODE_B1_PROMPT = 128, 16
DECODE_B8_TOKENS, DECODE_B8_PROMPT = 64, 32
PREFILL_TOKENS = 512


# ------------------------------------------------------------------------------------------- roofline
def memory_bandwidth(nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of a numpy copy of `nbytes` (read + write counted), best of `repeats`."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def decode_bytes_per_token(cfg: ModelConfig, bytes_per_param: int = 4) -> int:
    """Parameter bytes one decode token reads: every activated parameter except the embedding table, of
    which it reads one row (the KV cache, a few KiB at these lengths, is left out)."""
    c = count_params(cfg)
    return (c.activated - c.embedding + cfg.hidden_size) * bytes_per_param


# ------------------------------------------------------------------------------------------- llama.cpp
def llamacpp_bin(name: str) -> Path | None:
    p = LLAMACPP_DIR / "build" / "bin" / name
    return p if p.exists() else None


def write_tokenizer(directory: Path) -> None:
    """A small byte-level BPE tokenizer (llama.cpp's converter requires one; the benchmarks feed token ids).
    The converter pads the vocabulary up to the model's `vocab_size`."""
    from openk2.data.tokenizer import train_tokenizer

    words = [f"w{i} x{i * 7 % 101} y{i % 13}" for i in range(4000)]
    train_tokenizer(words, vocab_size=512, show_progress=False).save(directory)


def convert_to_gguf(hf_dir: Path, gguf: Path) -> None:
    """llama.cpp's own converter. Our tokenizer's pre-tokenizer hash is not in its table of known models, so
    a wrapper maps an unknown hash to "default" (the benchmarks do not tokenize text)."""
    conv = LLAMACPP_DIR / "llama.cpp"
    argv = ["convert_hf_to_gguf.py", str(hf_dir), "--outtype", "f32", "--outfile", str(gguf)]
    code = "\n".join([
        f"import sys; sys.path[:0] = [{str(conv / 'gguf-py')!r}, {str(conv)!r}]; sys.argv = {argv!r}",
        "import conversion.base as b",
        "orig = b.TextModel.get_vocab_base_pre",
        "def pre(self, tok):",
        "    try: return orig(self, tok)",
        "    except NotImplementedError: return 'default'",
        "b.TextModel.get_vocab_base_pre = pre",
        f"import runpy; runpy.run_path({str(conv / 'convert_hf_to_gguf.py')!r}, run_name='__main__')",
    ])
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


def llama_bench(gguf: Path, threads: int, n_prompt: int, n_gen: int) -> float:
    """tokens/s of one llama-bench test (pp<n_prompt> or tg<n_gen>), a single repetition."""
    out = subprocess.run([str(llamacpp_bin("llama-bench")), "-m", str(gguf), "-t", str(threads), "-p", str(n_prompt),
                          "-n", str(n_gen), "-r", "1", "-o", "jsonl"], check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return float(rows[0]["avg_ts"])


def llama_batched(gguf: Path, threads: int, batch: int, n_prompt: int, n_gen: int) -> float:
    """Summed decode tokens/s of `batch` sequences (llama-batched-bench S_TG)."""
    ctx = max(4096, 2 * batch * (n_prompt + n_gen))
    for _attempt in range(4):  # a loaded machine now and then produces a table without its row: run it again
        out = subprocess.run([str(llamacpp_bin("llama-batched-bench")), "-m", str(gguf), "-t", str(threads),
                              "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(n_prompt), "-ntg", str(n_gen),
                              "-npl", str(batch)], check=True, capture_output=True, text=True)
        # The markdown table: | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
        for line in (out.stdout + out.stderr).splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and cells[0].isdigit():
                return float(cells[7])
    raise RuntimeError(f"no result row in llama-batched-bench output:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")


# ------------------------------------------------------------------------------------------- the run
def run_config(name: str, rounds: int, threads: int, quick: bool, skip_hf: bool, workdir: Path) -> dict:
    from transformers import AutoModelForCausalLM

    cfg = bench_config(name)
    r: dict = {"config": name, "bytes_per_token": decode_bytes_per_token(cfg)}
    torch.manual_seed(0)
    ours = build_model(cfg, seed=0).eval()
    hf_dir, gguf = workdir / f"hf_{name}", workdir / f"{name}-f32.gguf"
    save_hf(ours, hf_dir, dtype=torch.float32)
    write_tokenizer(hf_dir)
    hf = None
    if not skip_hf:
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
        hf.generation_config.pad_token_id = 0
    have_llama = llamacpp_bin("llama-bench") is not None and llamacpp_bin("llama-batched-bench") is not None
    if have_llama:
        t0 = time.perf_counter()
        convert_to_gguf(hf_dir, gguf)
        r["gguf_convert_s"] = time.perf_counter() - t0

    g = torch.Generator().manual_seed(1)
    ids_b1 = torch.randint(0, cfg.vocab_size, (1, DECODE_B1_PROMPT), generator=g)
    ids_b8 = torch.randint(0, cfg.vocab_size, (8, DECODE_B8_PROMPT), generator=g)
    ids_pp = torch.randint(0, cfg.vocab_size, (1, PREFILL_TOKENS), generator=g)
    n1 = 32 if quick else DECODE_B1_TOKENS
    n8 = 16 if quick else DECODE_B8_TOKENS

    def ours_gen(ids, n, compile):
        return lambda: ours.generate(ids, n, compile=compile)

    def hf_gen(ids, n):
        def fn():
            with torch.no_grad():
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return fn

    def ours_prefill():
        with torch.inference_mode():
            ours(ids_pp, cache=ours.new_cache(1, PREFILL_TOKENS), last_logits_only=True)

    def hf_prefill():
        with torch.no_grad():
            hf(input_ids=ids_pp, use_cache=True, logits_to_keep=1)

    # Compile first (timed separately; a second process mostly loads Inductor's cache), and check that the
    # compiled step decodes the same greedy tokens as the eager reference.
    for key, ids, n in (("b1", ids_b1, n1), ("b8", ids_b8, n8)):
        t0 = time.perf_counter()
        compiled = ours.generate(ids, n, compile=True)
        r[f"ours_first_call_s_{key}"] = time.perf_counter() - t0
        r[f"greedy_equal_{key}"] = bool(torch.equal(compiled, ours.generate(ids, n, compile=False)))
    step = decode_step(ours, True)
    r["compile_s"] = sum(step.compile_seconds.values())
    r["graphs"] = {f"{b}x{s}": round(t, 1) for (b, s), t in step.compile_seconds.items()}
    r["compiled"] = step.compiled

    fns: dict[str, Callable[[], object]] = {
        "ours_b1": ours_gen(ids_b1, n1, True), "ours_eager_b1": ours_gen(ids_b1, n1, False),
        "ours_b8": ours_gen(ids_b8, n8, True), "ours_prefill": ours_prefill,
    }
    # The prompts' prefill and first token alone, so that batch 8's decode-only rate can be compared with
    # llama-batched-bench's S_TG, which excludes prompt processing: 8 x (n8 - 1) tokens / (t(b8) - t(b8_first)).
    # Batch 1 the same way, since llama-bench's tg128 times no prompt either.
    fns.update({"ours_b8_first": ours_gen(ids_b8, 1, True), "ours_b1_first": ours_gen(ids_b1, 1, True)})
    if hf is not None:
        fns.update({"hf_b1": hf_gen(ids_b1, n1), "hf_b8": hf_gen(ids_b8, n8), "hf_prefill": hf_prefill,
                    "hf_b8_first": hf_gen(ids_b8, 1), "hf_b1_first": hf_gen(ids_b1, 1)})
    tokens = {"b1": n1, "eager_b1": n1, "b8": 8 * n8, "b8_first": 8, "b1_first": 1, "prefill": PREFILL_TOKENS}
    new_tokens = {"b1": n1, "b8": n8}
    for fn in fns.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in fns}
    rates.update({k.replace("_first", "_decode"): [] for k in fns if k.endswith("_first")})
    if have_llama:
        rates.update({"llama_b1": [], "llama_b8": [], "llama_prefill": []})
    for _ in range(rounds):
        seconds: dict[str, float] = {}
        for k, fn in fns.items():
            fn()  # untimed, as llama-bench warms up before it times: caches and thread pools are ours again
            t0 = time.perf_counter()
            fn()
            seconds[k] = time.perf_counter() - t0
            rates[k].append(tokens[k.split("_", 1)[1]] / seconds[k])
        for k in [k for k in fns if k.endswith("_first")]:
            system, batch, _ = k.split("_")
            whole = f"{system}_{batch}"
            rates[f"{whole}_decode"].append(tokens[f"{batch}_first"] * (new_tokens[batch] - 1)
                                            / max(seconds[whole] - seconds[k], 1e-9))
        if have_llama:
            rates["llama_b1"].append(llama_bench(gguf, threads, 0, n1))
            rates["llama_b8"].append(llama_batched(gguf, threads, 8, DECODE_B8_PROMPT, n8))
            rates["llama_prefill"].append(llama_bench(gguf, threads, PREFILL_TOKENS, 0))
    for k, v in rates.items():
        r[k] = statistics.median(v)
    r["rounds"] = rates
    return r


def summarize(r: dict, bandwidth: float) -> None:
    roof = bandwidth / r["bytes_per_token"]
    r["roofline_tok_s"] = roof
    for k in ("ours_b1", "ours_b1_decode", "ours_eager_b1", "hf_b1", "llama_b1"):
        if k in r:
            r[f"{k}_of_roofline"] = r[k] / roof
    rounds = r["rounds"]
    for a, b in (("ours_b1", "llama_b1"), ("ours_b1_decode", "llama_b1"), ("ours_b8", "llama_b8"),
                 ("ours_b8_decode", "llama_b8"), ("ours_b1_decode", "hf_b1_decode"),
                 ("ours_prefill", "llama_prefill"), ("ours_b1", "hf_b1"), ("ours_b8", "hf_b8"),
                 ("ours_b8_decode", "hf_b8_decode"), ("ours_prefill", "hf_prefill"), ("ours_b1", "ours_eager_b1")):
        if a in r and b in r:
            # The median of the rounds' ratios: each round measures both systems back to back, so a host whose
            # speed drifts between rounds moves both sides of a round's ratio alike.
            r[f"{a}/{b}"] = statistics.median(x / y for x, y in zip(rounds[a], rounds[b], strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=["A", "C"])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--quick", action="store_true", help="1 round, fewer tokens: a smoke run")
    ap.add_argument("--workdir", type=Path, help="keep the exported checkpoints and GGUFs here")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.rounds = 1
    torch.set_num_threads(args.threads)
    if llamacpp_bin("llama-bench") is None:
        print(f"# llama.cpp not found in {LLAMACPP_DIR}/build/bin: build it with bench/build_llamacpp.sh "
              "(needs cmake and g++; ~10-20 min on 2 cores), or point OPENK2_LLAMACPP_DIR at a build. "
              "Measuring openk2 and transformers only.")
    bandwidth = memory_bandwidth()
    tmp = None
    workdir = args.workdir
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="openk2-inference-")
        workdir = Path(tmp)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        results = [run_config(c, args.rounds, args.threads, args.quick, args.skip_hf, workdir) for c in args.configs]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    bandwidth = max(bandwidth, memory_bandwidth())  # before and after: the least contended
    for r in results:
        summarize(r, bandwidth)
    load = os.getloadavg()
    print(f"# {machine_info()}; bandwidth {bandwidth / 1e9:.1f} GB/s; load average {load[0]:.1f} {load[1]:.1f} "
          f"{load[2]:.1f}; {args.rounds} rounds, medians (ratios: medians of the rounds' ratios)")
    keys = [k for k in results[0] if k not in ("config", "graphs", "rounds")]
    print("| metric | " + " | ".join(r["config"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in keys:
        cells = []
        for r in results:
            v = r.get(k, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else
                         f"{v:.0f}" if isinstance(v, float) else str(v))
        print(f"| {k} | " + " | ".join(cells) + " |")
    for r in results:
        print(f"# config {r['config']} compiled graphs (batch x window: first-call seconds): {r['graphs']}")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth": bandwidth, "machine": machine_info(), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
