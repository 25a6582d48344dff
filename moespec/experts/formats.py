"""Expert formats: how one expert's weights are held in the host store, cross the link, and land.

An expert is `Packed` on the host (named tensors, e.g. FP8 values and their block scales) and
crosses the link as it is, so the bytes moved are the packed bytes; the device then unpacks it
into an `ExpertWeights` slot in the compute dtype. The store, the transfer engines and the
statistics only use the three methods below, so a format (a checkpoint's native FP8 or MXFP4,
or a quantization chosen at load) is one class here and nothing else changes.

```
checkpoint ──read──► Packed (host store) ──link: nbytes(packed)──► unpack_into(packed, slot)
```
"""

from __future__ import annotations

from typing import Protocol

import torch

from .base import ExpertWeights

Packed = dict[str, torch.Tensor]  # one expert's tensors as stored and moved, by name


def packed_bytes(packed: Packed) -> int:
    """Bytes of one packed expert: what crosses the link."""
    return sum(t.numel() * t.element_size() for t in packed.values())


class ExpertFormat(Protocol):
    name: str

    def unpack_into(self, packed: Packed, dst: ExpertWeights) -> None:
        """Write the expert into `dst` (a device slot in the compute dtype). `packed` may be in
        host memory: a format moves what it needs to dst's device first (non-blocking, so on
        CUDA this runs on whichever stream is current: the copy stream)."""
        ...

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        """The expert as ExpertWeights in `dtype`, where `packed` is (host-side analysis:
        default vectors, affinity tables)."""
        ...


class Dense:
    """Weights already in the compute dtype: the packed tensors are the ExpertWeights fields."""

    name = "dense"

    @staticmethod
    def pack(w: ExpertWeights) -> Packed:
        return w.tensors()

    def unpack_into(self, packed: Packed, dst: ExpertWeights) -> None:
        for name, t in packed.items():
            getattr(dst, name).copy_(t, non_blocking=True)

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(**{name: t.to(dtype) for name, t in packed.items()})
