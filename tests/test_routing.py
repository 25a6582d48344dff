"""The routing rule lives in one Router object per MoE layer (moespec.model.routing)."""

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moespec
from moespec.model.routing import ROUTERS, Router, SoftmaxTopK, SoftmaxTopKRenorm, Top1, make_router

E = 8
CASES = [(SoftmaxTopK, 2), (SoftmaxTopKRenorm, 2), (SoftmaxTopKRenorm, 3), (Top1, 1)]


def logits(n: int = 6, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, E, generator=torch.Generator().manual_seed(n)).to(dtype)


def reference(cls: type[Router], x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(x.float(), dim=-1)
    if cls is Top1:
        weights, ids = probs.max(dim=-1, keepdim=True)
        return weights, ids
    weights, ids = torch.topk(probs, k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True) if cls is SoftmaxTopKRenorm else weights), ids


@pytest.mark.parametrize("cls,k", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_is_the_reference_rule_bit_for_bit(cls, k, dtype):
    x = logits(dtype=dtype)
    weights, ids = cls(k).select(x)
    want_weights, want_ids = reference(cls, x, k)
    assert weights.dtype == torch.float32 and weights.shape == (6, k)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


@pytest.mark.parametrize("cls,k", CASES)
def test_weights_for_the_selected_ids_are_the_selected_weights(cls, k):
    router, x = cls(k), logits()
    weights, ids = router.select(x)
    assert torch.equal(router.weights_for(x, ids), weights)


def test_weights_for_a_substituted_set_follow_the_rule():
    x, ids = logits(), torch.tensor([[5, 6]] * 6)
    probs = torch.softmax(x, dim=-1).gather(1, ids)
    assert torch.equal(SoftmaxTopK(2).weights_for(x, ids), probs)
    assert torch.allclose(SoftmaxTopKRenorm(2).weights_for(x, ids).sum(-1), torch.ones(6))


@pytest.mark.parametrize("cls,k", CASES)
def test_restrict_to_every_expert_is_select(cls, k):
    router, x = cls(k), logits()
    weights, ids = router.restrict(x, torch.arange(E))
    want_weights, want_ids = router.select(x)
    assert torch.equal(ids, want_ids) and torch.equal(weights, want_weights)


@pytest.mark.parametrize("cls", [SoftmaxTopK, SoftmaxTopKRenorm])
def test_restrict_to_fewer_members_than_k_pads_with_zero_weights(cls):
    router, x, members = cls(4), logits(), torch.tensor([6, 1])
    weights, ids = router.restrict(x, members)
    assert weights.shape == ids.shape == (6, 4)
    assert torch.equal(ids[:, :2], members[x[:, members].topk(2, dim=-1).indices])  # best members first
    assert torch.equal(ids[:, 2:], ids[:, :1].expand(-1, 2)) and weights[:, 2:].eq(0).all()
    assert torch.equal(weights[:, :2], router.weights_for(x, ids[:, :2]))  # probabilities over all experts


def test_make_router_builds_the_named_rule_with_the_spec_k():
    router = make_router(SimpleNamespace(router="softmax_topk_renorm", top_k=3))
    assert type(router) is SoftmaxTopKRenorm and router.k == 3
    assert set(ROUTERS) == {"softmax_topk", "softmax_topk_renorm", "top1"}
    with pytest.raises(ValueError):
        Top1(2)


def test_only_the_model_knows_which_rule_a_layer_has():
    """Outside moespec/model/ a router is asked, never identified: no router function or class
    names (the spec's quoted names excepted), no ROUTERS look-ups."""
    package = Path(moespec.__file__).parent
    names = "|".join([*ROUTERS, *(cls.__name__ for cls in ROUTERS.values())])
    rule = re.compile(rf"ROUTERS\[|(?<![\w\"'])({names})(?![\w\"'])")
    offenders = [f"{path.relative_to(package)}:{n}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path.relative_to(package).parts[0] != "model"
                 for n, line in enumerate(path.read_text().splitlines(), start=1) if rule.search(line)]
    assert offenders == []
