"""StepPositions and the KV cache: what every layer's attention reads and writes, computed once."""

from __future__ import annotations

import torch

from moespec.model.kv_cache import KVCache, StepPositions


def filled_cache(rows: int = 4, max_len: int = 8) -> KVCache:
    cache = KVCache(1, rows, max_len, (2, 3), (2, 3), torch.float32, "cpu")
    cache.k.copy_(torch.randn_like(cache.k))
    cache.v.copy_(torch.randn_like(cache.v))
    return cache


def step(rows: list[int], starts: list[int], tokens: int, valid: torch.Tensor | None = None) -> StepPositions:
    positions = torch.tensor(starts)[:, None] + torch.arange(tokens)
    return StepPositions.of(torch.tensor(rows), positions,
                            torch.ones_like(positions, dtype=torch.bool) if valid is None else valid)


def test_consecutive_rows_are_read_as_views_others_as_copies_of_the_same_values():
    cache = filled_cache()
    consecutive, scattered = step([1, 2], [5, 5], 1), step([3, 1], [5, 5], 1)
    k, v = cache.layers[0].read(consecutive)
    assert k.shape == (2, 2, 6, 3) and k.untyped_storage().data_ptr() == cache.k.untyped_storage().data_ptr()
    assert torch.equal(k, cache.k[0, [1, 2], :6].transpose(1, 2)) and torch.equal(v, cache.v[0, [1, 2], :6].transpose(1, 2))
    k, _ = cache.layers[0].read(scattered)
    assert torch.equal(k, cache.k[0, [3, 1], :6].transpose(1, 2))


def test_masks():
    """Equal-length decode rows see every key (no mask); rows of different lengths are masked per
    row; a fresh prefill is `square` (plain causal) and a sliding window narrows it."""
    assert step([0, 1], [4, 4], 1).mask() is None
    uneven = step([0, 1], [2, 4], 1)
    assert uneven.upto == 5 and torch.equal(uneven.mask()[:, 0, 0], torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool())
    prefill = step([0], [0], 4)
    assert prefill.square and torch.equal(prefill.mask()[0, 0], torch.ones(4, 4).tril().bool())
    assert torch.equal(prefill.mask(window=2)[0, 0], torch.ones(4, 4).tril().triu(-1).bool())
    assert not step([0], [2], 4).square  # continues a row: not the plain triangle


def test_only_valid_tokens_are_written():
    cache = filled_cache()
    before = cache.k.clone()
    valid = torch.tensor([[True, True], [True, False]])
    s = step([0, 2], [3, 6], 2, valid)
    k = torch.randn(2, 2, 2, 3)
    cache.layers[0].write(s, k, k)
    assert s.upto == 7  # the padded token's position 7 is not read
    assert torch.equal(cache.k[0, 0, 3:5], k[0]) and torch.equal(cache.k[0, 2, 6], k[1, 0])
    assert torch.equal(cache.k[0, 2, 7], before[0, 2, 7]) and torch.equal(cache.k[0, 1], before[0, 1])


def test_rows_sharing_their_positions_write_a_slice_and_others_each_token():
    """Consecutive rows writing the same positions (equal-length decode, a fresh prefill) take the
    slice path; rows at different positions or not consecutive take the per-token path; both
    store every token at its row and position and nothing else."""
    cases = [(step([1, 2], [5, 5], 1), True), (step([0], [0], 4), True),
             (step([1, 2], [4, 5], 1), False), (step([2, 0], [5, 5], 1), False)]
    for s, sliced in cases:
        assert (s.write_span is not None) == sliced
        cache = filled_cache()
        before = cache.k.clone()
        k = torch.randn(*s.positions.shape, 2, 3)
        cache.layers[0].write(s, k, k)
        expected = before.clone()
        for b, row in enumerate(s.rows.tolist()):
            expected[0, row, s.positions[b]] = k[b]
        assert torch.equal(cache.k, expected) and torch.equal(cache.v[0, s.rows[0], s.positions[0]], k[0])
