"""data.tokenizer_chat_dialogs: tool-use chat text in the tokenizer's corpus only (not in the LM's)."""

import subprocess
import sys

from openk2.agentic.world_domain import SYSTEM_PROMPT, TOOLS
from openk2.data.chat import render_chat_ids
from openk2.data.tokenizer import Tokenizer
from openk2.train.config import load_config
from openk2.train.data_setup import build_sources, get_tokenizer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.max_steps=1", "train.checkpoint_every=1", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false"]


def _declaration_tokens(tokenizer: Tokenizer) -> int:
    return len(render_chat_ids(tokenizer, [{"role": "system", "content": SYSTEM_PROMPT}], TOOLS)[0])


def test_chat_dialogs_shrink_the_tool_declarations_and_are_cached_apart(tmp_path):
    def tokenizer(n: int) -> Tokenizer:
        cfg = load_config(None, [*TINY, f"data.tokenizer_chat_dialogs={n}", f"data.cache_dir='{tmp_path}'"])
        return get_tokenizer(cfg, build_sources(cfg)[0], progress=False)

    prose_only, with_chat = tokenizer(0), tokenizer(20)
    assert _declaration_tokens(with_chat) < 0.7 * _declaration_tokens(prose_only)
    assert len(list(tmp_path.glob("tokenizer-700-*"))) == 2  # the option is part of the cache key
    cfg = load_config(None, TINY)
    docs = [d for s in build_sources(cfg)[0] if s.split != "val" for d in s.texts]
    assert not any('"properties"' in d for d in docs)  # the LM's corpus is unchanged


def _pretrain(tmp_path, *overrides):
    args = [sys.executable, "-m", "openk2", "pretrain"]
    for o in [*TINY, f"run.dir='{tmp_path / 'run'}'", f"data.cache_dir='{tmp_path / 'cache'}'", *overrides]:
        args += ["--set", o]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_pretrain_cli_trains_a_chat_aware_tokenizer_by_default(tmp_path):
    proc = _pretrain(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_tokenizer = Tokenizer.load(tmp_path / "run" / "tokenizer")
    prose_cfg = load_config(None, [*TINY, "data.tokenizer_chat_dialogs=0", f"data.cache_dir='{tmp_path / 'p'}'"])
    prose_only = get_tokenizer(prose_cfg, build_sources(prose_cfg)[0], progress=False)
    assert _declaration_tokens(run_tokenizer) < 0.7 * _declaration_tokens(prose_only)


def test_negative_chat_dialogs_is_a_clear_error(tmp_path):
    proc = _pretrain(tmp_path, "data.tokenizer_chat_dialogs=-1")
    assert proc.returncode != 0 and "data.tokenizer_chat_dialogs must be >= 0" in proc.stdout + proc.stderr
