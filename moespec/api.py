"""`LLM`: the one public entry point. Loads a checkpoint directory and runs generation / scoring."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from .checkpoint import Checkpoint
from .decode.generate import Completion, Generator, TextCallback
from .decode.sampling import SamplingParams
from .errors import MoespecError
from .experts.store import ExpertStore, ResidentExperts
from .model.transformer import Transformer
from .spec import ModelSpec, load_spec

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


def build_model(checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> Transformer:
    """The dense part of the model on `device`, without allocating random weights first."""
    with torch.device("meta"):
        model = Transformer(checkpoint.spec)
    model.load_state_dict(checkpoint.dense_state(dtype, device), strict=True, assign=True)
    return model.eval()


def load_tokenizer(model_dir: Path) -> Tokenizer | None:
    path = model_dir / "tokenizer.json"
    return Tokenizer.from_file(str(path)) if path.is_file() else None


class LLM:
    """An MoE model loaded for inference.

    expert_cache: share of all expert bytes that may live on the device ("100%" keeps them all).
    prefetch: "none" is on-demand loading.
    """

    def __init__(self, model: str | Path | None = None, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", expert_cache: str | int = "100%",
                 prefetch: str = "none", speculative_execution: bool = False,
                 context_length: int | None = None, progress: bool = False):
        self.path = Path(model) if model is not None else DEFAULT_MODEL
        if expert_cache not in ("100%", 1.0) or prefetch != "none" or speculative_execution:
            raise MoespecError("offloading options are not available yet: use expert_cache='100%', prefetch='none'")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.spec: ModelSpec = load_spec(self.path)
        checkpoint = Checkpoint(self.path, self.spec)
        self.model = build_model(checkpoint, self.dtype, self.device)
        show = (lambda keys: tqdm(list(keys), desc="loading experts", unit="expert", leave=False)) if progress else iter
        self.store = ExpertStore(checkpoint, self.dtype, pin=self.device.type == "cuda", progress=show)
        self.experts = ResidentExperts(self.store, self.device)
        self.tokenizer = load_tokenizer(self.path)
        max_ctx = self.spec.max_position_embeddings
        if context_length is not None and not 1 < context_length <= max_ctx:
            raise MoespecError(f"context_length must be in [2, {max_ctx}], got {context_length}")
        self.context_length = context_length or max_ctx
        self.generator = Generator(self.model, self.experts, self.tokenizer, self.context_length, self.device)

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise MoespecError(f"tokenizer.json not found in {self.path}: pass prompts as token ids")
        return self.tokenizer.encode(text).ids

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]], max_new_tokens: int = 32,
                 temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                 stop: str | Sequence[str] | None = None, ignore_eos: bool = False,
                 on_text: TextCallback | None = None) -> list[Completion]:
        """Complete each prompt (text, or a list of token ids). Greedy when temperature is 0."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise MoespecError("no prompts given")
        ids = [self.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
        stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos)
        return self.generator.generate(ids, params, on_text)

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

    def stats(self) -> dict[str, float]:
        """Counters since load: tokens, prefill/decode seconds."""
        return self.generator.stats.as_dict()
