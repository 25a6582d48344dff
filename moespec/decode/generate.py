"""Batch generation on the engine: admit every prompt at once, step until every row has finished."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .engine import Engine, StepKind
from .sampling import SamplingParams

# on_text(row, new_text): called as text of a row becomes final (streaming)
TextCallback = Callable[[int, str], None]


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length"


@torch.inference_mode()
def generate(engine: Engine, prompts: list[list[int]], params: SamplingParams, on_text: TextCallback | None = None,
             kind: StepKind | None = None) -> list[Completion]:
    """Complete every prompt as one batch with one set of sampling parameters (one random
    generator for the batch when seeded), with `kind`'s steps (default: plain decoding)."""
    seqs = [engine.sequence(p, params) for p in prompts]
    if len(seqs) > 1 and seqs[0].rng is not None:
        for s in seqs[1:]:
            s.rng = seqs[0].rng  # the batch draws from one generator, as one `sample` call would
    batch = engine.batch(len(seqs), max(len(s.prompt) + s.budget for s in seqs), kind)
    index = {id(s): i for i, s in enumerate(seqs)}
    events = batch.admit(seqs)
    while True:
        if on_text is not None:
            for seq, text in events:
                if text:
                    on_text(index[id(seq)], text)
        if not batch.running:
            break
        events = batch.step()
    return [Completion(s.token_ids, s.stream.text, s.prompt, s.finish_reason) for s in seqs]
