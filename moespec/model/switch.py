"""Switch Transformers: the T5-style encoder-decoder whose sparse feed-forward layers route top-1.

The seed paper of expert replication (Switch-base-128/256) runs this model, so moespec runs it
exactly as transformers does: relative position bias (computed by each stack's first layer and
shared by the others, no query scaling), RMS layer norms, ReLU MLPs ("wi", "wo"), and a sparse
feed-forward every N layers whose router sends each token to its most probable expert and drops
tokens beyond `expert_capacity` per expert *within each sequence* (so outputs of a row never
depend on the other rows of the batch). Parameter names are transformers' own, so a checkpoint
loads by plain state-dict assignment. Routed experts are not parameters: sparse layers ask an
ExpertProvider (or hand their tokens to a RoutedExecutor) by global layer id, encoder layers first.
Forward hooks (moespec.hooks) see every layer by the same ids; `route` sees each token's choice
before the capacity rule drops any.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.base import ExpertProvider, ExpertWeights
from ..hooks import ForwardHooks
from ..spec import ModelSpec
from .attention import RMSNorm
from .moe import RoutedExecutor, run_experts
from .routing import make_router, within_capacity


def relu_expert(x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
    """One Switch expert on tokens x [n, H]: wo(relu(wi x)); wi arrives in ExpertWeights.gate_up."""
    return F.linear(F.relu(F.linear(x, w.gate_up)), w.down)


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5's bucketing of key - query distances: exact for small distances, logarithmic up to max_distance."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets
        relative = relative.abs()
    else:
        relative = -torch.min(relative, torch.zeros_like(relative))
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(relative.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(relative < max_exact, relative, large)


class T5Attention(nn.Module):
    """Multi-head attention without query scaling; the first layer of a stack owns the position bias."""

    def __init__(self, spec: ModelSpec, relative_bias: bool, bidirectional: bool):
        super().__init__()
        inner = spec.num_heads * spec.head_dim
        self.heads, self.head_dim, self.bidirectional = spec.num_heads, spec.head_dim, bidirectional
        self.num_buckets, self.max_distance = spec.relative_attention_num_buckets, spec.relative_attention_max_distance
        self.q = nn.Linear(spec.hidden_size, inner, bias=False)
        self.k = nn.Linear(spec.hidden_size, inner, bias=False)
        self.v = nn.Linear(spec.hidden_size, inner, bias=False)
        self.o = nn.Linear(inner, spec.hidden_size, bias=False)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, spec.num_heads)

    def position_bias(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        """[1, heads, T, S] bias for queries at absolute positions [T] over keys 0..S-1."""
        keys = torch.arange(key_length, device=query_positions.device)
        bucket = relative_position_bucket(keys[None, :] - query_positions[:, None], self.bidirectional,
                                          self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def split(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, heads, T, head_dim]."""
        return proj(x).view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self.split(self.q, x), keys, values, attn_mask=bias.to(x.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class SelfAttentionLayer(nn.Module):
    def __init__(self, spec: ModelSpec, relative_bias: bool, bidirectional: bool):
        super().__init__()
        self.SelfAttention = T5Attention(spec, relative_bias, bidirectional)
        self.layer_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class CrossAttentionLayer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.EncDecAttention = T5Attention(spec, relative_bias=False, bidirectional=True)
        self.layer_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class DenseReluDense(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.wi = nn.Linear(spec.hidden_size, spec.dense_intermediate_size, bias=False)
        self.wo = nn.Linear(spec.dense_intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.relu(self.wi(x)))


class Router(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.classifier = nn.Linear(spec.hidden_size, spec.num_experts, bias=spec.router_bias)


class SparseMLP(nn.Module):
    """Top-1 router with per-sequence expert capacity, then the routed experts of global layer `layer`."""

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer, self.num_experts, self.capacity = layer, spec.num_experts, spec.expert_capacity
        self.router = Router(spec)  # transformers' module (router.classifier); the rule is `rule`
        self.rule = make_router(spec)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> logits [B*S, E] in float32, as the reference's router runs."""
        c = self.router.classifier
        bias = None if c.bias is None else c.bias.float()
        return F.linear(x.float(), c.weight.float(), bias).flatten(0, 1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> top-1 (weights, ids) [B*S, 1]."""
        return self.rule.select(self.router_logits(x))

    def forward(self, x: torch.Tensor, experts: ExpertProvider | RoutedExecutor,
                hooks: list[ForwardHooks]) -> torch.Tensor:
        B, S, H = x.shape
        weights, ids = self.route(x)
        for hook in hooks:
            weights, ids = hook.route(self.layer, x.reshape(B * S, H), weights, ids)
        keep = within_capacity(ids.view(B, S), self.num_experts, self.capacity).flatten()
        flat = x.reshape(B * S, H)
        out = torch.zeros_like(flat)
        out[keep] = run_experts(self.layer, flat[keep], weights[keep], ids[keep], experts, relu_expert)
        return out.view(B, S, H)


class FeedForwardLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.mlp = SparseMLP(spec, layer) if spec.moe_layers[layer] else DenseReluDense(spec)
        self.layer_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x: torch.Tensor, experts: ExpertProvider | RoutedExecutor,
                hooks: list[ForwardHooks]) -> torch.Tensor:
        h = self.layer_norm(x)
        return x + (self.mlp(h, experts, hooks) if isinstance(self.mlp, SparseMLP) else self.mlp(h))

    def router_logits(self, residual: torch.Tensor) -> torch.Tensor:
        """This sparse layer's norm and router applied to any residual [B, S, H] -> logits [B*S, E]."""
        return self.mlp.router_logits(self.layer_norm(residual))


class SwitchBlock(nn.Module):
    """transformers' layout: layer[0] self-attention, (decoder) layer[1] cross-attention, last the feed-forward."""

    def __init__(self, spec: ModelSpec, layer: int, decoder: bool, first: bool):
        super().__init__()
        sublayers = [SelfAttentionLayer(spec, relative_bias=first, bidirectional=not decoder)]
        if decoder:
            sublayers.append(CrossAttentionLayer(spec))
        sublayers.append(FeedForwardLayer(spec, layer))
        self.layer = nn.ModuleList(sublayers)


class Stack(nn.Module):
    def __init__(self, spec: ModelSpec, layers: range, decoder: bool):
        super().__init__()
        self.embed_tokens = None if spec.tie_word_embeddings else nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.block = nn.ModuleList(SwitchBlock(spec, i, decoder, first=i == layers.start) for i in layers)
        self.final_layer_norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def position_bias(self, query_positions: torch.Tensor, key_length: int) -> torch.Tensor:
        return self.block[0].layer[0].SelfAttention.position_bias(query_positions, key_length)


@dataclass
class SwitchCache:
    """Decoder state across steps: self-attention keys/values per layer and the encoder's projected keys/values."""

    length: int = 0
    self_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def padding_bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | float:
    """Additive key mask [B, 1, 1, S] from a [B, S] mask of real tokens (the reference's finfo.min fill)."""
    if mask is None:
        return 0.0
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class SwitchTransformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        enc = spec.num_encoder_layers
        self.shared = nn.Embedding(spec.vocab_size, spec.hidden_size) if spec.tie_word_embeddings else None
        self.encoder = Stack(spec, range(enc), decoder=False)
        self.decoder = Stack(spec, range(enc, spec.num_layers), decoder=True)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.hooks: list[ForwardHooks] = []  # layer ids are global: encoder layers first

    def _feed_forward(self, layer: int, block: SwitchBlock, x: torch.Tensor, valid: torch.Tensor,
                      experts: ExpertProvider | RoutedExecutor) -> torch.Tensor:
        """The feed-forward sublayer between the hooks that mark the rest of the layer."""
        for hook in self.hooks:
            hook.after_attention(layer, x, valid)
        x = block.layer[-1](x, experts, self.hooks)
        for hook in self.hooks:
            hook.layer_end(layer)
        return x

    def embed(self, stack: Stack, tokens: torch.Tensor) -> torch.Tensor:
        return (self.shared if stack.embed_tokens is None else stack.embed_tokens)(tokens)

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor | None,
               experts: ExpertProvider | RoutedExecutor) -> torch.Tensor:
        """Encoder output [B, S, H] for tokens [B, S]; mask [B, S] marks real tokens (None: all).

        Padding is attended to by nobody but is routed like any token, as in the reference, so it
        counts against expert capacity.
        """
        x = self.embed(self.encoder, tokens)
        S = tokens.shape[1]
        bias = self.encoder.position_bias(torch.arange(S, device=tokens.device), S) + padding_bias(mask, x.dtype)
        valid = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.bool()
        for layer, block in enumerate(self.encoder.block):
            for hook in self.hooks:
                hook.layer_start(layer)
            attn = block.layer[0]
            h = attn.layer_norm(x)
            a = attn.SelfAttention
            x = x + a(h, a.split(a.k, h), a.split(a.v, h), bias)
            x = self._feed_forward(layer, block, x, valid, experts)
        return self.encoder.final_layer_norm(x)

    def decode(self, tokens: torch.Tensor, encoded: torch.Tensor, mask: torch.Tensor | None, cache: SwitchCache,
               experts: ExpertProvider | RoutedExecutor) -> torch.Tensor:
        """Final decoder hidden states [B, T, H] for tokens [B, T] appended after `cache.length` tokens."""
        x = self.embed(self.decoder, tokens)
        T, past = tokens.shape[1], cache.length
        positions = torch.arange(past, past + T, device=tokens.device)
        causal = torch.arange(past + T, device=tokens.device)[None, :] > positions[:, None]
        self_bias = self.decoder.position_bias(positions, past + T) \
            + causal.to(x.dtype) * torch.finfo(x.dtype).min
        cross_bias = encoded.new_zeros(1, self.spec.num_heads, T, encoded.shape[1]) + padding_bias(mask, x.dtype)
        valid = torch.ones_like(tokens, dtype=torch.bool)
        for j, block in enumerate(self.decoder.block):
            layer = self.spec.num_encoder_layers + j
            for hook in self.hooks:
                hook.layer_start(layer)
            attn, cross = block.layer[:2]
            h = attn.layer_norm(x)
            a = attn.SelfAttention
            k, v = a.split(a.k, h), a.split(a.v, h)
            if j in cache.self_kv:
                k, v = (torch.cat([old, new], dim=2) for old, new in zip(cache.self_kv[j], (k, v)))
            cache.self_kv[j] = (k, v)
            x = x + a(h, k, v, self_bias)
            c = cross.EncDecAttention
            if j not in cache.cross_kv:
                cache.cross_kv[j] = (c.split(c.k, encoded), c.split(c.v, encoded))
            x = x + c(cross.layer_norm(x), *cache.cross_kv[j], cross_bias)
            x = self._feed_forward(layer, block, x, valid, experts)
        cache.length += T
        return self.decoder.final_layer_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32); tied embeddings rescale by d_model^-0.5 first, as Mesh TensorFlow did."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        return F.linear(hidden * self.spec.hidden_size ** -0.5, self.shared.weight).float()

    def score(self, tokens: torch.Tensor, decoder_tokens: torch.Tensor, experts: ExpertProvider | RoutedExecutor,
              mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] of decoder_tokens [B, T] given encoder tokens [B, S]."""
        encoded = self.encode(tokens, mask, experts)
        return self.logits(self.decode(decoder_tokens, encoded, mask, SwitchCache(), experts))

    def generate(self, tokens: torch.Tensor, experts: ExpertProvider | RoutedExecutor, max_new_tokens: int,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding [B, 1 + n] starting from decoder_start_token_id, as transformers' generate:
        a row that produced EOS continues with padding, and decoding ends when every row has."""
        spec = self.spec
        encoded = self.encode(tokens, mask, experts)
        cache = SwitchCache()
        out = torch.full((tokens.shape[0], 1), spec.decoder_start_token_id, dtype=torch.long, device=tokens.device)
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        eos = torch.tensor(spec.eos_token_ids, dtype=torch.long, device=tokens.device)
        for _ in range(max_new_tokens):
            nxt = self.logits(self.decode(out[:, -1:], encoded, mask, cache, experts))[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, spec.pad_token_id or 0), nxt)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos)
            if bool(done.all()):
                break
        return out
