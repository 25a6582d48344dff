"""Reading Hugging Face safetensors checkpoints, one tensor (or one expert) at a time.

Dense weights are read once into the model. Expert weights are read per (layer, expert) on
request, through safetensors' memory-mapped `safe_open`, so a caller that wants one expert never
reads the rest of the file. The per-architecture key names live here and nowhere else.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from .direct_io import DirectReader
from .errors import MoespecError
from .spec import ModelSpec, load_spec
from .validate import check_expert, check_finite, check_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def moe_prefix(spec: ModelSpec) -> str:
    """The module name of the MoE block inside a decoder layer."""
    return "block_sparse_moe" if spec.model_type == "mixtral" else "mlp"


def expert_proj_names(spec: ModelSpec) -> tuple[str, str, str]:
    """On-disk names of an expert's (gate, up, down) projections."""
    return ("w1", "w3", "w2") if spec.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def model_name(checkpoint_name: str) -> str:
    """The parameter name in moespec's Transformer for a checkpoint tensor name."""
    return checkpoint_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")


def switch_ff_prefix(spec: ModelSpec, layer: int) -> str:
    """Switch Transformers: the feed-forward sublayer of global layer `layer` (encoder layers first)."""
    if layer < spec.num_encoder_layers:
        return f"encoder.block.{layer}.layer.1."
    return f"decoder.block.{layer - spec.num_encoder_layers}.layer.2."


def _switch_dense_names(spec: ModelSpec) -> list[str]:
    """Switch keys are transformers' module names, which moespec's SwitchTransformer reuses as they are."""
    names = ["shared.weight"] if spec.tie_word_embeddings else \
        ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"]
    names += ["encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"]
    for layer, is_moe in enumerate(spec.moe_layers):
        decoder = layer >= spec.num_encoder_layers
        p = f"decoder.block.{layer - spec.num_encoder_layers}." if decoder else f"encoder.block.{layer}."
        attention = [p + "layer.0.SelfAttention."] + ([p + "layer.1.EncDecAttention."] if decoder else [])
        names += [a + f"{x}.weight" for a in attention for x in "qkvo"]
        names += [p + f"layer.{i}.layer_norm.weight" for i in range(len(attention) + 1)]
        if layer in (0, spec.num_encoder_layers):
            names.append(p + "layer.0.SelfAttention.relative_attention_bias.weight")
        ff = switch_ff_prefix(spec, layer) + "mlp."
        if is_moe:
            names += [ff + "router.classifier.weight"] + ([ff + "router.classifier.bias"] if spec.router_bias else [])
        else:
            names += [ff + "wi.weight", ff + "wo.weight"]
    return names


def dense_tensor_names(spec: ModelSpec) -> list[str]:
    """Every non-expert tensor the forward pass needs, by its name in the checkpoint."""
    if spec.num_encoder_layers:
        return _switch_dense_names(spec)
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not spec.tie_word_embeddings:
        names.append("lm_head.weight")
    for i, is_moe in enumerate(spec.moe_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if spec.attention_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if spec.qk_norm != "none":
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        if is_moe:
            names.append(p + f"{moe_prefix(spec)}.gate.weight")
            if spec.shared_expert_intermediate_size:
                names += [p + f"mlp.shared_expert.{x}_proj.weight" for x in ("gate", "up", "down")]
            if spec.shared_expert_gate:
                names.append(p + "mlp.shared_expert_gate.weight")
        else:
            names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


class Checkpoint:
    """A checkpoint directory: which file holds which tensor, and typed reads of single tensors."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec):
        self.dir = Path(model_dir)
        self.spec = spec
        self._file_of = self._index()
        self._handles: dict[Path, object] = {}
        self._handles_lock = threading.Lock()
        self.direct = DirectReader()  # O_DIRECT reads of experts (the disk tier with direct_io)
        # transformers >= 5 can also store a layer's experts fused into [E, ...] tensors
        self._fused = any(f"model.layers.{i}.mlp.experts.gate_up_proj" in self._file_of for i in spec.moe_layer_ids)
        self._check_complete()

    def _index(self) -> dict[str, Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise MoespecError(f"{index} is not a valid safetensors index: {e}") from None
            files = {name: self.dir / fname for name, fname in weight_map.items()}
            for path in sorted(set(files.values())):
                if not path.is_file():
                    raise MoespecError(f"checkpoint shard listed in {INDEX_FILE} not found: {path}")
                check_safetensors(path)
            return files
        paths = [self.dir / SINGLE_FILE] if (self.dir / SINGLE_FILE).is_file() else sorted(self.dir.glob("*.safetensors"))
        if not paths:
            raise MoespecError(f"no safetensors weights in {self.dir} (expected {SINGLE_FILE} or {INDEX_FILE})")
        files: dict[str, Path] = {}
        for path in paths:
            check_safetensors(path)
            with safe_open(path, framework="pt") as f:
                files.update({name: path for name in f.keys()})
        return files

    def _expert_names(self, layer: int, expert: int) -> list[str]:
        if self.spec.num_encoder_layers:
            return [f"{switch_ff_prefix(self.spec, layer)}mlp.experts.expert_{expert}.{w}.weight" for w in ("wi", "wo")]
        p = f"model.layers.{layer}.{moe_prefix(self.spec)}.experts."
        if self._fused:
            return [p + "gate_up_proj", p + "down_proj"]
        return [f"{p}{expert}.{proj}.weight" for proj in expert_proj_names(self.spec)]

    def _check_complete(self) -> None:
        needed = dense_tensor_names(self.spec) + [
            n for layer in self.spec.moe_layer_ids for e in range(self.spec.num_experts)
            for n in self._expert_names(layer, e)
        ]
        missing = [n for n in dict.fromkeys(needed) if n not in self._file_of]
        if missing:
            raise MoespecError(
                f"checkpoint {self.dir} is missing {len(missing)} tensor(s), first: {missing[0]}"
            )

    def _handle(self, path: Path):
        with self._handles_lock:  # the transfer side's reader threads open files too
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="pt")
            return self._handles[path]

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor by its checkpoint name, converted to `dtype`, on the CPU."""
        return self._handle(self._file_of[name]).get_tensor(name).to(dtype)

    def expert(self, layer: int, expert: int, dtype: torch.dtype,
               direct: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One routed expert's (gate [I, H], up [I, H], down [H, I]) weights, read alone;
        `direct`: around the page cache (O_DIRECT), so repeated reads still come from the disk.

        An ungated expert (Switch: wo(relu(wi x))) comes back as (wi, an empty [0, H] up, wo), so
        `gate_up` built by concatenation is exactly wi and every store and cache works unchanged.
        """
        names = self._expert_names(layer, expert)
        index = expert if self._fused and not self.spec.num_encoder_layers else None

        def read(name: str) -> torch.Tensor:
            if direct:
                return self.direct.tensor(self._file_of[name], name, index).to(dtype)
            if index is not None:
                return self._handle(self._file_of[name]).get_slice(name)[index].to(dtype)
            return self.tensor(name, dtype)

        if not self.spec.gated_mlp:
            wi, wo = (read(n) for n in names)
            weights = wi, wi[:0], wo
        elif self._fused:
            gate_up, down = (read(n) for n in names)
            gate, up = gate_up.chunk(2, dim=0)
            weights = gate.contiguous(), up.contiguous(), down
        else:
            weights = tuple(read(n) for n in names)
        return check_expert(self.spec, names, expert, weights)

    def dense_state(self, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
        """All non-expert tensors on `device`, keyed by the model's parameter names."""
        return {model_name(name): check_finite(name, self.tensor(name, dtype)).to(device)
                for name in dense_tensor_names(self.spec)}


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """The checkpoint in `model_dir`, its spec parsed from config.json."""
    return Checkpoint(model_dir, load_spec(model_dir))
