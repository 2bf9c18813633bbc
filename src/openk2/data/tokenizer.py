"""Byte-level BPE tokenizer with Kimi K2's split regex and special tokens (`k2-recipe.md` §3).

K2 ships a tiktoken BPE (163,584 ranks + 256 reserved specials). openk2 trains and runs the same kind of
tokenizer with the Hugging Face `tokenizers` library, because it both trains (parallel, in Rust) and encodes
(`encode_batch` on all cores), and its `tokenizer.json` loads in transformers, vLLM and SGLang unchanged.

Layout of the vocabulary: ids `0 .. n_bpe-1` are the BPE tokens (the 256 byte tokens, then the merges in
training order), and the 13 `SPECIAL_TOKENS` follow contiguously at the end, in K2's relative order:
`[BOS] [EOS] <|im_end|> <|im_user|> <|im_assistant|> <|im_system|> <|im_middle|> <|tool_calls_section_begin|>
<|tool_calls_section_end|> <|tool_call_begin|> <|tool_call_argument_begin|> <|tool_call_end|> [PAD]`.
K2's ids (163584.. with gaps and reserved slots) are not reproduced; the names are.

Special-token strings inside text. `encode()` treats its input as plain text by default, so a document or a
user message containing the literal string "<|im_end|>" is tokenized as ordinary bytes and can never forge a
control token (tiktoken's `encode_ordinary`, nanochat's choice). Control tokens enter sequences only as ids, from
`openk2.data.chat` or `add_bos`. `encode(text, allow_special=True)` parses them instead, which is what a plain HF
`tokenizer(text)` call does on our saved `tokenizer.json` (the HF chat path matches the default again with
`apply_chat_template(..., sanitize_control_tokens=True)`).

Stop tokens. `eos_token` is `[EOS]` (K2's `tokenizer_config.json`), which ends pretraining documents; a chat turn
ends with `<|im_end|>`, so chat generation must stop on `im_end_id` (and `eos_id`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from openk2.utils.io import atomic_write_text

BOS = "[BOS]"
EOS = "[EOS]"
IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
TOOL_CALLS_SECTION_BEGIN = "<|tool_calls_section_begin|>"
TOOL_CALLS_SECTION_END = "<|tool_calls_section_end|>"
TOOL_CALL_BEGIN = "<|tool_call_begin|>"
TOOL_CALL_ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
TOOL_CALL_END = "<|tool_call_end|>"
PAD = "[PAD]"

SPECIAL_TOKENS: tuple[str, ...] = (
    BOS, EOS, IM_END, IM_USER, IM_ASSISTANT, IM_SYSTEM, IM_MIDDLE, TOOL_CALLS_SECTION_BEGIN,
    TOOL_CALLS_SECTION_END, TOOL_CALL_BEGIN, TOOL_CALL_ARGUMENT_BEGIN, TOOL_CALL_END, PAD,
)

# K2's `pat_str`, verbatim. Oniguruma (the engine behind `tokenizers.Regex`) supports everything it uses:
# `\p{Han}` scripts, `&&` class intersection, `(?i:...)` groups and the `(?!\S)` lookahead; the tests check the
# split against the `regex` module (tiktoken's semantics) on fuzzed unicode.
K2_SPLIT_PATTERN = (
    r"[\p{Han}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# K2's max_position_embeddings; transformers only uses it to warn about over-long inputs.
DEFAULT_MODEL_MAX_LENGTH = 131072

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, which the ByteLevel pre-tokenizer uses to spell tokens (also the
    spelling of tokens in a `tokenizers` vocabulary written from a tiktoken file)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


_BYTE_DECODER: dict[str, int] = {c: b for b, c in bytes_to_unicode().items()}


def _build_backend() -> tokenizers.Tokenizer:
    # ignore_merges: a pre-token that is itself in the vocab maps straight to it, which is tiktoken's (and so
    # K2's) behaviour and skips the merge loop for most words.
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
    # No normalizer: K2 encodes raw text. K2 also cuts input into <=400k-char pieces and <=25k-char runs before
    # the regex; that only protects tiktoken's regex stack and does not change the tokens, so it is not copied.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(K2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    min_frequency: int = 2,
    show_progress: bool = True,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
) -> Tokenizer:
    """Train a byte-level BPE on `texts`; `vocab_size` counts the 13 special tokens appended at the end.

    Raises ValueError if the corpus cannot fill the requested vocabulary (too little text, or too high a
    `min_frequency`): the model's embedding size is set from `vocab_size`, so a silently smaller tokenizer
    would shift every special-token id.
    """
    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    if n_bpe < 256:
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    tok = _build_backend()
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=min_frequency,
        show_progress=show_progress,
        # All 256 bytes are in the vocab whether or not the corpus has them, so any text encodes (no UNK).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != n_bpe:
        raise ValueError(
            f"the corpus only supports {got} BPE tokens at min_frequency={min_frequency}, {n_bpe} were requested "
            f"(vocab_size {vocab_size} - {len(SPECIAL_TOKENS)} specials); give more text or a smaller vocab_size"
        )
    # Added after training so that they take the last ids, in SPECIAL_TOKENS order.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return Tokenizer(tok, model_max_length=model_max_length)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the names of its BOS/EOS/PAD tokens and chat-template metadata.

    openk2's own tokenizers (`train_tokenizer`) have all of K2's `SPECIAL_TOKENS`; a third-party one (DeepSeek-V3,
    Kimi K2's `tiktoken.model`, a fine-tune) has its own specials, named in its `tokenizer_config.json`
    (`openk2.data.tokenizer_files`). Nothing is required up front: `bos_id` and `eos_id` raise when the
    tokenizer lacks the token, and `pad_id` falls back to another id because padded positions are masked.
    """

    def __init__(self, backend: tokenizers.Tokenizer, model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
                 bos_token: str | None = BOS, eos_token: str | None = EOS, pad_token: str | None = PAD) -> None:
        named = {"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}
        unknown = {k: v for k, v in named.items() if v is not None and backend.token_to_id(v) is None}
        if unknown:
            raise ValueError(f"tokenizer lacks the tokens its config names: {unknown}")
        self._tok = backend
        # A second copy with special-token matching switched off: `encode_special_tokens` is a property of the
        # whole Rust tokenizer, so flipping it per call would race with concurrent encodes.
        self._plain = tokenizers.Tokenizer.from_str(backend.to_str())
        self._plain.encode_special_tokens = True
        self.model_max_length = model_max_length
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        added = backend.get_added_tokens_decoder()
        self._special_ids = {t.content: i for i, t in sorted(added.items()) if t.special}

    # ---- encoding ------------------------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text unless `allow_special`."""
        backend = self._tok if allow_special else self._plain
        ids = backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(
        self, texts: Sequence[str], add_bos: bool = False, allow_special: bool = False
    ) -> list[list[int]]:
        """`encode` for many texts at once, in parallel on all cores (Rust/rayon; set TOKENIZERS_PARALLELISM)."""
        backend = self._tok if allow_special else self._plain
        # encode_batch_fast skips computing character offsets, which we never use.
        encodings = backend.encode_batch_fast(list(texts), add_special_tokens=False)
        if add_bos:
            return [[self.bos_id, *e.ids] for e in encodings]
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ---- vocabulary ----------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _named_id(self, token: str | None, what: str) -> int:
        if token is None:
            raise ValueError(f"this tokenizer has no {what} token (its tokenizer_config.json names none)")
        return self.token_id(token)

    @property
    def bos_id(self) -> int:
        return self._named_id(self.bos_token, "BOS")

    @property
    def eos_id(self) -> int:
        return self._named_id(self.eos_token, "EOS")

    @property
    def pad_id(self) -> int:
        """The PAD token's id, else EOS's, else 0: padded positions are masked out of attention and loss, so
        any valid id serves and no tokenizer needs a pad token for it."""
        for token in (self.pad_token, self.eos_token):
            if token is not None:
                return self.token_id(token)
        return 0

    @property
    def im_end_id(self) -> int:
        """K2's end-of-turn token `<|im_end|>` (KeyError if this tokenizer has none)."""
        return self.token_id(IM_END)

    @property
    def special_ids(self) -> dict[str, int]:
        """Special token string -> id, for every special token, in id order (openk2's: SPECIAL_TOKENS order)."""
        return dict(self._special_ids)

    def special_id(self, token: str) -> int | None:
        """The id of the special token `token`, or None if this tokenizer has no such special token."""
        return self._special_ids.get(token)

    def token_id(self, token: str) -> int:
        """Id of a token given by its string (a special token, or a BPE token in byte-level spelling)."""
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"unknown token {token!r}")
        return tid

    def id_to_token(self, token_id: int) -> str:
        tok = self._tok.id_to_token(token_id)
        if tok is None:
            raise KeyError(f"token id {token_id} out of range [0, {self.vocab_size})")
        return tok

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of every token id; 0 for special tokens.

        For bits-per-byte (nanochat): sum(token_bytes[targets]) is the byte count of the predicted text, so
        special tokens, which stand for no text, count 0 and are excluded from the metric.
        """
        out = []
        special = set(self._special_ids.values())
        for i in range(self.vocab_size):
            tok = self._tok.id_to_token(i)  # None for an id a third-party vocabulary leaves unused
            out.append(0 if i in special or tok is None else len(tok))  # one char per byte in ByteLevel spelling
        return out

    def mergeable_ranks(self) -> dict[bytes, int]:
        """BPE tokens as raw bytes -> id, tiktoken's `mergeable_ranks` format (K2's `tiktoken.model` content)."""
        vocab = self._tok.get_vocab(with_added_tokens=False)
        return {bytes(_BYTE_DECODER[c] for c in tok): i for tok, i in vocab.items()}

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer` (parses special-token strings in text)."""
        return self._tok

    # ---- persistence ---------------------------------------------------------------------------------------

    def hf_config(self) -> dict:
        """The `tokenizer_config.json` content that makes `transformers.AutoTokenizer` load this tokenizer."""
        from openk2.data.chat import K2_CHAT_TEMPLATE  # chat.py imports this module

        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            # Nothing is added implicitly (K2's template has no BOS); data loaders add BOS themselves.
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": K2_CHAT_TEMPLATE,
        }

    def save(self, directory: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` into `directory`, each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / TOKENIZER_FILE, self._tok.to_str(pretty=False))
        atomic_write_text(d / TOKENIZER_CONFIG_FILE, json.dumps(self.hf_config(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """The tokenizer in `directory`: `tokenizer.json`, or Kimi K2's `tiktoken.model`, each with the
        `tokenizer_config.json` beside it (`openk2.data.tokenizer_files.load_tokenizer_dir`)."""
        from openk2.data.tokenizer_files import load_tokenizer_dir  # it imports this module

        return load_tokenizer_dir(directory)

    # tokenizers' own pickling drops `encode_special_tokens`, so a Tokenizer sent to DataLoader workers would
    # start parsing control tokens out of plain text; rebuild both copies from the JSON instead.
    def __getstate__(self) -> dict:
        return {"tokenizer_json": self._tok.to_str(), "model_max_length": self.model_max_length,
                "bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["tokenizer_json"]), state["model_max_length"],
                      bos_token=state.get("bos_token", BOS), eos_token=state.get("eos_token", EOS),
                      pad_token=state.get("pad_token", PAD))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"
