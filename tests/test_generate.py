"""Generation behaviour: sampling, stop conditions, streaming, the KV cache and the CLI."""

import pytest
import torch

from moespec import LLM
from moespec.cli import main
from moespec.decode.sampling import SamplingParams, filtered_probs
from tiny import save_model, save_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3")
    save_model("qwen3_moe", d, experts=8, top_k=2, vocab_size=300)
    save_tokenizer(d, vocab_size=300)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir)


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    top2 = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(top2, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    nucleus = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert torch.allclose(nucleus, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    sharp = filtered_probs(logits, SamplingParams(temperature=0.5))
    assert sharp[0, 0] > 0.5 and torch.allclose(sharp.sum(), torch.tensor(1.0))


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = llm.generate([[5, 6, 7]], seed=3, **kw)[0].token_ids
    b = llm.generate([[5, 6, 7]], seed=3, **kw)[0].token_ids
    c = llm.generate([[5, 6, 7]], seed=4, **kw)[0].token_ids
    assert a == b and a != c


def test_text_prompt_and_stop_string(llm):
    full = llm.generate("def add(a, b):", max_new_tokens=24, ignore_eos=True)[0]
    assert full.text and full.prompt_token_ids == llm.encode("def add(a, b):")
    stop = full.text[4:6]
    cut = llm.generate("def add(a, b):", max_new_tokens=24, ignore_eos=True, stop=stop)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_eos_stops_generation(llm):
    """Declare the 4th token of a free run to be EOS: generation must end right there, as 'stop'."""
    free = llm.generate([[5, 6, 7]], max_new_tokens=20, ignore_eos=True)[0].token_ids
    generator = llm.engine
    saved = generator.eos_ids
    generator.eos_ids = {free[3]}
    try:
        out = llm.generate([[5, 6, 7]], max_new_tokens=20)[0]
    finally:
        generator.eos_ids = saved
    assert out.finish_reason == "stop" and out.token_ids == free[: free.index(free[3]) + 1]


def test_streamed_text_equals_final_text(llm):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    outs = llm.generate(["def add(a, b):", "for i in"], max_new_tokens=20, ignore_eos=True,
                        on_text=lambda row, text: pieces[row].append(text))
    for row, out in enumerate(outs):
        assert "".join(pieces[row]) == out.text


def test_kv_cache_crop_then_regrow_matches(llm):
    """Rolling a row back and re-feeding different tokens equals never having fed the old ones."""
    m, experts = llm.model, llm.experts
    prompt, a, b = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 10, 11]]), torch.tensor([[12, 13]])
    cache = llm.engine.new_cache(1, 16)
    m(prompt, cache, experts)
    m(a, cache, experts)
    cache.crop(torch.tensor([0]), torch.tensor([4]))
    got = m.logits(m(b, cache, experts))
    fresh = llm.engine.new_cache(1, 16)
    m(prompt, fresh, experts)
    want = m.logits(m(b, fresh, experts))
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(cache.k[:, :, :6], fresh.k[:, :, :6]) and int(cache.lengths[0]) == 6
    with pytest.raises(ValueError):
        cache.crop(torch.tensor([0]), torch.tensor([7]))


def test_cli_generate_streams_text(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "def add(a, b):", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    expected = LLM(model_dir).generate("def add(a, b):", max_new_tokens=8)[0].text
    assert out.out == "def add(a, b):" + expected + "\n"
    assert "tokens" in out.err
