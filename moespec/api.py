"""`LLM`: the one public entry point. Loads a checkpoint directory and runs generation / scoring."""

from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .checkpoint import open_checkpoint
from .config import EngineConfig, SpecDecodeConfig, SpeculationConfig
from .decode.engine import Engine, StepKind
from .decode.generate import Completion, TextCallback, generate
from .decode.sampling import SamplingParams
from .decode.selfspec import SelfSpeculativeDecoder
from .decode.stats import DecodeStats, EngineStats
from .errors import MoespecError
from .experts.base import DeviceExperts
from .experts.cache import ExpertCache, budget_slots
from .experts.quant import make_quantizer, quantized_source
from .experts.stats import ExpertStats
from .experts.store import ExpertStore, ResidentExperts
from .experts.trace import Tracer
from .model.compiled import compile_layers
from .model.load import build_model
from .spec import ModelSpec
from .speculate import make_speculation, with_depth
from .speculate.policy import Speculation

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "tiny-mixtral"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MoespecError(f"invalid device {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MoespecError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise MoespecError(f"device type {dev.type!r} is not supported (cpu or cuda)")
    return dev


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise MoespecError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    path = model_dir / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


def token_ids(prompt: Any) -> list[int]:
    """A prompt given as token ids, each an integer (no 1.5, "4" or True)."""
    try:
        ids = list(prompt)
    except TypeError:
        raise MoespecError(f"a prompt must be text or a list of token ids, got {type(prompt).__name__}") from None
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not hasattr(t, "__index__"):
            raise MoespecError(f"prompt token {i} must be an integer id, got {t!r}")
    return [operator.index(t) for t in ids]


class LLM:
    """An MoE model loaded for inference, its routed experts offloaded under a device budget.

    Built from an `EngineConfig` (`config=`), or from its options given as keywords (each the field
    of the part that owns it, see moespec/config.py); keywords given with `config` replace its
    values. The main ones:

    expert_cache: device budget for routed experts: a share of all expert bytes ("25%"), a size
        ("3GiB") or a slot count. A budget that holds every expert disables offloading.
    prefetch: "none" is the on-demand baseline (route, fetch missing experts, wait, compute);
        "lookahead" applies the routers of the next `lookahead_depth` MoE layers to the residual
        stream (plus default vectors if `default_vectors`, by default when the model directory has
        them); "estimator" uses learned estimators (`moespec fit-estimator`). Each prefetches the
        k + `prefetch_extra` best guesses per token.
    speculative_execution: "off" runs the true experts (exact); "on" runs the guessed ones;
        "fallback" runs true experts that are resident and substitutes guessed ones for the rest.
    eviction: "lfru" (default) | "lru" | "lfu" | "pinned_hot" | "predicted".
    cache_scope: "global" (layers share slots) or "layer".
    link_bandwidth: on CPU, emulate a host-to-device link of this speed ("25GB/s").
    expert_tier: "ram" (all experts in host memory) or "disk" (read on demand, `host_cache` kept).
    speculative, gamma, draft_*: the default self-speculative decoding of `generate`.
    compile: run decode steps' dense work (attention, norms, routers, shared experts) as compiled
        libraries (moespec/model/compiled.py), the experts eager; with every expert resident on a
        CPU, one-row steps run each whole layer, experts included, as one compiled call.
    trace: record a Chrome/Perfetto trace (compute and transfer lanes); write it with save_trace().
    """

    def __init__(self, model: str | Path | None = None, *, config: EngineConfig | None = None, **options: Any):
        self.config = cfg = EngineConfig.build(config, **options)
        self.device, self.dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
        if isinstance(model, (str, Path)) or model is None:
            self.path = Path(model) if model is not None else DEFAULT_MODEL
            checkpoint = open_checkpoint(self.path)
        else:  # an object with the Checkpoint interface, e.g. bench.synthetic.SyntheticCheckpoint
            checkpoint, self.path = model, Path(model.name)
        self.spec: ModelSpec = checkpoint.spec
        if self.spec.num_encoder_layers:
            raise MoespecError(f"{self.spec.model_type} is an encoder-decoder model: LLM runs decoder-only models; "
                               "run it under expert parallelism (moespec parallel-bench, moespec.parallel)")
        max_ctx = self.spec.max_position_embeddings
        if cfg.context_length is not None and cfg.context_length > max_ctx:
            raise MoespecError(f"context_length must be in [2, {max_ctx}], got {cfg.context_length}")
        self.context_length = cfg.context_length or max_ctx
        self.model = build_model(checkpoint, self.dtype, self.device)
        self.tracer = Tracer(note=self.link_note())
        off = cfg.offload
        show = (lambda keys: tqdm(keys, desc="loading experts", unit="expert", leave=False)) if cfg.progress else iter
        if off.direct_io and not hasattr(checkpoint, "direct"):
            raise MoespecError(f"direct_io=True needs a checkpoint on disk; {self.path} has no files")
        experts = checkpoint if off.expert_dtype == "auto" else quantized_source(
            checkpoint, make_quantizer(off.expert_dtype, off.expert_group_size, self.spec), self.dtype,
            (lambda keys: tqdm(keys, desc=f"quantizing experts ({off.expert_dtype})", unit="expert", leave=False))
            if cfg.progress else iter)
        self.store = ExpertStore(experts, self.dtype, pin=self.device.type == "cuda", tier=off.expert_tier,
                                 host_cache=off.host_cache, progress=show, direct_io=off.direct_io,
                                 transposed=self.device.type == "cpu" and self.dtype == torch.float32)
        self.expert_stats = ExpertStats(self.spec.moe_layer_ids)
        total = len(self.store.keys)
        slots = budget_slots(off.expert_cache, total, self.store.expert_bytes, self.store.dense_bytes)
        self.experts: DeviceExperts = ResidentExperts(self.store, self.device, self.expert_stats) if slots >= total \
            else ExpertCache(self.store, self.device, slots, off.eviction, off.cache_scope, self.expert_stats,
                             off.link_bytes_per_s, self.tracer)
        if cfg.compile:
            self.model.compiled = compile_layers(self.model, progress=cfg.progress, experts=self.experts)
        if cfg.trace:
            self.start_trace()
        self.speculation: Speculation | None = None
        self.set_policy(cfg.speculation)
        self.tokenizer = load_tokenizer(self.path)
        self.engine = Engine(self.model, self.experts, self.tokenizer, self.context_length, self.device)
        self.spec_decoder: SelfSpeculativeDecoder | None = None  # made by the first self-speculative run

    @property
    def link_bandwidth(self) -> float | None:
        """Bytes/s of the emulated CPU link (None: no emulation, or a real link)."""
        return self.config.offload.link_bytes_per_s

    def set_policy(self, speculation: SpeculationConfig | None = None, **options: Any) -> None:
        """Switch the speculation policy in place to `speculation` (default: on-demand loading)
        with `options` (its fields by name) replaced, keeping the loaded weights, so benchmarks
        compare policies on one model in one process."""
        unknown = set(options) - {f.name for f in fields(SpeculationConfig)}
        if unknown:
            raise MoespecError(f"set_policy takes speculation options only, got {sorted(unknown)[0]!r}")
        chosen = replace(speculation or SpeculationConfig(), **options)
        self.config = replace(self.config, speculation=with_depth(chosen, self.path))
        if self.speculation is not None:
            self.model.hooks.remove(self.speculation)
        self.speculation = make_speculation(self.model, self.experts, self.path, self.config.speculation)
        if self.speculation is not None:
            self.model.hooks.append(self.speculation)

    def reset(self) -> None:
        """Empty the expert cache and zero every counter: the next run starts cold."""
        if self.spec_decoder is not None:  # unpins its draft experts before the cache forgets its slots
            self.spec_decoder.reset()
        self.experts.clear()
        self.experts.flush_stats()
        self.expert_stats.reset()
        self.engine.stats = DecodeStats()
        self.set_policy(self.config.speculation)

    def encode(self, text: str | bytes, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text prompt (bytes must be UTF-8), refusing what no tokenizer can encode."""
        if self.tokenizer is None:
            raise MoespecError(f"tokenizer.json not found in {self.path}: pass prompts as token ids")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise MoespecError(f"prompt bytes are not valid UTF-8 (bad byte at offset {e.start})") from None
        if not isinstance(text, str):
            raise MoespecError(f"a prompt must be text or a list of token ids, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise MoespecError(f"prompt is not valid Unicode: unpaired surrogate {text[e.start]!r} at "
                               f"character {e.start}") from None
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    @contextmanager
    def step_kind(self, **options: Any) -> Iterator[StepKind]:
        """The decode step of the engine loop for the configured self-speculative decoding with
        `options` (SpecDecodeConfig fields) replaced: plain, or the self-speculative decoder with
        its routing hooks attached while the context lasts (one generate call, or a server)."""
        unknown = set(options) - {f.name for f in fields(SpecDecodeConfig)}
        if unknown:
            raise MoespecError(f"unknown generate option {sorted(unknown)[0]!r}")
        cfg = replace(self.config.specdecode, **options)
        if cfg.speculative == "off":
            yield self.engine.plain
            return
        self.spec_decoder = SelfSpeculativeDecoder.configure(self.spec_decoder, self.model, self.experts,
                                                             self.store, cfg)
        with self.spec_decoder.attached() as decoder:
            yield decoder

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 on_text: TextCallback | None = None, **options: Any) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids). Greedy when temperature is 0.

        options: self-speculative decoding for this call (default: the LLM's config).
        speculative="self": self-assisted speculative decoding (same tokens when greedy, same
        distribution when sampling). Each step drafts `gamma` tokens per row ("auto": chosen from
        measured acceptance and step time, 0 = off) with each MoE layer limited to `draft_experts`
        experts (default: top_k, fewer if the cache is small) pinned in the expert cache;
        `draft_policy`: "hot_temporal", "static_hot" or "random". A routed expert outside the set runs
        as its nearest draft expert by `draft_affinity`: "weights" (L2) or "outputs" (on the prompts);
        "router" instead re-routes each token among the draft experts with the layer's router.
        """
        if isinstance(prompts, (str, bytes)):
            prompts = [prompts]
        if not prompts:
            raise MoespecError("no prompts given")
        ids = [self.encode(p) if isinstance(p, (str, bytes)) else token_ids(p) for p in prompts]
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos)
        with self.step_kind(**options) as kind:
            return generate(self.engine, ids, params, on_text, kind)

    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (float32) for every position of token_ids [B, T]."""
        try:
            token_ids = torch.as_tensor(token_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise MoespecError(f"score expects integer token ids of shape [batch, length]: {e}") from None
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise MoespecError(f"score expects integer token ids, got dtype {str(token_ids.dtype).removeprefix('torch.')}")
        if token_ids.dim() != 2 or token_ids.numel() == 0:
            raise MoespecError(f"score expects token ids of shape [batch, length] with at least one token, "
                               f"got {tuple(token_ids.shape)}")
        if token_ids.shape[1] > self.context_length:
            raise MoespecError(f"sequence of {token_ids.shape[1]} tokens is longer than the context window "
                               f"({self.context_length})")
        vocab = self.spec.vocab_size
        if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab:
            raise MoespecError(f"token ids must be in [0, {vocab}), got {int(token_ids.min())}..{int(token_ids.max())}")
        return self.engine.score(token_ids.long())

    def link_note(self) -> str:
        """How host-to-device copies were timed; every report carries this line."""
        if self.device.type == "cuda":
            return f"GPU {torch.cuda.get_device_name(self.device)}: real host-to-device link"
        off = self.config.offload
        tier = "" if off.expert_tier == "ram" else \
            f"; disk tier{', direct I/O' if off.direct_io else ' (page cache)'}, host cache {off.host_cache} experts"
        if self.link_bandwidth:
            return f"CPU with an emulated {self.link_bandwidth / 1e9:g} GB/s link{tier}"
        return f"CPU, no link emulation (copies take no time){tier}"

    def stats(self) -> EngineStats:
        """Counters since load or `reset`: decode timings, expert hits/misses, bytes moved, stall
        seconds, guess quality, speculative decoding (`.as_dict()` for JSON)."""
        self.experts.flush_stats()
        return EngineStats(
            decode=replace(self.engine.stats), experts=self.expert_stats.total(),
            per_layer={layer: replace(s) for layer, s in self.expert_stats.layers.items()},
            cache_slots=self.experts.capacity, expert_bytes=self.store.expert_bytes, link=self.link_note(),
            speculation=self.speculation.stats() if self.speculation is not None else None,
            speculative_decoding=self.spec_decoder.summary() if self.spec_decoder is not None else None,
            disk=self._disk_stats())

    def _disk_stats(self) -> dict | None:
        """The disk tier's reads since load and the throughput they measured."""
        store = self.store
        if store.tier != "disk":
            return None
        moved = store.disk_reads * store.expert_bytes
        return {"reads": store.disk_reads, "seconds": store.disk_seconds, "direct_io": store.direct_io,
                "direct_bytes": store.direct_bytes, "host_cached": store.host_cached,
                "gb_per_s": moved / store.disk_seconds / 1e9 if store.disk_seconds else None}

    def start_trace(self) -> Tracer:
        """Record from now on a Chrome/Perfetto trace: layer slices, and on CPU one slice per expert
        copy (on a GPU copies run asynchronously on the device, so the host sees no copy slices)."""
        if not self.tracer.recording:
            self.tracer.start()
            self.model.hooks.append(self.tracer)
        return self.tracer

    def save_trace(self, path: str | Path) -> None:
        """Write the Chrome/Perfetto trace recorded since load (needs trace=True)."""
        if not self.tracer.recording:
            raise MoespecError("no trace was recorded: create the LLM with trace=True")
        self.tracer.save(path)

    def close(self) -> None:
        """Stop the transfer worker (also done at interpreter exit)."""
        self.experts.close()
