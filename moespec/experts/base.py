"""The one narrow interface between the forward pass and wherever expert weights live.

The model asks `provider.fetch(layer, ids, tokens)` for the experts its router chose and receives
their weights on the compute device, one expert at a time, in the order they become ready. Everything about offloading (host store, device cache, eviction,
prefetching, transfers) hides behind this call, so it never touches the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch


@dataclass
class ExpertWeights:
    """One routed expert on the compute device. gate_up is [2I, H] (gate rows first), down is [H, I]."""

    gate_up: torch.Tensor
    down: torch.Tensor


class ExpertProvider(Protocol):
    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert id, weights on the device) for each of `ids` of MoE layer `layer`.

        Experts come in the order they are ready; an expert's weights are valid until the next one
        is requested. `tokens` is the number of tokens routed in this call (for statistics).
        """
        ...
