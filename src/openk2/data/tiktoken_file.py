"""`tiktoken.model` files (Kimi K2, Moonlight): read, write, and turn into a `tokenizers` byte-level BPE.

The file format is one `base64(token bytes) rank` line per BPE token; the special tokens are not in it. K2 puts
its specials after the BPE ranks: the named ones at the ids `tokenizer_config.json`'s `added_tokens_decoder` gives,
every other id of the 256 reserved slots as `<|reserved_token_{id}|>` (its `tokenization_kimi.py`), and encodes
with its `pat_str` (`K2_SPLIT_PATTERN`).

tiktoken has ranks and no merge list: a piece is encoded by repeatedly joining the adjacent pair whose join has
the lowest rank. A `tokenizers` BPE given, for every token, each split into two tokens as a merge, ordered by the
rank of the joined token (transformers' `TikTokenConverter` does the same), picks the same pair at every step, so
the two encode identically (tested against tiktoken itself). `ignore_merges` reproduces tiktoken's shortcut of
mapping a piece that is itself a token straight to it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from openk2.data.tokenizer import bytes_to_unicode

TIKTOKEN_FILE = "tiktoken.model"
# tokenization_kimi.py's `num_reserved_special_tokens`: the ids after the BPE ranks that belong to specials.
NUM_RESERVED_SPECIAL_TOKENS = 256


def reserved_token_name(token_id: int) -> str:
    """The name tokenization_kimi.py gives a reserved special id that `added_tokens_decoder` leaves unnamed."""
    return f"<|reserved_token_{token_id}|>"


def read_tiktoken_file(path: str | os.PathLike) -> dict[bytes, int]:
    """Token bytes -> rank, from a `tiktoken.model` file; errors name the file and line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a 'base64-token rank' line ({e})") from None
    return ranks


def write_tiktoken_file(ranks: Mapping[bytes, int], path: str | os.PathLike) -> Path:
    """Write `ranks` in tiktoken's format (sorted by rank), as K2 ships its `tiktoken.model`."""
    path = Path(path)
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    lines = [f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in by_rank]
    path.write_text("".join(lines), encoding="ascii")
    return path


_BYTE_ENCODER = bytes_to_unicode()


def _spell(token: bytes) -> str:
    return "".join(_BYTE_ENCODER[b] for b in token)


def bpe_vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary and merge list that encode like tiktoken with `ranks` (module docstring)."""
    merges: list[tuple[int, int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    vocab = {_spell(token): rank for token, rank in ranks.items()}
    return vocab, [(_spell(left), _spell(right)) for *_, left, right in merges]


def tiktoken_backend(ranks: Mapping[bytes, int], pattern: str, specials: Mapping[int, str],
                     num_reserved: int = NUM_RESERVED_SPECIAL_TOKENS) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like `tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks,
    special_tokens=...)` with `specials` (id -> name) at their ids and the rest of the `num_reserved` ids after
    the ranks as reserved tokens, as tokenization_kimi.py builds it.

    The ranks must be 0..n-1 (as K2's are): `tokenizers` gives added tokens the ids after the BPE vocabulary, so
    the specials are added in id order with the ids between them filled.
    """
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise ValueError("tiktoken ranks must be the contiguous ids 0..n-1")
    if any(len(t) == 0 for t in ranks) or any(bytes([b]) not in ranks for b in range(256)):
        raise ValueError("a byte-level tiktoken vocabulary needs all 256 single bytes and no empty token")
    below = sorted(i for i in specials if i < n)
    if below:
        raise ValueError(f"special token ids {below[:5]} collide with BPE ranks (0..{n - 1})")
    vocab, merges = bpe_vocab_and_merges(ranks)
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    last = max([*specials, n + num_reserved - 1])
    names = [specials.get(i, reserved_token_name(i)) for i in range(n, last + 1)]
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    for i, name in ((i, names[i - n]) for i in range(n, last + 1)):
        if tok.token_to_id(name) != i:
            raise ValueError(f"special token {name!r} landed at id {tok.token_to_id(name)}, not {i} "
                             "(a name used twice, or one that is also a BPE token?)")
    return tok
