"""Benchmarks' machinery: policy switching in place, cold resets, synthetic models, the bench table."""

from dataclasses import replace

import pytest
import torch

from moespec import LLM, MoespecError
from moespec.bench.runner import (POLICIES, BenchConfig, Row, bench, format_table, generate_marked, one_run,
                                  paired_speedup)
from moespec.bench.synthetic import SyntheticCheckpoint, preset_spec, write_checkpoint
from moespec.cli import main
from moespec.config import SpeculationConfig
from moespec.speculate import make_speculation
from moespec.spec import load_spec
from tiny import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    save_model("mixtral", d, experts=8, top_k=2, num_hidden_layers=3)
    return d


def test_set_policy_and_reset_match_fresh_engines(model_dir):
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    fresh = LLM(model_dir, expert_cache="25%", prefetch="lookahead")
    fresh.generate(prompts, max_new_tokens=8, ignore_eos=True)
    switched = LLM(model_dir, expert_cache="25%")
    switched.generate(prompts, max_new_tokens=8, ignore_eos=True)  # warm, then switch and start cold
    switched.set_policy(prefetch="lookahead")
    switched.reset()
    cold = switched.stats().as_dict()
    assert not switched.experts.resident()
    assert all(cold[key] == 0 for key in ("hits", "misses", "prefetches", "bytes_moved", "generated_tokens"))
    switched.generate(prompts, max_new_tokens=8, ignore_eos=True)
    a, b = fresh.stats().as_dict(), switched.stats().as_dict()
    # which guesses land before their layer runs depends on the copy thread's timing, so hits and
    # misses may split differently; the experts used and the guesses made may not
    assert a["hits"] + a["misses"] == b["hits"] + b["misses"]
    assert a["generated_tokens"] == b["generated_tokens"]
    assert a["speculation"]["total"] == b["speculation"]["total"]


def test_bench_reports_every_policy_against_on_demand(model_dir):
    llm = LLM(model_dir, expert_cache="25%", link_bandwidth="1GB/s")
    cfg = BenchConfig(policies=["none", "lookahead"], batch_sizes=[1, 2], new_tokens=6, repeats=2, warmup=0)
    result = bench(llm, lambda b: [[5 + i, 6, 7, 8] for i in range(b)], cfg)
    for batch in ("1", "2"):
        b = result["batches"][batch]
        assert b["link_bound_limit_ms"] >= b["compute_ms_per_step"] > 0
        rows = b["policies"]
        assert rows["none"]["speedup_vs_on_demand"] == 1.0 and rows["none"]["speedup_range"] == [1.0, 1.0]
        for row in rows.values():
            assert row["ms_per_step_min"] <= row["ms_per_step_median"] <= row["ms_per_step_max"]
            assert row["bytes_per_token"] > 0 and 0 <= row["hit_rate"] <= 1 and 0 <= row["decode_hit_rate"] <= 1
            assert 0 <= row["decode_stall_share"] < 1
        assert "prefetch_landed_share" not in rows["none"]  # no guess, so no right guess: nothing to median
        assert 0 <= rows["lookahead"].get("prefetch_landed_share", 0) <= 1
    lines = format_table(result)
    assert len(lines) == 2 * 3 and all(line.startswith("[CPU with an emulated 1 GB/s link]") for line in lines)


def test_speed_up_pairs_the_runs_of_each_round():
    """The machine slowed down in the second round: both runs of it took twice as long. Paired by
    round the policy is faster in two rounds of three; the ratio of the two medians would say
    slower (10 against 11 ms)."""
    on_demand = [{"seconds_per_step": s} for s in (0.010, 0.020, 0.010)]
    policy = [{"seconds_per_step": s} for s in (0.009, 0.019, 0.011)]
    out = paired_speedup(on_demand, policy)
    assert out["speedup_vs_on_demand"] == pytest.approx(20 / 19)
    assert out["speedup_range"] == pytest.approx([10 / 11, 10 / 9])


def test_decode_counters_leave_out_the_runs_own_prefill(model_dir):
    """A prefill guesses too (for statistics: it starts no copies) and copies nearly every expert
    it can hold; a run's decode figures leave out what its own prefill did, counted where its
    decode steps began (the same as a prefill-only run's, where the counts are deterministic)."""
    llm = LLM(model_dir, expert_cache="25%")
    prompts = [list(range(5, 53))]  # a long prefill: most of the run's guessing
    llm.set_policy(**POLICIES["lookahead"])
    llm.reset()
    _, at = generate_marked(llm, prompts, 4)
    whole = llm.stats()
    llm.reset()
    llm.generate(prompts, max_new_tokens=1, ignore_eos=True)
    prefill = llm.stats()
    assert at.experts.bytes_moved == prefill.experts.bytes_moved > 0
    assert (at.experts.hits, at.experts.misses) == (prefill.experts.hits, prefill.experts.misses)
    assert 0 < at.guess_seconds < whole.speculation.seconds
    assert whole.experts.bytes_moved > at.experts.bytes_moved  # the decode steps copied too

    row = one_run(llm, "lookahead", prompts, 4)
    s = llm.stats()
    steps = s.decode.decode_steps
    assert steps == 3
    assert row["bytes_per_step"] == pytest.approx((s.experts.bytes_moved - prefill.experts.bytes_moved) / steps)
    assert 0 < row["guess_ms_per_step"] < 1000 * s.speculation.seconds / steps


def test_bench_runs_expert_dtype_variants_interleaved(model_dir):
    llm = LLM(model_dir, expert_cache=4, link_bandwidth="1GB/s")
    int4 = LLM(model_dir, expert_cache=4, link_bandwidth="1GB/s", expert_dtype="int4")
    cfg = BenchConfig(policies=["none", "lookahead"], batch_sizes=[1], new_tokens=6, repeats=1, warmup=0)
    result = bench(llm, lambda b: [[5 + i, 6, 7, 8] for i in range(b)], cfg, {"int4": int4})
    rows = result["batches"]["1"]["policies"]
    assert set(rows) == {"none", "lookahead", "int4/none", "int4/lookahead"}
    assert rows["int4/none"]["bytes_per_token"] < 0.2 * rows["none"]["bytes_per_token"]  # int4 of float32 experts
    assert result["variants"]["int4"]["expert_bytes"] == int4.store.expert_bytes
    assert all("speedup_vs_on_demand" in row for row in rows.values())


def test_bench_interleaves_rows_with_their_own_hooks(model_dir):
    """Extra rows (benchmarks/oracle_bound.py's perfect guesses) run on demand with their hooks
    attached around each of their runs only, every other round in reverse order, and report the
    hooks' guessing time as a policy's."""
    llm = LLM(model_dir, expert_cache="25%", link_bandwidth="1GB/s")
    made = []

    def lookahead(name):
        made.append(name)
        assert llm.model.hooks == []  # nothing left attached by another row
        return make_speculation(llm.model, llm.experts, model_dir, SpeculationConfig(prefetch="lookahead"))

    extra = {name: Row(llm, "none", lambda name=name: lookahead(name)) for name in ("a", "b")}
    cfg = BenchConfig(policies=["none"], batch_sizes=[1], new_tokens=6, repeats=2, warmup=0)
    rows = bench(llm, lambda b: [[5, 6, 7, 8]], cfg, extra_rows=lambda prompts: extra)["batches"]["1"]["policies"]
    assert made == ["a", "b", "b", "a"]  # a round forwards, then one backwards
    assert set(rows) == {"none", "a", "b"} and llm.model.hooks == []
    assert "guess_ms_per_step" not in rows["none"] and rows["a"]["guess_ms_per_step"] > 0
    assert rows["a"]["speedup_vs_on_demand"] > 0


def test_synthetic_model_at_preset_shapes():
    spec = preset_spec("mixtral-8x7b", layers=2)
    assert (spec.hidden_size, spec.num_experts, spec.num_layers) == (4096, 8, 2)
    assert spec.expert_params * 2 == 352_321_536  # one Mixtral expert in bf16: 352 MB
    small = replace(spec, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, expert_intermediate_size=48,
                    vocab_size=300)
    a = LLM(SyntheticCheckpoint(small, "s"), expert_cache="50%")
    b = LLM(SyntheticCheckpoint(small, "s"))
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(a.score(ids), b.score(ids), atol=1e-6)
    with pytest.raises(MoespecError, match="unknown synthetic model"):
        preset_spec("gpt-5")


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "olmoe-1b-7b"])
def test_synthetic_checkpoint_written_to_disk_is_the_same_model(preset, tmp_path):
    """A preset shrunk to a few KB, written as a Hugging Face directory: the spec read back from
    its config.json is the preset's, its logits are the in-memory synthetic model's, and the disk
    tier with direct I/O reads the same experts from the file; a second write reuses it."""
    small = replace(preset_spec(preset, layers=2), hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                    expert_intermediate_size=48, dense_intermediate_size=96, vocab_size=300)
    synthetic = SyntheticCheckpoint(small, "s")
    path = write_checkpoint(synthetic, tmp_path / preset, torch.float32)
    spec = load_spec(path)
    for field in ("model_type", "hidden_size", "num_layers", "num_experts", "top_k", "expert_intermediate_size",
                  "router", "moe_layers", "qk_norm", "num_kv_heads", "head_dim", "rope"):
        assert getattr(spec, field) == getattr(small, field), field
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = LLM(synthetic).score(ids)
    assert torch.equal(LLM(path).score(ids), expected)
    disk = LLM(path, expert_cache="25%", expert_tier="disk", direct_io=True, host_cache=0)
    assert torch.allclose(disk.score(ids), expected, atol=1e-6) and disk.store.checkpoint.direct.bytes_read > 0
    stamp = (path / "config.json").stat().st_mtime_ns
    assert write_checkpoint(synthetic, path, torch.float32) == path and (path / "config.json").stat().st_mtime_ns == stamp


def test_cli_bench_writes_json_and_plots(model_dir, tmp_path, capsys):
    out, plot, timeline = tmp_path / "b.json", tmp_path / "sweep.png", tmp_path / "tl.png"
    assert main(["bench", "--model", str(model_dir), "--policies", "none,lookahead", "--batch-sizes", "1",
                 "--new-tokens", "4", "--repeats", "1", "--cache-sizes", "25%,50%", "--link-bandwidth", "1GB/s",
                 "--plot", str(plot), "--timeline", str(timeline), "--out", str(out)]) == 0
    import json

    sweep = json.loads(out.read_text())
    assert set(sweep) == {"25%", "50%"} and plot.stat().st_size > 0 and timeline.stat().st_size > 0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[cache")]
    assert printed and all("emulated 1 GB/s" in line for line in printed)
    assert main(["bench", "--model", str(model_dir), "--policies", "none,magic"]) == 2


def test_cli_link_sweep_writes_one_result_per_speed_and_a_plot(model_dir, tmp_path, capsys):
    from moespec.cli import _link_speeds

    assert _link_speeds("0.25,1,4,16GB/s") == ["0.25GB/s", "1GB/s", "4GB/s", "16GB/s"]
    out, plot = tmp_path / "s.json", tmp_path / "s.png"
    assert main(["bench", "--model", str(model_dir), "--policies", "none,lookahead", "--batch-sizes", "1",
                 "--new-tokens", "3", "--repeats", "1", "--cache-sizes", "25%", "--link-sweep", "0.5,8GB/s",
                 "--plot", str(plot), "--out", str(out)]) == 0
    import json

    sweep = json.loads(out.read_text())["link_sweep"]
    assert set(sweep) == {"0.5GB/s", "8GB/s"} and plot.stat().st_size > 0
    result = sweep["0.5GB/s"]["25%"]
    assert result["link_bandwidth_bytes_per_s"] == 0.5e9 and result["torch_threads"] >= 1
    assert "ms_per_output_token_median" in result["batches"]["1"]["policies"]["lookahead"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "GB/s" in line]
    assert [line.split(" | ")[0] for line in table] == ["| 0.5GB/s", "| 8GB/s"]  # one row per point
    assert all(line.split(" | ")[5] == "lookahead" for line in table)  # the best prefetching policy


def test_summary_takes_medians_over_the_runs_that_have_a_value():
    """prefetch="auto" may guess in one run and not in the next: a statistic missing from some
    runs is the median of the others, and one missing from all is left out."""
    from moespec.bench.runner import _summary

    runs = [{"seconds_per_step": s, "seconds_per_output_token": s, "recall_at_k": r, "guess_ms_per_step": None}
            for s, r in ((0.01, None), (0.02, 0.8), (0.03, 0.6))]
    out = _summary(runs)
    assert out["recall_at_k"] == 0.7 and "guess_ms_per_step" not in out and out["ms_per_step_median"] == 20.0
