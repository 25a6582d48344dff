"""A preallocated KV cache with a length per row.

Every row of the batch has its own length, so rows of different prompt lengths, rows that join
later (continuous batching) and rows that roll back rejected draft tokens (speculative decoding)
all share one buffer. Slots past a row's length hold stale values that attention never reads.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys [layers, rows, max_len, *k_shape] and values [layers, rows, max_len, *v_shape], plus
    `lengths` [rows]. The shapes are the attention's: (kv_heads, head_dim) for both in GQA; MLA
    stores its compressed latent and its shared rotary key instead (see model/mla.py)."""

    def __init__(self, num_layers: int, rows: int, max_len: int, k_shape: tuple[int, int], v_shape: tuple[int, int],
                 dtype: torch.dtype, device: torch.device | str):
        # zeros, not empty: stale slots are multiplied by a zero attention weight, and 0 * NaN is NaN
        self.k = torch.zeros((num_layers, rows, max_len, *k_shape), dtype=dtype, device=device)
        self.v = torch.zeros((num_layers, rows, max_len, *v_shape), dtype=dtype, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device)
        self.max_len = max_len

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k [B, T, *k_shape], v [B, T, *v_shape] of cache rows `rows` [B] at `positions` [B, T].

        Only positions marked `valid` are written, so padding never overwrites real entries.
        """
        row_idx = rows[:, None].expand_as(positions)[valid]
        pos = positions[valid]
        self.k[layer, row_idx, pos] = k[valid]
        self.v[layer, row_idx, pos] = v[valid]

    def read(self, layer: int, rows: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `rows` for positions [0, upto), as [B, heads, upto, dim]."""
        k = self.k[layer, rows, :upto].transpose(1, 2)
        v = self.v[layer, rows, :upto].transpose(1, 2)
        return k, v

    def crop(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Roll rows back to `lengths` (e.g. after rejected draft tokens); later writes overwrite."""
        if bool((lengths > self.lengths[rows]).any()):
            raise ValueError("crop can only shorten rows")
        self.lengths[rows] = lengths

    def reset(self, rows: torch.Tensor) -> None:
        """Free rows for new sequences."""
        self.lengths[rows] = 0
