"""Expert parallelism: the planner against brute force, the dispatch tables, load prediction, and a
2-process gloo run whose outputs (with and without replication) equal single-process outputs."""

import itertools
import random

import pytest
import torch

from moespec import LLM
from moespec.hooks import ForwardHooks
from moespec.parallel import Job, launch, run_jobs, skewed_batches
from moespec.parallel.dispatch import Placement, water_fill
from moespec.parallel.engine import default_slots
from moespec.parallel.planner import Plan, default_plan, plan, replicate
from moespec.parallel.predict import LoadForecast, RouterLookahead, RoutingMemory, forecast_error
from tiny import save_model


def small_cases(n: int, seed: int = 0):
    """Random (load, workers, slots) with few enough replicas to enumerate every packing."""
    rng = random.Random(seed)
    while n:
        workers, experts = rng.choice([2, 3]), rng.randint(2, 6)
        slots = rng.randint(-(-experts // workers), experts)
        if workers * slots > 9:
            continue
        n -= 1
        yield [rng.choice([rng.randint(0, 5), rng.randint(0, 100)]) for _ in range(experts)], workers, slots


def test_replicate_minimises_the_largest_load_per_replica():
    """Exactly the claim: no replica counts (>= 1, <= cap, same total) give a smaller max load[e] / r[e]."""
    for load, workers, slots in small_cases(60):
        total = min(workers * slots, len(load) * workers)
        got = replicate(load, total, cap=workers)
        assert sum(got) == total and all(1 <= r <= workers for r in got)
        best = min(max(l / r for l, r in zip(load, rs))
                   for rs in itertools.product(range(1, workers + 1), repeat=len(load)) if sum(rs) == total)
        assert max(l / r for l, r in zip(load, got)) == pytest.approx(best)


def best_packing(weights: list[tuple[float, int]], workers: int, slots: int) -> float:
    """Brute force: the smallest possible max worker load (each worker <= slots, no expert twice)."""
    best = float("inf")
    for assign in itertools.product(range(workers), repeat=len(weights)):
        held = [[e for (_, e), a in zip(weights, assign) if a == w] for w in range(workers)]
        if all(len(h) <= slots and len(set(h)) == len(h) for h in held):
            best = min(best, max(sum(x for (x, _), a in zip(weights, assign) if a == w) for w in range(workers)))
    return best


def test_pack_is_valid_and_within_one_replica_of_the_best_packing():
    gaps = []
    for load, workers, slots in small_cases(40, seed=1):
        p = plan(load, workers, slots)
        assert all(len(w) <= slots and len(set(w)) == len(w) for w in p.workers)
        assert [sum(e in w for w in p.workers) for e in range(len(load))] == list(p.replicas)
        weights = [(load[e] / r, e) for e, r in enumerate(p.replicas) for _ in range(r)]
        best = best_packing(weights, workers, slots)
        got = max(p.worker_loads(load))
        assert best - 1e-9 <= got <= best + max(x for x, _ in weights) + 1e-9
        gaps.append(got - best)
    assert sum(g < 1e-9 for g in gaps) >= 0.9 * len(gaps)  # and almost always exactly optimal


def test_plan_spreads_a_hot_expert():
    load = [400.0] + [10.0] * 15
    p = plan(load, workers=4, slots=default_slots(16, 4))
    assert p.replicas[0] == 4
    assert max(p.worker_loads(load)) == pytest.approx(sum(load) / 4, rel=0.05)
    none = default_plan(16, 4)
    assert none.replicas == (1,) * 16 and none.workers[0] == (0, 1, 2, 3)
    assert max(none.worker_loads(load)) / (sum(load) / 4) > 2.5


@pytest.mark.parametrize("split", ["even", "balanced"])
def test_dispatch_tables_agree_with_every_senders_numbering(split):
    rng = torch.Generator().manual_seed(0)
    for trial in range(20):
        workers, experts = 3, 5
        counts = torch.randint(0, 7, (workers, experts), generator=rng)
        p = Placement.from_plan(plan(torch.rand(experts, generator=rng).tolist(), workers, 3))
        shares = p.shares(counts.sum(0), split)
        rows = p.rows(counts, shares)  # [senders, replicas]
        assert torch.equal(rows.sum(0), shares)
        for e in range(experts):
            share = shares[p.expert == e]
            assert share.sum() == counts[:, e].sum() and share.min() >= 0
            if split == "even":
                assert share.max() - share.min() <= 1
        assert torch.equal(torch.zeros(workers, experts, dtype=torch.long).index_add_(1, p.expert, rows), counts)
        for s in range(workers):  # each sender's own numbering agrees with the shared table
            experts_sorted = torch.repeat_interleave(torch.arange(experts), counts[s])
            replica = p.replica_of(counts, s, experts_sorted, shares)
            assert torch.equal(torch.bincount(replica, minlength=len(p.expert)), rows[s])


def test_balanced_split_evens_out_what_the_forecast_missed():
    p = Placement.from_plan(Plan(replicas=(2, 1, 1), workers=((0, 1), (0, 2))))
    totals = torch.tensor([10, 6, 0])  # the forecast expected expert 2 to be busy
    even = p.per_worker(p.shares(totals, "even"))
    balanced = p.per_worker(p.shares(totals, "balanced"))
    assert even.tolist() == [11, 5] and balanced.tolist() == [8, 8]
    rng = torch.Generator().manual_seed(1)
    for trial in range(50):
        load = torch.randint(0, 50, (6,), generator=rng)
        p = Placement.from_plan(plan(torch.rand(6, generator=rng).tolist(), 3, 3))
        assert p.per_worker(p.shares(load, "balanced")).max() <= p.per_worker(p.shares(load, "even")).max()


def test_water_fill():
    assert water_fill([0, 10], 4) == [4, 0]
    assert water_fill([0, 2, 9], 6) == [4, 2, 0]
    assert water_fill([3, 3], 5) == [3, 2]
    assert water_fill([5, 1, 1], 0) == [0, 0, 0]


def test_stickiness_keeps_replicas_in_place():
    """Loads drift by ±10%: replanning from scratch reshuffles, a 5% stickiness moves far fewer
    replicas and costs at most that 5% of mean load per replica kept (seeded cases)."""
    rng = random.Random(2)
    fresh_moves = sticky_moves = 0
    for trial in range(20):
        load = [rng.randint(1, 100) for _ in range(12)]
        current = plan(load, 3, 5)
        nudged = [x * rng.uniform(0.9, 1.1) for x in load]
        fresh, sticky = plan(nudged, 3, 5), plan(nudged, 3, 5, current, stickiness=0.05)
        fresh_moves += moves(current, fresh)
        sticky_moves += moves(current, sticky)
        assert max(sticky.worker_loads(nudged)) <= max(fresh.worker_loads(nudged)) * 1.05 + 1e-9
    assert sticky_moves <= fresh_moves / 3


def moves(a: Plan, b: Plan) -> int:
    return sum(len(set(new) - set(old)) for old, new in zip(a.workers, b.workers))


def test_load_forecast_blends_history_and_lookahead():
    f = LoadForecast(decay=0.5, lookahead_weight=0.75)
    assert f.forecast(None) is None
    f.observe(torch.tensor([[4.0, 0.0]]))
    f.observe(torch.tensor([[0.0, 4.0]]))
    assert torch.equal(f.forecast(None), torch.tensor([[2.0, 2.0]], dtype=torch.float64))
    blended = f.forecast(torch.tensor([[8.0, 0.0]]))  # history rescaled to 8 tokens, then mixed 3:1
    assert torch.allclose(blended, torch.tensor([[7.0, 1.0]], dtype=torch.float64))
    assert forecast_error(blended, torch.tensor([[7.0, 1.0]])) == pytest.approx(0.0)
    assert forecast_error(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])) == pytest.approx(1.0)


class RouteCounts(ForwardHooks):
    def __init__(self, experts: int):
        self.experts, self.counts = experts, {}

    def route(self, layer, x, weights, ids):
        self.counts[layer] = torch.bincount(ids.flatten(), minlength=self.experts)
        return weights, ids


def test_router_lookahead_is_exact_where_the_residual_is_the_embedding(tmp_path):
    """With layer 0's attention output zeroed, its router sees the embedding: the lookahead is exact there."""
    save_model("mixtral", tmp_path, experts=8, top_k=2)
    llm = LLM(tmp_path)
    llm.model.layers[0].self_attn.o_proj.weight.data.zero_()
    hook = RouteCounts(8)
    llm.model.hooks.append(hook)
    batch = skewed_batches(128, 1, 4, 9)[0]
    llm.score(batch.tokens)
    predicted = RouterLookahead(llm.model).expert_counts(batch)
    assert torch.equal(predicted[0], hook.counts[0].float())
    assert predicted.sum(dim=1).tolist() == [4 * 9 * 2] * 2
    assert not torch.equal(predicted[1], hook.counts[1].float())  # deeper layers are guesses


def test_routing_memory_recounts_the_batch_it_learned(tmp_path):
    """Each token predicted in proportion to where its occurrences went: summed over the same batch,
    that is exactly the observed load of every layer."""
    save_model("mixtral", tmp_path, experts=8, top_k=2, num_hidden_layers=3)
    llm = LLM(tmp_path)
    counter, memory = RouteCounts(8), RoutingMemory(llm.model)
    llm.model.hooks += [counter, memory]
    batch = skewed_batches(128, 1, 4, 16, topics=1)[0]
    memory.watch(batch)
    llm.score(batch.tokens)
    memory.learn()
    actual = torch.stack([counter.counts[layer] for layer in range(3)]).float()
    assert torch.allclose(memory.expert_counts(batch), actual)
    unseen = skewed_batches(128, 1, 4, 16, first_id=100, seed=5)[0]  # partly new ids: lookahead fills in
    assert memory.expert_counts(unseen).sum(dim=1).tolist() == [4 * 16 * 2] * 3


def test_skewed_workload_shifts_the_hot_tokens():
    a, b = skewed_batches(200, 2, 16, 32, seed=3)
    top = [set(torch.bincount(x.tokens.flatten(), minlength=200).topk(10).indices.tolist()) for x in (a, b)]
    assert len(top[0] & top[1]) <= 3
    assert a.rows(1, 3).tokens.shape == (5, 32) and torch.equal(a.rows(0, 3).tokens, a.tokens[:6])


def test_two_gloo_workers_match_single_process_with_and_without_replication(tmp_path):
    """One 2-process run: decoder-only models (Mixtral; Qwen2-MoE with shared expert and a dense layer)
    and Switch, each under every policy; outputs equal the single-process forward pass."""
    from test_switch import load_switch, save_switch

    mixtral, qwen, switch = tmp_path / "mixtral", tmp_path / "qwen", tmp_path / "switch"
    save_model("mixtral", mixtral, experts=8, top_k=2)
    save_model("qwen2_moe", qwen, experts=8, top_k=2, num_hidden_layers=3, mlp_only_layers=[1])
    save_switch(switch, num_layers=2, num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
                num_experts=8, expert_capacity=3)
    decoder_only = skewed_batches(128, 4, 6, 9, topics=2, seed=0)
    seq2seq = skewed_batches(96, 3, 4, 11, decoder_len=7, topics=2, seed=1)
    jobs = [Job(str(mixtral), decoder_only, dict(policy=p, slots=6)) for p in ("none", "static", "predictive")]
    jobs += [Job(str(mixtral), decoder_only,
                 dict(policy="predictive", slots=6, split="balanced", predictor="lookahead")),
             Job(str(qwen), decoder_only, dict(policy="predictive", slots=5)),
             Job(str(switch), seq2seq, dict(policy="predictive", slots=6))]
    ranks = launch(run_jobs, 2, jobs)

    expected = [[LLM(d).score(b.tokens) for b in decoder_only] for d in (mixtral, qwen)]
    model, experts = load_switch(switch)
    with torch.no_grad():
        expected.append([model.score(b.tokens, b.decoder_tokens, experts) for b in seq2seq])
    for job, result0, result1, want in zip(jobs, *ranks, expected[:1] * 4 + expected[1:]):
        for i, logits in enumerate(want):
            got = torch.cat([result0["logits"][i], result1["logits"][i]])
            assert (got - logits).abs().max().item() <= 1e-5, (job.model_dir, job.engine, i)
        metrics = result0["metrics"]
        assert metrics == result1["metrics"]  # every worker derives the same picture
        assert all(m["imbalance"] >= 1.0 and 0 < m["utilisation"] <= 1.0 + 1e-9 for m in metrics)
        if job.engine["policy"] == "none":
            assert sum(m["moved_experts"] for m in metrics) == 0
        else:  # replicas really moved, and outputs stayed equal
            assert sum(m["moved_experts"] for m in metrics) > 0
    routed = sum(ranks[0][0]["metrics"][0]["tokens_per_worker"])
    assert routed == 6 * 9 * 2 * 2  # rows × tokens × top-k × MoE layers
    assert ranks[0][2]["metrics"][-1]["forecast_error"] is not None
