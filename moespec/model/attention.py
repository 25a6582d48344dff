"""Grouped-query attention with rotary embeddings (model/rope.py), optional q/k norms, sliding windows
(one for the model or one per layer) and attention sinks (gpt-oss), over the KV cache; per layer,
Llama-4's NoPE layers (no rotary, query temperature instead) and chunked attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import ModelSpec
from .kv_cache import LayerKV, StepPositions
from .rope import rotate
from .stacked import stack_linears


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (as the reference does), result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm` with the given weight. Written out: at one token, faster than F.rms_norm on this
    project's CPU (torch 2.13)."""
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                   sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention whose every row also holds one learned logit per head, `sinks` [heads],
    that takes probability mass but contributes no value (gpt-oss): a head may attend to nothing.
    q [B, heads, T, D], keys/values [B, heads, S, D], mask [B, 1, T, S] (None: all visible) ->
    [B, heads, T, D]. SDPA has no such logit, so the softmax is written out."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs @ values


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight over the last dim, in float32 (Llama-4's q/k norm)."""
    return F.rms_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def query_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """Llama-4's query scale [B, T] on NoPE layers, growing with the position: without rotary,
    attention would flatten over long contexts (arXiv 2501.19399)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.spec = spec
        self.q_proj = nn.Linear(h, spec.num_heads * d, bias=spec.attention_bias)
        self.k_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.attention_bias)
        self.v_proj = nn.Linear(h, spec.num_kv_heads * d, bias=spec.attention_bias)
        self.o_proj = nn.Linear(spec.num_heads * d, h, bias=spec.attention_out_bias)
        self.sinks = nn.Parameter(torch.zeros(spec.num_heads)) if spec.attention_sinks else None
        if spec.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(d, spec.rms_norm_eps), RMSNorm(d, spec.rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(spec.num_heads * d, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.num_kv_heads * d, spec.rms_norm_eps)
        # set by fuse_projections; plain tensors, not parameters: the projections' parameters are views of them
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    def fuse_projections(self) -> None:
        """q, k and v as one matmul (model/stacked.py). Called once the weights are loaded."""
        self.qkv_weight, self.qkv_bias = stack_linears(self.q_proj, self.k_proj, self.v_proj)

    def heads(self, qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rotary: bool,
              rope: tuple[torch.Tensor, torch.Tensor], step: StepPositions
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, T, heads, D], k and v [B, T, kv_heads, D] with the family's q/k norms, clipping,
        rotary or (on a NoPE layer) query temperature applied."""
        spec = self.spec
        q, k, v = qkv
        if spec.qk_norm == "full":
            q = self.q_norm(q.flatten(2)).view_as(q)
            k = self.k_norm(k.flatten(2)).view_as(k)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        if spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if rotary:
            cos, sin = rope
            q, k = rotate(q, cos, sin, spec.rope.interleave), rotate(k, cos, sin, spec.rope.interleave)
            if spec.qk_norm == "l2":
                q, k = l2_norm(q, spec.rms_norm_eps), l2_norm(k, spec.rms_norm_eps)
        elif spec.attn_temperature is not None:
            q = (q * query_temperature(step.positions, *spec.attn_temperature)[:, :, None, None]).to(q.dtype)
        return q, k, v

    @property
    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-token cache entries: keys and values [kv_heads, head_dim]."""
        return (self.spec.num_kv_heads, self.spec.head_dim), (self.spec.num_kv_heads, self.spec.head_dim)

    def forward(self, x: torch.Tensor, layer: int, kv: LayerKV, step: StepPositions,
                rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        B, T, _ = x.shape
        counts = [spec.num_heads, spec.num_kv_heads, spec.num_kv_heads]  # q, k and v heads
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(B, T, sum(counts), spec.head_dim)
        rotary = layer not in spec.nope_layers
        if rotary and spec.qk_norm == "none" and spec.clip_qkv is None:  # q and k rotate as one tensor
            qk, v = qkv.split([counts[0] + counts[1], counts[2]], dim=2)
            q, k = rotate(qk, *rope, spec.rope.interleave).split(counts[:2], dim=2)
        else:
            q, k, v = self.heads(qkv.split(counts, dim=2), rotary, rope, step)

        kv.write(step, k, v)
        keys, values = kv.read(step)  # [B, kv_heads, upto, D]
        chunk = spec.attention_chunk_size if layer in spec.chunked_layers else None  # keys of the query's chunk only
        window = spec.window(layer)
        mask = step.mask(window, chunk)
        if self.sinks is not None:
            out = sink_attention(q.transpose(1, 2), keys, values, mask, self.sinks)
        elif step.square and window is None and chunk is None:  # a fresh prefill: SDPA skips the masked half
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, is_causal=True, enable_gqa=True)
        else:  # SDPA shares each kv head among its query heads itself: no repeated copy of the keys
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
