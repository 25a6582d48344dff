"""Expert formats: how one expert's weights are held in the host store, cross the link, and land.

An expert is `Packed` (named tensors, e.g. FP8 values and their block scales) in the host store,
crosses the link as it is (the bytes moved are the packed bytes) and stays packed in its device
slot, so an expert-cache budget counts packed bytes; when a layer uses it, the format unpacks it
into one scratch `ExpertWeights` in the compute dtype. `Dense` experts are used in place. The
store, the cache and the statistics only use the methods below, so a format (a checkpoint's
native FP8 or MXFP4, or a quantization chosen at load) is one class here and nothing else changes.

```
checkpoint ──read──► Packed (host store) ──link: packed bytes──► Packed (device slot) ──unpack_into──► scratch
```
"""

from __future__ import annotations

from abc import ABC, abstractmethod
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
        """Write the expert into `dst` (ExpertWeights in the compute dtype, on the device).
        `packed` is normally on dst's device (a cache slot); one in host memory is moved there
        first (non-blocking)."""
        ...

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        """The expert as ExpertWeights in `dtype`, where `packed` is (host-side analysis:
        default vectors, affinity tables)."""
        ...


class UnpacksWhole(ABC):
    """`unpack_into` for a format that dequantizes an expert whole (its `unpack`): run it where
    `dst` is and copy the fields in."""

    @abstractmethod
    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        """The expert as ExpertWeights in `dtype`, computed where `packed` is."""

    def unpack_into(self, packed: Packed, dst: ExpertWeights) -> None:
        on_device = {name: t.to(dst.gate_up.device, non_blocking=True) for name, t in packed.items()}
        for name, t in self.unpack(on_device, dst.gate_up.dtype).tensors().items():
            getattr(dst, name).copy_(t)


class Unpacker:
    """Packed experts on the device -> the ExpertWeights a layer computes with: `Dense` ones in
    place, any other format unpacked into one scratch expert (valid until the next is asked
    for, as ExpertProvider promises)."""

    def __init__(self, fmt: ExpertFormat, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                 device: torch.device):
        self.format = fmt
        self.scratch = None if isinstance(fmt, Dense) else \
            ExpertWeights(**{name: torch.empty(shape, dtype=dtype, device=device) for name, shape in shapes.items()})

    def __call__(self, packed: Packed) -> ExpertWeights:
        if self.scratch is None:
            return ExpertWeights(**packed)
        self.format.unpack_into(packed, self.scratch)
        return self.scratch


def copy_packed(src: Packed, dst: Packed) -> None:
    """Land a packed expert in a device slot as it is (on CUDA: on the current stream)."""
    for name, t in src.items():
        dst[name].copy_(t, non_blocking=True)


class Dense:
    """Weights already in the compute dtype: the packed tensors are the ExpertWeights fields, used in place."""

    name = "dense"

    def unpack_into(self, packed: Packed, dst: ExpertWeights) -> None:
        for name, t in packed.items():
            getattr(dst, name).copy_(t, non_blocking=True)

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(**{name: t.to(dtype) for name, t in packed.items()})
