"""Eviction policies for the device expert cache, chosen by name.

A policy only orders resident experts; the cache decides when to evict and which experts are
off-limits (those in use by the running layer or still being copied).
"""

from __future__ import annotations

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


class LRU:
    """Evict the expert used least recently."""

    by_prediction = False

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

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


class PinnedHot(LFU):
    """The `hot_share` most-used experts (by slots) never leave; the rest of the slots are LRU."""

    def __init__(self, capacity: int, hot_share: float = 0.5) -> None:
        super().__init__()
        self.hot_slots = int(capacity * hot_share)

    def victim(self, evictable: Callable[[Key], bool]) -> Key | None:
        hot = {k for k, _ in self.uses.most_common(self.hot_slots)}
        allowed = [k for k in self.order if evictable(k)]
        return next((k for k in allowed if k not in hot), allowed[0] if allowed else None)


class Predicted(LRU):
    """Evict the resident least likely to be used soon, by the speculation's predictions: the cache
    weighs the residents of the layers guessed for (each by the measured odds of its predicted use)
    against LRU's victim among the rest (by its measured reuse) and evicts the least valuable, for
    demand misses as it always does for guesses (ExpertCache._value_victim). A guess landed for
    the next layer is then not the first victim of a miss just because it has not been used yet.
    Without speculation nothing is predicted and it is LRU."""

    by_prediction = True


POLICIES: dict[str, Callable[[int], EvictionPolicy]] = registry(Eviction, {  # name -> factory(capacity)
    "lru": lambda capacity: LRU(),
    "lfu": lambda capacity: LFU(),
    "pinned_hot": PinnedHot,
    "predicted": lambda capacity: Predicted(),
})


def make_policy(name: str, capacity: int) -> EvictionPolicy:
    return POLICIES[name](capacity)
