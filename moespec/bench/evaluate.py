"""`moespec eval`: held-out perplexity and next-token agreement with the exact model."""

from __future__ import annotations

import torch

from .. import data
from ..api import LLM
from .corpus import heldout_ids


def evaluate(llm: LLM, exact: LLM | None = None, n_chunks: int = data.EVAL_N_CHUNKS,
             incremental: bool = False) -> dict:
    """Perplexity by the model cards' protocol; with `exact`, also top-1 agreement and Δ perplexity.

    `exact` is the same model without offloading or speculation; agreement is the share of
    positions whose argmax token equals the exact model's. `incremental` scores position by
    position like decoding does (slower; what matters for speculative execution's fallback mode,
    whose substitutions depend on which experts are on the device at each step).
    """
    ids = heldout_ids(llm)
    agree = positions = 0
    exact_logits: list[torch.Tensor] = []

    def score(batch: torch.Tensor) -> torch.Tensor:
        nonlocal agree, positions
        logits = llm.engine.teacher_forced(batch) if incremental else llm.score(batch)
        if exact is not None:
            ref = exact.score(batch)
            exact_logits.append(ref)
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            positions += logits.shape[0] * logits.shape[1]
        return logits

    result = {"model": str(llm.path), "perplexity": data.heldout_perplexity(score, ids, n_chunks=n_chunks),
              "chunks": n_chunks, "chunk_length": data.EVAL_CHUNK_LENGTH, "incremental": incremental,
              "link": llm.link_note(), "expert_dtype": llm.config.offload.expert_dtype,
              "expert_bytes": llm.store.expert_bytes}
    if exact is not None:
        replay = iter(exact_logits)
        exact_ppl = data.heldout_perplexity(lambda _batch: next(replay), ids, n_chunks=n_chunks)
        result.update(exact_perplexity=exact_ppl, delta_perplexity=result["perplexity"] - exact_ppl,
                      relative_perplexity_rise=result["perplexity"] / exact_ppl - 1,
                      top1_agreement=agree / positions, exact_expert_bytes=exact.store.expert_bytes)
    if llm.speculation is not None:
        result["speculation"] = llm.speculation.stats().as_dict()["total"]
    return result
