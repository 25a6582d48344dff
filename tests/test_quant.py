"""Quantized experts (expert_dtype int8 / int4): error bounds, packed bytes everywhere, exactness
against the same dequantized weights, policies exact at the same dtype, the cache directory."""

import os
from pathlib import Path

import pytest
import torch

from moespec import LLM, MoespecError
from moespec.experts.base import ExpertWeights
from moespec.experts.quant import Int4, Int8, make_quantizer
from tiny import save_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
IDS = torch.arange(3, 43).reshape(2, 20)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2moe")
    return d, save_model("qwen2_moe", d, experts=8, top_k=2, num_hidden_layers=3)


@pytest.mark.parametrize("fmt", [Int8(32), Int8(16), Int4(32), Int4(8)], ids=lambda f: f"{f.name}-g{f.group}")
def test_dequantized_weights_are_within_half_a_step(fmt):
    gen = torch.Generator().manual_seed(0)
    w = ExpertWeights(torch.randn(48, 64, generator=gen), torch.randn(64, 32, generator=gen) * 3)
    packed = fmt.pack(w)
    back = fmt.unpack(packed, torch.float32)
    for name in ("gate_up", "down"):
        original = getattr(w, name)
        step = packed[f"{name}.scale"].float().repeat_interleave(fmt.group_for(original.shape[1]), dim=1)
        err = (getattr(back, name) - original).abs()
        assert bool((err <= step / 2 + 1e-3 * original.abs().max()).all())  # + float16 scales' rounding
        assert err.max() > 0  # it did quantize
    levels = 255 if fmt.name == "int8" else 16
    assert packed["gate_up.q"].numel() * packed["gate_up.q"].element_size() == 48 * 64 * (1 if levels == 255 else 0.5)


@pytest.mark.parametrize("fmt", [Int8(16), Int4(8)], ids=lambda f: f.name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_unpacking_into_a_slot_rounds_once_to_the_compute_dtype(fmt, dtype):
    """The hot path (unpack_into: in place for float32, one conversion otherwise) gives exactly
    the float32 dequantized weights rounded once, as the host-side unpack does."""
    gen = torch.Generator().manual_seed(1)
    packed = fmt.pack(ExpertWeights(torch.randn(48, 64, generator=gen), torch.randn(64, 32, generator=gen)))
    dst = ExpertWeights(torch.full((48, 64), float("nan"), dtype=dtype), torch.full((64, 32), float("nan"), dtype=dtype))
    fmt.unpack_into(packed, dst)
    exact = fmt.unpack(packed, torch.float32)
    for name in ("gate_up", "down"):
        assert torch.equal(getattr(dst, name), getattr(exact, name).to(dtype))


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_experts_match_transformers_on_the_same_dequantized_weights(model, tmp_path, dtype):
    """Packed experts unpacked on use give the logits transformers computes from the dequantized
    weights written as an ordinary checkpoint, resident and offloaded alike."""
    model_dir, ref = model
    llm = LLM(model_dir, expert_dtype=dtype)
    with torch.no_grad():
        for layer in llm.spec.moe_layer_ids:
            experts = ref.model.layers[layer].mlp.experts
            for e in range(llm.spec.num_experts):
                w = llm.store[(layer, e)]
                experts.gate_up_proj[e] = w.gate_up
                experts.down_proj[e] = w.down
        expected = ref(IDS).logits
    ref.save_pretrained(tmp_path)
    assert (llm.score(IDS) - expected).abs().max() <= 1e-4
    assert torch.equal(LLM(tmp_path).score(IDS), llm.score(IDS)) or \
        (LLM(tmp_path).score(IDS) - llm.score(IDS)).abs().max() <= 1e-5
    offloaded = LLM(model_dir, expert_dtype=dtype, expert_cache=3)
    assert (offloaded.score(IDS) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype,bits,ratio", [("int8", 8, 0.53), ("int4", 4, 0.30)])
def test_bytes_and_budget_count_packed_experts(model, dtype, bits, ratio):
    model_dir, _ = model
    dense = LLM(model_dir, expert_cache="25%")
    llm = LLM(model_dir, expert_dtype=dtype, expert_cache="25%")
    spec, fmt = llm.spec, llm.store.format
    per_group = 2 if dtype == "int8" else 4  # float16 scale (and offset)
    groups = 2 * spec.expert_intermediate_size * spec.hidden_size // fmt.group_for(spec.hidden_size) \
        + spec.hidden_size * spec.expert_intermediate_size // fmt.group_for(spec.expert_intermediate_size)
    assert llm.store.expert_bytes == spec.expert_params * bits // 8 + groups * per_group
    shipped = LLM("models/tiny-mixtral", expert_dtype=dtype, progress=False).store
    assert shipped.expert_bytes <= ratio * shipped.dense_bytes / 2  # of its experts at 16 bits
    assert llm.experts.capacity == min(len(llm.store.keys), int(0.25 * len(llm.store.keys) * llm.store.dense_bytes
                                                               // llm.store.expert_bytes))
    assert llm.experts.capacity > dense.experts.capacity
    small = LLM(model_dir, expert_dtype=dtype, expert_cache=4)
    small.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    stats = small.stats()
    moved = stats.experts.bytes_moved
    assert moved == (stats.experts.misses + stats.experts.prefetches - stats.experts.cancelled_prefetches) \
        * small.store.expert_bytes and stats.expert_bytes == small.store.expert_bytes


@pytest.mark.parametrize("options", [dict(expert_cache=4, prefetch="lookahead"),
                                     dict(expert_cache=4, prefetch="lookahead", lookahead_depth=2),
                                     dict(expert_cache="40%", speculative="self")])
def test_prefetch_and_self_speculation_stay_exact_at_the_same_dtype(model, options):
    model_dir, _ = model
    resident = LLM(model_dir, expert_dtype="int4").generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    got = LLM(model_dir, expert_dtype="int4", **options).generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in resident]


def test_the_next_load_reads_the_quantized_cache(model, monkeypatch):
    model_dir, _ = model
    first = LLM(model_dir, expert_dtype="int4", expert_group_size=4).score(IDS)
    root = Path(os.environ["MOESPEC_CACHE"]) / "quantized"
    assert any((d / "done").is_file() for d in root.iterdir())

    def no_quantizing(self, w):
        raise AssertionError("quantized again")

    monkeypatch.setattr(Int4, "quantize", no_quantizing)
    assert torch.equal(LLM(model_dir, expert_dtype="int4", expert_group_size=4).score(IDS), first)


def test_bad_quantization_options_are_one_line_errors(model):
    model_dir, _ = model
    with pytest.raises(MoespecError, match="expert_dtype must be one of auto, int8, int4, got 'int3'"):
        LLM(model_dir, expert_dtype="int3")
    with pytest.raises(MoespecError, match=r"expert_group_size=12 does not divide the hidden_size \(32\)"):
        LLM(model_dir, expert_dtype="int4", expert_group_size=12)
    with pytest.raises(MoespecError, match="expert_group_size must be even"):
        LLM(model_dir, expert_dtype="int4", expert_group_size=7)
    fmt = make_quantizer("int8", 0, LLM(model_dir).spec)
    assert (fmt.group_for(32), fmt.group_for(24), fmt.group_for(192), fmt.group_for(48)) == (32, 24, 96, 48)
