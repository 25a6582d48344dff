"""Batched generation: prefill every prompt at once, then decode one token per row per step.

Rows keep their own lengths in the KV cache, so prompts of different lengths need no left
padding and no position tricks: a prompt is right-padded, its padding marked invalid, and each
row continues from its own length. The decode round is pluggable (`DecodeStep`): speculative
decoding (`specdecode.py`) returns several tokens per row per step and reuses the stopping and
streaming below.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from tokenizers import Tokenizer

from ..errors import MoespecError
from ..experts.base import ExpertProvider
from ..model.kv_cache import KVCache
from ..model.transformer import Transformer
from .sampling import SamplingParams, sample

# on_text(row, new_text): called as text of a row becomes final (streaming)
TextCallback = Callable[[int, str], None]


class DecodeStep(Protocol):
    """One decode round over the batch (plain decoding, or a speculative draft-and-verify step)."""

    def __call__(self, cache: KVCache, pending: torch.Tensor, running: torch.Tensor, remaining: torch.Tensor,
                 params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
        """Feed each running row's pending token [B] (sampled, not yet in the cache) and return its
        new tokens: at least one, at most `remaining` [B]; rows not running get an empty list."""
        ...


def plain_step(model: Transformer, experts: ExpertProvider, cache: KVCache, pending: torch.Tensor,
               running: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
    """One forward pass, one new token per running row (speculative decoding's steps with γ = 0 too)."""
    hidden = model(pending[:, None], cache, experts, valid=running[:, None])
    new = sample(model.logits(hidden[:, 0]), params, generator).tolist()
    return [[tok] if run else [] for tok, run in zip(new, running.tolist())]


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0  # every row's tokens, the one sampled after the prefill included
    decoded_tokens: int = 0  # of those, the ones decode steps made (what decode_seconds bought)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # a step gives each running row one token, or several when speculative

    def as_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["decode_seconds_per_token"] = self.decode_seconds / max(self.decoded_tokens, 1)
        d["decode_seconds_per_step"] = self.decode_seconds / max(self.decode_steps, 1)
        return d


class TextStream:
    """Incremental detokenisation of one row, with stop strings.

    Text is released only when it can no longer change: not ending inside a multi-byte character
    and not possibly the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.released = 0

    def update(self, token_ids: list[int]) -> bool:
        """Re-decode the row; return True when a stop string has appeared (text is cut before it)."""
        if self.tokenizer is None:
            return False
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def release(self, final: bool) -> str:
        """The not-yet-released text that is now final."""
        end = len(self.text) if final else len(self.text) - self.holdback
        if not final and self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end <= self.released:
            return ""
        out, self.released = self.text[self.released:end], end
        return out


class Sequence:
    """Tokens generated so far for one prompt, with EOS, stop-string and length stopping."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 eos_ids: set[int], budget: int):
        self.prompt, self.params, self.eos_ids, self.budget = prompt, params, eos_ids, budget
        self.token_ids: list[int] = []
        self.stream = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"

    def append(self, token: int) -> str:
        """Record a sampled token; return the text that became final (all of it once finished)."""
        self.token_ids.append(token)
        is_eos = token in self.eos_ids and not self.params.ignore_eos
        stopped = self.stream.update(self.token_ids[:-1] if is_eos else self.token_ids)
        if is_eos or stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.budget:
            self.finish_reason = "length"
        return self.stream.release(final=self.finish_reason is not None)


class Generator:
    """Generates for a batch of token-id prompts with one model and one expert provider."""

    def __init__(self, model: Transformer, experts: ExpertProvider, tokenizer: Tokenizer | None,
                 context_length: int, device: torch.device):
        self.model, self.experts, self.tokenizer = model, experts, tokenizer
        self.context_length, self.device = context_length, device
        self.stats = DecodeStats()
        spec = model.spec
        self.eos_ids = set(spec.eos_token_ids)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        s = self.model.spec
        return KVCache(s.num_layers, rows, max_len, s.num_kv_heads, s.head_dim,
                       self.model.embed_tokens.weight.dtype, self.device)

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

    def decode_step(self, cache: KVCache, pending: torch.Tensor, running: torch.Tensor, remaining: torch.Tensor,
                    params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
        """Plain decoding (a DecodeStep)."""
        return plain_step(self.model, self.experts, cache, pending, running, params, generator)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_text: TextCallback | None = None, step: DecodeStep | None = None) -> list[Completion]:
        """Prefill every prompt at once, then run `step` (default: plain decoding) until every row ends."""
        step = step or self.decode_step
        for p in prompts:
            self.check_prompt(p)
        B = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        budget = [min(params.max_new_tokens, self.context_length - len(p)) for p in prompts]
        cache = self.new_cache(B, max(len(p) + n for p, n in zip(prompts, budget)))
        tokens = torch.zeros(B, int(lengths.max()), dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        valid = torch.arange(tokens.shape[1], device=self.device)[None] < lengths[:, None]
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

        t0 = time.perf_counter()
        hidden = self.model(tokens, cache, self.experts, valid=valid)
        first = sample(self.model.logits(hidden[torch.arange(B), lengths - 1]), params, generator)
        new_ids = [[t] for t in first.tolist()]
        self.stats.prefill_seconds += time.perf_counter() - t0
        self.stats.prompt_tokens += int(lengths.sum())

        rows = [Sequence(p, params, self.tokenizer, self.eos_ids, n) for p, n in zip(prompts, budget)]
        t0 = time.perf_counter()
        while True:
            for i, toks in enumerate(new_ids):
                for tok in toks:  # a speculative step brings several; tokens after a stop are dropped
                    if rows[i].finish_reason is not None:
                        break
                    delta = rows[i].append(tok)
                    if on_text is not None and delta:
                        on_text(i, delta)
            if all(r.finish_reason is not None for r in rows):
                break
            running = torch.tensor([r.finish_reason is None for r in rows], device=self.device)
            pending = torch.tensor([r.token_ids[-1] for r in rows], device=self.device)
            remaining = torch.tensor([r.budget - len(r.token_ids) for r in rows], device=self.device)
            new_ids = step(cache, pending, running, remaining, params, generator)
            self.stats.decode_steps += 1
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.generated_tokens += sum(len(r.token_ids) for r in rows)
        self.stats.decoded_tokens += sum(len(r.token_ids) for r in rows) - B
        return [Completion(r.token_ids, r.stream.text, r.prompt, r.finish_reason) for r in rows]
