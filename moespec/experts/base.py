"""What each caller may ask of wherever expert weights live, as Protocols.

The model asks `ExpertProvider.fetch(layer, ids, tokens)` for the experts its router chose and
receives their weights on the compute device, one expert at a time, in the order they become
ready. Everything about offloading (host store, device cache, eviction, transfers) hides behind
this call, so it never touches the model. Speculation also starts copies (`Prefetcher`), and
self-speculative decoding keeps draft experts on the device (`Pinnable`). Both device-side
implementations, `ExpertCache` (a budget smaller than the model) and `ResidentExperts` (every
expert on the device), offer all of them (`DeviceExperts`), so no caller tests which one it has.
`ResidentExperts` also offers `fetch_stack(layer, ids, tokens)`: every expert of a layer in one
stack, which `model.moe.run_experts` computes with grouped matmuls instead of expert by expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import torch

Key = tuple[int, int]  # (MoE layer, expert id)


@dataclass
class ExpertWeights:
    """One routed expert in the compute dtype. gate_up is [2I, H] (gate rows first), down is
    [H, I]; gpt-oss experts also have biases gate_up_bias [2I] and down_bias [H]."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The expert's tensors by field name (biases only where it has them)."""
        return {name: t for name, t in vars(self).items() if t is not None}

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ExpertWeights:
        return ExpertWeights(**{name: t.to(device, non_blocking=non_blocking) for name, t in self.tensors().items()})

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class ExpertProvider(Protocol):
    def fetch(self, layer: int, ids: list[int], tokens: int) -> Iterator[tuple[int, ExpertWeights]]:
        """Yield (expert id, weights on the device) for each of `ids` of MoE layer `layer`.

        Experts come in the order they are ready; an expert's weights are valid until the next one
        is requested. `tokens` is the number of tokens routed in this call (for statistics).
        """
        ...


class Prefetcher(Protocol):
    """Starts copies of guessed experts without waiting for them."""

    capacity: int  # expert slots on the device

    def prefetch(self, target: int, ids: list[int], running: int | None = None,
                 scores: list[float] | None = None, predicted: list[float] | None = None, depth: int = 1) -> None:
        """Copy experts guessed for MoE layer `target`, best guess first. `running`: the MoE layer
        about to fetch its own experts; the guesses then wait until that fetch has put its missing
        experts on the link and never evict them. None: start the copies now. `scores`: each
        guess's expected use in [0, 1]; a guess evicts only a resident worth less. `predicted`:
        the expected use of every expert of `target` (values its residents until it runs).
        `depth`: how far ahead the guess was made (the speculation's depth: guesses of one depth
        get about as much time to land)."""
        ...

    def ready(self, layer: int) -> set[int]:
        """Experts of `layer` on the device whose copy has landed: usable without waiting."""
        ...

    def stalled_seconds(self) -> float | None:
        """Seconds compute has waited for copies so far; None where that is not known without a
        device sync (CUDA)."""
        ...


class Pinnable(Protocol):
    """Keeps chosen experts on the device (self-speculative decoding's draft experts)."""

    pin_limit: int  # most experts per layer that can be pinned

    def pin(self, key: Key, load: bool = True) -> bool:
        """Keep `key` on the device until `unpin`; a missing expert is copied in if `load`.
        False if it is missing and was not loaded."""
        ...

    def unpin(self, key: Key) -> None: ...

    def peek(self, key: Key) -> ExpertWeights:
        """A pinned expert's weights (waiting for its copy if needed), not counted as a use."""
        ...


class DeviceExperts(ExpertProvider, Prefetcher, Pinnable, Protocol):
    """Everything the engine holds on the device: what `LLM` builds and hands to every caller."""

    def clear(self) -> None:
        """Let copies land, then forget every expert: the next run starts cold."""
        ...

    def flush_stats(self) -> None:
        """Bring the statistics up to date (on CUDA, stalls measured on the device: one sync)."""
        ...

    def close(self) -> None:
        """Stop the transfer side (also done at interpreter exit)."""
        ...
