import json
import os
import subprocess
import sys

import pytest
import torch

from openk2.data.chat_format import ChatFormat
from openk2.data.tokenizer import IM_ASSISTANT, IM_END, IM_MIDDLE, IM_SYSTEM, IM_USER
from openk2.data.world import World
from openk2.train.config import load_config
from openk2.train.sft import run_sft, sft_config
from openk2.train.sft_data import (
    Conversation,
    SFTDataError,
    SFTLoader,
    read_chat_jsonl,
    row_tensors,
    split_validation,
    tokenize_conversations,
)
from openk2.train.trainer import Trainer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.max_steps=2", "train.checkpoint_every=2", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false"]
SFT = ["train.batch_size=2", "train.seq_len=576", "train.max_steps=24", "train.lr=3e-3", "train.warmup_steps=2",
       "train.eval_every=24", "train.eval_batches=4", "train.checkpoint_every=12", "run.progress=false",
       "run.tensorboard=false"]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"name": {"type": "string"}}}}}]


def _chats(world: World, people) -> list[dict]:
    """Short tool-use chats: the user asks a hobby, the assistant calls lookup, then answers from the result."""
    out = []
    for p in people:
        call = {"id": "functions.lookup:0", "type": "function",
                "function": {"name": "lookup", "arguments": json.dumps({"name": p.name})}}
        out.append({"tools": TOOLS, "messages": [
            {"role": "user", "content": f"Hobby of {p.name}?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "functions.lookup:0", "content": p.hobby},
            {"role": "assistant", "content": f"{p.name} likes {p.hobby}."}]})
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny pretraining run (2 steps): the starting checkpoint and tokenizer of the SFT tests."""
    root = tmp_path_factory.mktemp("sft")
    cfg = load_config(None, [*TINY, f"run.dir='{root / 'base'}'", f"data.cache_dir='{root / 'cache'}'"])
    Trainer(cfg).train()
    world = World.generate(seed=0, n_people=60)
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in _chats(world, world.train_people)))
    val = root / "val.jsonl"
    val.write_text("".join(json.dumps(c) + "\n" for c in _chats(world, world.heldout_people)))
    return root, root / "base", train, val


def test_mask_covers_exactly_the_assistant_tokens(base_run):
    """Token by token against the K2 template: 1 from after each `<|im_assistant|>assistant<|im_middle|>` through
    its `<|im_end|>`, 0 on system, user and tool turns, role headers and the tool declarations."""
    from openk2.model_dir import load_tokenizer_and_format

    tok, fmt = load_tokenizer_and_format(base_run[1])
    world = World.generate(seed=0, n_people=60)
    chat = _chats(world, world.train_people[:1])[0]
    chat["messages"].insert(0, {"role": "system", "content": "Be brief."})
    ids, mask = fmt.render_ids_and_mask(chat["messages"], chat["tools"])
    pieces = [tok.decode([i]) for i in ids]
    expected, inside, header = [], False, False
    for piece in pieces:
        if piece in (IM_ASSISTANT, IM_USER, IM_SYSTEM):
            header, inside = piece == IM_ASSISTANT, False
            expected.append(0)
        elif header:
            expected.append(0)
            if piece == IM_MIDDLE:
                header, inside = False, True
        else:
            expected.append(int(inside))
            if piece == IM_END:
                inside = False
    assert mask == expected
    text = "".join(p for p, m in zip(pieces, mask, strict=True) if m)
    assert text == (f"<|tool_calls_section_begin|><|tool_call_begin|>functions.lookup:0<|tool_call_argument_begin|>"
                    f'{{"name": "{world.train_people[0].name}"}}<|tool_call_end|><|tool_calls_section_end|><|im_end|>'
                    f"{world.train_people[0].name} likes {world.train_people[0].hobby}.<|im_end|>")
    # Targets: position t predicts t+1 and counts only where t+1 is an assistant token.
    convs, _ = tokenize_conversations([Conversation(chat["messages"], chat["tools"], "x:1")], fmt, 4096)
    x, y = row_tensors(convs, [[0]], len(ids) + 3, tok.pad_id)
    assert x[0, : len(ids)].tolist() == ids
    kept = (y[0] != -100).nonzero().flatten().tolist()
    assert kept == [t - 1 for t in range(1, len(ids)) if mask[t]]
    assert y[0, kept].tolist() == [ids[t + 1] for t in kept]
    assert isinstance(fmt, ChatFormat)


def test_bad_jsonl_lines_name_file_and_line(tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join([good, "{not json", json.dumps({"messages": [{"role": "user", "content": "x"}]}),
                               json.dumps({"messages": [{"role": "wizard"}]}), json.dumps([1]), good]) + "\n")
    with pytest.raises(SFTDataError, match=rf"{path}:2: invalid JSON"):
        read_chat_jsonl([path], "fail")
    convs, skipped = read_chat_jsonl([path], "skip")
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:6"]
    assert [s.split(": ", 1)[0] for s in skipped] == [f"{path}:{i}" for i in (2, 3, 4, 5)]
    assert "no assistant message" in skipped[1] and "role" in skipped[2]


def test_validation_split_depends_on_content_not_on_the_file_path(tmp_path):
    # The split used to hash file:line, so the same data at another path trained on another set and order (the
    # demo's SFT stage and the same stage run elsewhere: held-out facts 14.8% vs 71.1%, docs/experiments.md).
    lines = [json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
             for i in range(200)] + [json.dumps({"text": f"doc {i}"}) for i in range(100)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    here, there = tmp_path / "a" / "train.jsonl", tmp_path / "b" / "deeper" / "other.jsonl"
    here.write_text("\n".join(lines) + "\n")
    there.write_text("\n".join(reversed(lines)) + "\n")  # another path and another line order
    def held(path):
        return sorted(json.dumps([c.messages, c.text]) for c in split_validation(read_chat_jsonl([path])[0], 0.1)[1])
    assert held(here) == held(there) and 10 <= len(held(here)) <= 50
    twice = tmp_path / "twice.jsonl"  # a record repeated k times is held out (or trained on) in every copy
    twice.write_text("\n".join(lines * 3) + "\n")
    train, val = split_validation(read_chat_jsonl([twice])[0], 0.1)
    assert len(val) == 3 * len(held(here))
    assert not {json.dumps([c.messages, c.text]) for c in val} & {json.dumps([c.messages, c.text]) for c in train}


def test_loader_packs_and_resumes_exactly(base_run):
    from openk2.model_dir import load_tokenizer_and_format

    tok, fmt = load_tokenizer_and_format(base_run[1])
    convs, _ = read_chat_jsonl([base_run[2]])
    toks, stats = tokenize_conversations(convs, fmt, 577)
    assert stats["conversations"] == len(convs) and stats["assistant_tokens"] > 0
    a = SFTLoader(toks, 4, 576, tok.pad_id, seed=3)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    expect = [a.next_batch() for _ in range(30)]  # crosses an epoch boundary
    b = SFTLoader(toks, 4, 576, tok.pad_id, seed=3)
    b.load_state_dict(state)
    for (x1, y1), (x2, y2) in zip(expect, [b.next_batch() for _ in range(30)], strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.rows_per_epoch() < len(toks)  # several conversations per row: packed
    with pytest.raises(ValueError, match="seed"):
        SFTLoader(toks, 4, 576, tok.pad_id, seed=4).load_state_dict(state)


def test_sft_lowers_held_out_loss_and_writes_a_model_dir(base_run):
    root, base, train, val = base_run
    cfg = sft_config(base, [train], run_dir=root / "sft", overrides=SFT, val_files=[val])
    assert cfg.model.preset == "tiny"  # inherited from the starting run
    before = Trainer(cfg).evaluate()["val_loss"]  # the pretrained weights on held-out people's chats
    last = run_sft(cfg)
    assert last["step"] == 24 and last["val_loss"] < 0.6 * before, (before, last["val_loss"])
    assert last["data"]["train"]["conversations"] == 54
    from openk2.model_dir import load_model_dir

    loaded = load_model_dir(root / "sft")  # what eval --model and serve accept
    assert loaded.chat_format.tool_parser is not None
    # Rerunning the same config resumes a finished run: nothing to do.
    assert run_sft(sft_config(base, [train], run_dir=root / "sft", overrides=SFT, val_files=[val]))["step"] == 24


def test_cli_sft_and_bad_line_errors(base_run, tmp_path):
    root, base, train, _ = base_run
    bad = tmp_path / "bad.jsonl"
    # line 55 is broken; line 56 is plain pretraining text (PTX: loss on every token), a valid record
    bad.write_text(train.read_text() + "{oops\n" + json.dumps({"text": "Plain pretraining text."}) + "\n")
    args = [sys.executable, "-m", "openk2", "sft", "--init", str(base), "--data", str(bad), "--out",
            str(tmp_path / "run"), "-c", "recipes/sft-nano.toml"]
    small = [a for o in SFT[:1] + ["train.seq_len=576", "train.max_steps=2", "train.eval_every=2",
                                   "train.checkpoint_every=2", "run.progress=false"] for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": "src"}
    proc = subprocess.run(args + small, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2 and f"{bad}:55" in proc.stdout.replace("\n", ""), proc.stdout + proc.stderr
    proc = subprocess.run(args + small + ["--set", "data.on_error='skip'"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "at step 2," in out and "1 bad lines skipped" in out  # the text line is read, not skipped
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()


def test_sft_from_a_hf_checkpoint(base_run, tmp_path):
    """init.from_checkpoint may be a HF directory: its config.json defines the model, its weights start SFT."""
    from openk2.cli.hf import resolve_model_source
    from openk2.model_dir import load_model_dir
    from openk2.serve.testing import make_model_dir

    root, base, train, _ = base_run
    loaded = load_model_dir(base)
    hf = make_model_dir(tmp_path / "hf", loaded.model, loaded.tokenizer)
    cfg = sft_config(hf, [train], run_dir=tmp_path / "sft", overrides=[*SFT, "train.max_steps=1",
                                                                       "train.eval_every=0"])
    trainer = Trainer(cfg)
    start = resolve_model_source(hf).state_dict()
    assert all(torch.equal(v.float(), start[k].float()) for k, v in trainer.model.state_dict().items())
    trainer.train()
    assert load_model_dir(tmp_path / "sft").model.config.num_hidden_layers == loaded.model.config.num_hidden_layers
