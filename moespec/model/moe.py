"""Feed-forward blocks: the dense SwiGLU MLP and the routed MoE block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..experts.base import ExpertProvider, ExpertWeights
from ..spec import GPT_OSS_ALPHA, ModelSpec  # gpt-oss's SwiGLU: gate * sigmoid(1.702 gate)
from ..hooks import ForwardHooks
from .routing import Router, make_gate, make_router
from .stacked import stack_linears


ExpertFn = Callable[[torch.Tensor, ExpertWeights], torch.Tensor]  # (x, weights) -> y


@dataclass(frozen=True)
class SwiGLUExperts:
    """The routed experts' function (an ExpertFn). act "silu": down(silu(gate) * up);
    "clamped_swiglu" (gpt-oss): gate clamped above and up on both sides at `limit`, then
    down((up + 1) * gate * sigmoid(1.702 gate)). Called with one expert's weights, or `grouped`
    with every expert of a layer stacked."""

    act: str = "silu"
    limit: float = 7.0

    def hidden(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The gate and up projections [n, 2I] (gate first) -> the activation [n, I]."""
        gate, up = gate_up.chunk(2, dim=-1)
        if self.act == "clamped_swiglu":
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
            return (up + 1) * gate * torch.sigmoid(gate * GPT_OSS_ALPHA)
        return F.silu(gate) * up

    def __call__(self, x: torch.Tensor, w: ExpertWeights) -> torch.Tensor:
        """One expert applied to its tokens x [n, H] -> [n, H]."""
        return F.linear(self.hidden(F.linear(x, w.gate_up, w.gate_up_bias)), w.down, w.down_bias)

    def grouped(self, x: torch.Tensor, stack: ExpertWeights, runs: dict[int, slice],
                row_expert: torch.Tensor) -> torch.Tensor:
        """Experts stacked [E, ...] applied to rows x [n, H] sorted by expert: `runs` maps each used
        expert to its run of rows, row_expert [n] is each row's expert. Two grouped matmuls for the
        layer instead of two per expert: torch's grouped matmul, or, where it pays
        (`padded_pays`), batched matmuls over every expert's rows padded to the longest run."""
        longest = max(r.stop - r.start for r in runs.values())
        if padded_pays(x, stack, len(runs), longest):
            return self.padded(x, stack, runs, row_expert, longest)
        ends = run_ends(runs, stack.gate_up.shape[0], x.device)
        gate_up = F.grouped_mm(x, stack.gate_up.transpose(1, 2), offs=ends)
        if stack.gate_up_bias is not None:  # grouped_mm takes no per-group bias
            gate_up = gate_up + stack.gate_up_bias[row_expert]
        out = F.grouped_mm(self.hidden(gate_up), stack.down.transpose(1, 2), offs=ends)
        return out if stack.down_bias is None else out + stack.down_bias[row_expert]

    def padded(self, x: torch.Tensor, stack: ExpertWeights, runs: dict[int, slice], row_expert: torch.Tensor,
               longest: int) -> torch.Tensor:
        """`grouped` as two batched matmuls: expert e's rows fill the first places of slab e of a
        zero buffer [E, longest, H]; the padding rows are computed and dropped (a zero row stays
        finite through every activation here)."""
        experts = stack.gate_up.shape[0]
        starts = torch.tensor([runs[e].start if e in runs else 0 for e in range(experts)], device=x.device)
        places = row_expert * longest + torch.arange(len(x), device=x.device) - starts[row_expert]
        slabs = x.new_zeros(experts * longest, x.shape[1]).index_copy_(0, places, x).view(experts, longest, -1)
        gate_up = torch.bmm(slabs, stack.gate_up.transpose(1, 2))  # [E, longest, 2I]
        if stack.gate_up_bias is not None:
            gate_up = gate_up + stack.gate_up_bias[:, None]
        out = torch.bmm(self.hidden(gate_up), stack.down.transpose(1, 2))  # [E, longest, H]
        if stack.down_bias is not None:
            out = out + stack.down_bias[:, None]
        return out.view(experts * longest, -1).index_select(0, places)


# On a CPU in 16-bit floats, torch's grouped matmul (torch 2.13) is a loop of one oneDNN matmul per
# expert costing ~30 us however few its rows, while a batched matmul over the experts padded to
# the longest run is one call whose cost is its rows' arithmetic, padding included. Measured on this
# project's 2-core CPU (1 thread, bfloat16 and float16, tiny-mixtral and tiny-qwen2moe expert shapes, 8-256
# tokens, even and skewed routing): one matmul's per-expert overhead is worth about this many
# multiply-adds of padding rows. In float32 the grouped matmul has no such overhead and stays.
HALF_GROUP_MACS = 1_300_000


def padded_pays(x: torch.Tensor, stack: ExpertWeights, used: int, longest: int) -> bool:
    """Whether `grouped` runs faster as padded batched matmuls (see HALF_GROUP_MACS): rows x
    [n, H] in 16-bit floats on a CPU, where the padding rows' multiply-adds cost less than the
    grouped matmul's per-expert overhead for the `used` experts."""
    if x.dtype not in (torch.bfloat16, torch.float16) or x.device.type != "cpu":
        return False
    experts, up_out, up_in = stack.gate_up.shape
    padding = experts * longest - x.shape[0]
    return padding * (up_out * up_in + stack.down[0].numel()) <= 2 * used * HALF_GROUP_MACS


expert_forward = SwiGLUExperts()  # silu: every family but gpt-oss


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up: torch.Tensor | None = None  # set by fuse_projections

    def fuse_projections(self) -> None:
        """gate and up as one matmul (model/stacked.py). Called once the weights are loaded."""
        self.gate_up = stack_linears(self.gate_proj, self.up_proj)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(expert_forward.hidden(F.linear(x, self.gate_up)), self.down_proj.weight)


def make_expert_fn(spec: ModelSpec) -> SwiGLUExperts:
    """The routed-expert function of `spec`'s family."""
    return SwiGLUExperts(spec.expert_act, spec.swiglu_limit)


class RoutedExecutor(Protocol):
    """Runs a layer's routed experts itself instead of lending their weights to the model.

    Expert parallelism (moespec.parallel): the experts live on other workers, so the tokens travel
    to the experts rather than the weights to the tokens. `run_experts` hands it the routed
    tokens instead of asking a provider for weights.
    """

    def run_routed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   expert_fn: ExpertFn, scales_input: bool = False) -> torch.Tensor: ...


def routed_inputs(x: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, k: int,
                  scales_input: bool) -> torch.Tensor:
    """The expert inputs [len(order), H] of the token-choices `order` (flat indices into
    weights [N, k]): each choice's token, times its router weight when the router
    `scales_input` (Llama-4)."""
    inputs = x[order // k]
    return inputs * weights.flatten()[order, None].to(x.dtype) if scales_input else inputs


def combine_choices(outputs: torch.Tensor, weights: torch.Tensor, order: torch.Tensor,
                    scales_input: bool, dtype: torch.dtype) -> torch.Tensor:
    """Expert outputs [N * k, H] of the token-choices `order` -> the MoE output [N, H]: each times
    its router weight (unless the input was scaled), put back at its (token, k) place and summed
    over k, so the sum's order never depends on the order the outputs were computed in."""
    n, k = weights.shape
    back = torch.empty_like(order)
    back[order] = torch.arange(len(order), device=order.device)  # the sorted place of each choice
    per_choice = outputs.index_select(0, back)  # a gather: half the time of scattering the rows
    if not scales_input:
        per_choice = per_choice * weights.flatten()[:, None]
    return per_choice.to(dtype).view(n, k, -1).sum(dim=1)


def expert_runs(ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, slice]]:
    """Token-choices ids [N, k] sorted by expert, once per layer: (order [N * k], the flat choice
    index at each sorted place; each chosen expert's run of sorted places). One host
    synchronisation (the counts), which the provider needs anyway to know what to fetch."""
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    runs, start = {}, 0
    for expert, count in enumerate(torch.bincount(flat).tolist()):
        if count:
            runs[expert] = slice(start, start + count)
            start += count
    return order, runs


# One grouped matmul over a stack of S experts beats a Python loop over the u experts used once
# u >= S / GROUPED_SHARE: an unused expert still costs its empty group (about 1 us on this
# project's 2-core CPU, torch 2.13), a used one looped over about 15 us of Python and small ops.
GROUPED_SHARE = 3


def grouped_pays(experts: ExpertProvider, expert_fn: ExpertFn, used: int, device: torch.device) -> bool:
    """Whether `used` experts of a layer run faster as one grouped computation over the layer's
    whole stack than one by one: where that pays off (see GROUPED_SHARE), torch has `grouped_mm`
    and it runs on the CPU (measured there; CUDA's grouped_mm wants bfloat16 on recent GPUs and is
    not measured here), the provider keeps each layer's experts in one stack (`ResidentExperts` of
    dense, aligned experts, with `fetch_stack`) and `expert_fn` has a grouped form. Else the
    experts are computed one by one as they arrive (an offloading cache overlaps that compute with
    the copies of the experts still missing)."""
    return hasattr(experts, "fetch_stack") and hasattr(expert_fn, "grouped") and hasattr(F, "grouped_mm") \
        and device.type == "cpu" and used * GROUPED_SHARE >= experts.num_experts


def run_ends(runs: dict[int, slice], experts: int, device: torch.device) -> torch.Tensor:
    """Where each of `experts` experts' run of sorted rows ends, int32 [experts] (grouped_mm's offsets)."""
    ends, end = [], 0
    for e in range(experts):
        end = runs[e].stop if e in runs else end
        ends.append(end)
    return torch.tensor(ends, dtype=torch.int32, device=device)


def one_token_experts(layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                      experts: ExpertProvider, expert_fn: ExpertFn) -> torch.Tensor:
    """`run_experts` for one token x [1, H] (batch-1 decode): each chosen expert runs on the token
    itself, with no sort, gather or scatter; the weighted outputs are summed in the order of the
    choices, as `combine_choices` sums them, so the result is the same."""
    chosen = ids[0].tolist()
    arrived = {e: expert_fn(x, w) for e, w in experts.fetch(layer, list(dict.fromkeys(chosen)), 1)}
    outputs = torch.cat([arrived[e] for e in chosen])  # [k, H] in choice order (a padded choice repeats one)
    return weighted_sum(outputs, weights, x.dtype)


def weighted_sum(outputs: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One token's expert outputs [k, H] in choice order, weighted by its routing weights [1, k]
    and summed in that order (as `combine_choices` sums them) -> [1, H]."""
    return (outputs * weights[0][:, None]).to(dtype).sum(dim=0, keepdim=True)


class StackedExperts:
    """A RoutedExecutor for one token whose layer's experts are all resident in one stack [E, ...]:
    each chosen expert's weights are a view of the stack at its id, read from the routing itself
    (`.item()`), so the whole layer can be traced as one compiled call (model/compiled.py) with no
    host round trip between its router and its experts and no copy of the weights. The sum is
    `one_token_experts`'."""

    def __init__(self, stack: ExpertWeights):
        self.stack = stack

    def run_routed(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                   expert_fn: ExpertFn, scales_input: bool = False) -> torch.Tensor:
        experts = self.stack.gate_up.shape[0]
        outputs = []
        for j in range(ids.shape[1]):
            e = ids[0, j].item()
            torch._check(e >= 0)  # what the trace needs to know to take a view at e
            torch._check(e < experts)
            w = ExpertWeights(**{name: t[e] for name, t in self.stack.tensors().items()})
            outputs.append(expert_fn(x * weights[0, j].to(x.dtype) if scales_input else x, w))
        if scales_input:  # the weight scaled the input (Llama-4): the outputs are summed as they are
            return torch.cat(outputs).to(x.dtype).sum(dim=0, keepdim=True)
        return weighted_sum(torch.cat(outputs), weights, x.dtype)


def run_experts(layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                experts: ExpertProvider | RoutedExecutor, expert_fn: ExpertFn = expert_forward,
                scales_input: bool = False) -> torch.Tensor:
    """Weighted sum [N, H] of the chosen experts' outputs; each needed expert is fetched once.

    The token-choices are sorted by expert once, so each expert computes on one contiguous run
    of rows (no per-expert search or gather). Where every expert of the layer is on the device in
    one stack, they all run in one grouped computation (`grouped_pays`). Else experts are
    computed as the provider yields them (resident ones first, then misses as their copies land),
    each into its own run. The outputs are weighted and summed only at the end: the result never
    depends on arrival order. A single token computed one expert at a time needs no sort at all
    (`one_token_experts`).
    `scales_input`: the router weight scales the expert's input (Llama-4), not its output.
    """
    run_routed = getattr(experts, "run_routed", None)  # a RoutedExecutor (isinstance on a Protocol is slow)
    if run_routed is not None:
        return run_routed(layer, x, weights, ids, expert_fn, scales_input)
    if x.shape[0] == 1 and not scales_input and not grouped_pays(experts, expert_fn, ids.shape[1], x.device):
        return one_token_experts(layer, x, weights, ids, experts, expert_fn)
    order, runs = expert_runs(ids)
    inputs = routed_inputs(x, weights, order, ids.shape[1], scales_input)  # [N * k, H], sorted by expert
    stack = experts.fetch_stack(layer, list(runs), x.shape[0]) \
        if grouped_pays(experts, expert_fn, len(runs), x.device) else None  # None: not stacked after all
    if stack is not None:
        outputs = expert_fn.grouped(inputs, stack, runs, ids.flatten()[order])
    else:
        arrived = {e: expert_fn(inputs[runs[e]], w) for e, w in experts.fetch(layer, list(runs), x.shape[0])}
        outputs = torch.cat([arrived[e] for e in runs]) if runs else inputs  # back in sorted order
    return combine_choices(outputs, weights, order, scales_input, x.dtype)


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
        self.scales_input = spec.router_scales_input
        self.shared_expert = MLP(spec.hidden_size, spec.shared_expert_intermediate_size) \
            if spec.shared_expert_intermediate_size else None
        self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False) if spec.shared_expert_gate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing (weights [N, k] float32, expert ids [N, k]) of router inputs x [N, H]."""
        return self.router.select(self.gate(x))

    def shared(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (gated) shared expert's output [N, H] for x [N, H]; None in a layer without one."""
        if self.shared_expert is None:
            return None
        out = self.shared_expert(x)
        return out if self.shared_expert_gate is None else torch.sigmoid(self.shared_expert_gate(x)) * out

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, shared: torch.Tensor | None,
                experts: ExpertProvider, hooks: list[ForwardHooks] = ()) -> torch.Tensor:
        """x [N, H] (real tokens only, padding removed) with their `route` and `shared` (computed
        before the fetch, with the attention: Block.forward) -> [N, H]."""
        for hook in hooks:
            weights, ids = hook.route(self.layer, x, weights, ids)
        out = self.run_experts(x, weights, ids, experts)
        return out if shared is None else out + shared

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    experts: ExpertProvider | RoutedExecutor) -> torch.Tensor:
        return run_experts(self.layer, x, weights, ids, experts, self.expert_fn, self.scales_input)
