"""Pre-quantized compressed-tensors `pack-quantized` checkpoints (GPTQ / AWQ W4A16 and W8A16 as
llm-compressor writes them). The checkpoint is written by compressed-tensors' own compressor
and its reference weights decompressed by it, so the packed layout is checked against an
independent implementation; moespec must give transformers' logits on those weights."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors import safe_open
from safetensors.torch import save_file

from moespec import LLM, MoespecError
from moespec.experts.quant import Int4, Int8
from test_parity import PROMPTS, reference_greedy
from tiny import save_model

QUANTIZED = ("experts.", "self_attn.", "shared_expert.")  # Linear weights quantized (not routers, embeddings, lm_head)
CASES = {
    "mixtral-w4a16-sym-g16-bf16": ("mixtral", dict(num_bits=4, symmetric=True, strategy="group", group_size=16), torch.bfloat16),
    "qwen2moe-w4a16-asym-g8": ("qwen2_moe", dict(num_bits=4, symmetric=False, strategy="group", group_size=8), torch.float16),
    "qwen3moe-w8a16-channel": ("qwen3_moe", dict(num_bits=8, symmetric=True, strategy="channel"), torch.bfloat16),
}


def quantize(weight: torch.Tensor, args: QuantizationArgs, scale_dtype: torch.dtype) -> tuple[dict, torch.Tensor]:
    """One Linear weight -> (its pack-quantized tensors, the weight they decompress to in float32),
    both by compressed-tensors."""
    rows, cols = weight.shape
    group = args.group_size if args.strategy == "group" else cols
    g = weight.view(rows, cols // group, group)
    scale, zero = calculate_qparams(g.amin(-1), g.amax(-1), args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": weight, "weight_scale": scale.to(scale_dtype), "weight_zero_point": zero}
    packed = PackedQuantizationCompressor.compress(state, scheme)
    exact = {**packed, "weight_scale": packed["weight_scale"].float()}  # reference math in float32
    return packed, PackedQuantizationCompressor.decompress(exact, scheme)["weight"].float()


def write_pack_quantized(arch: str, args: dict, scale_dtype: torch.dtype, out: Path, reference: Path,
                         extra: dict | None = None, **model_kw):
    """A tiny random `arch` model written to `out` with its Linear weights pack-quantized (and a
    quantization_config as compressed-tensors serializes it), and to `reference` as an ordinary
    checkpoint of the decompressed weights; returns transformers' model loaded from `reference`."""
    save_model(arch, out, **model_kw)
    weights_args = QuantizationArgs(**args)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys()}
    packed_state, dense_state = {}, {}
    for name, t in state.items():
        if name.endswith(".weight") and t.dim() == 2 and any(q in name for q in QUANTIZED):  # Linear, not norms
            packed, dense_state[name] = quantize(t, weights_args, scale_dtype)
            packed_state.update({name.removesuffix("weight") + k: v.contiguous() for k, v in packed.items()})
        else:
            packed_state[name] = dense_state[name] = t
    save_file(packed_state, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    reference.mkdir(exist_ok=True)
    (reference / "config.json").write_text(json.dumps(config))
    save_file(dense_state, reference / "model.safetensors", metadata={"format": "pt"})
    quant = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights_args)},
                               format="pack-quantized", quantization_status="compressed",
                               ignore=["lm_head", "re:.*mlp.gate$"]).to_dict()
    config["quantization_config"] = {**quant, "quant_method": "compressed-tensors", **(extra or {})}
    (out / "config.json").write_text(json.dumps(config))
    return transformers.AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, args, scale_dtype = CASES[request.param]
    d = tmp_path_factory.mktemp(request.param)
    ref = write_pack_quantized(arch, args, scale_dtype, d / "packed", d / "reference", experts=8, top_k=2)
    return d / "packed", ref, args


def test_logits_and_greedy_tokens_match_transformers_on_the_decompressed_weights(case):
    model_dir, ref, _ = case
    ids = torch.randint(3, 128, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
    expected_tokens = [reference_greedy(ref, p, 16) for p in PROMPTS]
    # 5 of 16 slots (a share is of the experts' compute-dtype bytes, which int4 fits whole); the disk tier
    # reads the packed tensors with O_DIRECT
    for options in (dict(expert_cache="100%"), dict(expert_cache=5),
                    dict(expert_cache=5, expert_tier="disk", host_cache=4, direct_io=True)):
        llm = LLM(model_dir, **options)
        assert (llm.score(ids) - expected).abs().max() <= 1e-4, options
        out = llm.generate(PROMPTS, max_new_tokens=16, temperature=0.0, ignore_eos=True)
        assert [o.token_ids for o in out] == expected_tokens, options
    assert llm.stats().experts.misses > 0  # really offloaded


def test_experts_stay_packed_and_the_budget_counts_packed_bytes(case):
    model_dir, _, args = case
    llm = LLM(model_dir, expert_cache="30%")
    spec, store = llm.spec, llm.store
    assert isinstance(store.format, Int4 if args["num_bits"] == 4 else Int8)
    with safe_open(model_dir / "model.safetensors", framework="pt") as f:
        p = next(n for n in f.keys() if ".experts.0." in n).rsplit(".experts.0.", 1)[0] + ".experts.0."
        stored = {n: f.get_tensor(n) for n in f.keys() if n.startswith(p)}
    packed = sum(t.numel() * t.element_size() for n, t in stored.items() if n.endswith(("_packed", "_scale")))
    offsets = 0 if args["num_bits"] == 8 else sum(  # an int4 group's offset: the scale's dtype, float32 if asymmetric
        t.numel() * (t.element_size() if args["symmetric"] else 4) for n, t in stored.items() if n.endswith("_scale"))
    assert store.expert_bytes == packed + offsets
    assert store.expert_bytes < spec.expert_params * 2  # smaller than bf16 even with these tiny groups
    assert llm.experts.capacity == min(len(store.keys), int(0.3 * len(store.keys) * store.dense_bytes // store.expert_bytes))
    llm = LLM(model_dir, expert_cache=5)
    llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    stats = llm.stats()
    assert stats.experts.bytes_moved == stats.experts.misses * store.expert_bytes > 0


def test_dense_weights_are_dequantized_at_load(case):
    model_dir, ref, _ = case
    llm = LLM(model_dir)
    q = dict(llm.model.named_parameters())["layers.0.self_attn.q_proj.weight"]
    assert torch.equal(q, ref.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("args,extra,message", [
    (dict(num_bits=4, symmetric=True, strategy="group", group_size=16), dict(quant_method="gptq"),
     r"quantization_config.quant_method 'gptq' is not supported \(supported: fp8, mxfp4, compressed-tensors\)"),
    (dict(num_bits=4, symmetric=True, strategy="group", group_size=16), dict(format="float-quantized"),
     r"quantization_config.format 'float-quantized' is not supported"),
    (dict(num_bits=2, symmetric=True, strategy="group", group_size=16), None,
     r"quantization_config.config_groups.group_0.weights.num_bits 2 is not supported \(only 4 or 8\)"),
    (dict(num_bits=8, symmetric=False, strategy="channel"), None,
     r"config_groups.group_0.weights.symmetric False is not supported \(8-bit weights must be symmetric\)"),
])
def test_unsupported_quantization_is_a_one_line_error(tmp_path, args, extra, message):
    write_pack_quantized("mixtral", args, torch.bfloat16, tmp_path / "packed", tmp_path / "reference", extra=extra)
    with pytest.raises(MoespecError, match=message):
        LLM(tmp_path / "packed")


EXPERT = "model.layers.0.block_sparse_moe.experts.1.w1.weight"


@pytest.mark.parametrize("edit,message", [
    (lambda state: state.update({EXPERT + "_g_idx": torch.arange(32, dtype=torch.int32) % 2}),  # interleaved groups
     rf"{EXPERT}_g_idx: activation-order groups .* are not supported"),
    (lambda state: state.pop(EXPERT + "_scale"), rf"pack-quantized weight {EXPERT}_packed has no {EXPERT}_scale"),
    (lambda state: state.update({EXPERT + "_scale": state[EXPERT + "_scale"][:, :1].repeat(1, 3)}),
     rf"{EXPERT}_packed \[48, 4\] \(torch.int32\) with scales \[48, 3\] does not hold a \[48, 32\] weight"),
], ids=["g_idx", "missing-scale", "scale-shape"])
def test_bad_packed_tensors_are_one_line_errors(tmp_path, edit, message):
    write_pack_quantized("mixtral", dict(num_bits=4, symmetric=True, strategy="group", group_size=16),
                         torch.bfloat16, tmp_path / "packed", tmp_path / "reference")
    path = tmp_path / "packed" / "model.safetensors"
    with safe_open(path, framework="pt") as f:
        state = {n: f.get_tensor(n) for n in f.keys()}
    edit(state)
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(MoespecError, match=message):
        LLM(tmp_path / "packed").generate(PROMPTS, max_new_tokens=2)
