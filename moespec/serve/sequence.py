"""One request's decoding state: its generated tokens, its released text, and whether it is done.

`Generator.generate` keeps the same per-row state in parallel lists because all its rows start
together; under continuous batching each request starts and finishes at its own step, so the
state travels with the request instead.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from ..decode.generate import TextStream
from ..decode.sampling import SamplingParams


class Sequence:
    """Tokens generated so far for one prompt, with EOS, stop-string and length stopping."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 eos_ids: set[int], budget: int):
        self.prompt, self.params, self.eos_ids, self.budget = prompt, params, eos_ids, budget
        self.token_ids: list[int] = []
        self.stream = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"

    def append(self, token: int) -> str:
        """Record a sampled token; return the text that became final (all of it once finished)."""
        self.token_ids.append(token)
        is_eos = token in self.eos_ids and not self.params.ignore_eos
        stopped = self.stream.update(self.token_ids[:-1] if is_eos else self.token_ids)
        if is_eos or stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.budget:
            self.finish_reason = "length"
        return self.stream.release(final=self.finish_reason is not None)
