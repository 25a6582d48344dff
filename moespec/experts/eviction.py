"""Eviction policies for the device expert cache, chosen by name.

A policy only orders resident experts; the cache decides when to evict and which experts are
off-limits (those in use by the running layer or still being copied).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, OrderedDict
from typing import Callable, Protocol

from ..config import Eviction, registry
from .base import Key


class EvictionPolicy(Protocol):
    by_prediction: bool  # the cache chooses demand misses' victims by expected use (Predicted)

    def touch(self, key: Key) -> None:
        """The expert was used (hit or freshly loaded)."""

    def admit(self, key: Key, guess: bool = False) -> None:
        """The expert got a slot: needed now (load), or a `guess` (prefetch), which enters at the
        lowest priority and is promoted by its first use (`touch`)."""

    def forget(self, key: Key) -> None:
        """The expert left the cache."""

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """Which of the resident experts that are `evictable` should go (None: none is)."""

    def layer_runs(self, layer: int) -> None:
        """`layer` runs (its experts are about to be fetched): the clock of policies that age uses."""


class LRU:
    """Evict the expert used least recently."""

    by_prediction = False

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def layer_runs(self, layer: int) -> None:
        """Recency needs no clock."""

    def touch(self, key: Key) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def admit(self, key: Key, guess: bool = False) -> None:
        self.order[key] = None
        self.order.move_to_end(key, last=not guess)

    def forget(self, key: Key) -> None:
        self.order.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        return next((k for k in self.order if evictable(k)), None)  # usually the first few


class LFU(LRU):
    """Evict the expert used least often over the whole run (ties: least recently).

    Counts survive eviction, so an expert that was popular earlier comes back with its history,
    as MoE-Infinity's activation-frequency cache does. Unlike LRU it keeps a stable set resident
    when a step's experts outnumber the slots: batch-4 decoding of tiny-mixtral with half its
    experts' slots had 1% hits under LRU, which cycles through all of them, and 39% under LFU.

    Residents are kept in buckets by use count, each in the order its experts entered it (the
    order of their last use), so a victim is the first evictable expert of the lowest buckets: a
    few lookups, not a pass over every slot (with that pass tiny-qwen2moe's batch-4 decoding with a
    25% cache ran 0.95x of LRU's speed; with buckets 1.05-1.09x).
    """

    def __init__(self) -> None:
        super().__init__()
        self.uses: Counter[Key] = Counter()
        self.buckets: dict[int, OrderedDict[Key, None]] = {}  # use count -> residents, least recent first

    def _enter(self, key: Key, first: bool = False) -> None:
        bucket = self.buckets.setdefault(self.uses[key], OrderedDict())
        bucket[key] = None
        if first:
            bucket.move_to_end(key, last=False)

    def _leave(self, key: Key) -> None:
        count = self.uses[key]
        bucket = self.buckets.get(count)
        if bucket is not None and key in bucket:
            del bucket[key]
            if not bucket:
                del self.buckets[count]

    def touch(self, key: Key) -> None:
        self._leave(key)
        self.uses[key] += 1
        self._enter(key)
        super().touch(key)

    def admit(self, key: Key, guess: bool = False) -> None:
        self._leave(key)
        self._enter(key, first=guess)
        super().admit(key, guess)

    def forget(self, key: Key) -> None:
        self._leave(key)
        super().forget(key)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        for count in sorted(self.buckets):
            key = next((k for k in self.buckets[count] if evictable(k)), None)
            if key is not None:
                return key
        return None


class LFRU:
    """Evict the expert whose uses, each worth half as much every `half_life` runs of its layer,
    add up to the least (ties: guesses first, then least recently entered); uses are remembered
    across evictions, as LFU's counts are.

    Why it is the default: LRU cycles through every expert when a step needs more of them than
    there are slots, and LFU never forgets a topic the text has left.
    Replayed on 2,048 tokens of held-out text's routing (benchmarks/eviction.py, demand misses only,
    batch 1 and 4, 25% and 50% caches), a half-life of 16 runs missed 0.52-0.90x as often as LRU on
    tiny-mixtral and 0.77-0.93x on tiny-qwen2moe, except tiny-mixtral at batch 1 with a 25% cache
    (1.04x); LFU up to 1.16x (half-lives of 8 and 32 runs, replayed on shorter traces, missed within
    a few percent of 16). vLLM's expert-cache PR (#37190) reports its LFRU with 8 slots beating
    LRU with 16.

    A use at its layer's run t adds 2^(t / half_life); a resident's score is the log of that sum,
    so it only grows and the order of two residents never changes while neither is used (their
    decayed counts, exp(score) × 2^(-now / half_life), fall by the same factor). Residents of
    different layers are compared by score directly: every layer runs once per forward pass, so
    their clocks differ by at most one run (a 4% weight). The victim comes off a heap, whose
    entries are moved or dropped as they reach the top (an expert used since it entered, or one
    evicted): a few operations per miss and none per use, not a pass over every slot.
    """

    by_prediction = False

    def __init__(self, half_life: float = 16.0) -> None:
        self.rate = math.log(2) / half_life  # the log-weight of a use grows this much per run
        self.runs: Counter[int] = Counter()  # layer -> runs so far
        self.score: dict[Key, float] = {}  # log of the expert's weighted uses, kept across evictions
        self.entry: dict[Key, tuple[float, int, Key]] = {}  # resident -> its live heap entry
        self.heap: list[tuple[float, int, Key]] = []
        self._order = itertools.count(1)

    def layer_runs(self, layer: int) -> None:
        self.runs[layer] += 1

    def _push(self, key: Key, score: float, first: bool = False) -> None:
        n = next(self._order)
        entry = (score, -n if first else n, key)
        self.entry[key] = entry
        heapq.heappush(self.heap, entry)

    def _with_use(self, key: Key) -> float:
        """The expert's score with a use now added: log(e^score + e^(rate × its layer's runs))."""
        use = self.rate * self.runs[key[0]]
        old = self.score.get(key, -math.inf)
        high, low = (old, use) if old > use else (use, old)
        return high + math.log1p(math.exp(low - high))

    def touch(self, key: Key) -> None:
        """Only the score moves: the heap entry keeps the lower score it had, and `victim` moves
        an entry it finds behind its score (a use costs no heap operation)."""
        self.score[key] = self._with_use(key)

    def admit(self, key: Key, guess: bool = False) -> None:
        """A guess enters with the uses it had; an expert loaded because its layer needs it, as if
        already used (it is, once its copy lands), so it is not checked, busy, at every miss
        until then."""
        if len(self.heap) > 4 * len(self.entry) + 64:  # mostly stale: rebuild from the live entries
            self.heap = list(self.entry.values())
            heapq.heapify(self.heap)
        if guess:
            self._push(key, self.score.get(key, -math.inf), first=True)
        else:
            self._push(key, self._with_use(key))

    def forget(self, key: Key) -> None:
        self.entry.pop(key, None)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        """Scores only grow, so an entry's score is at most its expert's: the first live entry
        on top whose score is current is the least valuable resident."""
        busy, found = [], None
        while self.heap:
            top = self.heap[0]
            key = top[2]
            if self.entry.get(key) is not top:
                heapq.heappop(self.heap)  # evicted, or entered again since
            elif self.score.get(key, -math.inf) > top[0]:
                heapq.heappop(self.heap)  # used since it entered: to its place now
                self._push(key, self.score[key])
            elif evictable(key):
                found = key
                break
            else:
                busy.append(heapq.heappop(self.heap))
        for entry in busy:
            heapq.heappush(self.heap, entry)
        return found


class PinnedHot(LFU):
    """The `hot_share` most-used experts (by slots) never leave; the rest of the slots are LRU."""

    def __init__(self, capacity: int, hot_share: float = 0.5) -> None:
        super().__init__()
        self.hot_slots = int(capacity * hot_share)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        hot = {k for k, _ in self.uses.most_common(self.hot_slots)}
        allowed = [k for k in self.order if evictable(k)]
        return next((k for k in allowed if k not in hot), allowed[0] if allowed else None)


class Predicted(LFRU):
    """Evict the resident least likely to be used soon, by the speculation's predictions: on a
    demand miss the cache weighs the residents of the layers guessed for (each by the measured odds
    of its predicted use) against LFRU's victim among the rest (by its measured reuse) and evicts
    the least valuable (ExpertCache._value_victim). A guess landed for the next layer is then not
    the first victim of a miss just because it has not been used yet. Without speculation nothing
    is predicted and it is LFRU."""

    by_prediction = True


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = registry(Eviction, {  # name -> factory(capacity)
    "lru": lambda capacity: LRU(),
    "lfu": lambda capacity: LFU(),
    "lfru": lambda capacity: LFRU(),
    "pinned_hot": PinnedHot,
    "predicted": lambda capacity: Predicted(),
})


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    return POLICIES[name](capacity)
