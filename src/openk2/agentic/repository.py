"""The tool repository: validated, deduplicated tools organised in a domain taxonomy, and its map (K2 Fig. 9).

Domains are paths ("finance/trading"); `taxonomy()` is the tree with tool counts. The repository is one JSONL
file of `ToolSpec.to_dict()` lines (`save`/`load`), so every later stage and every shard reads the same tools.
`plot_map` projects hashed bag-of-words vectors of each tool's name, description and parameter names onto two
dimensions (t-SNE as K2 used, exact and in numpy, up to 1,000 tools; PCA above that, where exact t-SNE's n^2 cost
is too high) and colours points by top-level domain, with real (imported) and synthetic tools drawn with
different markers, so the complementary coverage of the two sources is visible, as in K2's Figure 9.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from openk2.agentic.common import Rejection, text_vector
from openk2.agentic.tools import DedupIndex, ToolSchemaError, ToolSpec
from openk2.utils.io import atomic_write_text


class ToolRepository:
    def __init__(self, tools: Iterable[ToolSpec] = (), dedupe_threshold: float = 0.8) -> None:
        self.threshold = dedupe_threshold
        self._dedup = DedupIndex(dedupe_threshold)
        self._tools = self._dedup.tools
        self.rejections: list[Rejection] = []
        self.add_many(tools)

    def add(self, spec: ToolSpec, stage: str = "repository") -> Rejection | None:
        """Add a tool unless it duplicates one already here; returns the rejection if it does."""
        dup = self._dedup.find(spec)
        if dup is not None:
            r = Rejection(stage, spec.name, dup[1], {"source": spec.source, "duplicate_of": dup[0].name})
            self.rejections.append(r)
            return r
        self._dedup.add(spec)
        return None

    def add_many(self, specs: Iterable[ToolSpec], stage: str = "repository") -> list[Rejection]:
        return [r for s in specs if (r := self.add(s, stage)) is not None]

    def __len__(self) -> int:
        return len(self._tools)

    def __iter__(self):
        return iter(self._tools.values())

    def __contains__(self, name: str) -> bool:
        return name in self._tools

    def __getitem__(self, name: str) -> ToolSpec:
        return self._tools[name]

    def get(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def domains(self) -> list[str]:
        return sorted({t.domain for t in self})

    def by_domain(self) -> dict[str, list[ToolSpec]]:
        out: dict[str, list[ToolSpec]] = {}
        for t in self:
            out.setdefault(t.domain, []).append(t)
        return dict(sorted(out.items()))

    def taxonomy(self) -> dict[str, Any]:
        """{"count": n, "children": {part: subtree}} over domain paths."""
        root: dict[str, Any] = {"count": 0, "children": {}}
        for t in self:
            node = root
            node["count"] += 1
            for part in t.domain.split("/"):
                node = node["children"].setdefault(part, {"count": 0, "children": {}})
                node["count"] += 1
        return root

    def stats(self) -> dict[str, Any]:
        return {"tools": len(self), "domains": len(self.domains()),
                "by_source": dict(Counter(t.source.split(":")[0] for t in self)),
                "by_category": dict(Counter(t.domain.split("/")[0] for t in self)),
                "rejections": len(self.rejections)}

    def sample(self, rng: random.Random, k: int, domain: str | None = None) -> list[ToolSpec]:
        pool = [t for t in self if domain is None or t.domain == domain or t.domain.startswith(domain + "/")]
        return rng.sample(pool, min(k, len(pool)))

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, "".join(json.dumps(t.to_dict(), ensure_ascii=False) + "\n" for t in self))

    @classmethod
    def load(cls, path: str | os.PathLike, dedupe_threshold: float = 0.8) -> ToolRepository:
        """Read a repository JSONL; a line that fails validation is a rejection naming file:line."""
        repo = cls(dedupe_threshold=dedupe_threshold)
        for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                repo.add(ToolSpec.from_dict(json.loads(line)), stage="load")
            except (ValueError, ToolSchemaError, AttributeError) as e:
                repo.rejections.append(Rejection("load", f"{path}:{i}", str(e)))
        return repo


def project_2d(specs: list[ToolSpec], dim: int = 256):
    """(n, 2) PCA coordinates of the tools' hashed word vectors."""
    import numpy as np

    return project_rows(np.array([text_vector(s.words, dim) for s in specs], dtype=np.float64).reshape(len(specs), dim))


def tsne_2d(x, perplexity: float = 30.0, iters: int = 500, seed: int = 0):
    """Exact t-SNE (van der Maaten & Hinton, 2008) of the rows of `x`, PCA-initialised; O(n^2) memory and time,
    meant for up to a few thousand points."""
    import numpy as np

    n = x.shape[0]
    if n < 4:
        return np.zeros((n, 2))
    perplexity = min(perplexity, (n - 1) / 3)
    d = np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0)
    p = np.zeros((n, n))
    target = np.log(perplexity)
    for i in range(n):  # binary search of the precision that gives each row the target entropy
        lo, hi, beta = 0.0, np.inf, 1.0
        di = np.delete(d[i], i)
        for _ in range(50):
            w = np.exp(-(di - di.min()) * beta)
            pi = w / w.sum()
            h = -(pi * np.log(np.maximum(pi, 1e-12))).sum()
            if abs(h - target) < 1e-5:
                break
            if h > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i, np.arange(n) != i] = pi
    p = np.maximum((p + p.T) / (2 * n), 1e-12)
    y = project_rows(x)
    y = y / (y[:, 0].std() or 1.0) * 1e-4
    rng = np.random.default_rng(seed)
    y = y + rng.normal(0, 1e-6, y.shape)
    velocity = np.zeros_like(y)
    lr = max(n / 12 / 4, 50.0)
    for it in range(iters):
        exaggeration, momentum = (12.0, 0.5) if it < iters // 4 else (1.0, 0.8)
        diff = y[:, None, :] - y[None, :, :]
        num = 1.0 / (1.0 + (diff ** 2).sum(-1))
        np.fill_diagonal(num, 0.0)
        q = np.maximum(num / num.sum(), 1e-12)
        grad = 4.0 * (((exaggeration * p - q) * num)[:, :, None] * diff).sum(1)
        velocity = momentum * velocity - lr * grad
        y = y + velocity
    return y - y.mean(0)


def project_rows(x):
    """(n, 2) PCA coordinates of the rows of `x`."""
    import numpy as np

    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    x = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    coords = u[:, :2] * s[:2]
    return np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))


def plot_map(repo: ToolRepository, path: str | os.PathLike, title: str = "Tool repository by domain",
             method: str = "auto") -> Path:
    """Write a PNG map of the repository: one point per tool, colour = top-level domain, marker = source kind.

    `method`: "tsne" (as K2's Figure 9), "pca", or "auto" (t-SNE up to 1,000 tools, PCA above)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    specs = list(repo)
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"method must be auto, tsne or pca, got {method!r}")
    use_tsne = method == "tsne" or (method == "auto" and len(specs) <= 1000)
    if use_tsne:
        vectors = np.array([text_vector(s.words) for s in specs], dtype=np.float64).reshape(len(specs), -1)
        coords = tsne_2d(vectors)
    else:
        coords = project_2d(specs)
    cats = sorted({s.domain.split("/")[0] for s in specs})
    cmap = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(8, 6))
    for kind, marker in (("synthetic", "o"), ("real", "^")):
        for ci, cat in enumerate(cats):
            idx = [i for i, s in enumerate(specs) if s.domain.split("/")[0] == cat
                   and (s.source.startswith("synthetic")) == (kind == "synthetic")]
            if idx:
                ax.scatter(coords[idx, 0], coords[idx, 1], s=18, marker=marker, color=cmap(ci % 20),
                           label=f"{cat} ({kind}, {len(idx)})", alpha=0.8)
    ax.set_title(f"{title}: {len(specs)} tools, {len(cats)} categories ({'t-SNE' if use_tsne else 'PCA'})")
    ax.set_xticks([])
    ax.set_yticks([])
    if specs:
        ax.legend(fontsize=7, loc="best", ncol=2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
