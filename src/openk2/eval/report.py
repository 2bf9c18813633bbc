"""`DIR/report.md` (and `scores.png`) from results.json: each benchmark's headline beside K2-Instruct's number."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _metric_label(metric: str, k: int) -> str:
    return metric.replace("k", str(k)) if metric.endswith("k") else metric


def write_plot(out_dir: Path, results: dict[str, Any]) -> str | None:
    """A bar chart of our score vs K2-Instruct's per benchmark; None when there is nothing to compare."""
    benches = results["benchmarks"]
    if not benches:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(benches)
    ours = [benches[n]["score"] or 0.0 for n in names]
    k2 = [benches[n].get("k2_score") or 0.0 for n in names]
    errs = [benches[n]["summary"]["metrics"][benches[n]["metric"]]["stderr"] if benches[n]["score"] is not None
            else 0.0 for n in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.6))
    ax.bar([i - 0.2 for i in x], ours, 0.4, yerr=errs, capsize=3, label=results["model"]["name"])
    ax.bar([i + 0.2 for i in x], k2, 0.4, label="Kimi-K2-Instruct (published)", color="#bbbbbb")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set(ylabel="score (0-100)", ylim=(0, 100), title="openk2 eval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png", dpi=110)
    plt.close(fig)
    return "scores.png"


def write_report(out_dir: Path, results: dict[str, Any]) -> Path:
    model = results["model"]
    lines = [f"# openk2 eval: {model['name']}", "",
             f"Model spec `{model['spec']}` ({model['kind']}); data `{results['data_dir']}`; harness commit "
             f"`{results.get('harness_commit')}`.", "",
             "| benchmark | metric | score | ± s.e. | 95% CI | K2-Instruct | items | samples | truncated | "
             "infra errors |", "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, b in results["benchmarks"].items():
        m = b["summary"]["metrics"][b["metric"]]
        metric = _metric_label(b["metric"], b["settings"]["k"])
        trunc = "–" if b["truncation_rate"] is None else f"{100 * b['truncation_rate']:.1f}%"
        lines.append(f"| {name} | {metric} | {_fmt(b['score'])} | {_fmt(m['stderr'])} | "
                     f"[{_fmt(m['ci95'][0])}, {_fmt(m['ci95'][1])}] | {_fmt(b.get('k2_score'))} | "
                     f"{b['summary']['items']} | {b['scored']} | {trunc} | {b['infra_errors']} |")
    groups = results.get("groups") or {}
    for group, g in groups.items():
        trunc = "–" if g["truncation_rate"] is None else f"{100 * g['truncation_rate']:.1f}%"
        metric = _metric_label(g["metric"], g["k"])
        lines.append(f"| **{group} overall** (task-weighted) | {metric} | {_fmt(g['score'])} | {_fmt(g['stderr'])} | "
                     f"[{_fmt(g['ci95'][0])}, {_fmt(g['ci95'][1])}] | {_fmt(g['k2_score'])} | "
                     f"{g['items']} | {g['scored']} | {trunc} | {g['infra_errors']} |")
    lines += ["", "Scores are 0–100. Truncated: answers that hit `max_tokens`. Infrastructure errors (requests that "
              "failed after retries) are excluded from the scores; rerun with the same `--out` to retry them.", ""]
    for group, g in groups.items():
        lines += [f"The {group} overall weights {', '.join(g['members'])} by their item counts; its K2-Instruct "
                  "column weights K2's per-benchmark numbers the same way (with every task that is K2's published "
                  "overall).", ""]
    plot = write_plot(out_dir, results)
    if plot:
        lines += [f"![scores]({plot})", ""]
    for name, b in results["benchmarks"].items():
        s = b["settings"]
        lines += [f"## {name}", "",
                  f"Data: {b['data_source']}. Sampling: temperature {s['temperature']}, top_p {s['top_p']}, "
                  f"max_tokens {s['max_tokens']}, k {s['k']}. All metrics (item-level s.e.):", ""]
        lines += [f"- {metric}: {_fmt(v['value'], 2)} ± {_fmt(v['stderr'], 2)}"
                  for metric, v in b["summary"]["metrics"].items()]
        cats = b["summary"].get("categories")
        if cats:
            lines += ["", "| category | items | avg@k | pass@k |", "|---|---:|---:|---:|"]
            lines += [f"| {c} | {r['items']} | {_fmt(r['avg@k']['value'])} | {_fmt(r['pass@k']['value'])} |"
                      for c, r in cats.items()]
        for key, val in (b.get("extra") or {}).items():
            lines.append(f"- {key}: {_fmt(val) if isinstance(val, float) else val}")
        lines.append("")
    usage = results.get("usage", {}).get("total")
    if usage:
        lines += ["## Usage", "", f"{usage['requests']} requests ({usage['cached_requests']} from cache), "
                  f"{usage['prompt_tokens']:,} prompt + {usage['completion_tokens']:,} completion tokens, "
                  f"${usage['cost_usd']:.4f}.", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
