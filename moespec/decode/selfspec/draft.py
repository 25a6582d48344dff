"""Draft experts for self-speculative decoding (SpecMoE): N experts per MoE layer held on the device.

The draft model is the target model whose MoE layers may only use these N experts: a routed expert
that is not one of them is replaced by its nearest draft expert in an affinity table: the L2
distance between the experts' flattened weights, computed once from the host store
(`affinity.expert_distances`), or, from traces, how far each expert's outputs are from the routed expert's
on router inputs the prompts sent to it (`affinity.output_distances`). Draft experts are
*pinned* in the device expert cache rather than kept in buffers of their own: they come out of the
user's `expert_cache` budget (so speculative and plain runs compare at equal device memory), they
never move while drafting, and the verify pass gets them as hits instead of copying a second
instance over the link. How the set is refreshed (`policy`):

- "hot_temporal": exponentially decayed routed-token counts of the target passes (prefill and
  verification). An expert that overtakes the weakest draft expert replaces it the moment
  verification has it on the device, so refreshing never moves a byte.
- "static_hot": the most routed-to experts of the first prompts' prefill, then fixed.
- "random": a seeded random set, fixed (the comparison point).

While adaptive γ has speculation off the set is released (unpinned, scores kept) and filled again
when drafting resumes.
"""

from __future__ import annotations

from collections import deque
from typing import Iterator, get_args

import torch

from ...config import DraftPolicy
from ...errors import MoespecError
from ...experts.base import ExpertWeights, Pinnable
from ...model.routing import Router

DRAFT_POLICIES = get_args(DraftPolicy)


class DraftExperts:
    """The draft set of every MoE layer, its substitution table, and the draft pass's ExpertProvider."""

    def __init__(self, source: Pinnable, layers: list[int], num_experts: int, per_layer: int,
                 policy: str, device: torch.device, decay: float = 0.9, seed: int = 0):
        if policy not in DRAFT_POLICIES:
            raise MoespecError(f"draft_policy must be one of {', '.join(DRAFT_POLICIES)}, got {policy!r}")
        if not 1 <= per_layer <= min(source.pin_limit, num_experts):
            raise MoespecError(
                f"draft_experts must be in [1, {min(source.pin_limit, num_experts)}] for this expert cache "
                f"(pinned draft experts must leave each layer top_k evictable slots), got {per_layer}")
        self.source, self.layers, self.num_experts, self.per_layer = source, layers, num_experts, per_layer
        self.policy, self.device, self.decay, self.seed = policy, device, decay, seed
        self.members: dict[int, list[int]] = {}
        self.reset()

    def reset(self) -> None:
        """Unpin every draft expert and forget scores and counters: a cold start (new settings, or
        LLM.reset). The next `fill` chooses the set again."""
        self.release()
        rng = torch.Generator().manual_seed(self.seed)
        # plain floats: `offer` compares a few of them per expert the verify pass uses
        self.scores = {layer: torch.rand(self.num_experts, generator=rng).tolist() if self.policy == "random"
                       else [0.0] * self.num_experts for layer in self.layers}
        self.members = {layer: [] for layer in self.layers}
        # ids routed while no set was pinned, scored at the next fill; older passes weigh < decay^64
        self.unscored = {layer: deque(maxlen=64) for layer in self.layers}
        self.substitute: dict[int, torch.Tensor] = {}  # layer -> [E] routed id -> draft id, on the device
        self.member_ids: dict[int, torch.Tensor] = {}  # layer -> draft ids, on the device
        self.distances: dict[int, torch.Tensor] | None = None  # the affinity table `fill` was given
        self.fills = 0  # `fill` calls since the reset (a released set is filled again)
        self.swaps = 0  # hot_temporal refreshes
        self.routed = 0  # routed (token, k) choices seen by draft passes
        self.substituted = torch.zeros((), dtype=torch.long, device=self.device)  # of those, replaced

    def release(self) -> None:
        """Unpin the draft set, keeping scores and the affinity table: speculation is off, so plain
        steps get the whole cache as plain decoding would. The next `fill` pins the best-scored set
        again, copying only those members that were evicted meanwhile."""
        for layer, members in self.members.items():
            for e in members:
                self.source.unpin((layer, e))
            members.clear()
        self.filled = False

    def observe(self, layer: int, ids: torch.Tensor) -> None:
        """The target model routed ids [N, k] at `layer` (prefill, verification or a plain step):
        update the scores. While no set is pinned (before the first fill, or released) nothing
        reads them, so the ids are only kept and counted at the next `fill`: plain steps then cost
        what plain decoding costs."""
        if self.policy == "random" or (self.policy == "static_hot" and self.fills):
            return
        if not self.filled:
            self.unscored[layer].append(ids)
            return
        counts = torch.bincount(ids.flatten(), minlength=self.num_experts).tolist()
        self.scores[layer] = [self.decay * s + c for s, c in zip(self.scores[layer], counts)]

    def _score_unscored(self, layer: int) -> None:
        """Fold the ids kept while no set was pinned into the scores, as `observe` would have:
        the i-th of n passes weighs decay^(n-1-i), all in one weighted bincount."""
        kept = self.unscored[layer]
        if not kept:
            return
        n = len(kept)
        ids = torch.cat([i.flatten() for i in kept])
        ages = torch.cat([torch.full((i.numel(),), n - 1 - j, dtype=torch.float64, device=ids.device)
                          for j, i in enumerate(kept)])
        counts = torch.bincount(ids, weights=self.decay ** ages, minlength=self.num_experts).tolist()
        self.scores[layer] = [self.decay ** n * s + c for s, c in zip(self.scores[layer], counts)]
        kept.clear()

    def fill(self, distances: dict[int, torch.Tensor] | None) -> None:
        """Give every layer its N draft experts, the best-scored first (copied in if not resident);
        `distances[layer][e, m]`: how badly draft expert m stands in for routed expert e (None when
        drafts route with `restrict` instead of a table)."""
        self.distances = distances
        self.fills += 1
        for layer, members in self.members.items():
            self._score_unscored(layer)
            for e in sorted(range(self.num_experts), key=lambda e: -self.scores[layer][e])[: self.per_layer]:
                if not self.source.pin((layer, e)):
                    raise RuntimeError(f"no slot for draft expert {e} of layer {layer}")  # pin_limit prevents this
                members.append(e)
            self._update_substitutes(layer)
        self.filled = True

    def offer(self, layer: int, e: int) -> None:
        """Verification has expert `e` of `layer` on the device: with hot_temporal, it becomes a draft
        expert (pinned where it is, no copy) if it now outscores the weakest one."""
        members = self.members[layer]
        if self.policy != "hot_temporal" or not self.filled or e in members:
            return
        scores = self.scores[layer]
        weakest = min(range(len(members)), key=lambda i: scores[members[i]])
        if scores[e] > scores[members[weakest]] and self.source.pin((layer, e), load=False):
            self.source.unpin((layer, members[weakest]))
            members[weakest] = e
            self.swaps += 1
            self._update_substitutes(layer)

    def _update_substitutes(self, layer: int) -> None:
        members = torch.tensor(self.members[layer])
        self.member_ids[layer] = members.to(self.device)
        if self.distances is not None:
            nearest = self.distances[layer][:, members].argmin(dim=1)
            self.substitute[layer] = members[nearest].to(self.device)

    def reroute(self, layer: int, ids: torch.Tensor) -> torch.Tensor:
        """The draft pass's routing: every routed id replaced by its nearest draft expert (itself if a
        member). Two choices of a token that land on the same draft expert both run it, each with
        its own router weight, which equals running it once with the weights summed."""
        new = self.substitute[layer][ids]
        self.routed += ids.numel()
        self.substituted += (new != ids).sum()
        return new

    def restrict(self, layer: int, logits: torch.Tensor, ids: torch.Tensor, router: Router
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft pass's routing without a table: the layer's router choosing among its draft
        experts only (`Router.restrict`) from logits [N, E]; ids [N, k], the routing it replaces,
        only count towards the substitution rate."""
        members = self.member_ids[layer]
        self.routed += ids.numel()
        self.substituted += (~torch.isin(ids, members)).sum()
        return router.restrict(logits, members)

    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        """ExpertProvider of the draft pass: ids are draft experts (after `reroute`), all pinned."""
        for e in ids:
            yield e, self.source.peek((layer, e))

    def summary(self) -> dict:
        return {"draft_experts_per_layer": self.per_layer, "draft_policy": self.policy, "draft_swaps": self.swaps,
                "draft_fills": self.fills,
                "draft_substitution_rate": int(self.substituted) / max(self.routed, 1),
                "draft_members": {layer: sorted(m) for layer, m in self.members.items()}}
