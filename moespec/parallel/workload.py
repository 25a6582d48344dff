"""Batches for the expert-parallel engine, and a skewed workload that makes expert load shift.

Serving traffic is not uniform: a batch of requests about one subject uses that subject's tokens,
and those route to a subset of the experts; the next batch may be about something else. The
skewed workload models this with `topics`, each a Zipf distribution over its own random ordering
of the vocabulary; every batch draws most of its rows from one topic, and the dominant topic
changes from batch to batch, so history alone predicts the next batch's hot experts poorly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batch:
    """Token ids [B, S]; for an encoder-decoder, `tokens` feed the encoder and `decoder_tokens` [B, T] the decoder."""

    tokens: torch.Tensor
    decoder_tokens: torch.Tensor | None = None

    def rows(self, rank: int, world: int) -> "Batch":
        """This worker's contiguous share of the rows (sizes differ by at most one)."""
        index = torch.tensor_split(torch.arange(self.tokens.shape[0]), world)[rank]
        dec = None if self.decoder_tokens is None else self.decoder_tokens[index]
        return Batch(self.tokens[index], dec)

    def to(self, device: torch.device) -> "Batch":
        dec = None if self.decoder_tokens is None else self.decoder_tokens.to(device)
        return Batch(self.tokens.to(device), dec)


def skewed_batches(vocab_size: int, num_batches: int, batch_size: int, seq_len: int, decoder_len: int = 0,
                   topics: int = 4, topic_share: float = 0.85, zipf: float = 1.2, first_id: int = 3,
                   seed: int = 0) -> list[Batch]:
    """`num_batches` batches; batch t draws `topic_share` of its rows from a topic chosen at random
    (never the previous batch's) and the rest from any topic. Ids below `first_id` (special
    tokens) are never drawn. decoder_len > 0 adds decoder inputs drawn the same way."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(first_id, vocab_size)
    orders = [ids[torch.randperm(len(ids), generator=g)] for _ in range(topics)]
    rank_weights = 1.0 / torch.arange(1, len(ids) + 1, dtype=torch.float64) ** zipf

    def draw(topic: int, n: int) -> torch.Tensor:
        return orders[topic][torch.multinomial(rank_weights, n, replacement=True, generator=g)]

    batches, previous = [], -1
    for _ in range(num_batches):
        dominant = int(torch.randint(topics, (1,), generator=g))
        while topics > 1 and dominant == previous:
            dominant = int(torch.randint(topics, (1,), generator=g))
        previous = dominant
        rows = [dominant if float(torch.rand(1, generator=g)) < topic_share
                else int(torch.randint(topics, (1,), generator=g)) for _ in range(batch_size)]
        tokens = torch.stack([draw(t, seq_len) for t in rows])
        dec = torch.stack([draw(t, decoder_len) for t in rows]) if decoder_len else None
        batches.append(Batch(tokens, dec))
    return batches
