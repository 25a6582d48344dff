"""Speculative prefetching, speculative execution, default vectors and learned estimators."""

import pytest
import torch

from moespec import LLM, MoespecError
from moespec.hooks import ForwardHooks
from moespec.model.moe import expert_forward
from moespec.api import DEFAULT_MODEL
from moespec.bench.corpus import heldout_ids
from moespec.speculate.context import PreviousToken
from moespec.speculate.estimators import ESTIMATOR_FILE, Estimators, fit, recall_at_k
from moespec.speculate.lookahead import DefaultVectorCollector, DefaultVectors, next_moe_layers
from moespec.speculate.traces import RouteRecorder
from tiny import save_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]
IDS = torch.arange(3, 67).reshape(2, 32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2moe")
    save_model("qwen2_moe", d, experts=8, top_k=2, num_hidden_layers=4, mlp_only_layers=[2])
    return d


@pytest.fixture(scope="module")
def exact(model_dir):
    llm = LLM(model_dir)
    return llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True), llm.score(IDS)


def record(llm: LLM, ids: torch.Tensor, hidden: bool = False):
    recorder = RouteRecorder(llm.model, hidden)
    llm.model.hooks.append(recorder)
    llm.score(ids)
    llm.model.hooks.remove(recorder)
    return recorder.trace()


@pytest.fixture(scope="module")
def calibrated(model_dir):
    """Default vectors and estimators saved beside the model, from its own routing on random text."""
    llm = LLM(model_dir)
    collector = DefaultVectorCollector(llm.model, llm.store)
    llm.model.hooks.append(collector)
    llm.score(torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(5)))
    collector.result().save(model_dir / "default_vectors.safetensors")
    trace = record(llm, torch.randint(3, 128, (16, 64), generator=torch.Generator().manual_seed(6)), hidden=True)
    est, report = fit(llm.model, trace, depth=2, steps=150)
    est.save(model_dir / "estimators.safetensors")
    return report


VERIFY = [
    dict(prefetch="lookahead", default_vectors=False),
    dict(prefetch="lookahead", lookahead_depth=2, prefetch_extra=2),
    dict(prefetch="lookahead", default_vectors=True, eviction="lfu"),
    dict(prefetch="estimator"),
    dict(prefetch="estimator", lookahead_depth=2, cache_scope="layer", expert_cache=12),
    dict(prefetch="lookahead", next_token=True),
    dict(prefetch="lookahead", eviction="predicted"),
]


@pytest.mark.parametrize("config", VERIFY, ids=[str(c) for c in VERIFY])
def test_prefetch_and_verify_is_exact(model_dir, exact, calibrated, config):
    config = {"expert_cache": "40%", **config}
    llm = LLM(model_dir, **config)
    out = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids for o in exact[0]]
    assert torch.allclose(llm.score(IDS), exact[1], atol=1e-6)
    s = llm.stats().as_dict()
    assert s["prefetches"] > 0 and s["prefetch_hits"] > 0
    # a guess still queued when its layer has run is taken back (more likely on a loaded machine)
    assert s["bytes_moved"] == (s["misses"] + s["prefetches"] - s["cancelled_prefetches"]) * s["expert_bytes"]
    assert s["bytes_wasted"] == s["wasted_prefetches"] * s["expert_bytes"]
    for summary in s["speculation"]["total"].values():
        assert 0 < summary["recall_at_k"] <= summary["recall_prefetch_set"] <= 1
        assert 0 < summary["precision"] <= 1


class Oracle(ForwardHooks):
    """Knows the true routing of the next MoE layer for one recorded forward pass."""

    def __init__(self, llm: LLM, ids: torch.Tensor):
        self.model, self.depth = llm.model, 1
        trace = record(llm, ids)
        self.ids = {layer: torch.from_numpy(trace.ids[:, j].astype("int64")) for j, layer in enumerate(trace.moe_layers)}

    def routed(self, layer, router_input) -> None:
        """The oracle reads nothing from the forward pass."""

    def predict(self, layer: int, x: torch.Tensor, router_input=None, routing=None) -> dict[int, torch.Tensor]:
        out = {}
        for target in next_moe_layers(self.model, layer, 1):
            scores = torch.zeros(len(x), self.model.spec.num_experts)
            scores.scatter_(1, self.ids[target], torch.tensor([[2.0, 1.0]]).expand(len(x), -1))
            out[target] = scores
        return out

    def ranked(self, layer, x, router_input, routing, width) -> None:
        """The oracle's guesses are ranked by the policy."""
        return None


@pytest.mark.parametrize("mode", [True, "fallback"])
def test_speculative_execution_with_a_perfect_oracle_is_exact(model_dir, exact, mode):
    llm = LLM(model_dir, expert_cache="40%", prefetch="lookahead", speculative_execution=mode)
    llm.speculation.predictor = Oracle(LLM(model_dir), IDS)
    assert torch.allclose(llm.score(IDS), exact[1], atol=1e-5)
    assert llm.stats().as_dict()["speculation"]["total"]["depth 1"]["recall_at_k"] == 1.0


def test_speculative_execution_changes_outputs_only_by_expert_choice(model_dir, exact):
    """With the real lookahead some guesses are wrong, so logits move; the guess quality is reported."""
    llm = LLM(model_dir, expert_cache="40%", prefetch="lookahead", speculative_execution=True)
    got = llm.score(IDS)
    recall = llm.stats().as_dict()["speculation"]["total"]["depth 1"]["recall_at_k"]
    assert recall < 1.0 and not torch.allclose(got, exact[1], atol=1e-5)
    stats = llm.stats().as_dict()
    assert stats["misses"] + stats["hits"] > 0


def test_default_vectors_on_a_hand_made_case(model_dir):
    llm = LLM(model_dir)
    collector = DefaultVectorCollector(llm.model, llm.store)
    torch.manual_seed(0)
    x1, x2 = torch.randn(3, 32), torch.randn(2, 32)
    ids1 = torch.tensor([[0, 1], [1, 2], [0, 3]])
    ids2 = torch.tensor([[1, 0], [5, 6]])
    w = torch.full((3, 2), 0.5)
    collector.route(0, x1, w, ids1)
    collector.route(0, x2, w[:2], ids2)
    dv = collector.result()

    def out(e, *rows):
        weights = llm.store[(0, e)]
        return expert_forward(torch.stack(rows), weights)

    expected = {0: out(0, x1[0], x1[2], x2[0]).mean(0), 1: out(1, x1[0], x1[1], x2[0]).mean(0),
                3: out(3, x1[2]).mean(0), 7: torch.zeros(32)}
    for e, v in expected.items():
        assert torch.allclose(dv.vectors[0][e], v, atol=1e-5)
    table = DefaultVectors({0: torch.eye(4, 32)})
    x = torch.randn(2, 32)
    routing = torch.tensor([[0.75, 0.25], [0.5, 0.5]]), torch.tensor([[2, 0], [1, 3]])
    rows = [0.75 * torch.eye(4, 32)[2] + 0.25 * torch.eye(4, 32)[0], 0.5 * torch.eye(4, 32)[1] + 0.5 * torch.eye(4, 32)[3]]
    assert torch.allclose(table.add_estimate(0, x, *routing), x + torch.stack(rows))
    one = table.add_estimate(0, x[:1], routing[0][:1], routing[1][:1])  # one token: its own path
    assert torch.allclose(one, x[:1] + rows[0])


def test_estimator_training_reduces_loss_and_beats_lookahead(calibrated):
    assert calibrated["loss_last"] < calibrated["loss_first"]
    for head in calibrated["heads"].values():
        assert head["estimator"]["train"] >= head["lookahead"]["train"]
    gains = [h["estimator"]["train"] - h["lookahead"]["train"] for h in calibrated["heads"].values()]
    assert sum(gains) / len(gains) > 0.05


def test_estimator_file_for_another_model_is_refused(model_dir, calibrated, tmp_path):
    save_model("qwen2_moe", tmp_path, experts=4, top_k=2, num_hidden_layers=4, mlp_only_layers=[2])
    with pytest.raises(MoespecError, match="trained for another model.*num_experts=8"):
        LLM(tmp_path, expert_cache="50%", prefetch="estimator", estimator=model_dir / "estimators.safetensors")
    with pytest.raises(MoespecError, match="estimator file not found"):
        LLM(tmp_path, expert_cache="50%", prefetch="estimator")
    with pytest.raises(MoespecError, match="trained for depth 2"):
        LLM(model_dir, expert_cache="50%", prefetch="estimator", lookahead_depth=3)
    with pytest.raises(MoespecError, match="needs a speculating prefetch policy"):
        LLM(model_dir, speculative_execution=True)


def test_estimator_file_without_context_inputs_is_refused(model_dir, calibrated, tmp_path):
    from safetensors.torch import load_file, save_file

    llm = LLM(model_dir)
    meta = Estimators.load(model_dir / ESTIMATOR_FILE, llm.model).metadata()
    del meta["context"]
    save_file(load_file(model_dir / ESTIMATOR_FILE), tmp_path / "old.safetensors", metadata=meta)
    with pytest.raises(MoespecError, match="no previous-token context inputs.*fit-estimator"):
        LLM(model_dir, expert_cache="50%", prefetch="estimator", estimator=tmp_path / "old.safetensors")


def test_fit_refuses_a_trace_without_hidden_states_or_predecessors(model_dir):
    llm = LLM(model_dir)
    trace = record(llm, IDS, hidden=True)
    trace.previous = None  # as in a trace saved by an older moespec
    with pytest.raises(MoespecError, match="no hidden states or no predecessor indices"):
        fit(llm.model, trace, steps=1)
    with pytest.raises(MoespecError, match="no hidden states"):
        fit(llm.model, record(llm, IDS), steps=1)


def test_previous_token_follows_each_row_across_passes():
    ctx = PreviousToken()
    ones = lambda n: torch.ones(n, 1, dtype=torch.bool)  # noqa: E731
    # a prefill of rows 0 and 2 (row 2 padded after two tokens)
    ctx.start(torch.tensor([0, 2]), torch.tensor([[0, 1, 2], [0, 1, 2]]), torch.tensor([[1, 1, 1], [1, 1, 0]]).bool())
    v = torch.tensor([10.0, 11, 12, 20, 21])
    assert ctx.previous("k", v, -1).tolist() == [-1, 10, 11, -1, 20]
    assert ctx.remembered("k", v, -1).tolist() == [-1] * 5
    ctx.remember("k", v)
    # a decode step, rows in another order: each continues right after its remembered token
    ctx.start(torch.tensor([2, 0]), torch.tensor([[2], [3]]), ones(2))
    assert ctx.remembered("k", torch.zeros(2), -1).tolist() == [21, 12]
    ctx.remember("k", torch.tensor([22.0, 13]))
    # row 0 rolled back a token, row 2 starts a new sequence, row 5 was never seen: no predecessors
    ctx.start(torch.tensor([0, 2, 5]), torch.tensor([[3], [0], [0]]), ones(3))
    assert ctx.remembered("k", torch.zeros(3), -1).tolist() == [-1, -1, -1]
    # one row at a time (batch-1 decoding): row 2 continues; a padded row has no token to remember
    ctx.start(torch.tensor([2]), torch.tensor([[3]]), ones(1))
    assert ctx.remembered("k", torch.zeros(1), -1).tolist() == [22]
    ctx.remember("k", torch.tensor([23.0]))
    ctx.start(torch.tensor([2]), torch.tensor([[4]]), ~ones(1))
    ctx.remember("k", torch.tensor([99.0]))
    ctx.start(torch.tensor([2]), torch.tensor([[4]]), ones(1))
    assert ctx.remembered("k", torch.zeros(1), -1).tolist() == [23]


def test_trace_links_each_token_to_its_predecessor(model_dir):
    llm = LLM(model_dir)
    assert record(llm, IDS).previous.tolist() == [-1, *range(31), -1, *range(32, 63)]
    recorder = RouteRecorder(llm.model, hidden=False)
    llm.model.hooks.append(recorder)
    llm.engine.teacher_forced(IDS[:, :4])  # one token per row per pass: rows interleave in the trace
    assert recorder.trace().previous.tolist() == [-1, -1, 0, 1, 2, 3, 4, 5]


def test_estimators_see_at_inference_the_context_they_train_on(model_dir, calibrated):
    """Decoding, each token's context is its predecessor's router input at the target layer:
    what `fit` builds from a trace's `hidden` and `previous`."""
    llm = LLM(model_dir, expert_cache="50%", prefetch="estimator")
    heads = llm.speculation.predictor.heads
    seen = []  # (source layer, target layer, context) of every head called, in order

    def watched(key, head):
        return lambda h, context: seen.append((*map(int, key.split("_")), context)) or head(h, context)

    heads.update({key: watched(key, head) for key, head in heads.items()})
    recorder = RouteRecorder(llm.model, hidden=True)
    llm.model.hooks.insert(0, recorder)
    llm.engine.teacher_forced(IDS[:, :6])
    trace = recorder.trace()
    hidden, previous = torch.from_numpy(trace.hidden).float(), torch.from_numpy(trace.previous)
    layers = llm.spec.num_layers - 1  # every layer but the last MoE layer guesses (it has nothing to)
    assert len(seen) == 6 * layers  # depth 1: one head per guessing layer
    for step in range(6):
        tokens = previous[2 * step:2 * step + 2]
        for layer, t, c in seen[step * layers:(step + 1) * layers]:
            want = torch.zeros_like(c) if step == 0 else hidden[tokens, t]
            assert torch.allclose(c, want, atol=1e-2), (step, layer, t)
    assert any(c.abs().sum() > 0 for _, _, c in seen)


def test_switching_policies_reuses_loaded_estimators_until_their_file_changes(model_dir, tmp_path):
    """A policy switch (a benchmark makes one before every run) builds no heads again; a file
    written anew is read anew."""
    import os

    llm = LLM(model_dir, expert_cache="50%")
    path = tmp_path / "est.safetensors"
    est = Estimators(llm.model, depth=1)
    est.init_from_lookahead()
    est.save(path)
    llm.set_policy(prefetch="estimator", estimator=str(path))
    first = llm.speculation.predictor.estimators
    llm.set_policy(prefetch="estimator", estimator=str(path))
    assert llm.speculation.predictor.estimators is first
    key = next(iter(est.heads))
    with torch.no_grad():
        est.heads[key].linear.bias.fill_(1.0)
    est.save(path)  # as large as before; its modification time may fall in the same clock tick
    mtime = path.stat().st_mtime_ns + 1_000_000
    os.utime(path, ns=(mtime, mtime))
    llm.set_policy(prefetch="estimator", estimator=str(path))
    now = llm.speculation.predictor.estimators
    assert now is not first and bool((now.heads[key].linear.bias == 1.0).all())
    assert [k[-2] for k in llm.model.kept] == [mtime]  # the file as it was is forgotten


@pytest.mark.parametrize("tokens", [1, 5])
def test_lookahead_applies_each_later_layers_own_norm_and_router(model_dir, tokens):
    """The folded routers (norm weight and scale folded into the router; one matmul for every
    target) give what the target layers' own RMSNorm and router give the same residual."""
    from moespec.speculate.lookahead import LookaheadPredictor

    llm = LLM(model_dir)
    x = 3 * torch.randn(tokens, 32)
    got = LookaheadPredictor(llm.model, 2, None).predict(0, x)
    assert list(got) == next_moe_layers(llm.model, 0, 2) == [1, 3]
    for t, logits in got.items():
        assert torch.allclose(logits, llm.model.layers[t].router_logits(x), atol=1e-5)


def test_estimator_heads_start_as_the_lookahead(model_dir):
    llm = LLM(model_dir)
    est = Estimators(llm.model, depth=1)
    est.init_from_lookahead()
    x = torch.randn(5, 32)
    from moespec.speculate.lookahead import LookaheadPredictor

    want = LookaheadPredictor(llm.model, 1, None).predict(0, x)[1]
    assert torch.allclose(est.predict(0, x, {1: torch.randn(5, 32)})[1], want, atol=1e-5)


def test_a_next_token_head_learns_the_next_tokens_first_moe_layer(model_dir):
    """On text where each token fixes the next, the next-token head (last MoE layer -> the next
    token's first) learns the successor's routing there, not the token's own."""
    llm = LLM(model_dir)
    tokens = [torch.randint(0, 32, (16,), generator=torch.Generator().manual_seed(7))]
    for _ in range(63):
        tokens.append(tokens[-1] * 5 % 32)  # each token's successor is a function of it
    ids = torch.stack(tokens, dim=1) + 3
    trace = record(llm, ids, hidden=True)
    est, report = fit(llm.model, trace, depth=1, steps=300, next_token=True)
    last, first = est.next_token
    assert (last, first) == (3, 0) and est.targets() == {1, 3}  # its context is no predecessor's
    successor = torch.arange(len(trace.ids)) + 1
    mine = torch.from_numpy(trace.previous)[1:] >= 0  # tokens with a successor: all but each row's last
    hidden = torch.from_numpy(trace.hidden).float()
    with torch.no_grad():
        scores = est.heads[f"{last}_{first}"](hidden[:-1, last], hidden[:-1, first])[mine]
    routing = torch.from_numpy(trace.ids.astype("int64"))[:, 0]
    theirs, own = (recall_at_k(scores, routing[i], 2)
                   for i in (successor[:-1][mine], torch.arange(len(trace.ids) - 1)[mine]))
    head = report["heads"][f"{last}_{first}"]["estimator"]
    assert theirs > own + 0.2 and abs(theirs - (0.9 * head["train"] + 0.1 * head["val"])) < 0.05, (theirs, own, head)
    assert head["train"] > report["heads"][f"{last}_{first}"]["lookahead"]["train"] + 0.2


def test_the_next_token_head_guesses_from_the_last_router_input_and_this_tokens_first(model_dir, tmp_path):
    """Decoding with next_token=True and estimators that have a next-token head, the last MoE
    layer guesses the next token's first one with that head, from its own router input and this
    token's router input at the first MoE layer; its guesses are scored there one depth deeper."""
    llm = LLM(model_dir)
    est = Estimators(llm.model, depth=1, mlp=8, next_token=True)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in est.heads.parameters():
            p.normal_(0, 0.3)
    est.save(tmp_path / "next.safetensors")
    llm = LLM(model_dir, expert_cache="50%", prefetch="estimator", estimator=tmp_path / "next.safetensors",
              next_token=True)
    predictor = llm.speculation.predictor
    assert predictor.guesses_next_token and llm.speculation.next_token.learned is predictor
    seen, scores = [], predictor.next_token_scores
    predictor.next_token_scores = lambda h: seen.append((h, scores(h))) or seen[-1][1]
    recorder = RouteRecorder(llm.model, hidden=True)
    llm.model.hooks.insert(0, recorder)
    llm.generate([PROMPTS[2]], max_new_tokens=6, ignore_eos=True)
    hidden = torch.from_numpy(recorder.trace().hidden).float()[-len(seen):]  # the decode steps' tokens
    head = Estimators.load(tmp_path / "next.safetensors", llm.model).heads["3_0"]
    assert len(seen) == 5
    for (h, got), token in zip(seen, hidden):
        assert torch.allclose(h, token[3][None], atol=1e-2)
        assert torch.allclose(got, head(token[3][None], token[0][None]), atol=1e-2)
    guessed = llm.stats().as_dict()["speculation"]["per_layer"]["layer 0 depth 2"]
    assert guessed["tokens"] == 4  # the decode steps after the first, each guessed at the step before


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen2moe"])
def test_shipped_estimators_load_and_beat_the_lookahead(name):
    """The estimator files shipped beside the trained models match them and, decoding held-out
    text, find more of the next layer's experts than router lookahead does."""
    path = DEFAULT_MODEL.parent / name
    recall = {}
    for prefetch in ("lookahead", "estimator"):
        llm = LLM(path, prefetch=prefetch, lookahead_depth=3, default_vectors=False)
        ids = torch.tensor(heldout_ids(llm)[:256]).reshape(4, 64)
        llm.engine.teacher_forced(ids)
        recall[prefetch] = llm.stats().as_dict()["speculation"]["total"]["depth 1"]["recall_at_k"]
    assert recall["estimator"] > recall["lookahead"] + 0.05, recall


@pytest.mark.parametrize("on_cost,most", [(1.25, False), (0.8, True)])
def test_auto_prefetch_runs_the_faster_mode(on_cost, most):
    """Scripted step times: where guessing makes steps slower the switch stays on demand apart
    from probes that get rarer; where it makes them faster it stays on."""
    from moespec.speculate.auto import PrefetchSwitch

    switch, chosen = PrefetchSwitch(), []
    for _ in range(1000):
        on = switch.choose(1)
        switch.observe(1, on_cost if on else 1.0)
        chosen.append(on)
    share = sum(c == most for c in chosen) / len(chosen)
    assert share > 0.9, share
    if not most:  # the probes of the losing mode back off: each wait doubles
        starts = [i for i in range(1, 1000) if chosen[i] and not chosen[i - 1]]
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert gaps == sorted(gaps) and gaps[-1] >= 128, gaps


@pytest.mark.parametrize("on_cost", [1.25, 2.0])
def test_auto_prefetch_never_costs_more_than_its_budget(on_cost):
    """Scripted: guessing steps are slower. A run of 32 tokens never tries guessing; over a long
    run every try and probe together cost at most the budget (3%) of the time."""
    from moespec.speculate.auto import PrefetchSwitch

    switch, extra, total = PrefetchSwitch(), 0.0, 0.0
    for step in range(2000):
        on = switch.choose(1)
        assert not (on and step < 32)
        switch.observe(1, on_cost if on else 1.0, stalled=0.5)
        extra, total = extra + (on_cost - 1.0) * on, total + (on_cost if on else 1.0)
    assert switch.on_steps > 0 and extra / total <= switch.budget, (switch.on_steps, extra / total)


def test_auto_prefetch_does_not_try_guessing_where_on_demand_hardly_stalls():
    """Scripted: on-demand steps stall 1% of their time, so guessing could win back at most that:
    it is never tried, however long the run."""
    from moespec.speculate.auto import PrefetchSwitch

    switch = PrefetchSwitch()
    for _ in range(300):
        on = switch.choose(1)
        assert not on
        switch.observe(1, 1.0, stalled=0.01)
    switch = PrefetchSwitch()  # stalling 30%: tried (once the budget allows)
    assert any(switch.choose(1) or switch.observe(1, 1.0, stalled=0.3) for _ in range(60))
    # ... but once guessing is measured to cost more than that stall, no longer
    switch, chosen = PrefetchSwitch(), []
    for _ in range(300):
        on = switch.choose(1)
        switch.observe(1, 1.0, stalled=None if on else 0.3, guessing=0.4 if on else 0.0)
        chosen.append(on)
    assert 0 < sum(chosen) <= 2 * switch.phase_steps, sum(chosen)


def test_auto_prefetch_is_exact_and_reports_its_switch(model_dir, exact):
    # a slow emulated link: on-demand steps stall, so guessing is worth trying
    llm = LLM(model_dir, expert_cache="50%", prefetch="auto", link_bandwidth="0.005GB/s")
    got = llm.generate(PROMPTS, max_new_tokens=64, ignore_eos=True)
    assert [o.token_ids[:16] for o in got] == [o.token_ids for o in exact[0]]
    auto = llm.stats().as_dict()["speculation"]["auto"]  # on demand first, then guessing is measured
    assert auto["on_steps"] > 0 and auto["off_steps"] > 0 and auto["on_steps"] + auto["off_steps"] == 63


class Calls(ForwardHooks):
    """Counts the calls each pass makes to it; sits out the passes `skip` names (0: the prefill)."""

    def __init__(self, skip: set[int]):
        self.skip, self.passes, self.calls = skip, -1, []

    def forward_start(self, rows, positions, valid):
        self.passes += 1
        self.calls.append(0)
        return False if self.passes in self.skip else None  # None (the base class's habit) watches

    def layer_start(self, layer):
        self.calls[-1] += 1

    def after_attention(self, layer, x, valid):
        self.calls[-1] += 1

    def route(self, layer, x, weights, ids):
        self.calls[-1] += 1
        return weights, ids

    def layer_end(self, layer):
        self.calls[-1] += 1


def test_a_hook_that_sits_out_a_pass_is_not_called_at_its_layers(model_dir, exact):
    """forward_start returning False keeps a hook out of that pass's layers, and only that pass's;
    auto switched off is such a hook (its passes cost no hook calls), and stays exact."""
    llm = LLM(model_dir, expert_cache="50%")
    hook = Calls(skip={1, 2})
    llm.model.hooks.append(hook)
    llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    spec = llm.spec
    per_pass = 3 * spec.num_layers + len(spec.moe_layer_ids)  # layer_start, after_attention, layer_end; route
    assert hook.calls == [per_pass, 0, 0, per_pass]
    llm.model.hooks.remove(hook)

    # a slow link: on-demand steps stall, so guessing is tried (on steps) and dropped (off steps)
    auto = LLM(model_dir, expert_cache="50%", prefetch="auto", link_bandwidth="0.005GB/s")
    spec_hooks, watches, layers = auto.speculation, [], []
    start, after = spec_hooks.forward_start, spec_hooks.after_attention
    spec_hooks.forward_start = lambda *a: (watches.append(start(*a)), watches[-1])[1]
    spec_hooks.after_attention = lambda *a: (layers.append(spec_hooks.active), after(*a))[1]
    got = auto.generate(PROMPTS, max_new_tokens=64, ignore_eos=True)
    assert [o.token_ids[:16] for o in got] == [o.token_ids for o in exact[0]]
    switch = auto.stats().as_dict()["speculation"]["auto"]
    assert switch["on_steps"] > 0 and watches.count(False) >= switch["off_steps"] > 0
    assert all(layers) and len(layers) == spec.num_layers * watches.count(True)  # only passes it watched


def test_auto_prefetch_stays_out_where_every_expert_is_resident(model_dir):
    """Nothing can be missed, so auto installs no hooks (a hook would keep a compiled model off
    its one-call step); an explicit policy still guesses (its statistics), and so does auto
    where the cache holds less."""
    resident = LLM(model_dir, expert_cache="100%", prefetch="auto")
    assert resident.speculation is None and resident.model.hooks == []
    assert resident.generate(PROMPTS[:1], max_new_tokens=4)[0].token_ids
    assert resident.stats().speculation is None
    assert LLM(model_dir, expert_cache="100%", prefetch="lookahead").speculation is not None
    assert LLM(model_dir, expert_cache="50%", prefetch="auto").speculation is not None


def test_auto_guesses_two_layers_and_the_next_token_where_its_estimators_have_that_head(model_dir):
    """Unset, the depth and the next-token guess are chosen per policy: auto with a next-token
    head (the shipped models' estimators) two layers deep and the next token's first, anything
    else one layer deep without it; what the user sets stays."""
    auto = LLM(DEFAULT_MODEL, expert_cache="25%", prefetch="auto", progress=False)
    assert (auto.config.speculation.lookahead_depth, auto.config.speculation.next_token) == (2, True)
    assert auto.speculation.depth == 3 and auto.speculation.next_token is not None
    auto.set_policy(prefetch="auto", lookahead_depth=1, next_token=False)
    assert auto.speculation.depth == 1 and auto.speculation.next_token is None
    auto.set_policy(prefetch="estimator")
    assert (auto.config.speculation.lookahead_depth, auto.config.speculation.next_token) == (1, False)
    no_head = LLM(model_dir, expert_cache="50%", prefetch="auto")  # no estimators: lookahead, one layer
    assert (no_head.config.speculation.lookahead_depth, no_head.config.speculation.next_token) == (1, False)


def test_guess_odds_are_measured_on_the_run_and_reported(model_dir):
    """Batch-1 decoding scores each guess against the true routing: the odds admission uses move
    off their prior and are reported per depth, beside how often unguessed experts were used."""
    from moespec.odds import Odds

    llm = LLM(model_dir, expert_cache="50%", prefetch="lookahead")
    llm.generate(PROMPTS[:1], max_new_tokens=24, ignore_eos=True)
    s = llm.stats().speculation
    prior = Odds().as_dict()
    assert set(s.odds) == {1} and s.odds[1] != prior and all(0 <= p <= 1 for p in s.odds[1].values())
    assert s.outside_guesses[1] < max(s.odds[1].values())
    assert "guess_odds" in s.as_dict() and "outside_guesses_used" in s.as_dict()


def test_auto_prefetch_measures_on_demand_again_after_the_cold_start():
    """Scripted: the first steps after a prefill are slow whatever the mode (a cold cache), later
    on-demand steps are faster than guessing ones. Judged on the cold steps alone, guessing would
    win; measured again, on demand does."""
    from moespec.speculate.auto import PrefetchSwitch

    switch, chosen = PrefetchSwitch(budget=1.0), []  # no budget wait: guessing tried right away
    for step in range(40):
        on = switch.choose(1)
        switch.observe(1, (1.1 if on else 1.0) + (0.5 if step < 5 else 0.0), stalled=0.3)
        chosen.append(on)
    assert any(chosen[:12]), chosen
    assert sum(chosen[12:]) <= 8, chosen  # after off, on, off: on demand runs, guessing only probed


def test_next_token_guesses_are_scored_at_the_first_moe_layer_of_the_next_step(model_dir, exact):
    """The last MoE layer guesses the next token's first one: exact, scored one depth beyond the
    predictor's when the next decode step routes it, and dropped when the next pass is not that
    step (a new request's prefill, a batch whose rows changed)."""
    llm = LLM(model_dir, expert_cache="40%", prefetch="lookahead", next_token=True)
    got = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)  # rows finish together: same batch
    assert [o.token_ids for o in got] == [o.token_ids for o in exact[0]]
    llm.generate(PROMPTS[:2], max_new_tokens=5, ignore_eos=True)  # a prefill follows the last step's guess
    first = llm.model.spec.moe_layer_ids[0]
    per_layer = llm.stats().speculation.per_layer
    assert {d for t, d in per_layer if t == first} == {2}  # no earlier layer guesses the first one
    # every decode step after the first in each run, one token per row; none scored against a prefill
    assert per_layer[(first, 2)].tokens == 14 * len(PROMPTS) + 3 * 2


def test_next_token_must_be_a_boolean():
    with pytest.raises(MoespecError, match="next_token must be True or False, got 'yes'"):
        LLM(DEFAULT_MODEL, prefetch="lookahead", next_token="yes")
