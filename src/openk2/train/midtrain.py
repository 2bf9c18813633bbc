"""Midtraining: K2-chat conversations mixed into the last steps of pretraining (nanochat's base -> mid -> SFT).

    loader = MidtrainLoader(packed_loader, chat_conversations(tokenizer, world, ...), start_step=252, weight=0.25)

Why. Pretraining sees only prose, so the chat template's control tokens and the tool-call syntax first appear in
SFT, which then has a few dozen steps to learn the format, to copy names from the request into tool arguments and
to answer knowledge questions in chat form, all at once; at the speedrun's scale it learns the format but not the
copying, and it loses the pretraining knowledge in chat form (docs/experiments.md, "Midtraining"). Mixing chat rows
into pretraining's last steps, at the same steps and tokens per step, gives the model the format while the
learning rate decays, tied to the knowledge it holds. Measured at the speedrun's scale (docs/experiments.md,
"Midtraining"): the format is learned (the SFT stage starts lower and every world-agent prompt gets a well-formed
tool call), but neither the copying of new names nor chat answers about people outside the chat data, so SFT and
RL end where they do without it; hence `data.midtrain_weight = 0` by default.

What the chat rows hold (`midtrain_records`), rendered with the K2 chat format's real token ids (control tokens as
ids, exactly as SFT and the evaluation render them, `openk2.data.chat.render_chat_ids`), loss on assistant tokens
only (SFT's mask: the model learns what the assistant writes, not the users' random names or the tool results):

- expert dialogs of the world domain, one request each, about the people of *registry worlds* and the pretraining
  world's *training* people (`openk2.agentic.world_sft.sft_records`, another seed than the SFT stage's): the name in
  a tool call can only be predicted by copying it from the request. No held-out person of the pretraining world
  and no evaluation task is in them (the guarantees `sft_records` documents). The tool declarations (~260 tokens)
  are left out: they alone would fill a 256-token pretraining row; the system prompt and the dialog (~165 tokens,
  8% longer than a row and cut at its end) are kept. SFT then adds the declarations in front.
- chat-form facts questions about the people whose Q/A documents are in pretraining
  (`openk2.rl.envs.facts.sft_records`, train split only: the RL stage's held-out people are never asked).
- optionally (`data.midtrain_copy_documents`, default 0) plain-text *copy documents* (`openk2.data.copy_text`:
  fresh made-up names that recur within a document, loss on every token), which reward copying a name from the
  context. Measured (docs/experiments.md, "Name copying: the model has no copy circuit"): 25% of the rows of steps
  181-360 (or all rows of 90 steps) teach the model what names look like but not to copy one, so it stays off.
- optionally (`data.midtrain_repeat_rows`, default 0) *repeated random-token rows* (`openk2.data.repeat_rows`: bos,
  `seq_len / 2` random ids, the same ids again; loss on the repeat), the purest induction signal. Measured
  (docs/experiments.md, "Induction heads in the nano model"): even pure rows of this kind do not form induction heads
  in the nano model within the speedrun's 360 steps, so a share of them cannot either; it stays off. (Rows from a
  256-id alphabet do, by step 80, and all ids after that by step 320, on pure rows: that curriculum is
  `data.copy_schedule`, `openk2.train.copy_curriculum`, which wraps the pretraining stream underneath this loader.)

Schedule. Steps `start_step` (0-based) onward carry `weight` of each global batch's rows as chat rows (the last
rows of the batch; `floor((n+1) * weight * B) - floor(n * weight * B)` of them at the n-th midtraining step, so the
share is exact for any weight), the other rows come from the pretraining stream, which simply advances less.
Before `start_step` the batches are the pretraining loader's, bit for bit.

Resuming. `state_dict()` holds both streams' states and the number of batches drawn; `load_state_dict` also accepts
a plain `PackedLoader` state (a checkpoint written before midtraining was switched on): the batch count is then
the rows it has drawn divided by the batch size, and the chat stream starts at its beginning.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from openk2.data.loader import STATE_FORMAT as PACKED_STATE_FORMAT
from openk2.data.loader import PackedLoader
from openk2.data.tokenizer import Tokenizer
from openk2.data.world import World
from openk2.train.sft_data import Conversation, SFTLoader, TokenizedConversation, tokenize_conversations

STATE_FORMAT = "openk2.midtrain_loader/1"
#: `sft_records` seed of the midtraining dialogs: not the SFT stage's (0), so the two see different requests.
DIALOG_SEED = 1


def midtrain_records(world: World, qa_fraction: float, world_requests: int, facts_copies: int,
                     registry_worlds: int = 4, copy_documents: int = 0) -> list[dict[str, Any]]:
    """The records of midtraining: `world_requests` one-request expert dialogs without tool declarations
    (see the module docstring), `facts_copies` copies of the facts family's train-split records and
    `copy_documents` plain-text copy documents (`{"text": ...}`, `openk2.data.copy_text`)."""
    from openk2.agentic.world_sft import sft_records
    from openk2.data.copy_text import copy_documents as make_copy_documents
    from openk2.rl.envs.facts import sft_records as facts_sft_records

    dialogs = [{"messages": r["messages"], "metadata": r["metadata"]}  # no "tools": the declarations are dropped
               for r in sft_records(world, world_requests, registry_worlds=registry_worlds, tasks_per_dialog=1,
                                    seed=DIALOG_SEED)] if world_requests > 0 else []
    facts = facts_sft_records(world, qa_fraction) if facts_copies > 0 else []
    # no name of the world's people (held-out people must stay in no pretraining document)
    copies = [{"text": t, "metadata": {"source": "copy_text"}}
              for t in make_copy_documents(copy_documents, exclude={p.name for p in world.people})]
    return dialogs + facts * facts_copies + copies


def chat_conversations(tokenizer: Tokenizer, records: list[dict[str, Any]], seq_len: int
                       ) -> tuple[list[TokenizedConversation], dict[str, Any]]:
    """Token ids and assistant masks of `records` in the K2 chat format, cut to a row of `seq_len + 1` tokens
    (a `{"text": ...}` record: `[bos] + encode(text)`, every token trained on)."""
    from openk2.data.chat_format import ChatFormat

    convs = [Conversation(r.get("messages", []), r.get("tools"), f"midtrain:{i}", r.get("text"))
             for i, r in enumerate(records)]
    return tokenize_conversations(convs, ChatFormat.k2(tokenizer), seq_len + 1)


def chat_rows_at(step: int, start_step: int, weight: float, batch_size: int) -> int:
    """How many of the `batch_size` rows of step `step` (0-based) are chat rows."""
    if weight <= 0 or step < start_step:
        return 0
    n = step - start_step
    # rounded so that e.g. 0.1 * 16 * 10 is 16, not 15.999...
    return math.floor(round((n + 1) * weight * batch_size, 9)) - math.floor(round(n * weight * batch_size, 9))


class MidtrainLoader:
    """The pretraining loader with chat rows in the batches of steps >= `start_step` (the trainer's interface:
    `next_batch(rows)`, `state_dict`, `load_state_dict`)."""

    def __init__(self, base: PackedLoader, conversations: list[TokenizedConversation], *, start_step: int,
                 weight: float, pad_id: int, seed: int = 0) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"weight must lie in (0, 1], got {weight}")
        self.base, self.start_step, self.weight = base, start_step, weight
        self.batch_size = base.batch_size
        self.chat = SFTLoader(conversations, 1, base.seq_len, pad_id, seed=seed)
        self.batches = 0  # global batches drawn = the step about to be trained

    def chat_rows(self, step: int) -> int:
        return chat_rows_at(step, self.start_step, self.weight, self.batch_size)

    def next_batch(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch, or only its `rows` (a data-parallel rank's contiguous share); both streams
        advance by their whole share either way."""
        keep = range(self.batch_size)[rows] if rows is not None else range(self.batch_size)
        k = self.chat_rows(self.batches)
        self.batches += 1
        n_base = self.batch_size - k
        base_keep = slice(min(keep.start, n_base), min(keep.stop, n_base))
        x_BT, y_BT = self.base.next_batch(base_keep, n_rows=n_base)
        if k == 0:
            return x_BT, y_BT
        chat = [self.chat.next_batch() for _ in range(k)]
        chat_keep = slice(max(keep.start - n_base, 0), max(keep.stop - n_base, 0))
        cx_BT = torch.cat([c[0] for c in chat])[chat_keep].to(x_BT.device)
        cy_BT = torch.cat([c[1] for c in chat])[chat_keep].to(y_BT.device)
        return torch.cat([x_BT, cx_BT]), torch.cat([y_BT, cy_BT])

    def __iter__(self) -> MidtrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def stats(self) -> dict[str, Any]:
        return {**self.base.stats(), "batches": self.batches,
                "chat_rows": sum(self.chat_rows(s) for s in range(self.batches))}

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "base": self.base.state_dict(), "chat": self.chat.state_dict(),
                "batches": self.batches, "start_step": self.start_step, "weight": self.weight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") == PACKED_STATE_FORMAT:  # a checkpoint written without midtraining
            self.base.load_state_dict(state)
            self.batches = int(state["stats"]["rows"]) // self.batch_size
            return
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an {STATE_FORMAT} state (format={state.get('format')!r})")
        changed = [k for k in ("start_step", "weight") if state.get(k) != getattr(self, k)]
        if changed:
            raise ValueError(f"midtraining schedule changed ({', '.join(changed)}): exact resume impossible")
        self.base.load_state_dict(state["base"])
        self.chat.load_state_dict(state["chat"])
        self.batches = int(state["batches"])


__all__ = ["MidtrainLoader", "chat_conversations", "chat_rows_at", "midtrain_records"]
