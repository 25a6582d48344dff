"""gpt-oss against transformers' reference: biased router, interleaved gate/up experts with biases and
the clamped SwiGLU, attention sinks, sliding and full layers, YaRN; and its MXFP4 checkpoints."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM, Mxfp4Config
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from moespec import LLM
from moespec.spec import load_spec, MoespecError
from moespec.experts.mxfp4 import FP4_VALUES, Mxfp4, dequantize, quantize
from moespec.model.attention import sink_attention
from test_parity import PROMPTS, reference_greedy
from tiny import logit_gap

BASE = dict(vocab_size=128, num_hidden_layers=3, max_position_embeddings=256, initializer_range=0.15,
            eos_token_id=2, bos_token_id=1, pad_token_id=0)
YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=64)
CASES = {
    # odd sizes; sliding window 5 (shorter than the prompts) on layers 0 and 2; YaRN
    "window5-yarn": dict(hidden_size=36, intermediate_size=20, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=12, num_local_experts=5, num_experts_per_tok=2, sliding_window=5,
                         rope_parameters=YARN),
    # full attention first, a window of 3 after; the SwiGLU clamp active; plain RoPE
    "full-then-window3-clamped": dict(hidden_size=40, intermediate_size=28, num_attention_heads=6,
                                      num_key_value_heads=3, head_dim=10, num_local_experts=7, num_experts_per_tok=3,
                                      num_hidden_layers=2, layer_types=["full_attention", "sliding_attention"],
                                      sliding_window=3, swiglu_limit=0.9),
    # no attention biases; four of five experts; every layer windowed; YaRN with truncated bounds
    "nobias-allwindow-yarn8": dict(hidden_size=24, intermediate_size=12, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=14, num_local_experts=5, num_experts_per_tok=4, attention_bias=False,
                                   layer_types=["sliding_attention"] * 3, sliding_window=4,
                                   rope_parameters=dict(YARN, factor=8.0, truncate=True)),
}
MXFP4_CASE = dict(hidden_size=64, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_local_experts=6, num_experts_per_tok=2, num_hidden_layers=2, sliding_window=5,
                  rope_parameters=YARN)
NOT_QUANTIZED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def random_model(seed: int = 0, **config) -> GptOssForCausalLM:
    """A random gpt-oss whose biases and sinks are random too (transformers starts biases at zero,
    which would leave the bias, de-interleaving and sink paths untested)."""
    torch.manual_seed(seed)
    model = GptOssForCausalLM(GptOssConfig(**{**BASE, **config})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0.0, 0.5)
    return model


def save_mxfp4(model: GptOssForCausalLM, out: Path) -> None:
    """`model` as gpt-oss's released checkpoints store it: experts MXFP4 ([E, out units, in / 32, 16]
    blocks, [E, out units, in / 32] scales, out units in the model's interleaved order), every other
    tensor (biases included) in bfloat16."""
    tensors = {}
    for name, t in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            packed = [quantize(w) for w in t.transpose(1, 2)]  # [E, in, out] -> per expert [out, in]
            tensors[name + "_blocks"] = torch.stack([b for b, _ in packed])
            tensors[name + "_scales"] = torch.stack([s for _, s in packed])
        else:
            tensors[name] = t.to(torch.bfloat16).contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict() | {"quantization_config": {"quant_method": "mxfp4",
                                                                "modules_to_not_convert": NOT_QUANTIZED}}
    (out / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mxfp4_case(tmp_path_factory):
    """(MXFP4 checkpoint dir, transformers' model loading it with its own dequantization)."""
    out = tmp_path_factory.mktemp("mxfp4")
    save_mxfp4(random_model(**MXFP4_CASE), out)
    return out, GptOssForCausalLM.from_pretrained(out, quantization_config=Mxfp4Config(dequantize=True),
                                                  dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[*CASES, "mxfp4"])
def case(request, tmp_path_factory):
    """(checkpoint dir, transformers' model of it, its greedy continuations of PROMPTS)."""
    if request.param == "mxfp4":
        out, ref = request.getfixturevalue("mxfp4_case")
    else:
        out, ref = tmp_path_factory.mktemp(request.param), random_model(**CASES[request.param])
        ref.save_pretrained(out)
    return out, ref, [reference_greedy(ref, p, 32) for p in PROMPTS]


def test_logits_match_reference(case):
    out, ref, _ = case
    assert logit_gap(ref, LLM(out)) <= 1e-4


@pytest.mark.parametrize("options", [dict(expert_cache="100%"), dict(expert_cache="30%"),
                                     dict(expert_cache="50%", prefetch="lookahead"),  # room for guesses
                                     dict(expert_cache="30%", expert_tier="disk", host_cache=0)],
                         ids=["100%", "30%", "lookahead", "disk"])
def test_greedy_batch_matches_reference(case, options):
    out, _, expected = case
    llm = LLM(out, **as_slots(out, options))
    got = llm.generate(PROMPTS, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in got] == expected
    assert llm.stats().as_dict()["prefetches"] > 0 or "prefetch" not in options  # the lookahead did guess
    llm.close()


def as_slots(out, options: dict) -> dict:
    """A share of the experts as a slot count: a share budget is of the experts' float32 size,
    which MXFP4 experts would fit whole."""
    share = options.get("expert_cache", "100%")
    spec = load_spec(out)
    total = len(spec.moe_layer_ids) * spec.num_experts
    return {**options, "expert_cache": max(spec.top_k, int(float(share.rstrip("%")) / 100 * total))}


def test_self_speculative_greedy_is_plain_greedy(case):
    out, _, expected = case
    llm = LLM(out, **as_slots(out, dict(expert_cache="50%")))
    got = llm.generate(PROMPTS, max_new_tokens=32, ignore_eos=True, speculative="self", gamma=3, draft_experts=1)
    assert [o.token_ids for o in got] == expected
    assert llm.stats().as_dict()["speculative_decoding"]["accepted"] > 0
    llm.close()


def test_sink_takes_probability_mass():
    """A sink logit far above every score leaves the head with (almost) no output; far below, plain softmax."""
    q, k, v = (torch.randn(1, 2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.allclose(sink_attention(q, k, v, mask, torch.tensor([-50.0, -50.0])), plain, atol=1e-6)
    assert sink_attention(q, k, v, mask, torch.tensor([50.0, -50.0]))[:, 0].abs().max() < 1e-12


# MXFP4


def test_dequantize_matches_transformers_on_every_byte():
    """Random bytes and scales (every nibble value, both orders) decode as transformers decodes them."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(117, 137, (3, 10, 4), dtype=torch.uint8, generator=g)
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, rows, cols]
    assert torch.equal(torch.stack([dequantize(b, s, torch.float32) for b, s in zip(blocks, scales)]), expected)


def test_quantize_keeps_representable_weights_and_rounds_the_rest():
    g = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-4, 4, (6, 2), generator=g).repeat_interleave(32, dim=1)  # per block of 32
    exact = torch.tensor(FP4_VALUES)[torch.randint(0, 16, (6, 64), generator=g)] * scale
    exact[:, 0], exact[:, 32] = 6.0 * scale[:, 0], -6.0 * scale[:, 32]  # a +-6 in each block fixes its scale
    assert torch.equal(dequantize(*quantize(exact), torch.float32), exact)
    w = torch.randn(8, 96, generator=g)
    assert ((dequantize(*quantize(w), torch.float32) - w).norm() / w.norm()).item() < 0.15


def test_mxfp4_experts_stay_packed_and_cross_the_link_packed(mxfp4_case):
    llm = LLM(mxfp4_case[0], **as_slots(mxfp4_case[0], dict(expert_cache="30%")))
    E, H, I = MXFP4_CASE["num_local_experts"], MXFP4_CASE["hidden_size"], MXFP4_CASE["intermediate_size"]
    packed = llm.store.packed((0, 0))
    assert isinstance(llm.store.format, Mxfp4) and packed["gate_up_blocks"].dtype == torch.uint8
    size = 2 * I * H // 2 + 2 * I * H // 32 + H * I // 2 + H * I // 32 + (2 * I + H) * 4  # blocks, scales, biases
    assert llm.store.expert_bytes == size < 3 * H * I * 4 / 4  # under a quarter of float32
    llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    total = llm.expert_stats.total()
    assert total.misses > 0 and total.bytes_moved == total.misses * size
    assert len(llm.store.keys) == 2 * E
    llm.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mxfp4_unpacks_on_the_cuda_copy_stream(mxfp4_case):
    out, ref = mxfp4_case
    want = [reference_greedy(ref, p, 16) for p in PROMPTS]
    llm = LLM(out, device="cuda", **as_slots(out, dict(expert_cache="30%")))
    assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)] == want
    stats = llm.stats().as_dict()
    assert stats["misses"] > 0 and stats["bytes_moved"] == stats["misses"] * llm.store.expert_bytes
    assert llm.store.packed((0, 0))["gate_up_blocks"].is_pinned() and llm.experts.slots["gate_up_blocks"].is_cuda
    llm.close()


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mxfp4_errors")
    save_mxfp4(random_model(**dict(MXFP4_CASE, num_hidden_layers=1)), out)
    return out


def rewrite(src: Path, dst: Path, config=None, drop=(), replace=None) -> Path:
    from safetensors.torch import load_file
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if k not in drop} | (replace or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text()) | (config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


GATE_UP = "model.layers.0.mlp.experts.gate_up_proj"


@pytest.mark.parametrize("change,message", [
    (dict(config={"quantization_config": {"quant_method": "nf4"}}), "quant_method 'nf4' is not supported"),
    (dict(drop=[GATE_UP + "_scales"]), f"MXFP4 tensor {GATE_UP}_blocks has no scales"),
    (dict(replace={GATE_UP + "_scales": torch.zeros(6, 64, 3, dtype=torch.uint8)}),
     rf"MXFP4 scales {GATE_UP}_scales have shape \[6, 64, 3\], expected \[6, 64, 2\]"),
    (dict(config={"swiglu_alpha": 1.5}), "swiglu_alpha=1.5 is not supported"),
    (dict(config={"layer_types": ["chunked_attention"]}), "layer_types entry 'chunked_attention' is not supported"),
], ids=["quant_method", "no-scales", "scales-shape", "swiglu_alpha", "layer_types"])
def test_bad_checkpoints_are_one_line_errors(mxfp4_dir, tmp_path, change, message):
    with pytest.raises(MoespecError, match=message) as err:
        LLM(rewrite(mxfp4_dir, tmp_path, **change))
    assert "\n" not in str(err.value)
