"""Replication planning (DeepSeek EPLB's algorithm, one MoE layer at a time): a pure function of loads.

Assumption: an expert's cost on a worker is proportional to the tokens it computes there, and the
tokens of a replicated expert are split evenly across its replicas (the dispatcher does exactly
that), so a replica of expert e carries load[e] / replicas[e]. A layer's step time is set by its
most loaded worker; the plan minimises that in two greedy steps:

1. `replicate`: W workers × S slots hold W·S replicas; every expert gets one, and each further
   replica goes to the expert with the largest load ÷ replicas (at most one replica per worker,
   so at most W per expert). This step is *optimal*: no replica counts with the same total and
   cap give a smaller maximum per-replica load max_e load[e] / replicas[e] (a lower bound on the
   most loaded worker of any plan, together with sum(load) / W).
2. `pack`: replicas, heaviest first, each into the lightest worker that has a free slot and does
   not hold that expert yet (LPT scheduling with a slot limit). This step is a heuristic (packing
   is NP-hard): tests check against brute force on small cases that the most loaded worker stays
   within one replica's load of the best packing of the same replicas. Optionally it prefers the
   worker that already holds the expert, within a slack, so a new plan moves fewer weights.

Both steps are deterministic (ties go to the lowest expert / worker id), so every worker computes
the same plan from the same all-reduced loads without sending the plan around.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Collection, Sequence


@dataclass(frozen=True)
class Plan:
    """Replica counts per expert and, per worker, the experts whose replicas it holds (one per slot)."""

    replicas: tuple[int, ...]
    workers: tuple[tuple[int, ...], ...]

    def worker_loads(self, load: Sequence[float]) -> list[float]:
        """Load each worker would carry if `load` arrives, each expert split evenly over its replicas."""
        return [sum(load[e] / self.replicas[e] for e in experts) for experts in self.workers]


def replicate(load: Sequence[float], total: int, cap: int) -> list[int]:
    """Replica counts (each >= 1 and <= cap, summing to `total`) minimising max load[e] / replicas[e]."""
    n = len(load)
    if not n <= total <= n * cap:
        raise ValueError(f"{total} replicas cannot cover {n} experts with at most {cap} each")
    replicas = [1] * n
    heap = [(-load[e], e) for e in range(n) if cap > 1]  # ties: lowest expert id first
    heapq.heapify(heap)
    for _ in range(total - n):
        _, e = heapq.heappop(heap)
        replicas[e] += 1
        if replicas[e] < cap:
            heapq.heappush(heap, (-load[e] / replicas[e], e))
    return replicas


def pack(load: Sequence[float], replicas: Sequence[int], workers: int, slots: int,
         home: Sequence[Collection[int]] = (), slack: float = 0.0) -> list[list[int]]:
    """Place every replica of every expert (heaviest first) on the lightest worker with room that lacks it.

    home[w]: the experts worker w holds now. A replica stays on such a worker instead when its load
    is within `slack` of the lightest choice, which trades a little balance for fewer copies.
    """
    if sum(replicas) > workers * slots:
        raise ValueError(f"{sum(replicas)} replicas do not fit on {workers} workers × {slots} slots")
    items = sorted(((load[e] / r, e) for e, r in enumerate(replicas) for _ in range(r)), key=lambda it: (-it[0], it[1]))
    placed: list[list[int]] = [[] for _ in range(workers)]
    totals = [0.0] * workers
    for weight, e in items:
        room = [w for w in range(workers) if len(placed[w]) < slots]
        candidates = [w for w in room if e not in placed[w]] or room  # all hold e only if replicas[e] > workers
        lightest = min(totals[w] for w in candidates)
        staying = [w for w in candidates if home and e in home[w] and totals[w] <= lightest + slack]
        w = min(staying or candidates, key=lambda w: (totals[w], w))
        placed[w].append(e)
        totals[w] += weight
    return placed


def plan(load: Sequence[float], workers: int, slots: int, current: Plan | None = None,
         stickiness: float = 0.0) -> Plan:
    """Fill all workers × slots with replicas of the experts, balancing the predicted `load`.

    With a `current` plan, replicas stay where they are when that costs at most `stickiness` × the
    mean worker load on the worker they stay on.
    """
    replicas = replicate(load, min(workers * slots, len(load) * workers), cap=workers)
    home = [set(w) for w in current.workers] if current is not None else []
    slack = stickiness * sum(load) / workers
    return Plan(tuple(replicas), tuple(tuple(sorted(p)) for p in pack(load, replicas, workers, slots, home, slack)))


def default_plan(num_experts: int, workers: int) -> Plan:
    """No replication: one replica per expert, contiguous blocks of experts per worker."""
    per = math.ceil(num_experts / workers)
    return Plan((1,) * num_experts,
                tuple(tuple(range(w * per, min((w + 1) * per, num_experts))) for w in range(workers)))
