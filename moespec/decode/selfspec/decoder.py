"""The self-speculative step kind: draft γ tokens with draft experts, verify them in one pass."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from ...config import SpecDecodeConfig
from ...experts.base import DeviceExperts, ExpertWeights
from ...experts.store import ExpertStore
from ...hooks import ForwardHooks
from ...model.kv_cache import KVCache
from ...model.transformer import Transformer
from ..engine import PlainStep
from ..sampling import RowSampling, filtered_probs
from .acceptance import _draw, accept
from .affinity import SAMPLES_PER_LAYER, expert_distances, output_distances
from .draft import DraftExperts
from .gamma import GammaChooser


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

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)

    @property
    def tokens_per_step(self) -> float:
        """Tokens per row per step."""
        return (self.accepted + self.row_steps) / max(self.row_steps, 1)

    @property
    def mean_gamma(self) -> float:
        return self.drafted / max(self.row_steps, 1)

    def as_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_step": self.tokens_per_step,
                "mean_gamma": self.mean_gamma}


@dataclass
class SpecDecodeStats:
    """Self-speculative decoding since the decoder was made: counters, the γ choice's measurements
    and the draft set."""

    counters: SpecStats
    gamma: dict
    draft: dict
    draft_affinity: str

    def as_dict(self) -> dict:
        return {**self.counters.as_dict(), **self.gamma, **self.draft, "draft_affinity": self.draft_affinity}


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
            return self.draft.restrict(layer, moe.gate(x), ids, moe.router)
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

    def __init__(self, experts: DeviceExperts, draft: DraftExperts):
        self.experts, self.draft = experts, draft

    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        for e, w in self.experts.fetch(layer, ids, tokens):
            self.draft.offer(layer, e)
            yield e, w


class SelfSpeculativeDecoder:
    """A StepKind of the engine loop: draft γ tokens per row with draft experts, verify in one pass."""

    def __init__(self, model: Transformer, experts: DeviceExperts, store: ExpertStore, cfg: SpecDecodeConfig,
                 weight_distances: dict[int, torch.Tensor] | None = None):
        spec = model.spec
        n = cfg.draft_experts if cfg.draft_experts is not None else max(1, min(spec.top_k, experts.pin_limit))
        self.model, self.experts, self.store, self.cfg = model, experts, store, cfg
        self.draft = DraftExperts(experts, spec.moe_layer_ids, spec.num_experts, n, cfg.draft_policy,
                                  model.embed_tokens.weight.device)
        self.gamma = GammaChooser(cfg.gamma)
        self.affinity, self.weight_distances = cfg.draft_affinity, weight_distances  # the weight table is kept
        self.routing = _Routing(model, self.draft, self.affinity)
        self.verify_provider = _VerifyTap(experts, self.draft)
        self.plain = PlainStep(model, experts)
        self.stats = SpecStats()

    @classmethod
    def configure(cls, current: SelfSpeculativeDecoder | None, model: Transformer, experts: DeviceExperts,
                  store: ExpertStore, cfg: SpecDecodeConfig) -> SelfSpeculativeDecoder:
        """The decoder for `cfg`: `current` if its draft set matches (the set and measurements carry
        over between calls; a new γ setting restarts only the γ choice), else a new one reusing
        its weight-affinity table."""
        if current is not None and (current.cfg.draft_experts, current.cfg.draft_policy, current.affinity) == \
                (cfg.draft_experts, cfg.draft_policy, cfg.draft_affinity):
            if current.cfg.gamma != cfg.gamma:
                current.gamma = GammaChooser(cfg.gamma)
            current.cfg = cfg
            return current
        weights = None
        if current is not None:
            current.draft.reset()
            weights = current.weight_distances
        return cls(model, experts, store, cfg, weights)

    def reset(self) -> None:
        """A cold start: draft experts unpinned and chosen again, counters and measured costs zeroed."""
        self.draft.reset()
        self.routing.samples.clear()
        self.stats = SpecStats()
        self.gamma = GammaChooser(self.cfg.gamma)

    @contextmanager
    def attached(self) -> Iterator[SelfSpeculativeDecoder]:
        """Route hooks installed while the decoder runs (a generate call, or a server's lifetime):
        the prefills' routing seeds the draft set."""
        self.model.hooks.append(self.routing)
        try:
            yield self
        finally:
            self.model.hooks.remove(self.routing)

    def after_prefill(self) -> None:
        self.gamma.restart()

    def __call__(self, cache: KVCache, rows: torch.Tensor, pending: torch.Tensor, remaining: torch.Tensor,
                 sampling: RowSampling) -> list[list[int]]:
        B = len(rows)
        gamma = self.gamma.choose(B)
        t0 = time.perf_counter()
        if not gamma:  # speculation off: a plain decoding step, with the whole cache
            if self.draft.filled:
                self.draft.release()
            out = self.plain(cache, rows, pending, remaining, sampling)
            self._record_plain(B, time.perf_counter() - t0)
            return out
        refill = not self.draft.filled
        if refill:
            table = self._affinity_table()  # made once per reset: not what a refill costs
            t0 = time.perf_counter()
            self.draft.fill(table)
        t1 = time.perf_counter()
        # a row never drafts past its token budget: its positions stay inside the KV cache
        gammas = (remaining - 1).clamp(min=0, max=gamma)
        drafts, draft_probs = self._draft(cache, rows, pending, gammas, sampling)
        t2 = time.perf_counter()
        start = cache.lengths[rows].clone()
        tokens = torch.cat([pending[:, None], drafts], dim=1)
        valid = torch.arange(tokens.shape[1], device=tokens.device)[None] <= gammas[:, None]
        hidden = self.model(tokens, cache, self.verify_provider, rows=rows, valid=valid)
        logits = self.model.logits(hidden)
        n, nxt = torch.empty_like(pending), torch.empty_like(pending)
        for idx, params, generator in sampling.groups:
            probs = None if params.temperature == 0 else draft_probs[idx]
            n[idx], nxt[idx] = accept(logits[idx], drafts[idx], probs, gammas[idx], params, generator)
        cache.crop(rows, start + n + 1)
        out = [d[:k] + [t] for d, k, t in zip(drafts.tolist(), n.tolist(), nxt.tolist())]
        t3 = time.perf_counter()
        self._record(gamma, gammas, n, B, t1 - t0 if refill else 0.0, t2 - t1, t3 - t2)
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

    def _draft(self, cache: KVCache, rows: torch.Tensor, pending: torch.Tensor, gammas: torch.Tensor,
               sampling: RowSampling) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Drafts [B, G] (G = max γ) from the draft model, and their distributions [B, G, V] (None
        when every row is greedy). The cache is rolled back afterwards: verification rewrites
        those positions."""
        B, G = len(pending), int(gammas.max())
        start = cache.lengths[rows].clone()
        drafts = torch.zeros(B, G, dtype=torch.long, device=pending.device)
        probs = None if sampling.greedy else torch.zeros(B, G, self.model.spec.vocab_size, device=pending.device)
        token = pending
        self.routing.drafting = True
        try:
            for j in range(G):
                hidden = self.model(token[:, None], cache, self.draft, rows=rows, valid=(gammas > j)[:, None])
                logits = self.model.logits(hidden[:, 0])
                token = torch.empty_like(pending)
                for idx, params, generator in sampling.groups:
                    if params.temperature == 0:
                        token[idx] = logits[idx].argmax(dim=-1)
                    else:
                        probs[idx, j] = q = filtered_probs(logits[idx], params)
                        token[idx] = _draw(q, generator)
                drafts[:, j] = token
        finally:
            self.routing.drafting = False
            cache.crop(rows, start)
        return drafts, probs

    def _record_plain(self, rows: int, seconds: float) -> None:
        s = self.stats
        s.steps += 1
        s.row_steps += rows
        s.plain_steps += 1
        s.plain_seconds += seconds
        self.gamma.observe(0, rows, 0, 0, seconds)

    def _record(self, gamma: int, gammas: torch.Tensor, n: torch.Tensor, rows: int,
                fill_seconds: float, draft_seconds: float, verify_seconds: float) -> None:
        s = self.stats
        drafted, accepted = int(gammas.sum()), int(n.sum())
        tried = accepted + int((n < gammas).sum())  # each rejection is one more trial
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

    def summary(self) -> SpecDecodeStats:
        return SpecDecodeStats(self.stats, self.gamma.summary(), self.draft.summary(), self.affinity)
