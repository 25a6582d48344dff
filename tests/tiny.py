"""Tiny random MoE checkpoints built with transformers, for parity and behaviour tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ARCHS = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
    "glm4_moe": (transformers.Glm4MoeConfig, transformers.Glm4MoeForCausalLM),
}

BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.15, eos_token_id=2,
            bos_token_id=1, pad_token_id=0)
MOE_WIDTH = {"qwen2_moe": "moe_intermediate_size", "qwen3_moe": "moe_intermediate_size",
             "deepseek_v3": "moe_intermediate_size", "deepseek_v2": "moe_intermediate_size",
             "glm4_moe": "moe_intermediate_size"}
NUM_EXPERTS = {"mixtral": "num_local_experts", "deepseek_v3": "n_routed_experts", "deepseek_v2": "n_routed_experts",
               "glm4_moe": "n_routed_experts"}
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8,
           v_head_dim=10)  # MLA has a key and value per query head
FAMILY = {"deepseek_v3": MLA, "deepseek_v2": MLA}  # per-family sizes on top of BASE


def make_config(arch: str, experts: int = 4, top_k: int = 2, **overrides):
    cfg_cls, _ = ARCHS[arch]
    kw = dict(BASE, **FAMILY.get(arch, {}))
    kw[NUM_EXPERTS.get(arch, "num_experts")] = experts
    kw["num_experts_per_tok"] = top_k
    if arch in MOE_WIDTH:
        kw[MOE_WIDTH[arch]] = 24
    if arch == "qwen2_moe":
        kw["shared_expert_intermediate_size"] = 40
    kw.update(overrides)
    return cfg_cls(**kw)


def save_model(arch: str, out: Path, seed: int = 0, max_shard_size: str | None = None, **config_kw):
    """Build a random HF model, save it to `out`, and return it (in eval mode) for reference runs."""
    torch.manual_seed(seed)
    _, model_cls = ARCHS[arch]
    model = model_cls(make_config(arch, **config_kw)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return model


def save_tokenizer(out: Path, vocab_size: int = 128) -> Tokenizer:
    """A byte-level BPE tokenizer trained on a few lines of Python, saved as tokenizer.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer)
    tok.save(str(out / "tokenizer.json"))
    return tok


def save_served_model(out: Path, chat_template: str | None = None, **config_kw) -> None:
    """A tiny Qwen3-MoE with a BPE tokenizer and its tokenizer_config.json, as a server loads one."""
    save_model("qwen3_moe", out, experts=8, top_k=2, vocab_size=300, **config_kw)
    save_tokenizer(out, vocab_size=300)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              **({"chat_template": chat_template} if chat_template else {})}
    (out / "tokenizer_config.json").write_text(json.dumps(config))


def logit_gap(ref, llm) -> float:
    """Max |logit difference| between transformers' model `ref` and moespec's `llm` on three fixed
    random rows of 17 tokens (shapes must agree)."""
    ids = torch.randint(3, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    got = llm.score(ids)
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()
