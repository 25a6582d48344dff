"""DeepSeek-V2/V3 (MLA), GLM-4.5 and DeepSeek's FP8 block-quantized checkpoints against transformers."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

from moespec import LLM
from moespec.errors import MoespecError
from moespec.spec import spec_from_config
from test_parity import PROMPTS, reference_greedy
from tiny import ARCHS, logit_gap, make_config

YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=10000.0)
CASES = [
    # groups, a dense first layer, q_lora, interleaved rope
    ("deepseek_v3", dict(experts=8, top_k=2, n_group=2, topk_group=1, num_hidden_layers=3, first_k_dense_replace=1)),
    # plain q_proj, rotate-half rope, YaRN with both mscales, biases, its own latent-norm eps, no renormalisation
    ("deepseek_v3", dict(experts=8, top_k=3, n_group=1, topk_group=1, first_k_dense_replace=0, q_lora_rank=None,
                         rope_interleave=False, rms_norm_eps=1e-5, attention_bias=True, norm_topk_prob=False,
                         rope_parameters=dict(YARN, mscale=0.8, mscale_all_dim=0.7))),
    # odd sizes everywhere, three groups, two shared experts; a large rms_norm_eps the latent norms must not use
    ("deepseek_v3", dict(experts=12, top_k=4, n_group=3, topk_group=2, first_k_dense_replace=1, num_hidden_layers=3,
                         hidden_size=40,
                         num_attention_heads=5, num_key_value_heads=5, intermediate_size=44, moe_intermediate_size=20,
                         n_shared_experts=2, kv_lora_rank=20, q_lora_rank=18, qk_nope_head_dim=7,
                         qk_rope_head_dim=6, v_head_dim=9, routed_scaling_factor=1.7, rms_norm_eps=0.05)),
    ("deepseek_v2", dict(experts=8, top_k=2, n_group=4, topk_group=2, topk_method="group_limited_greedy",
                         routed_scaling_factor=1.5, num_hidden_layers=3, first_k_dense_replace=1)),
    # V2-Lite: no q_lora, greedy, YaRN
    ("deepseek_v2", dict(experts=6, top_k=2, q_lora_rank=None, n_shared_experts=2,
                         rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    ("deepseek_v2", dict(experts=9, top_k=3, n_group=3, topk_group=1, topk_method="group_limited_greedy",
                         hidden_size=40, num_attention_heads=5, num_key_value_heads=5, kv_lora_rank=14, q_lora_rank=11,
                         qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=7, attention_bias=True)),
    ("glm4_moe", dict(experts=8, top_k=2, n_group=2, topk_group=1, first_k_dense_replace=1, num_hidden_layers=3,
                      use_qk_norm=True, attention_bias=True)),
    ("glm4_moe", dict(experts=8, top_k=2, head_dim=12, first_k_dense_replace=0, norm_topk_prob=False,
                      routed_scaling_factor=2.0, rope_parameters=dict(YARN, partial_rotary_factor=0.5))),
    ("glm4_moe", dict(experts=12, top_k=3, n_group=4, topk_group=2, num_key_value_heads=1, n_shared_experts=2,
                      moe_intermediate_size=20, use_qk_norm=True,
                      rope_parameters=dict(rope_type="default", rope_theta=500.0, partial_rotary_factor=0.75))),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: starting threads costs more than they save, and far more on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save(arch: str, out: Path, seed: int = 0, **config_kw):
    """A random transformers model saved to `out`, with its norms, biases and router correction
    biases moved off their initial ones and zeros, so a misplaced one shows."""
    torch.manual_seed(seed)
    model = ARCHS[arch][1](make_config(arch, **config_kw)).eval()
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if "norm" in name or "bias" in name:
                t.add_(torch.randn_like(t) * 0.2)
    model.save_pretrained(out)
    return model


def case_id(case):
    arch, kw = case
    return arch + "-" + "-".join(f"{k}={v}" for k, v in kw.items() if k != "rope_parameters") \
        + ("-" + kw["rope_parameters"]["rope_type"] if "rope_parameters" in kw else "")


@pytest.fixture(scope="module", params=CASES, ids=[case_id(c) for c in CASES])
def built(request, tmp_path_factory):
    arch, kw = request.param
    path = tmp_path_factory.mktemp(arch)
    ref = save(arch, path, **kw)
    return ref, path, [reference_greedy(ref, p, 32) for p in PROMPTS]


def test_logits_match_reference(built):
    ref, path, _ = built
    assert logit_gap(ref, LLM(path)) <= 1e-4


@pytest.mark.parametrize("budget", ["100%", "30%"])
def test_greedy_batch_matches_reference(built, budget):
    _, path, expected = built
    outs = LLM(path, expert_cache=budget).generate(PROMPTS, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in outs] == expected


def test_router_stays_float32_in_half_precision(built):
    """DeepSeek's routers choose in float32 from float32 parameters, as the reference keeps them."""
    _, path, _ = built
    llm = LLM(path, dtype="bfloat16")
    gates = [block.mlp.gate for block in llm.model.layers if hasattr(block.mlp, "gate")]
    assert gates and all(g.weight.dtype == torch.float32 for g in gates)
    assert all(g.e_score_correction_bias is None or g.e_score_correction_bias.dtype == torch.float32 for g in gates)
    assert llm.model.layers[-1].self_attn.o_proj.weight.dtype == torch.bfloat16
    assert llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)[0].token_ids


def test_mla_cache_holds_the_latent_and_the_shared_rotary_key(built):
    _, path, _ = built
    llm = LLM(path)
    cache = llm.engine.new_cache(2, 8)
    s = llm.spec
    if s.attention == "mla":
        assert cache.k.shape == (s.num_layers, 2, 8, 1, s.kv_lora_rank)
        assert cache.v.shape == (s.num_layers, 2, 8, 1, s.rope.dim)
    else:
        assert cache.k.shape == cache.v.shape == (s.num_layers, 2, 8, s.num_kv_heads, s.head_dim)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[8]], ids=["deepseek_v3", "deepseek_v2", "glm4_moe"])
def test_lookahead_prefetch_is_token_identical(tmp_path, case):
    arch, kw = case
    save(arch, tmp_path, **kw)
    plain = LLM(tmp_path).generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    llm = LLM(tmp_path, expert_cache="30%", prefetch="lookahead")
    got = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert llm.stats().experts.prefetches > 0


def test_self_speculative_greedy_is_plain_greedy(tmp_path):
    arch, kw = CASES[0]
    save(arch, tmp_path, **kw)
    plain = LLM(tmp_path, expert_cache="50%").generate(PROMPTS, max_new_tokens=20, ignore_eos=True)
    llm = LLM(tmp_path, expert_cache="50%")
    got = llm.generate(PROMPTS, max_new_tokens=20, ignore_eos=True, speculative="self", gamma=3, draft_experts=2)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain]
    assert llm.stats().as_dict()["speculative_decoding"]["steps"] > 0


# --- FP8 block-quantized checkpoints (DeepSeek-V3's own format) ---

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
BLOCK = (16, 8)  # not square, and most tiny weights end in a partial block
FP8_CASE = dict(experts=8, top_k=2, n_group=2, topk_group=1, num_hidden_layers=3, first_k_dense_replace=1,
                attention_bias=True)
FP8_SLOTS = 5  # about 30% of FP8_CASE's 16 experts, as a slot count: a share budget is of the experts'
# compute-dtype size, which FP8 experts would fit whole
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "bias")  # as in DeepSeek-V3's release


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bo), ceil(in/bi)]): each
    (partial) block scaled so its largest magnitude is FP8's largest."""
    rows, cols = w.shape
    grid = (-(-rows // block[0]), -(-cols // block[1]))
    padded = torch.zeros(grid[0] * block[0], grid[1] * block[1])
    padded[:rows, :cols] = w
    tiles = padded.view(grid[0], block[0], grid[1], block[1])
    scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale[:, None, :, None]).view_as(padded)[:rows, :cols].to(torch.float8_e4m3fn)
    return q.contiguous(), scale


def write_fp8(ref, out: Path, block=BLOCK) -> dict[str, torch.Tensor]:
    """Save `ref` as DeepSeek-V3 ships: linear weights FP8 with block scales, the rest float32, an
    MTP layer past num_hidden_layers; config.json with its quantization_config. Returns the
    tensors transformers' own FP8 dequantisation makes of the file."""
    ref.save_pretrained(out)
    tensors = load_file(out / "model.safetensors")
    stored, dequantized = {}, {}
    for name, t in tensors.items():
        if t.ndim == 2 and not any(part in name for part in NOT_QUANTIZED):
            q, scale = quantize(t, block)
            stored[name], stored[name + "_scale_inv"] = q, scale
            dequantized[name] = _dequantize_fp8_weight(q, scale, list(block), torch.float32)
        else:
            stored[name] = dequantized[name] = t
    n = ref.config.num_hidden_layers
    mtp = {k.replace(f"layers.{n - 1}.", f"layers.{n}."): v.clone() for k, v in stored.items() if f"layers.{n - 1}." in k}
    mtp[f"model.layers.{n}.eh_proj.weight"] = torch.randn(32, 64).to(torch.float8_e4m3fn)  # scales missing: unread
    save_file({**stored, **mtp}, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg))
    return dequantized


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8")
    ref = save("deepseek_v3", path, **FP8_CASE)
    dequantized = write_fp8(ref, path)
    dense_dir = tmp_path_factory.mktemp("dequantized")
    save_file(dequantized, dense_dir / "model.safetensors", metadata={"format": "pt"})
    ref.config.save_pretrained(dense_dir)
    ref = type(ref).from_pretrained(dense_dir).eval()  # transformers' loader on its own dequantisation
    return ref, path


def test_fp8_logits_and_greedy_match_transformers_dequantisation(fp8):
    ref, path = fp8
    llm = LLM(path)
    assert llm.store.format.name == "fp8"
    assert logit_gap(ref, llm) <= 1e-4
    want = [reference_greedy(ref, p, 32) for p in PROMPTS]
    for budget in ("100%", FP8_SLOTS):
        outs = LLM(path, expert_cache=budget).generate(PROMPTS, max_new_tokens=32, ignore_eos=True)
        assert [o.token_ids for o in outs] == want


def test_fp8_experts_cross_the_link_packed(fp8):
    _, path = fp8
    llm = LLM(path, expert_cache=FP8_SLOTS)
    llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    inter, hidden = 24, 32  # tiny's moe_intermediate_size and hidden_size
    grid = lambda rows, cols: -(-rows // BLOCK[0]) * -(-cols // BLOCK[1])  # noqa: E731
    packed = 3 * inter * hidden + 4 * (2 * grid(inter, hidden) + grid(hidden, inter))  # FP8 values, float32 scales
    s = llm.stats()
    assert s.expert_bytes == llm.store.expert_bytes == packed
    assert s.experts.misses > 0 and s.experts.bytes_moved == s.experts.misses * packed
    assert llm.store.packed((1, 0))["gate"].dtype == torch.float8_e4m3fn


def test_fp8_disk_tier_with_direct_io_reads_fp8(fp8):
    ref, path = fp8
    ids = torch.tensor([PROMPTS[0]])
    ram = LLM(path, expert_cache=FP8_SLOTS).score(ids)
    assert torch.equal(LLM(path, expert_cache=FP8_SLOTS, expert_tier="disk", direct_io=True).score(ids), ram)


def edit_checkpoint(src: Path, dst: Path, tensors=None, quant=None) -> Path:
    """A copy of checkpoint `src` with its tensors passed through `tensors` and its
    quantization_config updated with `quant`."""
    dst.mkdir()
    weights = load_file(src / "model.safetensors")
    save_file(tensors(weights) if tensors else weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"].update(quant or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


EXPERT = "model.layers.2.mlp.experts.5.down_proj.weight"
DENSE = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.mark.parametrize("change,message", [
    (dict(quant=dict(quant_method="awq")), "quant_method 'awq' is not supported"),
    (dict(quant=dict(weight_block_size=None)), "weight_block_size None is not supported"),
    (dict(tensors=lambda w: {k: v for k, v in w.items() if k != EXPERT + "_scale_inv"}),
     f"FP8 weight {EXPERT} has no scales"),
    (dict(tensors=lambda w: {**w, DENSE + "_scale_inv": w[DENSE + "_scale_inv"][:-1]}),
     f"{DENSE}_scale_inv has shape"),
], ids=["quant_method", "block_size", "missing_scale", "scale_shape"])
def test_fp8_errors_name_the_problem(fp8, tmp_path, change, message):
    _, path = fp8
    bad = edit_checkpoint(path, tmp_path / "bad", **change)
    with pytest.raises(MoespecError, match=message) as err:
        LLM(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value,message", [
    ("moe_layer_freq", 2, "moe_layer_freq=2 is not supported"),
    ("topk_method", "group_limited_greedy", "topk_method 'group_limited_greedy' is not supported"),
    ("scoring_func", "softmax", "scoring_func 'softmax' is not supported"),
    ("first_k_dense_replace", 5, "leaves no MoE layer"),
    ("n_group", 3, "do not split n_routed_experts=8"),
])
def test_refused_deepseek_v3_settings(field, value, message):
    cfg = make_config("deepseek_v3", experts=8, n_group=2, topk_group=1, first_k_dense_replace=1).to_dict()
    with pytest.raises(MoespecError, match=message):
        spec_from_config({**cfg, field: value})


def test_refused_deepseek_v2_settings():
    cfg = make_config("deepseek_v2", experts=8).to_dict()
    for field, value, message in [("topk_method", "noaux_tc", "topk_method 'noaux_tc'"),
                                  ("norm_topk_prob", True, "norm_topk_prob=true"), ("mlp_bias", True, "mlp_bias")]:
        with pytest.raises(MoespecError, match=message):
            spec_from_config({**cfg, field: value})


def test_kimi_k2_model_type_reads_as_deepseek_v3():
    cfg = make_config("deepseek_v3", experts=8, n_group=1, topk_group=1, first_k_dense_replace=1).to_dict()
    assert spec_from_config({**cfg, "model_type": "kimi_k2"}) == replace(spec_from_config(cfg), model_type="kimi_k2")
