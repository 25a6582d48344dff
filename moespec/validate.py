"""Checks of what a checkpoint directory holds, run as it loads.

A truncated or foreign weights file, a tensor of the wrong shape, non-finite weights or a
config.json field of the wrong type would otherwise surface as a traceback from deep inside
safetensors, torch or the spec parsers, or worse, as a model that runs and prints garbage. Each
check here raises one `MoespecError` line naming the file, the tensor or the field, and the value.
Nothing here knows an architecture's key names: shapes come from the spec and from the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, get_type_hints

import torch

from .errors import MoespecError
from .experts.formats import Packed

if TYPE_CHECKING:
    from .spec import ModelSpec

# bytes per element of each safetensors dtype
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "F4": 0.5, "F6_E2M3": 0.75,
               "F6_E3M2": 0.75, "C64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own bound


def check_safetensors(path: Path) -> None:
    """The file is a whole safetensors file: its header parses, and the tensors it lists exactly
    cover the bytes after it (a truncated download or a foreign file fails here, named)."""
    size = path.stat().st_size

    def bad(why: str) -> MoespecError:
        return MoespecError(f"{path} is not a valid safetensors file: {why}")

    if size < 8:
        raise bad(f"only {size} bytes")
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header of {header_len} bytes in a file of {size} bytes (truncated or not safetensors)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("its header is not JSON") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    data = size - 8 - header_len
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = info["data_offsets"]
            count = math.prod(info["shape"])
            width = DTYPE_BYTES[info["dtype"]]
        except (TypeError, KeyError, ValueError):
            raise bad(f"tensor {name!r} has a malformed header entry") from None
        if stop > data:
            raise bad(f"tensor {name!r} ends at byte {stop} of {data} data bytes (the file is truncated)")
        if stop - start != math.ceil(count * width):
            raise bad(f"tensor {name!r} has {stop - start} bytes for shape {info['shape']} of {info['dtype']}")
        end = max(end, stop)
    if end != data:
        raise bad(f"{data - end} bytes after the last tensor")


def check_finite(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, if every value is finite; NaN or Inf weights would only show as garbage output."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MoespecError(f"checkpoint tensor {name} holds {bad} NaN or Inf value(s) of {tensor.numel()} "
                           f"(as {str(tensor.dtype).removeprefix('torch.')})")
    return tensor


def _shape_error(spec: ModelSpec, name: str, found: tuple[int, ...], expected: tuple[int, ...]) -> MoespecError:
    return MoespecError(f"checkpoint tensor {name} has shape {list(found)}, expected {list(expected)} "
                        f"(hidden_size={spec.hidden_size}, expert intermediate size={spec.expert_intermediate_size} "
                        "in config.json)")


def check_expert_parts(spec: ModelSpec, names: list[str], shapes: tuple[tuple[int, ...], ...]) -> None:
    """An unfused gated expert's (gate, up, down) weight shapes, as read: [I, H], [I, H], [H, I]."""
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    for name, found, shape in zip(names, shapes, ((inter, hidden), (inter, hidden), (hidden, inter))):
        if tuple(found) != shape:
            raise _shape_error(spec, name, tuple(found), shape)


def check_expert(spec: ModelSpec, names: list[str], expert: int, packed: Packed) -> Packed:
    """An expert as read: in the compute dtype gate_up [2I, H] (ungated: [I, H]), down [H, I],
    biases [2I], [H] with I, H from the spec (packed formats' shapes are checked when the
    checkpoint is opened), every floating value finite (FP8 values and scales too). `names`: its
    checkpoint tensors, for the message (a fused [E, ...] tensor is named with the expert's index)."""
    hidden, inter = spec.hidden_size, spec.expert_intermediate_size
    rows = (2 if spec.gated_mlp else 1) * inter
    expected = {"gate_up": (rows, hidden), "down": (hidden, inter), "gate_up_bias": (rows,), "down_bias": (hidden,)}
    source = {"gate_up": names[0], "down": names[-1] if len(names) <= 3 else names[1]}
    fused = len(names) != 3 or not spec.gated_mlp
    for part, tensor in packed.items():
        name = source.get(part, names[0]) + (f"[{expert}]" if fused else "") + ("" if part in source else f" ({part})")
        if part in expected and "gate_up" in packed and tuple(tensor.shape) != expected[part]:
            raise _shape_error(spec, name, tuple(tensor.shape), expected[part])
        check_finite(name, tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor)
    return packed


def check_shapes(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Every dense tensor read has the shape of the model parameter it loads into (the model is
    built from config.json, so a mismatch means the two disagree)."""
    for name, tensor in state.items():
        want = expected.get(name)
        if want is not None and want.shape != tensor.shape:
            raise MoespecError(f"checkpoint tensor for {name} has shape {list(tensor.shape)}, expected "
                               f"{list(want.shape)} from config.json")


# spec fields that must be at least 1 (the rest of the int fields at least 0)
POSITIVE = {"vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "max_position_embeddings", "num_experts", "top_k", "expert_intermediate_size"}


def _config_key(cfg: dict[str, Any], value: Any, default: str) -> str:
    """The config.json key that holds `value` with its type (the spec field's name if none does)."""
    return next((k for k, v in cfg.items() if type(v) is type(value) and v == value), default)


def check_config_types(cfg: dict[str, Any], spec: ModelSpec) -> None:
    """Each numeric field of a parsed spec has its type (JSON "32" or 2.0 is no layer count) and
    a sensible sign, named by its config.json key where one holds the value."""
    for f in dataclasses.fields(spec):
        kind, value = get_type_hints(type(spec))[f.name], getattr(spec, f.name)
        if value is None:
            continue
        if kind in (int, int | None):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (f.name in POSITIVE)
            want = "a positive integer" if f.name in POSITIVE else "an integer >= 0"
        elif kind in (float, float | None):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            want = "a finite number"
        else:
            continue
        if not ok:
            raise MoespecError(f"config.json field {_config_key(cfg, value, f.name)!r} must be {want}, got {value!r}")


def _as_number(value: Any) -> int | float | None:
    """What a mistyped numeric value meant: "32" -> 32, "1e-5" -> 1e-05, 2.0 -> 2 (else None)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return int(number) if number.is_integer() and value.strip().lstrip("-").isdigit() else number
    return None


def blame_config(cfg: dict[str, Any], parse: Callable[[dict[str, Any]], Any], error: Exception) -> MoespecError:
    """The one-line error for a parser that failed on a value of the wrong type: the first
    config.json field whose number-typed value lets the parser get past the failure."""
    for key, value in cfg.items():
        number = _as_number(value)
        if number is None:
            continue
        try:
            parse({**cfg, key: number})
        except (TypeError, ValueError, AttributeError, ZeroDivisionError):
            continue
        except Exception:  # got further: this field was (one of) the problem(s)
            pass
        kind = "an integer" if isinstance(number, int) else "a number"
        return MoespecError(f"config.json field {key!r} must be {kind}, got {value!r}")
    return MoespecError(f"config.json for {cfg.get('model_type')} has a field of the wrong type "
                        f"({type(error).__name__}: {error})")
