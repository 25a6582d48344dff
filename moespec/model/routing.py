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


def top1(logits: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformers: softmax in float32, the most probable expert, weighted by its probability."""
    if k != 1:
        raise ValueError(f"top1 routes each token to one expert, got k={k}")
    weights, ids = torch.softmax(logits.float(), dim=-1).max(dim=-1, keepdim=True)
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


ROUTERS: dict[str, Router] = {
    "softmax_topk": softmax_topk,
    "softmax_topk_renorm": softmax_topk_renorm,
    "top1": top1,
}
