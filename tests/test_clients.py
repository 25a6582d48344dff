"""The server against real clients: logprobs / echo / n, token-id prompts, /tokenize, the served
OpenAPI schema under schemathesis, lm-eval's `local-completions` on a local multiple-choice task,
body limits, disconnects, the queue bound and the drain at shutdown.

One tiny model serves the module (2 rows, 2 waiting places); references come from a second,
independent `LLM` on the same checkpoint.
"""

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from moespec import LLM
from moespec.serve import BackgroundServer, create_app
from tiny import save_served_model

MODEL = "tiny-client"
DATA = Path(__file__).parent / "data"
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("clients") / MODEL
    d.mkdir()
    save_served_model(d, max_position_embeddings=128)
    return d


@pytest.fixture(scope="module")
def ref(model_dir):
    llm = LLM(model_dir)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def server(model_dir):
    llm = LLM(model_dir)
    with BackgroundServer(create_app(llm, max_batch_size=2, max_queue=2, max_body_bytes=64 * 1024)) as s:
        yield s
    llm.close()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as c:
        yield c


def completion(http, **body):
    r = http.post("/v1/completions", json={"model": MODEL, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def logsoftmax(ref, ids):
    return torch.log_softmax(ref.score(torch.tensor([ids]))[0], dim=-1)


# --- logprobs, echo, n, token-id prompts ----------------------------------------------------------

def test_echo_logprobs_equal_score(http, ref):
    """echo + logprobs (what lm-eval sends): the prompt's token logprobs are LLM.score's, the
    first is None, and the top alternatives are the most likely tokens."""
    ids = ref.encode("def add(a, b):\n    return a + b")
    out = completion(http, prompt=ids, max_tokens=1, logprobs=2, echo=True)["choices"][0]
    lp = out["logprobs"]
    want = logsoftmax(ref, ids)
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    for k in range(1, len(ids)):
        assert lp["token_logprobs"][k] == pytest.approx(float(want[k - 1, ids[k]]), abs=1e-4)
        best = want[k - 1].topk(2)
        assert list(lp["top_logprobs"][k].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert out["text"].startswith(ref.tokenizer.decode(ids))
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(lp["tokens"]))]
    generated = int(want[-1].argmax())
    assert lp["token_logprobs"][-1] == pytest.approx(float(want[-1, generated]), abs=1e-4)


def test_completion_logprobs_follow_the_sampled_tokens(http, ref):
    out = completion(http, prompt="for i in", max_tokens=6, logprobs=0, **NO_EOS)["choices"][0]
    want = ref.generate("for i in", max_new_tokens=6, ignore_eos=True)[0]
    ids = want.prompt_token_ids + want.token_ids
    lps = logsoftmax(ref, ids)
    got = out["logprobs"]["token_logprobs"]
    assert got == pytest.approx([float(lps[len(want.prompt_token_ids) - 1 + k, t])
                                 for k, t in enumerate(want.token_ids)], abs=1e-4)
    assert out["logprobs"]["top_logprobs"] == [{}] * 6 and out["text"] == want.text


def test_chat_logprobs(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "def add"}], "max_tokens": 4,
            "temperature": 0, "logprobs": True, "top_logprobs": 3, **NO_EOS}
    content = http.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for entry in content:
        assert len(entry["top_logprobs"]) == 3 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode())


def test_n_choices_and_several_prompts(http, ref):
    prompts = [[5, 6, 7], [8, 9]]
    out = completion(http, prompt=prompts, max_tokens=5, n=2, **NO_EOS)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    for i, c in enumerate(out["choices"]):
        assert c["text"] == ref.generate([prompts[i // 2]], max_new_tokens=5, ignore_eos=True)[0].text
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 20, "total_tokens": 25}
    seeded = completion(http, prompt="def", max_tokens=8, n=2, temperature=1.0, seed=3, **NO_EOS)["choices"]
    assert [c["text"] for c in seeded] == [ref.generate("def", max_new_tokens=8, temperature=1.0, seed=s,
                                                        ignore_eos=True)[0].text for s in (3, 4)]


def test_streamed_choices_and_logprobs_add_up(http):
    body = {"model": MODEL, "prompt": "for i in", "max_tokens": 6, "temperature": 0, "n": 2, "logprobs": 1,
            "echo": True, "stream": True, "stream_options": {"include_usage": True}, **NO_EOS}
    whole = completion(http, **{k: v for k, v in body.items() if k not in ("stream", "stream_options")})
    events = [e[6:] for e in http.post("/v1/completions", json=body).text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["usage"] == whole["usage"]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == whole["choices"][i]["text"]
        assert sum((c["logprobs"]["token_logprobs"] for c in mine), []) == \
            whole["choices"][i]["logprobs"]["token_logprobs"]


def test_tokenize_and_detokenize(http, ref):
    text = "def add(a, b):"
    r = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert r == {"count": len(ref.encode(text)), "max_model_len": 128, "tokens": ref.encode(text)}
    chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] == len(chat["tokens"]) > 0
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": [300]}).status_code == 400
    assert http.post("/tokenize", json={"prompt": "x", "messages": []}).status_code == 400


# --- the HTTP layer: limits, media type, the schema --------------------------------------------------

def test_body_limit_and_media_type(http):
    big = json.dumps({"model": MODEL, "prompt": "x" * 70_000}).encode()
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    chunked = http.post("/v1/completions", content=iter([big[:40_000], big[40_000:]]),
                        headers={"content-type": "application/json"})  # no Content-Length: counted as read
    assert chunked.status_code == 413
    body = json.dumps({"model": MODEL, "prompt": "x"})
    r = http.post("/v1/completions", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    assert http.get("/health").json() == {"status": "ok"}


def test_openapi_schema_describes_the_routes(http):
    schema = http.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    paths = schema["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health"} <= set(paths)
    post = paths["/v1/completions"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert {"200", "400", "413", "415", "429", "503"} <= set(post["responses"])
    request = schema["components"]["schemas"]["CompletionRequest"]
    assert request["properties"]["model"]["enum"] == [MODEL] and {"echo", "logprobs", "n"} <= set(request["properties"])


def test_schemathesis_finds_nothing(model_dir, tmp_path):
    """Fuzz every route from the served schema (bounded: 10 examples per operation and phase,
    2 minutes at most; loopback only): no 500, and every answer's status, media type and body
    conform to the schema. A 32-token context keeps each generated completion short."""
    exe = shutil.which("schemathesis") or pytest.fail("schemathesis is not installed (pip install -e '.[dev]')")
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    env = {**os.environ, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
    llm = LLM(model_dir, context_length=32)
    try:
        with BackgroundServer(create_app(llm, max_batch_size=2, max_queue=2, max_body_bytes=64 * 1024)) as s:
            run = subprocess.run([exe, "run", f"{s.url}/openapi.json", "--checks", checks, "--max-examples", "10",
                                  "--seed", "1", "--workers", "1", "--request-timeout", "30", "--no-color"],
                                 capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    finally:
        llm.close()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]


# --- lm-eval -----------------------------------------------------------------------------------------

def direct_accuracy(ref, docs) -> float:
    """Multiple-choice accuracy by summed continuation log-likelihood, from LLM.score alone
    (lm-eval's rule: the context's tokens, then those of ' ' + choice)."""
    right = 0
    for doc in docs:
        ctx = ref.encode(doc["question"])
        scores = []
        for choice in doc["choices"]:
            whole = ref.encode(doc["question"] + " " + choice)
            lps = logsoftmax(ref, whole)
            scores.append(sum(float(lps[t - 1, whole[t]]) for t in range(len(ctx), len(whole))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


def test_lm_eval_local_completions_equals_score(server, model_dir, ref, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    shutil.copy(DATA / "tiny_mc.jsonl", data)
    (tasks / "tiny_mc.yaml").write_text((DATA / "tiny_mc.yaml").read_text().replace("DATA_FILE", str(data)))
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["moespec_tiny_mc"], task_manager=TaskManager(include_path=str(tasks)),
        model_args={"base_url": f"{server.url}/v1/completions", "model": MODEL, "tokenizer": str(model_dir),
                    "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1},
        log_samples=False)
    docs = [json.loads(line) for line in data.read_text().splitlines()]
    acc = results["results"]["moespec_tiny_mc"]["acc,none"]
    assert acc == pytest.approx(direct_accuracy(ref, docs)), acc


# --- queue bound, disconnects, shutdown --------------------------------------------------------------

def test_queue_holds_batch_plus_queue_requests(model_dir):
    """max_batch_size running + max_queue waiting, exactly: 12 simultaneous requests on a 4 + 8
    server all complete; with max_queue=0 an idle server still takes max_batch_size requests."""
    llm = LLM(model_dir)
    try:
        for batch, queue, sent in ((4, 8, 12), (2, 0, 2)):
            with BackgroundServer(create_app(llm, max_batch_size=batch, max_queue=queue)) as s, \
                    httpx.Client(base_url=s.url, trust_env=False, timeout=120) as c:
                body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 30, **NO_EOS}
                with ThreadPoolExecutor(sent) as pool:
                    codes = list(pool.map(lambda _: c.post("/v1/completions", json=body).status_code, range(sent)))
                assert codes == [200] * sent
                over = c.post("/v1/completions", json={**body, "n": batch + queue + 1})
                assert over.status_code == 400 and over.json()["error"]["param"] == "n"
    finally:
        llm.close()


async def _raw_request(url: str, payload: bytes, read: bool) -> None:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(payload)
    await writer.drain()
    if read:
        await asyncio.sleep(0.3)
    writer.close()


def test_disconnects_leave_no_asgi_errors(server, http, caplog):
    """A client that leaves mid-body, or before its (non-streamed) answer, costs no error log."""
    body = json.dumps({"model": MODEL, "prompt": [5, 6], "max_tokens": 100, **NO_EOS}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with caplog.at_level("WARNING"):
        asyncio.run(_raw_request(server.url, head + body[:10], read=False))
        asyncio.run(_raw_request(server.url, head + body, read=True))
        time.sleep(0.5)
        assert http.get("/health").status_code == 200
    bad = [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert not bad, [r.getMessage() for r in bad]


def test_shutdown_drains_with_503(model_dir):
    """SIGINT: a running stream finishes, a new request gets 503 (not a refused connection),
    then the process exits 0."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moespec.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--max-batch-size", "1",
                             # a slow emulated link keeps the stream running while shutdown drains
                             "--expert-cache", "2", "--link-bandwidth", "2MB/s"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as c:
            deadline = time.monotonic() + 60
            while True:
                assert proc.poll() is None and time.monotonic() < deadline
                with contextlib.suppress(httpx.TransportError):
                    if c.get("/health").status_code == 200:
                        break
                time.sleep(0.1)
            body = {"model": MODEL, "prompt": [5, 6], "max_tokens": 120, "stream": True, **NO_EOS}
            with c.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data: "))
                proc.send_signal(signal.SIGINT)
                time.sleep(0.5)
                refused = c.post("/v1/completions", json={**body, "stream": False})
                assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
