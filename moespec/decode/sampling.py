"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import MoespecError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise MoespecError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MoespecError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoespecError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MoespecError(f"top_k must be >= 0, got {self.top_k}")


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The sampling distribution [B, V] after temperature, top-k and top-p (temperature > 0)."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, V]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filtered_probs(logits, params)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


class RowSampling:
    """How each row of a batch picks its tokens. Rows sharing sampling parameters and a random
    generator form one group and are sampled together, so a batch from one `generate` call
    (one group) draws exactly what a single call to `sample` would; the server's requests each
    bring their own parameters and seeds."""

    def __init__(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                 device: torch.device):
        groups: dict[tuple[SamplingParams, int], list[int]] = {}
        for i, (p, g) in enumerate(zip(params, generators)):
            groups.setdefault((p, id(g)), []).append(i)
        self.size = len(params)
        self.groups = [(torch.tensor(rows, device=device), params[rows[0]], generators[rows[0]])
                       for rows in groups.values()]
        self.greedy = all(p.temperature == 0 for p in params)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """One token id per row of logits [B, V]."""
        if len(self.groups) == 1:
            _, params, generator = self.groups[0]
            return sample(logits, params, generator)
        out = torch.empty(self.size, dtype=torch.long, device=logits.device)
        for rows, params, generator in self.groups:
            out[rows] = sample(logits[rows], params, generator)
        return out
