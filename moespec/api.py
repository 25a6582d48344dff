"""`LLM`: the one public entry point. Loads a checkpoint directory and runs generation / scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .checkpoint import open_checkpoint
from .decode.generate import Completion, DecodeStats, Generator, TextCallback
from .decode.sampling import SamplingParams
from .decode.specdecode import SelfSpeculativeDecoder
from .errors import MoespecError
from .experts.cache import ExpertCache, budget_slots
from .experts.eviction import POLICIES
from .experts.stats import ExpertStats
from .experts.store import TIERS, ExpertStore, ResidentExperts
from .experts.trace import Tracer
from .experts.transfer import CpuTransfers, CudaTransfers, parse_bandwidth
from .model.load import build_model
from .spec import ModelSpec
from .speculate.estimators import ESTIMATOR_FILE, EstimatorPredictor, Estimators
from .speculate.lookahead import DEFAULT_VECTORS_FILE, DefaultVectors, LookaheadPredictor
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


PREFETCH = ("none", "lookahead", "estimator")
EXECUTION = {False: "verify", True: "speculative", "fallback": "fallback"}


class LLM:
    """An MoE model loaded for inference, its routed experts offloaded under a device budget.

    expert_cache: device budget for routed experts: a share of all expert bytes ("25%"), a size
        ("3GiB") or a slot count. A budget that holds every expert disables offloading.
    prefetch: "none" is the on-demand baseline (route, fetch missing experts, wait, compute);
        "lookahead" applies the routers of the next `lookahead_depth` MoE layers to the residual
        stream (plus default vectors if `default_vectors`, by default when the model directory has
        them); "estimator" uses learned estimators (`moespec fit-estimator`). Each prefetches the
        k + `prefetch_extra` best guesses per token.
    speculative_execution: False runs the true experts (exact); True runs the guessed ones;
        "fallback" runs true experts that are resident and substitutes guessed ones for the rest.
    eviction: "lru" | "lfu" | "pinned_hot". cache_scope: "global" (layers share slots) or "layer".
    link_bandwidth: on CPU, emulate a host-to-device link of this speed ("25GB/s").
    expert_tier: "ram" (all experts in host memory) or "disk" (read on demand, `host_cache` kept).
    trace: record a Chrome/Perfetto trace (compute and transfer lanes); write it with save_trace().
    """

    def __init__(self, model: str | Path | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", expert_cache: str | int = "100%",
                 prefetch: str = "none", speculative_execution: bool | str = False, lookahead_depth: int = 1,
                 prefetch_extra: int = 0, default_vectors: bool | None = None,
                 estimator: str | Path | None = None, eviction: str = "lru",
                 cache_scope: str = "global", link_bandwidth: str | None = None, expert_tier: str = "ram",
                 host_cache: int = 64, trace: bool = False, context_length: int | None = None,
                 progress: bool = False):
        _check_choice("eviction", eviction, POLICIES)
        _check_choice("cache_scope", cache_scope, ("global", "layer"))
        _check_choice("expert_tier", expert_tier, TIERS)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        if link_bandwidth is not None and self.device.type != "cpu":
            raise MoespecError("link_bandwidth emulation is for CPU runs; on a GPU the real link is used")
        try:
            self.link_bandwidth = parse_bandwidth(link_bandwidth) if link_bandwidth else None
        except ValueError as e:
            raise MoespecError(str(e)) from None
        if isinstance(model, (str, Path)) or model is None:
            self.path = Path(model) if model is not None else DEFAULT_MODEL
            checkpoint = open_checkpoint(self.path)
        else:  # an object with the Checkpoint interface, e.g. bench.synthetic.SyntheticCheckpoint
            checkpoint, self.path = model, Path(model.name)
        self.spec: ModelSpec = checkpoint.spec
        if self.spec.num_encoder_layers:
            raise MoespecError(f"{self.spec.model_type} is an encoder-decoder model: LLM runs decoder-only models; "
                               "run it under expert parallelism (moespec parallel-bench, moespec.parallel)")
        self.model = build_model(checkpoint, self.dtype, self.device)
        self.tracer: Tracer | None = None
        show = (lambda keys: tqdm(keys, desc="loading experts", unit="expert", leave=False)) if progress else iter
        self.store = ExpertStore(checkpoint, self.dtype, pin=self.device.type == "cuda", tier=expert_tier,
                                 host_cache=host_cache, progress=show)
        self.expert_stats = ExpertStats(self.spec.moe_layer_ids)
        total = len(self.store.keys)
        slots = budget_slots(expert_cache, total, self.store.expert_bytes)
        self.transfers = None
        if slots >= total:
            self.experts = ResidentExperts(self.store, self.device, self.expert_stats)
        else:
            self.transfers = CpuTransfers(self.link_bandwidth) if self.device.type == "cpu" \
                else CudaTransfers(self.device, slots)
            self.experts = ExpertCache(self.store, self.device, slots, eviction, cache_scope, self.transfers,
                                       self.expert_stats)
        if trace:
            self.start_trace()
        self.speculation: Speculation | None = None
        self.set_policy(prefetch, speculative_execution, lookahead_depth, prefetch_extra, default_vectors, estimator)
        self.tokenizer = load_tokenizer(self.path)
        max_ctx = self.spec.max_position_embeddings
        if context_length is not None and not 1 < context_length <= max_ctx:
            raise MoespecError(f"context_length must be in [2, {max_ctx}], got {context_length}")
        self.context_length = context_length or max_ctx
        self.generator = Generator(self.model, self.experts, self.tokenizer, self.context_length, self.device)
        self.spec_decoder: SelfSpeculativeDecoder | None = None  # made by the first generate(speculative="self")

    def set_policy(self, prefetch: str = "none", speculative_execution: bool | str = False, lookahead_depth: int = 1,
                   prefetch_extra: int = 0, default_vectors: bool | None = None,
                   estimator: str | Path | None = None) -> None:
        """Switch the speculation policy (the constructor's arguments of the same names) in place,
        keeping the loaded weights, so benchmarks compare policies on one model in one process."""
        _check_choice("prefetch", prefetch, PREFETCH)
        if speculative_execution not in EXECUTION:
            raise MoespecError(f"speculative_execution must be False, True or 'fallback', got {speculative_execution!r}")
        if speculative_execution and prefetch == "none":
            raise MoespecError("speculative_execution needs a speculating prefetch policy (lookahead or estimator)")
        if lookahead_depth < 1 or prefetch_extra < 0:
            raise MoespecError("lookahead_depth must be >= 1 and prefetch_extra >= 0")
        self._policy = (prefetch, speculative_execution, lookahead_depth, prefetch_extra, default_vectors, estimator)
        if self.speculation is not None:
            self.model.hooks.remove(self.speculation)
            self.speculation = None
        if prefetch != "none":
            predictor = self._predictor(prefetch, lookahead_depth, default_vectors, estimator)
            self.speculation = Speculation(self.model, self.experts, predictor, prefetch_extra,
                                           EXECUTION[speculative_execution])
            self.model.hooks.append(self.speculation)

    def reset(self) -> None:
        """Empty the expert cache and zero every counter: the next run starts cold."""
        if self.spec_decoder is not None:  # unpins its draft experts before the cache forgets its slots
            self.spec_decoder.reset()
        if isinstance(self.experts, ExpertCache):
            self.experts.clear()
        if self.transfers is not None:
            self.transfers.collect_stalls()
        self.expert_stats.reset()
        self.generator.stats = DecodeStats()
        self.set_policy(*self._policy)

    def _predictor(self, prefetch: str, depth: int, default_vectors: bool | None,
                   estimator: str | Path | None) -> LookaheadPredictor | EstimatorPredictor:
        if prefetch == "estimator":
            est = Estimators.load(estimator or self.path / ESTIMATOR_FILE, self.model)
            if depth > est.depth:
                raise MoespecError(f"lookahead_depth={depth} but the estimators were trained for depth {est.depth}")
            est.depth = depth
            return EstimatorPredictor(est)
        dv_path = self.path / DEFAULT_VECTORS_FILE
        if default_vectors and not dv_path.is_file():
            raise MoespecError(f"{dv_path} not found: compute default vectors with `moespec calibrate`")
        use_dv = dv_path.is_file() if default_vectors is None else default_vectors
        dv = DefaultVectors.load(dv_path, self.model, self.device) if use_dv else None
        return LookaheadPredictor(self.model, depth, dv)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MoespecError(f"tokenizer.json not found in {self.path}: pass prompts as token ids")
        return self.tokenizer.encode(text).ids

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 on_text: TextCallback | None = None, speculative: str | None = None, gamma: int | str = "auto",
                 draft_experts: int | None = None, draft_policy: str = "hot_temporal",
                 draft_affinity: str = "weights") -> list[Completion]:
        """Complete each prompt (text, or a list of token ids). Greedy when temperature is 0.

        speculative="self": self-assisted speculative decoding (same tokens when greedy, same
        distribution when sampling). Each step drafts `gamma` tokens per row ("auto": chosen from
        measured acceptance and step time, 0 = off) with each MoE layer limited to `draft_experts`
        experts (default: top_k, fewer if the cache is small) pinned in the expert cache;
        `draft_policy`: "hot_temporal", "static_hot" or "random". A routed expert outside the set runs
        as its nearest draft expert by `draft_affinity`: "weights" (L2) or "outputs" (on the prompts);
        "router" instead re-routes each token among the draft experts with the layer's router.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise MoespecError("no prompts given")
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos)
        if speculative is None:
            return self.generator.generate(ids, params, on_text)
        _check_choice("speculative", speculative, ("self",))
        self.spec_decoder = SelfSpeculativeDecoder.configure(self.spec_decoder, self.model, self.experts, self.store,
                                                             draft_experts, draft_policy, gamma, draft_affinity)
        with self.spec_decoder.attached():
            return self.generator.generate(ids, params, on_text, step=self.spec_decoder)

    @torch.inference_mode()
    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] (float32) for every position of token_ids [B, T]."""
        token_ids = torch.as_tensor(token_ids, dtype=torch.long)
        if token_ids.dim() != 2:
            raise MoespecError(f"score expects token ids of shape [batch, length], got {tuple(token_ids.shape)}")
        B, T = token_ids.shape
        if T > self.context_length:
            raise MoespecError(f"sequence of {T} tokens is longer than the context window ({self.context_length})")
        cache = self.generator.new_cache(B, T)
        hidden = self.model(token_ids.to(self.device), cache, self.experts)
        return self.model.logits(hidden)

    def link_note(self) -> str:
        """How host-to-device copies were timed; every report carries this line."""
        if self.device.type == "cuda":
            return f"GPU {torch.cuda.get_device_name(self.device)}: real host-to-device link"
        if self.link_bandwidth:
            return f"CPU with an emulated {self.link_bandwidth / 1e9:g} GB/s link"
        return "CPU, no link emulation (copies are host memcpy)"

    def stats(self) -> dict:
        """Counters since load: decode timings, expert hits/misses, bytes moved, stall seconds."""
        if self.transfers is not None:
            for layer, seconds in self.transfers.collect_stalls().items():
                self.expert_stats[layer].stall_seconds += seconds
        experts = self.expert_stats.as_dict()
        experts["bytes_wasted"] = experts["wasted_prefetches"] * self.store.expert_bytes
        resident = self.experts.capacity if isinstance(self.experts, ExpertCache) else len(self.store.keys)
        out = {**self.generator.stats.as_dict(), **experts, "cache_slots": resident,
               "expert_bytes": self.store.expert_bytes, "link": self.link_note()}
        if self.speculation is not None:
            out["speculation"] = self.speculation.summary()
        out["bytes_per_token"] = out["bytes_moved"] / max(out["generated_tokens"], 1)
        if self.spec_decoder is not None:
            out["speculative_decoding"] = self.spec_decoder.summary()
        return out

    def start_trace(self) -> Tracer:
        """Record from now on a Chrome/Perfetto trace: layer slices, and on CPU one slice per expert
        copy (on a GPU copies run asynchronously on the device, so the host sees no copy slices)."""
        if self.tracer is None:
            self.tracer = Tracer(note=self.link_note())
            self.model.hooks.append(self.tracer)
            if isinstance(self.transfers, CpuTransfers):
                self.transfers.tracer = self.tracer
        return self.tracer

    def save_trace(self, path: str | Path) -> None:
        """Write the Chrome/Perfetto trace recorded since load (needs trace=True)."""
        if self.tracer is None:
            raise MoespecError("no trace was recorded: create the LLM with trace=True")
        self.tracer.save(path)

    def close(self) -> None:
        """Stop the transfer worker (also done at interpreter exit)."""
        if self.transfers is not None:
            self.transfers.close()


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoespecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
