"""Quantized experts chosen at load (`expert_dtype`): group-wise int8 and int4 formats, and the
cache directory that keeps a quantized model so the next load skips quantizing.

Both formats quantize each weight matrix [rows, cols] in groups of consecutive input columns (the
reduction dimension of the expert's matmul), one scale per (row, group). A group size asked for
must divide both input widths (hidden and expert intermediate); by default each matrix takes the
largest even divisor of its own width up to the format's default, so a 48-wide matrix is not
cut into groups of 16:
- int8: symmetric, q = round(w / s) in [-127, 127], s = max|w| / 127 (a zero is exact);
- int4: asymmetric, q = round((w - min) / s) in [0, 15], s = (max - min) / 15, w ≈ q s + min,
  two values a byte (even column in the low nibble). At 4 bits an offset buys more accuracy than
  it costs (2 bytes per group); kept as a float, not a rounded zero point, so no weight is off by
  more than half a step.
Scales (and int4 offsets) are float16. Biases (gpt-oss) stay in the compute dtype. An expert stays
packed in the host store, on the link and in its device slot; `unpack_into` dequantizes it with
torch ops where a layer uses it.

Quantizing every expert takes seconds to minutes, so `quantized_source` writes the packed
experts to one safetensors file per MoE layer under a cache directory, keyed by the checkpoint's
files (names, sizes, modification times), the format and the compute dtype; the next load reads
them back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import Quantized, registry
from ..errors import MoespecError
from ..spec import ModelSpec
from .base import ExpertWeights, Key
from .formats import Packed

QUANTIZED = ("gate_up", "down")  # the matrices quantized; biases pass through
FORMAT_VERSION = 2  # part of the cache key: bump when the packed layout changes


class GroupQuant(ABC):
    """Group-wise quantization of an expert's two matrices (subclasses: the number format)."""

    name = ""
    default_group = 128
    parts: tuple[str, ...] = ()  # the packed tensors of one matrix

    def __init__(self, group: int = 0):
        """group: columns per group; 0: each matrix's largest even divisor up to `default_group`."""
        self.group = group

    def check(self, spec: ModelSpec) -> None:
        """A one-line error if an asked-for group does not divide both input widths."""
        for what, cols in (("hidden_size", spec.hidden_size), ("expert intermediate size", spec.expert_intermediate_size)):
            if self.group and cols % self.group:
                raise MoespecError(f"expert_group_size={self.group} does not divide the {what} ({cols}) "
                                   f"for expert_dtype={self.name!r}; choose a divisor of {cols}")

    def group_for(self, cols: int) -> int:
        if self.group:
            return self.group
        return max(g for g in range(2, min(cols, self.default_group) + 1, 2) if cols % g == 0)

    def pack(self, w: ExpertWeights) -> Packed:
        packed: Packed = {}
        for name, t in w.tensors().items():
            if name in QUANTIZED:
                packed.update({f"{name}.{part}": v for part, v in self.quantize(t.float()).items()})
            else:
                packed[name] = t
        return packed

    def unpack_into(self, packed: Packed, dst: ExpertWeights) -> None:
        """Matrix by matrix, each dequantized in float32 (into `dst` itself when it is float32)
        and converted as it is copied into `dst` otherwise: one rounding to the compute dtype,
        and no pass more than that needs on the hot path (not formats.UnpacksWhole, which would
        convert a whole float32 expert first)."""
        device = dst.gate_up.device
        for name, t in dst.tensors().items():
            if name not in QUANTIZED:
                t.copy_(packed[name], non_blocking=True)
                continue
            parts = {p: packed[f"{name}.{p}"].to(device, non_blocking=True) for p in self.parts}
            if t.dtype == torch.float32:
                self.dequantize(parts, out=t)
            else:
                t.copy_(self.dequantize(parts))

    def unpack(self, packed: Packed, dtype: torch.dtype) -> ExpertWeights:
        fields = {}
        for name in ("gate_up", "down", "gate_up_bias", "down_bias"):
            if name in QUANTIZED:
                fields[name] = self.dequantize({p: packed[f"{name}.{p}"] for p in self.parts}).to(dtype)
            elif name in packed:
                fields[name] = packed[name].to(dtype)
        return ExpertWeights(**fields)

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        rows, cols = w.shape
        return w.view(rows, -1, self.group_for(cols))

    @abstractmethod
    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """One float32 matrix [rows, cols] -> its packed parts."""

    @abstractmethod
    def dequantize(self, parts: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Packed parts -> the float32 matrix (its width and groups follow from the parts' shapes),
        written into `out` if given (float32, contiguous)."""

    @staticmethod
    def _grouped(out: torch.Tensor | None, rows: int, groups: int) -> torch.Tensor | None:
        return None if out is None else out.view(rows, groups, -1)


class Int8(GroupQuant):
    """Symmetric int8, one float16 scale per group (up to 128 columns by default): about 8.1 bits a weight."""

    name = "int8"
    parts = ("q", "scale")

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self._groups(w)
        scale = (g.abs().amax(dim=-1) / 127).clamp(min=1e-8).half()
        q = torch.round(g / scale.float()[..., None]).clamp(-127, 127).to(torch.int8)
        return {"q": q.view(w.shape), "scale": scale}

    def dequantize(self, parts: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        q, scale = parts["q"], parts["scale"]
        rows, groups = scale.shape
        w = torch.mul(q.view(rows, groups, -1), scale.float()[..., None], out=self._grouped(out, rows, groups))
        return w.view(q.shape)


class Int4(GroupQuant):
    """Asymmetric int4 with a float16 scale and offset per group (up to 64 columns by default): about 4.5 bits a weight."""

    name = "int4"
    default_group = 64
    parts = ("q", "scale", "offset")

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self._groups(w)
        offset = g.amin(dim=-1).half()
        scale = ((g.amax(dim=-1) - offset.float()) / 15).clamp(min=1e-8).half()
        q = torch.round((g - offset.float()[..., None]) / scale.float()[..., None]).clamp(0, 15).to(torch.uint8)
        q = q.view(w.shape[0], -1, 2)
        return {"q": q[..., 0] | (q[..., 1] << 4), "scale": scale, "offset": offset}

    def dequantize(self, parts: dict[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        packed, scale, offset = parts["q"], parts["scale"], parts["offset"]
        rows, groups = scale.shape
        q = nibbles(packed).view(rows, groups, -1)
        w = torch.mul(q, scale.float()[..., None], out=self._grouped(out, rows, groups))
        return w.add_(offset.float()[..., None]).view(rows, -1)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n] -> the 4-bit codes [rows, 2n], each byte's low nibble first (Int4's layout,
    and compressed-tensors' on a little-endian host).

    Spread in 16-bit words: b | b << 4 masked with 0x0F0F puts the low nibble in the low byte and
    the high nibble in the high byte, which a little-endian host stores in that order; four
    passes over half-width words, about 3x faster on the CPU than splitting and interleaving
    two byte tensors (torch.stack)."""
    x = packed.to(torch.int16)
    return (x | (x << 4)).bitwise_and_(0x0F0F).view(torch.uint8).view(packed.shape[0], -1)


QUANTIZERS: dict[str, type[GroupQuant]] = registry(Quantized, {"int8": Int8, "int4": Int4})


def make_quantizer(expert_dtype: str, group: int, spec: ModelSpec) -> GroupQuant:
    """The format `expert_dtype` names, with `group` columns per group (0: per matrix, see above)."""
    fmt = QUANTIZERS[expert_dtype](group)
    fmt.check(spec)
    return fmt


class QuantizedSource:
    """The Checkpoint interface for routed experts (spec, format, expert) over quantized experts:
    in memory, or read back from the cache directory's per-layer files."""

    def __init__(self, spec: ModelSpec, fmt: GroupQuant, experts: dict[Key, Packed] | None = None,
                 files: dict[int, Path] | None = None):
        self.spec, self.format = spec, fmt
        self._experts, self._files = experts, files or {}
        self._handles: dict[int, object] = {}

    def expert(self, layer: int, expert: int, dtype: torch.dtype, direct: bool = False) -> Packed:
        if self._experts is not None:
            return self._experts[(layer, expert)]
        if layer not in self._handles:
            self._handles[layer] = safe_open(self._files[layer], framework="pt")
        f, prefix = self._handles[layer], f"{expert}."
        return {name[len(prefix):]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}


def cache_root() -> Path:
    """Where quantized models are kept: $MOESPEC_CACHE, else ~/.cache/moespec."""
    return Path(os.environ.get("MOESPEC_CACHE") or Path.home() / ".cache" / "moespec")


def _cache_key(model_dir: Path, fmt: GroupQuant, dtype: torch.dtype) -> str:
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir.glob("*.safetensors"))
    ident = json.dumps([str(model_dir.resolve()), files, fmt.name, fmt.group, str(dtype), FORMAT_VERSION])
    return hashlib.sha256(ident.encode()).hexdigest()[:20]


def quantized_source(checkpoint, fmt: GroupQuant, dtype: torch.dtype,
                     progress: Callable[[list[Key]], Iterator[Key]] = iter) -> QuantizedSource:
    """`checkpoint`'s routed experts quantized to `fmt`: read from the cache directory if a
    previous load left them there, else quantized now (and saved when the checkpoint is on disk)."""
    spec = checkpoint.spec
    keys = [(layer, e) for layer in spec.moe_layer_ids for e in range(spec.num_experts)]
    model_dir = getattr(checkpoint, "dir", None)
    where = None if model_dir is None else cache_root() / "quantized" / _cache_key(Path(model_dir), fmt, dtype)
    files = {layer: where / f"layer-{layer}.safetensors" for layer in spec.moe_layer_ids} if where else {}
    if where is not None and (where / "done").is_file():
        return QuantizedSource(spec, fmt, files=files)

    def quantize(key: Key) -> Packed:  # from float32, whatever the compute dtype
        return fmt.pack(checkpoint.format.unpack(checkpoint.expert(*key, torch.float32), torch.float32))

    experts = {key: quantize(key) for key in progress(keys)}
    if where is None:
        return QuantizedSource(spec, fmt, experts=experts)
    try:
        where.mkdir(parents=True, exist_ok=True)
        for layer, path in files.items():
            save_file({f"{e}.{name}": t.contiguous() for (l, e), packed in experts.items() if l == layer
                       for name, t in packed.items()}, str(path))
        (where / "done").write_text(json.dumps({"model": str(model_dir), "format": fmt.name, "group": fmt.group or "auto"}))
    except OSError as e:  # a read-only home still runs, it only quantizes again next time
        print(f"moespec: could not keep quantized experts in {where}: {e}", file=sys.stderr)
    return QuantizedSource(spec, fmt, experts=experts)
