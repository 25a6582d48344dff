"""Reading Hugging Face safetensors checkpoints, one tensor (or one expert) at a time.

Dense weights are read once into the model. Expert weights are read per (layer, expert) on
request, through safetensors' memory-mapped `safe_open`, so a caller that wants one expert never
reads the rest of the file. The per-architecture key names live here and nowhere else.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .direct_io import DirectReader
from .errors import MoespecError
from .experts.formats import Dense, ExpertFormat, Packed
from .experts.fp8 import FP8, PROJECTIONS, SCALE_SUFFIX, Fp8Blocks, check_scale, dequantize
from .experts.mxfp4 import BLOCK, Mxfp4
from .experts.pack_quantized import PACKED, PackQuantized
from .spec import ModelSpec, load_spec
from .validate import check_expert, check_expert_parts, check_finite, check_safetensors

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# config.json's quantization_config.quant_method values read: FP8 128x128-block checkpoints
# (DeepSeek-V3; dense weights dequantised at load, experts kept packed), gpt-oss's MXFP4 experts,
# and compressed-tensors' pack-quantized int4/int8 (experts/pack_quantized.py: GPTQ and AWQ
# checkpoints as llm-compressor writes them)
QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors")


FF_PREFIX = {"mixtral": "block_sparse_moe", "llama4_text": "feed_forward"}  # default "mlp"


def moe_prefix(spec: ModelSpec) -> str:
    """The module name of the feed-forward block (MoE or dense) inside a decoder layer."""
    return FF_PREFIX.get(spec.model_type, "mlp")


def router_name(spec: ModelSpec) -> str:
    """The module name of the router inside the MoE block (moespec's is always `gate`)."""
    return "router" if spec.model_type in ("gpt_oss", "llama4_text") else "gate"


def fused_experts_transposed(spec: ModelSpec) -> bool:
    """Fused experts stored for x @ W (Llama-4: gate_up [E, H, 2I], down [E, I, H]) rather than in
    F.linear's orientation ([E, 2I, H], [E, H, I]) as transformers' other fused experts are."""
    return spec.model_type == "llama4_text"


def expert_proj_names(spec: ModelSpec) -> tuple[str, str, str]:
    """On-disk names of an expert's (gate, up, down) projections."""
    return ("w1", "w3", "w2") if spec.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def expert_tensor_names(spec: ModelSpec, layer: int, expert: int) -> list[str]:
    """An unfused expert's (gate, up, down) tensor names in the checkpoint."""
    return [f"model.layers.{layer}.{moe_prefix(spec)}.experts.{expert}.{proj}.weight" for proj in expert_proj_names(spec)]


def shared_expert_name(spec: ModelSpec) -> str:
    """The shared expert's module name inside the MoE block (DeepSeek's holds n_shared_experts fused)."""
    return "shared_experts" if spec.model_type in ("deepseek_v2", "deepseek_v3", "kimi_k2", "glm4_moe") \
        else "shared_expert"


def model_name(checkpoint_name: str) -> str:
    """The parameter name in moespec's Transformer for a checkpoint tensor name."""
    name = checkpoint_name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.") \
        .replace(".feed_forward.", ".mlp.").replace(".mlp.shared_experts.", ".mlp.shared_expert.")  # Llama-4, DeepSeek
    return name.replace(".mlp.router.", ".mlp.gate.") if name.startswith("layers.") else name  # gpt-oss, Llama-4


def attention_tensor_names(spec: ModelSpec, prefix: str) -> list[str]:
    """The attention block's tensors of the decoder layer at `prefix` ("model.layers.<i>.")."""
    p = prefix + "self_attn."
    if spec.attention == "mla":
        query = ["q_a_proj.weight", "q_a_layernorm.weight", "q_b_proj.weight"] if spec.q_lora_rank else ["q_proj.weight"]
        names = query + ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
        if spec.attention_bias:
            names += (["q_a_proj.bias"] if spec.q_lora_rank else []) + ["kv_a_proj_with_mqa.bias", "o_proj.bias"]
        return [p + n for n in names]
    names = [p + f"{x}_proj.weight" for x in "qkvo"]
    if spec.attention_bias:
        names += [p + f"{x}_proj.bias" for x in "qkv"]
    if spec.attention_out_bias:
        names.append(p + "o_proj.bias")
    if spec.attention_sinks:
        names.append(p + "sinks")
    if spec.qk_norm in ("head", "full"):  # "l2" has no weight
        names += [p + "q_norm.weight", p + "k_norm.weight"]
    return names


def fp8_block_size(quant: dict) -> tuple[int, int]:
    """The FP8 weight block an fp8 `quantization_config` declares."""
    for field, supported in (("fmt", "e4m3"), ("scale_fmt", "float")):
        if quant.get(field, supported) != supported:
            raise MoespecError(f"quantization_config.{field} {quant[field]!r} is not supported (only {supported!r})")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise MoespecError(f"quantization_config.weight_block_size {block!r} is not supported "
                           "(FP8 needs [rows, columns] blocks, e.g. [128, 128])")
    return block[0], block[1]


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
        names += attention_tensor_names(spec, p)
        ff = f"{p}{moe_prefix(spec)}."
        if is_moe:
            router = f"{ff}{router_name(spec)}."
            names += [router + "weight"] + ([router + "bias"] if spec.router_bias else [])
            if spec.router_correction_bias:
                names.append(router + "e_score_correction_bias")
            if spec.shared_expert_intermediate_size:
                names += [ff + f"{shared_expert_name(spec)}.{x}_proj.weight" for x in ("gate", "up", "down")]
            if spec.shared_expert_gate:
                names.append(p + "mlp.shared_expert_gate.weight")
        else:
            names += [ff + f"{x}_proj.weight" for x in ("gate", "up", "down")]
    return names


def gated_expert(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gate_shape: tuple[int, ...],
                 down_shape: tuple[int, ...], dtype: torch.dtype, out: torch.Tensor | None = None) -> Packed:
    """A gated expert from its projections as flat tensors of any dtype: gate_up [2I, H] (gate
    rows first) and down [H, I] in `dtype`, views of one buffer that a single `cat` fills and
    converts: `out` (flat, `dtype`: e.g. the cache slot a reader process fills) or one of their own."""
    size = gate.numel() + up.numel() + down.numel()
    out = torch.empty(size, dtype=dtype) if out is None else out[:size]
    torch.cat((gate, up, down), out=out)
    rows = gate.numel() + up.numel()
    return {"gate_up": out[:rows].view(2 * gate_shape[0], *gate_shape[1:]), "down": out[rows:].view(down_shape)}


class Checkpoint:
    """A checkpoint directory: which file holds which tensor, and typed reads of single tensors."""

    def __init__(self, model_dir: str | Path, spec: ModelSpec):
        self.dir = Path(model_dir)
        self.spec = spec
        self._file_of = self._index()
        self._handles: dict[Path, object] = {}
        self._handles_lock = threading.Lock()
        self._checked: set[tuple[int, int]] = set()  # experts whose values were checked at a first read
        self._names: dict[tuple[int, int], list[str]] = {}  # (layer, expert) -> its tensors' names
        self.direct = DirectReader()  # O_DIRECT reads of experts (the disk tier with direct_io)
        quant = self._quantization()
        method = quant.get("quant_method")
        self.fp8_block = fp8_block_size(quant) if method == "fp8" else None
        self.pack_quantized = PackQuantized.from_config(quant) if method == "compressed-tensors" else None
        # how `expert` hands experts out (MXFP4, FP8 and pack-quantized packed; otherwise in the compute dtype)
        self.format: ExpertFormat = Mxfp4() if method == "mxfp4" else Dense()
        # transformers >= 5 can also store a layer's experts fused into [E, ...] tensors (gpt-oss always does)
        self._fused = spec.model_type == "gpt_oss" or any(
            f"model.layers.{i}.{moe_prefix(spec)}.experts.gate_up_proj" in self._file_of for i in spec.moe_layer_ids)
        if isinstance(self.format, Mxfp4):
            self._check_mxfp4()
        self._check_complete()
        first_expert = self._expert_names(spec.moe_layer_ids[0], 0)[0] if spec.moe_layer_ids else None
        if self.fp8_block is not None and first_expert is not None and self._is_fp8(first_expert):
            self.format = Fp8Blocks(self.fp8_block)
        if self.pack_quantized is not None and first_expert is not None and self._is_packed(first_expert):
            self.format = self.pack_quantized.format

    def _quantization(self) -> dict:
        """config.json's `quantization_config` ({}: not quantized), if moespec reads its method."""
        path = self.dir / "config.json"
        quant = (json.loads(path.read_text()).get("quantization_config") if path.is_file() else None) or {}
        method = quant.get("quant_method")
        if quant and method not in QUANT_METHODS:
            raise MoespecError(f"{path}: quantization_config.quant_method {method!r} is not supported "
                               f"(supported: {', '.join(QUANT_METHODS)})")
        if method == "mxfp4" and self.spec.model_type != "gpt_oss":
            raise MoespecError(f"{path}: quant_method 'mxfp4' is read for gpt_oss checkpoints only, "
                               f"not {self.spec.model_type}")
        return quant

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _check_mxfp4(self) -> None:
        """Every MXFP4 expert tensor has its scales, both of the shapes the spec's sizes need."""
        s = self.spec
        for layer in s.moe_layer_ids:
            p = f"model.layers.{layer}.mlp.experts."
            for proj, rows, cols in (("gate_up_proj", 2 * s.expert_intermediate_size, s.hidden_size),
                                     ("down_proj", s.hidden_size, s.expert_intermediate_size)):
                blocks, scales = f"{p}{proj}_blocks", f"{p}{proj}_scales"
                if blocks not in self._file_of:
                    continue  # reported as missing by _check_complete
                if scales not in self._file_of:
                    raise MoespecError(f"checkpoint {self.dir}: MXFP4 tensor {blocks} has no scales ({scales} is missing)")
                if cols % BLOCK:
                    raise MoespecError(f"checkpoint {self.dir}: MXFP4 tensor {blocks} needs {cols} columns to be "
                                       f"a multiple of {BLOCK}")
                want = (s.num_experts, rows, cols // BLOCK, BLOCK // 2)
                if self._shape(blocks) != want:
                    raise MoespecError(f"checkpoint {self.dir}: MXFP4 tensor {blocks} has shape "
                                       f"{list(self._shape(blocks))}, expected {list(want)}")
                if self._shape(scales) != want[:3]:
                    raise MoespecError(f"checkpoint {self.dir}: MXFP4 scales {scales} have shape "
                                       f"{list(self._shape(scales))}, expected {list(want[:3])} (one per {BLOCK} "
                                       f"values of {blocks})")

    def _index(self) -> dict[str, Path]:
        """Which file holds each tensor, by the text model's name: a checkpoint whose text model
        sits under `spec.weights_prefix` (multimodal Llama-4) is read without its other towers."""
        prefix = self.spec.weights_prefix
        files = self._files()
        return {name[len(prefix):]: path for name, path in files.items() if name.startswith(prefix)} if prefix else files

    def _files(self) -> dict[str, Path]:
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
        """The checkpoint tensors of one expert, worked out once (the disk tier asks at every read)."""
        key = (layer, expert)
        if key not in self._names:
            self._names[key] = self._names_of(layer, expert)
        return self._names[key]

    def _names_of(self, layer: int, expert: int) -> list[str]:
        if self.spec.num_encoder_layers:
            return [f"{switch_ff_prefix(self.spec, layer)}mlp.experts.expert_{expert}.{w}.weight" for w in ("wi", "wo")]
        p = f"model.layers.{layer}.{moe_prefix(self.spec)}.experts."
        if self.spec.model_type == "gpt_oss":
            suffixes = ("_blocks", "_scales") if isinstance(self.format, Mxfp4) else ("",)
            return [f"{p}{proj}{suffix}" for proj in ("gate_up_proj", "down_proj") for suffix in suffixes] \
                + [p + "gate_up_proj_bias", p + "down_proj_bias"]
        if self._fused:
            return [p + "gate_up_proj", p + "down_proj"]
        return expert_tensor_names(self.spec, layer, expert)

    def _check_complete(self) -> None:
        needed = dense_tensor_names(self.spec) + [
            n for layer in self.spec.moe_layer_ids for e in range(self.spec.num_experts)
            for n in self._expert_names(layer, e)
        ]
        missing = [n for n in dict.fromkeys(needed) if n not in self._file_of and not self._is_packed(n)]
        if missing:
            raise MoespecError(
                f"checkpoint {self.dir} is missing {len(missing)} tensor(s), first: {missing[0]}"
            )
        for name in needed:
            if name not in self._file_of:  # packed: its parts are checked as they are read
                continue
            if self._is_fp8(name):
                self._check_fp8(name)

    def _is_packed(self, name: str) -> bool:
        """Weight `name` is stored pack-quantized (as `name`_packed, `name`_scale, ...)."""
        return self.pack_quantized is not None and name + PACKED in self._file_of

    def _is_fp8(self, name: str) -> bool:
        return self._slice(name).get_dtype() == "F8_E4M3"

    def _check_fp8(self, name: str) -> None:
        """An FP8 tensor needs the config's block size and its scales, tiling it in those blocks."""
        if self.fp8_block is None:
            raise MoespecError(f"{name} is float8_e4m3fn but config.json has no quantization_config "
                               "with quant_method 'fp8'")
        if self._fused:
            raise MoespecError(f"{name}: FP8 experts fused into [E, ...] tensors are not supported "
                               "(only one tensor per expert projection)")
        scale = name + SCALE_SUFFIX
        if scale not in self._file_of:
            raise MoespecError(f"FP8 weight {name} has no scales ({scale} is not in the checkpoint)")
        check_scale(name, self._shape(name), self._shape(scale), self.fp8_block)

    def _handle(self, path: Path):
        with self._handles_lock:  # the transfer side's reader threads open files too
            if path not in self._handles:
                self._handles[path] = safe_open(path, framework="pt")
            return self._handles[path]

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Read one tensor by its checkpoint name, converted to `dtype` (FP8, pack-quantized:
        dequantised), on the CPU."""
        if self._is_packed(name):
            return self.pack_quantized.dequantize(name, self.stored, dtype)
        t = self.stored(name)
        if t.dtype == FP8:
            return dequantize(t, self.stored(name + SCALE_SUFFIX), self.fp8_block, dtype)
        return t.to(dtype)

    def stored(self, name: str) -> torch.Tensor:
        """One tensor as the file stores it."""
        return self._handle(self._file_of[name]).get_tensor(self.spec.weights_prefix + name)

    def _slice(self, name: str):
        """Tensor `name` of the text model, memory-mapped, unread."""
        return self._handle(self._file_of[name]).get_slice(self.spec.weights_prefix + name)

    def expert(self, layer: int, expert: int, dtype: torch.dtype, direct: bool = False,
               out: torch.Tensor | None = None) -> Packed:
        """One routed expert's tensors in `self.format`, read alone (Dense: gate_up [2I, H], gate
        rows first, and down [H, I] in `dtype`), checked (shapes, finite values) when first read;
        `direct`: around the page cache (O_DIRECT), so repeated reads still come from the disk.
        `out`: a flat buffer of `dtype` a dense gated expert is assembled in (its tensors views of
        it, gate_up first); other experts come in memory of their own.

        An ungated expert (Switch: wo(relu(wi x))) comes back with gate_up = wi, so every store
        and cache works unchanged.
        """
        names = self._expert_names(layer, expert)
        packed = self._read_expert(names, expert, dtype, direct, out)
        if (layer, expert) in self._checked:  # the disk tier reads again: the file has not changed
            return packed
        check_expert(self.spec, names, expert, packed)
        self._checked.add((layer, expert))  # only once it passed: a bad expert fails every read
        return packed

    def _read_expert(self, names: list[str], expert: int, dtype: torch.dtype, direct: bool,
                     out: torch.Tensor | None) -> Packed:
        index = expert if self._fused and not self.spec.num_encoder_layers else None
        prefix = self.spec.weights_prefix
        # direct: the projections read at once, per file, flat with their shapes
        together: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
        if direct:
            files: dict[Path, list[str]] = {}
            for name in names:
                if name in self._file_of:
                    files.setdefault(self._file_of[name], []).append(name)
            for path, group in files.items():  # copied out below: read into the thread's scratch buffer if one file
                got = self.direct.flat(path, [prefix + name for name in group], index, scratch=len(files) == 1)
                together.update((name, got[prefix + name]) for name in group)

        def read(name: str, to: torch.dtype | None = dtype) -> torch.Tensor:
            """Tensor `name` (this expert's slice of it, if fused) in dtype `to` (None: as stored)."""
            if name in together:  # a view of the buffer shared with the other projections: copied
                flat, shape = together[name]  # out (converted on the way), so an expert holds only its own bytes
                t = flat.view(shape)
                return t.clone() if to is None else t.to(to, copy=True)
            if direct:
                t = self.direct.tensor(self._file_of[name], prefix + name, index)
            elif index is not None:
                t = self._slice(name)[index]
            else:
                t = self.stored(name)
            return t if to is None else t.to(to)

        if isinstance(self.format, Fp8Blocks):  # FP8 values and their scales, as stored
            return {proj + suffix: read(name + suffix, None).contiguous()
                    for proj, name in zip(PROJECTIONS, names) for suffix in ("", SCALE_SUFFIX)}

        if self.spec.model_type == "gpt_oss":
            return self._gpt_oss_expert(names, read)
        if self._is_packed(names[0]):
            return self._pack_quantized_expert(names, read)
        if not self.spec.gated_mlp:
            wi, wo = (read(n) for n in names)
            return {"gate_up": wi, "down": wo}
        if self._fused:
            gate_up, down = (read(n) for n in names)
            if fused_experts_transposed(self.spec):
                gate_up, down = gate_up.T, down.T
            return {"gate_up": gate_up.contiguous(), "down": down.contiguous()}
        if all(n in together for n in names):  # read at once: assembled by one call
            (gate, gate_shape), (up, up_shape), (down, down_shape) = (together[n] for n in names)
            check_expert_parts(self.spec, names, (gate_shape, up_shape, down_shape))
            return gated_expert(gate, up, down, gate_shape, down_shape, dtype, out)
        gate, up, down = (read(n, None) for n in names)  # as stored: converted by the one `cat`
        check_expert_parts(self.spec, names, (gate.shape, up.shape, down.shape))
        return gated_expert(gate.reshape(-1), up.reshape(-1), down.reshape(-1), tuple(gate.shape),
                            tuple(down.shape), dtype, out)

    def _pack_quantized_expert(self, names: list[str], read: Callable[..., torch.Tensor]) -> Packed:
        """An expert whose projections are pack-quantized, repacked into `self.format`'s parts
        (gate rows first, then up; an ungated expert's wi is gate_up)."""
        shapes, parts = zip(*(self.pack_quantized.parts(name, lambda n: read(n, None)) for name in names))
        if self.spec.gated_mlp:
            check_expert_parts(self.spec, names, shapes)
        *gate_up, down = parts
        return {**{f"gate_up.{p}": torch.cat([t[p] for t in gate_up]) for p in down},
                **{f"down.{p}": t for p, t in down.items()}}

    def _gpt_oss_expert(self, names: list[str], read: Callable[..., torch.Tensor]) -> Packed:
        """gpt-oss interleaves gate and up (gate is every even output unit) and stores unquantized
        projections transposed ([H, 2I], [I, H]); its MXFP4 blocks are [2I, H/32, 16] and
        [H, I/32, 16], one row per output unit. Reordered to moespec's gate units first; packed
        rows stay packed (a row's blocks and scale move together)."""
        *weights, gate_up_bias, down_bias = names
        n = 2 * self.spec.expert_intermediate_size
        gate_first = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
        biases = {"gate_up_bias": read(gate_up_bias)[gate_first], "down_bias": read(down_bias)}
        if isinstance(self.format, Mxfp4):  # gate_up blocks, scales, down blocks, scales
            gu_blocks, gu_scales, down_blocks, down_scales = (read(name, None) for name in weights)
            return {"gate_up_blocks": gu_blocks[gate_first], "gate_up_scales": gu_scales[gate_first],
                    "down_blocks": down_blocks.contiguous(), "down_scales": down_scales.contiguous(), **biases}
        gate_up, down = (read(name) for name in weights)
        return {"gate_up": gate_up.T[gate_first], "down": down.T.contiguous(), **biases}

    def dense_state(self, dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
        """All non-expert tensors on `device`, keyed by the model's parameter names. Routers that
        choose in float32 (DeepSeek's) keep their parameters in float32 whatever `dtype` is, as
        the reference does: a bf16 correction bias would change which experts are chosen."""
        def dtype_of(name: str) -> torch.dtype:
            router = f".{router_name(self.spec)}."
            return torch.float32 if self.spec.router_float32 and router in name and ".mlp." in name else dtype

        return {model_name(name): check_finite(name, self.tensor(name, dtype_of(name))).to(device)
                for name in dense_tensor_names(self.spec)}


def open_checkpoint(model_dir: str | Path) -> Checkpoint:
    """The checkpoint in `model_dir`, its spec parsed from config.json."""
    return Checkpoint(model_dir, load_spec(model_dir))
