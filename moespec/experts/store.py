"""The host tier: every routed expert's weights in host memory, read from the checkpoint.

On a CUDA device the host copies are pinned, so device copies can run asynchronously.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..checkpoint import Checkpoint
from .base import ExpertWeights

Key = tuple[int, int]  # (layer, expert id)


class ExpertStore:
    """Expert weights in host memory, keyed by (layer, expert)."""

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype, pin: bool,
                 progress: Callable[[Iterator[Key]], Iterator[Key]] = iter):
        spec = checkpoint.spec
        self.spec, self.dtype = spec, dtype
        self._experts: dict[Key, ExpertWeights] = {}
        keys = [(layer, e) for layer in spec.moe_layer_ids for e in range(spec.num_experts)]
        for key in progress(iter(keys)):
            gate, up, down = checkpoint.expert(*key, dtype)
            w = ExpertWeights(torch.cat([gate, up], dim=0), down.contiguous())
            if pin:
                w = ExpertWeights(w.gate_up.pin_memory(), w.down.pin_memory())
            self._experts[key] = w

    def __getitem__(self, key: Key) -> ExpertWeights:
        return self._experts[key]

    def keys(self) -> list[Key]:
        return list(self._experts)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (all experts of a model have the same shape)."""
        s = self.spec
        return 3 * s.hidden_size * s.expert_intermediate_size * torch.finfo(self.dtype).bits // 8


class ResidentExperts:
    """Every expert copied to the device once: the no-offloading reference (expert_cache="100%")."""

    def __init__(self, store: ExpertStore, device: torch.device):
        self._experts = {
            key: ExpertWeights(store[key].gate_up.to(device), store[key].down.to(device)) for key in store.keys()
        }

    def get(self, layer: int, ids: list[int]) -> list[ExpertWeights]:
        return [self._experts[(layer, e)] for e in ids]
