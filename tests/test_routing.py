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
    spec = SimpleNamespace(router="softmax_topk_renorm", top_k=3, routed_scaling_factor=1.0, n_group=1,
                           topk_group=1, norm_topk_prob=False)
    router = make_router(spec)
    assert type(router) is SoftmaxTopKRenorm and router.k == 3
    assert set(ROUTERS) == {"softmax_topk", "softmax_topk_renorm", "softmax_group_topk", "sigmoid_group_topk",
                            "sigmoid_topk_input", "top1"}
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


def _sorted(weights: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


def _family_cases():
    """(transformers config, its router module's (weights, ids) for x, our spec fields) per family."""
    import transformers as tf

    def v3(**kw):
        cfg = tf.DeepseekV3Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=16, num_experts_per_tok=4, **kw)
        module = tf.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3TopkRouter(cfg)
        return module, lambda x: module(x)[1:], dict(router="sigmoid_group_topk", top_k=4, n_group=cfg.n_group,
                                                     topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                                                     routed_scaling_factor=cfg.routed_scaling_factor,
                                                     router_correction_bias=True, router_float32=True)

    def v2(**kw):
        cfg = tf.DeepseekV2Config(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=16, num_experts_per_tok=3, **kw)
        module = tf.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(cfg)
        groups = cfg.n_group if cfg.topk_method == "group_limited_greedy" else 1
        return module, lambda x: module(x)[1:], dict(router="softmax_group_topk", top_k=3, n_group=groups,
                                                     topk_group=cfg.topk_group,
                                                     routed_scaling_factor=cfg.routed_scaling_factor,
                                                     router_float32=True)

    def llama4():
        cfg = tf.Llama4TextConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=2)
        module = tf.models.llama4.modeling_llama4.Llama4Router(cfg)

        def route(x):
            scores, _ = module(x)
            top = scores.topk(2, dim=-1)
            return top.values, top.indices
        return module, route, dict(router="sigmoid_topk_input", top_k=2)

    def gpt_oss():
        cfg = tf.GptOssConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=2, num_local_experts=16, num_experts_per_tok=4)
        module = tf.models.gpt_oss.modeling_gpt_oss.GptOssTopKRouter(cfg)
        return module, lambda x: module(x)[1:], dict(router="softmax_topk_renorm", top_k=4, router_bias=True)

    return {"deepseek_v3": v3(n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5),
            "deepseek_v3-ungrouped": v3(n_group=1, topk_group=1, norm_topk_prob=False),
            "deepseek_v2-group_limited": v2(topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                            routed_scaling_factor=16.0),
            "deepseek_v2-greedy": v2(topk_method="greedy"), "llama4": llama4(), "gpt_oss": gpt_oss()}


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v3-ungrouped", "deepseek_v2-group_limited",
                                    "deepseek_v2-greedy", "llama4", "gpt_oss"])
def test_family_routers_match_transformers(family):
    """Each family's Gate + Router chooses the reference's experts with the reference's weights."""
    from moespec.model.routing import make_gate
    module, reference_route, fields = _family_cases()[family]
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        for name, b in module.named_buffers():
            b.copy_(torch.rand(b.shape, generator=gen) * 0.5)  # DeepSeek's correction bias
    spec = SimpleNamespace(**{**dict(hidden_size=16, num_experts=16, routed_scaling_factor=1.0, n_group=1,
                                     topk_group=1, norm_topk_prob=False, router_bias=False,
                                     router_correction_bias=False, router_float32=False), **fields})
    gate = make_gate(spec)
    gate.load_state_dict({**dict(module.named_parameters()), **dict(module.named_buffers())}, strict=True)
    router = make_router(spec, gate)
    x = torch.randn(40, 16, generator=gen)
    with torch.no_grad():
        expected = _sorted(*reference_route(x))
        got = _sorted(*router.select(gate(x)))
    assert torch.equal(got[1], expected[1])
    assert torch.allclose(got[0], expected[0].float(), atol=1e-6)
    assert torch.allclose(router.weights_for(gate(x), got[1]), got[0])
