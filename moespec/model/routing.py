"""Routers: one object per MoE layer that owns its architecture's routing rule.

The rule ("softmax over all experts, keep the k best, renormalise them or not"; DeepSeek's
"sigmoid scores, a bias to choose by, the best groups first") is needed in more places than the
forward pass: the lookahead's guess scores, the weights speculative execution gives a
substituted id set, the draft pass's routing among its draft experts. Every one of them asks the
layer's Router instead of re-deriving the rule, so a guess, a substitution, a draft and the true
routing can never disagree on it, and nothing outside moespec.model needs to know which rule a
layer has. `ModelSpec.router` names the class in `ROUTERS`; `make_router(spec, gate)` builds one.

A layer's `Gate` (its parameters: the router matrix, an optional bias, DeepSeek's optional
`e_score_correction_bias`) maps hidden states to logits; the Router reads the gate's correction
bias when it chooses. All Router methods take router logits [N, E]:
- `probs(logits)`: per-expert scores [N, E] float32 (softmax or sigmoid) the weights come from;
- `select(logits)`: the routing, (weights [N, k] float32, expert ids [N, k]);
- `weights_for(logits, ids)`: the router's weights [N, k] for a given (e.g. substituted) id set;
- `restrict(logits, members)`: the routing when only the experts `members` may be chosen;
- `guess_logits(logits)`: logits [N, E] ordered as the router chooses, whose softmax a guess
  takes for each expert's chance of being chosen (what a lookahead's prefetch ranks and admits by).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import ModelSpec


class Gate(nn.Linear):
    """The router's parameters: logits = x W^T (+ b), in float32 when `float32` (DeepSeek's
    reference computes its router there). `e_score_correction_bias` [E] (DeepSeek-V3, GLM-4.5)
    only shifts which experts are chosen, never their weights."""

    def __init__(self, hidden: int, experts: int, bias: bool = False, correction: bool = False,
                 float32: bool = False):
        super().__init__(hidden, experts, bias=bias)
        self.float32 = float32
        self.e_score_correction_bias = nn.Parameter(torch.zeros(experts)) if correction else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32:
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return super().forward(x)


class Router:
    """Softmax over all experts (in float32), the k most probable, weighted by their probability;
    renormalised over the chosen ones when the class `renormalizes`, times `scale`."""

    renormalizes = False
    renorm_eps = 0.0  # added to the sum of the k weights before dividing (DeepSeek: 1e-20)

    def __init__(self, k: int, scale: float = 1.0, groups: int = 1, topk_groups: int = 1, gate: Gate | None = None):
        """k experts per token; weights times `scale`; experts split into `groups` equal groups of
        which each token may use `topk_groups` (routers with a group limit); `gate`: the
        layer's parameters, for a rule that reads its correction bias."""
        self.k, self.scale, self.gate = k, scale, gate
        self.groups, self.topk_groups = groups, topk_groups

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def preference(self, probs: torch.Tensor) -> torch.Tensor:
        """What experts are ranked by when choosing [N, E] (before any group limit), from `probs`."""
        return probs

    def choice(self, probs: torch.Tensor) -> torch.Tensor:
        """`preference` with the experts outside each token's chosen groups excluded."""
        return self.preference(probs)

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = self.probs(logits)  # once: the choice and the weights both come from it
        ids = torch.topk(self.choice(probs), self.k, dim=-1).indices
        return self._weigh(probs.gather(1, ids)), ids

    def guess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """A softmax router's own logits."""
        return logits

    def weights_for(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What the router would weigh experts ids [N, k] with, had it chosen them: a perfect
        substitute changes nothing."""
        return self._weigh(self.probs(logits).gather(1, ids))

    def restrict(self, logits: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's min(k, len(members)) most preferred `members` (no group limit), weighted as
        `weights_for` (scores over all experts), padded with zero-weight repeats of the first
        choice to k columns. Masking the softmax to the members instead would inflate the weights
        of routers that do not renormalise (Qwen's)."""
        n = min(self.k, len(members))
        probs = self.probs(logits)
        ids = members[self.preference(probs)[:, members].topk(n, dim=-1).indices]
        weights = self._weigh(probs.gather(1, ids))
        if n < self.k:
            weights = torch.cat([weights, weights.new_zeros(len(weights), self.k - n)], dim=1)
            ids = torch.cat([ids, ids[:, :1].expand(-1, self.k - n)], dim=1)
        return weights, ids

    def _weigh(self, weights: torch.Tensor) -> torch.Tensor:
        if self.renormalizes:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + self.renorm_eps)
        return weights * self.scale if self.scale != 1.0 else weights

    def _group_mask(self, group_score: torch.Tensor, experts: int) -> torch.Tensor:
        """[N, E] True for the experts in each token's `topk_groups` best groups (by `group_score` [N, groups])."""
        best = torch.topk(group_score, self.topk_groups, dim=-1).indices
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)
        return keep.repeat_interleave(experts // self.groups, dim=1)


class SoftmaxTopK(Router):
    """The k largest probabilities as they are (Qwen, OLMoE default)."""


class SoftmaxTopKRenorm(Router):
    """The k probabilities renormalised to sum to one (Mixtral; norm_topk_prob=True; gpt-oss,
    whose softmax over the k chosen logits is the same thing)."""

    renormalizes = True


class SoftmaxGroupTopK(Router):
    """DeepSeek-V2: softmax scores; with several groups, only the `topk_groups` groups holding the
    highest single scores may be chosen from (group_limited_greedy); no renormalisation."""

    def choice(self, probs: torch.Tensor) -> torch.Tensor:
        return probs if self.groups <= 1 else probs.masked_fill(~self._allowed(probs), 0.0)  # as the reference

    def guess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits with the experts outside the token's groups excluded."""
        return logits if self.groups <= 1 else logits.float().masked_fill(~self._allowed(self.probs(logits)), -torch.inf)

    def _allowed(self, scores: torch.Tensor) -> torch.Tensor:
        """Groups ranked by their best single score."""
        return self._group_mask(scores.view(scores.shape[0], self.groups, -1).amax(dim=-1), scores.shape[1])


class SigmoidGroupTopK(Router):
    """DeepSeek-V3, GLM-4.5, Kimi-K2: sigmoid scores; experts chosen by score + the gate's
    correction bias within the `topk_groups` groups whose two best biased scores sum highest;
    weighted by their unbiased scores (renormalised when norm_topk_prob)."""

    renorm_eps = 1e-20

    def __init__(self, k: int, scale: float = 1.0, groups: int = 1, topk_groups: int = 1,
                 gate: Gate | None = None, renormalize: bool = False):
        super().__init__(k, scale, groups, topk_groups, gate)
        self.renormalizes = renormalize

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())

    def preference(self, probs: torch.Tensor) -> torch.Tensor:
        bias = None if self.gate is None else self.gate.e_score_correction_bias
        return probs if bias is None else probs + bias.float()

    def choice(self, probs: torch.Tensor) -> torch.Tensor:
        scores = self.preference(probs)
        if self.groups <= 1:
            return scores
        group_score = scores.view(scores.shape[0], self.groups, -1).topk(2, dim=-1).values.sum(dim=-1)
        return scores.masked_fill(~self._group_mask(group_score, scores.shape[1]), -torch.inf)

    def guess_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits whose sigmoid is the biased choice score (the logits themselves when there
        is no bias), experts outside the token's groups excluded: ordered as `choice` (scores the
        bias pushes to 1 or above tie at the top)."""
        choice = self.choice(self.probs(logits))
        return torch.where(choice.isinf(), choice, torch.logit(choice.clamp(1e-6, 1 - 1e-6)))


class SigmoidTopKInput(Router):
    """Llama-4: the k largest logits, each weighted by its sigmoid; the weight scales the expert's
    input, not its output (`ModelSpec.router_scales_input`)."""

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float())


class Top1(Router):
    """Switch Transformers: the most probable expert (argmax, as the reference), weighted by its probability."""

    def __init__(self, k: int = 1, *args, **kwargs):
        if k != 1:
            raise ValueError(f"top1 routes each token to one expert, got k={k}")
        super().__init__(k, *args, **kwargs)

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
    "softmax_group_topk": SoftmaxGroupTopK,
    "sigmoid_group_topk": SigmoidGroupTopK,
    "sigmoid_topk_input": SigmoidTopKInput,
    "top1": Top1,
}


def most_probable(guess_logits: torch.Tensor, width: int) -> torch.return_types.topk:
    """The `width` most probable experts of guess logits [..., E] (a router's `guess_logits`),
    best first: (probabilities under the softmax over all experts, ids). How a speculation ranks
    one token's guess, eager or inside a compiled guess (speculate/compiled_guess.py)."""
    return torch.softmax(guess_logits.float(), dim=-1).topk(width)


def make_gate(spec: ModelSpec) -> Gate:
    """A layer's router parameters, as `spec` describes them."""
    return Gate(spec.hidden_size, spec.num_experts, bias=spec.router_bias,
                correction=spec.router_correction_bias, float32=spec.router_float32)


def make_router(spec: ModelSpec, gate: Gate | None = None) -> Router:
    """The router `spec.router` names, choosing `spec.top_k` experts per token (reading the
    correction bias, if its rule has one, from `gate`)."""
    cls = ROUTERS[spec.router]
    options = dict(renormalize=spec.norm_topk_prob) if cls is SigmoidGroupTopK else {}
    return cls(spec.top_k, spec.routed_scaling_factor, spec.n_group, spec.topk_group, gate, **options)
