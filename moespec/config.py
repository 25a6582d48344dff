"""Engine options as frozen, validated objects: built once, handed to every stage.

    EngineConfig
    ├── device, dtype, context_length, trace, progress
    ├── offload:     OffloadConfig      where experts live and how they move (budget, eviction, tier, link)
    ├── speculation: SpeculationConfig  guessing the next layers' experts (prefetch, speculative execution)
    └── specdecode:  SpecDecodeConfig   self-speculative decoding (draft experts, γ)

Every choice is a `Literal`, and one vocabulary serves the API, the CLI flags (`--expert-cache`
for `expert_cache`), the server and results JSON. Each kind of choice that names classes has one
registry (`registry` below) in the module that owns those classes, checked against its `Literal`
when that module is imported, so adding a policy means adding it in both places or failing at
import. Errors name the field and the value in one line (`MoespecError`).

`LLM(path, expert_cache="25%")` is shorthand for `LLM(path, config=EngineConfig.build(
expert_cache="25%"))`: each keyword is the field of whichever part owns it.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, TypeVar, get_args

from .errors import MoespecError

DType = Literal["float32", "bfloat16", "float16"]
Eviction = Literal["lru", "lfu", "lfru", "pinned_hot", "predicted"]
CacheScope = Literal["global", "layer"]
ExpertTier = Literal["ram", "disk"]
Quantized = Literal["int8", "int4"]  # formats experts can be quantized to at load (experts/quant.py)
ExpertDType = Literal["auto", "int8", "int4"]  # auto: the checkpoint's own format
Prefetch = Literal["none", "lookahead", "estimator", "auto"]
Execution = Literal["off", "on", "fallback"]
DefaultVectors = Literal["auto", "on", "off"]
Speculative = Literal["off", "self"]
DraftPolicy = Literal["hot_temporal", "static_hot", "random"]
DraftAffinity = Literal["weights", "outputs", "router"]

V = TypeVar("V")


def registry(kind: Any, entries: dict[str, V]) -> dict[str, V]:
    """A name -> class (or factory) table whose names are exactly the `Literal` `kind`'s."""
    names = set(get_args(kind))
    if set(entries) != names:
        raise TypeError(f"registry {sorted(entries)} does not match its Literal {sorted(names)}")
    return entries


def _choice(name: str, value: object, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise MoespecError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _integer(name: str, value: object, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoespecError(f"{name} must be an integer >= {minimum}, got {value!r}")


SIZE_UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
RATE_UNITS = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def parse_budget(value: str | int) -> tuple[Literal["share", "bytes", "slots"], float]:
    """'25%' -> ('share', 0.25); '3GiB' -> ('bytes', 3·2^30); 12 -> ('slots', 12)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return "slots", value
    elif m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%\s*", str(value)):
        if 0 < float(m.group(1)) <= 100:
            return "share", float(m.group(1)) / 100
    elif m := re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]i?B|B)\s*", str(value), re.IGNORECASE):
        if float(m.group(1)) > 0:
            return "bytes", float(m.group(1)) * SIZE_UNITS[m.group(2).upper()]
    raise MoespecError("expert_cache must be a share in (0%, 100%] ('25%'), a size ('3GiB') or a slot count "
                       f">= 1, got {value!r}")


def parse_bandwidth(text: str) -> float:
    """'25GB/s' -> 25e9 bytes per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)B/s\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise MoespecError(f"link_bandwidth must be a positive rate like '25GB/s', got {text!r}")
    return float(m.group(1)) * RATE_UNITS[m.group(2)]


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)  # normalising an alias inside a frozen dataclass


@dataclass(frozen=True)
class OffloadConfig:
    """Where routed experts live and how they reach the device."""

    expert_cache: str | int = field(default="100%", metadata={
        "help": "device budget for routed experts: a share ('25%%'), a size ('3GiB') or a slot count"})
    eviction: Eviction = field(default="lfru", metadata={"help": "which resident expert a miss evicts"})
    cache_scope: CacheScope = field(default="global", metadata={
        "help": "global: all layers share the slots; layer: each layer gets an equal part"})
    expert_tier: ExpertTier = field(default="ram", metadata={
        "help": "ram: every expert in host memory; disk: read from the checkpoint when first needed"})
    host_cache: int = field(default=64, metadata={
        "help": "disk tier: experts kept in host memory (0: none beyond the device cache)"})
    direct_io: bool = field(default=False, metadata={
        "help": "disk tier: read experts around the page cache (O_DIRECT), so the disk is measured, not RAM"})
    link_bandwidth: str | None = field(default=None, metadata={
        "help": "CPU only: emulate a host-to-device link of this speed, e.g. 25GB/s"})
    expert_dtype: ExpertDType = field(default="auto", metadata={
        "help": "routed experts as the checkpoint has them (auto), or quantized at load to int8 / int4 "
                "(kept packed in host memory, on the link and in the device cache)"})
    expert_group_size: int = field(default=0, metadata={
        "help": "int8/int4: weights per quantization group along the input dimension (0: 128 for int8, 64 for int4)"})

    def __post_init__(self) -> None:
        parse_budget(self.expert_cache)
        _choice("expert_dtype", self.expert_dtype, ExpertDType)
        _integer("expert_group_size", self.expert_group_size, 0)
        if self.expert_group_size and self.expert_group_size % 2:
            raise MoespecError(f"expert_group_size must be even (int4 packs two weights a byte), got {self.expert_group_size}")
        if self.direct_io and self.expert_dtype != "auto":
            raise MoespecError(f"direct_io=True reads the checkpoint's own files; with expert_dtype="
                               f"{self.expert_dtype!r} experts come from the quantized cache instead")
        _choice("eviction", self.eviction, Eviction)
        _choice("cache_scope", self.cache_scope, CacheScope)
        _choice("expert_tier", self.expert_tier, ExpertTier)
        _integer("host_cache", self.host_cache, 0)
        if not isinstance(self.direct_io, bool):
            raise MoespecError(f"direct_io must be True or False, got {self.direct_io!r}")
        if self.direct_io and self.expert_tier != "disk":
            raise MoespecError(f"direct_io=True reads the disk tier around the page cache; it needs "
                               f"expert_tier='disk', got expert_tier={self.expert_tier!r}")
        if self.link_bandwidth is not None:
            parse_bandwidth(self.link_bandwidth)

    @property
    def link_bytes_per_s(self) -> float | None:
        return parse_bandwidth(self.link_bandwidth) if self.link_bandwidth is not None else None


@dataclass(frozen=True)
class SpeculationConfig:
    """Guessing the experts of the next MoE layers while the current one computes.

    speculative_execution also accepts True / False for "on" / "off"; default_vectors accepts
    True / False / None for "on" / "off" / "auto". lookahead_depth and next_token left unset
    (None) are chosen per policy when it is set up (speculate/__init__.py, `with_depth`)."""

    prefetch: Prefetch = field(default="none", metadata={
        "help": "none: on-demand loading; lookahead: later layers' routers; estimator: learned estimators; "
                "auto: the estimators if the model has them, else lookahead, on only while measured to pay"})
    speculative_execution: Execution = field(default="off", metadata={
        "help": "off: run the true experts (exact); on: run the guessed ones; "
                "fallback: guessed ones only where a true one is missing (changes outputs)"})
    lookahead_depth: int | None = field(default=None, metadata={
        "help": "MoE layers ahead to guess for (unset: 1; 2 for auto with a next-token head, see next_token)"})
    prefetch_extra: int = field(default=0, metadata={"help": "guesses beyond top-k to prefetch per token"})
    prefetch_threshold: float = field(default=0.0, metadata={
        "help": "prefetch only guesses whose expected use (in [0, 1]) reaches this"})
    default_vectors: DefaultVectors = field(default="auto", metadata={
        "help": "lookahead: add default-vector estimates (auto: if the model directory has them)"})
    estimator: str | None = field(default=None, metadata={
        "help": "estimator file (default: MODEL/estimators.safetensors)"})
    next_token: bool | None = field(default=None, metadata={
        "help": "in decode steps the last MoE layer also guesses the next token's first one "
                "(with the estimators' next-token head where they have one, else the logit lens; "
                "unset: off, but on for auto where its estimators have that head)"})

    def __post_init__(self) -> None:
        aliases = {True: "on", False: "off"}
        if isinstance(self.speculative_execution, bool):
            _set(self, "speculative_execution", aliases[self.speculative_execution])
        if self.default_vectors is None or isinstance(self.default_vectors, bool):
            _set(self, "default_vectors", {None: "auto", **aliases}[self.default_vectors])
        if self.estimator is not None:
            _set(self, "estimator", str(self.estimator))
        _choice("prefetch", self.prefetch, Prefetch)
        _choice("speculative_execution", self.speculative_execution, Execution)
        _choice("default_vectors", self.default_vectors, DefaultVectors)
        _integer("lookahead_depth", self.lookahead_depth, 1, allow_none=True)
        _integer("prefetch_extra", self.prefetch_extra, 0)
        if isinstance(self.prefetch_threshold, bool) or not isinstance(self.prefetch_threshold, (int, float)) \
                or not 0 <= self.prefetch_threshold <= 1:
            raise MoespecError(f"prefetch_threshold must be a number in [0, 1], got {self.prefetch_threshold!r}")
        if self.next_token is not None and not isinstance(self.next_token, bool):
            raise MoespecError(f"next_token must be True or False, got {self.next_token!r}")
        if self.speculative_execution != "off" and self.prefetch == "none":
            raise MoespecError(f"speculative_execution={self.speculative_execution!r} needs a speculating "
                               "prefetch policy (lookahead or estimator), got prefetch='none'")


@dataclass(frozen=True)
class SpecDecodeConfig:
    """Self-assisted speculative decoding: draft with device-resident experts, verify in one pass.
    `speculative` also accepts None for "off"."""

    speculative: Speculative = field(default="off", metadata={
        "help": "self: self-assisted speculative decoding with draft experts (same greedy tokens)"})
    gamma: int | Literal["auto"] = field(default="auto", metadata={
        "help": "drafts per step: an integer, or auto (chosen from measured acceptance and step time)"})
    draft_experts: int | None = field(default=None, metadata={
        "help": "draft experts per MoE layer (default: top-k, fewer if the cache is small)"})
    draft_policy: DraftPolicy = field(default="hot_temporal", metadata={"help": "how the draft set is chosen"})
    draft_affinity: DraftAffinity = field(default="weights", metadata={
        "help": "weights or outputs: a routed expert outside the set runs as its nearest draft expert; "
                "router: re-route among the draft experts"})

    def __post_init__(self) -> None:
        if self.speculative is None:
            _set(self, "speculative", "off")
        _choice("speculative", self.speculative, Speculative)
        if self.gamma != "auto":
            _integer("gamma", self.gamma, 0)
        _integer("draft_experts", self.draft_experts, 1, allow_none=True)
        _choice("draft_policy", self.draft_policy, DraftPolicy)
        _choice("draft_affinity", self.draft_affinity, DraftAffinity)


PARTS = {"offload": OffloadConfig, "speculation": SpeculationConfig, "specdecode": SpecDecodeConfig}


@dataclass(frozen=True)
class EngineConfig:
    """Everything `LLM` is built from."""

    device: str = field(default="cpu", metadata={"help": "cpu, cuda or cuda:N"})
    dtype: DType = field(default="float32", metadata={"help": "compute dtype of weights and activations"})
    context_length: int | None = field(default=None, metadata={
        "help": "tokens per sequence (default: the model's max_position_embeddings); bounds KV memory"})
    compile: bool = field(default=False, metadata={
        "help": "compile decode steps' attention, norms and routers ahead of time (AOTInductor, a C++ "
                "compiler; ~10 s per kind of layer once per machine, cached)"})
    trace: bool = False  # record a Chrome/Perfetto trace from load on
    progress: bool = False  # show a progress bar while experts load
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    specdecode: SpecDecodeConfig = field(default_factory=SpecDecodeConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str):
            _set(self, "device", str(self.device))
        if str(self.dtype).startswith("torch."):  # a torch.dtype: its name
            _set(self, "dtype", str(self.dtype).removeprefix("torch."))
        _choice("dtype", self.dtype, DType)
        _integer("context_length", self.context_length, 2, allow_none=True)
        if not isinstance(self.compile, bool):
            raise MoespecError(f"compile must be True or False, got {self.compile!r}")
        for name, cls in PARTS.items():
            if not isinstance(getattr(self, name), cls):
                raise MoespecError(f"{name} must be a {cls.__name__}, got {getattr(self, name)!r}")
        if self.offload.link_bandwidth is not None and not self.device.startswith("cpu"):
            raise MoespecError(f"link_bandwidth={self.offload.link_bandwidth!r} is emulation for CPU runs; "
                               f"on device {self.device!r} the real link is used")

    @classmethod
    def build(cls, base: EngineConfig | None = None, **options: Any) -> EngineConfig:
        """`base` (default: all defaults) with `options` replaced, each by its flat field name."""
        return (base or cls()).replace(**options)

    def replace(self, **options: Any) -> EngineConfig:
        """A copy with some options changed, named by their flat field names (`expert_cache=...`)."""
        own = {f.name for f in fields(self)} - set(PARTS)
        parts: dict[str, dict[str, Any]] = {name: {} for name in PARTS}
        top = {}
        for key, value in options.items():
            part = next((name for name, c in PARTS.items() if key in {f.name for f in fields(c)}), None)
            if part is not None:
                parts[part][key] = value
            elif key in own:
                top[key] = value
            else:
                raise MoespecError(f"unknown engine option {key!r}")
        changed = {name: replace(getattr(self, name), **kw) for name, kw in parts.items() if kw}
        return replace(self, **top, **changed)

    def as_dict(self) -> dict[str, Any]:
        """Flat {option: value}, with the names and values the API and CLI take (for results JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in PARTS}
        for name in PARTS:
            out.update(asdict(getattr(self, name)))
        return out


def option_fields() -> list[tuple[str, Any]]:
    """(part name or None, field) for every option a user sets: what the CLI makes flags of."""
    top = [(None, f) for f in fields(EngineConfig) if f.name not in PARTS and "help" in f.metadata]
    return top + [(name, f) for name, c in PARTS.items() for f in fields(c)]
