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
from .validate import blame_config, check_config_types


@dataclass(frozen=True)
class ModelSpec:
    """Shapes and architectural switches of an MoE transformer (decoder-only, or Switch's encoder-decoder)."""

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
    router: str  # a name in model/routing.py ROUTERS
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
    gated_mlp: bool = True  # SwiGLU (gate, up, down); False: T5-style wi, act, wo (Switch)
    # encoder-decoder (Switch Transformers): layers [0, num_encoder_layers) are the encoder's, the
    # rest the decoder's, so expert keys (layer, expert) stay unique across both stacks
    num_encoder_layers: int = 0
    expert_capacity: int = 0  # tokens per expert per sequence; 0 = unlimited
    relative_attention_num_buckets: int = 0
    relative_attention_max_distance: int = 0
    router_bias: bool = False
    decoder_start_token_id: int | None = None

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i, is_moe in enumerate(self.moe_layers) if is_moe]

    @property
    def expert_params(self) -> int:
        """Parameters in one routed expert (gate, up and down projections; wi and wo if not gated)."""
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.expert_intermediate_size


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


def _topk_router(cfg: dict[str, Any]) -> str:
    return "softmax_topk_renorm" if cfg.get("norm_topk_prob") else "softmax_topk"


def _qwen_moe(cfg: dict[str, Any], **specifics: Any) -> ModelSpec:
    """Qwen2-MoE and Qwen3-MoE share their routing, expert widths and dense-layer rule."""
    _no_sliding_window(cfg)
    n = _get(cfg, "num_experts", "num_local_experts")
    return ModelSpec(
        **_common(cfg),
        num_experts=n,
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["moe_intermediate_size"],
        router=_topk_router(cfg),
        moe_layers=_qwen_moe_layers(cfg, n),
        dense_intermediate_size=cfg["intermediate_size"],
        **specifics,
    )


def _qwen2_moe(cfg: dict[str, Any]) -> ModelSpec:
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return _qwen_moe(cfg, shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
                     attention_bias=bool(cfg.get("qkv_bias", True)))


def _qwen3_moe(cfg: dict[str, Any]) -> ModelSpec:
    return _qwen_moe(cfg, attention_bias=bool(cfg.get("attention_bias", False)), qk_norm="head")


def _olmoe(cfg: dict[str, Any]) -> ModelSpec:
    return ModelSpec(
        **_common(cfg),
        num_experts=cfg["num_experts"],
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["intermediate_size"],
        router=_topk_router(cfg),
        moe_layers=(True,) * cfg["num_hidden_layers"],
        attention_bias=bool(cfg.get("attention_bias", False)),
        qk_norm="full",
        clip_qkv=cfg.get("clip_qkv"),
    )


def _switch_sparse(num_layers: int, num_sparse: int) -> tuple[bool, ...]:
    """transformers' rule: every `step`-th layer from layer 1 is sparse (all of them if step is 1)."""
    step = num_layers // num_sparse if num_sparse > 0 else num_layers
    return tuple(step > 0 and (i % step == 1 or step == 1) for i in range(num_layers))


def _switch_transformers(cfg: dict[str, Any]) -> ModelSpec:
    """Encoder-decoder, T5-style (relative position bias, no RoPE, ReLU MLPs), top-1 routing with capacity."""
    if cfg.get("dense_act_fn", "relu") != "relu":
        raise MoespecError(f"dense_act_fn {cfg['dense_act_fn']!r} is not supported (only 'relu')")
    enc, dec = cfg["num_layers"], _get(cfg, "num_decoder_layers", default=cfg["num_layers"])
    moe_layers = _switch_sparse(enc, cfg.get("num_sparse_encoder_layers", 3)) \
        + _switch_sparse(dec, cfg.get("num_sparse_decoder_layers", 3))
    return ModelSpec(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        num_layers=enc + dec,
        num_heads=cfg["num_heads"],
        num_kv_heads=cfg["num_heads"],
        head_dim=cfg["d_kv"],
        max_position_embeddings=cfg.get("n_positions", 512),  # relative positions: a context default only
        rms_norm_eps=cfg.get("layer_norm_epsilon", 1e-6),
        rope_theta=0.0,  # no RoPE
        num_experts=cfg["num_experts"],
        top_k=1,
        expert_intermediate_size=cfg["d_ff"],
        router="top1",
        moe_layers=moe_layers,
        dense_intermediate_size=cfg["d_ff"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        hidden_act="relu",
        eos_token_ids=_eos_ids(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        gated_mlp=False,
        num_encoder_layers=enc,
        expert_capacity=cfg.get("expert_capacity", 64),
        relative_attention_num_buckets=cfg.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=cfg.get("relative_attention_max_distance", 128),
        router_bias=bool(cfg.get("router_bias", False)),
        decoder_start_token_id=_get(cfg, "decoder_start_token_id", "pad_token_id", default=0),
    )


PARSERS: dict[str, Callable[[dict[str, Any]], ModelSpec]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "switch_transformers": _switch_transformers,
}
SUPPORTED = tuple(PARSERS)


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    """Build a ModelSpec from a parsed config.json, or say clearly why we cannot."""
    if not isinstance(cfg, dict):
        raise MoespecError(f"config.json must hold a JSON object, got a {type(cfg).__name__}")
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
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:  # a field of the wrong type
        raise blame_config(cfg, PARSERS[model_type], e) from None
    check_config_types(cfg, spec)
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
