"""MXFP4 experts (gpt-oss's checkpoints): 4-bit e2m1 values in blocks of 32 sharing an 8-bit power-of-two scale.

A weight [rows, cols] is stored as `blocks` uint8 [rows, cols / 32, 16], two values a byte (the
low nibble is the even column, the high nibble the odd one), each value one of
±{0, 0.5, 1, 1.5, 2, 3, 4, 6}, and `scales` uint8 [rows, cols / 32], E8M0: the block's values
are multiplied by 2^(scale - 127). That is a little over half a byte per weight, so an expert
crosses the link in about an eighth of its float32 size and the device dequantizes it into its
slot (experts/formats.py).
"""

from __future__ import annotations

import torch

from .base import ExpertWeights
from .formats import Packed, UnpacksWhole

BLOCK = 32  # values sharing one scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127  # E8M0: scale byte s means 2^(s - 127)
PROJECTIONS = ("gate_up", "down")  # the packed weights of an expert; its biases travel as they are
_byte_values: dict[torch.device, torch.Tensor] = {}


def byte_values(device: torch.device) -> torch.Tensor:
    """[256, 2] float32 on `device`: each byte's (low nibble, high nibble) values, so one gather
    decodes a byte; made once per device."""
    if device not in _byte_values:
        table = torch.tensor([[FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]] for b in range(256)])
        _byte_values[device] = table.to(device)
    return _byte_values[device]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """blocks uint8 [rows, G, 16], scales uint8 [rows, G] -> the weight [rows, G * 32] in `dtype`,
    computed where the blocks are."""
    rows, groups, _ = blocks.shape
    values = byte_values(blocks.device)[blocks.int()]  # [rows, G, 16, 2]: even column, odd column
    values = torch.ldexp(values.view(rows, groups, BLOCK), scales.int()[..., None] - SCALE_BIAS)
    return values.view(rows, groups * BLOCK).to(dtype)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [rows, cols] (cols a multiple of 32) -> (blocks, scales): each block's scale is the
    smallest power of two that brings its largest magnitude within 6, each value the nearest
    representable one (what a checkpoint writer does; moespec reads, tests and the
    quantized-experts path write)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs columns in multiples of {BLOCK}, got {cols}")
    w = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    amax = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
    exponent = torch.ceil(torch.log2(amax / FP4_VALUES[7])).clamp(-SCALE_BIAS, 255 - SCALE_BIAS)
    scaled = w / torch.exp2(exponent)[..., None]
    grid = torch.tensor(FP4_VALUES[:8])
    nearest = (scaled.abs()[..., None] - grid).abs().argmin(dim=-1)  # index of the magnitude, [rows, G, 32]
    codes = (nearest | ((scaled < 0).long() << 3)).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exponent + SCALE_BIAS).to(torch.uint8)


class Mxfp4(UnpacksWhole):
    """Experts whose gate_up [2I, H] and down [H, I] are MXFP4 (`<proj>_blocks`, `<proj>_scales`),
    gate rows first as everywhere in moespec; biases, if any, in the compute dtype."""

    name = "mxfp4"

    @staticmethod
    def pack(w: ExpertWeights) -> Packed:
        packed: Packed = {}
        for proj in PROJECTIONS:
            packed[f"{proj}_blocks"], packed[f"{proj}_scales"] = quantize(getattr(w, proj))
        packed.update({name: t for name, t in w.tensors().items() if name not in PROJECTIONS})
        return packed

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        return ExpertWeights(**self._unpacked(packed, dtype))

    @staticmethod
    def _unpacked(packed: Packed, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """ExpertWeights fields in `dtype`, computed where `packed` is."""
        fields = {proj: dequantize(packed[f"{proj}_blocks"], packed[f"{proj}_scales"], dtype) for proj in PROJECTIONS}
        fields.update({name: t.to(dtype) for name, t in packed.items() if not name.endswith(("_blocks", "_scales"))})
        return fields
