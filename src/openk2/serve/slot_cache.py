"""A slot-based MLA latent cache for continuous batching.

`openk2.model.kv_cache.KVCache` holds one batch that shares a time axis, so every sequence must start
together. A server admits and retires sequences at every step, so this cache gives each *row* (slot) its
own length: row r holds its tokens compactly at positions `0 .. lengths[r]-1`, and a forward pass over rows
`lo:hi` appends each row's new tokens at that row's own offset.

It plugs into `K2Model.forward(cache=...)` through the same duck-typed interface as `KVCache`:
`begin_chunk(valid_BT)`, `layers[i].append(latent_BTL) -> (latent_BSL, mask_BTS)`, `end_chunk(T)`.
`SlotKVCache.rows(lo, hi)` returns that interface for a contiguous row range; the engine keeps its live
sequences in rows `0 .. B-1` (moving the last row into a freed one), so a decode step is a plain slice and
never gathers the cache.

Chunks may be padded anywhere (`valid_BT` False): padding tokens are not stored and do not advance the row.
A padding query may attend to every key of its row: its output is discarded, and an all-masked row would
make softmax produce NaN. Positions for RoPE are the caller's `position_ids_BT` (the row's `lengths` plus
the token's index among the row's valid tokens), exactly as `generate` computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from openk2.model.decode import CompileSwitch, decode_step, window_size

if TYPE_CHECKING:
    from openk2.model.transformer import K2Model


class SlotKVCache:
    def __init__(
        self, n_layers: int, slots: int, max_len: int, latent_dim: int, device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.latent_NBSL = torch.zeros(n_layers, slots, max_len, latent_dim, device=device, dtype=dtype)
        self.n_layers, self.slots, self.max_len = n_layers, slots, max_len
        # Host-side lengths: the scheduler reads them every step, and a device tensor would force syncs.
        self.lengths = [0] * slots

    @property
    def bytes_per_token(self) -> int:
        return self.n_layers * self.latent_NBSL.shape[-1] * self.latent_NBSL.element_size()

    def rows(self, lo: int, hi: int) -> SlotView:
        if not 0 <= lo < hi <= self.slots:
            raise ValueError(f"row range {lo}:{hi} outside 0:{self.slots}")
        return SlotView(self, lo, hi)

    def reset(self, row: int) -> None:
        self.lengths[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (compaction after `dst` was freed); `src` becomes empty."""
        if src == dst:
            return
        n = self.lengths[src]
        self.latent_NBSL[:, dst, :n] = self.latent_NBSL[:, src, :n]
        self.lengths[dst], self.lengths[src] = n, 0


def decode_rows(
    model: K2Model, cache: SlotKVCache, tok_B: torch.Tensor, compile: CompileSwitch = "auto",
) -> torch.Tensor:
    """Logits [B, V] of one new token for each of rows 0..B-1 (appended to the cache), through the model's
    shared `DecodeStep`; the eager reference path (`K2Model.forward` over `rows(0, B)`) when it declines.

    The compiled step sees a static shape: the batch is padded to a power of two with free rows (length 0:
    they attend to their own token only, and their outputs are dropped) and the keys to a power-of-two
    window, so a server compiles a handful of graphs, not one per (batch, length)."""
    B = tok_B.shape[0]
    step = decode_step(model, compile)
    if step.compiled:
        B_pad = min(1 << (B - 1).bit_length(), cache.slots)
        lengths = cache.lengths[:B_pad]
        n_keys = max(lengths[:B])
        if n_keys + 1 > cache.max_len:
            raise ValueError(f"KV cache overflow: {n_keys + 1} tokens > capacity {cache.max_len}")
        S = min(window_size(n_keys), cache.max_len)
        len_B = torch.tensor(lengths, device=tok_B.device)
        key_valid_BS = torch.arange(S, device=tok_B.device)[None, :] < len_B[:, None]
        tok_pad_B = torch.cat((tok_B, tok_B.new_zeros(B_pad - B))) if B_pad > B else tok_B
        out = step(cache.latent_NBSL[:, :B_pad, :S], key_valid_BS, tok_pad_B, len_B)
        if out is not None:
            logits_BV, new_latent_NBL = out
            rows_B = torch.arange(B, device=tok_B.device)
            cache.latent_NBSL[:, rows_B, len_B[:B]] = new_latent_NBL[:, :B]
            for r in range(B):
                cache.lengths[r] += 1
            return logits_BV[:B]
    valid_B1 = torch.ones(B, 1, dtype=torch.bool, device=tok_B.device)
    view = cache.rows(0, B)
    return model(tok_B[:, None], position_ids_BT=view.positions(valid_B1), cache=view, valid_BT=valid_B1).logits[:, -1]


class SlotView:
    """`KVCache`'s forward-pass interface over rows `lo:hi` of a `SlotKVCache`."""

    def __init__(self, cache: SlotKVCache, lo: int, hi: int) -> None:
        self.cache, self.lo, self.hi = cache, lo, hi
        self.layers = [_LayerView(self, i) for i in range(cache.n_layers)]
        self._stop = 0
        self._mask_BTS: torch.Tensor | None = None
        self._write: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None = None
        self._n_new: list[int] = []

    def positions(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """RoPE positions of a chunk's tokens (padding gets 0): row length + index among the row's valid tokens."""
        start_B = torch.tensor(self.cache.lengths[self.lo:self.hi], device=valid_BT.device)
        return (start_B[:, None] + valid_BT.long().cumsum(dim=1) - 1).clamp(min=0)

    def begin_chunk(self, valid_BT: torch.Tensor) -> None:
        c = self.cache
        B, T = valid_BT.shape
        if self.hi - self.lo != B:
            raise ValueError(f"chunk has {B} rows, the view {self.hi - self.lo}")
        dev = valid_BT.device
        lengths = c.lengths[self.lo:self.hi]
        start_B = torch.tensor(lengths, device=dev)
        if T == 1:
            # Decode: one (valid) token per row, the only case that runs every step; no host sync.
            n_new = [1] * B
            q_pos_BT = start_B[:, None]
            rows_N = torch.arange(self.lo, self.hi, device=dev)
            self._write = (rows_N, start_B, None, None)
            pad_BT = None
        else:
            n_new = valid_BT.sum(dim=1).tolist()
            q_pos_BT = start_B[:, None] + valid_BT.long().cumsum(dim=1) - 1
            b_N, t_N = valid_BT.nonzero(as_tuple=True)
            self._write = (self.lo + b_N, q_pos_BT[b_N, t_N], b_N, t_N)
            pad_BT = ~valid_BT
        stop = max(n + k for n, k in zip(lengths, n_new, strict=True))
        if stop > c.max_len:
            raise ValueError(f"KV cache overflow: {stop} tokens > capacity {c.max_len}")
        k_pos_S = torch.arange(stop, device=dev)
        mask_BTS = k_pos_S[None, None, :] <= q_pos_BT[:, :, None]
        if pad_BT is not None:
            mask_BTS = mask_BTS | pad_BT[:, :, None]
        self._mask_BTS, self._stop, self._n_new = mask_BTS, stop, n_new

    def end_chunk(self, T: int) -> None:
        for i, n in enumerate(self._n_new):
            self.cache.lengths[self.lo + i] += n
        self._mask_BTS, self._write = None, None


class _LayerView:
    def __init__(self, view: SlotView, layer_idx: int) -> None:
        self.view, self.layer_idx = view, layer_idx

    def append(self, latent_BTL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the chunk's valid latents at each row's offset; return the rows' latents and the chunk's mask."""
        v = self.view
        assert v._write is not None and v._mask_BTS is not None, "SlotView.begin_chunk was not called"
        rows_N, pos_N, b_N, t_N = v._write
        layer_BSL = v.cache.latent_NBSL[self.layer_idx]
        new_NL = latent_BTL[:, 0] if b_N is None else latent_BTL[b_N, t_N]
        layer_BSL[rows_N, pos_N] = new_NL.to(layer_BSL.dtype)
        return v.cache.latent_NBSL[self.layer_idx, v.lo:v.hi, :v._stop], v._mask_BTS
