"""SFT data for the unified trainer: chat JSONL -> token ids + assistant-only loss mask -> packed rows.

    convs = read_chat_jsonl(["data/train.jsonl"], on_error="skip")        # file:line errors
    rows = tokenize_conversations(convs, chat_format, max_len=seq_len + 1)
    loader = SFTLoader(rows, batch_size, seq_len, pad_id, seed)           # next_batch / state_dict / load_state_dict

Format: one JSON object per line, `{"messages": [...], "tools": [...]}` in the OpenAI chat format (`tools`
optional; extra keys such as "metadata" are ignored). Each conversation is rendered by the starting checkpoint's
chat format (`ChatFormat.render_ids_and_mask`: K2's template for openk2 runs, the checkpoint's own Jinja template
otherwise); the mask is 1 on what each assistant turn writes (content, tool calls, its end-of-turn token) and 0 on
system, user and tool turns and every role header. A line `{"text": "..."}` is plain pretraining text (K2's PTX
loss): `[bos] + encode(text)` as pretraining stores a document, with the loss on every token.

Targets: position t predicts token t+1 and counts only when token t+1 is an assistant token (else -100).

Packing: conversations are packed whole into rows of `seq_len + 1` tokens (first fit over a window of open rows,
in a per-epoch permutation of the conversations), padded with the pad token (target -100); a conversation longer
than a row is truncated (`sft.too_long = "truncate"`, keeping its beginning), skipped, or split (`"split"`) at its
user turns into pieces that each repeat the messages before the first user turn (system prompt, tool declarations)
and hold as many whole requests (user turn -> tool calls -> results -> answer) as fit: no request is cut unless it
alone is longer than a row (then it is truncated); plain text is cut into row-sized pieces. Attention is not masked
between conversations of a row, as in pretraining. The row order of an epoch depends only on the seed and the
epoch, so `state_dict` is two integers and resume is exact on any layout (every rank reads the same global batch).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openk2.train.config import TrainConfig, TrainConfigError

STATE_FORMAT = "openk2.sft_loader/1"
IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant", "tool")


class SFTDataError(ValueError):
    """A chat JSONL line that cannot be used; the message starts with file:line."""


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    where: str  # "file:line"
    text: str | None = None  # a plain-text (PTX) record instead of messages: loss on every token


@dataclass
class TokenizedConversation:
    ids: np.ndarray  # int64
    mask: np.ndarray  # int8, 1 = assistant token (trained on)
    where: str


def _check_record(obj: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and "messages" not in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise ValueError("'text' must be a non-empty string")
        return [], None
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("needs a non-empty 'messages' list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"messages[{i}] must be an object with a role in {_ROLES}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to train on")
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ValueError("'tools' must be a list of OpenAI tool objects")
    return messages, tools or None


def _handle(err: str, on_error: str, skipped: list[str]) -> None:
    if on_error == "fail":
        raise SFTDataError(err + " (set data.on_error='skip' to skip bad lines)")
    skipped.append(err)


def read_chat_jsonl(paths: Sequence[str | Path], on_error: str = "fail") -> tuple[list[Conversation], list[str]]:
    """Conversations of every file, in order, and the errors of skipped lines ("file:line: reason")."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be fail or skip, got {on_error!r}")
    out: list[Conversation] = []
    skipped: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise SFTDataError(f"{path}: no such file")
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                    messages, tools = _check_record(obj)
                except json.JSONDecodeError as e:
                    _handle(f"{where}: invalid JSON ({e.msg} at column {e.colno})", on_error, skipped)
                    continue
                except ValueError as e:
                    _handle(f"{where}: {e}", on_error, skipped)
                    continue
                out.append(Conversation(messages, tools, where, None if messages else obj["text"]))
    return out, skipped


def _render(chat_format: Any, c: Conversation) -> tuple[list[int], list[int]]:
    if c.text is not None:  # PTX: a pretraining document, every token trained on
        ids = chat_format.tokenizer.encode(c.text, add_bos=True)
        return ids, [1] * len(ids)
    return chat_format.render_ids_and_mask(c.messages, c.tools)


def split_requests(chat_format: Any, c: Conversation, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) pieces of `c`, each at most `max_len` tokens unless one request alone is longer (then that
    piece is longer and the caller truncates it): the messages before the first user turn (system prompt; the
    tools are rendered with every piece) followed by as many whole requests as fit, a request being a user turn
    and everything up to the next user turn. Plain text is cut into consecutive `max_len`-token pieces."""
    ids, mask = _render(chat_format, c)
    if len(ids) <= max_len:
        return [(ids, mask)]
    if c.text is not None:
        return [(ids[i: i + max_len], mask[i: i + max_len]) for i in range(0, len(ids) - 1, max_len - 1)]
    users = [i for i, m in enumerate(c.messages) if m["role"] == "user"]
    if len(users) < 2:
        return [(ids, mask)]
    prefix = c.messages[: users[0]]
    requests = [c.messages[a:b] for a, b in zip(users, [*users[1:], len(c.messages)], strict=True)]
    pieces: list[tuple[list[int], list[int]]] = []
    held: list[dict[str, Any]] = []
    held_render: tuple[list[int], list[int]] | None = None
    for request in requests:
        trial = chat_format.render_ids_and_mask([*prefix, *held, *request], c.tools)
        if len(trial[0]) <= max_len or held_render is None:
            held, held_render = [*held, *request], trial
            continue
        pieces.append(held_render)
        held, held_render = list(request), chat_format.render_ids_and_mask([*prefix, *request], c.tools)
    pieces.append(held_render)
    return pieces


def tokenize_conversations(convs: Sequence[Conversation], chat_format: Any, max_len: int, on_error: str = "fail",
                           too_long: str = "truncate") -> tuple[list[TokenizedConversation], dict[str, Any]]:
    """Ids and masks through `chat_format.render_ids_and_mask` (plain text: `[bos] + encode(text)`, all trained);
    (conversations, stats). Render errors are file:line errors (fail or skip by `on_error`). `too_long`:
    "truncate", "skip" or "split" (`split_requests`)."""
    out: list[TokenizedConversation] = []
    stats = {"conversations": 0, "skipped": [], "truncated": 0, "too_long_skipped": 0, "split": 0, "tokens": 0,
             "assistant_tokens": 0}
    for c in convs:
        try:
            pieces = split_requests(chat_format, c, max_len) if too_long == "split" else [_render(chat_format, c)]
        except (ValueError, TypeError, KeyError) as e:
            _handle(f"{c.where}: cannot render with the chat format: {e}", on_error, stats["skipped"])
            continue
        stats["split"] += len(pieces) > 1
        for ids, mask in pieces:
            if len(ids) > max_len:
                if too_long == "skip":
                    stats["too_long_skipped"] += 1
                    continue
                ids, mask = ids[:max_len], mask[:max_len]
                stats["truncated"] += 1
            if sum(mask[1:]) == 0:  # nothing left to learn (truncated before the first assistant token)
                stats["too_long_skipped"] += 1
                continue
            out.append(TokenizedConversation(np.asarray(ids, np.int64), np.asarray(mask, np.int8), c.where))
            stats["conversations"] += 1
            stats["tokens"] += len(ids)
            stats["assistant_tokens"] += int(sum(mask))
    return out, stats


def pack_rows(convs: Sequence[TokenizedConversation], order: Sequence[int], row_len: int, window: int = 16
              ) -> list[list[int]]:
    """Conversation indices per row: first fit over the last `window` open rows, in `order`."""
    rows: list[list[int]] = []
    free: list[int] = []
    open_rows: list[int] = []
    for k in order:
        n = len(convs[k].ids)
        for r in open_rows:
            if free[r] >= n:
                rows[r].append(k)
                free[r] -= n
                break
        else:
            rows.append([k])
            free.append(row_len - n)
            open_rows.append(len(rows) - 1)
            if len(open_rows) > window:
                open_rows.pop(0)
    return rows


def row_tensors(convs: Sequence[TokenizedConversation], rows: Sequence[list[int]], row_len: int, pad_id: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_BT, targets_BT) of packed rows: T = row_len - 1, targets -100 except on assistant tokens."""
    ids = np.full((len(rows), row_len), pad_id, np.int64)
    keep = np.zeros((len(rows), row_len), np.int8)
    for b, row in enumerate(rows):
        pos = 0
        for k in row:
            c = convs[k]
            ids[b, pos: pos + len(c.ids)] = c.ids
            keep[b, pos: pos + len(c.ids)] = c.mask
            keep[b, pos] = 0  # the first token of a conversation is never predicted from the previous one
            pos += len(c.ids)
    targets = ids[:, 1:].copy()
    targets[keep[:, 1:] == 0] = IGNORE_INDEX
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(targets)


class SFTLoader:
    """Infinite global batches of packed conversations (the trainer's loader interface)."""

    def __init__(self, convs: Sequence[TokenizedConversation], batch_size: int, seq_len: int, pad_id: int,
                 seed: int = 0) -> None:
        if not convs:
            raise TrainConfigError("no SFT training conversations (check sft.train_files and data.on_error)")
        self.convs, self.batch_size, self.seq_len, self.pad_id, self.seed = convs, batch_size, seq_len, pad_id, seed
        self.epoch, self.cursor = 0, 0
        self._rows: list[list[int]] | None = None
        self._fingerprint = hashlib.sha256(b"".join(c.ids.tobytes() for c in convs)).hexdigest()[:16]

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows is None:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.convs))
            self._rows = pack_rows(self.convs, order.tolist(), self.seq_len + 1)
        return self._rows

    def next_batch(self, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        picked: list[list[int]] = []
        while len(picked) < self.batch_size:
            epoch_rows = self._epoch_rows()
            picked.append(epoch_rows[self.cursor])
            self.cursor += 1
            if self.cursor == len(epoch_rows):
                self.epoch, self.cursor, self._rows = self.epoch + 1, 0, None
        if rows is not None:
            picked = picked[rows]
        return row_tensors(self.convs, picked, self.seq_len + 1, self.pad_id)

    def __iter__(self) -> SFTLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def rows_per_epoch(self) -> int:
        return len(self._epoch_rows())

    def state_dict(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "seed": self.seed, "seq_len": self.seq_len, "data": self._fingerprint,
                "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an {STATE_FORMAT} state (format={state.get('format')!r})")
        mine = self.state_dict()
        diff = [k for k in ("seed", "seq_len", "data") if state.get(k) != mine[k]]
        if diff:
            raise ValueError(f"SFT loader state does not match this data/config ({', '.join(diff)} differ): "
                             "exact resume impossible")
        self.epoch, self.cursor, self._rows = int(state["epoch"]), int(state["cursor"]), None


def split_validation(convs: list[Conversation], fraction: float) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val): a conversation is held out when the hash of its content (messages, tools or text) falls under
    `fraction`. Not its file:line: the split (and with it the training set and every batch) must not depend on
    where the file lies, and repeated records (a warm start mixed in k times) fall on one side together."""
    def held(c: Conversation) -> bool:
        content = json.dumps([c.messages, c.tools, c.text], sort_keys=True, ensure_ascii=False)
        h = int(hashlib.sha256(content.encode()).hexdigest()[:8], 16) / 16**8
        return h < fraction

    return [c for c in convs if not held(c)], [c for c in convs if held(c)]


def starting_model_dir(cfg: TrainConfig) -> Path | None:
    """The model directory whose tokenizer and chat format the SFT data is rendered with: data.tokenizer, else
    init.from_checkpoint (a run directory or a HF checkpoint)."""
    for p in (cfg.data.tokenizer, cfg.init.from_checkpoint):
        if p:
            path = Path(p)
            return path.parent.parent if (path.parent.name == "checkpoints") else path
    return None


def prepare_sft_data(cfg: TrainConfig):  # -> PreparedData
    from openk2.model_dir import ModelSourceError, load_tokenizer_and_format
    from openk2.train.data_setup import PreparedData

    t, s = cfg.train, cfg.sft
    src = starting_model_dir(cfg)
    if src is None:
        raise TrainConfigError("SFT needs a tokenizer and chat format: set init.from_checkpoint (a pretraining run "
                               "or a HF checkpoint) or data.tokenizer")
    try:
        tokenizer, chat_format = load_tokenizer_and_format(src)
    except ModelSourceError as e:
        raise TrainConfigError(str(e)) from None
    train, skipped = read_chat_jsonl(s.train_files, cfg.data.on_error)
    if s.val_files:
        val, skipped_val = read_chat_jsonl(s.val_files, cfg.data.on_error)
        skipped += skipped_val
    else:
        train, val = split_validation(train, s.val_fraction)
    row_len = t.seq_len + 1
    train_tok, stats = tokenize_conversations(train, chat_format, row_len, cfg.data.on_error, s.too_long)
    val_tok, val_stats = tokenize_conversations(val, chat_format, row_len, cfg.data.on_error, s.too_long)
    skipped += stats["skipped"] + val_stats["skipped"]
    for err in skipped[:5]:
        print(f"sft: skipped {err}", file=sys.stderr)
    if len(skipped) > 5:
        print(f"sft: skipped {len(skipped) - 5} more bad lines", file=sys.stderr)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    loader = SFTLoader(train_tok, t.batch_size, t.seq_len, pad_id, seed=t.seed)
    val_rows = pack_rows(val_tok, range(len(val_tok)), row_len)

    def val_batches(source: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(min(t.eval_batches, -(-len(val_rows) // t.batch_size))):
            chunk = val_rows[b * t.batch_size: (b + 1) * t.batch_size]
            chunk = chunk + [[]] * (t.batch_size - len(chunk))  # empty rows: all padding, no targets
            yield row_tensors(val_tok, chunk, row_len, pad_id)

    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    data = PreparedData(tokenizer, Path(s.train_files[0]).parent, loader, val_batches, token_bytes, None,
                        ["sft"] if val_tok else [])
    data.sft_stats = {"train": {k: v for k, v in stats.items() if k != "skipped"},  # type: ignore[attr-defined]
                      "val": {k: v for k, v in val_stats.items() if k != "skipped"},
                      "skipped_lines": len(skipped), "rows_per_epoch": loader.rows_per_epoch()}
    data.chat_format = chat_format  # type: ignore[attr-defined]
    return data


__all__ = ["Conversation", "SFTDataError", "SFTLoader", "TokenizedConversation", "pack_rows", "prepare_sft_data",
           "read_chat_jsonl", "row_tensors", "split_requests", "split_validation", "starting_model_dir",
           "tokenize_conversations"]
