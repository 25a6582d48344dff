"""Routing traces: for every token and MoE layer, the router's chosen experts and weights, and
optionally every layer's router input (the normed residual after attention) for estimator training.

A trace is an .npz file: `ids` [tokens, moe_layers, k] int16, `weights` [tokens, moe_layers, k]
float32, `previous` [tokens] int64 (the index of the token before it in its sequence, -1 for none:
estimators take that token's router inputs as context), optionally `hidden` [tokens, layers, H]
float16 and `guesses` [tokens, moe_layers, width]
int16 (a prefetch policy's depth-1 ranked guesses for that layer, -1 where none was made, e.g. the
first MoE layer), plus `moe_layers`, `num_experts`. The cost-model simulator replays traces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..hooks import ForwardHooks
from ..model.transformer import Transformer
from .context import PreviousToken
from .policy import Speculation, ranked_ids


@dataclass
class RoutingTrace:
    ids: np.ndarray  # [tokens, moe_layers, k]
    weights: np.ndarray  # [tokens, moe_layers, k]
    moe_layers: list[int]
    num_experts: int
    hidden: np.ndarray | None = None  # [tokens, layers, H], router input of every layer
    guesses: np.ndarray | None = None  # [tokens, moe_layers, width], depth-1 guesses, -1 = none
    previous: np.ndarray | None = None  # [tokens], index of the predecessor in its sequence, -1 = none

    def save(self, path: str | Path) -> None:
        arrays = dict(ids=self.ids, weights=self.weights, moe_layers=np.array(self.moe_layers),
                      num_experts=np.array(self.num_experts))
        for name in ("hidden", "guesses", "previous"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with np.load(path) as f:
            optional = {name: f[name] if name in f else None for name in ("hidden", "guesses", "previous")}
            return cls(f["ids"], f["weights"], f["moe_layers"].tolist(), int(f["num_experts"]), **optional)

    def usage(self) -> np.ndarray:
        """Share of tokens routed to each expert, [moe_layers, num_experts]."""
        counts = np.zeros((len(self.moe_layers), self.num_experts))
        for j in range(len(self.moe_layers)):
            counts[j] = np.bincount(self.ids[:, j].ravel(), minlength=self.num_experts)
        return counts / len(self.ids)


class RouteRecorder(ForwardHooks):
    """Collects routing (and optionally router inputs, and a speculation's guesses) of every real
    token the model runs. To see the guesses it must come before the Speculation in the hooks."""

    def __init__(self, model: Transformer, hidden: bool, speculation: Speculation | None = None):
        self.model, self.keep_hidden, self.speculation = model, hidden, speculation
        self.guesses: dict[int, list[torch.Tensor]] = {i: [] for i in model.spec.moe_layer_ids}
        self.ids: dict[int, list[torch.Tensor]] = {i: [] for i in model.spec.moe_layer_ids}
        self.weights: dict[int, list[torch.Tensor]] = {i: [] for i in model.spec.moe_layer_ids}
        self.hidden: dict[int, list[torch.Tensor]] = {i: [] for i in range(model.spec.num_layers)}
        self.previous: list[torch.Tensor] = []
        self.tokens = 0
        self.context = PreviousToken()

    def forward_start(self, rows: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.context.start(rows, positions, valid)
        index = torch.arange(self.tokens, self.tokens + int(valid.sum()), device=valid.device)
        self.previous.append(self.context.previous("index", index, -1).cpu())
        self.context.remember("index", index)
        self.tokens += len(index)

    def after_attention(self, layer: int, x: torch.Tensor, valid: torch.Tensor) -> None:
        if self.keep_hidden:
            norm = self.model.layers[layer].post_attention_layernorm
            self.hidden[layer].append(norm(x[valid]).to(torch.float16).cpu())

    def route(self, layer, x, weights, ids):
        if self.speculation is not None:
            guess = self.speculation.guesses.get(layer, {}).get(1)
            guess = torch.full((len(ids), self.speculation.width), -1) if guess is None else ranked_ids(guess, ids.device)
            self.guesses[layer].append(guess.to(torch.int16).cpu())
        self.ids[layer].append(ids.to(torch.int16).cpu())
        self.weights[layer].append(weights.float().cpu())
        return weights, ids

    def trace(self) -> RoutingTrace:
        layers = self.model.spec.moe_layer_ids
        stack = lambda d, keys: np.stack([torch.cat(d[k]).numpy() for k in keys], axis=1)  # noqa: E731
        hidden = stack(self.hidden, range(self.model.spec.num_layers)) if self.keep_hidden else None
        guesses = stack(self.guesses, layers) if self.speculation is not None else None
        return RoutingTrace(stack(self.ids, layers), stack(self.weights, layers), layers,
                            self.model.spec.num_experts, hidden, guesses, torch.cat(self.previous).numpy())
