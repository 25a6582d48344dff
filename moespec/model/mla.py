"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2) over a KV cache of latents.

Each token's keys and values are one compressed latent c [kv_lora_rank] (after its RMSNorm)
expanded per head by kv_b_proj, plus one rotary key k_rope [qk_rope_head_dim] every head shares.
The cache stores exactly (c, k_rope) per token, one "head" each, not the per-head keys and
values: the point of MLA is a cache of (kv_lora_rank + qk_rope_head_dim) numbers per token and
layer instead of 2 * heads * head_dim.

Attention runs on the latents directly ("absorbed" form): kv_b_proj's key half W_uk [H, nope, r]
folds into the query (q_nope W_uk, a query in latent space), its value half W_uv [H, v, r] applies
after the weighted sum. So a decode step costs O(context * H * r) and never expands the cache;
the scores and outputs equal the expanded form's (k_nope = W_uk c, v = W_uv c) up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import ModelSpec
from .attention import RMSNorm
from .kv_cache import LayerKV, StepPositions
from .rope import rotate, yarn_mscale

LATENT_NORM_EPS = 1e-6  # q_a_layernorm, kv_a_layernorm: the reference's default, not rms_norm_eps


def softmax_scale(spec: ModelSpec) -> float:
    """1/sqrt(query-key dims), times YaRN's mscale(factor, mscale_all_dim) squared when the rope
    is scaled: the softmax temperature DeepSeek's long-context checkpoints were trained with."""
    scale = spec.head_dim ** -0.5
    if spec.rope.kind != "default" and spec.rope.mscale_all_dim:
        scale *= yarn_mscale(spec.rope.factor, spec.rope.mscale_all_dim) ** 2
    return scale


class MLA(nn.Module):
    """Queries through q_lora_rank (q_a_proj, q_a_layernorm, q_b_proj) or a plain q_proj; keys and
    values from kv_a_proj_with_mqa -> (latent, rotary key), kv_a_layernorm on the latent, kv_b_proj.
    Rotary embedding only on the last qk_rope_head_dim dims of each query head and on the shared key."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, heads, rank = spec.hidden_size, spec.num_heads, spec.kv_lora_rank
        self.spec, self.scale = spec, softmax_scale(spec)
        self.nope, self.rope_dim, self.v_dim = spec.qk_nope_head_dim, spec.head_dim - spec.qk_nope_head_dim, spec.v_head_dim
        if spec.q_lora_rank:
            self.q_a_proj = nn.Linear(h, spec.q_lora_rank, bias=spec.attention_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, heads * spec.head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(h, heads * spec.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, rank + self.rope_dim, bias=spec.attention_bias)
        self.kv_a_layernorm = RMSNorm(rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, h, bias=spec.attention_bias)

    @property
    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-token cache entries: the normed latent [1, kv_lora_rank] and the rotary key [1, rope dims]."""
        return (1, self.spec.kv_lora_rank), (1, self.rope_dim)

    def query(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.q_lora_rank:
            return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        return self.q_proj(x)

    def forward(self, x: torch.Tensor, layer: int, kv: LayerKV, step: StepPositions,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        B, T, _ = x.shape
        q_nope, q_rope = self.query(x).view(B, T, spec.num_heads, spec.head_dim).split([self.nope, self.rope_dim], -1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([spec.kv_lora_rank, self.rope_dim], -1)
        cos, sin = rope
        q_rope = rotate(q_rope, cos, sin, spec.rope.interleave)  # [B, T, H, rope]
        k_rope = rotate(k_rope[:, :, None], cos, sin, spec.rope.interleave)  # [B, T, 1, rope]

        kv.write(step, self.kv_a_layernorm(latent)[:, :, None], k_rope)
        latents, keys = kv.read(step)  # [B, 1, upto, r], [B, 1, upto, rope]

        w_uk, w_uv = self.kv_b_proj.weight.view(spec.num_heads, self.nope + self.v_dim, -1).split(
            [self.nope, self.v_dim], dim=1)  # [H, nope, r], [H, v, r]
        query = torch.cat([torch.einsum("bthn,hnr->bhtr", q_nope, w_uk), q_rope.transpose(1, 2)], dim=-1)
        out = F.scaled_dot_product_attention(query, torch.cat([latents, keys], dim=-1), latents,
                                             attn_mask=step.mask(), scale=self.scale, enable_gqa=True)
        return self.o_proj(torch.einsum("bhtr,hvr->bthv", out, w_uv).reshape(B, T, -1))
