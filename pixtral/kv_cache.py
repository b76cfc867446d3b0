"""The reference backend's KV cache: per layer, keys and values of every position seen so far.

Storage grows by doubling (up to the context), so a short chat on a 128k-context model does not
reserve the whole context up front. Truncating is free: only `length` moves, and the next update
overwrites from there (how a conversation's cached prefix is kept while its tail is replaced).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pixtral.config import TextConfig


class LayerCache:
    """Keys and values of one attention layer: [B, Hkv, capacity, D], valid up to what was written."""

    def __init__(
        self, batch: int, kv_heads: int, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device | str
    ):
        self.max_len = max_len
        self.k = torch.empty(batch, kv_heads, 0, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)

    def update(self, k: Tensor, v: Tensor, start: int) -> tuple[Tensor, Tensor]:
        """Write k/v [B, Hkv, T, D] at positions start..start+T; return the keys/values of 0..start+T."""
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        if end > self.k.shape[2]:
            capacity = min(self.max_len, max(end, 2 * self.k.shape[2], 256))
            grown_k = self.k.new_empty(*self.k.shape[:2], capacity, self.k.shape[3])
            grown_v = torch.empty_like(grown_k)
            grown_k[:, :, :start], grown_v[:, :, :start] = self.k[:, :, :start], self.v[:, :, :start]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """One LayerCache per decoder layer, and how many positions are valid."""

    def __init__(self, cfg: TextConfig, max_len: int, dtype: torch.dtype, device: torch.device | str, batch: int = 1):
        self.max_len = max_len
        self.layers = [
            LayerCache(batch, cfg.num_key_value_heads, cfg.head_dim, max_len, dtype, device)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep the first `length` positions (the next forward writes from there)."""
        self.length = min(self.length, length)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


def kv_bytes_per_token(cfg: TextConfig, bits: int) -> int:
    """Bytes the cache needs for one more position, keys and values of `bits` each (16: fp16/bf16)."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * bits // 8
