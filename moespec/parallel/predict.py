"""Load prediction for the next batch: what to replicate before the batch arrives.

Two sources, blended by `LoadForecast`:
- history: an exponential moving average of the per-layer expert loads actually observed
  (the "static" policy uses only this; it lags whenever traffic shifts);
- a `NextBatchPredictor` that reads the next batch's token ids while the current batch computes
  (the "predictive" policy), guessing each token's experts per layer:
  * `RouterLookahead` applies every MoE layer's own router, through the layer's pre-MoE norm, to
    the token embeddings: no training, one [H, E] product per layer, but blind to context;
  * `RoutingMemory` remembers, per layer and token id, the experts the model actually routed that
    id to (learned online from the batches served) and predicts an id's most frequent experts,
    falling back to the lookahead for ids it has not seen. Routing is largely a function of the
    token id, so this is the stronger predictor; it costs [vocab, experts] counts per MoE layer.
Guesses are per-token distributions over experts (k expected choices per token), counted per
sequence under Switch's expert capacity: an expert takes at most `capacity` of a sequence's tokens.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from ..hooks import ForwardHooks
from ..model.switch import SparseMLP, SwitchTransformer
from ..spec import ModelSpec
from .workload import Batch

Routes = dict[int, torch.Tensor]  # MoE layer -> expected choices [B, S, E] (each token's row sums to k)


class NextBatchPredictor(Protocol):
    def expert_counts(self, batch: Batch) -> torch.Tensor:
        """Predicted routed (token, choice) pairs per expert for `batch`: [MoE layers, experts] float."""
        ...


def layer_tokens(spec: ModelSpec, batch: Batch) -> dict[int, torch.Tensor]:
    """The token ids [B, S] whose hidden states each MoE layer routes (Switch: decoder layers route decoder tokens)."""
    return {layer: batch.decoder_tokens if layer >= spec.num_encoder_layers > 0 else batch.tokens
            for layer in spec.moe_layer_ids}


def count_routes(spec: ModelSpec, routes: Routes) -> torch.Tensor:
    """[MoE layers, E] expected pairs per expert; per sequence, capacity caps each expert's count
    (exactly what Switch keeps when the guesses are one-hot)."""
    counts = []
    for layer in spec.moe_layer_ids:
        per_sequence = routes[layer].sum(dim=1)  # [B, E]
        if spec.expert_capacity > 0:
            per_sequence = per_sequence.clamp(max=spec.expert_capacity)
        counts.append(per_sequence.sum(dim=0))
    return torch.stack(counts).float()


def one_hot_choices(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids [B, S, k] -> [B, S, E] choices."""
    return torch.nn.functional.one_hot(ids, num_experts).sum(dim=-2).float()


class RouterLookahead:
    """Each MoE layer's router applied to the token embeddings."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.inference_mode()
    def routes(self, batch: Batch) -> Routes:
        model, spec = self.model, self.model.spec
        out = {}
        if isinstance(model, SwitchTransformer):
            for stack, offset in ((model.encoder, 0), (model.decoder, spec.num_encoder_layers)):
                for i, block in enumerate(stack.block):
                    ff = block.layer[-1]
                    if isinstance(ff.mlp, SparseMLP):
                        tokens = layer_tokens(spec, batch)[offset + i]
                        _, ids = ff.mlp.rule.select(ff.router_logits(model.embed(stack, tokens)))
                        out[offset + i] = one_hot_choices(ids.view(*tokens.shape, 1), spec.num_experts)
            return out
        x = model.embed_tokens(batch.tokens)
        for layer in spec.moe_layer_ids:
            block = model.layers[layer]
            _, ids = block.mlp.router.select(block.router_logits(x))
            out[layer] = one_hot_choices(ids, spec.num_experts)
        return out

    def expert_counts(self, batch: Batch) -> torch.Tensor:
        return count_routes(self.model.spec, self.routes(batch))


class RoutingMemory(ForwardHooks):
    """Per MoE layer, how often each token id went to each expert. A forward hook: add it to the
    model's hooks and call `watch(batch)` before each forward so it knows whose routes it sees;
    `learn()` afterwards adds what every worker saw, so all workers keep the same memory."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None = None):
        spec = model.spec
        self.spec, self.group, self.lookahead = spec, group, RouterLookahead(model)
        self.layers = {layer: i for i, layer in enumerate(spec.moe_layer_ids)}
        self.counts = torch.zeros(len(self.layers), spec.vocab_size, spec.num_experts,
                                  device=next(model.parameters()).device)
        self._tokens: dict[int, torch.Tensor] = {}
        self._seen: list[torch.Tensor] = []  # (layer index, token id, expert) rows since the last learn()

    def watch(self, batch: Batch) -> None:
        self._tokens = {layer: t.flatten() for layer, t in layer_tokens(self.spec, batch).items()}

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self._tokens[layer]
        if len(tokens) != len(ids):
            raise ValueError(f"layer {layer} routed {len(ids)} rows for {len(tokens)} watched tokens (padding?)")
        index = torch.full_like(ids, self.layers[layer])
        self._seen.append(torch.stack([index, tokens[:, None].expand_as(ids), ids], dim=-1).view(-1, 3))
        return weights, ids

    def learn(self) -> None:
        """Count the routes seen since the last call, every worker's (one all-gather) if distributed."""
        seen = torch.cat(self._seen) if self._seen else self.counts.new_zeros(0, 3, dtype=torch.long)
        self._seen = []
        if dist.is_initialized():
            world = dist.get_world_size(self.group)
            sizes = [torch.zeros(1, dtype=torch.long, device=seen.device) for _ in range(world)]
            dist.all_gather(sizes, torch.tensor([len(seen)], device=seen.device), group=self.group)
            longest = int(max(sizes))
            gathered = [seen.new_zeros(longest, 3) for _ in range(world)]
            dist.all_gather(gathered, torch.cat([seen, seen.new_zeros(longest - len(seen), 3)]), group=self.group)
            seen = torch.cat([g[:int(n)] for g, n in zip(gathered, sizes)])
        self.counts.index_put_(tuple(seen.T), torch.ones(len(seen), device=seen.device), accumulate=True)

    def expert_counts(self, batch: Batch) -> torch.Tensor:
        """Each seen token's experts in proportion to where it went before; the lookahead's otherwise."""
        routes = self.lookahead.routes(batch)
        for layer, tokens in layer_tokens(self.spec, batch).items():
            table = self.counts[self.layers[layer]][tokens]  # [B, S, E]
            seen = table.sum(dim=-1, keepdim=True)
            remembered = self.spec.top_k * table / seen.clamp(min=1)
            routes[layer] = torch.where(seen > 0, remembered, routes[layer])
        return count_routes(self.spec, routes)


class LoadForecast:
    """Per-layer expert loads [MoE layers, E] to plan the next batch for.

    decay: weight of the past in the moving average of observed loads. lookahead_weight: share of
    the predictor's view of the next batch when there is one (the history is rescaled to the same
    number of tokens first, so the two mix as distributions).
    """

    def __init__(self, decay: float = 0.5, lookahead_weight: float = 0.5):
        if not 0.0 <= decay < 1.0 or not 0.0 <= lookahead_weight <= 1.0:
            raise ValueError(f"decay must be in [0, 1) and lookahead_weight in [0, 1], got {decay}, {lookahead_weight}")
        self.decay, self.lookahead_weight = decay, lookahead_weight
        self.history: torch.Tensor | None = None

    def observe(self, loads: torch.Tensor) -> None:
        loads = loads.double()
        self.history = loads if self.history is None else self.decay * self.history + (1 - self.decay) * loads

    def forecast(self, predicted: torch.Tensor | None) -> torch.Tensor | None:
        """Loads to plan for, or None when there is nothing to go on yet (keep the placement)."""
        if predicted is None or self.history is None:
            return self.history if predicted is None else predicted.double()
        predicted = predicted.double()
        scale = predicted.sum(dim=1, keepdim=True) / self.history.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return self.lookahead_weight * predicted + (1 - self.lookahead_weight) * self.history * scale


def forecast_error(forecast: torch.Tensor, actual: torch.Tensor) -> float:
    """Mean over layers of the total variation distance between forecast and actual load shares (0 = exact)."""
    p = forecast.double() / forecast.sum(dim=1, keepdim=True).clamp(min=1e-12)
    q = actual.double() / actual.sum(dim=1, keepdim=True).clamp(min=1e-12)
    return float(0.5 * (p - q).abs().sum(dim=1).mean())
