"""moespec's forward pass against transformers' reference, on tiny random checkpoints."""

import pytest
import torch

from moespec import LLM
from tiny import logit_gap, save_model

CASES = [
    ("mixtral", dict(experts=4, top_k=2)),
    ("mixtral", dict(experts=8, top_k=1, num_key_value_heads=4)),
    ("mixtral", dict(experts=8, top_k=4, num_key_value_heads=1, sliding_window=6)),
    ("qwen2_moe", dict(experts=8, top_k=4, norm_topk_prob=False)),
    ("qwen2_moe", dict(experts=4, top_k=2, norm_topk_prob=True, shared_expert_intermediate_size=0)),
    ("qwen2_moe", dict(experts=8, top_k=2, num_hidden_layers=3, mlp_only_layers=[1])),
    ("qwen2_moe", dict(experts=4, top_k=1, num_hidden_layers=4, decoder_sparse_step=2)),
    ("qwen3_moe", dict(experts=8, top_k=2, norm_topk_prob=True, head_dim=16)),
    ("qwen3_moe", dict(experts=4, top_k=4, norm_topk_prob=False, num_hidden_layers=3, mlp_only_layers=[0])),
    ("olmoe", dict(experts=8, top_k=4, norm_topk_prob=False)),
    ("olmoe", dict(experts=4, top_k=2, norm_topk_prob=True, clip_qkv=0.5)),
]
PROMPTS = [[5, 17, 33, 9, 60, 61, 12], [99, 3], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 40, 41, 42]]


def reference_greedy(ref, prompt: list[int], steps: int) -> list[int]:
    """transformers' greedy continuation of one prompt, EOS not special (full recompute per step)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, ref(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def case_id(case):
    arch, kw = case
    return arch + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.fixture(params=CASES, ids=[case_id(c) for c in CASES])
def pair(request, tmp_path):
    arch, kw = request.param
    ref = save_model(arch, tmp_path, **kw)
    return ref, LLM(tmp_path)


def test_logits_match_reference(pair):
    ref, llm = pair
    assert logit_gap(ref, llm) <= 1e-4


def test_greedy_batch_matches_reference(pair):
    ref, llm = pair
    outs = llm.generate(PROMPTS, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == reference_greedy(ref, prompt, 32)
        assert out.finish_reason == "length"


def test_incremental_decode_matches_full_forward(pair):
    """Logits from prefill + one-token steps equal logits of one full forward pass."""
    _, llm = pair
    ids = torch.tensor([PROMPTS[2]])
    full = llm.score(ids)[0]
    cache = llm.engine.new_cache(1, ids.shape[1])
    steps = [llm.model.logits(llm.model(ids[:, :5], cache, llm.experts))[0]]
    for t in range(5, ids.shape[1]):
        steps.append(llm.model.logits(llm.model(ids[:, t:t + 1], cache, llm.experts))[0])
    assert torch.allclose(torch.cat(steps), full, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_close_to_float32(tmp_path, dtype):
    save_model("qwen2_moe", tmp_path, experts=8, top_k=2)
    ids = torch.tensor([PROMPTS[0]])
    exact = LLM(tmp_path).score(ids)
    half = LLM(tmp_path, dtype=dtype).score(ids)
    assert half.dtype == torch.float32
    assert (half - exact).abs().max().item() < 0.1
    assert (half.argmax(-1) == exact.argmax(-1)).float().mean() > 0.8


def test_sharded_checkpoint(tmp_path):
    ref = save_model("mixtral", tmp_path, max_shard_size="20KB", experts=4, top_k=2)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    ids = torch.tensor(PROMPTS[:1])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (LLM(tmp_path).score(ids) - expected).abs().max().item() <= 1e-4


def test_stacked_projections_hold_no_weight_twice(pair):
    """q/k/v (and a dense MLP's gate/up) run as one matmul, yet each projection's parameter, under
    its checkpoint name, is a view into the stacked weight: no second copy on the device."""
    llm = pair[1]
    attn = llm.model.layers[0].self_attn
    stacked = attn.qkv_weight
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.untyped_storage().data_ptr() == stacked.untyped_storage().data_ptr()
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), stacked)
