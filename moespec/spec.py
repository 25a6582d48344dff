"""ModelSpec: one dataclass that describes every supported architecture.

The forward pass never looks at `config.json` itself; it reads a `ModelSpec`. Each supported
Hugging Face `model_type` has one small parser below that maps its config keys onto the spec, so
the differences between Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are written down in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import MoespecError


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and architectural switches of a decoder-only MoE transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    # MoE
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    router: str  # name of a function in model/routing.py
    moe_layers: tuple[bool, ...]  # per layer: True = routed experts, False = dense MLP
    dense_intermediate_size: int = 0  # MLP width of the dense (non-MoE) layers
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    # attention
    attention_bias: bool = False  # bias on q/k/v projections
    qk_norm: str = "none"  # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @property
    def expert_params(self) -> int:
        """Parameters in one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.expert_intermediate_size


def _get(cfg: dict[str, Any], *names: str, default: Any = ...) -> Any:
    for name in names:
        if name in cfg and cfg[name] is not None:
            return cfg[name]
    if default is ...:
        raise MoespecError(f"config.json is missing required field {names[0]!r}")
    return default


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise MoespecError(f"rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    ids = (eos,) if isinstance(eos, int) else tuple(eos)
    return tuple(i for i in ids if 0 <= i < cfg["vocab_size"])


def _common(cfg: dict[str, Any]) -> dict[str, Any]:
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    if cfg.get("hidden_act", "silu") != "silu":
        raise MoespecError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    return dict(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=_get(cfg, "head_dim", default=hidden // heads),
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope_theta=_rope_theta(cfg),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
    )


def _qwen_moe_layers(cfg: dict[str, Any], num_experts: int) -> tuple[bool, ...]:
    """Qwen's rule: a layer is sparse unless listed in mlp_only_layers or off the sparse step."""
    step = cfg.get("decoder_sparse_step", 1)
    dense = set(cfg.get("mlp_only_layers") or [])
    return tuple(
        i not in dense and num_experts > 0 and (i + 1) % step == 0
        for i in range(cfg["num_hidden_layers"])
    )


def _no_sliding_window(cfg: dict[str, Any]) -> None:
    if cfg.get("use_sliding_window"):
        raise MoespecError("use_sliding_window=true is not supported for this architecture")


def _mixtral(cfg: dict[str, Any]) -> ModelSpec:
    n = cfg["num_local_experts"]
    return ModelSpec(
        **_common(cfg),
        num_experts=n,
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["intermediate_size"],
        router="softmax_topk_renorm",
        moe_layers=(True,) * cfg["num_hidden_layers"],
        sliding_window=cfg.get("sliding_window"),
    )


def _qwen2_moe(cfg: dict[str, Any]) -> ModelSpec:
    _no_sliding_window(cfg)
    n = _get(cfg, "num_experts", "num_local_experts")
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return ModelSpec(
        **_common(cfg),
        num_experts=n,
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        router="softmax_topk_renorm" if cfg.get("norm_topk_prob") else "softmax_topk",
        moe_layers=_qwen_moe_layers(cfg, n),
        dense_intermediate_size=cfg["intermediate_size"],
        shared_expert_intermediate_size=shared,
        shared_expert_gate=shared > 0,
        attention_bias=bool(cfg.get("qkv_bias", True)),
    )


def _qwen3_moe(cfg: dict[str, Any]) -> ModelSpec:
    _no_sliding_window(cfg)
    n = _get(cfg, "num_experts", "num_local_experts")
    return ModelSpec(
        **_common(cfg),
        num_experts=n,
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        router="softmax_topk_renorm" if cfg.get("norm_topk_prob") else "softmax_topk",
        moe_layers=_qwen_moe_layers(cfg, n),
        dense_intermediate_size=cfg["intermediate_size"],
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="head",
    )


def _olmoe(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        **_common(cfg),
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["intermediate_size"],
        router="softmax_topk_renorm" if cfg.get("norm_topk_prob") else "softmax_topk",
        moe_layers=(True,) * cfg["num_hidden_layers"],
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
    )


PARSERS: dict[str, Callable[[dict[str, Any]], ModelSpec]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}
SUPPORTED = tuple(PARSERS)


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json, or say clearly why we cannot."""
    model_type = cfg.get("model_type")
    if model_type not in PARSERS:
        raise MoespecError(
            f"unsupported architecture {model_type!r} (architectures={cfg.get('architectures')}); "
            f"supported model_type values: {', '.join(SUPPORTED)}"
        )
    try:
        spec = PARSERS[model_type](cfg)
    except KeyError as e:
        raise MoespecError(f"config.json for {model_type} is missing required field {e.args[0]!r}") from None
    if spec.top_k > spec.num_experts:
        raise MoespecError(
            f"num_experts_per_tok={spec.top_k} is larger than the number of experts ({spec.num_experts})"
        )
    return spec


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read `<model_dir>/config.json` into a ModelSpec."""
    path = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise MoespecError(f"model directory not found: {model_dir}")
    if not path.is_file():
        raise MoespecError(f"config.json not found in {model_dir}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MoespecError(f"{path} is not valid JSON: {e}") from None
    return spec_from_config(cfg)
