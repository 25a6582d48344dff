"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE block."""

from __future__ import annotations

from functools import partial
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.base import ExpertProvider, ExpertWeights
from ..spec import GPT_OSS_ALPHA, ModelSpec  # gpt-oss's SwiGLU: gate * sigmoid(1.702 gate)
from ..hooks import ForwardHooks
from .routing import Router, make_gate, make_router


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def expert_forward(x: torch.Tensor, w: ExpertWeights, act: str = "silu", limit: float = 7.0) -> torch.Tensor:
    """One routed expert applied to tokens x [n, H]. act "silu": down(silu(gate) * up);
    "clamped_swiglu" (gpt-oss): gate clamped above and up on both sides at `limit`, then
    down((up + 1) * gate * sigmoid(1.702 gate))."""
    gate, up = F.linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    if act == "clamped_swiglu":
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * GPT_OSS_ALPHA)
    else:
        hidden = F.silu(gate) * up
    return F.linear(hidden, w.down, w.down_bias)


ExpertFn = Callable[[torch.Tensor, ExpertWeights], torch.Tensor]  # (x, weights) -> y


def make_expert_fn(spec: ModelSpec) -> ExpertFn:
    """The routed-expert function of `spec`'s family."""
    if spec.expert_act == "silu":
        return expert_forward
    return partial(expert_forward, act=spec.expert_act, limit=spec.swiglu_limit)


class RoutedExecutor(Protocol):
    """Runs a layer's routed experts itself instead of lending their weights to the model.

    Expert parallelism (moespec.parallel): the experts live on other workers, so the tokens travel
    to the experts rather than the weights to the tokens. `run_experts` hands it the routed
    tokens instead of asking a provider for weights.
    """

    def run_routed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   expert_fn: ExpertFn, scales_input: bool = False) -> torch.Tensor: ...


def scale_output(expert_fn: ExpertFn, x: torch.Tensor, w: ExpertWeights, weights: torch.Tensor) -> torch.Tensor:
    """An expert's output times its router weights [n] (every family but Llama-4)."""
    return expert_fn(x, w) * weights[:, None]


def scale_input(expert_fn: ExpertFn, x: torch.Tensor, w: ExpertWeights, weights: torch.Tensor) -> torch.Tensor:
    """The expert applied to its input times the router weights [n] (Llama-4)."""
    return expert_fn(x * weights[:, None].to(x.dtype), w)


def run_experts(layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                experts: ExpertProvider | RoutedExecutor, expert_fn: ExpertFn = expert_forward,
                weighted: Callable = scale_output) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs; each needed expert is fetched once.

    Experts arrive in whatever order the provider has them ready, so each output is kept at its
    (token, k) place and summed over k at the end: the result never depends on arrival order.
    `weighted` says where the router weight applies (`scale_output` or `scale_input`).
    """
    run_routed = getattr(experts, "run_routed", None)  # a RoutedExecutor (isinstance on a Protocol is slow)
    if run_routed is not None:
        return run_routed(layer, x, weights, ids, expert_fn, weighted is scale_input)
    per_choice = x.new_zeros(ids.shape[0], ids.shape[1], x.shape[1])
    for expert_id, w in experts.fetch(layer, torch.unique(ids).tolist(), x.shape[0]):
        token_idx, k = torch.where(ids == expert_id)
        per_choice[token_idx, k] = weighted(expert_fn, x[token_idx], w, weights[token_idx, k]).to(x.dtype)
    return per_choice.sum(dim=1)


class MoE(nn.Module):
    """Router + routed experts (fetched from a provider) + optional (gated) shared expert.

    The router and shared expert are ordinary parameters that live on the device. Routed expert
    weights are not parameters of this module: they are asked for per forward call.
    """

    def __init__(self, spec: ModelSpec, layer: int):
        super().__init__()
        self.layer = layer
        self.gate = make_gate(spec)
        self.router: Router = make_router(spec, self.gate)
        self.expert_fn = make_expert_fn(spec)
        self.weighted = scale_input if spec.router_scales_input else scale_output
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
        return run_experts(self.layer, x, weights, ids, experts, self.expert_fn, self.weighted)
