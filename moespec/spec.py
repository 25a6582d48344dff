"""ModelSpec: one dataclass that describes every supported architecture.

The forward pass never looks at `config.json` itself; it reads a `ModelSpec`. Each supported
Hugging Face `model_type` has one small parser below that maps its config keys onto the spec, so
the differences between Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are written down in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import MoespecError
from .validate import blame_config, check_config_types


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding of one model: which dims rotate, how, and its frequency scaling.

    `kind` "default" is plain RoPE; "yarn" and "llama3" rescale the inverse frequencies for a
    context longer than `original_max_position_embeddings` (see model/rope.py). `dim` is how many
    of a head's leading dims rotate (partial rotary: the rest pass through; MLA: the rope dims).
    `interleave`: pairs (x0, x1), (x2, x3), ... rotate together (DeepSeek, Llama-4) instead of
    the two halves of the rotated dims (Llama, Mixtral)."""

    theta: float = 10000.0
    dim: int | None = None  # rotated dims of a head; None: all of them
    kind: str = "default"  # "default" | "yarn" | "llama3"
    interleave: bool = False
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # yarn: cos/sin scale; None: derived from factor and mscales
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0


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
    rope: Rope
    # MoE
    num_experts: int
    top_k: int
    expert_intermediate_size: int
    router: str  # a name in model/routing.py ROUTERS
    moe_layers: tuple[bool, ...]  # per layer: True = routed experts, False = dense MLP
    dense_intermediate_size: int = 0  # MLP width of the dense (non-MoE) layers
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert
    shared_expert_gate: bool = False  # sigmoid gate on the shared expert (Qwen2-MoE)
    # routing (model/routing.py): group limits, weight scale, the gate's parameters
    routed_scaling_factor: float = 1.0  # the chosen experts' weights are multiplied by it
    norm_topk_prob: bool = False  # DeepSeek-V3's sigmoid router: renormalise the k weights
    n_group: int = 1  # experts form n_group groups; tokens choose among their topk_group best
    topk_group: int = 1
    router_correction_bias: bool = False  # e_score_correction_bias: shifts the choice, not the weights
    router_float32: bool = False  # router logits computed in float32 (DeepSeek's reference)
    router_scales_input: bool = False  # the weight scales the expert's input (Llama-4), not its output
    # routed experts (model/moe.py expert_forward)
    expert_act: str = "silu"  # "silu": down(silu(gate) * up); "clamped_swiglu": gpt-oss's
    swiglu_limit: float = 7.0  # clamped_swiglu: gate <= limit, |up| <= limit
    expert_bias: bool = False  # biases on gate_up and down (gpt-oss)
    # attention
    attention: str = "gqa"  # "gqa" (model/attention.py) | "mla": DeepSeek's latent attention (model/mla.py)
    attention_bias: bool = False  # bias on q/k/v projections (MLA: on q_a_proj, kv_a_proj_with_mqa, o_proj)
    # MLA only: head_dim is qk_nope_head_dim + the rotary dims (rope.dim, qk_rope_head_dim)
    q_lora_rank: int = 0  # 0: a plain q_proj, else q_a_proj -> norm -> q_b_proj through this rank
    kv_lora_rank: int = 0  # width of the compressed key/value latent (what the KV cache stores)
    qk_nope_head_dim: int = 0  # per-head query/key dims that do not rotate
    v_head_dim: int = 0
    qk_norm: str = "none"  # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    #                        | "l2" (per head, no weight, after the rotary, rotary layers only: Llama-4)
    clip_qkv: float | None = None
    sliding_window: int | None = None
    # per layer: its sliding window (None: full attention); empty: every layer uses `sliding_window`
    layer_sliding_windows: tuple[int | None, ...] = ()
    attention_out_bias: bool = False  # bias on o_proj (gpt-oss; Llama-4's attention_bias)
    attention_sinks: bool = False  # a learned logit per head that takes softmax mass but has no value (gpt-oss)
    # per-layer attention (Llama-4): NoPE layers, chunked layers, query temperature on NoPE layers
    nope_layers: tuple[int, ...] = ()  # layers without rotary embedding (and without the "l2" q/k norm)
    chunked_layers: tuple[int, ...] = ()  # layers where a token attends only within its chunk
    attention_chunk_size: int = 0  # chunk of position p: p // attention_chunk_size
    attn_temperature: tuple[float, float] | None = None  # NoPE layers: (floor_scale, attn_scale), see attention.py
    tie_word_embeddings: bool = False
    weights_prefix: str = ""  # where the text model's tensors sit in the files (multimodal Llama-4: "language_model.")
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

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention (None: it sees the whole context)."""
        return self.layer_sliding_windows[layer] if self.layer_sliding_windows else self.sliding_window

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


ROPE_KINDS = ("default", "yarn", "llama3")


def rope_from_config(cfg: dict[str, Any], dim: int | None = None, interleave: bool = False) -> Rope:
    """The rotary embedding `config.json` describes (`rope_parameters`, or the older
    `rope_theta` + `rope_scaling`), rotating `dim` dims of each head (None: all)."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ROPE_KINDS:
        raise MoespecError(f"rope_type {kind!r} is not supported (supported: {', '.join(ROPE_KINDS)})")
    theta = float(params.get("rope_theta", cfg.get("rope_theta") or 10000.0))
    if kind == "default":
        return Rope(theta=theta, dim=dim, interleave=interleave)
    original = params.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings") \
        or cfg["max_position_embeddings"]
    factor = params.get("factor") or cfg["max_position_embeddings"] / original
    optional = {name: float(params[name]) for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim",
                                                        "low_freq_factor", "high_freq_factor")
                if params.get(name) is not None}
    attention_factor = params.get("attention_factor")
    return Rope(theta=theta, dim=dim, kind=kind, interleave=interleave, factor=float(factor),
                original_max_position_embeddings=int(original), truncate=bool(params.get("truncate", True)),
                attention_factor=None if attention_factor is None else float(attention_factor), **optional)


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
    head_dim = _get(cfg, "head_dim", default=hidden // heads)
    return dict(
        model_type=cfg["model_type"],
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_get(cfg, "num_key_value_heads", default=heads),
        head_dim=head_dim,
        max_position_embeddings=cfg["max_position_embeddings"],
        rms_norm_eps=cfg["rms_norm_eps"],
        rope=rope_from_config(cfg),
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
        rope=Rope(),  # unused: relative position bias, no RoPE
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


GPT_OSS_ALPHA = 1.702  # the sigmoid gain model/moe.py's clamped SwiGLU applies
LAYER_TYPES = ("sliding_attention", "full_attention")


def _gpt_oss_windows(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window from `layer_types` (transformers' default: sliding on even layers)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if len(types) != n:
        raise MoespecError(f"layer_types has {len(types)} entries for num_hidden_layers={n}")
    for t in types:
        if t not in LAYER_TYPES:
            raise MoespecError(f"layer_types entry {t!r} is not supported (supported: {', '.join(LAYER_TYPES)})")
    window = cfg.get("sliding_window")
    return tuple(window if t == "sliding_attention" else None for t in types)


def _gpt_oss(cfg: dict[str, Any]) -> ModelSpec:
    """gpt-oss: biased router (top-k logits, softmax over the k), experts with biases and a clamped
    SwiGLU, attention with q/k/v/o biases and per-head sinks, sliding and full layers alternating."""
    alpha = cfg.get("swiglu_alpha", GPT_OSS_ALPHA)
    if alpha != GPT_OSS_ALPHA:
        raise MoespecError(f"swiglu_alpha={alpha} is not supported (only {GPT_OSS_ALPHA})")
    bias = bool(cfg.get("attention_bias", True))
    return ModelSpec(
        **_common(cfg),
        num_experts=cfg["num_local_experts"],
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=cfg["intermediate_size"],
        router="softmax_topk_renorm",
        moe_layers=(True,) * cfg["num_hidden_layers"],
        router_bias=True,
        expert_act="clamped_swiglu",
        swiglu_limit=float(cfg.get("swiglu_limit", 7.0)),
        expert_bias=True,
        attention_bias=bias,
        attention_out_bias=bias,
        attention_sinks=True,
        layer_sliding_windows=_gpt_oss_windows(cfg),
    )


def _first_k_dense(cfg: dict[str, Any]) -> tuple[bool, ...]:
    """DeepSeek's rule: layers [0, first_k_dense_replace) are dense, every later one MoE."""
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:  # the reference (transformers) ignores it; DeepSeek's own code skips layers off the step
        raise MoespecError(f"moe_layer_freq={freq} is not supported (only 1: every layer from "
                           "first_k_dense_replace on is an MoE layer)")
    first, n = cfg.get("first_k_dense_replace") or 0, cfg["num_hidden_layers"]
    if first >= n:
        raise MoespecError(f"first_k_dense_replace={first} leaves no MoE layer among num_hidden_layers={n}")
    return tuple(i >= first for i in range(n))


SCORING = {"softmax_group_topk": "softmax", "sigmoid_group_topk": "sigmoid"}


def _deepseek_moe(cfg: dict[str, Any], router: str, groups: int, topk_groups: int, **specifics: Any) -> ModelSpec:
    """The MoE part DeepSeek-V2/V3, Kimi-K2 and GLM-4.5 share: routed experts chosen in float32
    (optionally within groups), `n_shared_experts` shared experts fused into one MLP, dense first layers."""
    scoring = cfg.get("scoring_func", SCORING[router])  # DeepSeek's own configs name it; transformers assumes it
    if scoring != SCORING[router]:
        raise MoespecError(f"scoring_func {scoring!r} is not supported for {cfg['model_type']} "
                           f"(only {SCORING[router]!r})")
    n = cfg["n_routed_experts"]
    if groups < 1 or n % groups or not 1 <= topk_groups <= groups:
        raise MoespecError(f"n_group={groups}, topk_group={topk_groups} do not split n_routed_experts={n} into "
                           "equal groups of which topk_group are kept")
    if router == "sigmoid_group_topk" and groups > 1 and n // groups < 2:  # a group scores by its best two
        raise MoespecError(f"n_group={groups} leaves fewer than 2 of n_routed_experts={n} per group")
    width = cfg["moe_intermediate_size"]
    return ModelSpec(
        **{**_common(cfg), **specifics},
        num_experts=n,
        top_k=cfg["num_experts_per_tok"],
        expert_intermediate_size=width,
        router=router,
        moe_layers=_first_k_dense(cfg),
        dense_intermediate_size=cfg["intermediate_size"],
        shared_expert_intermediate_size=(cfg.get("n_shared_experts") or 0) * width,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        n_group=groups,
        topk_group=topk_groups,
        router_float32=True,
    )


def _mla(cfg: dict[str, Any], interleave: bool) -> dict[str, Any]:
    """Multi-head latent attention's shapes: every head has its own keys and values (expanded from
    one latent), so there are as many key/value heads as query heads."""
    nope, rope_dim = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"]
    return dict(attention="mla", num_kv_heads=cfg["num_attention_heads"], head_dim=nope + rope_dim,
                rope=rope_from_config(cfg, dim=rope_dim, interleave=interleave),
                q_lora_rank=cfg.get("q_lora_rank") or 0, kv_lora_rank=cfg["kv_lora_rank"],
                qk_nope_head_dim=nope, v_head_dim=cfg["v_head_dim"],
                attention_bias=bool(cfg.get("attention_bias", False)))


def _deepseek_v3(cfg: dict[str, Any]) -> ModelSpec:
    """DeepSeek-V3/R1 and Kimi-K2: sigmoid router with correction bias and group limit, MLA."""
    method = cfg.get("topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise MoespecError(f"topk_method {method!r} is not supported for {cfg['model_type']} (only 'noaux_tc')")
    return _deepseek_moe(cfg, "sigmoid_group_topk", cfg.get("n_group") or 1, cfg.get("topk_group") or 1,
                         **_mla(cfg, interleave=bool(cfg.get("rope_interleave", True))),
                         norm_topk_prob=bool(cfg.get("norm_topk_prob", True)), router_correction_bias=True)


DEEPSEEK_V2_TOPK = ("greedy", "group_limited_greedy")


def _deepseek_v2(cfg: dict[str, Any]) -> ModelSpec:
    """DeepSeek-V2 (and V2-Lite, without q_lora): softmax router, greedy or limited to the groups
    with the best single scores, never renormalised; MLA with its rope always on interleaved pairs."""
    method = cfg.get("topk_method", "greedy")
    if method not in DEEPSEEK_V2_TOPK:
        raise MoespecError(f"topk_method {method!r} is not supported for deepseek_v2 "
                           f"(supported: {', '.join(DEEPSEEK_V2_TOPK)})")
    if cfg.get("norm_topk_prob"):  # transformers' DeepSeek-V2 never renormalises; DeepSeek's code would
        raise MoespecError("norm_topk_prob=true is not supported for deepseek_v2 (the reference does not renormalise)")
    if cfg.get("mlp_bias"):
        raise MoespecError("mlp_bias=true is not supported for deepseek_v2")
    groups = (cfg.get("n_group") or 1, cfg.get("topk_group") or 1) if method == "group_limited_greedy" else (1, 1)
    return _deepseek_moe(cfg, "softmax_group_topk", *groups, **_mla(cfg, interleave=True))


def _glm4_moe(cfg: dict[str, Any]) -> ModelSpec:
    """GLM-4.5: DeepSeek-V3's router and shared experts, with GQA attention, partial rotary
    (half the head by default, as transformers), q/k/v biases and optional per-head q/k norms."""
    head_dim = _get(cfg, "head_dim", default=cfg["hidden_size"] // cfg["num_attention_heads"])
    factor = _get(cfg.get("rope_parameters") or {}, "partial_rotary_factor",
                  default=cfg.get("partial_rotary_factor", 0.5))
    return _deepseek_moe(cfg, "sigmoid_group_topk", cfg.get("n_group") or 1, cfg.get("topk_group") or 1,
                         rope=rope_from_config(cfg, dim=int(head_dim * factor)),
                         attention_bias=bool(cfg.get("attention_bias", False)),
                         qk_norm="head" if cfg.get("use_qk_norm") else "none",
                         norm_topk_prob=bool(cfg.get("norm_topk_prob", True)), router_correction_bias=True)


def _layer_ids(cfg: dict[str, Any], field_name: str, ids: list[int]) -> tuple[int, ...]:
    """Layer ids named by config field `field_name`, each checked to be a layer of the model."""
    layers = cfg["num_hidden_layers"]
    bad = [i for i in ids if not 0 <= i < layers]
    if bad:
        raise MoespecError(f"{field_name} names layer {bad[0]}, but the model has {layers} layers")
    return tuple(sorted(set(ids)))


LLAMA4_LAYER_TYPES = ("full_attention", "chunked_attention")


def _llama4_text(cfg: dict[str, Any]) -> ModelSpec:
    """Llama-4's text model (Llama4ForCausalLM). Missing fields take transformers' Llama4TextConfig
    defaults, as the reference would: every 4th layer NoPE, the others chunked (when
    attention_chunk_size is set) with q/k L2 norms, query temperature on the NoPE layers."""
    layers = cfg["num_hidden_layers"]
    interval = cfg.get("no_rope_layer_interval", 4)
    uses_rope = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]  # 1 = rotary
    if len(uses_rope) < layers:
        raise MoespecError(f"no_rope_layers has {len(uses_rope)} entries, but the model has {layers} layers")
    chunk = cfg.get("attention_chunk_size", 8192)
    types = cfg.get("layer_types") or \
        ["chunked_attention" if rope and chunk is not None else "full_attention" for rope in uses_rope[:layers]]
    unknown = [t for t in types if t not in LLAMA4_LAYER_TYPES]
    if unknown:
        raise MoespecError(f"layer_types value {unknown[0]!r} is not supported "
                           f"(supported: {', '.join(LLAMA4_LAYER_TYPES)})")
    if "chunked_attention" in types and not chunk:
        raise MoespecError(f"layer_types has chunked_attention layers but attention_chunk_size is {chunk!r}")
    step = cfg.get("interleave_moe_layer_step", 1)
    moe = _layer_ids(cfg, "moe_layers", cfg["moe_layers"] if cfg.get("moe_layers") is not None
                     else list(range(step - 1, layers, step)))
    bias = bool(cfg.get("attention_bias", False))
    return ModelSpec(
        **{**_common(cfg), "rope": rope_from_config(cfg, interleave=True)},  # rotary on complex pairs
        num_experts=cfg["num_local_experts"],
        top_k=cfg.get("num_experts_per_tok", 1),
        expert_intermediate_size=cfg["intermediate_size"],
        router="sigmoid_topk_input",
        router_scales_input=True,
        moe_layers=tuple(i in moe for i in range(layers)),
        dense_intermediate_size=cfg.get("intermediate_size_mlp", 16384),
        shared_expert_intermediate_size=cfg["intermediate_size"],
        attention_bias=bias,
        attention_out_bias=bias,
        qk_norm="l2" if cfg.get("use_qk_norm", True) else "none",
        nope_layers=tuple(i for i in range(layers) if not uses_rope[i]),
        chunked_layers=tuple(i for i, t in enumerate(types[:layers]) if t == "chunked_attention"),
        attention_chunk_size=int(chunk or 0),
        attn_temperature=(float(cfg.get("floor_scale", 8192)), float(cfg.get("attn_scale", 0.1)))
        if cfg.get("attn_temperature_tuning", True) else None,
    )


def _llama4(cfg: dict[str, Any]) -> ModelSpec:
    """Llama4ForConditionalGeneration (Meta's Llama-4 releases): its text model, `text_config`,
    whose tensors sit under `language_model.`; the vision tower is not read (text prompts only)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise MoespecError("config.json for llama4 has no text_config object (the text model's settings)")
    return replace(_llama4_text({**text, "model_type": "llama4_text"}), weights_prefix="language_model.")


PARSERS: dict[str, Callable[[dict[str, Any]], ModelSpec]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "switch_transformers": _switch_transformers,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
    "kimi_k2": _deepseek_v3,  # Kimi-K2 ships DeepseekV3ForCausalLM under its own model_type
    "deepseek_v2": _deepseek_v2,
    "glm4_moe": _glm4_moe,
    "llama4_text": _llama4_text,
    "llama4": _llama4,
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
