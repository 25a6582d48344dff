"""Switch Transformers (encoder-decoder, top-1 with expert capacity) against transformers' reference."""

import pytest
import torch
import transformers

from moespec.checkpoint import Checkpoint
from moespec.experts.stats import ExpertStats
from moespec.experts.store import ExpertStore, ResidentExperts
from moespec.model.load import build_model
from moespec.model.routing import Top1, within_capacity
from moespec.model.switch import SwitchTransformer
from moespec.spec import load_spec

BASE = dict(vocab_size=96, d_model=16, d_kv=8, d_ff=24, num_heads=2, relative_attention_num_buckets=8,
            relative_attention_max_distance=20, decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
CASES = [
    # capacity 2 of 11 tokens over 4 experts: tokens are dropped
    dict(num_layers=4, num_decoder_layers=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
         num_experts=4, expert_capacity=2),
    dict(num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
         num_experts=8, expert_capacity=64, tie_word_embeddings=False, router_bias=True),
    dict(num_layers=3, num_decoder_layers=2, num_sparse_encoder_layers=3, num_sparse_decoder_layers=0,
         num_experts=8, expert_capacity=3),
]


def save_switch(path, seed=0, **kw):
    torch.manual_seed(seed)
    ref = transformers.SwitchTransformersForConditionalGeneration(
        transformers.SwitchTransformersConfig(**BASE, **kw)).eval()
    ref.save_pretrained(path)
    return ref


def load_switch(path) -> tuple[SwitchTransformer, ResidentExperts]:
    checkpoint = Checkpoint(path, load_spec(path))
    store = ExpertStore(checkpoint, torch.float32, pin=False)
    return build_model(checkpoint, torch.float32, "cpu"), \
        ResidentExperts(store, torch.device("cpu"), ExpertStats(checkpoint.spec.moe_layer_ids))


def inputs():
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(2, 96, (3, 11), generator=g), torch.randint(2, 96, (3, 7), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    return ids, dec, mask


@pytest.fixture(params=CASES, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def pair(request, tmp_path):
    ref = save_switch(tmp_path, **request.param)
    return ref, *load_switch(tmp_path)


def test_spec_matches_reference_layout(pair):
    ref, model, _ = pair
    sparse = [b.is_sparse for b in ref.encoder.block] + [b.is_sparse for b in ref.decoder.block]
    assert model.spec.moe_layers == tuple(sparse)
    assert model.spec.num_encoder_layers == len(ref.encoder.block)
    assert model.spec.expert_params == 2 * 16 * 24  # wi and wo only


def test_logits_match_reference(pair):
    ref, model, experts = pair
    ids, dec, mask = inputs()
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = model.score(ids, dec, experts, mask.bool())
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_greedy_matches_reference_generate(pair):
    ref, model, experts = pair
    ids, _, mask = inputs()
    with torch.no_grad():
        expected = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
        got = model.generate(ids, experts, 12, mask.bool())
    assert got.tolist() == expected.tolist()


def test_router_and_capacity_match_reference_router(tmp_path):
    """Same expert per token and the same tokens dropped as transformers' top-1 router; some are dropped."""
    ref = save_switch(tmp_path, **CASES[0])
    model, _ = load_switch(tmp_path)
    router = ref.encoder.block[1].layer[1].mlp.router
    x = torch.randn(3, 11, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dispatch, probs, _ = router(x)
        weights, ids = model.encoder.block[1].layer[1].mlp.route(x)
    keep = within_capacity(ids.view(3, 11), 4, 2)
    assert keep.sum() < keep.numel()
    expected = torch.nn.functional.one_hot(ids.view(3, 11), 4) * keep[..., None]
    assert torch.equal(dispatch, expected)
    assert torch.allclose(weights.view(3, 11, 1), probs)


def test_top1_refuses_k_above_one():
    with pytest.raises(ValueError):
        Top1(2)


def test_llm_refuses_encoder_decoder_with_a_clear_error(tmp_path):
    from moespec import LLM, MoespecError

    cfg = transformers.SwitchTransformersConfig(vocab_size=64, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2,
                                                num_decoder_layers=2, num_experts=4, expert_capacity=4,
                                                num_sparse_encoder_layers=1, num_sparse_decoder_layers=1)
    transformers.SwitchTransformersForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(MoespecError, match="switch_transformers is an encoder-decoder model"):
        LLM(tmp_path)
