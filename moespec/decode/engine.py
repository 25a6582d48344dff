"""The one step loop. Everything that runs the model token by token goes through here.

    rows ─► pad/mask ─► Model.forward ─► sample ─► append ─► stop
     ▲                 (StepKind: plain, or self-speculative draft + verify)   │
     └──────────────── sequences join and leave between steps ◄────────────────┘

A `Batch` is the KV cache's rows with the sequences decoding in them. `admit` prefills new
sequences into free rows (one forward pass for all of them) and samples their first token;
`step` advances every running sequence by at least one token with the engine's `StepKind`;
finished sequences leave at once and free their rows. Callers:

- batch generation (`generate.py`): admit every prompt, step until all have finished;
- the server's continuous batching (`serve/scheduler.py`): requests join and leave between steps;
- incremental evaluation (`Engine.teacher_forced`): the same forward, fed the text's own tokens.

Rows keep their own lengths in the KV cache, so prompts of different lengths need no left padding
and no position tricks: a prompt is right-padded, its padding marked invalid, and each row
continues from its own length.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from tokenizers import Tokenizer

from ..errors import MoespecError
from ..experts.base import ExpertProvider
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .sampling import RowSampling, SamplingParams
from .sequence import Sequence
from .stats import DecodeStats


class StepKind(Protocol):
    """One decode round over some rows of the batch (plain, or a speculative draft-and-verify)."""

    def __call__(self, cache: KVCache, rows: torch.Tensor, pending: torch.Tensor, remaining: torch.Tensor,
                 sampling: RowSampling) -> list[list[int]]:
        """Feed each row's pending token [B] (sampled, not yet in the cache) and return its new
        tokens: at least one, at most `remaining` [B]."""
        ...

    def after_prefill(self) -> None:
        """A prefill ran since the last step (its cost and the cache it left are not a step's)."""
        ...


def pad(inputs: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token lists -> right-padded tokens [B, T], valid [B, T] and lengths [B]."""
    lengths = torch.tensor([len(t) for t in inputs], device=device)
    tokens = torch.zeros(len(inputs), int(lengths.max()), dtype=torch.long, device=device)
    for i, t in enumerate(inputs):
        tokens[i, : len(t)] = torch.tensor(t)
    valid = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]
    return tokens, valid, lengths


class PlainStep:
    """One forward pass, one new token per row."""

    def __init__(self, model: Transformer, experts: ExpertProvider):
        self.model, self.experts = model, experts

    def __call__(self, cache: KVCache, rows: torch.Tensor, pending: torch.Tensor, remaining: torch.Tensor,
                 sampling: RowSampling) -> list[list[int]]:
        hidden = self.model(pending[:, None], cache, self.experts, rows=rows)
        return [[t] for t in sampling.sample(self.model.logits(hidden[:, 0])).tolist()]

    def after_prefill(self) -> None:
        """Plain steps keep no measurements."""


class Engine:
    """The model, its experts and its tokenizer, with the one step loop over them."""

    def __init__(self, model: Transformer, experts: ExpertProvider, tokenizer: Tokenizer | None,
                 context_length: int, device: torch.device):
        self.model, self.experts, self.tokenizer = model, experts, tokenizer
        self.context_length, self.device = context_length, device
        self.eos_ids = set(model.spec.eos_token_ids)
        self.stats = DecodeStats()
        self.plain = PlainStep(model, experts)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        return self.model.new_cache(rows, max_len)

    def check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise MoespecError("empty prompt: at least one token is needed")
        if len(prompt) >= self.context_length:
            raise MoespecError(
                f"prompt has {len(prompt)} tokens but the context window is {self.context_length} "
                "(it must leave room for at least one new token)"
            )
        vocab = self.model.spec.vocab_size
        if max(prompt) >= vocab or min(prompt) < 0:
            raise MoespecError(f"prompt token ids must be in [0, {vocab})")

    def sequence(self, prompt: list[int], params: SamplingParams) -> Sequence:
        """A checked prompt as a sequence to admit, its budget cut to what the context leaves."""
        self.check_prompt(prompt)
        rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        return Sequence(prompt, params, self.tokenizer, self.eos_ids,
                        min(params.max_new_tokens, self.context_length - len(prompt)), rng)

    def batch(self, rows: int, max_len: int, kind: StepKind | None = None) -> Batch:
        return Batch(self, rows, max_len, kind or self.plain)

    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (float32) for every position of token_ids [B, T], in one pass."""
        cache = self.new_cache(*token_ids.shape)
        return self.model.logits(self.model(token_ids.to(self.device), cache, self.experts))

    @torch.inference_mode()
    def teacher_forced(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] computed one position at a time through the KV cache, as decoding runs:
        the expert cache and speculation then behave as in batch-B decoding."""
        cache = self.new_cache(*token_ids.shape)
        ids = token_ids.to(self.device)
        return torch.cat([self.model.logits(self.model(ids[:, t:t + 1], cache, self.experts))
                          for t in range(ids.shape[1])], dim=1)


class Batch:
    """Sequences decoding together in the rows of one KV cache; they join and leave between steps."""

    def __init__(self, engine: Engine, rows: int, max_len: int, kind: StepKind):
        self.engine, self.kind = engine, kind
        self.cache = engine.new_cache(rows, max_len)
        self.free = list(range(rows - 1, -1, -1))  # popped from the end: row 0 first
        self.running: list[Sequence] = []

    def admit(self, seqs: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Prefill `seqs` into free rows in one forward pass and sample each one's first token.
        Returns (sequence, text that became final) for each; finished ones have left the batch.
        If the pass fails, the sequences are not admitted and their rows are free again."""
        if len(seqs) > len(self.free):
            raise ValueError(f"{len(seqs)} sequences for {len(self.free)} free rows")
        for seq in seqs:
            seq.row = self.free.pop()
        e = self.engine
        t0 = time.perf_counter()
        try:
            tokens, valid, lengths = pad([s.prompt for s in seqs], e.device)
            rows = self._rows(seqs)
            hidden = self._forward(rows, lambda: e.model(tokens, self.cache, e.experts, rows=rows, valid=valid))
            for i, seq in enumerate(seqs):  # echo: the prompt's own logprobs, from this pass
                if seq.params.prompt_logprobs is not None:
                    seq.record_prompt_logprobs(e.model.logits(hidden[i, : len(seq.prompt) - 1]))
            last = hidden[torch.arange(len(seqs), device=e.device), lengths - 1]
            first = self._sampling(seqs).sample(e.model.logits(last)).tolist()
        except BaseException:
            for seq in seqs:
                self._free(seq)
            raise
        e.stats.prefill_seconds += time.perf_counter() - t0
        e.stats.prompt_tokens += int(lengths.sum())
        self.running += seqs
        self.kind.after_prefill()
        return self._append(seqs, [[t] for t in first])

    def step(self, seqs: list[Sequence] | None = None) -> list[tuple[Sequence, str]]:
        """Advance running sequences (default: all) by one step of the batch's step kind.
        Returns (sequence, text that became final); finished ones have left the batch. If the
        step fails, the cache rows are rolled back and no sequence has changed."""
        seqs = list(self.running) if seqs is None else seqs
        e = self.engine
        t0 = time.perf_counter()
        rows = self._rows(seqs)
        pending = torch.tensor([s.token_ids[-1] for s in seqs], device=e.device)
        remaining = torch.tensor([s.remaining for s in seqs], device=e.device)
        new = self._forward(rows, lambda: self.kind(self.cache, rows, pending, remaining, self._sampling(seqs)))
        before = e.stats.generated_tokens
        out = self._append(seqs, new)
        e.stats.decode_seconds += time.perf_counter() - t0
        e.stats.decode_steps += 1
        e.stats.decoded_tokens += e.stats.generated_tokens - before
        return out

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of the batch (finished, cancelled or failed) and free its row."""
        if seq in self.running:
            self.running.remove(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self.cache.reset(torch.tensor([seq.row], device=self.engine.device))
            self.free.append(seq.row)
            seq.row = -1

    def _rows(self, seqs: list[Sequence]) -> torch.Tensor:
        return torch.tensor([s.row for s in seqs], device=self.engine.device)

    def _sampling(self, seqs: list[Sequence]) -> RowSampling:
        return RowSampling([s.params for s in seqs], [s.rng for s in seqs], self.engine.device,
                           [s.record_logprob for s in seqs])

    def _forward(self, rows: torch.Tensor, run):
        """Run `run()` over cache rows `rows`; if it raises, their lengths are rolled back."""
        before = self.cache.lengths[rows].clone()
        try:
            return run()
        except BaseException:
            self.cache.lengths[rows] = before
            raise

    def _append(self, seqs: list[Sequence], new: list[list[int]]) -> list[tuple[Sequence, str]]:
        """Append each sequence's new tokens (those after a stop are dropped); finished ones leave."""
        out = []
        for seq, tokens in zip(seqs, new):
            text = ""
            for tok in tokens:
                if seq.finish_reason is not None:
                    break
                text += seq.append(tok)
                self.engine.stats.generated_tokens += 1
            out.append((seq, text))
            if seq.finish_reason is not None:
                self.release(seq)
        return out
