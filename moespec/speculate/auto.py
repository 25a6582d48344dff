"""`prefetch="auto"`: measure whether prefetching pays on this model, link and batch, and turn it off when it does not.

Guessing costs compute on every layer; it pays only where the stalls it hides are larger. Which
side wins depends on the link, the cache size, the batch and the text, so the switch measures it:
decode steps alternate between phases with guessing on and off, each phase's step time is an
exponential average per batch-size bucket, and the faster mode runs. The slower mode is probed
again after a wait that doubles each time the probe confirms it is slower (up to `max_wait`
steps), so a wrong mode costs a bounded share of the run and a change (the cache warming up,
another batch size) is still found. The first step of each phase is not measured: it pays for
the switch (guesses not yet made, or made for nothing). The first `_warming` decode steps
are not measured at all, and exploration measures on demand, then guessing, then on demand
again, afresh: steps soon after a prefill run on a colder cache than later ones (more misses,
more stall), and judged on them on demand would look slower, and stall more, than it does.

Every phase of the mode that is not known to win, the first try of guessing included, waits
until its failure would cost at most `budget` of the time spent since the last one: a phase of
`phase_steps` steps that is `loss` slower per step waits phase_steps × loss / budget steps of the
winner, with `loss` measured, or before guessing has run `assumed_loss` (guessing cost 5-43%
of an on-demand batch-1 step in this project's link sweeps). So a short run never pays for a try
that loses (a run of 32 tokens stays on demand), and a long one tries guessing after about 35
steps; as with `gamma="auto"`, auto is never slower than on demand by more than the budget.

Prefetching can at most win back the time compute waits for copies, and guessing costs its own
time. So where on-demand steps stall for less than `min_stall` of their time (a fast link, a
cache that holds what the text uses), or for less than guessing was measured to cost a step,
guessing is not tried, and a probe is skipped (its wait still doubles) while that holds: a run of
32 tokens cannot amortise a probe that cannot pay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PrefetchSwitch:
    """Decides per decode step whether the speculation guesses (True) or stays on demand (False)."""

    phase_steps: int = 4  # steps per probe (and the first wait)
    margin: float = 0.02  # prefetching must be this much faster to stay on
    budget: float = 0.03  # a phase of the mode not known to win may cost this share of the time since the last
    assumed_loss: float = 0.25  # how much slower a guessing step is before it has been measured
    min_stall: float = 0.05  # on-demand steps must stall this share of their time for guessing to be tried
    ema: float = 0.3
    max_wait: int = 256
    cost: dict[tuple[int, bool], float] = field(default_factory=dict)  # (bucket, on) -> seconds per step
    stall: dict[int, float] = field(default_factory=dict)  # bucket -> on-demand steps' stall seconds per step
    guess: dict[int, float] = field(default_factory=dict)  # bucket -> guessing steps' own guess seconds per step
    on: bool = False  # on demand first: the baseline is measured before anything is risked
    switches: int = 0
    on_steps: int = 0
    off_steps: int = 0
    _left: int = 0  # steps left in the current phase
    _probing: bool = False  # the current phase measures the mode that lost
    _skip: bool = False  # the next observed step pays for a switch: not measured
    _warming: int = 4  # the first decode steps run on the cache a prefill left: not measured
    _wait: dict[int, int] = field(default_factory=dict)  # bucket -> steps the winner runs between probes
    _rechecked: set[int] = field(default_factory=set)  # buckets whose on-demand cost was measured again
    _off: dict[int, int] = field(default_factory=dict)  # bucket -> on-demand steps chosen so far

    def choose(self, rows: int) -> bool:
        """Whether the next decode step over `rows` rows guesses."""
        b = rows.bit_length()
        if self._left <= 0:
            self._next_phase(b)
        self._left -= 1
        self._off[b] = self._off.get(b, 0) + (not self.on)
        self.on_steps += self.on
        self.off_steps += not self.on
        return self.on

    def _next_phase(self, b: int) -> None:
        if (b, False) not in self.cost:
            self._start(False, self.phase_steps, probing=False)
            return
        if self._hopeless(b):  # counts as a probe that confirmed on demand
            self._wait[b] = min(2 * self._wait.get(b, self.phase_steps), self.max_wait)
            self._start(False, self._wait[b], probing=False)
            return
        if (b, True) not in self.cost:  # the first try, once its failure fits the budget
            wait = self._budget_wait(self.assumed_loss) - self._off.get(b, 0)
            self._start(wait <= 0, self.phase_steps if wait <= 0 else wait, probing=False)
            return
        if b not in self._rechecked:  # on demand again, on the warmer cache guessing ran on
            self._rechecked.add(b)
            del self.cost[(b, False)]
            self._start(False, self.phase_steps, probing=False)
            return
        best = self.cost[(b, True)] * (1 + self.margin) < self.cost[(b, False)]
        if self._probing or self.on != best:
            # a probe or the exploration ended: the winner runs; a loser confirmed waits twice as long
            confirmed = self._probing and self.on != best
            wait = min(2 * self._wait.get(b, self.phase_steps), self.max_wait) if confirmed else self.phase_steps
            self._wait[b] = wait
            loss = self.cost[(b, not best)] / self.cost[(b, best)] - 1
            self._start(best, max(wait, self._budget_wait(loss)), probing=False)
        else:
            self._start(not best, self.phase_steps, probing=True)

    def _budget_wait(self, loss: float) -> int:
        """Steps of the winner before a phase `loss` slower per step fits the budget."""
        return math.ceil(self.phase_steps * max(loss, 0.0) / self.budget)

    def _hopeless(self, b: int) -> bool:
        """On demand stalls too little for guessing to win it back (unknown stalls: not hopeless)."""
        return b in self.stall and self.stall[b] < max(self.min_stall * self.cost[(b, False)], self.guess.get(b, 0.0))

    def _start(self, on: bool, steps: int, probing: bool) -> None:
        if on != self.on:
            self.switches += 1
            self._skip = True
        self.on, self._left, self._probing = on, steps, probing

    def observe(self, rows: int, seconds: float, stalled: float | None = None, guessing: float = 0.0) -> None:
        """The last decode step over `rows` rows took `seconds`, `stalled` of them waiting for
        copies (None: not known) and `guessing` of them guessing."""
        if self._warming > 0:
            self._warming -= 1
            return
        if self._skip:
            self._skip = False
            return
        key = (rows.bit_length(), self.on)
        self.cost[key] = self._average(self.cost.get(key), seconds)
        if stalled is not None and not self.on:
            self.stall[key[0]] = self._average(self.stall.get(key[0]), stalled)
        if self.on:
            self.guess[key[0]] = self._average(self.guess.get(key[0]), guessing)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ema) * old + self.ema * new

    def as_dict(self) -> dict:
        return {"on_steps": self.on_steps, "off_steps": self.off_steps, "switches": self.switches,
                "step_seconds": {f"batch<{2 ** b} {'on' if on else 'off'}": c for (b, on), c in self.cost.items()},
                "on_demand_stall_seconds": {f"batch<{2 ** b}": s for b, s in self.stall.items()},
                "guess_seconds": {f"batch<{2 ** b}": g for b, g in self.guess.items()}}
