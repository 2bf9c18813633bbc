"""Kimi K2's `tiktoken.model` + `tokenizer_config.json` tokenizers: loaded into `tokenizers`, encoding exactly as
tiktoken does with K2's pattern, specials at K2's ids."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from openk2.data.tiktoken_file import (
    TIKTOKEN_FILE,
    read_tiktoken_file,
    reserved_token_name,
    tiktoken_backend,
    write_tiktoken_file,
)
from openk2.data.tokenizer import K2_SPLIT_PATTERN, TOKENIZER_CONFIG_FILE, train_tokenizer
from openk2.data.tokenizer_files import TokenizerFilesError, load_tokenizer_dir
from openk2.serve.testing_checkpoints import K2_NUM_RANKS, K2_SPECIAL_OFFSETS, pad_ranks, write_kimi_tokenizer

_POOL = (list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") + list(" \t\n\r  .,;:!?'\"()[]{}<>|/-_")
         + list("éüßñÉÜΣσжЖ") + ["x\u0301", "ǅ", "ʰ"] + list("你好世界天气") + list("こんにちはカタカナ")
         + list("한국어")
         + ["٣", "４", "\u00a0", "\u3000", "😀", "👍🏽", "€"] + ["'s", "'S", "'ll", "'re", "'ve", "'m", "'d", "'t"])
_WORDS = ["the", "weather", "tool", "assistant", "Kimi", "Moonshot", "city", "Köln", "天气", "你好", "12", "2025",
          "function", "json", "  ", "\n\n", "don't", "I'M"]


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_WORDS) + " " if rng.random() < 0.4 else rng.choice(_POOL) for _ in range(n))


@pytest.fixture(scope="module")
def ranks() -> dict[bytes, int]:
    rng = random.Random(0)
    corpus = [" ".join(_text(rng, 40) for _ in range(3)) for _ in range(300)]
    return train_tokenizer(corpus, 900, show_progress=False).mergeable_ranks()


def _reference(ranks: dict[bytes, int], specials: dict[str, int]):
    tiktoken = pytest.importorskip("tiktoken")
    return tiktoken.Encoding("k2-test", pat_str=K2_SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)


def _specials(n: int) -> dict[str, int]:
    return {t: n + off for t, off in K2_SPECIAL_OFFSETS.items()}


def test_file_round_trip(ranks, tmp_path):
    path = write_tiktoken_file(ranks, tmp_path / TIKTOKEN_FILE)
    assert read_tiktoken_file(path) == ranks
    (tmp_path / "bad.model").write_text("aGk= 0\nnot-a-line\n")
    with pytest.raises(ValueError, match=r"bad.model:2"):
        read_tiktoken_file(tmp_path / "bad.model")


def test_encodes_exactly_like_tiktoken(ranks, tmp_path):
    n = len(ranks)
    tok = load_tokenizer_dir(write_kimi_tokenizer(tmp_path, ranks))
    ref = _reference(ranks, _specials(n))
    rng = random.Random(1)
    texts = [_text(rng, rng.randint(1, 200)) for _ in range(300)]
    texts += ["", " ", "\n\n\n", "don't STOP'S", "x<|im_end|>y[BOS]", "<|tool_call_begin|>functions.f:0"]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, disallowed_special=()), text
        assert tok.encode(text, allow_special=True) == ref.encode(text, allowed_special="all"), text
        assert tok.decode(tok.encode(text)) == text


def test_specials_sit_at_k2_ids_with_reserved_slots(ranks, tmp_path):
    n = len(ranks)
    tok = load_tokenizer_dir(write_kimi_tokenizer(tmp_path, ranks))
    assert tok.vocab_size == n + 256
    for token, off in K2_SPECIAL_OFFSETS.items():
        assert tok.token_id(token) == n + off
    assert tok.id_to_token(n + 5) == reserved_token_name(n + 5)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.im_end_id) == (n, n + 1, n + 255, n + 2)
    assert tok.encode("hi", add_bos=True)[0] == n


@pytest.mark.slow
def test_full_size_k2_layout(ranks, tmp_path):
    """With K2's 163,584 ranks the specials land on K2's published ids ([BOS] 163584 ... [PAD] 163839)."""
    full = pad_ranks(ranks, K2_NUM_RANKS)
    tok = load_tokenizer_dir(write_kimi_tokenizer(tmp_path, full))
    assert tok.vocab_size == 163840
    assert [tok.token_id(t) for t in ("[BOS]", "[EOS]", "<|im_end|>", "<|im_system|>", "<|im_middle|>",
                                      "<|tool_calls_section_begin|>", "<|tool_call_end|>", "[PAD]")] == [
        163584, 163585, 163586, 163594, 163601, 163595, 163599, 163839]
    ref = _reference(full, _specials(K2_NUM_RANKS))
    text = "<|im_user|>user<|im_middle|>天气 in Köln?<|im_end|>"
    assert tok.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")


def test_pad_token_is_optional(ranks, tmp_path):
    d = write_kimi_tokenizer(tmp_path, ranks)
    config = json.loads((d / TOKENIZER_CONFIG_FILE).read_text())
    del config["pad_token"]
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    tok = load_tokenizer_dir(d)
    assert tok.pad_token is None and tok.pad_id == tok.eos_id  # padding is masked: any valid id serves
    copy = pickle.loads(pickle.dumps(tok))  # DataLoader workers get the same token names and plain-text encoding
    assert (copy.bos_token, copy.pad_token, copy.encode("<|im_end|>")) == ("[BOS]", None, tok.encode("<|im_end|>"))


def test_bad_directories_say_what_is_wrong(ranks, tmp_path):
    with pytest.raises(TokenizerFilesError, match="no tokenizer.json or tiktoken.model"):
        load_tokenizer_dir(tmp_path)
    write_tiktoken_file(ranks, tmp_path / TIKTOKEN_FILE)
    with pytest.raises(TokenizerFilesError, match="added_tokens_decoder"):
        load_tokenizer_dir(tmp_path)
    d = write_kimi_tokenizer(tmp_path / "k", ranks)
    config = json.loads((d / TOKENIZER_CONFIG_FILE).read_text())
    config["eos_token"] = "<|not_there|>"
    (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(TokenizerFilesError, match="not_there"):
        load_tokenizer_dir(d)


def test_backend_rejects_unusable_ranks(ranks):
    holes = {t: (r if r < 300 else r + 1) for t, r in ranks.items()}
    with pytest.raises(ValueError, match="contiguous"):
        tiktoken_backend(holes, K2_SPLIT_PATTERN, {})
    with pytest.raises(ValueError, match="collide"):
        tiktoken_backend(ranks, K2_SPLIT_PATTERN, {5: "[BOS]"})
