"""Rotary position embeddings: inverse frequencies (default, YaRN, Llama-3 scaling) and their application.

A `Rope` (spec.py) says how many leading dims of a head rotate and how; `Rotary` turns absolute
positions [B, T] into (cos, sin) tables [B, T, 1, dim] and `rotate` applies them to q or k. No
buffers: a model built on the meta device needs nothing recomputed after loading.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..spec import Rope


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction for a context `scale` times the original."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(rope: Rope, dim: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Blend interpolated (divided by `factor`) and original frequencies: dims that rotate fewer
    than `beta_slow` times over the original context are interpolated, more than `beta_fast`
    kept, a linear ramp between."""
    base = rope.theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


def _llama3(rope: Rope, inv_freq: torch.Tensor) -> torch.Tensor:
    """Long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
    high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) \
        / (rope.high_freq_factor - rope.low_freq_factor)
    blended = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def inverse_frequencies(rope: Rope, dim: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim / 2] float32, scale of cos and sin) of `rope` rotating `dim` dims."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.kind == "yarn":
        scale = rope.attention_factor
        if scale is None:
            scale = yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim) \
                if rope.mscale and rope.mscale_all_dim else yarn_mscale(rope.factor)
        return _yarn(rope, dim, inv_freq), float(scale)
    if rope.kind == "llama3":
        return _llama3(rope, inv_freq), 1.0
    return inv_freq, 1.0


class Rotary(nn.Module):
    """cos/sin tables [B, T, 1, dim] (1: broadcast over heads) for absolute positions [B, T];
    frequencies computed once per device, tables once per forward pass for every layer."""

    def __init__(self, rope: Rope, head_dim: int):
        super().__init__()
        self.rope, self.dim = rope, head_dim if rope.dim is None else rope.dim
        self._freqs: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.device not in self._freqs:
            self._freqs[positions.device] = inverse_frequencies(self.rope, self.dim, positions.device)
        inv_freq, scale = self._freqs[positions.device]
        freqs = positions[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None]
        cos, sin = (emb.cos(), emb.sin()) if scale == 1.0 else (emb.cos() * scale, emb.sin() * scale)
        return cos.to(dtype), sin.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False) -> torch.Tensor:
    """x [B, T, heads, D] with its first cos.shape[-1] dims rotated by cos/sin [B, T, 1, dim]; the rest
    (partial rotary) pass through. `interleave`: the pairs are adjacent dims, and the output lays
    each rotated pair's two results out in halves (as DeepSeek's reference does)."""
    dim = cos.shape[-1]
    rot, rest = (x, None) if dim == x.shape[-1] else (x[..., :dim], x[..., dim:])
    if interleave:
        half_cos, half_sin = cos[..., : dim // 2], sin[..., : dim // 2]
        even, odd = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.cat([even * half_cos - odd * half_sin, odd * half_cos + even * half_sin], dim=-1)
    else:
        half = dim // 2
        rotated = rot * cos + torch.cat((-rot[..., half:], rot[..., :half]), dim=-1) * sin
    return rotated if rest is None else torch.cat([rotated, rest], dim=-1)
