"""The one narrow interface between the forward pass and wherever expert weights live.

The model asks `provider.get(layer, ids)` for the experts its router chose and receives their
weights on the compute device. Everything about offloading (host store, device cache, eviction,
prefetching, transfers) hides behind this call, so it never touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch


@dataclass
class ExpertWeights:
    """One routed expert on the compute device. gate_up is [2I, H] (gate rows first), down is [H, I]."""

    gate_up: torch.Tensor
    down: torch.Tensor


class ExpertProvider(Protocol):
    def get(self, layer: int, ids: Sequence[int]) -> list[ExpertWeights]:
        """Weights of experts `ids` of MoE layer `layer`, resident on the device, in the order asked."""
        ...
