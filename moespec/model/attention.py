"""Grouped-query attention with rotary embeddings (model/rope.py), optional q/k norms, sliding windows
(one for the model or one per layer) and attention sinks (gpt-oss), over the KV cache; per layer,
Llama-4's NoPE layers (no rotary, query temperature instead) and chunked attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec import ModelSpec
from .kv_cache import KVCache
from .rope import rotate


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (as the reference does), result cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                   sinks: torch.Tensor) -> torch.Tensor:
    """Softmax attention whose every row also holds one learned logit per head, `sinks` [heads],
    that takes probability mass but contributes no value (gpt-oss): a head may attend to nothing.
    q [B, heads, T, D], keys/values [B, heads, S, D], mask [B, 1, T, S] -> [B, heads, T, D].
    SDPA has no such logit, so the softmax is written out."""
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs @ values


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS norm without a weight over the last dim, in float32 (Llama-4's q/k norm)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


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

    @property
    def kv_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Per-token cache entries: keys and values [kv_heads, head_dim]."""
        return (self.spec.num_kv_heads, self.spec.head_dim), (self.spec.num_kv_heads, self.spec.head_dim)

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache, rows: torch.Tensor,
                positions: torch.Tensor, valid: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec = self.spec
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.clip_qkv is not None:
            q, k, v = (t.clamp(-spec.clip_qkv, spec.clip_qkv) for t in (q, k, v))
        q = q.view(B, T, spec.num_heads, spec.head_dim)
        k = k.view(B, T, spec.num_kv_heads, spec.head_dim)
        v = v.view(B, T, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if layer not in spec.nope_layers:
            cos, sin = rope
            q, k = rotate(q, cos, sin, spec.rope.interleave), rotate(k, cos, sin, spec.rope.interleave)
            if spec.qk_norm == "l2":
                q, k = l2_norm(q, spec.rms_norm_eps), l2_norm(k, spec.rms_norm_eps)
        elif spec.attn_temperature is not None:
            q = (q * query_temperature(positions, *spec.attn_temperature)[:, :, None, None]).to(q.dtype)

        cache.write(layer, rows, positions, valid, k, v)
        upto = int(positions[valid].max()) + 1 if bool(valid.any()) else 1
        keys, values = cache.read(layer, rows, upto)
        key_pos = torch.arange(upto, device=x.device)
        mask = key_pos[None, None, :] <= positions[:, :, None]  # [B, T, upto]: causal per row
        window = spec.window(layer)
        if window is not None:
            mask &= key_pos[None, None, :] > positions[:, :, None] - window
        if layer in spec.chunked_layers:  # only keys in the query's own chunk
            chunk = spec.attention_chunk_size
            mask &= key_pos[None, None, :] // chunk == positions[:, :, None] // chunk
        groups = spec.num_heads // spec.num_kv_heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
        if self.sinks is not None:
            out = sink_attention(q.transpose(1, 2), keys, values, mask[:, None], self.sinks)
        else:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
