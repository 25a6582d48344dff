"""Routers as pure functions: router logits [N, E] -> (weights [N, k] float32, expert ids [N, k]).

Each architecture names its router in `ModelSpec.router`; speculation (which applies a later
layer's router to an earlier hidden state) calls the same functions, so a guess and the true
routing can never disagree on the rule.
"""

from __future__ import annotations

from typing import Callable

import torch

Router = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def softmax_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, keep the k largest probabilities as they are (Qwen, OLMoE default)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, k, dim=-1)
    return weights, ids


def softmax_topk_renorm(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax, top-k, then renormalise the k weights to sum to one (Mixtral; norm_topk_prob=True)."""
    weights, ids = softmax_topk(logits, k)
    return weights / weights.sum(dim=-1, keepdim=True), ids


ROUTERS: dict[str, Router] = {
    "softmax_topk": softmax_topk,
    "softmax_topk_renorm": softmax_topk_renorm,
}
