"""The MLA latent KV cache: `kv_lora_rank + qk_rope_head_dim` values per token per layer."""

from __future__ import annotations

import torch


class KVCache:
    """Preallocated latent cache for a batch of sequences that share one time axis.

    Sequences of different lengths are left-padded; `key_valid_BS` marks real tokens so padding is never
    attended to. Call `begin_chunk` before each forward pass over new tokens and `end_chunk` after.
    """

    def __init__(
        self, n_layers: int, batch: int, max_len: int, latent_dim: int,
        device: torch.device, dtype: torch.dtype,
    ) -> None:
        self.latent_NBSL = torch.zeros(n_layers, batch, max_len, latent_dim, device=device, dtype=dtype)
        self.key_valid_BS = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.length = 0
        self._start = 0
        self._mask_BTS: torch.Tensor | None = None
        self.layers = [LayerCache(self, i) for i in range(n_layers)]

    @property
    def bytes_per_token(self) -> int:
        n, _, _, latent = self.latent_NBSL.shape
        return n * latent * self.latent_NBSL.element_size()

    def begin_chunk(self, valid_BT: torch.Tensor) -> None:
        T = valid_BT.shape[1]
        start, stop = self.length, self.length + T
        if stop > self.max_len:
            raise ValueError(f"KV cache overflow: {stop} tokens > capacity {self.max_len}")
        self.key_valid_BS[:, start:stop] = valid_BT
        q_pos_T = torch.arange(start, stop, device=valid_BT.device)
        k_pos_S = torch.arange(stop, device=valid_BT.device)
        causal_TS = k_pos_S[None, :] <= q_pos_T[:, None]
        # A padding query attends to itself only, so its (unused) row never becomes all -inf.
        own_TS = k_pos_S[None, :] == q_pos_T[:, None]
        self._mask_BTS = (self.key_valid_BS[:, None, :stop] & causal_TS) | own_TS
        self._start = start

    def end_chunk(self, T: int) -> None:
        self.length += T

    def append_decoded(self, new_latent_NBL: torch.Tensor) -> None:
        """Store one decoded token per row (every row valid), as a `DecodeStep` returns them."""
        if self.length >= self.max_len:
            raise ValueError(f"KV cache overflow: {self.length + 1} tokens > capacity {self.max_len}")
        self.latent_NBSL[:, :, self.length] = new_latent_NBL
        self.key_valid_BS[:, self.length] = True
        self.length += 1


class LayerCache:
    def __init__(self, cache: KVCache, layer_idx: int) -> None:
        self.cache, self.layer_idx = cache, layer_idx

    def append(self, latent_BTL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this chunk's latents; return all latents so far and the chunk's attention mask."""
        c = self.cache
        stop = c._start + latent_BTL.shape[1]
        c.latent_NBSL[self.layer_idx, :, c._start : stop] = latent_BTL
        assert c._mask_BTS is not None, "KVCache.begin_chunk was not called"
        return c.latent_NBSL[self.layer_idx, :, :stop], c._mask_BTS
