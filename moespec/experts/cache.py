"""The device expert cache: a pool of expert slots under a memory budget (preallocated on CUDA; on
the CPU, whose host memory is the device's, a slot holds its expert by reference).

`fetch(layer, ids)` yields the experts a layer needs: resident ones first, then missing ones as
their copies land, so compute on the first experts overlaps the copies of the rest. Slots are
shared by all MoE layers (scope "global") or split evenly between them (scope "layer"). Experts
in use by the running layer or still being copied are never evicted; among the others the
eviction policy chooses. `prefetch(target, ids, running, scores, predicted, depth)` starts
copies without waiting (speculation).

A guess is admitted by measured value (admission.py): it takes a free slot, or displaces the
resident the eviction policy would give up next among those its prediction does not call at least
as likely to be used, if it beats that victim by the share of a copy that right guesses of its
depth were measured to hide; it enters at the lowest priority and is promoted when used. Under
the "predicted" eviction policy a demand miss evicts the least valuable of the guessed-for
layers' residents and the policy's victim. The cache owns its transfer engine (CPU emulated link
or CUDA copy stream), which records every stall; `flush_stats` adds them to the statistics, the
same way on both.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Iterator

import torch

from ..checkpoint import Checkpoint
from ..config import parse_budget
from ..errors import MoespecError
from .admission import Admission
from .base import ExpertWeights, Key
from .eviction import EvictionPolicy, make_policy
from .formats import Packed, Unpacker, packed_bytes
from .reader_process import ReaderProcess
from .stats import ExpertStats
from .store import ExpertStore
from .trace import Tracer
from .transfer import CpuTransfers, CudaTransfers

REUSE_DECAY = 0.8  # per run of a layer: an unused expert's use rate halves in about 3 runs


def budget_slots(expert_cache: str | int, total_experts: int, expert_bytes: int, dense_bytes: int | None = None) -> int:
    """Slots for a budget given as a share ("25%"), a size ("3GiB") or a slot count (int).

    A share is of the experts' size in the compute dtype (`dense_bytes` each; default
    `expert_bytes`), spent on packed experts of `expert_bytes`: a 25% budget of int4 experts
    holds about as many experts as a 100% budget of 16-bit ones would."""
    kind, amount = parse_budget(expert_cache)
    share_bytes = total_experts * amount * (dense_bytes or expert_bytes)
    slots = {"slots": amount, "share": share_bytes // expert_bytes, "bytes": amount // expert_bytes}[kind]
    return min(int(slots), total_experts)


class Domain:
    """Slots that compete with each other for eviction (all layers, or one layer)."""

    def __init__(self, slots: range, policy: str):
        self.slots, self.policy_name = slots, policy
        self.clear()

    def clear(self) -> None:
        self.policy: EvictionPolicy = make_policy(self.policy_name, len(self.slots))
        self.free = list(reversed(self.slots))  # pop() hands out the lowest slot first
        self.resident: set[Key] = set()


class ExpertCache:
    """The expert slots on the device (a DeviceExperts): fetch, prefetch, pin; evicts by policy."""

    def __init__(self, store: ExpertStore, device: torch.device, slots: int, policy: str, scope: str,
                 stats: ExpertStats, link_bandwidth: float | None = None, tracer: Tracer | None = None):
        """link_bandwidth: on CPU, bytes/s of the emulated link (None: copies take no wire time).
        tracer: records one transfer-lane slice per CPU copy."""
        spec = store.spec
        layers = spec.moe_layer_ids
        per_domain = slots // len(layers) if scope == "layer" else slots
        if per_domain < spec.top_k:
            where = "per layer" if scope == "layer" else "in total"
            raise MoespecError(
                f"expert cache of {slots} slots ({per_domain} {where}) cannot hold one token's "
                f"{spec.top_k} experts of a layer; raise expert_cache"
            )
        self.store, self.stats = store, stats
        n = per_domain * len(layers) if scope == "layer" else slots
        self._capacity = n
        readers = 2 if store.tier == "disk" else 0  # threads that read the store off the compute thread
        # on a CPU, a checkpoint directory's experts are read by a process of their own, straight
        # into the slots (reader_process.py: reader threads would stall compute on the interpreter
        # lock), where the OS has shared anonymous memory to pass it (Linux's memfd)
        process = ReaderProcess(store, n, readers) if device.type == "cpu" and readers \
            and isinstance(store.checkpoint, Checkpoint) and hasattr(os, "memfd_create") else None
        self.transfers = CpuTransfers(link_bandwidth, tracer, 0 if process else readers, process) \
            if device.type == "cpu" else CudaTransfers(device, slots, readers)
        # each slot's packed tensors. On CUDA every slot's are stacked, [n, *shape] per packed tensor,
        # and copies land in views of them, made once; so on the CPU where a reader process writes
        # them (in memory both processes map). Otherwise, on the CPU the host's memory is the
        # device's: an expert lands by reference (CpuTransfers), so slots own no memory and start empty.
        self.slots = process.slots if process is not None else None if device.type == "cpu" else \
            {name: torch.empty(n, *shape, dtype=dt, device=device) for name, (shape, dt) in store.packed_layout.items()}
        self._slot_views: list[Packed] = [{} if self.slots is None else {name: t[i] for name, t in self.slots.items()}
                                          for i in range(n)]
        # a layer's use unpacks one expert at a time (formats.Unpacker: Dense experts are used in place)
        self.unpack = Unpacker(store.format, store.shapes, store.dtype, device)
        if scope == "layer":
            self.domains = {layer: Domain(range(i * per_domain, (i + 1) * per_domain), policy)
                            for i, layer in enumerate(layers)}
        else:
            shared = Domain(range(n), policy)
            self.domains = {layer: shared for layer in layers}
        self.slot_of: dict[Key, int] = {}
        self.pending: dict[Key, object] = {}  # copies in flight
        self.locked: set[Key] = set()  # needed by the running layer
        self.unused_prefetch: dict[Key, int] = {}  # a copied guess not used yet -> how far ahead it was made
        # running layer -> guesses (target, [(id, score)], depth)
        self._after_fetch: dict[int, list[tuple[int, list[tuple[int, float]], int]]] = {}
        self._runs = {layer: 0 for layer in layers}  # fetches per layer: the clock of `expected_use`
        self._use_rate: dict[Key, tuple[float, int]] = {}  # key -> (rate, run when last updated)
        self.admission = Admission()
        self._resident_of: dict[int, set[int]] = {layer: set() for layer in layers}  # layer -> resident ids
        self.pinned: set[Key] = set()  # never evicted until unpinned (draft experts of speculative decoding)
        # most experts per layer that can be pinned while every domain keeps top_k slots for the rest
        self.pin_limit = per_domain - spec.top_k if scope == "layer" else (slots - spec.top_k) // len(layers)

    def clear(self) -> None:
        """Let every copy land, then free every slot (a cold cache)."""
        for key in list(self.pending):
            self.transfers.wait(self.pending.pop(key), key[0])
        for dom in {id(d): d for d in self.domains.values()}.values():
            dom.clear()
        self.slot_of.clear()
        if self.slots is None:
            for views in self._slot_views:
                views.clear()
        self.unused_prefetch.clear()
        self._use_rate.clear()
        self.admission = Admission()
        for ids in self._resident_of.values():
            ids.clear()
        self._after_fetch.clear()

    def flush_stats(self) -> None:
        for layer, seconds in self.transfers.collect_stalls().items():
            self.stats[layer].stall_seconds += seconds

    def close(self) -> None:
        self.transfers.close()

    @property
    def capacity(self) -> int:
        return self._capacity

    def bytes_used(self) -> int:
        """Device bytes the slots hold: all of them on CUDA (allocated up front); on the CPU, the
        experts they refer to."""
        return packed_bytes(self.slots) if self.slots is not None else sum(packed_bytes(v) for v in self._slot_views)

    def resident(self) -> set[Key]:
        """Experts holding a slot (some may still be landing)."""
        return set(self.slot_of)

    def ready(self, layer: int) -> set[int]:
        return {e for (l, e) in self.slot_of
                if l == layer and ((l, e) not in self.pending or self.transfers.done(self.pending[(l, e)]))}

    def stalled_seconds(self) -> float | None:
        return self.transfers.stalled_seconds

    def _slot(self, slot: int) -> Packed:
        return self._slot_views[slot]

    def _weights(self, slot: int) -> ExpertWeights:
        """The expert in `slot` in the compute dtype (see formats.Unpacker)."""
        return self.unpack(self._slot(slot))

    def expected_use(self, key: Key) -> float:
        """Estimated chance that keeping `key` makes it a hit the next time its layer runs
        (Admission.expected_use)."""
        return self.admission.expected_use(key, self._use_rate_now(key))

    def _use_rate_now(self, key: Key) -> float:
        """An exponential average of the expert's uses per run of its layer (0 if never used)."""
        rate, last = self._use_rate.get(key, (0.0, 0))
        return rate * REUSE_DECAY ** (self._runs[key[0]] - last)

    def _record_use(self, key: Key) -> None:
        self._use_rate[key] = (self._use_rate_now(key) + 1 - REUSE_DECAY, self._runs[key[0]])  # this run counts

    def _load(self, key: Key, score: float | None = None, depth: int = 1) -> bool:
        """Start copying `key` into a slot (evicting if needed); False if every slot is busy, or,
        for a guess (`score`: the speculation's, comparable with its predictions; `depth`: how far
        ahead it was made), if the victim is worth more than it. Without a score the copy is a
        demand copy (a layer waits for it): it goes ahead of queued prefetches where the link can."""
        dom = self.domains[key[0]]
        guessed = score is not None
        guess = self.admission.guess_value(score) if guessed else 0.0  # its expected use
        if dom.free:  # a guess still costs its copy: on a busy link only a likely one pays
            if guessed and not self.admission.worth_it(guess, 0.0, self.transfers.preempts, depth):
                return False
            slot = dom.free.pop()
        else:
            if guessed:
                victim = self._guess_victim(dom, score)
            else:
                victim = self._value_victim(dom) if dom.policy.by_prediction else dom.policy.victim(self._evictable)
            if victim is None or (guessed and
                                  not self.admission.worth_it(guess, self.expected_use(victim),
                                                              self.transfers.preempts, depth)):
                return False
            self.admission.evicted(victim, by_guess=guessed)
            if victim in self.unused_prefetch:
                self.stats[victim[0]].wasted_prefetches += 1
            slot = self._release(victim)
        self.slot_of[key] = slot
        dom.resident.add(key)
        self._resident_of[key[0]].add(key[1])
        dom.policy.admit(key, guess=guessed)
        read = partial(self.store.packed, key)  # runs on the transfer side, not here
        self.pending[key] = self.transfers.copy(read, self._slot(slot), f"L{key[0]} E{key[1]}", slot,
                                                urgent=not guessed, key=key)
        self.stats[key[0]].bytes_moved += self.store.expert_bytes
        return True

    def _value_victim(self, dom: Domain) -> Key | None:
        """Whom a demand miss into `dom` displaces under the "predicted" policy: of the residents
        of layers with a live prediction and the policy's victim among the rest, the one least
        likely to be used soon (`expected_use`). Only those: a prediction with its use rate is the
        best estimate there is, and the policy's victim stands for the rest, so the choice costs a
        few lookups, not a pass over every slot."""
        predicted, worth = self.admission.predicted, self.admission.on_prediction
        victim, lowest = None, float("inf")
        for t, uses in predicted.items():
            if self.domains[t] is not dom:
                continue
            for e in self._resident_of[t]:
                # = expected_use((t, e)); busy checked only for a new lowest
                value = worth(uses[e], self._use_rate_now((t, e)))
                if value < lowest and self._evictable((t, e)):
                    victim, lowest = (t, e), value
        fallback = dom.policy.victim(lambda k: k[0] not in predicted and self._evictable(k))
        if fallback is not None and self.expected_use(fallback) < lowest:
            victim = fallback
        return victim

    def _guess_victim(self, dom: Domain, score: float) -> Key | None:
        """Whom a guess scored `score` displaces: the resident the eviction policy would give up
        next, among those not predicted at least as likely to be used at their layer's next run.

        The policy's victim is what the next demand miss would evict anyway, so displacing it
        early costs little; any other resident is one the policy keeps for its later uses. Choosing
        instead the resident least likely to be used at its layer's next run (a prediction knows
        nothing later) evicted experts the text keeps returning to: perfect guesses (recorded
        routing, benchmarks/oracle_bound.py) then moved 1.28x on demand's bytes on tiny-qwen2moe
        at batch 1 (0.1 GB/s, 25% cache) and ran 0.96x of its speed; choosing so, 1.00x the bytes
        and 1.02x. A resident the prediction calls at least as likely as the guess stays."""
        predicted = self.admission.predicted

        def spare(key: Key) -> bool:
            uses = predicted.get(key[0])
            return (uses is None or uses[key[1]] < score) and self._evictable(key)

        return dom.policy.victim(spare)

    def _evictable(self, key: Key) -> bool:
        return not self._busy(key)

    def _busy(self, key: Key) -> bool:
        """Needed by the running layer, pinned, or its copy has not landed yet."""
        return key in self.locked or key in self.pinned or \
            (key in self.pending and not self.transfers.done(self.pending[key]))

    def pin(self, key: Key, load: bool = True) -> bool:
        """Keep `key` on the device until `unpin`. A missing expert is copied in if `load` (its bytes
        count as moved); False if it is missing and was not loaded."""
        if key not in self.slot_of and not (load and self._load(key)):
            return False
        self.pinned.add(key)
        return True

    def unpin(self, key: Key) -> None:
        """Let `key` be evicted again; on CUDA a later copy into its slot waits for kernels reading it."""
        if key in self.pinned:
            self.pinned.discard(key)
            self.transfers.slot_released(self.slot_of[key])

    def peek(self, key: Key) -> ExpertWeights:
        """A pinned expert's weights (waiting for its copy if needed), not counted as a use."""
        self._wait(key)
        return self._weights(self.slot_of[key])

    def _wait(self, key: Key) -> None:
        handle = self.pending.pop(key, None)
        if handle is not None:
            self.transfers.wait(handle, key[0])

    def prefetch(self, target: int, ids: list[int], running: int | None = None,
                 scores: list[float] | None = None, predicted: list[float] | None = None, depth: int = 1) -> None:
        """Copy experts guessed for `target`, `depth` layers ahead, best first, never waiting.
        `scores`: each guess's expected use in [0, 1] (default 1: admit whenever a slot can be
        had). With `running`, the copies start only once that layer's fetch has put its own
        missing experts on the link (and locked its experts), so a guess never delays or evicts
        an expert needed now.
        `predicted`: every expert of `target`'s expected use at its next run; until then it values
        that layer's residents, so a guess displaces the resident it predicts unneeded, never one it
        predicts needed."""
        if predicted is not None:
            self.admission.predicted[target] = predicted
        guesses = list(zip(ids, scores if scores is not None else [1.0] * len(ids)))
        if running is not None:
            self._after_fetch.setdefault(running, []).append((target, guesses, depth))
        else:
            self._prefetch(target, guesses, depth)

    def _prefetch(self, layer: int, guesses: list[tuple[int, float]], depth: int) -> None:
        missing = [(e, score) for e, score in guesses if (layer, e) not in self.slot_of]
        self.admission.guessed(layer, missing)
        for e, score in missing:
            key = (layer, e)
            if not self._load(key, score, depth):
                break  # ranked best first: a guess that could not displace anything stops the rest
            self.unused_prefetch[key] = depth
            self.stats[layer].prefetches += 1

    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (id, weights) for every expert in `ids`: resident ones first, then misses as they land."""
        stats = self.stats[layer]
        stats.tokens += tokens
        keys = [(layer, e) for e in ids]
        hits = [k for k in keys if k in self.slot_of]
        misses = [k for k in keys if k not in self.slot_of]
        self.admission.measure_link(self.transfers.busy_seconds)
        self.admission.layer_runs(layer, ids, self._resident_of[layer], lambda e: self._use_rate_now((layer, e)),
                                  misses, len(hits))
        self._runs[layer] += 1
        self.domains[layer].policy.layer_runs(layer)
        stats.hits += len(hits)
        stats.misses += len(misses)
        right_guesses = {k: self.unused_prefetch.pop(k) for k in hits if k in self.unused_prefetch}  # -> depth
        stats.prefetch_hits += len(right_guesses)
        self.locked.update(hits)
        in_flight: list[Key] = []
        guesses = self._after_fetch.pop(layer, [])
        try:
            def issue() -> None:
                while misses and self._load(misses[0]):
                    self.locked.add(misses[0])
                    in_flight.append(misses.pop(0))
                if not misses and guesses:  # this layer's copies are all on the link: now the guesses
                    for target, guessed, depth in guesses:
                        self._prefetch(target, guessed, depth)
                    guesses.clear()

            issue()
            for key in hits:
                yield from self._use(key, right_guesses.get(key))
                issue()
            while in_flight or misses:
                if not in_flight:  # every slot holds a guess still landing: free one
                    self._make_room(layer)
                    issue()
                    continue
                key = in_flight.pop(0)
                yield from self._use(key)
                issue()
        finally:
            self.locked.difference_update(keys)
            self._cancel_wrong_prefetches(layer)

    def _make_room(self, layer: int) -> None:
        """Free a slot of `layer`'s domain held by a prefetch still in flight: cancel it if it has
        not reached the link, else wait for it to land (it then becomes evictable)."""
        dom = self.domains[layer]
        landing = [k for k in dom.resident if k in self.pending and k not in self.locked and k not in self.pinned]
        if not landing:
            raise RuntimeError("expert cache deadlock: no slot could be freed")  # guarded by the budget check
        for key in landing:
            if self._cancel(key):
                return
        self._wait(landing[0])

    def _cancel_wrong_prefetches(self, layer: int) -> None:
        """`layer` has run, so its prefetches still unused were wrong guesses for this step: take
        back those not yet on the link and free their slots (the bytes were never moved)."""
        for key in [k for k in self.unused_prefetch if k[0] == layer and k in self.pending]:
            self._cancel(key)

    def _cancel(self, key: Key) -> bool:
        """Take back a prefetch that has not reached the link and free its slot; False if it has."""
        if key not in self.unused_prefetch or not self.transfers.cancel(self.pending[key]):
            return False
        self.domains[key[0]].free.append(self._release(key))
        self.stats[key[0]].bytes_moved -= self.store.expert_bytes
        self.stats[key[0]].cancelled_prefetches += 1
        return True

    def _release(self, key: Key) -> int:
        """Forget `key` (evicted, or its copy cancelled); return the slot it held."""
        dom = self.domains[key[0]]
        self.pending.pop(key, None)
        self.unused_prefetch.pop(key, None)
        dom.resident.discard(key)
        self._resident_of[key[0]].discard(key[1])
        dom.policy.forget(key)
        slot = self.slot_of.pop(key)
        if self.slots is None:
            self._slot_views[slot].clear()  # let go of the expert's memory (CPU: held by reference)
        return slot

    def _use(self, key: Key, guessed: int | None = None) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield `key`'s weights once its copy has landed; `guessed`: it is a right guess made
        that many layers ahead, so admission learns how much of its copy it hid."""
        if guessed is not None:
            handle = self.pending.get(key)
            done = 1.0 if handle is None else self.transfers.progress(handle)
            self.admission.guess_used(guessed, done)
            self.stats[key[0]].prefetch_landed += done
        self._wait(key)
        self.domains[key[0]].policy.touch(key)
        self._record_use(key)
        slot = self.slot_of[key]
        yield key[1], self._weights(slot)
        self.locked.discard(key)
        self.transfers.slot_released(slot)
