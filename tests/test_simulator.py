"""The cost-model simulator on hand-made traces whose timelines can be worked out on paper."""

import numpy as np
import pytest

from moespec import MoespecError
from moespec.bench.simulator import HARDWARE, CostModel, project, roofline, simulate
from moespec.bench.synthetic import preset_spec
from moespec.speculate.traces import RoutingTrace

# dense part 1 s per layer, an expert call 1 s, a copy 2 s: every number below is worked out by hand
COST = CostModel(dense_layer_s=1, head_s=0, expert_fixed_s=1, expert_per_token_s=0, copy_s=2, expert_bytes=10)


def trace(guess_layer1: int) -> RoutingTrace:
    """8 tokens; layer 0 always routes to expert 0, layer 1 to expert 1 (top-1 of 4)."""
    ids = np.stack([np.zeros(8), np.ones(8)], axis=1).astype(np.int16)[:, :, None]
    guesses = np.stack([np.full(8, -1), np.full(8, guess_layer1)], axis=1).astype(np.int16)[:, :, None]
    return RoutingTrace(ids, np.ones_like(ids, dtype=np.float32), [0, 1], 4, None, guesses)


def test_on_demand_timeline():
    # step 1: dense 0-1, copy E0 1-3, run 3-4; dense 4-5, copy E1 5-7, run 7-8; steps 2, 3: 4 s each
    r = simulate(trace(1), COST, num_layers=2, capacity=2, policy="none", batch=1, steps=3, top_k=1)
    assert r["seconds_per_step"] == pytest.approx(16 / 3)
    assert r["bytes_per_step"] == pytest.approx(20 / 3)
    assert r["hit_rate"] == pytest.approx(4 / 6)
    assert r["stall_share"] == pytest.approx(4 / 16)


def test_lookahead_prefetch_shares_the_link():
    # step 1: layer 0 routes at t=1, its miss E0 goes on the link first (1-3), the guess E1 of layer 1
    # behind it (3-5); E0 runs 3-4, layer 1's dense part 4-5, E1 has landed: 5-6. Steps 2, 3: 4 s each.
    r = simulate(trace(1), COST, num_layers=2, capacity=2, policy="lookahead", batch=1, steps=3, top_k=1)
    assert r["seconds_per_step"] == pytest.approx(14 / 3)
    assert r["hit_rate"] == pytest.approx(5 / 6)
    assert r["stall_share"] == pytest.approx(2 / 14)


def test_wrong_guesses_cost_bytes_and_speculation_runs_them():
    wrong = simulate(trace(2), COST, num_layers=2, capacity=2, policy="lookahead", batch=1, steps=3, top_k=1)
    assert wrong["bytes_per_step"] > 20 / 3  # the wrong expert was copied too
    spec = simulate(trace(2), COST, num_layers=2, capacity=2, policy="speculative", batch=1, steps=3, top_k=1)
    assert spec["hit_rate"] == pytest.approx(5 / 6)  # runs the guessed E2, prefetched in time
    assert spec["bytes_per_step"] == pytest.approx(20 / 3)


def test_roofline_matches_the_anchor_numbers():
    cost = roofline(preset_spec("mixtral-8x7b"), HARDWARE["h100-pcie5"])
    assert cost.expert_bytes == 352_321_536
    assert cost.copy_s == pytest.approx(352_321_536 / 50e9 + 10e-6)  # ~7 ms at 50 GB/s
    assert 6.9e-3 < cost.copy_s < 7.2e-3


def test_projection_checks_the_shape_and_reports_ratios():
    spec = preset_spec("mixtral-8x7b", layers=2)
    with pytest.raises(MoespecError, match="trace has 4 experts top-1"):
        project(trace(1), roofline(spec, HARDWARE["a6000-pcie4"]), spec, [0.5], ["none"], [1], 3)
    ids = np.random.default_rng(0).integers(0, 8, size=(64, 2, 2)).astype(np.int16)
    t = RoutingTrace(ids, np.ones(ids.shape, np.float32), [0, 1], 8, None, ids.copy())
    out = project(t, roofline(spec, HARDWARE["a6000-pcie4"]), spec, [0.5], ["none", "lookahead"], [1, 4], 8)
    rows = out["results"]["50% batch 1"]
    assert rows["none"]["speedup_vs_on_demand"] == 1.0
    # perfect guesses turn misses into hits without moving more bytes; Mixtral on PCIe 4 is
    # link-bound (a 352 MB expert takes 14 ms to copy, a layer computes in well under 1 ms), so
    # starting copies one layer early barely changes the time
    assert rows["lookahead"]["hit_rate"] > rows["none"]["hit_rate"]
    assert rows["lookahead"]["bytes_per_step"] == rows["none"]["bytes_per_step"]
    assert rows["lookahead"]["speedup_vs_on_demand"] == pytest.approx(1.0, abs=0.02)


def test_the_eviction_policy_chooses_the_victim():
    """Top-1 of one layer, two slots: expert 0 four times, then 1, 2, 0, 1, 2, 0, 1, 2. LRU evicts
    0 whenever 1 and 2 were used since (3 hits: the first repeats of 0); LFRU keeps 0, whose four
    uses outweigh one, and evicts the other (5 hits)."""
    ids = np.array([0, 0, 0, 0, 1, 2, 0, 1, 2, 0, 1, 2], dtype=np.int16)[:, None, None]
    t = RoutingTrace(ids, np.ones(ids.shape, np.float32), [0], 4, None, None)
    lru, lfru = (simulate(t, COST, num_layers=1, capacity=2, policy="none", batch=1, steps=12, top_k=1, eviction=e)
                 for e in ("lru", "lfru"))
    assert lru["hit_rate"] == pytest.approx(3 / 12) and lfru["hit_rate"] == pytest.approx(5 / 12)
