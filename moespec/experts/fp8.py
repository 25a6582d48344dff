"""FP8 block-quantized weights (DeepSeek-V3's checkpoint format) and the expert format that keeps them packed.

A quantized `*.weight` [out, in] is float8_e4m3fn with a float32 `*.weight_scale_inv`
[ceil(out / bo), ceil(in / bi)]: block (i, j) of the weight, rows i*bo.. and columns j*bi..
(the last ones cut short at the edges), is multiplied by scale_inv[i, j]. Dense weights are
dequantised once at load; routed experts stay FP8 in the host store and cross the link as FP8
plus scales (about half the bytes of bf16), and `Fp8Blocks.unpack_into` dequantises them on the
device into the slot's compute dtype.
"""

from __future__ import annotations

import torch

from ..errors import MoespecError
from .base import ExpertWeights
from .formats import Packed, UnpacksWhole

FP8 = torch.float8_e4m3fn
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"
PROJECTIONS = ("gate", "up", "down")  # a packed expert: each projection and its "<name>_scale_inv"


def scale_grid(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scales of a weight [out, in]: one per (partial) block."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def check_scale(name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...], block: tuple[int, int]) -> None:
    """Refuse scales that do not tile weight `name` in `block`s (one line, naming the tensor)."""
    want = scale_grid(shape, block)
    if len(shape) != 2 or tuple(scale_shape) != want:
        raise MoespecError(f"{name}{SCALE_SUFFIX} has shape {list(scale_shape)}, expected {list(want)} for FP8 weight "
                           f"{name} of shape {list(shape)} in blocks of {list(block)}")


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """weight [out, in] FP8 times its block scales, computed in float32 and rounded once to `dtype`."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], dim=0)[:rows].repeat_interleave(block[1], dim=1)[:, :cols]
    return (weight.float() * scale).to(dtype)


class Fp8Blocks(UnpacksWhole):
    """Routed experts as FP8 projections with their block scales: gate [I, H], up [I, H], down [H, I],
    each with "<name>_scale_inv". Gate and up keep separate scales, so an I that is not a multiple
    of the block needs no re-blocking."""

    name = "fp8"

    def __init__(self, block: tuple[int, int]):
        self.block = block

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        gate, up, down = (dequantize(packed[p], packed[p + SCALE_SUFFIX], self.block, dtype) for p in PROJECTIONS)
        return ExpertWeights(gate_up=torch.cat([gate, up]), down=down)

