"""The expert weights one worker holds, and their re-placement between batches without stopping compute.

A new plan is known one batch ahead. `prepare` starts copying the experts it adds to this worker
on a background thread (on a GPU, inside a side CUDA stream, from the pinned host store) while the
current batch still computes with the old set; `commit`, at the batch boundary, waits for those
copies (the wait is a stall, normally zero) and drops the experts the new plan moved elsewhere.
Between the two the worker holds the union of both sets; `peak` records the most it ever held.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..experts.base import ExpertWeights
from ..experts.store import ExpertStore, Key


class LocalExperts:
    def __init__(self, store: ExpertStore, device: torch.device):
        self.store, self.device = store, device
        self.weights: dict[Key, ExpertWeights] = {}  # updated in place: the executor keeps a reference
        self.moved = 0  # experts copied in since load
        self.peak = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moespec-replicas")
        self._pending: Future | None = None
        self._target: set[Key] = set()

    def _copy(self, keys: list[Key]) -> dict[Key, ExpertWeights]:
        """The experts' weights on the device. On a CPU the device is host memory, so a replica is
        the host store's tensor itself (read from the checkpoint, the real copy, when first needed)."""
        def copy() -> dict[Key, ExpertWeights]:
            return {key: self.store[key].to(self.device, non_blocking=True) for key in keys}

        if self.device.type != "cuda":
            return copy()
        stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(stream):
            weights = copy()
        stream.synchronize()
        return weights

    def load(self, keys: set[Key]) -> None:
        """Hold exactly `keys`, copied now (the initial placement)."""
        self.weights.clear()
        self.weights.update(self._copy(sorted(keys)))
        self.peak = max(self.peak, len(self.weights))

    def prepare(self, keys: set[Key]) -> None:
        """Start copying what `keys` adds to the current set; the current set stays usable."""
        if self._pending is not None:
            raise RuntimeError("commit the previous placement before preparing another")
        self._target = set(keys)
        self._pending = self._pool.submit(self._copy, sorted(self._target - self.weights.keys()))

    def commit(self) -> float:
        """Switch to the prepared set; returns the seconds spent waiting for copies to land."""
        if self._pending is None:
            return 0.0
        start = time.perf_counter()
        arrived = self._pending.result()
        waited = time.perf_counter() - start
        self._pending = None
        self.weights.update(arrived)
        self.moved += len(arrived)
        self.peak = max(self.peak, len(self.weights))
        for key in set(self.weights) - self._target:
            del self.weights[key]
        return waited

    def close(self) -> None:
        self._pool.shutdown(wait=True)
