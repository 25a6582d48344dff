"""Self-assisted speculative decoding for offloaded MoE models (SpecMoE, arXiv 2604.10152).

Each step the model drafts γ tokens per row with its MoE layers restricted to a few pinned draft
experts (`experts/draft.py`: nothing crosses the link while drafting), then the full model scores
every row's pending token and drafts in one pass. That pass routes all B·(γ+1) tokens of a layer
together, so each expert any of them needs is fetched once for all of them: on an offloaded model
a step costs about one plain step's transfers but can emit up to γ+1 tokens per row. Rows keep
the accepted prefix plus one token from the target; the KV cache is cropped back past it.

Acceptance keeps the output exactly the target's: greedy keeps drafts equal to the target's argmax
(so the tokens equal plain greedy decoding up to floating-point ties); sampling uses the
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), else sample the normalised
residual max(0, p − q)), whose output distribution is the target's p (Leviathan et al. 2023,
Chen et al. 2023). p and q are both `filtered_probs`: temperature, top-k and top-p included.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ..errors import MoespecError
from ..experts.base import ExpertWeights
from ..experts.draft import DraftExperts, PinnableExperts, expert_distances
from ..experts.store import ExpertStore
from ..hooks import ForwardHooks
from ..model.kv_cache import KVCache
from ..model.moe import expert_forward
from ..model.routing import softmax_topk_renorm
from ..model.transformer import Transformer
from .sampling import SamplingParams, filtered_probs

AUTO_MAX_GAMMA = 10
AFFINITIES = ("weights", "outputs", "router")
SAMPLES_PER_LAYER = 512  # router inputs kept per layer for the "outputs" affinity


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [B, V], drawn on the CPU so a seeded generator reproduces it."""
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(probs.device)


def accept(logits: torch.Tensor, drafts: torch.Tensor, draft_probs: torch.Tensor | None, gammas: torch.Tensor,
           params: SamplingParams, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """How many drafts each row keeps, and the token that follows them.

    logits [B, G+1, V]: the target's logits after the pending token and after each draft;
    drafts [B, G]; draft_probs [B, G, V]: the draft distributions the drafts were drawn from (None
    when greedy); gammas [B]: drafts per row actually proposed (≤ G). Returns accepted [B] and
    next [B]: the target's correction at the first rejection, or a bonus token if all were kept.
    """
    B, G1, V = logits.shape
    G = G1 - 1
    proposed = torch.arange(G, device=logits.device)[None] < gammas[:, None]
    rows = torch.arange(B, device=logits.device)
    if params.temperature == 0:
        target = logits.argmax(dim=-1)
        keep = (drafts == target[:, :G]) & proposed
        n = keep.long().cumprod(dim=1).sum(dim=1)
        return n, target[rows, n]
    p = filtered_probs(logits.reshape(B * G1, V), params).view(B, G1, V)
    pd = p[:, :G].gather(2, drafts[..., None]).squeeze(-1)
    qd = draft_probs.gather(2, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, G, generator=generator).to(logits.device)
    keep = (u * qd < pd) & proposed  # u < p/q without dividing; q(d) > 0 since d was drawn from q
    n = keep.long().cumprod(dim=1).sum(dim=1)
    p_n = p[rows, n]
    q_n = torch.cat([draft_probs, torch.zeros_like(p[:, :1])], dim=1)[rows, n]
    residual = (p_n - q_n).clamp(min=0)
    dist = torch.where((n < gammas)[:, None] & (residual.sum(-1, keepdim=True) > 0), residual, p_n)
    return n, _draw(dist / dist.sum(-1, keepdim=True), generator)


class GammaChooser:
    """Picks γ (drafts per row) for each step: fixed, or adaptive from measured acceptance and cost.

    Adaptive: with per-token acceptance α a row emits (1 − α^(γ+1)) / (1 − α) tokens per step
    (α is a decayed count of accepted vs. tried drafts); a step's wall time is measured per (γ,
    batch-size bucket). The γ with the most expected tokens per second wins, γ = 0 being plain
    decoding, so speculation turns itself off where it does not pay (batch 1 on a slow link:
    verifying γ+1 tokens moves more experts than one token does). It starts by measuring γ=4 and
    γ=0, then climbs: a neighbour of the best measured γ is tried when its cost, interpolated
    linearly between measured γs (extrapolated from the last two), promises more; every
    `probe_every` steps a neighbour is re-measured, since the best γ moves with the text and the
    cache state.
    """

    def __init__(self, gamma: int | str = "auto", max_gamma: int = AUTO_MAX_GAMMA, start: int = 4,
                 probe_every: int = 8, ema: float = 0.3, decay: float = 0.9):
        if gamma != "auto" and not (isinstance(gamma, int) and not isinstance(gamma, bool) and gamma >= 0):
            raise MoespecError(f"gamma must be a non-negative integer or 'auto', got {gamma!r}")
        self.setting = gamma
        self.fixed = None if gamma == "auto" else gamma
        self.max_gamma, self.start, self.probe_every = max_gamma, min(start, max_gamma), probe_every
        self.ema, self.decay = ema, decay
        self.cost: dict[int, dict[int, float]] = {}  # batch bucket -> γ -> seconds per step (EMA)
        self.accepted, self.tried = 1.0, 2.0  # a uniform prior on α
        self.steps = 0

    @property
    def alpha(self) -> float:
        return min(self.accepted / self.tried, 0.99)

    def expected_tokens(self, gamma: int) -> float:
        a = self.alpha
        return (1 - a ** (gamma + 1)) / (1 - a)

    def predicted_cost(self, costs: dict[int, float], gamma: int) -> float:
        xs = sorted(costs)
        if gamma in costs:
            return costs[gamma]
        below, above = [x for x in xs if x < gamma], [x for x in xs if x > gamma]
        if below and above:
            a, b = below[-1], above[0]
            return costs[a] + (costs[b] - costs[a]) * (gamma - a) / (b - a)
        a, b = (xs[-2], xs[-1]) if below else (xs[0], xs[1])
        slope = max(0.0, (costs[b] - costs[a]) / (b - a))
        edge = b if below else a
        return max(1e-9, costs[edge] + slope * (gamma - edge))

    def _costs(self, rows: int) -> dict[int, float]:
        """Measured step costs for this batch size; a new bucket (rows finish at different steps)
        starts from the nearest measured one instead of exploring again."""
        bucket = rows.bit_length()
        if bucket not in self.cost and self.cost:
            nearest = min(self.cost, key=lambda b: abs(b - bucket))
            self.cost[bucket] = dict(self.cost[nearest])
        return self.cost.setdefault(bucket, {})

    def choose(self, rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        self.steps += 1
        costs = self._costs(rows)
        for first in (self.start, 0):  # measure the starting γ and plain decoding first
            if first not in costs:
                return first
        rate = {g: self.expected_tokens(g) / costs[g] for g in costs}
        best = max(rate, key=rate.get)
        # hill-climb: beyond the measured γs only the best one's neighbours are candidates, so an
        # extrapolated cost never sends a step to a far, expensive γ
        for g in (best - 1, best + 1):
            if 0 <= g <= self.max_gamma and g not in costs:
                rate[g] = self.expected_tokens(g) / self.predicted_cost(costs, g)
        best = max(rate, key=rate.get)
        if self.steps % self.probe_every == 0:
            side = 1 if (self.steps // self.probe_every) % 2 else -1
            return min(max(best + side, 0), self.max_gamma)
        return best

    def observe(self, gamma: int, rows: int, accepted: int, tried: int, seconds: float) -> None:
        """A step with `gamma` over `rows` running rows kept `accepted` of `tried` drafts in `seconds`."""
        self.accepted = self.decay * self.accepted + accepted
        self.tried = self.decay * self.tried + tried
        costs = self._costs(rows)
        costs[gamma] = seconds if gamma not in costs else (1 - self.ema) * costs[gamma] + self.ema * seconds

    def summary(self) -> dict:
        return {"gamma": self.setting, "alpha_estimate": self.alpha,
                "step_seconds_by_gamma": {f"batch<{2 ** b}": dict(sorted(c.items())) for b, c in self.cost.items()}}


@dataclass
class SpecStats:
    steps: int = 0  # verification passes
    row_steps: int = 0  # running rows summed over verification passes
    plain_steps: int = 0  # steps where γ was 0 (speculation off)
    drafted: int = 0  # draft tokens proposed to verification
    accepted: int = 0  # of those, kept
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["acceptance_rate"] = self.accepted / max(self.drafted, 1)
        d["tokens_per_step"] = (self.accepted + self.row_steps) / max(self.row_steps, 1)  # per row
        d["mean_gamma"] = self.drafted / max(self.row_steps, 1)
        return d


def output_distances(store: ExpertStore, samples: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
                     device: torch.device) -> dict[int, torch.Tensor]:
    """Affinity from traces: D[e, m] = mean ||f_e(x) − f_m(x)||² over sampled router inputs x that
    were routed to e (all samples if none were), i.e. the error of running m where e was chosen.

    Experts trained from scratch have no aligned neurons, so weight distance can say little about
    what they compute; this measures it directly. Each layer's experts are copied to the device
    once, outside the expert cache (on CPU: no copy).
    """
    out = {}
    for layer, parts in samples.items():
        x = torch.cat([p[0] for p in parts]).to(device)
        ids = torch.cat([p[1] for p in parts]).to(device)
        E = store.spec.num_experts
        y = torch.stack([expert_forward(x, w.gate_up.to(device), w.down.to(device)).float()
                         for w in (store[(layer, e)] for e in range(E))])  # [E, N, H]
        routed = (ids[:, :, None] == torch.arange(E, device=device)).any(dim=1)  # [N, E]
        table = torch.empty(E, E)
        for e in range(E):
            rows = routed[:, e] if bool(routed[:, e].any()) else torch.ones_like(routed[:, e])
            table[e] = ((y[:, rows] - y[e, rows]) ** 2).sum(-1).mean(-1).cpu()
        out[layer] = table
    return out


class _Routing(ForwardHooks):
    """Target passes feed their routing to the draft set (and, for the "outputs" affinity, keep
    some router inputs until the set is filled); draft passes route to draft experts."""

    def __init__(self, model: Transformer, draft: DraftExperts, affinity: str):
        self.model, self.draft, self.drafting, self.affinity = model, draft, False, affinity
        self.samples: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def route(self, layer: int, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.drafting and self.affinity == "router":
            moe = self.model.layers[layer].mlp
            return self.draft.restrict(layer, moe.gate(x), ids, moe.top_k, moe.route is softmax_topk_renorm)
        if self.drafting:
            return weights, self.draft.reroute(layer, ids)
        self.draft.observe(layer, ids)
        if self.affinity == "outputs" and not self.draft.filled:
            kept = self.samples.setdefault(layer, [])
            room = SAMPLES_PER_LAYER - sum(len(p[0]) for p in kept)
            if room > 0:
                kept.append((x[:room].float().cpu(), ids[:room].cpu()))
        return weights, ids


class _VerifyTap:
    """The verify pass's ExpertProvider: the real one, offering each expert to the draft set while
    it is on the device (so a refresh re-pins it instead of copying it)."""

    def __init__(self, experts: PinnableExperts, draft: DraftExperts):
        self.experts, self.draft = experts, draft

    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        for e, w in self.experts.fetch(layer, ids, tokens):
            self.draft.offer(layer, e)
            yield e, w


class SelfSpeculativeDecoder:
    """A DecodeStep for `Generator.generate`: draft γ tokens with draft experts, verify in one pass."""

    def __init__(self, model: Transformer, experts: PinnableExperts, store: ExpertStore, draft: DraftExperts,
                 gamma: GammaChooser, affinity: str, weight_distances: dict[int, torch.Tensor] | None = None):
        self.model, self.experts, self.store, self.draft, self.gamma = model, experts, store, draft, gamma
        self.affinity, self.weight_distances = affinity, weight_distances  # the weight table is kept for reuse
        self.routing = _Routing(model, draft, affinity)
        self.verify_provider = _VerifyTap(experts, draft)
        self.stats = SpecStats()

    @classmethod
    def configure(cls, current: SelfSpeculativeDecoder | None, model: Transformer, experts: PinnableExperts,
                  store: ExpertStore, draft_experts: int | None, draft_policy: str, gamma: int | str,
                  affinity: str = "weights") -> SelfSpeculativeDecoder:
        """The decoder for these settings: `current` if it matches (its draft set and measurements
        carry over between calls), else a new one reusing its affinity table."""
        if not all(hasattr(experts, m) for m in ("pin", "unpin", "peek")):
            raise MoespecError("speculative decoding needs the experts on this device (an expert cache), "
                               f"not {type(experts).__name__}")
        if affinity not in AFFINITIES:
            raise MoespecError(f"draft_affinity must be one of {', '.join(AFFINITIES)}, got {affinity!r}")
        n = draft_experts if draft_experts is not None else max(1, min(model.spec.top_k, experts.pin_limit))
        if current is not None and (current.draft.per_layer, current.draft.policy, current.affinity) == \
                (n, draft_policy, affinity):
            if current.gamma.setting != gamma:
                current.gamma = GammaChooser(gamma)
            return current
        chooser = GammaChooser(gamma)
        spec = model.spec
        draft = DraftExperts(experts, spec.moe_layer_ids, spec.num_experts, n, draft_policy,
                             model.embed_tokens.weight.device)
        weights = None
        if current is not None:
            current.draft.reset()
            weights = current.weight_distances
        return cls(model, experts, store, draft, chooser, affinity, weights)

    def reset(self) -> None:
        """A cold start: draft experts unpinned and chosen again, counters and measured costs zeroed."""
        self.draft.reset()
        self.routing.samples.clear()
        self.stats = SpecStats()
        self.gamma = GammaChooser(self.gamma.setting)

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Route hooks installed for one generate call (the prefill's routing seeds the draft set)."""
        self.model.hooks.append(self.routing)
        try:
            yield
        finally:
            self.model.hooks.remove(self.routing)

    def __call__(self, cache: KVCache, pending: torch.Tensor, running: torch.Tensor, remaining: torch.Tensor,
                 params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
        t0 = time.perf_counter()
        if not self.draft.filled:
            self.draft.fill(self._affinity_table())
        rows = int(running.sum())
        gamma = self.gamma.choose(rows)
        # a row never drafts past its token budget: its positions stay inside the KV cache
        gammas = torch.where(running, (remaining - 1).clamp(min=0, max=gamma), 0)
        drafts, draft_probs = self._draft(cache, pending, gammas, params, generator)
        t1 = time.perf_counter()
        start = cache.lengths.clone()
        tokens = torch.cat([pending[:, None], drafts], dim=1)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= gammas[:, None]
        hidden = self.model(tokens, cache, self.verify_provider, valid=valid & running[:, None])
        n, nxt = accept(self.model.logits(hidden), drafts, draft_probs, gammas, params, generator)
        cache.crop(torch.arange(len(pending), device=start.device), torch.where(running, start + n + 1, start))
        out = [d[:k] + [t] if run else [] for d, k, t, run in
               zip(drafts.tolist(), n.tolist(), nxt.tolist(), running.tolist())]
        t2 = time.perf_counter()
        self._record(gammas, n, running, rows, drafts.shape[1], t1 - t0, t2 - t1)
        return out

    def _affinity_table(self) -> dict[int, torch.Tensor] | None:
        if self.affinity == "router":
            return None
        if self.affinity == "outputs":
            table = output_distances(self.store, self.routing.samples, self.model.embed_tokens.weight.device)
            self.routing.samples.clear()
            return table
        if self.weight_distances is None:
            self.weight_distances = expert_distances(self.store)
        return self.weight_distances

    def _draft(self, cache: KVCache, pending: torch.Tensor, gammas: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [B, G] (G = max γ) from the draft model, and their distributions [B, G, V] when
        sampling. The cache is rolled back afterwards: verification rewrites those positions."""
        B, G = len(pending), int(gammas.max())
        start = cache.lengths.clone()
        drafts = torch.zeros(B, G, dtype=torch.long, device=pending.device)
        probs = []
        token = pending
        self.routing.drafting = True
        try:
            for j in range(G):
                hidden = self.model(token[:, None], cache, self.draft, valid=(gammas > j)[:, None])
                logits = self.model.logits(hidden[:, 0])
                if params.temperature == 0:
                    token = logits.argmax(dim=-1)
                else:
                    probs.append(filtered_probs(logits, params))
                    token = _draw(probs[-1], generator)
                drafts[:, j] = token
        finally:
            self.routing.drafting = False
            cache.crop(torch.arange(B, device=start.device), start)
        if params.temperature == 0:
            return drafts, None
        vocab = self.model.spec.vocab_size
        return drafts, torch.stack(probs, dim=1) if probs else torch.zeros(B, 0, vocab, device=pending.device)

    def _record(self, gammas: torch.Tensor, n: torch.Tensor, running: torch.Tensor, rows: int, gamma: int,
                draft_seconds: float, verify_seconds: float) -> None:
        s = self.stats
        drafted, accepted = int(gammas.sum()), int(n[running].sum())
        tried = accepted + int(((n < gammas) & running).sum())  # each rejection is one more trial
        s.steps += 1
        s.row_steps += rows
        s.plain_steps += gamma == 0
        s.drafted += drafted
        s.accepted += accepted
        s.draft_seconds += draft_seconds
        s.verify_seconds += verify_seconds
        self.gamma.observe(gamma, rows, accepted, tried, draft_seconds + verify_seconds)

    def summary(self) -> dict:
        return {**self.stats.as_dict(), **self.gamma.summary(), **self.draft.summary(), "draft_affinity": self.affinity}
