"""PNG plots for benchmark results: step time vs cache size, the link sweep, and one decode step's timeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..experts.trace import COMPUTE_LANE, TRANSFER_LANE, Tracer  # noqa: E402


def plot_cache_sweep(sweep: dict[str, dict], batch: str, path: str | Path, title: str) -> None:
    """sweep: cache size label -> bench results. One line per policy."""
    sizes = list(sweep)
    policies = list(next(iter(sweep.values()))["batches"][batch]["policies"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for policy in policies:
        ax.plot(sizes, [sweep[s]["batches"][batch]["policies"][policy]["ms_per_step_median"] for s in sizes],
                marker="o", label=policy)
    ax.plot(sizes, [sweep[s]["batches"][batch]["link_bound_limit_ms"] for s in sizes], "k--", label="link-bound limit")
    ax.set_xlabel("expert cache (share of all expert bytes)")
    ax.set_ylabel("ms per decode step (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_link_sweep(sweep: dict[str, dict[str, dict]], path: str | Path, title: str) -> None:
    """sweep: link speed -> cache size -> bench results. One column per (cache, batch): speed-up
    over on-demand (top) and time over the link-bound limit (bottom) against the link speed."""
    speeds = list(sweep)
    gbps = [float(s.rstrip("GB/s")) if s.endswith("GB/s") else float("nan") for s in speeds]
    first = next(iter(sweep[speeds[0]].values()))
    panels = [(size, batch) for size in sweep[speeds[0]] for batch in first["batches"]]
    policies = list(first["batches"][panels[0][1]]["policies"])
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 5.5), squeeze=False, sharex=True)
    for col, (size, batch) in enumerate(panels):
        for policy in policies:
            rows = [sweep[s][size]["batches"][batch]["policies"][policy] for s in speeds]
            axes[0][col].plot(gbps, [r.get("speedup_vs_on_demand", float("nan")) for r in rows], marker="o",
                              label=policy)
            axes[1][col].plot(gbps, [r["times_link_bound_limit"] for r in rows], marker="o", label=policy)
        axes[0][col].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[1][col].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[0][col].set_title(f"cache {size}, batch {batch}", fontsize=9)
        axes[1][col].set_xscale("log")
        axes[1][col].set_xlabel("link GB/s")
    axes[0][0].set_ylabel("× on-demand speed")
    axes[1][0].set_ylabel("× link-bound limit")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_step_timeline(tracer: Tracer, path: str | Path, title: str) -> None:
    """The last complete decode step: layer slices on the compute lane, expert copies on the transfer lane."""
    compute = [e for e in tracer.events if e["tid"] == COMPUTE_LANE]
    n_layers = 1 + max(e["args"]["layer"] for e in compute)
    step = compute[-n_layers:]
    start, end = step[0]["ts"], step[-1]["ts"] + step[-1]["dur"]
    copies = [e for e in tracer.events if e["tid"] == TRANSFER_LANE and e["ts"] + e["dur"] > start and e["ts"] < end]
    fig, ax = plt.subplots(figsize=(9, 2.6))
    for lane, events, color in ((1, step, "tab:blue"), (0, copies, "tab:orange")):
        ax.broken_barh([((e["ts"] - start) / 1000, e["dur"] / 1000) for e in events], (lane - 0.4, 0.8),
                       facecolors=color, edgecolors="white")
    for e in step:
        ax.text((e["ts"] - start + e["dur"] / 2) / 1000, 1, e["name"].split()[-1], ha="center", va="center",
                fontsize=7, color="white")
    ax.set_yticks([0, 1], ["transfer", "compute"])
    ax.set_xlabel("ms since the step began")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
