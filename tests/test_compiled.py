"""The compiled decode path (moespec/model/compiled.py): what it computes is what the eager layers
compute, it really runs, it never bakes one layer's weights into another, and its failures are one line."""

from __future__ import annotations

import pytest
import torch

import moespec.model.compiled as compiled
from moespec import LLM, MoespecError
from moespec.hooks import ForwardHooks
from moespec.speculate.compiled_guess import GuessLibraries
from moespec.speculate.estimators import ESTIMATOR_FILE, EstimatorPredictor, Estimators
from moespec.speculate.lookahead import DefaultVectors, LookaheadPredictor
from moespec.speculate.next_token import NextTokenGuess
from test_deepseek import save as save_deepseek
from test_gpt_oss import CASES as GPT_OSS_CASES, random_model as gpt_oss_model
from test_llama4 import CASES as LLAMA4_CASES, save_llama4
from tiny import save_model

PROMPTS = [[5, 9, 23, 7], [11, 4, 60, 2, 19, 33, 8], [3, 40]]  # three lengths: rows decode at different positions


def save_gpt_oss(out, **kw):
    gpt_oss_model(**kw).save_pretrained(out)


BUILDERS = {  # each covers layer kinds the others do not
    "mixtral": lambda d: save_model("mixtral", d, experts=8, top_k=2),
    "qwen2_moe": lambda d: save_model("qwen2_moe", d, experts=8, top_k=2, qkv_bias=True),  # shared expert, biases
    "deepseek_v3": lambda d: save_deepseek("deepseek_v3", d, experts=8, top_k=2, n_group=2, topk_group=1,
                                           num_hidden_layers=3, first_k_dense_replace=1),  # MLA, a dense layer
    "gpt_oss": lambda d: save_gpt_oss(d, **GPT_OSS_CASES["full-then-window3-clamped"]),  # sinks, a window
    "llama4": lambda d: save_llama4(d, **LLAMA4_CASES["interleaved-top1-chunk5"]),  # NoPE, chunks, dense layers
}
SLOW = {"gpt_oss", "llama4"}  # two and three kinds of layer: ~10 s each to compile on a 2-core CPU


@pytest.fixture(scope="module")
def library_dir(tmp_path_factory):
    """One library directory for the module, so each model compiles once."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("compiled")
        mp.setenv("MOESPEC_CACHE", str(d))
        yield d / "compiled"


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BUILDERS])
def pair(request, tmp_path_factory, library_dir):
    """(eager LLM, compiled LLM) of one tiny random checkpoint."""
    d = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](d)
    return LLM(d), LLM(d, compile=True)


def counting(llm: LLM, call: str = "_layer", libraries: str = "layers") -> list[int]:
    """A list that grows by one for each compiled layer call of `llm` (`libraries`: "layers" counts
    decode steps' calls, "prefill" fresh prefills'; `call`: "run_one_row" counts the one-row steps
    run as one call)."""
    calls: list[int] = []
    layer = getattr(llm.model.compiled, call)

    def counted(*args):
        out = layer(*args)
        if out is not None and (call != "_layer" or args[0] is getattr(llm.model.compiled, libraries)):
            calls.append(1)
        return out
    setattr(llm.model.compiled, call, counted)
    return calls


def test_compiled_decode_is_the_eager_decode(pair):
    """Greedy tokens of rows at different positions identical; logits of every decode step within
    float rounding (the compiled kernels fuse the pointwise work, so the last bits may differ)."""
    eager, fast = pair
    calls = counting(fast)
    kw = dict(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in fast.generate(PROMPTS, **kw)] == [o.token_ids for o in eager.generate(PROMPTS, **kw)]
    assert len(calls) >= 11 * fast.spec.num_layers  # every decode step ran compiled (the padded prefill eager)
    ids = torch.tensor([p[:2] + [7, 30, 12, 9, 44] for p in PROMPTS])
    expected = eager.engine.teacher_forced(ids)
    assert (fast.engine.teacher_forced(ids) - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max())


def test_rows_apart_in_the_cache_run_one_call_per_run(pair):
    """Continuous batching leaves gaps between the rows it decodes: rows [2, 0] of a 3-row cache
    (two runs), [0, 2] and [1] (one row: the one-row step) compute and write the cache as the
    eager layers do."""
    _, fast = pair
    model, compiled_layers = fast.model, fast.model.compiled
    cache, twin = model.new_cache(3, 32), model.new_cache(3, 32)
    calls, whole = counting(fast), counting(fast, "run_one_row")
    with torch.inference_mode():
        model.compiled = None
        model(torch.tensor([[5, 9, 23, 7]] * 3), cache, fast.experts)  # eager prefill of every row
        for a, b in ((twin.k, cache.k), (twin.v, cache.v), (twin.lengths, cache.lengths)):
            a.copy_(b)
        for rows in ([2, 0], [0, 2], [1]):
            tokens, rows = torch.tensor([[11]] * len(rows)), torch.tensor(rows)
            model.compiled = None
            want = model(tokens, twin, fast.experts, rows=rows)
            model.compiled = compiled_layers
            got = model(tokens, cache, fast.experts, rows=rows)
            assert (got - want).abs().max().item() <= 1e-5
        assert (cache.k - twin.k).abs().max().item() <= 1e-5 and torch.equal(cache.lengths, twin.lengths)
        assert len(calls) == 2 * model.spec.num_layers and len(whole) == 1


def test_a_one_row_step_is_one_call(pair):
    """With every expert resident on the CPU, a one-row decode step runs as one compiled call, every
    layer's experts included: the same tokens and (within float rounding) hidden states as the
    eager layers, and the experts' statistics as if they had been fetched."""
    eager, fast = pair
    whole, split = counting(fast, "run_one_row"), counting(fast)
    kw = dict(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    for llm in (eager, fast):
        llm.reset()
    for prompt in PROMPTS:
        assert fast.generate([prompt], **kw)[0].token_ids == eager.generate([prompt], **kw)[0].token_ids
    assert len(whole) == 3 * 11 and not split  # every decode step (each prompt's prefill ran the prefill libraries)
    assert (fast.stats().experts.hits, fast.stats().experts.tokens) == \
        (eager.stats().experts.hits, eager.stats().experts.tokens)
    model, layers = fast.model, fast.model.compiled
    cache, twin = model.new_cache(2, 32), model.new_cache(2, 32)
    with torch.inference_mode():
        model.compiled = None
        model(torch.tensor([[5, 9, 23, 7]] * 2), cache, fast.experts)
        for a, b in ((twin.k, cache.k), (twin.v, cache.v), (twin.lengths, cache.lengths)):
            a.copy_(b)
        for token, row in ((11, 1), (40, 1), (3, 0)):  # either row of the cache
            model.compiled = None
            want = model(torch.tensor([[token]]), twin, fast.experts, rows=torch.tensor([row]))
            model.compiled = layers
            got = model(torch.tensor([[token]]), cache, fast.experts, rows=torch.tensor([row]))
            assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max())
        assert torch.equal(cache.lengths, twin.lengths) and (cache.k - twin.k).abs().max().item() <= 1e-5
    assert len(whole) == 3 * 11 + 3


def test_a_fresh_prefill_runs_the_prefill_layers(pair):
    """Rows that start empty, consecutive in the cache (rows 0-1, or 1-2 of a 3-row cache), run
    each layer's prefill library: the logits and the cache entries the eager layers give, within
    float rounding. A prefill into rows that hold tokens already, or into rows apart, runs eager."""
    eager, fast = pair
    calls = counting(fast, libraries="prefill")
    model, layers = fast.model, fast.model.compiled
    tokens = torch.tensor([[5, 9, 23, 7, 11, 4], [60, 2, 19, 33, 8, 3]])
    with torch.inference_mode():
        for rows, more in ((torch.tensor([0]), False), (torch.tensor([1, 2]), True), (torch.tensor([2, 0]), False)):
            cache, twin = model.new_cache(3, 32), model.new_cache(3, 32)
            got, want = [], []
            for chunk in (tokens[:len(rows), :4], tokens[:len(rows), 4:]) if more else (tokens[:len(rows)],):
                model.compiled = None
                want.append(model(chunk, twin, fast.experts, rows=rows))
                model.compiled = layers
                got.append(model(chunk, cache, fast.experts, rows=rows))
            got, want = torch.cat(got, dim=1), torch.cat(want, dim=1)
            assert (model.logits(got) - model.logits(want)).abs().max().item() <= 1e-5 * max(1.0, want.abs().max())
            assert (cache.k - twin.k).abs().max().item() <= 1e-5 and (cache.v - twin.v).abs().max().item() <= 1e-5
            assert torch.equal(cache.lengths, twin.lengths)
    # the first prefill (row 0) and the first chunk into rows 1-2 ran compiled; the second chunk and rows apart, eager
    assert len(calls) == 2 * model.spec.num_layers
    kw = dict(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert fast.generate([PROMPTS[1]], **kw)[0].token_ids == eager.generate([PROMPTS[1]], **kw)[0].token_ids
    assert len(calls) == 3 * model.spec.num_layers


def test_hooks_see_every_layer_of_a_one_row_step(pair):
    """A hook (speculation, a trace) must see each layer's residual and routing, so a one-row step
    with hooks runs the split layers: Block.forward compiled, the experts eager."""
    _, fast = pair
    whole, split = counting(fast, "run_one_row"), counting(fast)
    seen: list[int] = []

    class Routes(ForwardHooks):
        def route(self, layer, x, weights, ids):
            seen.append(layer)
            return weights, ids
    fast.model.hooks.append(hooks := Routes())
    try:
        fast.generate([PROMPTS[0]], max_new_tokens=4, temperature=0.0, ignore_eos=True)
    finally:
        fast.model.hooks.remove(hooks)
    moe_layers = len(fast.spec.moe_layer_ids)
    assert not whole and len(split) == 3 * fast.spec.num_layers and len(seen) == 4 * moe_layers


def test_a_tensor_the_layer_reads_but_is_not_given_is_refused(tmp_path, monkeypatch):
    """Layers of one kind share a library, so their weights must be its inputs: a tensor the trace
    would bake in as a constant (here the shared expert's stacked gate/up) stops the compile."""
    save_model("qwen2_moe", tmp_path, experts=8, top_k=2)
    monkeypatch.setenv("MOESPEC_CACHE", str(tmp_path / "empty"))
    every = compiled.layer_tensors
    monkeypatch.setattr(compiled, "layer_tensors",
                        lambda block: {k: t for k, t in every(block).items() if k != "mlp.shared_expert.gate_up"})
    with pytest.raises(MoespecError, match=r"layer \(of layer 0\) holds tensors that are not inputs"):
        LLM(tmp_path, compile=True)


def test_offloaded_prefetching_run_stays_exact(tmp_path, library_dir):
    """An expert cache of a quarter of the experts with lookahead prefetching: the compiled steps
    keep the resident eager run's tokens (the hooks see the same residual and routing), in a batch
    and for one prompt alone, whose guesses the compiled library ranks."""
    save_model("mixtral", tmp_path, experts=8, top_k=2)
    kw = dict(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    resident = LLM(tmp_path)
    expected = [o.token_ids for o in resident.generate(PROMPTS, **kw)]
    llm = LLM(tmp_path, compile=True, expert_cache="25%", prefetch="lookahead", prefetch_extra=1)
    calls = counting(llm)
    predictor, ranked = llm.speculation.predictor, []
    rank = predictor.ranked
    predictor.ranked = lambda *args: ranked.append(rank(*args)) or ranked[-1]
    assert [o.token_ids for o in llm.generate(PROMPTS, **kw)] == expected and calls
    # the batch's 15 decode steps: the MoE layer before the last ranks every row's guess in its library
    assert len(ranked) == 15 and {len(ids) for r in ranked for ids, _ in r.values()} == {3}
    eager = LLM(tmp_path, expert_cache="25%", prefetch="lookahead", prefetch_extra=1)
    eager.generate(PROMPTS, **kw)  # ranks and pools the same guesses with tensor ops: scored alike
    assert llm.stats().speculation.by_depth == eager.stats().speculation.by_depth
    ranked.clear()
    assert llm.generate([PROMPTS[1]], **kw)[0].token_ids == resident.generate([PROMPTS[1]], **kw)[0].token_ids
    assert len(ranked) == 15 and all(len(ids) == 1 and len(ids[0]) == 3  # one row, width k + 1
                                         for r in ranked for ids, _ in r.values())
    assert llm.stats().speculation.by_depth[1].recall_at_k > 0


def test_compiled_speculative_execution_runs_the_eager_runs_guesses(tmp_path, library_dir):
    """speculative_execution="on" with compile=True runs the guessed experts the eager run does,
    in a batch (guesses ranked per row by the library) and for one prompt: the same tokens."""
    save_model("mixtral", tmp_path, experts=8, top_k=2)
    kw = dict(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    config = dict(expert_cache="50%", prefetch="lookahead", speculative_execution="on")
    eager, fast = LLM(tmp_path, **config), LLM(tmp_path, compile=True, **config)
    for prompts in (PROMPTS, PROMPTS[1:2]):
        assert [o.token_ids for o in fast.generate(prompts, **kw)] == [o.token_ids for o in eager.generate(prompts, **kw)]
    exact = LLM(tmp_path).generate(PROMPTS, **kw)
    assert [o.token_ids for o in exact] != [o.token_ids for o in eager.generate(PROMPTS, **kw)]  # the guesses ran


def test_compiled_guesses_are_the_eager_guesses(tmp_path, library_dir):
    """With compile=True the lookahead's guess at an MoE layer is one compiled call that also
    ranks it: each row's eager best experts and their probabilities, one and two layers deep,
    with and without default vectors, for one row and for three; for another width, no ranking
    (the policy ranks)."""
    save_model("mixtral", tmp_path, experts=8, top_k=2, num_hidden_layers=3)
    llm = LLM(tmp_path, compile=True, expert_cache="50%", prefetch="lookahead")
    assert sorted(llm.speculation.predictor.compiled.layers) == [0, 1]  # the last layer has nothing to guess
    spec, model = llm.spec, llm.model
    torch.manual_seed(0)
    vectors = DefaultVectors({i: torch.randn(spec.num_experts, spec.hidden_size) for i in spec.moe_layer_ids})
    for depth, dv in ((1, None), (2, None), (1, vectors), (2, vectors)):
        fast, eager = LookaheadPredictor(model, depth, dv), LookaheadPredictor(model, depth, dv)
        fast.compile(library_dir, 3)
        runs = count_runs(fast.compiled)
        for layer in (0, 1):
            for rows in (1, 3):
                x = torch.randn(rows, spec.hidden_size)
                with torch.inference_mode():
                    routing = model.layers[layer].mlp.route(x)
                    got, want = fast.ranked(layer, x, x, routing, 3), eager.predict(layer, x, routing=routing)
                    assert fast.ranked(layer, x, x, routing, 2) is None and eager.ranked(layer, x, x, routing, 3) is None
                assert list(got) == list(want) == [t for t in (1, 2) if t > layer][:depth]
                for t, ranked in got.items():
                    assert_ranked(ranked, want[t], 3)
        assert len(runs) == 4  # both layers' guesses ran compiled, for one row and for three


def random_estimators(llm: LLM, depth: int, mlp: int, next_token: bool = False) -> Estimators:
    """Estimators of `llm`'s model with every weight random (a trained head's MLP output is not
    zero), rounded to float16 as an estimator file holds them (compiled guesses read them so)."""
    est = Estimators(llm.model, depth, mlp, next_token)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in est.heads.parameters():
            p.copy_(torch.randn_like(p).mul_(0.3).half())
    return est.eval()


def test_compiled_estimator_guesses_are_the_eager_guesses(tmp_path, library_dir):
    """With compile=True an estimator's guess at an MoE layer is one compiled call that ranks it
    too: each row's eager best experts and their probabilities, one and two layers deep, with and
    without an MLP, with a remembered predecessor's context and without, for one row and for two;
    for another width, no ranking (the policy ranks)."""
    save_model("mixtral", tmp_path, experts=8, top_k=2, num_hidden_layers=3)
    llm = LLM(tmp_path)
    spec, model = llm.spec, llm.model
    for depth, mlp in ((2, 16), (1, 0)):
        est = random_estimators(llm, depth, mlp)
        fast, eager = EstimatorPredictor(est), EstimatorPredictor(est)
        fast.compile(library_dir, 3)
        runs = count_runs(fast.compiled)
        for rows in (1, 2):
            for position in (0, 1):  # a sequence's first token (no context), then its second
                h = torch.randn(rows, spec.hidden_size)
                for predictor in (fast, eager):
                    predictor.forward_start(torch.arange(rows), torch.full((rows, 1), position),
                                            torch.ones(rows, 1, dtype=torch.bool))
                for layer in (0, 1):
                    x = torch.randn(rows, spec.hidden_size)
                    with torch.inference_mode():
                        routing = model.layers[layer].mlp.route(h)
                        got, want = fast.ranked(layer, x, h, routing, 3), eager.predict(layer, x, h, routing)
                        assert fast.ranked(layer, x, h, routing, 2) is None and eager.ranked(layer, x, h, routing, 3) is None
                    assert list(got) == list(want) == [t for t in (1, 2) if t > layer][:depth]
                    for t, ranked in got.items():
                        assert_ranked(ranked, want[t], 3)
                for predictor in (fast, eager):  # what the next token's heads take as context
                    for t in (1, 2):
                        predictor.routed(t, torch.randn(rows, spec.hidden_size, generator=torch.Generator().manual_seed(t)))
        assert len(runs) == 8  # both layers' guesses, at both positions, for one row and two, ran compiled


def test_compiled_next_token_head_is_the_eager_head(tmp_path, library_dir):
    """The estimators' next-token head, compiled: one call ranks each row's eager best experts for
    the next token's first MoE layer, from the last one's router inputs and, as context, the
    router inputs this token had at the first; for another width, no ranking."""
    save_model("mixtral", tmp_path, experts=8, top_k=2, num_hidden_layers=3)
    llm = LLM(tmp_path)
    est = random_estimators(llm, 1, 16, next_token=True)
    fast, eager = EstimatorPredictor(est), EstimatorPredictor(est)
    fast.compile(library_dir, 3)
    runs = count_runs(fast.compiled_next)
    for rows in (1, 2):
        h, own = (torch.randn(rows, llm.spec.hidden_size) for _ in range(2))
        for predictor in (fast, eager):
            predictor.routed(0, own)
        with torch.inference_mode():
            got, want = fast.next_token_ranked(h, 3), eager.next_token_scores(h)
            assert fast.next_token_ranked(h, 2) is None and eager.next_token_ranked(h, 3) is None
        torch.testing.assert_close(want, est.heads["2_0"](h, own), rtol=0, atol=1e-4)
        assert_ranked(got, want, 3)
    assert len(runs) == 2


def test_offloaded_estimator_run_stays_exact_and_runs_its_library(tmp_path, library_dir):
    """Prefetching by estimators with compile=True: one prompt's tokens are the resident eager
    run's, and every decode step's guesses are ranked by the estimators' libraries."""
    save_model("mixtral", tmp_path, experts=8, top_k=2)
    kw = dict(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    expected = LLM(tmp_path).generate([PROMPTS[1]], **kw)[0].token_ids
    random_estimators(LLM(tmp_path), 1, 16).save(tmp_path / ESTIMATOR_FILE)
    llm = LLM(tmp_path, compile=True, expert_cache="25%", prefetch="estimator")
    predictor, ranked = llm.speculation.predictor, []
    rank = predictor.ranked
    predictor.ranked = lambda *args: ranked.append(rank(*args)) or ranked[-1]
    assert llm.generate([PROMPTS[1]], **kw)[0].token_ids == expected
    got = [r for r in ranked if r is not None]  # None at the last layer: nothing to guess there
    assert len(got) == 11 * (llm.spec.num_layers - 1) and all(len(ids) == 1 and len(ids[0]) == 2
                                                              for r in got for ids, _ in r.values())


def test_compiled_next_token_guess_is_the_eager_guess(tmp_path, library_dir):
    """With compile=True the next-token guess at the last MoE layer is one compiled call that ranks
    it: each row's eager best experts and their probabilities; and the eager guess is what it
    says, the first MoE layer's norm and router on the embedding of the logit lens's token."""
    save_model("qwen2_moe", tmp_path, experts=8, top_k=2, num_hidden_layers=3, tie_word_embeddings=True)
    model = LLM(tmp_path).model
    fast, eager = NextTokenGuess(model), NextTokenGuess(model)
    fast.compile(library_dir, 3)
    runs = count_runs(fast.compiled)
    for rows in (1, 1, 4):
        residual = torch.randn(rows, model.spec.hidden_size, generator=torch.Generator().manual_seed(rows))
        router_input = model.layers[fast.last].post_attention_layernorm(residual)  # the lens does not read it
        with torch.inference_mode():
            got = fast.ranked(residual, router_input, 3)
            want = eager.predict(residual, router_input)
            assert fast.ranked(residual, router_input, 2) is None and eager.ranked(residual, router_input, 3) is None
            token = model.logits(model.norm(residual)).argmax(dim=-1)
            direct = model.layers[fast.first].router_logits(model.embed_tokens(token))
        torch.testing.assert_close(want, direct, rtol=0, atol=1e-5)
        assert_ranked(got, want, 3)
    assert len(runs) == 3


def assert_ranked(ranked: tuple[list[list[int]], list[list[float]]], scores: torch.Tensor, width: int) -> None:
    """A compiled guess's ranking (each row's ids and probabilities) is the eager scores' [N, E]."""
    ids, probs = ranked
    best = torch.softmax(scores, dim=-1).topk(width)
    assert ids == best.indices.tolist()
    assert max(abs(a - b) for got, want in zip(probs, best.values.tolist()) for a, b in zip(got, want)) <= 1e-5


class _Counted:
    """A compiled library that counts its runs."""

    def __init__(self, library, runs: list[int]):
        self.library, self.runs = library, runs

    def run(self, inputs):
        self.runs.append(1)
        return self.library.run(inputs)


def count_runs(libraries: GuessLibraries) -> list[int]:
    """A list that grows by one for each run of any of `libraries`' compiled guesses."""
    runs: list[int] = []
    for layer, (library, tables) in libraries.layers.items():
        libraries.layers[layer] = (_Counted(library, runs), tables)
    return runs


def test_a_compiled_library_is_loaded_not_compiled_again(tmp_path, monkeypatch, capsys):
    """The first load compiles (and says so on stderr, with progress on); the next finds the
    library, loaded once per process: another model, or a policy set again, shares it."""
    save_model("mixtral", tmp_path, experts=8, top_k=2, hidden_size=40)  # a shape no other test compiled
    monkeypatch.setenv("MOESPEC_CACHE", str(tmp_path / "libraries"))
    LLM(tmp_path, compile=True, progress=True, prefetch="lookahead")
    err = capsys.readouterr().err
    assert "compiling decode layers, kind 1 of 1" in err and "compiling the one-row decode step" in err
    libraries = tmp_path / "libraries" / "compiled"
    assert any(libraries.glob("layer-*.pt2")) and any(libraries.glob("step-*.pt2"))
    assert any(libraries.glob("guess-*.pt2")) and not any(libraries.glob("*.tmp.pt2"))

    def refuse(*args, **kwargs):
        raise AssertionError("compiled again")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", refuse)
    loads = []
    load = torch._inductor.aoti_load_package
    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda *a, **k: loads.append(a) or load(*a, **k))
    llm = LLM(tmp_path, compile=True, progress=True, prefetch="lookahead")
    llm.set_policy(prefetch="lookahead")
    assert "compiling" not in capsys.readouterr().err and loads == []
    # a library compiled from other model code (another moespec) is not the one looked for
    name = compiled.layer_library(llm.model, 0)
    monkeypatch.setattr(compiled, "source_digest", lambda: "other code")
    assert compiled.layer_library(llm.model, 0) != name


def test_a_failed_compile_is_one_line(tmp_path, monkeypatch):
    save_model("mixtral", tmp_path, experts=8, top_k=2)
    monkeypatch.setenv("MOESPEC_CACHE", str(tmp_path / "empty"))

    def fail(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in ['g++']\n(a long traceback)")
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    with pytest.raises(MoespecError) as err:
        LLM(tmp_path, compile=True)
    message = str(err.value)
    assert "\n" not in message and "No working C++ compiler found" in message and "compile=False" in message


def test_compile_must_be_a_bool():
    with pytest.raises(MoespecError, match="compile must be True or False, got 'yes'"):
        LLM(compile="yes")
