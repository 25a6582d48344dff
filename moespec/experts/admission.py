"""Which guessed experts may take a slot of the device expert cache, and whom they may displace.

A guess and a resident are weighed as chances of the same event, "used the next time its layer
runs", each measured on the run itself (odds.py, per tenth of a score):

- a guess of an expert that is not resident (the only kind that costs a copy), from the score the
  speculation gave it: right guesses are mostly of experts already resident, so a predictor's
  overall precision would flatter the guesses it copies;
- a resident of a layer the predictor has guessed for since it last ran, from the predictor's score
  and its decayed use rate together: how much each is worth differs by model (a good predictor
  of 8 experts says more than recency; a weak guess among 64 says less, and trusting it alone
  evicted experts in use: on tiny-qwen2moe the estimators' hit rate fell from 0.94 to 0.88 with
  the next token guessed, while the bytes moved doubled);
- any other resident, from its decayed use rate, times its chance of surviving demand misses until
  its next use: where every layer misses, demand misses would evict it anyway.

Evidence comes from every run of a layer: its residents, the experts evicted since it last ran
(counting survivors alone would leave always-evicted experts at their prior), and the guesses it
received, copied or not. `worth_it` then prices a displacement by what a right guess was measured
to hide: the share of its copy done by the time compute needed it, per depth of guess (a guess
two layers ahead has about twice the time to land of one a layer ahead).
"""

from __future__ import annotations

import time
from typing import Callable

from ..odds import JointOdds, Odds
from .base import Key

# refusals of a depth's guesses in a row, with none of its right guesses used meanwhile, after which
# each further refusal moves that depth's hidden share a step back toward the link's idle share
STALE_REFUSALS = 32


class Admission:
    """The cache's admission state: live predictions, measured odds, survival and link load."""

    def __init__(self) -> None:
        self.predicted: dict[int, list[float]] = {}  # layer -> each expert's predicted use at its next run
        self.displaced: dict[int, set[int]] = {}  # layer -> experts evicted since the layer last ran
        self.missing_guesses: dict[int, dict[int, float]] = {}  # layer -> {guessed non-resident expert: score}
        self.evicted_by_guess: set[Key] = set()
        self.reuse, self.on_missing_guess = Odds(), Odds()
        self.on_prediction = JointOdds()  # by (predicted use, decayed use rate)
        # share of recent fetches' experts found resident, or evicted only by a guess (an average):
        # the chance a resident survives demand misses until its next use
        self.survival = 0.5
        self.link_busy = 0.0  # share of recent wall time the link was busy (an average)
        # depth of guess -> share of a used guess's copy done when compute needed it (an average)
        self.hidden: dict[int, float] = {}
        self._refused: dict[int, int] = {}  # depth -> its guesses refused since one of its right guesses was used
        self._busy_mark = (time.perf_counter(), 0.0)  # (when, the link's busy seconds then)

    def expected_use(self, key: Key, rate: float) -> float:
        """Estimated chance that keeping `key` (decayed use rate `rate`) makes it a hit the next
        time its layer runs. Evictions by guesses do not count against survival, or guesses would
        cheapen their own victims."""
        predicted = self.predicted.get(key[0])
        if predicted is not None:  # its layer runs within a few layers
            return self.on_prediction(predicted[key[1]], rate)
        return self.reuse(rate) * self.survival

    def guess_value(self, score: float) -> float:
        """What a guess of a non-resident expert with this score is worth."""
        return self.on_missing_guess(score)

    def worth_it(self, guess: float, victim: float, preempts: bool, depth: int = 1) -> bool:
        """Whether a guess made `depth` layers ahead and used with chance `guess` should take the
        slot of a resident that would be a hit with chance `victim` (0: a free slot), in units of
        one copy's time. Gain: a right guess hides the share of its copy that is done when compute
        needs it (`hidden_share`). Cost: an evicted hit becomes a whole miss; and where demand
        copies cannot overtake a guess (`preempts` False: CUDA's in-order stream, a disk read once
        started), a wrong guess's copy delays them as much as the link is busy. A refusal is
        counted: past `STALE_REFUSALS` in a row its depth's share drifts back to the prior."""
        wasted = 0.0 if preempts else (1 - guess) * self.link_busy
        if guess * self.hidden_share(depth) > wasted + victim:
            return True
        refused = self._refused[depth] = self._refused.get(depth, 0) + 1
        if refused > STALE_REFUSALS and depth in self.hidden:
            # nothing measures a share that keeps its guesses out: let it drift back to the prior
            self.hidden[depth] += 0.05 * (1.0 - self.link_busy - self.hidden[depth])
        return False

    def hidden_share(self, depth: int) -> float:
        """The share of a right guess's copy, made `depth` layers ahead, measured to be done when
        compute needed it; until measured, the link's idle share (a copy moved earlier on a
        saturated link saves nothing). The link's load alone priced every guess alike, and turned
        away the deep ones that land in time: on tiny-mixtral at batch 1 (1 GB/s, 25% cache) a
        right guess one layer ahead had 0.57 of its copy done when used, two layers ahead 0.85,
        the next token's first layer all of it, and `estimator-d2+next-token` ran 1.06x on demand
        priced so against 0.96x priced by the link's idle share (compiled, same run)."""
        return self.hidden.get(depth, 1.0 - self.link_busy)

    def guess_used(self, depth: int, done: float) -> None:
        """A guess made `depth` layers ahead is used with `done` (0-1) of its copy done."""
        self.hidden[depth] = 0.9 * self.hidden_share(depth) + 0.1 * done
        self._refused[depth] = 0

    def guessed(self, layer: int, missing: list[tuple[int, float]]) -> None:
        """Guesses of non-resident experts for `layer` (copied or not): evidence when it runs."""
        self.missing_guesses.setdefault(layer, {}).update(missing)

    def evicted(self, victim: Key, by_guess: bool) -> None:
        self.displaced.setdefault(victim[0], set()).add(victim[1])
        if by_guess:
            self.evicted_by_guess.add(victim)

    def layer_runs(self, layer: int, ids: list[int], residents: set[int], rate_of: Callable[[int], float],
                   misses: list[Key], hits: int) -> None:
        """`layer` runs with experts `ids`: count how the scores of its `residents` and of the
        experts evicted since its last run (`rate_of`: an expert's decayed use rate), and of the
        guesses it received, fared; update survival from this run's `hits` and `misses`; spend the
        layer's prediction."""
        predicted = self.predicted.pop(layer, None)
        for e in residents | self.displaced.pop(layer, set()):
            if predicted is not None:
                self.on_prediction.observe(predicted[e], rate_of(e), e in ids)
            else:
                self.reuse.observe(rate_of(e), e in ids)
        for e, score in self.missing_guesses.pop(layer, {}).items():
            self.on_missing_guess.observe(score, e in ids)
        lost_to_guesses = sum(k in self.evicted_by_guess for k in misses)
        self.evicted_by_guess.difference_update((layer, e) for e in ids)
        self.survival = 0.9 * self.survival + 0.1 * (hits + lost_to_guesses) / max(len(ids), 1)

    def measure_link(self, busy_seconds: float, every: float = 0.005) -> None:
        """Update `link_busy` from the transfer engine's total busy seconds, at most every `every`
        seconds of wall time."""
        now = time.perf_counter()
        then, busy_then = self._busy_mark
        if now - then >= every:
            self.link_busy = 0.8 * self.link_busy + 0.2 * min((busy_seconds - busy_then) / (now - then), 1.0)
            self._busy_mark = (now, busy_seconds)
