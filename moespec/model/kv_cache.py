"""A preallocated KV cache with a length per row, and where one forward pass's tokens sit in it.

Every row of the batch has its own length, so rows of different prompt lengths, rows that join
later (continuous batching) and rows that roll back rejected draft tokens (speculative decoding)
all share one buffer. Slots past a row's length hold stale values that attention never reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepPositions:
    """Where one forward pass's tokens go in the KV cache and which keys they may see.

    Computed once per forward pass for every layer (per layer, it cost a dozen small ops and two
    host synchronisations each time). `of` builds it from the rows, positions and valid mask.
    """

    rows: torch.Tensor  # [B] the cache rows of the batch
    positions: torch.Tensor  # [B, T] each token's absolute position
    valid: torch.Tensor  # [B, T] real tokens (a row's valid tokens come first)
    all_valid: bool  # no padding: nothing needs selecting by `valid`
    upto: int  # keys [0, upto) are read: one past the last valid position
    row_index: slice | torch.Tensor  # `rows` as a slice when they are consecutive: reads are then views
    write_rows: torch.Tensor  # [valid tokens] the row ...
    write_positions: torch.Tensor  # ... and position of each valid token's cache entry
    write_span: slice | None  # the positions every row writes, where the rows are consecutive and share them
    causal: torch.Tensor | None  # [B, 1, T, upto] key position <= query position; None where always true
    square: bool  # every row starts empty and has no padding: `causal` is the plain lower triangle

    @classmethod
    def of(cls, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> StepPositions:
        all_valid = bool(valid.all())
        valid_positions = positions.flatten() if all_valid else positions[valid]
        first, last = valid_positions.aminmax() if valid_positions.numel() else (torch.tensor(0), torch.tensor(0))
        first, upto = int(first), int(last) + 1
        row_list = rows.tolist()
        consecutive = row_list == list(range(row_list[0], row_list[0] + len(row_list))) if row_list else False
        key_pos = torch.arange(upto, device=positions.device)
        # one position shared by every token (a decode step of equal-length rows): every key is visible
        causal = None if all_valid and first == upto - 1 else (key_pos <= positions[:, :, None])[:, None]
        write_rows = rows[:, None].expand_as(positions)
        # every row writes positions [first, upto) when each writes T consecutive ones spanning only T
        shared = consecutive and all_valid and upto - first == positions.shape[1]
        return cls(rows, positions, valid, all_valid, upto,
                   slice(row_list[0], row_list[0] + len(row_list)) if consecutive else rows,
                   write_rows.flatten() if all_valid else write_rows[valid], valid_positions,
                   slice(first, upto) if shared else None, causal,
                   all_valid and first == 0 and upto == positions.shape[1])

    def mask(self, window: int | None = None, chunk: int | None = None) -> torch.Tensor | None:
        """The attention mask [B, 1, T, upto] (None: every key visible) of a layer that also limits
        keys to a sliding `window` before the query and/or to the query's own `chunk`."""
        if window is None and chunk is None:
            return self.causal
        key_pos = torch.arange(self.upto, device=self.positions.device)
        query_pos = self.positions[:, :, None]
        mask = key_pos <= query_pos  # [B, T, upto]
        if window is not None:
            mask &= key_pos > query_pos - window
        if chunk is not None:
            mask &= key_pos // chunk == query_pos // chunk
        return mask[:, None]

    def select_valid(self, t: torch.Tensor) -> torch.Tensor:
        """The valid tokens' entries of t [B, T, ...] -> [valid tokens, ...] (a view without padding)."""
        return t.flatten(0, 1) if self.all_valid else t[self.valid]


class LayerKV:
    """One layer's part of the cache: keys [rows, max_len, *k_shape] and values [rows, max_len,
    *v_shape], views of the KVCache's tensors. A layer's attention writes and reads only these, so
    a compiled layer (model/compiled.py) takes them as two plain inputs."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v

    def write(self, step: StepPositions, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k [B, T, *k_shape], v [B, T, *v_shape] of `step`'s tokens at their rows and positions.

        Only valid tokens are written, so padding never overwrites real entries. Where the rows
        share their positions (a decode step of equal lengths, a fresh prefill), a plain slice copy.
        """
        if step.write_span is not None:
            self.k[step.row_index, step.write_span] = k
            self.v[step.row_index, step.write_span] = v
            return
        self.k[step.write_rows, step.write_positions] = step.select_valid(k)
        self.v[step.write_rows, step.write_positions] = step.select_valid(v)

    def read(self, step: StepPositions) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `step`'s rows for positions [0, step.upto), as [B, heads, upto, dim]:
        views of the cache (no copy) when the rows are consecutive."""
        k = self.k[step.row_index, :step.upto].transpose(1, 2)
        v = self.v[step.row_index, :step.upto].transpose(1, 2)
        return k, v


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
        self.layers = [LayerKV(self.k[i], self.v[i]) for i in range(num_layers)]  # what each layer's attention sees

    @property
    def rows(self) -> int:
        return self.k.shape[1]

    def crop(self, rows: torch.Tensor, lengths: torch.Tensor) -> None:
        """Roll rows back to `lengths` (e.g. after rejected draft tokens); later writes overwrite."""
        if bool((lengths > self.lengths[rows]).any()):
            raise ValueError("crop can only shorten rows")
        self.lengths[rows] = lengths

    def reset(self, rows: torch.Tensor) -> None:
        """Free rows for new sequences."""
        self.lengths[rows] = 0
