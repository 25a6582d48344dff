"""CUDA offloading: runs on a GPU machine, skipped elsewhere."""

import threading

import pytest
import torch

from moespec import LLM
from tiny import save_model

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("olmoe")
    save_model("olmoe", d, experts=8, top_k=2, num_hidden_layers=3)
    return d


@pytest.mark.parametrize("eviction", ["lfru", "lru", "lfu", "pinned_hot"])
def test_cuda_offloading_is_exact(model_dir, eviction):
    exact = LLM(model_dir, device="cuda")
    want = exact.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
    llm = LLM(model_dir, device="cuda", expert_cache="25%", eviction=eviction)
    got = llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    ids = torch.arange(3, 43).reshape(2, 20)
    assert torch.allclose(llm.score(ids), exact.score(ids), atol=1e-5)
    stats = llm.stats().as_dict()
    assert stats["misses"] > 0 and stats["stall_seconds"] >= 0
    assert stats["bytes_moved"] == stats["misses"] * llm.store.expert_bytes
    assert llm.experts.gate_up.is_cuda and llm.store[(0, 0)].gate_up.is_pinned()
    assert "GPU" in stats["link"]
    llm.close()


def test_cuda_bfloat16_close_to_cpu_float32(model_dir):
    ids = torch.arange(3, 43).reshape(2, 20)
    ref = LLM(model_dir).score(ids)
    got = LLM(model_dir, device="cuda", dtype="bfloat16", expert_cache="50%").score(ids)
    assert (got.cpu() - ref).abs().max().item() < 0.1


def test_cuda_disk_tier_reads_off_the_compute_thread(model_dir):
    """Disk tier with direct I/O and prefetching on CUDA: every store read runs on a reader thread
    (which enqueues the copy), and the tokens are the resident run's."""
    want = LLM(model_dir, device="cuda").generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    llm = LLM(model_dir, device="cuda", expert_cache="25%", expert_tier="disk", host_cache=0, direct_io=True,
              prefetch="lookahead")
    readers, read = [], llm.store._read
    llm.store._read = lambda key: readers.append(threading.current_thread().name) or read(key)
    got = llm.generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert readers and all(name.startswith("moespec-read") for name in readers)
    llm.close()


def test_cuda_compiled_decode_is_the_eager_decode(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOESPEC_CACHE", str(tmp_path))
    want = LLM(model_dir, device="cuda").generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    got = LLM(model_dir, device="cuda", compile=True).generate(PROMPTS, max_new_tokens=16, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
