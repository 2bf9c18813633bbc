"""openk2.data.tokenizer: training, special tokens, round trips, K2's split regex, save/load, HF loading."""

from __future__ import annotations

import json
import pickle
import random

import pytest

from openk2.data.tokenizer import (
    IM_END,
    K2_SPLIT_PATTERN,
    SPECIAL_TOKENS,
    Tokenizer,
    train_tokenizer,
)

VOCAB = 700

# Characters from every class K2's split regex distinguishes: cased/uncased letters, Han vs other Lo scripts,
# combining marks, titlecase and modifier letters, digits incl. non-ASCII, punctuation, unicode whitespace, emoji.
_POOL = (
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list(" \t\n\r\n  .,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
    + list("éüßñçÉÜÑΣσλΩжЖ") + ["x\u0301", "\u0308", "ǅ", "ʰ", "ᾈ"]
    + list("你好世界中文字") + list("こんにちはカタカナ") + list("한국어")
    + list("العربية") + list("हिन्दी") + list("ไทย")
    + ["٣", "４", "½", "Ⅻ"] + ["\u00a0", "\u3000", "\u2028", "\u200b", "\x0b", "\x0c", "\x85"]
    + ["😀", "👍🏽", "🇩🇪", "∑", "→", "€"] + ["'s", "'S", "'ll", "'LL", "'re", "'ve", "'m", "'d", "'t"]
)


def _random_text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_POOL) for _ in range(n))


def corpus(n_docs: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "weather", "tool", "assistant", "system", "user", "function", "return", "model", "token",
             "Kimi", "Moonshot", "def", "class", "import", "json", "city", "Köln", "天气", "你好", "12", "2025"]
    docs = []
    for _ in range(n_docs):
        parts = [rng.choice(words) if rng.random() < 0.7 else _random_text(rng, rng.randint(1, 6)) for _ in range(60)]
        docs.append(" ".join(parts))
    return docs


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(corpus(), VOCAB, show_progress=False)


def test_vocab_layout_special_tokens_contiguous_at_end(tok):
    assert tok.vocab_size == VOCAB
    n_bpe = VOCAB - len(SPECIAL_TOKENS)
    assert list(tok.special_ids) == list(SPECIAL_TOKENS)
    assert list(tok.special_ids.values()) == list(range(n_bpe, VOCAB))
    assert (tok.bos_id, tok.eos_id, tok.im_end_id, tok.pad_id) == (n_bpe, n_bpe + 1, n_bpe + 2, VOCAB - 1)
    assert tok.token_id("<|tool_call_argument_begin|>") == n_bpe + 10
    with pytest.raises(KeyError):
        tok.token_id("<|not_a_token|>")


def test_round_trip_arbitrary_unicode(tok):
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(0, 80)) for _ in range(300)]
    texts += ["", " ", "\n\n\n", "a" * 5000, "".join(chr(c) for c in range(0x20, 0x3000, 7)), "\U0010fffd\x00\x7f"]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB - len(SPECIAL_TOKENS) for i in ids)  # plain text never yields a special id
        assert tok.decode(ids) == text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_trained_merges_compress(tok):
    text = " ".join(corpus(20, seed=5))
    assert len(tok.encode(text)) < 0.6 * len(text.encode("utf-8"))


def test_add_bos(tok):
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]
    assert tok.encode_batch(["hi", ""], add_bos=True) == [[tok.bos_id, *tok.encode("hi")], [tok.bos_id]]


def test_special_token_strings_in_text_are_plain_text_by_default(tok):
    for special in SPECIAL_TOKENS:
        text = f"a{special}b {special}"
        ids = tok.encode(text)
        assert tok.special_ids[special] not in ids
        assert tok.decode(ids) == text
        parsed = tok.encode(text, allow_special=True)
        assert parsed.count(tok.special_ids[special]) == 2
        assert tok.decode(parsed) == text
    # A near miss is never a special token, even when parsing is allowed.
    assert tok.im_end_id not in tok.encode("<|im_end|", allow_special=True)
    assert tok.encode_batch([IM_END], allow_special=True) == [[tok.im_end_id]]


def test_pickled_tokenizer_keeps_plain_text_encoding(tok):
    # DataLoader workers receive the tokenizer pickled; the copy must still treat "<|im_end|>" as plain text.
    clone = pickle.loads(pickle.dumps(tok))
    text = f"doc{IM_END}more"
    assert clone.encode(text) == tok.encode(text) and tok.im_end_id not in clone.encode(text)
    assert clone.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    assert clone.special_ids == tok.special_ids and clone.model_max_length == tok.model_max_length


def test_decode_skip_special_tokens(tok):
    ids = [tok.bos_id, *tok.encode("hello"), tok.im_end_id, tok.pad_id]
    assert tok.decode(ids) == "[BOS]hello<|im_end|>[PAD]"
    assert tok.decode(ids, skip_special_tokens=True) == "hello"


def test_token_bytes_counts_utf8_bytes(tok):
    tb = tok.token_bytes()
    assert len(tb) == VOCAB
    assert all(tb[i] == 0 for i in tok.special_ids.values())
    assert all(b >= 1 for i, b in enumerate(tb) if i not in set(tok.special_ids.values()))
    rng = random.Random(2)
    for text in [_random_text(rng, 50) for _ in range(50)]:
        ids = tok.encode(text, add_bos=True)
        assert sum(tb[i] for i in ids) == len(text.encode("utf-8"))


def test_mergeable_ranks_are_the_bpe_vocab_as_bytes(tok):
    ranks = tok.mergeable_ranks()
    assert len(ranks) == VOCAB - len(SPECIAL_TOKENS)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    assert all(bytes([b]) in ranks for b in range(256))
    by_id = {i: b for b, i in ranks.items()}
    text = "the weather in Köln, 天气 😀"
    assert b"".join(by_id[i] for i in tok.encode(text)) == text.encode("utf-8")


def test_split_regex_matches_tiktoken_semantics():
    """Oniguruma's reading of K2's pattern equals the `regex` module's (VERSION1 has `&&`, like tiktoken)."""
    regex = pytest.importorskip("regex")
    from tokenizers import Regex, pre_tokenizers

    ours = pre_tokenizers.Split(Regex(K2_SPLIT_PATTERN), behavior="isolated")
    ref = regex.compile("(?V1)" + K2_SPLIT_PATTERN)
    rng = random.Random(3)
    samples = [_random_text(rng, rng.randint(1, 40)) for _ in range(2000)]
    samples += ["Hello World's DON'T 你好世界ABCdef  \n\n  12345 x\u0301y  \t\r\n😀", "ǅemal ʰa ΣΑΣ'LL"]
    for s in samples:
        assert [p for p, _ in ours.pre_tokenize_str(s)] == ref.findall(s), repr(s)
    # Spot checks of K2-specific behaviour: Han runs split from other letters, digits in groups of <= 3.
    assert ref.findall("ab中文cd") == ["ab", "中文", "cd"]
    assert ref.findall("1234567") == ["123", "456", "7"]


def test_train_rejects_impossible_vocab():
    with pytest.raises(ValueError, match="vocab_size must be"):
        train_tokenizer(["abc"], 256, show_progress=False)
    with pytest.raises(ValueError, match="corpus only supports"):
        train_tokenizer(["tiny corpus"] * 3, 2000, show_progress=False)


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "tok")
    files = sorted(p.name for p in (tmp_path / "tok").iterdir())
    assert files == ["tokenizer.json", "tokenizer_config.json"]  # no temp files left behind
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("[BOS]", "[EOS]", "[PAD]")
    assert "<|im_assistant|>" in config["chat_template"]
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.vocab_size == tok.vocab_size and loaded.special_ids == tok.special_ids
    assert loaded.model_max_length == tok.model_max_length
    text = " ".join(corpus(5, seed=9)) + IM_END
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode(text, allow_special=True) == tok.encode(text, allow_special=True)
    tok.save(tmp_path / "tok")  # overwriting an existing save works
    assert Tokenizer.load(tmp_path / "tok").encode(text) == tok.encode(text)


def test_transformers_autotokenizer_loads_it(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == tok.vocab_size
    rng = random.Random(4)
    for text in [_random_text(rng, 60) for _ in range(100)] + [f"x{IM_END}y"]:
        # HF adds no BOS/EOS, and like allow_special=True it parses special-token strings.
        assert hf(text)["input_ids"] == tok.encode(text, allow_special=True)
        assert hf.decode(tok.encode(text)) == text
