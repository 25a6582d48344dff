"""Recording routing traces and calibration data by running text through the model's hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..api import LLM
from ..speculate.lookahead import DefaultVectorCollector, DefaultVectors
from ..speculate.traces import RouteRecorder, RoutingTrace
from .corpus import run


def record_trace(llm: LLM, ids: list[int], hidden: bool) -> RoutingTrace:
    """Routing of `ids` (and the LLM's speculation guesses, if it speculates)."""
    recorder = RouteRecorder(llm.model, hidden, llm.speculation)
    llm.model.hooks.insert(0, recorder)
    try:
        run(llm, ids)
    finally:
        llm.model.hooks.remove(recorder)
    return recorder.trace()


def calibrate(llm: LLM, ids: list[int]) -> DefaultVectors:
    collector = DefaultVectorCollector(llm.model, llm.store)
    llm.model.hooks.append(collector)
    try:
        run(llm, ids)
    finally:
        llm.model.hooks.remove(collector)
    return collector.result()


def usage_entropy(trace: RoutingTrace) -> list[float]:
    """Per MoE layer, the entropy (bits) of the expert-usage distribution; log2(E) is uniform."""
    usage = trace.usage()
    p = usage / usage.sum(axis=1, keepdims=True)
    return [float(-(row[row > 0] * np.log2(row[row > 0])).sum()) for row in p]


def save_heatmap(trace: RoutingTrace, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = trace.usage()
    fig, ax = plt.subplots(figsize=(max(6, trace.num_experts * 0.18 + 2), len(trace.moe_layers) * 0.45 + 1.5))
    im = ax.imshow(usage, aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(trace.moe_layers)), [str(i) for i in trace.moe_layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of tokens routed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
