"""Synthetic checkpoints: random weights at the shapes of real models, generated in memory or
written to a directory.

On a GPU machine this measures the true transfer/compute balance of a model that cannot be
downloaded here. Routing of random weights is arbitrary, so synthetic runs measure speed and
bytes, never hit rates that mean anything. `layers` cuts the model short (8 layers of
Mixtral-8x7B already hold 22.5 GB of bf16 experts). `write_checkpoint` writes the same weights as
a Hugging Face directory (config.json + one safetensors shard per layer), so the disk tier reads a
real file of the real expert size from a real disk.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoint import dense_tensor_names, expert_tensor_names, model_name
from ..errors import MoespecError
from ..experts.formats import Dense, Packed
from ..spec import ModelSpec, Rope

_COMMON = dict(max_position_embeddings=4096, rope=Rope(theta=1e6), rms_norm_eps=1e-5, eos_token_ids=())
PRESETS: dict[str, ModelSpec] = {
    "mixtral-8x7b": ModelSpec(model_type="mixtral", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32,
                              num_kv_heads=8, head_dim=128, num_experts=8, top_k=2, expert_intermediate_size=14336,
                              router="softmax_topk_renorm", moe_layers=(True,) * 32, **_COMMON),
    "qwen3-30b-a3b": ModelSpec(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, num_layers=48,
                               num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128, top_k=8,
                               expert_intermediate_size=768, router="softmax_topk_renorm", moe_layers=(True,) * 48,
                               dense_intermediate_size=6144, qk_norm="head", **_COMMON),
    "olmoe-1b-7b": ModelSpec(model_type="olmoe", vocab_size=50304, hidden_size=2048, num_layers=16, num_heads=16,
                             num_kv_heads=16, head_dim=128, num_experts=64, top_k=8, expert_intermediate_size=1024,
                             router="softmax_topk", moe_layers=(True,) * 16, qk_norm="full", **_COMMON),
}


def preset_spec(name: str, layers: int | None = None) -> ModelSpec:
    if name not in PRESETS:
        raise MoespecError(f"unknown synthetic model {name!r}; available: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if layers is not None:
        if not 1 <= layers <= spec.num_layers:
            raise MoespecError(f"layers must be in [1, {spec.num_layers}] for {name}, got {layers}")
        spec = replace(spec, num_layers=layers, moe_layers=spec.moe_layers[:layers])
    return spec


class SyntheticCheckpoint:
    """The Checkpoint interface (spec, dense_state, expert) over seeded random tensors."""

    def __init__(self, spec: ModelSpec, name: str = "synthetic", seed: int = 0):
        self.spec, self.name, self.seed = spec, name, seed
        self.format = Dense()

    def _random(self, shape: tuple[int, ...], key: int, dtype: torch.dtype, std: float = 0.02) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        return (torch.randn(shape, generator=gen) * std).to(dtype)

    def dense_state(self, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
        s = self.spec
        shapes = {"embed_tokens": (s.vocab_size, s.hidden_size), "lm_head": (s.vocab_size, s.hidden_size),
                  "q_proj": (s.num_heads * s.head_dim, s.hidden_size),
                  "k_proj": (s.num_kv_heads * s.head_dim, s.hidden_size),
                  "v_proj": (s.num_kv_heads * s.head_dim, s.hidden_size),
                  "o_proj": (s.hidden_size, s.num_heads * s.head_dim), "gate": (s.num_experts, s.hidden_size),
                  "gate_proj": (s.dense_intermediate_size, s.hidden_size),
                  "up_proj": (s.dense_intermediate_size, s.hidden_size),
                  "down_proj": (s.hidden_size, s.dense_intermediate_size)}
        norms = {"q_norm": s.num_heads * s.head_dim if s.qk_norm == "full" else s.head_dim,
                 "k_norm": s.num_kv_heads * s.head_dim if s.qk_norm == "full" else s.head_dim}
        state = {}
        for i, name in enumerate(dense_tensor_names(s)):
            kind = name.split(".")[-2]
            if kind in norms or kind.endswith("layernorm") or name == "model.norm.weight":
                tensor = torch.ones(norms.get(kind, s.hidden_size), dtype=dtype)
            else:
                tensor = self._random(shapes[kind], i, dtype)
            state[model_name(name)] = tensor.to(device)
        return state

    def expert(self, layer: int, expert: int, dtype: torch.dtype, direct: bool = False) -> Packed:
        s = self.spec
        key = 10_000 + layer * s.num_experts + expert
        gate_up = self._random((2 * s.expert_intermediate_size, s.hidden_size), key, dtype)
        down = self._random((s.hidden_size, s.expert_intermediate_size), key + 5_000_000, dtype)
        return {"gate_up": gate_up, "down": down}


def hf_config(spec: ModelSpec) -> dict:
    """config.json for a preset's family (what `moespec.spec` reads back to `spec`)."""
    common = {"model_type": spec.model_type, "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
              "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
              "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
              "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.rms_norm_eps,
              "rope_theta": spec.rope.theta, "tie_word_embeddings": False, "hidden_act": "silu",
              "num_experts_per_tok": spec.top_k, "norm_topk_prob": spec.router == "softmax_topk_renorm"}
    family = {
        "mixtral": {"architectures": ["MixtralForCausalLM"], "num_local_experts": spec.num_experts,
                    "intermediate_size": spec.expert_intermediate_size},
        "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": spec.num_experts,
                      "moe_intermediate_size": spec.expert_intermediate_size,
                      "intermediate_size": spec.dense_intermediate_size, "decoder_sparse_step": 1,
                      "mlp_only_layers": []},
        "olmoe": {"architectures": ["OlmoeForCausalLM"], "num_experts": spec.num_experts,
                  "intermediate_size": spec.expert_intermediate_size},
    }
    if spec.model_type not in family:
        raise MoespecError(f"no config.json writer for model_type {spec.model_type!r}; "
                           f"available: {', '.join(family)}")
    return {**common, **family[spec.model_type]}


def write_checkpoint(checkpoint: SyntheticCheckpoint, directory: str | Path, dtype: torch.dtype) -> Path:
    """Write `checkpoint`'s weights in `dtype` as a Hugging Face directory, one shard per layer
    (plus one for embeddings, final norm and LM head), and return it. A directory that already
    holds the same config.json is reused as it is (the weights are seeded, so they match)."""
    spec, directory = checkpoint.spec, Path(directory)
    config = {**hf_config(spec), "torch_dtype": str(dtype).removeprefix("torch.")}
    if (directory / "config.json").is_file() and json.loads((directory / "config.json").read_text()) == config:
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    dense = checkpoint.dense_state(dtype, "cpu")  # moespec's names: map back to the checkpoint's
    by_model_name = {model_name(name): name for name in dense_tensor_names(spec)}
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in dense.items():
        original = by_model_name[name]
        layer = original.split(".")[2] if original.startswith("model.layers.") else "rest"
        shards.setdefault(layer, {})[original] = tensor
    weight_map = {}
    for n, layer in enumerate(shards):
        tensors = shards[layer]
        if layer != "rest":
            for e in range(spec.num_experts):
                w = checkpoint.expert(int(layer), e, dtype)
                gate, up = w["gate_up"].chunk(2)
                tensors.update(zip(expert_tensor_names(spec, int(layer), e), (gate, up, w["down"])))
        file = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / file))
        weight_map.update(dict.fromkeys(tensors, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(config, indent=1))  # last: marks the directory complete
    return directory
