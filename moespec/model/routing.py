"""Routers: one object per MoE layer that owns its architecture's routing rule.

The rule ("softmax over all experts, keep the k best, renormalise them or not") is needed in more
places than the forward pass: the lookahead's guess scores, the weights speculative execution
gives a substituted id set, the draft pass's routing among its draft experts. Every one of them
asks the layer's Router instead of re-deriving the rule, so a guess, a substitution, a draft and
the true routing can never disagree on it, and nothing outside moespec.model needs to know which
rule a layer has. `ModelSpec.router` names the class in `ROUTERS`; `make_router(spec)` builds one.

All methods take router logits [N, E]:
- `probs(logits)`: per-expert scores [N, E] float32, the distribution every choice is made from;
- `select(logits)`: the routing, (weights [N, k] float32, expert ids [N, k]);
- `weights_for(logits, ids)`: the router's weights [N, k] for a given (e.g. substituted) id set;
- `restrict(logits, members)`: the routing when only the experts `members` may be chosen.
"""

from __future__ import annotations

import torch

from ..spec import ModelSpec


class Router:
    """Softmax over all experts (in float32), the k most probable, weighted by their probability;
    renormalised over the chosen ones when the class `renormalizes`."""

    renormalizes = False

    def __init__(self, k: int):
        self.k = k

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = torch.topk(self.probs(logits), self.k, dim=-1)
        return self._weigh(weights), ids

    def weights_for(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What the router would weigh experts ids [N, k] with, had it chosen them: a perfect
        substitute changes nothing."""
        return self._weigh(self.probs(logits).gather(1, ids))

    def restrict(self, logits: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's min(k, len(members)) best `members` by logits, weighted as `weights_for`
        (probabilities over all experts), padded with zero-weight repeats of the first choice to k
        columns. Masking the softmax to the members instead would inflate the weights of routers
        that do not renormalise (Qwen's)."""
        n = min(self.k, len(members))
        ids = members[logits[:, members].topk(n, dim=-1).indices]
        weights = self.weights_for(logits, ids)
        if n < self.k:
            weights = torch.cat([weights, weights.new_zeros(len(weights), self.k - n)], dim=1)
            ids = torch.cat([ids, ids[:, :1].expand(-1, self.k - n)], dim=1)
        return weights, ids

    def _weigh(self, weights: torch.Tensor) -> torch.Tensor:
        return weights / weights.sum(dim=-1, keepdim=True) if self.renormalizes else weights


class SoftmaxTopK(Router):
    """The k largest probabilities as they are (Qwen, OLMoE default)."""


class SoftmaxTopKRenorm(Router):
    """The k probabilities renormalised to sum to one (Mixtral; norm_topk_prob=True)."""

    renormalizes = True


class Top1(Router):
    """Switch Transformers: the most probable expert (argmax, as the reference), weighted by its probability."""

    def __init__(self, k: int = 1):
        if k != 1:
            raise ValueError(f"top1 routes each token to one expert, got k={k}")
        super().__init__(k)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.probs(logits).max(dim=-1, keepdim=True)
        return weights, ids


def within_capacity(ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """Switch's token dropping: ids [B, S] (top-1 choices) -> keep [B, S].

    Within each sequence, tokens are taken in order and an expert accepts its first `capacity`
    tokens; later ones are dropped (their MoE output is zero, the residual passes through).
    """
    if capacity <= 0:
        return torch.ones_like(ids, dtype=torch.bool)
    one_hot = torch.nn.functional.one_hot(ids, num_experts)
    position = (torch.cumsum(one_hot, dim=-2) * one_hot).sum(dim=-1)  # 1-based rank within the expert
    return position <= capacity


ROUTERS: dict[str, type[Router]] = {
    "softmax_topk": SoftmaxTopK,
    "softmax_topk_renorm": SoftmaxTopKRenorm,
    "top1": Top1,
}


def make_router(spec: ModelSpec) -> Router:
    """The router `spec.router` names, choosing `spec.top_k` experts per token."""
    return ROUTERS[spec.router](spec.top_k)
