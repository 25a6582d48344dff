"""Bad input gets one clear MoespecError naming the problem, from the API and from the CLI."""

import json

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
    with pytest.raises(MoespecError, match="max_new_tokens must be >= 1"):
        llm.generate([[3, 4]], max_new_tokens=0)
    with pytest.raises(MoespecError, match="token ids must be in"):
        llm.generate([[3, 4000]])
    with pytest.raises(MoespecError, match="tokenizer.json not found"):
        llm.generate("text needs a tokenizer")


def test_cli_prints_one_line_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moespec: error: model directory not found: {tmp_path / 'nope'}"
