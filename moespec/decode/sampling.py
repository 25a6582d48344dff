"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..errors import MoespecError


MAX_LOGPROBS = 20  # most alternatives per position a caller may ask for (OpenAI's chat bound)
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy; a temperature so small
    that logits / temperature leaves float range picks greedily too (among exact ties), since
    logits are shifted by their maximum before scaling.

    logprobs: record each sampled token's log-probability under the model (raw logits, before
    temperature and filters) and the `logprobs` most likely alternatives (None: record nothing).
    prompt_logprobs: the same for each prompt token after the first, from the prefill pass.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise MoespecError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise MoespecError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise MoespecError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise MoespecError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise MoespecError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise MoespecError(f"stop must be non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise MoespecError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise MoespecError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")


@dataclass(frozen=True)
class TokenLogprob:
    """One position's token with its log-probability, and the most likely tokens there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` [N] under logits [N, V] (float32 log-softmax), with the
    `top` most likely tokens of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()
    values, ids = torch.topk(logp, min(top, logp.shape[-1]), dim=-1)
    return [TokenLogprob(t, lp, tuple(zip(i, v))) for t, lp, i, v in
            zip(tokens.tolist(), chosen, ids.tolist(), values.tolist())]


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [B, V] after temperature, top-k and top-p (temperature > 0).

    Logits are shifted so their maximum is 0 before dividing by the temperature, and a
    temperature below float32's smallest normal number counts as that number (it would round to
    0 in the division): scaled logits are then never NaN, at least one is 0, and a tiny
    temperature leaves the most likely token(s) all the mass, as greedy decoding would."""
    logits = logits.float()
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        drop = before >= params.top_p
        drop[..., 0] = False  # the most likely token always stays (top_p may round to 0 in float32)
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


LogprobSink = Callable[[TokenLogprob], None]


class RowSampling:
    """How each row of a batch picks its tokens. Rows sharing sampling parameters and a random
    generator form one group and are sampled together, so a batch from one `generate` call
    (one group) draws exactly what a single call to `sample` would; the server's requests each
    bring their own parameters and seeds. `sinks`: per row, where the sampled token's
    `TokenLogprob` goes when that row's parameters ask for logprobs."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                 device: torch.device, sinks: list[LogprobSink] | None = None):
        groups: dict[tuple[SamplingParams, int], list[int]] = {}
        for i, (p, g) in enumerate(zip(params, generators)):
            groups.setdefault((p, id(g)), []).append(i)
        self.size = len(params)
        self.groups = [(torch.tensor(rows, device=device), params[rows[0]], generators[rows[0]])
                       for rows in groups.values()]
        self.greedy = all(p.temperature == 0 for p in params)
        self.sinks = sinks or []
        self.logged = [(i, p.logprobs) for i, p in enumerate(params) if p.logprobs is not None and sinks]

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token id per row of logits [B, V]."""
        if len(self.groups) == 1:
            _, params, generator = self.groups[0]
            out = sample(logits, params, generator)
        else:
            out = torch.empty(self.size, dtype=torch.long, device=logits.device)
            for rows, params, generator in self.groups:
                out[rows] = sample(logits[rows], params, generator)
        if self.logged:
            rows = torch.tensor([i for i, _ in self.logged], device=logits.device)
            records = token_logprobs(logits[rows], out[rows], max(top for _, top in self.logged))
            for (i, top), record in zip(self.logged, records):
                self.sinks[i](replace(record, top=record.top[:top]))
        return out
