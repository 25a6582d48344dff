"""Token streams the measuring commands run on, all derived from `moespec.data`.

The held-out text is split in two disjoint regions: the evaluation chunks (the model cards'
protocol: the first EVAL_N_CHUNKS x EVAL_CHUNK_LENGTH tokens) and, after them, calibration text
(default vectors). Estimators train on the training split, never on held-out text.
"""

from __future__ import annotations

from typing import Callable

import torch

from .. import data
from ..api import LLM
from ..errors import MoespecError

EVAL_TOKENS = data.EVAL_CHUNK_LENGTH * data.EVAL_N_CHUNKS


def _tokenizer(llm: LLM):
    if llm.tokenizer is None:
        raise MoespecError(f"tokenizer.json not found in {llm.path}: evaluation needs the model's tokenizer")
    return llm.tokenizer


def heldout_ids(llm: LLM) -> list[int]:
    return _tokenizer(llm).encode(data.heldout_text(), add_special_tokens=False).ids


def bench_prompts(llm: LLM, prompt_tokens: int) -> Callable[[int], list[list[int]]]:
    """For a batch size B, B prompts of `prompt_tokens` tokens: from held-out text, far apart (real
    models), or seeded random ids (synthetic models, no tokenizer)."""
    ids = heldout_ids(llm) if llm.tokenizer is not None else None

    def prompts(batch: int) -> list[list[int]]:
        if ids is not None:
            step = len(ids) // batch
            return [ids[i * step:i * step + prompt_tokens] for i in range(batch)]
        gen = torch.Generator().manual_seed(batch)
        return torch.randint(0, llm.spec.vocab_size, (batch, prompt_tokens), generator=gen).tolist()

    return prompts


def calibration_ids(llm: LLM, tokens: int) -> list[int]:
    """Held-out tokens after the evaluation region."""
    ids = heldout_ids(llm)[EVAL_TOKENS:]
    if len(ids) < tokens:
        raise MoespecError(f"only {len(ids)} held-out tokens after the evaluation chunks; asked for {tokens}")
    return ids[:tokens]


def training_ids(llm: LLM, tokens: int) -> list[int]:
    """The first `tokens` tokens of the training split, documents joined by the separator."""
    tok = _tokenizer(llm)
    out: list[int] = []
    for text in data.train_texts():
        out += tok.encode(text + data.DOC_SEPARATOR, add_special_tokens=False).ids
        if len(out) >= tokens:
            return out[:tokens]
    raise MoespecError(f"the training split has only {len(out)} tokens; asked for {tokens}")


def chunks(ids: list[int], length: int) -> list[torch.Tensor]:
    """Non-overlapping [1, length] chunks (the last partial one dropped)."""
    return [torch.tensor([ids[i:i + length]]) for i in range(0, len(ids) - length + 1, length)]


def run(llm: LLM, ids: list[int], length: int = data.EVAL_CHUNK_LENGTH, batch: int = 8) -> None:
    """Score `ids` as independent chunks (for hooks that watch the forward pass)."""
    parts = chunks(ids, length)
    for i in range(0, len(parts), batch):
        llm.score(torch.cat(parts[i:i + batch]))
