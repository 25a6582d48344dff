"""The decoder-only MoE transformer: embeddings, blocks (attention then feed-forward), final norm, head.

Parameter names follow the checkpoints' (minus the "model." prefix) so loading is a plain
state-dict assignment. Routed experts are not parameters: MoE blocks ask an ExpertProvider.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.base import ExpertProvider
from ..spec import ModelSpec
from .attention import Attention, RMSNorm
from .rope import Rotary
from ..hooks import ForwardHooks
from .kv_cache import KVCache, LayerKV, StepPositions
from .mla import MLA
from .moe import MLP, MoE

if TYPE_CHECKING:  # compiled.py builds on this module
    from .compiled import CompiledLayers


class BeforeExperts(NamedTuple):
    """A layer's state when its experts are about to be fetched (Block.forward's output)."""

    x: torch.Tensor  # [B, T, H] the residual after attention
    h: torch.Tensor  # [B, T, H] the feed-forward's input (normed)
    weights: torch.Tensor | None = None  # [tokens, k] float32 the real tokens' routing (None: a dense layer) ...
    ids: torch.Tensor | None = None  # [tokens, k] ... and its expert ids
    shared: torch.Tensor | None = None  # [tokens, H] the shared expert's output, where the layer has one


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn: Attention | MLA = MLA(spec) if spec.attention == "mla" else Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp: MoE | MLP = MoE(spec, layer) if spec.moe_layers[layer] \
            else MLP(spec.hidden_size, spec.dense_intermediate_size)

    def forward(self, x: torch.Tensor, kv: LayerKV, step: StepPositions, rope: tuple[torch.Tensor, torch.Tensor]
                ) -> BeforeExperts:
        """Everything of this layer that comes before its experts are fetched (what a compiled layer
        computes: model/compiled.py). Only real tokens are routed: padding never reaches the experts."""
        x = x + self.self_attn(self.input_layernorm(x), self.layer, kv, step, rope)
        h = self.post_attention_layernorm(x)
        if not isinstance(self.mlp, MoE):
            return BeforeExperts(x, h)
        tokens = step.select_valid(h)
        weights, ids = self.mlp.route(tokens)
        return BeforeExperts(x, h, weights, ids, self.mlp.shared(tokens))

    def feed_forward(self, state: BeforeExperts, step: StepPositions, experts: ExpertProvider,
                     hooks: list[ForwardHooks]) -> torch.Tensor:
        """The residual after this layer, from `forward`'s output."""
        x, h = state.x, state.h
        if state.weights is None:
            return x + self.mlp(h)
        out = self.mlp(step.select_valid(h), state.weights, state.ids, state.shared, experts, hooks)
        if step.all_valid:
            return x + out.view_as(h)
        padded = torch.zeros_like(h)
        padded[step.valid] = out
        return x + padded

    def router_logits(self, residual: torch.Tensor) -> torch.Tensor:
        """This MoE layer's pre-MoE norm and router applied to any residual [..., H] -> logits [..., E]:
        what speculation asks of a later layer about an earlier hidden state."""
        return self.mlp.gate(self.post_attention_layernorm(residual))


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = Rotary(spec.rope, spec.head_dim)
        self.hooks: list[ForwardHooks] = []
        self.compiled: CompiledLayers | None = None  # decode steps' Block.forward, compiled (model/compiled.py)
        # what other parts derive from files for this model and keep as long as it lives, by a key
        # of theirs (estimator heads: speculate/estimators.py)
        self.kept: dict[tuple, Any] = {}

    def forward(self, tokens: torch.Tensor, cache: KVCache, experts: ExpertProvider,
                rows: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens [B, T] appended after each cache row's current length; return final hidden [B, T, H].

        rows [B]: which cache rows the batch occupies (default: the first B). valid [B, T]: which
        tokens are real (default: all); a row's valid tokens must come first. The cache lengths
        advance by the number of valid tokens per row.
        """
        if self.compiled is not None and not self.hooks:  # no hook to see the layers: maybe one compiled call
            hidden = self.compiled.run_one_row(tokens, cache, experts, rows, valid)
            if hidden is not None:
                return hidden
        B, T = tokens.shape
        if rows is None:
            rows = torch.arange(B, device=tokens.device)
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        start = cache.lengths[rows]
        positions = start[:, None] + torch.arange(T, device=tokens.device)
        step = StepPositions.of(rows, positions, valid)
        if step.upto > cache.max_len:
            raise ValueError(f"sequence exceeds the KV cache length {cache.max_len}")
        # the hooks that watch this pass's layers (a hook with nothing to do in it sits out)
        hooks = [hook for hook in self.hooks if hook.forward_start(rows, positions, valid) is not False]
        x = self.embed_tokens(tokens)
        rope = self.rotary(positions, x.dtype)
        compiled = self.compiled.step(tokens, step) if self.compiled is not None else None  # None: eager
        for i, block in enumerate(self.layers):
            for hook in hooks:
                hook.layer_start(i)
            kv = cache.layers[i]
            state = block.forward(x, kv, step, rope) if compiled is None else compiled(i, x, kv, rope)
            for hook in hooks:
                hook.after_attention(i, state.x, valid)
            x = block.feed_forward(state, step, experts, hooks)
            for hook in hooks:
                hook.layer_end(i)
        cache.lengths[rows] = start + valid.sum(dim=1)
        return self.norm(x)

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        """An empty KV cache for `rows` sequences of up to `max_len` tokens, shaped for this model's attention."""
        weight = self.embed_tokens.weight
        return KVCache(self.spec.num_layers, rows, max_len, *self.layers[0].self_attn.kv_shapes,
                       weight.dtype, weight.device)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (float32) for final hidden states [..., H]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
