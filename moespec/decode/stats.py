"""What `LLM.stats()` returns: typed counters, with `as_dict()` giving the flat JSON the
benchmarks write (keys unchanged since the first results were committed)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..experts.stats import LayerStats


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0  # every row's tokens, the one sampled after the prefill included
    decoded_tokens: int = 0  # of those, the ones decode steps made (what decode_seconds bought)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # a step gives each running row one token, or several when speculative

    @property
    def decode_seconds_per_token(self) -> float:
        return self.decode_seconds / max(self.decoded_tokens, 1)

    @property
    def decode_seconds_per_step(self) -> float:
        return self.decode_seconds / max(self.decode_steps, 1)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "decode_seconds_per_token": self.decode_seconds_per_token,
                "decode_seconds_per_step": self.decode_seconds_per_step}


@dataclass
class EngineStats:
    """Counters since load (or the last `LLM.reset`)."""

    decode: DecodeStats
    experts: LayerStats  # all MoE layers together
    per_layer: dict[int, LayerStats]
    cache_slots: int  # experts the device holds at once
    expert_bytes: int  # bytes of one expert as it crosses the link
    link: str  # how copies were timed: a real link, or an emulated one
    speculation: Any = None  # SpeculationStats while a prefetch policy runs
    speculative_decoding: Any = None  # SpecDecodeStats once self-speculative decoding ran
    disk: dict | None = None  # the disk tier: reads, seconds, bytes read with direct I/O, host-cached experts, GB/s

    @property
    def hit_rate(self) -> float:
        uses = self.experts.hits + self.experts.misses
        return self.experts.hits / uses if uses else 0.0

    @property
    def bytes_wasted(self) -> int:
        return self.experts.wasted_prefetches * self.expert_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.experts.bytes_moved / max(self.decode.generated_tokens, 1)

    def as_dict(self) -> dict[str, Any]:
        out = {**self.decode.as_dict(), **asdict(self.experts), "hit_rate": self.hit_rate,
               "prefetch_landed_share": self.experts.prefetch_landed_share,
               "per_layer": {layer: asdict(s) for layer, s in self.per_layer.items()},
               "bytes_wasted": self.bytes_wasted, "cache_slots": self.cache_slots,
               "expert_bytes": self.expert_bytes, "link": self.link, "bytes_per_token": self.bytes_per_token}
        if self.speculation is not None:
            out["speculation"] = self.speculation.as_dict()
        if self.speculative_decoding is not None:
            out["speculative_decoding"] = self.speculative_decoding.as_dict()
        if self.disk is not None:
            out["disk"] = self.disk
        return out
