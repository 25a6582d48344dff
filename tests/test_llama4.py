"""Llama-4 text models (llama4_text): moespec's forward pass against transformers' Llama4ForCausalLM.

What the tiny configs exercise: the input-scaled sigmoid router with top-1 and top-2, the shared
expert, MoE and dense layers interleaved (interleave_moe_layer_step and an explicit moe_layers),
NoPE layers with query temperature, chunked attention with chunks shorter than the prompts, the
weightless q/k norm, llama3 rope scaling, attention biases, tied embeddings.
"""

import json

import pytest
import torch
import transformers

from moespec import LLM, MoespecError
from moespec.parallel import Job, launch, run_jobs, skewed_batches
from moespec.spec import load_spec, spec_from_config
from moespec.speculate.estimators import fit
from moespec.speculate.traces import RouteRecorder
from test_parity import PROMPTS
from tiny import logit_gap

LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)
BASE = dict(vocab_size=128, max_position_embeddings=256, initializer_range=0.15, eos_token_id=2, bos_token_id=1,
            pad_token_id=0)
CASES = {
    # dense layers 0, 2 and MoE layers 1, 3; layer 2 NoPE; chunks of 5 tokens; temperature steps every 3 positions
    "interleaved-top1-chunk5": dict(hidden_size=36, intermediate_size=20, intermediate_size_mlp=44, num_hidden_layers=4,
                                    num_attention_heads=3, num_key_value_heads=1, head_dim=10, num_local_experts=5,
                                    num_experts_per_tok=1, interleave_moe_layer_step=2, no_rope_layers=[1, 1, 0, 1],
                                    attention_chunk_size=5, floor_scale=3, attn_scale=0.3, rope_parameters=LLAMA3_ROPE),
    # explicit moe_layers; NoPE first layer without temperature; no q/k norm; q/k/v/o biases
    "moe_layers-top2-bias": dict(hidden_size=28, intermediate_size=18, intermediate_size_mlp=30, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=6, num_local_experts=6,
                                 num_experts_per_tok=2, moe_layers=[0, 2], no_rope_layers=[0, 1, 1],
                                 attention_chunk_size=7, use_qk_norm=False, attn_temperature_tuning=False,
                                 attention_bias=True),
    # every layer MoE; every 2nd layer NoPE (the interval rule); full attention everywhere; tied embeddings
    "all-moe-top2-full": dict(hidden_size=20, intermediate_size=14, intermediate_size_mlp=16, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=2, head_dim=12, num_local_experts=7,
                              num_experts_per_tok=2, no_rope_layer_interval=2, attention_chunk_size=None,
                              floor_scale=4, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
}


def save_llama4(out, seed: int = 0, **kw) -> transformers.Llama4ForCausalLM:
    """A random Llama4ForCausalLM saved to `out`, returned (eager attention, eval mode) for reference runs."""
    torch.manual_seed(seed)
    config = transformers.Llama4TextConfig(**{**BASE, **kw})
    config._attn_implementation = "eager"
    model = transformers.Llama4ForCausalLM(config).eval()
    with torch.no_grad():  # transformers starts biases at 0 and norms at 1, which would hide a misplaced one
        for name, param in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn(param.shape) * 0.3)
    model.save_pretrained(out)
    return model


def reference_greedy(ref: transformers.Llama4ForCausalLM, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """transformers' greedy continuations, EOS not special: the prompts right-padded in one batch,
    recomputed in full each step. Causal attention keeps a row's real tokens from seeing the
    padding after them, and their positions are the unpadded ones, so no attention mask is needed."""
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths) + steps, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = torch.tensor(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(ids[:, :max(lengths)]).logits
            for row, n in enumerate(lengths):
                ids[row, n] = logits[row, n - 1].argmax()
                lengths[row] += 1
    return [ids[row, len(p):n].tolist() for row, (p, n) in enumerate(zip(prompts, lengths))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint dir, transformers' model, its greedy continuations of PROMPTS), each built once."""
    built = {}

    def get(name: str):
        if name not in built:
            d = tmp_path_factory.mktemp(name)
            ref = save_llama4(d, **CASES[name])
            built[name] = d, ref, reference_greedy(ref, PROMPTS, 32)
        return built[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(models, name):
    d, ref, _ = models(name)
    assert logit_gap(ref, LLM(d)) <= 1e-4


def test_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """Meta's Llama-4 releases are Llama4ForConditionalGeneration: its text model (under
    `language_model.`) matches transformers' forward on text, the vision tower is not read."""
    torch.manual_seed(0)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    config = transformers.Llama4Config(text_config={**BASE, **CASES["interleaved-top1-chunk5"]}, vision_config=vision)
    config.text_config._attn_implementation = "eager"
    model = transformers.Llama4ForConditionalGeneration(config).eval()
    model.save_pretrained(tmp_path)
    ref = model.language_model  # its own forward on text (5.24's multimodal forward fails without images)
    llm = LLM(tmp_path, expert_cache="30%")
    assert llm.spec.weights_prefix == "language_model." and logit_gap(ref, llm) <= 1e-4
    want = reference_greedy(ref, PROMPTS, 8)
    assert [o.token_ids for o in llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)] == want


@pytest.mark.parametrize("budget", ["100%", "30%"])
@pytest.mark.parametrize("name", list(CASES))
def test_greedy_ragged_batch_matches_reference(models, name, budget):
    d, _, expected = models(name)
    llm = LLM(d, expert_cache=budget)
    outs = llm.generate(PROMPTS, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert [out.token_ids for out in outs] == expected
    if budget != "100%":
        assert llm.stats().as_dict()["misses"] > 0  # experts really came over the link
    llm.close()


SELF_SPEC = dict(speculative="self", gamma=3, draft_experts=2)


@pytest.mark.parametrize("engine,decode", [(dict(expert_cache="30%", prefetch="lookahead"), {}),
                                           (dict(expert_cache="50%"), SELF_SPEC)], ids=["lookahead", "self"])
def test_prefetch_and_self_speculation_keep_the_reference_tokens(models, engine, decode):
    d, _, expected = models("interleaved-top1-chunk5")
    llm = LLM(d, **engine)
    outs = llm.generate(PROMPTS, max_new_tokens=16, temperature=0.0, ignore_eos=True, **decode)
    assert [out.token_ids for out in outs] == [tokens[:16] for tokens in expected]  # greedy: a prefix
    stats = llm.stats().as_dict()
    if decode:
        assert stats["speculative_decoding"]["accepted"] > 0
    else:
        assert stats["prefetch_hits"] > 0
    llm.close()


def test_fitted_estimators_prefetch_and_keep_the_reference_tokens(models, tmp_path):
    d, _, expected = models("all-moe-top2-full")
    llm = LLM(d)
    recorder = RouteRecorder(llm.model, True)
    llm.model.hooks.append(recorder)
    llm.score(torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(6)))
    estimators, _ = fit(llm.model, recorder.trace(), depth=2, mlp=16, steps=30)
    estimators.save(tmp_path / "estimators.safetensors")
    llm = LLM(d, expert_cache="30%", prefetch="estimator", estimator=tmp_path / "estimators.safetensors")
    outs = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [out.token_ids for out in outs] == [tokens[:16] for tokens in expected]
    assert llm.stats().as_dict()["prefetch_hits"] > 0
    llm.close()


def test_disk_tier_reads_the_fused_experts_alone(models):
    """Direct (O_DIRECT) reads slice one expert out of the fused [E, H, 2I] tensors, transposed as in RAM."""
    d, _, _ = models("moe_layers-top2-bias")
    ids = torch.tensor([PROMPTS[2]])
    exact = LLM(d).score(ids)
    llm = LLM(d, expert_cache="30%", expert_tier="disk", host_cache=0, direct_io=True)
    assert torch.equal(llm.score(ids), exact)
    llm.close()


@pytest.mark.parametrize("case", list(CASES))
def test_spec_follows_transformers_layer_rules(case):
    """The layers transformers makes MoE, NoPE and chunked are the spec's, from a config.json that
    names them and from one that leaves them to the defaults."""
    config = transformers.Llama4TextConfig(**{**BASE, **CASES[case]})
    saved = config.to_dict()
    derived = {"moe_layers", "no_rope_layers", "layer_types"} - set(CASES[case])
    bare = {k: v for k, v in saved.items() if k not in derived}
    for cfg in (saved, bare):
        spec = spec_from_config(cfg)
        assert spec.moe_layer_ids == list(config.moe_layers)
        assert spec.nope_layers == tuple(i for i, rope in enumerate(config.no_rope_layers) if not rope)
        assert spec.chunked_layers == tuple(i for i, t in enumerate(config.layer_types) if t == "chunked_attention")
        assert spec.rope.interleave and spec.router == "sigmoid_topk_input" and spec.router_scales_input


def _config(tmp_path, **changes) -> None:
    cfg = transformers.Llama4TextConfig(**{**BASE, **CASES["interleaved-top1-chunk5"]}).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.mark.parametrize("changes,message", [
    (dict(model_type="llama4", text_config=None), "config.json for llama4 has no text_config object"),
    (dict(layer_types=["sliding_attention"] * 4), "layer_types value 'sliding_attention' is not supported"),
    (dict(layer_types=["chunked_attention"] * 4, attention_chunk_size=None), "attention_chunk_size is None"),
    (dict(moe_layers=[1, 4]), "moe_layers names layer 4, but the model has 4 layers"),
    (dict(no_rope_layers=[1, 0]), "no_rope_layers has 2 entries, but the model has 4 layers"),
    (dict(rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0)), "rope_type 'dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
])
def test_what_is_not_supported_is_a_one_line_error(tmp_path, changes, message):
    _config(tmp_path, **changes)
    with pytest.raises(MoespecError, match=message) as e:
        load_spec(tmp_path)
    assert "\n" not in str(e.value)


def test_two_gloo_workers_match_single_process(tmp_path):
    """Expert parallelism sends the router-scaled inputs to the experts' workers (Llama-4 weighs
    inputs, not outputs); replicated or not, the logits are the single-process ones."""
    save_llama4(tmp_path, **CASES["interleaved-top1-chunk5"])
    batches = skewed_batches(128, 2, 4, 9, topics=2, seed=0)
    jobs = [Job(str(tmp_path), batches, dict(policy=p, slots=4)) for p in ("none", "predictive")]
    ranks = launch(run_jobs, 2, jobs)
    llm = LLM(tmp_path)
    for j in range(len(jobs)):
        for i, batch in enumerate(batches):
            got = torch.cat([ranks[0][j]["logits"][i], ranks[1][j]["logits"][i]])
            assert (got - llm.score(batch.tokens)).abs().max().item() <= 1e-5
    assert sum(m["moved_experts"] for m in ranks[0][1]["metrics"]) > 0  # "predictive" really replicated
