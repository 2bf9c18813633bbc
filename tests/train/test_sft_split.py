"""SFT packing that fills rows with whole requests (`sft.too_long = "split"`) and plain-text PTX records."""

import json

import pytest

from openk2.agentic.world_sft import sft_records
from openk2.data.tokenizer import IM_USER
from openk2.data.world import World
from openk2.train.config import load_config
from openk2.train.sft_data import Conversation, read_chat_jsonl, row_tensors, split_requests, tokenize_conversations
from openk2.train.trainer import Trainer

TINY = ["model.preset='tiny'", "data.world_people=60", "data.vocab_size=700", "train.batch_size=2",
        "train.seq_len=64", "train.max_steps=1", "train.checkpoint_every=1", "train.eval_every=0",
        "train.warmup_steps=1", "run.progress=false", "run.tensorboard=false", "data.world_renderings=2"]


@pytest.fixture(scope="module")
def run_and_format(tmp_path_factory):
    from openk2.model_dir import load_tokenizer_and_format

    root = tmp_path_factory.mktemp("split")
    Trainer(load_config(None, [*TINY, f"run.dir='{root / 'run'}'", f"data.cache_dir='{root / 'cache'}'"])).train()
    tok, fmt = load_tokenizer_and_format(root / "run")
    return root / "run", tok, fmt


def _dialogs(n_requests: int, per_dialog: int) -> list[Conversation]:
    world = World.generate(seed=0, n_people=60)
    records = sft_records(world, n_requests, registry_worlds=1, tasks_per_dialog=per_dialog)
    return [Conversation(r["messages"], r["tools"], f"x:{i}") for i, r in enumerate(records)]


def _requests(messages: list[dict]) -> list[list[dict]]:
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    return [messages[a:b] for a, b in zip(users, [*users[1:], len(messages)], strict=True)]


def test_split_keeps_whole_requests_behind_one_prefix(run_and_format):
    """Every piece is the system prompt and tools followed by consecutive whole requests, rendered exactly as that
    dialog would be; together the pieces hold every request once, in order; each fits the row unless a single
    request does not; and a piece could not have taken the next request too."""
    _, tok, fmt = run_and_format
    max_len = 700
    for conv in _dialogs(24, 6):
        first_user = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
        prefix, requests = conv.messages[:first_user], _requests(conv.messages)
        pieces = split_requests(fmt, conv, max_len)
        seen = 0
        for k, (ids, mask) in enumerate(pieces):
            n = ids.count(tok.token_id(IM_USER))
            assert n >= 1
            assert (ids, mask) == fmt.render_ids_and_mask([*prefix, *sum(requests[seen: seen + n], [])], conv.tools)
            assert len(ids) <= max_len or n == 1
            if k + 1 < len(pieces):  # greedy: the next request did not fit
                longer = fmt.render_ids_and_mask([*prefix, *sum(requests[seen: seen + n + 1], [])], conv.tools)
                assert len(longer[0]) > max_len
            seen += n
        assert seen == len(requests)
        if len(fmt.render_ids_and_mask(conv.messages, conv.tools)[0]) > max_len:
            assert len(pieces) > 1


def test_split_loses_no_assistant_token_and_truncates_nothing(run_and_format):
    _, tok, fmt = run_and_format
    convs = _dialogs(24, 6)
    split, stats = tokenize_conversations(convs, fmt, 700, too_long="split")
    whole, _ = tokenize_conversations(convs, fmt, 10**6)
    assert stats["split"] > 0 and stats["truncated"] == 0 and len(split) > len(whole)
    assert all(len(c.ids) <= 700 for c in split)
    assert stats["assistant_tokens"] == sum(int(c.mask.sum()) for c in whole)  # every assistant token kept once
    truncated, tstats = tokenize_conversations(convs, fmt, 700)
    assert tstats["truncated"] > 0 and tstats["assistant_tokens"] < stats["assistant_tokens"]


def test_text_records_train_on_every_token(run_and_format, tmp_path):
    """A {"text": ...} line is a pretraining document ([bos] + encode(text)) with every target kept (PTX)."""
    _, tok, fmt = run_and_format
    path = tmp_path / "mix.jsonl"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "Ada was born in Trevane."}, chat, {"text": ""}]))
    with pytest.raises(ValueError, match="text"):
        read_chat_jsonl([path])
    convs, skipped = read_chat_jsonl([path], "skip")
    assert len(convs) == 2 and convs[0].text == "Ada was born in Trevane." and len(skipped) == 1
    toks, stats = tokenize_conversations(convs, fmt, 64)
    ids = tok.encode("Ada was born in Trevane.", add_bos=True)
    assert toks[0].ids.tolist() == ids and toks[0].mask.tolist() == [1] * len(ids)
    x, y = row_tensors(toks, [[0, 1]], 64, tok.pad_id)
    assert y[0, : len(ids) - 1].tolist() == ids[1:]  # every next token of the text is a target
    assert y[0, len(ids) - 1] == -100  # ...but not the chat's first token, predicted from the text
    long_text = Conversation([], None, "t:1", " ".join(["Ada was born in Trevane."] * 40))
    pieces, s = tokenize_conversations([long_text], fmt, 32, too_long="split")
    ids = tok.encode(long_text.text, add_bos=True)
    assert s["truncated"] == 0 and all(len(c.ids) <= 32 for c in pieces)
    # pieces overlap by one token: every next-token target of the text is trained exactly once
    assert sum(len(c.ids) - 1 for c in pieces) == len(ids) - 1
    assert [i for c in pieces for i in c.ids[1:].tolist()] == ids[1:]


def test_stage_mixes_ptx_documents_and_repeated_extra_records(run_and_format):
    from openk2.data.world import world_documents
    from openk2.train.sft_stage import ptx_records, stage_records

    run, _, _ = run_and_format
    docs = set(world_documents(World.generate(seed=0, n_people=60), "train", renderings_per_person=2,
                               qa_fraction=0.5))
    ptx = ptx_records(run, 15)
    assert len(ptx) == 15 and len({r["text"] for r in ptx}) == 15 and all(r["text"] in docs for r in ptx)
    extra = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    dialogs, records = stage_records(run, world_people=60, n_train=8, registry_worlds=1, extra_records=extra,
                                     extra_repeats=3, ptx_documents=5)
    assert records == [*dialogs, *extra * 3, *ptx_records(run, 5)]


def test_config_accepts_split_and_rejects_other_modes():
    from openk2.train.config import TrainConfigError

    assert load_config(None, ["sft.too_long='split'"]).sft.too_long == "split"
    with pytest.raises(TrainConfigError, match="split"):
        load_config(None, ["sft.too_long='cut'"])


def test_copy_friendly_names_are_the_request_tokens(run_and_format):
    """In the copy-friendly format the tokens of a name in a tool call are exactly its tokens in the request, and a
    quoted value in the answer has exactly the tool result's tokens; the plain format needs a re-spelling."""
    from openk2.agentic.world_sft import expert_dialog
    from openk2.agentic.world_tasks import make_tasks

    _, tok, _ = run_and_format
    world = World.generate(seed=0, n_people=60)

    def contains(hay: list[int], needle: list[int]) -> bool:
        return any(hay[i: i + len(needle)] == needle for i in range(len(hay) - len(needle) + 1))

    task = next(t for t in make_tasks(world, "train", 40, seed=1) if t.kind == "lookup" and
                not t.instruction.startswith(t.person))
    for copy_format in (True, False):
        msgs = expert_dialog(world, [task], copy_format=copy_format)["messages"]
        name = json.loads(msgs[2]["tool_calls"][0]["function"]["arguments"])["name"]
        call_tokens = tok.encode(json.dumps({"name": name}))
        name_tokens = tok.encode(f" {task.person}")
        assert contains(tok.encode(msgs[1]["content"]), name_tokens)
        assert contains(call_tokens, name_tokens) == copy_format
        value_tokens = tok.encode(msgs[3]["content"])  # the tool result
        assert contains(tok.encode(msgs[4]["content"]), value_tokens) == copy_format
