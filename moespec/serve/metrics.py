"""Server metrics in the Prometheus text exposition format.

A handful of counters and two histograms do not justify a client library. The scheduler thread
records engine events and the HTTP side records rejections, so every update takes one lock.
"""

from __future__ import annotations

import threading
from collections import Counter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# keys of LLM.stats().as_dict() exported as counters ("a.b": key b of the dict at key a): (key, metric name, help)
ENGINE_COUNTERS = (
    ("hits", "moespec_expert_cache_hits_total", "Expert lookups served from the device expert cache."),
    ("misses", "moespec_expert_cache_misses_total", "Expert lookups that had to load the expert."),
    ("bytes_moved", "moespec_expert_bytes_moved_total", "Expert weight bytes copied to the device."),
    ("stall_seconds", "moespec_expert_stall_seconds_total", "Seconds compute waited for expert transfers."),
    ("prefetches", "moespec_expert_prefetches_total", "Guessed experts copied ahead of their layer."),
    ("speculative_decoding.drafted", "moespec_spec_decode_draft_tokens_total",
     "Draft tokens proposed by self-speculative decoding."),
    ("speculative_decoding.accepted", "moespec_spec_decode_accepted_tokens_total", "Draft tokens accepted."),
)


def _lookup(stats: dict, key: str) -> float:
    for part in key.split("."):
        stats = stats.get(part, {}) if isinstance(stats, dict) else {}
    return stats if isinstance(stats, (int, float)) else 0


class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics: each bucket counts values <= its bound)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += times
        self.sum += value * times
        self.count += times

    def samples(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum}", f"{name}_count {self.count}"]
        return lines


def _family(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


class Metrics:
    """Counters since the server started; `render` gives the /metrics page."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: Counter[str] = Counter()  # finished requests by finish reason, "cancelled", "failed"
        self._rejected: Counter[int] = Counter()  # requests refused before running, by HTTP status
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._tpot = Histogram(TPOT_BUCKETS)
        self._ttft = Histogram(TTFT_BUCKETS)
        self._engine: dict[str, float] = {}

    def request_done(self, outcome: str) -> None:
        with self._lock:
            self._outcomes[outcome] += 1

    def request_rejected(self, status: int) -> None:
        with self._lock:
            self._rejected[status] += 1

    def prefilled(self, prompt_tokens: int, first_token_seconds: float) -> None:
        """A prompt was processed and its first token sampled `first_token_seconds` after arrival."""
        with self._lock:
            self._prompt_tokens += prompt_tokens
            self._generation_tokens += 1
            self._ttft.observe(first_token_seconds)

    def decoded(self, tokens: int, step_seconds: float) -> None:
        """A decode step of `step_seconds` gave one token to each of `tokens` requests."""
        with self._lock:
            self._generation_tokens += tokens
            self._tpot.observe(step_seconds, tokens)

    def engine_stats(self, stats: dict[str, float]) -> None:
        """Latest `LLM.stats()`, taken on the scheduler thread that owns the model."""
        with self._lock:
            self._engine = dict(stats)

    def render(self, queue_length: int, running: int) -> str:
        with self._lock:
            out = _family("moespec_requests_total", "counter", "Requests that ran, by outcome.",
                          [f'moespec_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self._outcomes.items())])
            out += _family("moespec_rejected_requests_total", "counter", "Requests refused before running, by HTTP status.",
                           [f'moespec_rejected_requests_total{{status="{k}"}} {v}' for k, v in sorted(self._rejected.items())])
            out += _family("moespec_prompt_tokens_total", "counter", "Prompt tokens processed.",
                           [f"moespec_prompt_tokens_total {self._prompt_tokens}"])
            out += _family("moespec_generation_tokens_total", "counter", "Tokens generated.",
                           [f"moespec_generation_tokens_total {self._generation_tokens}"])
            out += _family("moespec_time_per_output_token_seconds", "histogram",
                           "Decode step time, once per token it produced.",
                           self._tpot.samples("moespec_time_per_output_token_seconds"))
            out += _family("moespec_time_to_first_token_seconds", "histogram",
                           "Time from a request's arrival to its first token.",
                           self._ttft.samples("moespec_time_to_first_token_seconds"))
            out += _family("moespec_queue_length", "gauge", "Requests waiting for a batch slot.",
                           [f"moespec_queue_length {queue_length}"])
            out += _family("moespec_running_requests", "gauge", "Requests in the decode batch.",
                           [f"moespec_running_requests {running}"])
            for key, name, help_text in ENGINE_COUNTERS:
                out += _family(name, "counter", help_text, [f"{name} {_lookup(self._engine, key)}"])
        return "\n".join(out) + "\n"
