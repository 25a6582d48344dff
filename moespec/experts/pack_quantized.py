"""Pre-quantized int4 / int8 checkpoints in compressed-tensors' `pack-quantized` format, repacked
once at load into moespec's own group formats (experts/quant.py) without changing any weight.

Why this format: one layout covers both algorithms. vLLM's llm-compressor (which AutoAWQ is
deprecated in favour of) saves its GPTQ and its AWQ results alike as compressed-tensors
`pack-quantized` W4A16 / W8A16, as do the MoE W4A16 releases made with it (RedHatAI's /
neuralmagic's Mixtral, Qwen3-MoE, DeepSeek, Llama-4 ones); vLLM and transformers read it through
the maintained `compressed-tensors` library, whose compressor also writes the tests' checkpoints.
The `quant_method: "gptq"` layout (`qweight` [in/8, out], `qzeros`, `g_idx`) that AutoGPTQ and
GPTQModel write, Qwen's `*-GPTQ-Int4` MoE releases among them, is not read yet (a one-line error):
one format read well rather than two read badly.

A quantized Linear weight `X.weight` [out, in] is stored as:
- `X.weight_packed` int32 [out, ceil(in * bits / 32)]: the row's codes u = q + 2^(bits-1) back to
  back from bit 0 (input column i at bits [bits*i, bits*(i+1)) of the row);
- `X.weight_scale` [out, in / group_size] (channel strategy: [out, 1]) in the model's float dtype;
- `X.weight_zero_point` int32 [ceil(out * bits / 32), in / group_size], asymmetric only: the zero
  codes, packed the same way along the output dimension;
- `X.weight_shape` [2]: (out, in); `X.weight_g_idx` [in] with activation-order groups (refused
  unless it is the plain order, column i in group i // group_size).
The weight is scale * (u - z), z the zero code (2^(bits-1) when symmetric).

Repacking, exactly lossless: on a little-endian host (every platform torch ships for) a row of
int32 words is its 4-bit codes two a byte, the even column in the low nibble, which is Int4's
`q` byte for byte; Int4 computes q * scale + offset in float32, and with offset = -z * scale that
is scale * (u - z) exactly (each product has at most 15 significant bits). The offset keeps the
scale's dtype when symmetric (z = 8, a power of two: exact) and is float32 when not (z * scale
can need 15 bits). 8-bit codes are whole bytes: Int8's q = u - 128, so symmetric only. Experts
then stay in that packed form in the host store, on the link and in their device slots; dense
weights are dequantized once at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import MoespecError
from .quant import GroupQuant, Int4, Int8, nibbles

FORMAT = "pack-quantized"
PACKED = "_packed"  # "X.weight" is stored as "X.weight_packed" (and its _scale, _zero_point, ...)
STRATEGIES = ("group", "channel")


def _refuse(field: str, value, supported: str) -> MoespecError:
    return MoespecError(f"quantization_config.{field} {value!r} is not supported ({supported})")


@dataclass(frozen=True)
class PackQuantized:
    """A compressed-tensors pack-quantized checkpoint's weight quantization: `bits` and `symmetric`
    (one setting for every quantized weight; group sizes follow from each weight's scales)."""

    bits: int
    symmetric: bool

    @classmethod
    def from_config(cls, quant: dict) -> PackQuantized:
        """Read config.json's quantization_config (quant_method "compressed-tensors"), refusing in
        one line what moespec does not read: other formats, activation or KV-cache quantization,
        other bit widths, strategies, and asymmetric 8-bit."""
        if quant.get("format") != FORMAT:
            raise _refuse("format", quant.get("format"), f"compressed-tensors checkpoints are read in {FORMAT!r} format")
        if quant.get("kv_cache_scheme"):
            raise _refuse("kv_cache_scheme", quant["kv_cache_scheme"], "a quantized KV cache is not read")
        groups = quant.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise _refuse("config_groups", groups, "expected a non-empty object of quantization schemes")
        settings = {cls._scheme(f"config_groups.{name}", scheme) for name, scheme in groups.items()}
        if len(settings) > 1:
            raise _refuse("config_groups", sorted(groups), "all groups must quantize weights with the same bits and symmetry")
        return settings.pop()

    @classmethod
    def _scheme(cls, where: str, scheme) -> PackQuantized:
        if not isinstance(scheme, dict):
            raise _refuse(where, scheme, "expected a scheme object with its 'weights' arguments")
        for acts in ("input_activations", "output_activations"):
            if scheme.get(acts):
                raise _refuse(f"{where}.{acts}", scheme[acts], "only weight-only schemes such as W4A16 are read")
        w = scheme.get("weights")
        if not isinstance(w, dict):
            raise _refuse(f"{where}.weights", w, "expected the weights' quantization arguments")
        checks = (("type", w.get("type"), w.get("type") == "int", "only 'int'"),
                  ("num_bits", w.get("num_bits"), w.get("num_bits") in (4, 8), "only 4 or 8"),
                  ("strategy", w.get("strategy"), w.get("strategy") in STRATEGIES, f"only {' or '.join(STRATEGIES)}"),
                  ("dynamic", w.get("dynamic"), not w.get("dynamic"), "weights must be quantized ahead"),
                  ("symmetric", w.get("symmetric"), w.get("symmetric", True) or w.get("num_bits") == 4,
                   "8-bit weights must be symmetric"))
        for field, value, ok, supported in checks:
            if not ok:
                raise _refuse(f"{where}.weights.{field}", value, supported)
        return cls(w["num_bits"], bool(w.get("symmetric", True)))

    @property
    def format(self) -> GroupQuant:
        """moespec's format the packed weights are repacked into (its `dequantize` reads any group size)."""
        return Int4() if self.bits == 4 else Int8()

    def parts(self, name: str, read: Callable[[str], torch.Tensor]) -> tuple[tuple[int, int], dict[str, torch.Tensor]]:
        """Weight `name` ("X.weight", its tensors read as stored by `read`, which raises KeyError
        for one the checkpoint lacks) -> its shape [out, in] and its parts in `self.format`,
        unchanged in value."""
        def tensor(suffix: str, required: bool = True) -> torch.Tensor | None:
            try:
                return read(name + suffix)
            except KeyError:
                if required:
                    raise MoespecError(f"pack-quantized weight {name}{PACKED} has no {name}{suffix} "
                                       "in the checkpoint") from None
                return None

        packed, scale = tensor(PACKED), tensor("_scale")
        rows = packed.shape[0]
        cols = int(tensor("_shape")[-1])
        groups = scale.shape[-1] if scale.dim() == 2 else 0
        words = -(-cols * self.bits // 32)
        if packed.dtype != torch.int32 or tuple(packed.shape) != (rows, words) or scale.shape[0] != rows \
                or not groups or cols % groups or cols * self.bits % 8:
            raise MoespecError(f"{name}{PACKED} {list(packed.shape)} ({packed.dtype}) with scales {list(scale.shape)} "
                               f"does not hold a [{rows}, {cols}] weight in whole groups of {self.bits}-bit codes")
        self._check_plain_order(name, tensor("_g_idx", required=False), cols, cols // groups)
        codes = packed.view(torch.uint8)[:, :cols * self.bits // 8]
        if self.bits == 8:
            return (rows, cols), {"q": (codes.short() - 128).to(torch.int8), "scale": scale}
        if self.symmetric:
            return (rows, cols), {"q": codes.contiguous(), "scale": scale, "offset": scale * -8}
        zero = nibbles(tensor("_zero_point").T.contiguous().view(torch.uint8))[:, :rows].T  # [rows, groups]
        return (rows, cols), {"q": codes.contiguous(), "scale": scale, "offset": -(zero * scale.float())}

    @staticmethod
    def _check_plain_order(name: str, g_idx: torch.Tensor | None, cols: int, group: int) -> None:
        """Activation-order checkpoints store each column's group; only the plain order is read."""
        if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(cols) // group):
            raise MoespecError(f"{name}_g_idx: activation-order groups (quantization_config actorder 'group') are "
                               "not supported; only weights whose columns are grouped in order")

    def dequantize(self, name: str, read: Callable[[str], torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Weight `name` in `dtype` (a dense weight, dequantized once at load)."""
        _, parts = self.parts(name, read)
        return self.format.dequantize(parts).to(dtype)
