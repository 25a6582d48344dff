"""Offloading: exactness under any budget and policy, budget enforcement, eviction order, stats, trace."""

import gc
import json
import os
import random
import threading
import time

import pytest
import torch

from moespec import LLM, MoespecError
from moespec.checkpoint import Checkpoint
from moespec.experts.admission import STALE_REFUSALS, Admission
from moespec.experts.cache import ExpertCache, budget_slots
from moespec.experts.eviction import make_policy
from moespec.experts.stats import ExpertStats
from moespec.experts.store import ExpertStore
from moespec.experts.transfer import CpuTransfers
from moespec.spec import load_spec
from tiny import save_model

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]
SCORE_IDS = torch.arange(3, 43).reshape(2, 20)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2moe")
    save_model("qwen2_moe", d, experts=8, top_k=2, num_hidden_layers=3)
    return d


@pytest.fixture(scope="module")
def exact(model_dir):
    llm = LLM(model_dir, expert_cache="100%")
    return llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True), llm.score(SCORE_IDS), llm.stats().as_dict()


CONFIGS = [
    dict(expert_cache="25%"),
    dict(expert_cache=2),
    dict(expert_cache="50%", eviction="lfu"),
    dict(expert_cache="25%", eviction="lru"),
    dict(expert_cache="40%", eviction="pinned_hot"),
    dict(expert_cache=6, cache_scope="layer"),
    dict(expert_cache="25%", expert_tier="disk", host_cache=3),
    dict(expert_cache="30%", link_bandwidth="2GB/s"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(c) for c in CONFIGS])
def test_any_budget_and_policy_is_exact(model_dir, exact, config):
    want_tokens, want_logits, exact_stats = exact
    llm = LLM(model_dir, **config)
    got = llm.generate(PROMPTS, max_new_tokens=24, ignore_eos=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want_tokens]
    assert torch.allclose(llm.score(SCORE_IDS), want_logits, atol=1e-6)
    stats = llm.stats().as_dict()
    # the same routing happened, so the same expert uses: every use is a hit or a miss
    assert stats["hits"] + stats["misses"] == exact_stats["hits"] and exact_stats["misses"] == 0
    assert stats["misses"] > 0 and stats["tokens"] == exact_stats["tokens"]
    assert stats["bytes_moved"] == stats["misses"] * llm.store.expert_bytes
    for layer in stats["per_layer"].values():
        assert layer["bytes_moved"] == layer["misses"] * llm.store.expert_bytes
    llm.close()


def test_budget_is_never_exceeded(model_dir):
    budget = 30 * 1024
    llm = LLM(model_dir, expert_cache="30KiB")
    expert_bytes = llm.store.expert_bytes
    assert llm.experts.capacity == budget // expert_bytes == 3
    assert llm.experts.bytes_used() <= budget
    llm.generate(PROMPTS, max_new_tokens=8, ignore_eos=True)
    assert len(llm.experts.resident()) <= llm.experts.capacity
    assert llm.experts.bytes_used() <= budget
    # on the CPU slots hold their experts by reference: exactly the resident ones, none evicted
    assert llm.experts.bytes_used() == len(llm.experts.resident()) * expert_bytes
    llm.experts.clear()
    assert llm.experts.bytes_used() == 0
    assert budget_slots("25%", 24, expert_bytes) == 6
    assert budget_slots(100, 24, expert_bytes) == 24


def test_budget_too_small_is_a_clear_error(model_dir):
    with pytest.raises(MoespecError, match="cannot hold one token's 2 experts"):
        LLM(model_dir, expert_cache=1)
    with pytest.raises(MoespecError, match=r"\(1 per layer\) cannot hold"):
        LLM(model_dir, expert_cache=5, cache_scope="layer")
    with pytest.raises(MoespecError, match="expert_cache must be"):
        LLM(model_dir, expert_cache="lots")
    with pytest.raises(MoespecError, match="link_bandwidth must be a positive rate"):
        LLM(model_dir, expert_cache="25%", link_bandwidth="fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_float32_experts_are_stored_transposed_with_the_same_values(model_dir, dtype):
    """Everything resident on the CPU: a float32 layer's matrices live [E, in, out] in memory (the
    layout the grouped matmul runs fastest on) behind views of the usual shape; bfloat16 ones stay
    as stored. Either way each expert, from the stack or the store, equals the checkpoint's."""
    spec = load_spec(model_dir)
    checkpoint = Checkpoint(model_dir, spec)
    llm = LLM(model_dir, dtype=str(dtype).removeprefix("torch."))
    store, resident = llm.store, llm.experts
    layer = spec.moe_layer_ids[0]
    stack = resident.fetch_stack(layer, [0], tokens=1)
    assert stack.gate_up.shape == (spec.num_experts, *store.shapes["gate_up"])
    transposed = dtype == torch.float32
    assert stack.gate_up.transpose(1, 2).is_contiguous() == transposed
    assert stack.down.transpose(1, 2).is_contiguous() == transposed
    for e in range(spec.num_experts):
        want = checkpoint.expert(layer, e, dtype)
        for name in ("gate_up", "down"):
            assert torch.equal(getattr(stack, name)[e], want[name])
            assert torch.equal(store.packed((layer, e))[name], want[name])
            assert store.packed((layer, e))[name].untyped_storage().data_ptr() == \
                getattr(stack, name).untyped_storage().data_ptr()  # views of the stack: no second copy


def test_a_transposed_store_holds_the_same_experts_and_serves_the_same_tokens(model_dir):
    """transposed=True (what an LLM on the CPU in float32 asks for): the RAM tier's matrices are
    transposed in memory with the checkpoint's values and shapes; the disk tier's are as read. An
    offloaded run on such a store gives the resident run's greedy tokens."""
    spec = load_spec(model_dir)
    checkpoint = Checkpoint(model_dir, spec)
    ram = ExpertStore(checkpoint, torch.float32, pin=False, transposed=True)
    disk = ExpertStore(checkpoint, torch.float32, pin=False, tier="disk", transposed=True)
    for key in ram.keys:
        want = checkpoint.expert(*key, torch.float32)
        for name in ("gate_up", "down"):
            assert ram.packed(key)[name].mT.is_contiguous() and torch.equal(ram.packed(key)[name], want[name])
            assert disk.packed(key)[name].is_contiguous() and torch.equal(disk.packed(key)[name], want[name])
    prompts = [[5, 9, 14, 2], [7, 7, 3]]
    offloaded, resident = LLM(model_dir, expert_cache="25%"), LLM(model_dir)
    assert offloaded.store.packed(offloaded.store.keys[0])["gate_up"].mT.is_contiguous()
    assert [o.token_ids for o in offloaded.generate(prompts, max_new_tokens=8)] == \
        [o.token_ids for o in resident.generate(prompts, max_new_tokens=8)]


def scripted_cache(model_dir, policy: str, slots: int = 3, copy_seconds: float | None = None) -> ExpertCache:
    """A cache over the test checkpoint; `copy_seconds`: each copy's emulated wire time (None: instant)."""
    spec = load_spec(model_dir)
    store = ExpertStore(Checkpoint(model_dir, spec), torch.float32, pin=False)
    return ExpertCache(store, torch.device("cpu"), slots, policy, "global", ExpertStats(spec.moe_layer_ids),
                       link_bandwidth=None if copy_seconds is None else store.expert_bytes / copy_seconds)


def use(cache: ExpertCache, layer: int, *ids: int) -> None:
    for _ in cache.fetch(layer, list(ids), tokens=1):
        pass


def test_lru_evicts_least_recently_used(model_dir):
    cache = scripted_cache(model_dir, "lru")
    for e in (0, 1, 2):
        use(cache, 0, e)
    use(cache, 0, 0)  # 1 is now the least recently used
    use(cache, 0, 3)
    assert cache.resident() == {(0, 0), (0, 2), (0, 3)}
    use(cache, 1, 5)  # layers share the pool: 2 goes next
    assert cache.resident() == {(0, 0), (0, 3), (1, 5)}


def test_lfu_evicts_least_frequently_used(model_dir):
    cache = scripted_cache(model_dir, "lfu")
    for e in (0, 0, 0, 1, 2, 2):
        use(cache, 0, e)
    use(cache, 0, 3)  # 1 was used once
    assert cache.resident() == {(0, 0), (0, 2), (0, 3)}
    use(cache, 0, 4)  # 3 (once, most recent) goes before 2 (twice)
    assert cache.resident() == {(0, 0), (0, 2), (0, 4)}


def test_lfu_victim_is_the_least_used_then_least_recent_evictable():
    """LFU's count buckets give the expert a pass over every resident would: the fewest uses,
    then the least recent use (an admitted guess counting as least recent), among the evictable."""
    random.seed(3)
    lfu, resident = make_policy("lfu", 16), []
    for _ in range(3000):
        key, action = (random.randrange(3), random.randrange(12)), random.random()
        if key in resident and action < 0.6:
            lfu.touch(key)
        elif key in resident and action < 0.8:
            lfu.forget(key)
            resident.remove(key)
        elif key not in resident:
            lfu.admit(key, guess=action < 0.3)
            resident.append(key)
        busy = set(random.sample(resident, len(resident) // 3))
        recency = {k: i for i, k in enumerate(lfu.order) if k not in busy}
        want = min(recency, key=lambda k: (lfu.uses[k], recency[k]), default=None)
        assert lfu.victim(lambda k: k not in busy) == want


def test_lfru_keeps_the_frequent_expert_until_the_text_leaves_it(model_dir):
    """Uses count as LFU's do, each worth half as much every 16 runs of its layer: an expert used
    often stays over ones used once since (LRU would evict it), until its uses are old."""
    cache = scripted_cache(model_dir, "lfru")
    for e in (0, 0, 0, 0, 1, 2):
        use(cache, 0, e)
    use(cache, 0, 3)  # 0 is the least recent, but its four uses outweigh 1's one
    assert cache.resident() == {(0, 0), (0, 2), (0, 3)}
    for _ in range(60):  # the text moves on: 0 is not used for 60 runs of its layer
        use(cache, 0, 2)
    use(cache, 0, 3)
    use(cache, 0, 4)  # 3 has two uses that are recent (LFU would evict it); 0's four are old
    assert cache.resident() == {(0, 2), (0, 3), (0, 4)}


def test_lfru_victim_has_the_least_decayed_uses():
    """The heap gives the victim a pass over every resident would: the evictable resident with
    the smallest sum of its uses' weights 2^((use's run - now) / 16), every layer running once per
    pass (so all layers share one clock); uses are remembered across evictions, and an expert
    loaded on demand counts as used from its admission until its first use."""
    random.seed(5)
    lfru, resident, uses, loaded, now = make_policy("lfru", 16), [], {}, {}, 0
    for step in range(4000):
        if random.random() < 0.3:  # a forward pass: every layer runs
            now += 1
            for layer in range(3):
                lfru.layer_runs(layer)
        key, action = (random.randrange(3), random.randrange(12)), random.random()
        if key in resident and action < 0.6:
            lfru.touch(key)
            uses.setdefault(key, []).append(now)
            loaded.pop(key, None)
        elif key in resident and action < 0.8:
            lfru.forget(key)
            resident.remove(key)
            loaded.pop(key, None)
        elif key not in resident:
            lfru.admit(key, guess=action < 0.3)
            if action >= 0.3:
                loaded[key] = now
            resident.append(key)
        busy = set(random.sample(resident, len(resident) // 3))
        weight = {k: sum(2 ** ((t - now) / 16) for t in uses.get(k, []) + ([loaded[k]] if k in loaded else []))
                  for k in resident if k not in busy}
        victim = lfru.victim(lambda k: k not in busy)
        if not weight:
            assert victim is None
            continue
        assert victim in weight and weight[victim] <= min(weight.values()) * (1 + 1e-9), step


def test_pinned_hot_keeps_the_most_used(model_dir):
    cache = scripted_cache(model_dir, "pinned_hot", slots=4)  # 2 hot slots
    for e in (0, 0, 0, 1, 1, 1, 2, 3):
        use(cache, 0, e)
    for e in (4, 5, 6, 7):  # a scan of new experts only cycles the 2 cold slots
        use(cache, 0, e)
    assert cache.resident() == {(0, 0), (0, 1), (0, 6), (0, 7)}


def test_a_layer_needing_more_experts_than_slots_streams_them(model_dir):
    """Prefill routes to every expert of a layer; a 2-slot cache still computes exactly."""
    cache = scripted_cache(model_dir, "lru", slots=2)
    seen = [e for e, _ in cache.fetch(0, list(range(8)), tokens=40)]
    assert sorted(seen) == list(range(8)) and len(cache.resident()) == 2


def test_prefetch_counts_hits_and_waste(model_dir):
    cache = scripted_cache(model_dir, "lru", slots=4)
    cache.prefetch(0, [1, 2])
    use(cache, 0, 1, 3)
    s = cache.stats[0]
    assert (s.prefetches, s.prefetch_hits, s.hits, s.misses) == (2, 1, 1, 1)
    for e in (4, 5, 6):  # evicts the unused prefetched expert 2
        use(cache, 0, e)
    assert s.wasted_prefetches == 1
    assert s.bytes_moved == (s.misses + s.prefetches) * cache.store.expert_bytes


def test_demand_copies_overtake_queued_prefetches_and_wrong_guesses_are_taken_back(model_dir):
    """On a slow link, a layer's missing experts go before guesses queued earlier; guesses still
    queued when their layer has run are cancelled, their slots freed and their bytes not counted."""
    spec = load_spec(model_dir)
    store = ExpertStore(Checkpoint(model_dir, spec), torch.float32, pin=False)
    cache = ExpertCache(store, torch.device("cpu"), 6, "lru", "global", ExpertStats(spec.moe_layer_ids),
                        link_bandwidth=store.expert_bytes / 0.1)  # 100 ms per copy: wide margins under load
    cache.prefetch(1, [5])  # starts at once: the link is idle
    cache.prefetch(1, [6, 7])  # queued behind it
    order = [e for e, _ in cache.fetch(0, [0], tokens=1)]
    assert order == [0]
    assert not cache.transfers.done(cache.pending[(1, 7)])  # the demand copy of (0, 0) went before it
    use(cache, 1, 5)
    s = cache.stats[1]
    assert s.cancelled_prefetches >= 1 and (1, 7) not in cache.resident()
    assert s.bytes_moved == (s.prefetches - s.cancelled_prefetches + s.misses) * cache.store.expert_bytes
    cache.transfers.close()


def test_a_guess_on_the_link_yields_it_to_a_demand_copy_and_resumes(model_dir):
    """A guess already on a slow link does not delay the copy a layer waits for: the demand copy
    lands first, the guess finishes afterwards and is used as usual."""
    spec = load_spec(model_dir)
    store = ExpertStore(Checkpoint(model_dir, spec), torch.float32, pin=False)
    cache = ExpertCache(store, torch.device("cpu"), 6, "lru", "global", ExpertStats(spec.moe_layer_ids),
                        link_bandwidth=store.expert_bytes / 0.2)  # 200 ms per copy
    cache.prefetch(1, [5])  # on the link at once
    time.sleep(0.02)
    assert [e for e, _ in cache.fetch(0, [0], tokens=1)] == [0]
    assert not cache.transfers.done(cache.pending[(1, 5)])  # it yielded: without that it would land first
    use(cache, 1, 5)
    s = cache.stats[1]
    assert (s.prefetches, s.prefetch_hits, s.cancelled_prefetches) == (1, 1, 0)
    cache.transfers.close()


def test_cpu_link_lands_an_expert_when_compute_first_waits_for_it():
    """The wire time passes on the link's schedule; the expert reaches its slot, by reference (on
    the CPU the host's memory is the device's), on the thread that computes when it first waits for
    the copy, so a guess that is never used never lands."""
    src, dst = {"w": torch.arange(6.0)}, {}
    link = CpuTransfers(link_bandwidth=24 / 0.01)  # 10 ms of wire time
    handle = link.copy(lambda: src, dst, "guess", slot=0, urgent=False)
    deadline = time.perf_counter() + 5
    while not link.done(handle) and time.perf_counter() < deadline:
        time.sleep(0.005)
    assert link.done(handle) and dst == {}  # on the link and done, not landed
    link.wait(handle, layer=0)
    assert dst["w"] is src["w"] and link.busy_seconds > 0
    link.close()


def test_cpu_link_is_a_schedule_not_a_thread():
    """The emulated link starts no thread: a copy's wire time passes while compute works, so a wait
    after enough compute does not stall; a demand copy asked for meanwhile waits only its own time."""
    src, dst = {"w": torch.arange(6.0)}, {"w": torch.zeros(6)}
    before = threading.active_count()
    link = CpuTransfers(link_bandwidth=24 / 0.02)  # 20 ms of wire time per copy
    assert threading.active_count() == before
    guess = link.copy(lambda: src, dst, "guess", slot=0, urgent=False)
    time.sleep(0.05)  # compute, longer than the wire time
    link.wait(guess, layer=0)
    assert link.stalled_seconds < 0.01 and torch.equal(dst["w"], src["w"])
    demand = link.copy(lambda: src, {"w": torch.zeros(6)}, "demand", slot=1)
    start = time.perf_counter()
    link.wait(demand, layer=1)
    assert 0.015 <= time.perf_counter() - start < 0.2 and link.busy_seconds >= 0.04
    link.close()


def test_a_layer_whose_slots_all_hold_landing_guesses_still_fetches(model_dir):
    """Per-layer slots (2 = top-k) both taken by wrong guesses still on a slow link: the layer
    takes back the queued one and waits out the one on the link instead of failing."""
    spec = load_spec(model_dir)
    store = ExpertStore(Checkpoint(model_dir, spec), torch.float32, pin=False)
    cache = ExpertCache(store, torch.device("cpu"), 2 * spec.num_layers, "lru", "layer",
                        ExpertStats(spec.moe_layer_ids), link_bandwidth=store.expert_bytes / 0.05)
    cache.prefetch(1, [6, 7])
    assert [e for e, _ in cache.fetch(1, [0, 1], tokens=1)] == [0, 1]
    s = cache.stats[1]
    assert (s.misses, s.cancelled_prefetches) == (2, 1) and (1, 1) in cache.resident()
    cache.transfers.close()


def test_disk_tier_reads_on_demand(model_dir, exact):
    llm = LLM(model_dir, expert_cache="25%", expert_tier="disk", host_cache=2)
    assert llm.store.disk_reads == 0
    out = llm.generate(PROMPTS[:1], max_new_tokens=8, ignore_eos=True)
    assert out[0].token_ids == exact[0][0].token_ids[:8]
    assert llm.store.disk_reads > 0 and 0 < llm.stats().disk["host_cached"] <= 2


def test_no_store_read_runs_on_the_thread_that_computes(model_dir, exact, monkeypatch):
    """Disk tier over experts that are not a checkpoint directory's (quantized at load), with a tiny
    host cache and prefetching: every expert read (demand misses and guesses) happens on the
    transfer side's reader threads, and the output stays as the RAM tier's."""
    kw = dict(expert_cache="25%", expert_dtype="int8", prefetch="lookahead", link_bandwidth="2GB/s")
    want = LLM(model_dir, **kw).generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    llm = LLM(model_dir, expert_tier="disk", host_cache=2, **kw)
    assert llm.experts.transfers._process is None
    readers, read = [], llm.store._read
    monkeypatch.setattr(llm.store, "_read", lambda key, out=None: readers.append(threading.current_thread().name)
                        or read(key, out))
    out = llm.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids for o in want]
    assert len(readers) == llm.store.disk_reads > 0
    assert threading.current_thread().name not in readers and all(n.startswith("moespec-read") for n in readers)
    llm.close()


def test_a_checkpoint_directory_is_read_by_a_process_of_its_own(model_dir, exact, monkeypatch):
    """On a CPU the disk tier's reads of a checkpoint directory run in a reader process, which
    writes each expert into its slot: none runs in this process, the store's counters are the
    process's, the output is exact, and closing the model ends the process."""
    llm = LLM(model_dir, expert_cache="25%", expert_tier="disk", host_cache=2, prefetch="lookahead",
              link_bandwidth="2GB/s")
    reader = llm.experts.transfers._process._process
    assert reader.pid != os.getpid() and reader.poll() is None
    here = []
    monkeypatch.setattr(llm.store, "_read", lambda *a: here.append(a))
    out = llm.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids[:12] for o in exact[0]]
    assert here == [] and llm.store.disk_reads >= llm.stats().experts.misses > 0
    slots = llm.experts.slots["gate_up"]  # the slots the process writes: what compute reads
    key = next(iter(llm.experts.slot_of))
    assert torch.equal(slots[llm.experts.slot_of[key]], llm.store.checkpoint.expert(*key, torch.float32)["gate_up"])
    llm.close()
    assert reader.poll() is not None


def test_without_shared_anonymous_memory_the_disk_tier_reads_with_threads(model_dir, exact, monkeypatch):
    """Where the OS has no memfd (not Linux), a checkpoint directory is read by reader threads."""
    monkeypatch.delattr(os, "memfd_create", raising=False)
    llm = LLM(model_dir, expert_cache="25%", expert_tier="disk", host_cache=2)
    assert llm.experts.transfers._process is None and llm.experts.transfers._readers == 2
    out = llm.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
    assert [o.token_ids for o in out] == [o.token_ids[:12] for o in exact[0]]
    llm.close()


def test_a_model_dropped_without_close_ends_its_reader_process(model_dir):
    llm = LLM(model_dir, expert_cache="25%", expert_tier="disk")
    reader = llm.experts.transfers._process._process
    llm.generate(PROMPTS[:1], max_new_tokens=2, ignore_eos=True)
    del llm
    gc.collect()
    reader.wait(timeout=10)  # raises if it is still running


def test_a_reader_process_that_dies_is_a_one_line_error(model_dir):
    llm = LLM(model_dir, expert_cache="25%", expert_tier="disk")
    reader = llm.experts.transfers._process._process
    reader.kill()
    reader.wait()
    with pytest.raises(MoespecError, match=r"^the disk tier's reader process exited \(code -9\)"):
        llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    llm.close()


def test_emulated_link_makes_compute_stall(model_dir):
    llm = LLM(model_dir, expert_cache="25%", link_bandwidth="0.02GB/s")
    llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    s = llm.stats().as_dict()
    copy_seconds = s["bytes_moved"] / 0.02e9
    assert s["stall_seconds"] >= 0.5 * copy_seconds
    assert "emulated 0.02 GB/s" in s["link"]


def test_trace_has_compute_and_transfer_lanes(model_dir, tmp_path):
    llm = LLM(model_dir, expert_cache="25%", link_bandwidth="1GB/s", trace=True)
    llm.generate(PROMPTS[:1], max_new_tokens=4, ignore_eos=True)
    llm.save_trace(tmp_path / "t.json")
    doc = json.loads((tmp_path / "t.json").read_text())
    slices = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    lanes = {e["args"]["name"]: e["tid"] for e in doc["traceEvents"] if e["ph"] == "M"}
    compute = [e for e in slices if e["tid"] == lanes["compute"]]
    transfer = [e for e in slices if e["tid"] == lanes["transfer"]]
    assert len(compute) == 3 * 4  # 3 layers x (prefill + 3 decode steps: the 4th token is not fed back)
    assert len(transfer) == llm.stats().as_dict()["misses"]
    assert all(e["dur"] >= 0 for e in slices)
    assert "emulated 1 GB/s" in doc["otherData"]["note"]


def test_prefetch_never_evicts_the_running_layers_experts(model_dir):
    cache = scripted_cache(model_dir, "lru", slots=3)
    use(cache, 0, 0)
    use(cache, 0, 1)
    use(cache, 1, 5)
    cache.prefetch(1, [6], running=0)  # plain LRU would evict (0, 0)
    assert cache.stats[1].prefetches == 0  # deferred until layer 0 has fetched
    use(cache, 0, 0, 1)
    assert cache.resident() == {(0, 0), (0, 1), (1, 6)}
    cache.peek((1, 6))  # let its copy land: an expert still being copied is never evicted
    cache.prefetch(1, [7], running=0)  # only the unused guess (1, 6) may go
    use(cache, 0, 0, 1)
    assert cache.resident() == {(0, 0), (0, 1), (1, 7)} and cache.stats[1].wasted_prefetches == 1


def test_a_guess_evicts_only_a_resident_worth_less(model_dir):
    """Value-aware admission on a scripted pattern: the LRU victim is an expert used at every run
    of its layer; a weak guess leaves it, a confident one takes its slot. (Copies take 50 ms, as
    on a real link, so the first guess is still on its way when the second chooses a victim.)"""
    cache = scripted_cache(model_dir, "lru", slots=2, copy_seconds=0.05)
    for _ in range(20):
        use(cache, 0, 0)  # used (and found) at every run: expected use near 1
    use(cache, 0, 1)
    assert cache.expected_use((0, 0)) > 0.5 > cache.expected_use((0, 1)) and cache.resident() == {(0, 0), (0, 1)}
    cache.prefetch(1, [5], scores=[0.3])  # the LRU victim (0, 0) is worth more: nothing moves
    assert cache.resident() == {(0, 0), (0, 1)} and cache.stats[1].prefetches == 0
    cache.prefetch(1, [5, 6], scores=[0.99, 0.98])  # each beats its victim: (0, 0), then (0, 1)
    assert cache.stats[1].prefetches == 2 and cache.resident() == {(1, 5), (1, 6)}


def test_a_prediction_values_its_layers_residents(model_dir):
    """A guess for layer 1 displaces the expert LFRU would evict next among the residents the
    prediction does not call needed: layer 1's resident it calls unneeded, never the one it calls
    needed, however recently either was used, nor a hot expert of another layer worth more than
    the guess; the layer's run spends the prediction."""
    cache = scripted_cache(model_dir, "lfru", slots=3)
    for _ in range(10):
        use(cache, 0, 0)  # a hot expert of layer 0: used and found at every run
    use(cache, 1, 2)
    use(cache, 1, 3)
    predicted = [0.0] * 8
    predicted[2], predicted[4] = 0.9, 0.8  # 2 stays needed, 3 is not, 4 is the new guess
    cache.prefetch(1, [2, 4], scores=[0.9, 0.8], predicted=predicted)
    assert cache.resident() == {(1, 2), (1, 4), (0, 0)} and cache.expected_use((1, 2)) > 0.5
    cache.peek((1, 4))  # let it land: evictable now
    cache.prefetch(1, [5], scores=[0.3], predicted=predicted[:5] + [0.3, 0.0, 0.0])
    assert cache.resident() == {(1, 2), (1, 4), (0, 0)} and cache.stats[1].prefetches == 1  # nothing worth less
    use(cache, 1, 2, 4)
    assert cache.expected_use((1, 4)) < 0.5  # spent: back to its use rate


def test_a_guess_is_priced_by_how_much_of_its_copy_guesses_as_far_ahead_hid(model_dir):
    """Guesses one layer ahead are used the moment they are made (their copies have just begun);
    guesses two layers ahead land before they are used. Each depth's measured share prices its own
    guesses: against the same resident, the same guess pays two layers ahead and not one."""
    cache = scripted_cache(model_dir, "lru", slots=12, copy_seconds=0.02)  # room for every guess
    for e in range(6):
        cache.prefetch(1, [e], depth=1)
        use(cache, 1, e)  # at once: compute waits for nearly the whole copy
        cache.prefetch(2, [e], depth=2)
        time.sleep(0.03)
        use(cache, 2, e)  # landed
    assert cache.stats[1].prefetch_hits == cache.stats[2].prefetch_hits == 6
    assert cache.stats[1].prefetch_landed_share < 0.5 and cache.stats[2].prefetch_landed_share == 1.0
    one, two = cache.admission.hidden_share(1), cache.admission.hidden_share(2)
    assert one < two
    victim = (one + two) / 2
    assert cache.admission.worth_it(1.0, victim, preempts=True, depth=2)
    assert not cache.admission.worth_it(1.0, victim, preempts=True, depth=1)
    cache.transfers.close()


def test_a_copys_progress_is_the_share_of_its_wire_time_passed():
    link = CpuTransfers(link_bandwidth=24 / 0.2)  # 200 ms of wire time
    handle = link.copy(lambda: {"w": torch.arange(6.0)}, {}, "guess", slot=0, urgent=False)
    time.sleep(0.05)
    assert 0.2 < link.progress(handle) < 0.9
    link.wait(handle, layer=0)
    assert link.progress(handle) == 1.0


def test_until_measured_a_guess_hides_the_links_idle_share_then_what_it_measured():
    adm = Admission()
    adm.link_busy = 0.75
    assert adm.hidden_share(1) == 0.25 and not adm.worth_it(0.9, 0.3, preempts=True, depth=1)
    for _ in range(30):
        adm.guess_used(1, 1.0)
    assert adm.hidden_share(1) > 0.95 and adm.worth_it(0.9, 0.3, preempts=True, depth=1)
    assert adm.hidden_share(2) == 0.25  # each depth is measured on its own guesses


def test_a_depth_whose_guesses_keep_being_refused_drifts_back_to_the_links_idle_share():
    """A share measured low (say while the link was congested) keeps that depth's guesses out, and
    only right guesses that were let in measure it again: after a long run of refusals it drifts
    back toward the link's idle share until a guess is admitted."""
    adm = Admission()
    adm.link_busy = 0.25
    for _ in range(30):
        adm.guess_used(1, 0.0)
    refusals = 0
    while not adm.worth_it(0.9, 0.3, preempts=True, depth=1):
        refusals += 1
        assert refusals < 500
    assert refusals > STALE_REFUSALS and 0.3 / 0.9 < adm.hidden_share(1) < 0.75


def test_a_guess_displaces_the_policys_next_victim_not_a_resident_kept_for_later(model_dir):
    """Layer 0 uses expert 0 at every run, and expert 1 at its last two; layer 1 alternates
    between experts 2 and 3, and the prediction always says rightly which one its next run uses.
    A guess for layer 1 then displaces the resident LFRU would give up next among those not
    predicted needed (expert 1 of layer 0, two uses), not expert 3 of layer 1, which its next run
    skips but which LFRU keeps for its ten uses: the run after finds it. (Chosen by the chance of
    a use at the layer's next run alone, the victim was expert 3, as it was on tiny-qwen2moe, where
    such choices moved 1.28x on demand's bytes with perfect guesses.)"""
    cache = scripted_cache(model_dir, "lfru", slots=4)
    for run in range(20):
        use(cache, 0, *((0, 1) if run >= 18 else (0,)))
        needed = 2 + run % 2
        predicted = [0.0] * 8
        predicted[needed] = 1.0
        cache.prefetch(1, [needed], scores=[1.0], predicted=predicted)
        use(cache, 1, needed)
    assert cache.resident() == {(0, 0), (0, 1), (1, 2), (1, 3)}
    predicted = [0.0] * 8
    predicted[2], predicted[4] = 1.0, 0.9  # the next run uses 2 (and the guess, 4); the one after, 3
    cache.prefetch(1, [2, 4], scores=[1.0, 0.9], predicted=predicted)
    assert cache.resident() == {(0, 0), (1, 2), (1, 3), (1, 4)}
    misses = cache.stats[1].misses
    use(cache, 1, 2, 4)
    use(cache, 1, 3)
    assert cache.stats[1].misses == misses


def test_a_resident_that_would_not_survive_to_its_next_use_is_worth_little(model_dir):
    """Every layer misses (three layers' experts cycling through two slots): each resident is used
    at its layer's next run but evicted by demand misses before then, so a middling guess may take
    its slot; with the same use pattern and room to keep them, it may not."""
    for slots, admitted in ((2, 1), (3, 0)):
        cache = scripted_cache(model_dir, "lru", slots=slots)
        for _ in range(20):
            for layer in (0, 1, 2):
                use(cache, layer, layer)
        cache.prefetch(1, [5], scores=[0.5])
        assert cache.stats[1].prefetches == admitted, (slots, cache.admission.survival)


def test_confident_guesses_of_missing_experts_that_keep_failing_stop_displacing_hot_ones(model_dir):
    """A predictor whose confident guesses name experts that are not resident and are never used
    (its right guesses would be of resident ones): the odds of such guesses are measured on them
    alone, so they soon stop displacing the layer's two hot experts, which are then always found
    (a slot no hot expert needs may still take guesses: on an idle link that costs nothing).
    Copies take 5 ms, as on a real link: a round's two guesses are on their way together, and both
    have landed (unused) before the layer runs again."""
    cache = scripted_cache(model_dir, "lru", slots=3, copy_seconds=0.005)
    misses = []
    for round_ in range(40):
        before = cache.stats[1].misses
        use(cache, 1, 2, 3)  # two hot experts, used at every run
        misses.append(cache.stats[1].misses - before)
        cache.prefetch(1, [4 + round_ % 4, 4 + (round_ + 1) % 4], scores=[0.99, 0.98])
        time.sleep(0.015)  # the emulated link keeps time: both copies are done when the layer runs
    assert sum(misses[1:10]) > 0 and sum(misses[-20:]) == 0, misses


def test_a_prediction_is_worth_what_it_measured(model_dir):
    """Odds, not raw scores: a predictor that keeps calling a resident unneeded (score 0) while the
    layer keeps using it loses its word, so a middling guess no longer displaces that resident."""
    cache = scripted_cache(model_dir, "lru", slots=2)
    wrong = [0.0] * 8
    for _ in range(20):
        use(cache, 1, 3)  # the layer uses it every time
        cache.prefetch(1, [], predicted=wrong)
    assert cache.expected_use((1, 3)) > 0.8
    cache.prefetch(1, [4], scores=[0.5], predicted=wrong[:4] + [0.5] + wrong[5:])  # a free slot
    cache.peek((1, 4))  # landed: evictable
    cache.prefetch(1, [5], scores=[0.5], predicted=wrong[:4] + [0.5, 0.5] + wrong[6:])
    assert cache.resident() == {(1, 3), (1, 4)} and cache.stats[1].prefetches == 1  # 5 found nothing worth less


def test_an_unmeasured_prediction_and_use_rate_each_count(model_dir):
    """Before anything is measured, a resident's prediction and its use rate are each taken at
    their word, the likelier one counting: a score of 0 for a resident never used means what it
    says, for one just used it does not (a weak predictor's word alone evicted the experts in use:
    on tiny-qwen2moe the estimators' decode hit rate fell from 0.91 to 0.88 with the next token
    guessed, and their bytes moved were 7x on-demand's)."""
    cache = scripted_cache(model_dir, "lru", slots=3)
    wrong = [0.0] * 8

    def predict(**scores: float) -> list[float]:
        return [scores.get(f"e{e}", 0.0) for e in range(8)]

    cache.prefetch(1, [2], predicted=predict(e2=1.0))
    cache.peek((1, 2))  # landed, never used
    use(cache, 1, 3)
    use(cache, 1, 3)  # used at the layer's last two runs
    cache.prefetch(1, [], predicted=wrong)
    assert cache.expected_use((1, 2)) < 0.1 < 0.3 < cache.expected_use((1, 3))
    cache.prefetch(1, [5], scores=[0.2], predicted=predict(e5=0.2))  # the free slot
    cache.peek((1, 5))
    cache.prefetch(1, [6], scores=[0.2], predicted=predict(e5=0.2, e6=0.2))
    assert cache.resident() == {(1, 3), (1, 5), (1, 6)}  # 6 displaced 2, never used, not 3
    cache.peek((1, 6))
    cache.prefetch(1, [7], scores=[0.2], predicted=predict(e5=0.2, e6=0.2, e7=0.2))
    assert cache.resident() == {(1, 3), (1, 5), (1, 6)}  # nothing worth less than 7: 3 stays


def test_predicted_eviction_evicts_what_the_prediction_calls_unneeded(model_dir):
    """A demand miss under "predicted" evicts the resident of the guessed-for layer that the
    prediction calls unneeded, where LRU would evict the least recently used expert; without a
    prediction it is LFRU."""
    for policy, evicted in (("lru", (0, 0)), ("predicted", (1, 3))):
        cache = scripted_cache(model_dir, policy, slots=3)
        for _ in range(10):
            use(cache, 0, 0)  # used at every run of its layer, but the least recently used
        use(cache, 1, 2)
        use(cache, 1, 3)
        predicted = [0.0] * 8
        predicted[2] = 0.9  # layer 1's next run: 2 needed, 3 not
        cache.prefetch(1, [], predicted=predicted)
        use(cache, 0, 1)
        assert cache.resident() == {(0, 0), (1, 2), (1, 3), (0, 1)} - {evicted}, policy
    cache = scripted_cache(model_dir, "predicted", slots=3)
    for e in (0, 1, 2, 0, 3):
        use(cache, 0, e)
    assert cache.resident() == {(0, 0), (0, 2), (0, 3)}  # as LFRU (and LRU)


def test_a_guess_enters_at_low_priority_and_is_promoted_when_used(model_dir):
    cache = scripted_cache(model_dir, "lru", slots=3)
    use(cache, 0, 0)
    use(cache, 0, 1)
    cache.prefetch(1, [5])  # a free slot: admitted, but at the LRU end
    cache.peek((1, 5))  # let it land
    use(cache, 0, 2)  # a demand miss evicts the unused guess, not the older (0, 0)
    assert cache.resident() == {(0, 0), (0, 1), (0, 2)} and cache.stats[1].wasted_prefetches == 1
    cache.prefetch(1, [6], scores=[1.0])  # evicts the LRU (0, 0), whose use rate is low
    use(cache, 1, 6)  # used: promoted to most recent
    use(cache, 0, 3)  # the next miss evicts (0, 1), not the promoted guess
    assert cache.resident() == {(0, 2), (1, 6), (0, 3)}


@pytest.mark.parametrize("host_cache", [0, 2])
def test_disk_tier_with_direct_io_is_exact(model_dir, exact, host_cache):
    """O_DIRECT reads (no page cache) with and without a host cache: the same tokens as the
    resident run, every expert read from the file, the throughput measured."""
    for prefetch in ("none", "lookahead"):
        llm = LLM(model_dir, expert_cache="25%", expert_tier="disk", host_cache=host_cache, direct_io=True,
                  prefetch=prefetch)
        out = llm.generate(PROMPTS, max_new_tokens=12, ignore_eos=True)
        assert [o.token_ids for o in out] == [o.token_ids[:12] for o in exact[0]]
        disk = llm.stats().disk  # the reader process's reads (this process read one expert at load)
        assert llm.experts.transfers._process is not None
        assert disk["direct_io"] and disk["reads"] >= llm.stats().experts.misses > 0 and disk["gb_per_s"] > 0
        assert disk["direct_bytes"] >= disk["reads"] * llm.store.expert_bytes and "direct I/O" in llm.link_note()
        assert 0 < disk["host_cached"] <= host_cache if host_cache else disk["host_cached"] == 0
        # read with its projections at once, an expert is what a buffered read gives and owns
        # memory holding its own bytes only (not the read buffer, with the file's bytes around them)
        expert = llm.store.checkpoint.expert(0, 1, llm.store.dtype, direct=True)
        buffered = llm.store.checkpoint.expert(0, 1, llm.store.dtype)
        assert expert.keys() == buffered.keys() and all(torch.equal(expert[k], buffered[k]) for k in expert)
        own = sum(t.numel() * t.element_size() for t in expert.values())
        assert all(t.untyped_storage().resizable() and t.untyped_storage().nbytes() == own for t in expert.values())
        llm.close()


def test_direct_reads_convert_and_assemble_experts_as_buffered_reads_do(tmp_path):
    """A bfloat16 Mixtral checkpoint (w1, w2, w3: gate, down, up, in that order in the file) read
    flat with O_DIRECT and assembled into float32 gate_up and down by one call: the same values
    as a buffered read, for every expert."""
    save_model("mixtral", tmp_path, experts=4, top_k=2, num_hidden_layers=2).to(torch.bfloat16).save_pretrained(tmp_path)
    checkpoint = Checkpoint(tmp_path, load_spec(tmp_path))
    for layer in checkpoint.spec.moe_layer_ids:
        for e in range(checkpoint.spec.num_experts):
            direct = checkpoint.expert(layer, e, torch.float32, direct=True)
            buffered = checkpoint.expert(layer, e, torch.float32)
            assert all(direct[k].dtype == torch.float32 and torch.equal(direct[k], buffered[k]) for k in buffered)
    checkpoint.direct.close()


def test_direct_io_needs_the_disk_tier(model_dir):
    with pytest.raises(MoespecError, match="direct_io=True .* needs expert_tier='disk', got expert_tier='ram'"):
        LLM(model_dir, expert_cache="25%", direct_io=True)


def test_direct_reader_returns_the_stored_tensors(tmp_path):
    """O_DIRECT reads at unaligned offsets: whole tensors and slices of fused [E, ...] tensors."""
    from safetensors.torch import save_file

    from moespec.direct_io import DirectReader

    gen = torch.Generator().manual_seed(0)
    tensors = {"small": torch.randn(3, generator=gen), "fused": torch.randn(5, 7, 9, generator=gen).to(torch.bfloat16),
               "big": torch.randn(1100, 3, generator=gen)}
    save_file(tensors, tmp_path / "t.safetensors")
    reader = DirectReader()
    for name, t in tensors.items():
        assert torch.equal(reader.tensor(tmp_path / "t.safetensors", name), t)
    for e in range(5):
        assert torch.equal(reader.tensor(tmp_path / "t.safetensors", "fused", e), tensors["fused"][e])
    reader.close()


def test_direct_reader_reads_tensors_that_lie_together_at_once(tmp_path, monkeypatch):
    """An expert's projections are read with one preadv where they lie together in the file, and
    one each where a large tensor lies between them; either way each is exactly the stored tensor,
    flat, with its shape. Scratch reads reuse their thread's buffer."""
    from safetensors.torch import save_file

    from moespec import direct_io

    gen = torch.Generator().manual_seed(1)
    tensors = {"a.w1": torch.randn(40, 24, generator=gen), "a.w2": torch.randn(24, 40, generator=gen),
               "a.w3": torch.randn(40, 24, generator=gen), "b.big": torch.randn(200_000, generator=gen),
               "c.small": torch.randn(5, generator=gen)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    reads, preadv = [], direct_io.os.preadv
    monkeypatch.setattr(direct_io.os, "preadv", lambda *a: reads.append(1) or preadv(*a))
    reader = direct_io.DirectReader()
    for names, calls in ((["a.w1", "a.w3", "a.w2"], 1), (["a.w1", "c.small"], 2)):
        reads.clear()
        got = reader.flat(path, names)
        assert len(reads) == calls and list(got) == names
        assert all(shape == tensors[n].shape and got[n][0].dim() == 1 and torch.equal(got[n][0].view(shape), tensors[n])
                   for n, (_, shape) in got.items())
    # into the thread's scratch buffer: the next scratch read reuses it (no new mapping), another
    # thread has its own, and a larger span maps a larger one
    maps, mapping = [], direct_io.mmap.mmap
    monkeypatch.setattr(direct_io.mmap, "mmap", lambda *a: maps.append(a[1]) or mapping(*a))
    got = reader.flat(path, ["a.w1", "a.w3"], scratch=True)
    assert torch.equal(got["a.w3"][0], tensors["a.w3"].flatten()) and len(maps) == 1
    assert torch.equal(reader.flat(path, ["c.small"], scratch=True)["c.small"][0], tensors["c.small"])
    assert len(maps) == 1
    other = []
    worker = threading.Thread(target=lambda: other.append(reader.flat(path, ["c.small"], scratch=True)["c.small"][0]))
    worker.start()
    worker.join()
    assert torch.equal(other[0], tensors["c.small"]) and len(maps) == 2
    assert torch.equal(reader.flat(path, ["b.big"], scratch=True)["b.big"][0], tensors["b.big"])
    assert len(maps) == 3 and maps[2] > maps[0]
    reader.close()
