"""Counters of expert traffic, per MoE layer and in total."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class LayerStats:
    hits: int = 0  # needed experts that were already on the device (prefetched or cached)
    misses: int = 0  # needed experts that had to be copied while the layer waited
    prefetch_hits: int = 0  # hits on experts brought in by a prefetch and not used before
    prefetch_landed: float = 0.0  # over prefetch hits, the share of each one's copy done when first used
    wasted_prefetches: int = 0  # prefetched experts evicted without ever being used
    prefetches: int = 0  # prefetch copies issued
    cancelled_prefetches: int = 0  # prefetches taken back before reaching the link (not in bytes_moved)
    bytes_moved: int = 0  # host -> device bytes copied (misses and prefetches)
    stall_seconds: float = 0.0  # time compute waited for expert copies
    tokens: int = 0  # tokens routed through the layer

    @property
    def prefetch_landed_share(self) -> float | None:
        """How much of a right guess's copy had been done when compute needed it (1: every right
        guess hid its whole copy); None before any prefetch hit."""
        return self.prefetch_landed / self.prefetch_hits if self.prefetch_hits else None

    def add(self, other: "LayerStats") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class ExpertStats:
    """One LayerStats per MoE layer; `total()` sums them."""

    def __init__(self, layers: list[int]):
        self.layers = {layer: LayerStats() for layer in layers}

    def reset(self) -> None:
        for layer in self.layers:
            self.layers[layer] = LayerStats()

    def __getitem__(self, layer: int) -> LayerStats:
        return self.layers[layer]

    def total(self) -> LayerStats:
        t = LayerStats()
        for s in self.layers.values():
            t.add(s)
        return t
