"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE block."""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.base import ExpertProvider
from ..spec import ModelSpec
from ..hooks import ForwardHooks
from .routing import Router, make_router


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_forward(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One routed expert applied to tokens x [n, H]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, down)


ExpertFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (x, gate_up, down) -> y


@runtime_checkable
class RoutedExecutor(Protocol):
    """Runs a layer's routed experts itself instead of lending their weights to the model.

    Expert parallelism (moespec.parallel): the experts live on other workers, so the tokens travel
    to the experts rather than the weights to the tokens. `run_experts` hands it the routed
    tokens instead of asking a provider for weights.
    """

    def run_routed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   expert_fn: ExpertFn) -> torch.Tensor: ...


def run_experts(layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                experts: ExpertProvider | RoutedExecutor, expert_fn: ExpertFn = expert_forward) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs; each needed expert is fetched once.

    Experts arrive in whatever order the provider has them ready, so each output is kept at its
    (token, k) place and summed over k at the end: the result never depends on arrival order.
    """
    if isinstance(experts, RoutedExecutor):
        return experts.run_routed(layer, x, weights, ids, expert_fn)
    per_choice = x.new_zeros(ids.shape[0], ids.shape[1], x.shape[1])
    for expert_id, w in experts.fetch(layer, torch.unique(ids).tolist(), x.shape[0]):
        token_idx, k = torch.where(ids == expert_id)
        y = expert_fn(x[token_idx], w.gate_up, w.down) * weights[token_idx, k, None]
        per_choice[token_idx, k] = y.to(x.dtype)
    return per_choice.sum(dim=1)


class MoE(nn.Module):
    """Router + routed experts (fetched from a provider) + optional (gated) shared expert.

    The router and shared expert are ordinary parameters that live on the device. Routed expert
    weights are not parameters of this module: they are asked for per forward call.
    """

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.router: Router = make_router(spec)
        self.gate = nn.Linear(spec.hidden_size, spec.num_experts, bias=False)
        self.shared_expert = MLP(spec.hidden_size, spec.shared_expert_intermediate_size) \
            if spec.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False) if spec.shared_expert_gate else None

    def forward(self, x: torch.Tensor, experts: ExpertProvider, hooks: list[ForwardHooks] = ()) -> torch.Tensor:
        """x [N, H] (real tokens only, padding removed) -> [N, H]."""
        weights, ids = self.router.select(self.gate(x))
        for hook in hooks:
            weights, ids = hook.route(self.layer, x, weights, ids)
        out = self.run_experts(x, weights, ids, experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    experts: ExpertProvider | RoutedExecutor) -> torch.Tensor:
        return run_experts(self.layer, x, weights, ids, experts)
