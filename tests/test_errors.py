"""Bad input gets one clear MoespecError naming the problem, from the API and from the CLI."""

import json
import re
import shutil

import pytest
import torch

from moespec import LLM, MoespecError
from moespec.cli import main
from tiny import save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    save_model("mixtral", d, max_position_embeddings=16)
    return d


def test_missing_directory(tmp_path):
    with pytest.raises(MoespecError, match="model directory not found"):
        LLM(tmp_path / "nope")


def test_missing_config(tmp_path):
    with pytest.raises(MoespecError, match="config.json not found"):
        LLM(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(MoespecError, match="unsupported architecture 'llama'.*mixtral, qwen2_moe, qwen3_moe, olmoe"):
        LLM(tmp_path)


def test_missing_weights_file(tmp_path, model_dir):
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(MoespecError, match="no safetensors weights"):
        LLM(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_model("olmoe", tmp_path, experts=4, top_k=2)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MoespecError, match="missing 1 tensor.*layers.1.mlp.experts.3.up_proj"):
        LLM(tmp_path)


def test_missing_shard_file(tmp_path):
    save_model("mixtral", tmp_path, max_shard_size="20KB")
    next(iter(sorted(tmp_path.glob("model-*.safetensors")))).unlink()
    with pytest.raises(MoespecError, match="shard .* not found"):
        LLM(tmp_path)


def test_prompt_longer_than_context(model_dir):
    llm = LLM(model_dir)
    with pytest.raises(MoespecError, match="prompt has 16 tokens but the context window is 16"):
        llm.generate([list(range(3, 19))])
    with pytest.raises(MoespecError, match="longer than the context window"):
        llm.score(torch.zeros(1, 17, dtype=torch.long))


def test_generation_stops_at_context_end(model_dir):
    out = LLM(model_dir).generate([list(range(3, 13))], max_new_tokens=50, ignore_eos=True)[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_bad_options(model_dir):
    with pytest.raises(MoespecError, match="dtype must be one of"):
        LLM(model_dir, dtype="int8")
    with pytest.raises(MoespecError, match="CUDA is not available|invalid device"):
        LLM(model_dir, device="cuda" if not torch.cuda.is_available() else "tpu")
    llm = LLM(model_dir)
    with pytest.raises(MoespecError, match="max_new_tokens must be an integer >= 1"):
        llm.generate([[3, 4]], max_new_tokens=0)
    with pytest.raises(MoespecError, match="token ids must be in"):
        llm.generate([[3, 4000]])
    with pytest.raises(MoespecError, match="tokenizer.json not found"):
        llm.generate("text needs a tokenizer")


def test_cli_prints_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moespec: error: model directory not found: {tmp_path / 'nope'}"


# --- a broken checkpoint: each fault named at load, none silent ----------------------------------

def _edit_weights(d, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(d / "model.safetensors")
    edit(tensors)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})


def _truncate(d):
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


EXPERT = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
DENSE = "model.layers.0.self_attn.q_proj.weight"
BROKEN_CHECKPOINTS = {  # how the directory is broken -> what the error says
    "truncated": (_truncate, r"model\.safetensors is not a valid safetensors file: tensor .*the file is truncated"),
    "random bytes": (lambda d: (d / "model.safetensors").write_bytes(bytes(range(256)) * 20),
                     r"model\.safetensors is not a valid safetensors file: header of \d+ bytes"),
    "dense shape": (lambda d: _edit_weights(d, lambda t: t.update({DENSE: torch.zeros(3, 32)})),
                    r"tensor for layers\.0\.self_attn\.q_proj\.weight has shape \[3, 32\], expected \[32, 32\]"),
    "expert shape": (lambda d: _edit_weights(d, lambda t: t.update({EXPERT: torch.zeros(5, 32)})),
                     rf"{re.escape(EXPERT)} has shape \[5, 32\], expected \[48, 32\]"),
    "dense NaN": (lambda d: _edit_weights(d, lambda t: t[DENSE].view(-1)[7].fill_(float("nan"))),
                  rf"{re.escape(DENSE)} holds 1 NaN or Inf value\(s\) of 1024"),
    "expert Inf": (lambda d: _edit_weights(d, lambda t: t[EXPERT].view(-1)[0].fill_(float("inf"))),
                   rf"{re.escape(EXPERT)} holds 1 NaN or Inf value"),
}


@pytest.mark.parametrize("fault", BROKEN_CHECKPOINTS)
def test_broken_checkpoint_is_named(model_dir, tmp_path, fault):
    break_it, message = BROKEN_CHECKPOINTS[fault]
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    break_it(d)
    with pytest.raises(MoespecError, match=message):
        LLM(d)


@pytest.mark.parametrize("file, prefetch", [("estimators.safetensors", "estimator"),
                                             ("estimators.safetensors", "auto"),
                                             ("default_vectors.safetensors", "lookahead")])
def test_broken_guess_file_is_named(model_dir, tmp_path, file, prefetch):
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    (d / file).write_bytes(b"not safetensors at all")
    with pytest.raises(MoespecError, match=rf"{re.escape(str(d / file))} is not a valid safetensors file"):
        LLM(d, expert_cache="50%", prefetch=prefetch)


def test_non_finite_expert_on_the_disk_tier_fails_when_first_read(model_dir, tmp_path):
    """The disk tier reads an expert when it is first needed: that read names the tensor."""
    d = tmp_path / "m"
    shutil.copytree(model_dir, d)
    first = "model.layers.0.block_sparse_moe.experts.0."  # read at load (its shapes size the cache)
    _edit_weights(d, lambda t: [t[k].fill_(float("nan")) for k in t
                                if ".experts." in k and k.endswith("w2.weight") and not k.startswith(first)])
    llm = LLM(d, expert_tier="disk", expert_cache=2)
    with pytest.raises(MoespecError, match=r"experts\.\d+\.w2\.weight holds \d+ NaN"):
        llm.generate([[3, 4, 5]], max_new_tokens=2)
    llm.close()


CONFIG_FAULTS = [  # (change to config.json, message)
    (lambda c: [c], "config.json must hold a JSON object, got a list"),
    (lambda c: {**c, "hidden_size": "32"}, "config.json field 'hidden_size' must be an integer, got '32'"),
    (lambda c: {**c, "num_hidden_layers": 2.0}, "config.json field 'num_hidden_layers' must be an integer, got 2.0"),
    (lambda c: {**c, "rms_norm_eps": "small"}, "config.json field 'rms_norm_eps' must be a finite number, got 'small'"),
    (lambda c: {**c, "num_local_experts": -4}, "config.json field 'num_local_experts' must be a positive integer"),
]


@pytest.mark.parametrize("change, message", CONFIG_FAULTS, ids=[m.split(" must")[0] for _, m in CONFIG_FAULTS])
def test_config_field_of_the_wrong_type_is_named(model_dir, tmp_path, change, message):
    shutil.copytree(model_dir, tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(MoespecError, match=re.escape(message)):
        LLM(tmp_path / "m")


# --- bad arguments to generate and score ------------------------------------------------------------

BAD_GENERATE = [  # (generate keywords, message)
    (dict(max_new_tokens=1.5), "max_new_tokens must be an integer >= 1, got 1.5"),
    (dict(max_new_tokens="4"), "max_new_tokens must be an integer >= 1, got '4'"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0, got nan"),
    (dict(temperature="hot"), "temperature must be a finite number >= 0"),
    (dict(top_p=float("inf")), "top_p must be a number in (0, 1]"),
    (dict(top_k=2.5), "top_k must be an integer >= 0"),
    (dict(stop=[None]), "stop must be non-empty strings, got (None,)"),
    (dict(stop=[""]), "stop must be non-empty strings, got ('',)"),
    (dict(seed=2**70), "seed must be an integer in [-2**63, 2**64)"),
    (dict(seed=1.0), "seed must be an integer in [-2**63, 2**64)"),
    (dict(prompts=[[3, 4.5]]), "prompt token 1 must be an integer id, got 4.5"),
    (dict(prompts=[[3, True]]), "prompt token 1 must be an integer id, got True"),
    (dict(prompts=[7]), "a prompt must be text or a list of token ids, got int"),
    (dict(prompts=b"\xff\xfe"), "prompt bytes are not valid UTF-8 (bad byte at offset 0)"),
    (dict(prompts="a\udc80b"), "prompt is not valid Unicode: unpaired surrogate '\\udc80' at character 1"),
]


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    from tiny import save_tokenizer

    d = tmp_path_factory.mktemp("text")
    save_model("mixtral", d, max_position_embeddings=32)
    save_tokenizer(d)
    llm = LLM(d)
    yield llm
    llm.close()


@pytest.mark.parametrize("kw, message", BAD_GENERATE, ids=[m[:30] for _, m in BAD_GENERATE])
def test_bad_generate_argument_is_named(text_llm, kw, message):
    kw = {"prompts": [[3, 4]], **kw}
    with pytest.raises(MoespecError, match=re.escape(message)):
        text_llm.generate(kw.pop("prompts"), **kw)


def test_tiny_temperature_and_top_p_are_greedy(text_llm):
    """A temperature whose scaled logits leave float range, or a top_p below float32's smallest
    number, keeps only the most likely token: the greedy answer, not a NaN error."""
    greedy = text_llm.generate([[3, 4, 5]], max_new_tokens=8, ignore_eos=True)[0].token_ids
    for kw in (dict(temperature=1e-39), dict(temperature=5e-324), dict(temperature=1.0, top_p=1e-300)):
        assert text_llm.generate([[3, 4, 5]], max_new_tokens=8, ignore_eos=True, seed=1, **kw)[0].token_ids == greedy


BAD_SCORE = [
    (torch.zeros(1, 0, dtype=torch.long), r"shape \[batch, length\] with at least one token, got \(1, 0\)"),
    (torch.tensor([[3, 128]]), r"token ids must be in \[0, 128\), got 3\.\.128"),
    (torch.tensor([[-1, 3]]), r"token ids must be in \[0, 128\), got -1\.\.3"),
    (torch.tensor([[3.5, 4.0]]), "score expects integer token ids, got dtype float32"),
    ([[1, 2], [3]], "score expects integer token ids of shape"),
]


@pytest.mark.parametrize("ids, message", BAD_SCORE, ids=range(len(BAD_SCORE)))
def test_bad_score_input_is_named(text_llm, ids, message):
    with pytest.raises(MoespecError, match=message):
        text_llm.score(ids)


def test_cli_bad_argument_prints_nothing_on_stdout(capsys):
    """A bad sampling argument is the error line alone: the prompt is not echoed first."""
    assert main(["generate", "--prompt", "hello", "--temperature", "nan"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.strip().splitlines()[-1] == "moespec: error: temperature must be a finite number >= 0, got nan"
