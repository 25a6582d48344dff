"""The acceptance rule of speculative decoding: which drafts a row keeps, and the token after them.

Greedy keeps drafts equal to the target's argmax (so the tokens equal plain greedy decoding up to
floating-point ties); sampling uses the speculative-sampling rule (accept d with probability
min(1, p(d)/q(d)), else sample the normalised residual max(0, p − q)), whose output distribution
is the target's p (Leviathan et al. 2023, Chen et al. 2023).
"""

from __future__ import annotations

import torch

from ..sampling import SamplingParams, filtered_probs


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V], drawn on the CPU so a seeded generator reproduces it."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)


def accept(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None, gammas: torch.Tensor,
           params: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many drafts each row keeps, and the token that follows them.

    logits [B, G+1, V]: the target's logits after the pending token and after each draft;
    drafts [B, G]; draft_probs [B, G, V]: the draft distributions the drafts were drawn from (None
    when greedy); gammas [B]: drafts per row actually proposed (≤ G). Returns accepted [B] and
    next [B]: the target's correction at the first rejection, or a bonus token if all were kept.
    """
    B, G1, V = logits.shape
    G = G1 - 1
    proposed = torch.arange(G, device=logits.device)[None] < gammas[:, None]
    rows = torch.arange(B, device=logits.device)
    if params.temperature == 0:
        target = logits.argmax(dim=-1)
        keep = (drafts == target[:, :G]) & proposed
        n = keep.long().cumprod(dim=1).sum(dim=1)
        return n, target[rows, n]
    p = filtered_probs(logits.reshape(B * G1, V), params).view(B, G1, V)
    pd = p[:, :G].gather(2, drafts[..., None]).squeeze(-1)
    qd = draft_probs.gather(2, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, G, generator=generator).to(logits.device)
    keep = (u * qd < pd) & proposed  # u < p/q without dividing; q(d) > 0 since d was drawn from q
    n = keep.long().cumprod(dim=1).sum(dim=1)
    p_n = p[rows, n]
    q_n = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)[rows, n]
    residual = (p_n - q_n).clamp(min=0)
    dist = torch.where((n < gammas)[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p_n)
    return n, _draw(dist / dist.sum(-1, keepdim=True), generator)

