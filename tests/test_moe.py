"""run_experts against a per-token reference: every activation, input or output scaling, biases,
expert by expert in any order the provider hands the experts over, or all at once grouped."""

from __future__ import annotations

import pytest
import torch

from moespec.experts.base import ExpertWeights
from moespec.model.moe import SwiGLUExperts, expert_runs, padded_pays, run_experts

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


class StackedProvider(OrderedProvider):
    """Offers every expert stacked, as ResidentExperts does: run_experts must compute them grouped."""

    num_experts = E

    def fetch(self, layer: int, ids: list[int], tokens: int):
        raise AssertionError("a third of the stack is used: the grouped path should have run")

    def fetch_stack(self, layer: int, ids: list[int], tokens: int) -> ExpertWeights:
        self.asked.append(list(ids))
        fields = vars(self.experts[0]).keys()
        return ExpertWeights(**{f: None if getattr(self.experts[0], f) is None else
                                torch.stack([getattr(self.experts[e], f) for e in range(E)]) for f in fields})


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

    fn = SwiGLUExperts(act, limit=1.0)  # a low limit: the clamps do act
    want = reference(x, weights, ids, experts, fn, scales_input)
    results = []
    for provider in (OrderedProvider(experts, "forward"), OrderedProvider(experts, "reversed"),
                     StackedProvider(experts, "forward")):
        results.append(run_experts(0, x, weights, ids, provider, fn, scales_input))
        assert provider.asked == [sorted(set(ids.flatten().tolist()))]  # each chosen expert asked for once
        torch.testing.assert_close(results[-1], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(results[0], results[1])  # bit for bit, whatever order the experts arrived in


def test_grouped_only_when_enough_of_the_stack_is_used():
    """One token choosing 2 of 64 stacked experts runs expert by expert (a grouped matmul would pay
    for 62 empty groups); the stack is asked for only when a third of it is used."""
    experts = {e: ExpertWeights(torch.randn(2 * I, H), torch.randn(H, I)) for e in range(64)}
    provider = OrderedProvider(experts, "forward")
    provider.num_experts = 64
    stacks = []
    provider.fetch_stack = lambda layer, ids, tokens: stacks.append(ids)  # records; would fail if used
    x, weights = torch.randn(1, H), torch.rand(1, K)
    run_experts(0, x, weights, torch.tensor([[5, 9]]), provider, SwiGLUExperts())
    assert stacks == [] and provider.asked == [[5, 9]]


@pytest.mark.parametrize("act,biases", [("silu", False), ("clamped_swiglu", True)])
def test_padded_batched_matmuls_compute_the_grouped_experts(act, biases):
    """The grouped path's other form, batched matmuls over every expert's rows padded to the
    longest run, computes each row with its own expert (float32: to the reference's precision).
    In bfloat16 on a CPU, where it pays (few rows per expert, many experts), run_experts takes it
    and agrees with the float32 reference to bfloat16's precision; in float32 it never pays."""
    gen = torch.Generator().manual_seed(1)
    tokens = 9
    x = torch.randn(tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(tokens)])
    weights = torch.rand(tokens, K, generator=gen)
    experts = random_experts(biases)
    fn = SwiGLUExperts(act, limit=1.0)

    order, runs = expert_runs(ids)
    stack = StackedProvider(experts, "forward").fetch_stack(0, list(runs), tokens)
    longest = max(r.stop - r.start for r in runs.values())
    assert longest > min(r.stop - r.start for r in runs.values())  # some runs are padded
    rows, row_expert = x[order // K], ids.flatten()[order]
    padded = fn.padded(rows, stack, runs, row_expert, longest)
    for r in range(len(rows)):
        torch.testing.assert_close(padded[r:r + 1], fn(rows[r:r + 1], experts[int(row_expert[r])]),
                                   rtol=1e-5, atol=1e-5)
    assert not padded_pays(rows, stack, len(runs), longest)

    half = {e: ExpertWeights(*(None if t is None else t.bfloat16() for t in vars(w).values()))
            for e, w in experts.items()}
    provider = StackedProvider(half, "forward")
    assert padded_pays(rows.bfloat16(), provider.fetch_stack(0, list(runs), tokens), len(runs), longest)
    got = run_experts(0, x.bfloat16(), weights, ids, provider, fn)
    assert got.dtype == torch.bfloat16
    exact = reference(x.bfloat16().float(), weights, ids,  # the same weights and inputs, computed in float32
                      {e: ExpertWeights(*(None if t is None else t.float() for t in vars(w).values()))
                       for e, w in half.items()}, fn, False)
    assert (got.float() - exact).abs().max() <= 0.02 * exact.abs().max()  # bfloat16's rounding of the steps
