"""Choosing γ, the drafts per row of a self-speculative step: fixed, or adaptive from measurements."""

from __future__ import annotations

import math

from ...errors import MoespecError

AUTO_MAX_GAMMA = 10


class GammaChooser:
    """Picks γ (drafts per row) for each step: fixed, or adaptive from measured acceptance and cost.

    Adaptive. With per-token acceptance α (a decayed count of accepted vs. tried drafts) a row
    gains E(γ) = (1 − α^(γ+1)) / (1 − α) tokens per step. A step's wall time t(γ), γ draft passes
    plus one verify pass of γ+1 tokens per row, is measured per (γ, batch-size bucket); t(0) is a
    plain step with the draft set released, i.e. plain decoding with the whole cache. An unmeasured γ
    costs the nearest measured one's time plus or minus its measured draft passes, and only the
    best measured γ's neighbours are candidates, so the search climbs one γ at a time.

    Speculation is on only while some measured γ's speed-up E(γ)·t(0)/t(γ) beats 1 + margin by
    more than its relative standard error (both times' errors in quadrature). Drafting passes cost
    about as much compute as plain steps, so it pays only where verification amortises what plain
    steps spend on the link (large batches, slow links), and at batch 1 it mostly does not. There
    a step's time swings with which experts its one token needs (tiny-qwen2moe, 25% cache,
    0.25 GB/s: plain steps of 4-11 ms), so a few steps' means cannot tell a 5% margin from noise.
    It starts plain (to know t(0)). Every probe of drafting, the first included, waits for enough
    plain steps that its failure would cost at most `probe_budget` of the time spent plain: its
    excess time t(γ) + the refill's time + the extra cost of the plain step after it (drafting
    displaced experts plain steps use) − t(0) (a failed probe, its drafts all rejected, still
    yields one token), and before anything is measured one plain step's time. So a short run
    never pays for a probe (auto is never much slower than plain decoding), and a long one tries
    drafting after about 1/`probe_budget` steps; each failure in a row doubles the wait. While on,
    every `probe_every` steps it re-measures plain, γ−1 or γ+1 in turn, since the best γ moves
    with the text and the cache state; plain first, since the first plain steps ran on the cache
    the prefill left and may have cost more than plain steps do later.
    """

    def __init__(self, gamma: int | str = "auto", max_gamma: int = AUTO_MAX_GAMMA, start: int = 1,
                 probe_every: int = 8, ema: float = 0.3, decay: float = 0.9, margin: float = 0.05,
                 probe_budget: float = 0.03, max_wait: int = 512, settle_steps: int = 2):
        if gamma != "auto" and not (isinstance(gamma, int) and not isinstance(gamma, bool) and gamma >= 0):
            raise MoespecError(f"gamma must be a non-negative integer or 'auto', got {gamma!r}")
        self.setting = gamma
        self.fixed = None if gamma == "auto" else gamma
        self.max_gamma, self.start, self.probe_every = max_gamma, min(start, max_gamma), probe_every
        self.ema, self.decay, self.margin, self.probe_budget, self.max_wait = ema, decay, margin, probe_budget, max_wait
        self.settle_steps = settle_steps  # plain steps after drafting not measured as plain decoding
        self.cost: dict[int, dict[int, float]] = {}  # batch bucket -> γ -> seconds per step (EMA)
        self.spread: dict[int, dict[int, float]] = {}  # batch bucket -> γ -> variance of those seconds (EMA)
        self.samples: dict[int, dict[int, int]] = {}  # batch bucket -> γ -> steps measured
        self.draft_pass: dict[int, float] = {}  # batch bucket -> seconds per draft pass (EMA)
        self.fill_seconds = 0.0  # pinning the draft set again after a plain phase (EMA)
        self.settle_seconds = 0.0  # what the first plain step after drafting costs beyond t(0) (EMA)
        self.accepted, self.tried = 1.0, 2.0  # a uniform prior on α
        self.steps = 0
        self.next_probe: int | None = None  # while off: the step that tries drafting again
        self.failures = 0  # probes in a row that found drafting not paying
        self.previous: int | None = None  # γ of the last step (None: a prefill ran since)
        self.settling = False  # the last step was plain right after drafting (or a prefill): not measured
        self.unsettled = 0  # plain steps after drafting (or a prefill) still to leave unmeasured

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
            self.spread[bucket] = dict(self.spread[nearest])
            self.samples[bucket] = dict(self.samples[nearest])
            self.draft_pass[bucket] = self.draft_pass[nearest]
        self.cost.setdefault(bucket, {})
        self.spread.setdefault(bucket, {})
        self.samples.setdefault(bucket, {})
        self.draft_pass.setdefault(bucket, 0.0)
        return bucket

    def _error(self, bucket: int, gamma: int) -> float:
        """The standard error of t(γ): its measured spread over the steps the average holds (an
        EMA of weight w holds about (2 − w)/w). A γ without a spread yet (one step) is taken to
        swing as much, relative to its time, as plain steps do."""
        n = min(self.samples[bucket][gamma], (2 - self.ema) / self.ema)
        var = self.spread[bucket].get(gamma)
        if var is None:
            var = self.spread[bucket].get(0, 0.0) * (self.cost[bucket][gamma] / self.cost[bucket][0]) ** 2
        return math.sqrt(var / n)

    def _best_drafting(self, bucket: int) -> tuple[bool, int]:
        """Whether a *measured* γ ≥ 1 pays beyond the margin and the noise, and the γ to run next:
        the best of the measured γs and the best one's neighbours (so a predicted cost never sends
        a step far away). Only a measurement turns speculation on: a predicted cost is optimistic
        (a verify pass of more tokens may need more experts), so a neighbour that only promises
        to pay is tried as a probe, within the budget, not run as if it paid."""
        costs = self.cost[bucket]
        rate = {g: self.expected_tokens(g) / c for g, c in costs.items() if g > 0}
        best = max(rate, key=rate.get)
        noise0 = (self._error(bucket, 0) / costs[0]) ** 2
        pays = any(self.expected_tokens(g) * costs[0] / costs[g]
                   > (1 + self.margin) * (1 + math.sqrt(noise0 + (self._error(bucket, g) / costs[g]) ** 2))
                   for g in rate)
        for g in (best - 1, best + 1):
            if 1 <= g <= self.max_gamma and g not in rate:
                rate[g] = self.expected_tokens(g) / self.predicted_cost(bucket, g)
        return pays, max(rate, key=rate.get)

    def choose(self, rows: int) -> int:
        if self.fixed is not None:
            return self.fixed
        self.steps += 1
        bucket = self._bucket(rows)
        costs = self.cost[bucket]
        if self.settling or (len(costs) <= 1 and self.samples[bucket].get(0, 0) < 2):
            return 0
        if len(costs) == 1:  # only plain measured: a first probe, once it fits the budget
            return self._probe(self.start, excess=costs[0], t0=costs[0])
        pays, gamma = self._best_drafting(bucket)
        if pays:
            self.next_probe, self.failures = None, 0
            if self.steps % self.probe_every:
                return gamma
            turn = (self.steps // self.probe_every) % 3
            return (min(gamma + 1, self.max_gamma), 0, max(gamma - 1, 0))[turn]
        # what the probe costs if it fails, all its drafts rejected: its time, the refill and the
        # plain step after it, less the one token even such a step yields (counting the tokens
        # acceptance promised instead, a batch-1 probe of γ=2, whose cost γ=1's time predicted at
        # about half what it was, came 11-21 steps after γ=1's: 0.96x plain over 64 tokens)
        excess = self.predicted_cost(bucket, gamma) + self.fill_seconds + self.settle_seconds - costs[0]
        return self._probe(gamma, excess, costs[0])

    def _probe(self, gamma: int, excess: float, t0: float) -> int:
        """Drafting does not pay, or is unmeasured: plain steps (of `t0` seconds) until a probe of
        `gamma`, whose failure would cost `excess` seconds, fits the budget; then `gamma` once."""
        if self.next_probe is None:
            wait = max(1, math.ceil(excess / (self.probe_budget * t0)))
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
        # the first plain step after a prefill, and the first `settle_steps` after drafting, pay
        # for experts those displaced: a switch's cost, not a plain step's, so they are not
        # measured (one step after drafting was too few: refilling took two under LFRU eviction,
        # and the second, taken for t(0), made batch-1 drafting look paying); the next one starts
        # t(0) afresh, since plain steps measured in an earlier phase ran on a colder cache
        settled_before = self.settling
        if gamma == 0 and self.previous != 0:
            self.unsettled = self.settle_steps if self.previous else 1
        self.settling = gamma == 0 and self.unsettled > 0
        self.unsettled -= self.settling
        fresh = gamma == 0 and settled_before and not self.settling
        bucket = self._bucket(rows)
        if gamma == 0 and self.previous and seconds is not None and 0 in self.cost[bucket]:
            extra = max(0.0, seconds - self.cost[bucket][0])
            self.settle_seconds = self._average(self.settle_seconds, extra, self.ema if self.settle_seconds else 1.0)
        self.previous = gamma
        if seconds is None or self.settling:
            return
        costs, spread, n = self.cost[bucket], self.spread[bucket], self.samples[bucket]
        n[gamma] = 1 if fresh else n.get(gamma, 0) + 1
        w = max(self.ema, 1 / n[gamma])  # the mean of the first few, then an EMA
        if n[gamma] > 1:  # a fresh start keeps the spread: it is the workload's; the mean moved with the cache
            spread[gamma] = (1 - w) * (spread.get(gamma, 0.0) + w * (seconds - costs[gamma]) ** 2)
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


