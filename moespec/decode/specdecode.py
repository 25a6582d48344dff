"""Self-assisted speculative decoding for offloaded MoE models (SpecMoE, arXiv 2604.10152).

Each step the model drafts γ tokens per row with its MoE layers restricted to a few pinned draft
experts (`experts/draft.py`: nothing crosses the link while drafting), then the full model scores
every row's pending token and drafts in one pass. That pass routes all B·(γ+1) tokens of a layer
together, so each expert any of them needs is fetched once for all of them: on an offloaded model
a step costs about one plain step's transfers but can emit up to γ+1 tokens per row. Rows keep
the accepted prefix plus one token from the target; the KV cache is cropped back past it.
With γ="auto" (`GammaChooser`) steps fall back to plain decoding, the draft set unpinned, while
measured acceptance and step times say drafting does not pay.

Acceptance keeps the output exactly the target's: greedy keeps drafts equal to the target's argmax
(so the tokens equal plain greedy decoding up to floating-point ties); sampling uses the
speculative-sampling rule (accept d with probability min(1, p(d)/q(d)), else sample the normalised
residual max(0, p − q)), whose output distribution is the target's p (Leviathan et al. 2023,
Chen et al. 2023). p and q are both `filtered_probs`: temperature, top-k and top-p included.
"""

from __future__ import annotations

import math
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
from .generate import plain_step
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

    Adaptive. With per-token acceptance α (a decayed count of accepted vs. tried drafts) a row
    gains E(γ) = (1 − α^(γ+1)) / (1 − α) tokens per step. A step's wall time t(γ), γ draft passes
    plus one verify pass of γ+1 tokens per row, is measured per (γ, batch-size bucket); t(0) is a
    plain step with the draft set released, i.e. plain decoding with the whole cache. An unmeasured γ
    costs the nearest measured one's time plus or minus its measured draft passes, and only the
    best measured γ's neighbours are candidates, so the search climbs one γ at a time.

    Speculation is on only while some γ promises E(γ)/t(γ) > (1 + margin)/t(0): drafting passes
    cost about as much compute as plain steps, so it pays only where verification amortises what
    plain steps spend on the link (large batches, slow links), and at batch 1 it mostly does not.
    It starts plain (to know t(0)), then probes γ=`start`. While off it probes the most
    promising γ again after enough plain steps that a failed probe, its excess time t(γ) + the
    refill's time − E(γ)·t(0), stays within `probe_budget` of the time spent plain; each failure in
    a row doubles the wait. While on, every `probe_every` steps it re-measures plain, γ−1 or γ+1 in
    turn, since the best γ moves with the text and the cache state; plain first, since the first
    plain steps ran on the cache the prefill left and may have cost more than plain steps do later.
    """

    def __init__(self, gamma: int | str = "auto", max_gamma: int = AUTO_MAX_GAMMA, start: int = 1,
                 probe_every: int = 8, ema: float = 0.3, decay: float = 0.9, margin: float = 0.05,
                 probe_budget: float = 0.02, max_wait: int = 512):
        if gamma != "auto" and not (isinstance(gamma, int) and not isinstance(gamma, bool) and gamma >= 0):
            raise MoespecError(f"gamma must be a non-negative integer or 'auto', got {gamma!r}")
        self.setting = gamma
        self.fixed = None if gamma == "auto" else gamma
        self.max_gamma, self.start, self.probe_every = max_gamma, min(start, max_gamma), probe_every
        self.ema, self.decay, self.margin, self.probe_budget, self.max_wait = ema, decay, margin, probe_budget, max_wait
        self.cost: dict[int, dict[int, float]] = {}  # batch bucket -> γ -> seconds per step (EMA)
        self.samples: dict[int, dict[int, int]] = {}  # batch bucket -> γ -> steps measured
        self.draft_pass: dict[int, float] = {}  # batch bucket -> seconds per draft pass (EMA)
        self.fill_seconds = 0.0  # pinning the draft set again after a plain phase (EMA)
        self.accepted, self.tried = 1.0, 2.0  # a uniform prior on α
        self.steps = 0
        self.next_probe: int | None = None  # while off: the step that tries drafting again
        self.failures = 0  # probes in a row that found drafting not paying
        self.previous: int | None = None  # γ of the last step (None: a prefill ran since)
        self.settling = False  # the last step was plain after drafting (or a prefill): not measured

    @property
    def alpha(self) -> float:
        return min(self.accepted / self.tried, 0.99)

    def expected_tokens(self, gamma: int) -> float:
        a = self.alpha
        return (1 - a ** (gamma + 1)) / (1 - a)

    def predicted_cost(self, bucket: int, gamma: int) -> float:
        """t(γ) as measured, or for an unmeasured γ ≥ 1 the nearest measured γ' ≥ 1's time plus
        (or minus) γ − γ' draft passes: the verify pass routes all B·(γ+1) tokens at once, so on a
        link-bound step its cost moves little with γ. Climbing on this is optimistic, and each
        γ it sends a step to is measured there."""
        costs = self.cost[bucket]
        if gamma in costs:
            return costs[gamma]
        near = min((g for g in costs if g > 0), key=lambda g: (abs(g - gamma), g))
        return max(1e-9, costs[near] + (gamma - near) * self.draft_pass[bucket])

    def _bucket(self, rows: int) -> int:
        """The batch-size bucket of `rows`; a new one (rows finish at different steps) starts from
        the nearest measured bucket instead of exploring again."""
        bucket = rows.bit_length()
        if bucket not in self.cost and self.cost:
            nearest = min(self.cost, key=lambda b: abs(b - bucket))
            self.cost[bucket] = dict(self.cost[nearest])
            self.samples[bucket] = dict(self.samples[nearest])
            self.draft_pass[bucket] = self.draft_pass[nearest]
        self.cost.setdefault(bucket, {})
        self.samples.setdefault(bucket, {})
        self.draft_pass.setdefault(bucket, 0.0)
        return bucket

    def _best_drafting(self, bucket: int) -> tuple[int, float]:
        """The γ ≥ 1 with the most expected tokens per second, and that rate: measured γs and the
        best measured one's neighbours (so a predicted cost never sends a step far away)."""
        rate = {g: self.expected_tokens(g) / c for g, c in self.cost[bucket].items() if g > 0}
        best = max(rate, key=rate.get)
        for g in (best - 1, best + 1):
            if 1 <= g <= self.max_gamma and g not in rate:
                rate[g] = self.expected_tokens(g) / self.predicted_cost(bucket, g)
        best = max(rate, key=rate.get)
        return best, rate[best]

    def choose(self, rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        self.steps += 1
        bucket = self._bucket(rows)
        costs = self.cost[bucket]
        if self.settling or (len(costs) <= 1 and self.samples[bucket].get(0, 0) < 2):
            return 0
        if len(costs) == 1:
            return self.start
        gamma, rate = self._best_drafting(bucket)
        if rate > (1 + self.margin) / costs[0]:
            self.next_probe, self.failures = None, 0
            if self.steps % self.probe_every:
                return gamma
            turn = (self.steps // self.probe_every) % 3
            return (min(gamma + 1, self.max_gamma), 0, max(gamma - 1, 0))[turn]
        if self.next_probe is None:  # drafting does not pay (any more): plain steps until the next probe
            excess = self.predicted_cost(bucket, gamma) + self.fill_seconds - self.expected_tokens(gamma) * costs[0]
            wait = max(1, math.ceil(excess / (self.probe_budget * costs[0])))
            self.next_probe = self.steps + min(wait << self.failures, self.max_wait)
            self.failures += 1
        if self.steps < self.next_probe:
            return 0
        self.next_probe = None
        return gamma

    def observe(self, gamma: int, rows: int, accepted: int, tried: int, seconds: float | None,
                draft_seconds: float = 0.0, fill_seconds: float = 0.0) -> None:
        """A step with `gamma` over `rows` running rows kept `accepted` of `tried` drafts in `seconds`,
        `draft_seconds` of them drafting (seconds None: not a γ step's usual cost, e.g. rows near
        their budget drafted fewer), after `fill_seconds` pinning the draft set again."""
        if tried:
            self.accepted = self.decay * self.accepted + accepted
            self.tried = self.decay * self.tried + tried
        if fill_seconds:
            self.fill_seconds = self._average(self.fill_seconds, fill_seconds, self.ema if self.fill_seconds else 1.0)
        # the first plain step after drafting or a prefill pays for experts they displaced: a
        # switch's cost, not a plain step's, so it is not measured (and one more plain step is);
        # the next one starts t(0) afresh, since plain steps measured in an earlier phase ran on
        # a colder cache
        fresh = gamma == 0 and self.settling
        self.settling = gamma == 0 and self.previous != 0
        self.previous = gamma
        if seconds is None or self.settling:
            return
        bucket = self._bucket(rows)
        costs, n = self.cost[bucket], self.samples[bucket]
        n[gamma] = 1 if fresh else n.get(gamma, 0) + 1
        w = max(self.ema, 1 / n[gamma])  # the mean of the first few, then an EMA
        costs[gamma] = self._average(costs.get(gamma, 0.0), seconds, w)
        if gamma:
            passes = sum(c for g, c in n.items() if g > 0)
            self.draft_pass[bucket] = self._average(self.draft_pass[bucket], draft_seconds / gamma,
                                                    max(self.ema, 1 / passes))

    def restart(self) -> None:
        """A new generate call: its prefill has run since the last step."""
        self.previous = None

    @staticmethod
    def _average(old: float, new: float, weight: float) -> float:
        return (1 - weight) * old + weight * new

    def summary(self) -> dict:
        return {"gamma": self.setting, "alpha_estimate": self.alpha,
                "step_seconds_by_gamma": {f"batch<{2 ** b}": dict(sorted(c.items())) for b, c in self.cost.items()},
                "draft_pass_seconds": {f"batch<{2 ** b}": t for b, t in self.draft_pass.items()}}


@dataclass
class SpecStats:
    steps: int = 0  # decode steps (drafting ones and plain ones)
    row_steps: int = 0  # running rows summed over steps
    plain_steps: int = 0  # steps without drafts (speculation off, or every row's budget nearly spent)
    drafted: int = 0  # draft tokens proposed to verification
    accepted: int = 0  # of those, kept
    fill_seconds: float = 0.0  # pinning the draft set (first fill and refills after plain phases)
    draft_seconds: float = 0.0  # draft passes
    verify_seconds: float = 0.0  # verify passes of steps with drafts
    plain_seconds: float = 0.0  # plain steps (speculation off)

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
        if self.affinity == "outputs" and not self.draft.fills:
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
        self.gamma.restart()
        self.model.hooks.append(self.routing)
        try:
            yield
        finally:
            self.model.hooks.remove(self.routing)

    def __call__(self, cache: KVCache, pending: torch.Tensor, running: torch.Tensor, remaining: torch.Tensor,
                 params: SamplingParams, generator: torch.Generator | None) -> list[list[int]]:
        rows = int(running.sum())
        gamma = self.gamma.choose(rows)
        t0 = time.perf_counter()
        if not gamma:  # speculation off: a plain decoding step, with the whole cache
            if self.draft.filled:
                self.draft.release()
            out = plain_step(self.model, self.experts, cache, pending, running, params, generator)
            self._record_plain(rows, time.perf_counter() - t0)
            return out
        refill = not self.draft.filled
        if refill:
            table = self._affinity_table()  # made once per reset: not what a refill costs
            t0 = time.perf_counter()
            self.draft.fill(table)
        t1 = time.perf_counter()
        # a row never drafts past its token budget: its positions stay inside the KV cache
        gammas = torch.where(running, (remaining - 1).clamp(min=0, max=gamma), 0)
        drafts, draft_probs = self._draft(cache, pending, gammas, params, generator)
        t2 = time.perf_counter()
        start = cache.lengths.clone()
        tokens = torch.cat([pending[:, None], drafts], dim=1)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= gammas[:, None]
        hidden = self.model(tokens, cache, self.verify_provider, valid=valid & running[:, None])
        n, nxt = accept(self.model.logits(hidden), drafts, draft_probs, gammas, params, generator)
        cache.crop(torch.arange(len(pending), device=start.device), torch.where(running, start + n + 1, start))
        out = [d[:k] + [t] if run else [] for d, k, t, run in
               zip(drafts.tolist(), n.tolist(), nxt.tolist(), running.tolist())]
        t3 = time.perf_counter()
        self._record(gamma, gammas, n, running, rows, t1 - t0 if refill else 0.0, t2 - t1, t3 - t2)
        return out

    def _affinity_table(self) -> dict[int, torch.Tensor] | None:
        if self.affinity == "router":
            return None
        if self.draft.fills:  # a refill after a plain phase: the table chosen at the first fill
            return self.draft.distances
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

    def _record_plain(self, rows: int, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.row_steps += rows
        s.plain_steps += 1
        s.plain_seconds += seconds
        self.gamma.observe(0, rows, 0, 0, seconds)

    def _record(self, gamma: int, gammas: torch.Tensor, n: torch.Tensor, running: torch.Tensor, rows: int,
                fill_seconds: float, draft_seconds: float, verify_seconds: float) -> None:
        s = self.stats
        drafted, accepted = int(gammas.sum()), int(n[running].sum())
        tried = accepted + int(((n < gammas) & running).sum())  # each rejection is one more trial
        s.steps += 1
        s.row_steps += rows
        s.plain_steps += drafted == 0  # every row's budget is nearly spent
        s.drafted += drafted
        s.accepted += accepted
        s.fill_seconds += fill_seconds
        s.draft_seconds += draft_seconds
        s.verify_seconds += verify_seconds
        # a step whose rows drafted fewer than γ (budgets nearly spent) does not tell what γ costs
        typical = int(gammas.max()) == gamma
        self.gamma.observe(gamma, rows, accepted, tried, draft_seconds + verify_seconds if typical else None,
                           draft_seconds, fill_seconds)

    def summary(self) -> dict:
        return {**self.stats.as_dict(), **self.gamma.summary(), **self.draft.summary(), "draft_affinity": self.affinity}
