"""One sequence being generated: its tokens, its text as it becomes final, and when it stops."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer

from .sampling import SamplingParams, TokenLogprob, token_logprobs


class TextStream:
    """Incremental detokenisation of one row, with stop strings.

    Text is released only when it can no longer change: not ending inside a multi-byte character
    and not possibly the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer | None, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.released = 0

    def update(self, token_ids: list[int]) -> bool:
        """Re-decode the row; return True when a stop string has appeared (text is cut before it)."""
        if self.tokenizer is None:
            return False
        self.text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return True
        return False

    def release(self, final: bool) -> str:
        """The not-yet-released text that is now final."""
        end = len(self.text) if final else len(self.text) - self.holdback
        if not final and self.text.endswith("\ufffd"):
            end = min(end, len(self.text) - 1)
        if end <= self.released:
            return ""
        out, self.released = self.text[self.released:end], end
        return out


class Sequence:
    """Tokens generated so far for one prompt, with EOS, stop-string and length stopping.

    `budget`: most new tokens (max_new_tokens, cut to what the context window leaves). `rng`:
    the sequence's random generator when its parameters carry a seed. `row`: its KV-cache row
    while it is in a batch (-1 outside one).
    """

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer | None,
                 eos_ids: set[int], budget: int, rng: torch.Generator | None = None):
        self.prompt, self.params, self.eos_ids, self.budget, self.rng = prompt, params, eos_ids, budget, rng
        self.token_ids: list[int] = []
        self.stream = TextStream(tokenizer, params.stop)
        self.finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"
        self.row = -1
        self.logprobs: list[TokenLogprob] = []  # one per sampled token, if params.logprobs is set
        self.prompt_logprobs: list[TokenLogprob] = []  # prompt tokens 1.., if params.prompt_logprobs is set

    @property
    def remaining(self) -> int:
        return self.budget - len(self.token_ids)

    def record_logprob(self, record: TokenLogprob) -> None:
        """The log-probability of the token about to be appended (called as it is sampled)."""
        self.logprobs.append(record)

    def record_prompt_logprobs(self, logits: torch.Tensor) -> None:
        """Prompt tokens 1.. under the prefill's logits [len(prompt) - 1, V] (replacing any earlier
        attempt: a failed prefill is retried)."""
        top = self.params.prompt_logprobs or 0
        self.prompt_logprobs = token_logprobs(logits, torch.tensor(self.prompt[1:]), top)

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
