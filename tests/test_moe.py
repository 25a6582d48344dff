"""run_experts against a per-token reference: every activation, input or output scaling, biases,
and any order in which the provider hands the experts over."""

from __future__ import annotations

import pytest
import torch

from moespec.experts.base import ExpertWeights
from moespec.model.moe import expert_forward, run_experts

E, H, I, K = 6, 16, 8, 2


def random_experts(biases: bool) -> dict[int, ExpertWeights]:
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    return {e: ExpertWeights(rand(2 * I, H), rand(H, I), rand(2 * I) if biases else None, rand(H) if biases else None)
            for e in range(E)}


class OrderedProvider:
    """Hands the asked-for experts over in a chosen order ("forward", "reversed"), records the asks."""

    def __init__(self, experts: dict[int, ExpertWeights], order: str):
        self.experts, self.order, self.asked = experts, order, []

    def fetch(self, layer: int, ids: list[int], tokens: int):
        self.asked.append(list(ids))
        for e in (reversed(ids) if self.order == "reversed" else ids):
            yield e, self.experts[e]


def reference(x, weights, ids, experts, fn, scales_input):
    """Token by token, choice by choice: sum_k w_k * f_k(x) (or f_k(w_k * x))."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            w, e = weights[t, j], int(ids[t, j])
            out[t] += fn(x[t:t + 1] * w, experts[e])[0] if scales_input else w * fn(x[t:t + 1], experts[e])[0]
    return out


@pytest.mark.parametrize("act,biases", [("silu", False), ("clamped_swiglu", True)])
@pytest.mark.parametrize("scales_input", [False, True])
@pytest.mark.parametrize("tokens", [1, 9])
def test_run_experts_matches_reference_in_any_arrival_order(act, biases, scales_input, tokens):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=gen)
    experts = random_experts(biases)

    def fn(x, w):
        return expert_forward(x, w, act=act, limit=1.0)  # a low limit: the clamps do act

    want = reference(x, weights, ids, experts, fn, scales_input)
    results = []
    for order in ("forward", "reversed"):
        provider = OrderedProvider(experts, order)
        results.append(run_experts(0, x, weights, ids, provider, fn, scales_input))
        assert provider.asked == [sorted(set(ids.flatten().tolist()))]  # each chosen expert asked for once
    torch.testing.assert_close(results[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0], results[1])  # bit for bit, whatever order the experts arrived in
