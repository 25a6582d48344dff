"""The OpenAI-compatible server, driven by the official openai client and by raw httpx.

One server (2 batch rows, 2 queue places) runs on a free 127.0.0.1 port for the module. Its
answers are compared with `LLM.generate` on a second, independent copy of the same tiny model,
so reference runs never touch the model the server's scheduler thread owns.
"""

import contextlib
import importlib.util
import json
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
import transformers

from moespec import LLM
from moespec.cli import main as cli_main
from moespec.serve import BackgroundServer, create_app
from moespec.serve.chat import ChatFormat
from tiny import save_served_model

MODEL = "tiny-qwen"
TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the first message must not be "
            "the assistant') }}{% endif %}{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n"
            "{{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PROMPT = "def add(a, b):"
LONG = 240  # tokens: keeps a request running while a test does something else (context is 256)
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / MODEL
    d.mkdir()
    save_served_model(d, chat_template=TEMPLATE)
    return d


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = LLM(model_dir)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def ref(model_dir):
    return LLM(model_dir)


@pytest.fixture(scope="module")
def server(llm):
    with BackgroundServer(create_app(llm, max_batch_size=2, max_queue=2)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, trust_env=False, timeout=60) as c:
        yield c


def greedy(ref, prompt, n, **kw):
    return ref.generate([prompt] if isinstance(prompt, list) else prompt, max_new_tokens=n, **kw)[0]


def metrics(http) -> dict[str, float]:
    """The /metrics page as {sample name with labels: value}."""
    page = http.get("/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in page.text.splitlines() if line and not line.startswith("#")}


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Fault:
    """Wraps the expert provider's `fetch` and `fetch_stack` (the grouped path's): every call takes
    at least `delay` seconds (a slow link, so a long request is surely still running while a test
    acts), and once `armed`, the next call for which `when(tokens)` holds raises (a transfer error)."""

    def __init__(self, llm, monkeypatch, when=lambda tokens: True, delay=0.002):
        self.when, self.delay = when, delay
        self.armed, self.fired = False, 0
        for name in ("fetch", "fetch_stack"):
            if hasattr(llm.experts, name):
                monkeypatch.setattr(llm.experts, name, partial(self.call, getattr(llm.experts, name)))

    def call(self, real, layer, ids, tokens):
        time.sleep(self.delay)
        if self.armed and self.when(tokens):
            self.armed = False
            self.fired += 1
            raise RuntimeError("injected transfer error")
        return real(layer, ids, tokens)


# --- the OpenAI API through the official client ------------------------------------------------

def test_models_and_health(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert http.get("/health").json() == {"status": "ok"}


def test_completion_equals_generate(client, ref):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body=NO_EOS)
    want = greedy(ref, PROMPT, 12, ignore_eos=True)
    assert out.choices[0].text == want.text and out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == \
        (len(want.prompt_token_ids), 12, len(want.prompt_token_ids) + 12)
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=8, temperature=0)
    want = greedy(ref, [5, 6, 7], 8)  # EOS honoured, as by generate
    assert ids.choices[0].text == want.text and ids.choices[0].finish_reason == want.finish_reason
    assert ids.usage.completion_tokens == len(want.token_ids)


def test_seeded_sampling_equals_generate(client, ref):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, top_p=0.9, extra_body=NO_EOS)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b == greedy(ref, PROMPT, 12, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True).text


def test_stop_string(client, ref):
    full = greedy(ref, PROMPT, 24, ignore_eos=True).text
    stop = full[4:6]
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop, "never"],
                                    extra_body=NO_EOS).choices[0]
    assert out.finish_reason == "stop" and out.text == full[: full.find(stop)]


def test_chat_uses_the_models_template(client, ref, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    hf = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert ChatFormat.load(model_dir).encode(messages, ref.tokenizer) == ids
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                         extra_body=NO_EOS)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == greedy(ref, ids, 10, ignore_eos=True).text
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10
    with pytest.raises(openai.BadRequestError, match="must not be the assistant"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "assistant", "content": "hi"}])


def test_chat_template_sources_and_fallback(tmp_path):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert ChatFormat.load(tmp_path).render(messages) == "user: hi\nassistant: hello\nassistant:"
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages[0].content }}"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert ChatFormat.load(tmp_path).render(messages) == "Dhi"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}{{ messages[0] | tojson }}")
    assert ChatFormat.load(tmp_path).render(messages) == 'J2{"role": "user", "content": "hi"}'


def test_streaming_completion_and_chat(client, ref):
    want = greedy(ref, PROMPT, 16, ignore_eos=True).text
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                           extra_body=NO_EOS)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=NO_EOS))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_sse_wire_format(http):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True, **NO_EOS}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


# --- bad input ---------------------------------------------------------------------------------

def _completion(**kw):
    return {"model": MODEL, "prompt": "x", **kw}


def _chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **kw}


BAD = [  # (path, body: bytes or JSON-able, status, param)
    ("/v1/completions", b'{"model": "tiny-qwen", "prompt": ', 400, None),
    ("/v1/completions", b'{"model": "tiny-qwen", "prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b'{"model": "tiny-qwen", "prompt": "\\udc80"}', 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", _completion(model="gpt-4"), 404, "model"),
    ("/v1/completions", _completion(max_tokens="8"), 400, "max_tokens"),
    ("/v1/completions", _completion(max_tokens=8.5), 400, "max_tokens"),
    ("/v1/completions", _completion(max_tokens=-1), 400, "max_tokens"),
    ("/v1/completions", _completion(max_tokens=0), 400, "max_tokens"),
    ("/v1/completions", _completion(max_tokens=10**12), 400, "max_tokens"),
    ("/v1/completions", _completion(temperature=-0.5), 400, None),
    ("/v1/completions", _completion(temperature="hot"), 400, "temperature"),
    ("/v1/completions", _completion(top_p=0), 400, None),
    ("/v1/completions", _completion(stop=[""]), 400, "stop"),
    ("/v1/completions", _completion(stop=7), 400, "stop"),
    ("/v1/completions", _completion(seed=2**80), 400, "seed"),
    ("/v1/completions", _completion(n=0), 400, "n"),
    ("/v1/completions", _completion(n=5), 400, "n"),  # more choices than 2 rows + 2 waiting places
    ("/v1/completions", _completion(prompt=["a", "b", "c"], n=2), 400, "n"),
    ("/v1/completions", _completion(logprobs=21), 400, "logprobs"),
    ("/v1/completions", _completion(best_of=2), 400, "best_of"),
    ("/v1/chat/completions", _chat(top_logprobs=2), 400, "top_logprobs"),

    ("/v1/completions", _completion(stream="yes"), 400, "stream"),
    ("/v1/completions", _completion(prompt=[5] * 300), 400, None),
    ("/v1/completions", _completion(prompt="x = 1\n" * 200), 400, None),
    ("/v1/completions", _completion(prompt=""), 400, None),
    ("/v1/completions", _completion(prompt=[999]), 400, None),
    ("/v1/completions", _completion(prompt=[True]), 400, "prompt"),
    ("/v1/completions", _completion(prompt=["a", 5]), 400, "prompt"),
    ("/v1/chat/completions", _chat(messages=[]), 400, "messages"),
    ("/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages.0.role"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400, "messages.0.content"),
    ("/v1/chat/completions", _chat(messages=[{"content": "hi"}]), 400, "messages.0.role"),
    ("/v1/chat/completions", _chat(max_completion_tokens=-3), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x = 1\n" * 200}]), 400, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_request_gets_openai_error(http, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_unknown_route_and_method(http):
    for r, status in ((http.get("/v1/nothing"), 404), (http.get("/v1/completions"), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_server_keeps_serving_after_bad_input(client, http, ref):
    http.post("/v1/completions", content=b"\xff")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert out.choices[0].text == greedy(ref, PROMPT, 6, ignore_eos=True).text


# --- continuous batching, cancellation, the queue bound ----------------------------------------

def test_new_request_joins_the_running_batch(llm, client, ref, monkeypatch):
    """A short request sent while a long one streams finishes long before the long one does."""
    Fault(llm, monkeypatch)
    long = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True,
                                     extra_body=NO_EOS)
    pieces, short, done_after = [], None, None
    with ThreadPoolExecutor(1) as pool:
        for chunk in long:
            pieces.append(chunk.choices[0].text)
            if short is None:
                short = pool.submit(client.completions.create, model=MODEL, prompt="for i in", max_tokens=8,
                                    temperature=0, extra_body=NO_EOS)
            elif done_after is None and short.done():
                done_after = len(pieces)
        assert done_after is not None and done_after < LONG // 2, f"short request done after {done_after} chunks"
        assert short.result().choices[0].text == greedy(ref, "for i in", 8, ignore_eos=True).text
    assert "".join(pieces) == greedy(ref, PROMPT, LONG, ignore_eos=True).text


def _next_event(lines) -> str:
    """The next SSE data line. `lines` must outlive the call: closing an httpx line iterator
    closes the connection, which the server rightly takes as the client leaving."""
    for line in lines:
        if line.startswith("data: "):
            return line
    raise AssertionError("the stream ended")


def test_disconnect_frees_the_slot_and_a_full_queue_gets_429(llm, http, client, ref, monkeypatch):
    Fault(llm, monkeypatch, delay=0.005)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True, **NO_EOS}
    before = metrics(http)
    with contextlib.ExitStack() as stack:
        running = [stack.enter_context(http.stream("POST", "/v1/completions", json=body)) for _ in range(2)]
        lines = [r.iter_lines() for r in running]
        for it in lines:
            _next_event(it)
        queued = [stack.enter_context(http.stream("POST", "/v1/completions", json=body)) for _ in range(2)]
        wait_for(lambda: metrics(http)["moespec_queue_length"] == 2)
        assert metrics(http)["moespec_running_requests"] == 2

        refused = http.post("/v1/completions", json={**body, "stream": False})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"

        running[0].close()  # the client goes away: its row goes to the first queued request
        assert _next_event(queued[0].iter_lines()).startswith("data: {")
        m = metrics(http)
        assert m["moespec_queue_length"] == 1 and m["moespec_running_requests"] == 2
    wait_for(lambda: metrics(http)["moespec_running_requests"] == 0 and metrics(http)["moespec_queue_length"] == 0)
    after = metrics(http)
    assert after['moespec_requests_total{outcome="cancelled"}'] - \
        before.get('moespec_requests_total{outcome="cancelled"}', 0) == 4
    assert after['moespec_rejected_requests_total{status="429"}'] == 1
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, extra_body=NO_EOS)
    assert out.choices[0].text == greedy(ref, PROMPT, 6, ignore_eos=True).text


def test_non_streaming_disconnect_cancels(llm, http, server, monkeypatch):
    Fault(llm, monkeypatch, delay=0.005)
    before = metrics(http).get('moespec_requests_total{outcome="cancelled"}', 0)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": LONG, "temperature": 0, **NO_EOS}
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=server.url, trust_env=False, timeout=0.2) as c:
        c.post("/v1/completions", json=body)
    wait_for(lambda: metrics(http).get('moespec_requests_total{outcome="cancelled"}', 0) == before + 1)
    assert metrics(http)["moespec_running_requests"] == 0


# --- failures inside the engine ------------------------------------------------------------------

def test_failure_in_one_request_fails_it_alone(llm, client, ref, monkeypatch):
    """A transfer error during a new request's prefill fails that request with a 500, while a
    request already streaming goes on to its exact greedy output."""
    fault = Fault(llm, monkeypatch, when=lambda tokens: tokens > 1)  # a prompt, not the one-row decode step
    stream = client.completions.create(model=MODEL, prompt="for i in", max_tokens=LONG, temperature=0, stream=True,
                                       extra_body=NO_EOS)
    pieces = [next(stream).choices[0].text]
    fault.armed = True
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    assert fault.fired == 1 and "injected transfer error" in e.value.message
    assert e.value.body["type"] == "server_error"
    pieces += [c.choices[0].text for c in stream]
    assert "".join(pieces) == greedy(ref, "for i in", LONG, ignore_eos=True).text
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert out.choices[0].text == greedy(ref, PROMPT, 8, ignore_eos=True).text


def test_failure_mid_stream_sends_an_error_event(llm, client, ref, monkeypatch):
    fault = Fault(llm, monkeypatch)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, temperature=0, stream=True,
                                       extra_body=NO_EOS)
    next(stream)
    fault.armed = True
    with pytest.raises(openai.APIError, match="injected transfer error"):
        list(stream)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, extra_body=NO_EOS)
    assert out.choices[0].text == greedy(ref, PROMPT, 8, ignore_eos=True).text


def test_transient_failure_in_a_batch_fails_nobody(llm, client, ref, monkeypatch):
    """A batched step that raises is retried row by row: a one-off error costs no request."""
    fault = Fault(llm, monkeypatch)
    prompts = [PROMPT, "for i in"]
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=LONG, temperature=0, stream=True,
                                         extra_body=NO_EOS) for p in prompts]
    pieces = [[next(s).choices[0].text] for s in streams]
    fault.armed = True
    for s, p in zip(streams, pieces):
        p += [c.choices[0].text for c in s]
    assert fault.fired == 1
    for prompt, p in zip(prompts, pieces):
        assert "".join(p) == greedy(ref, prompt, LONG, ignore_eos=True).text


# --- metrics, the load test, the command line --------------------------------------------------

def test_metrics_count_tokens_and_requests(http, client):
    before = metrics(http)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body=NO_EOS)
    done = 'moespec_requests_total{outcome="length"}'
    wait_for(lambda: metrics(http)[done] == before.get(done, 0) + 1)
    after = metrics(http)

    def delta(name):
        return after[name] - before.get(name, 0)

    assert delta("moespec_generation_tokens_total") == 5
    assert delta("moespec_prompt_tokens_total") == out.usage.prompt_tokens
    assert delta("moespec_time_per_output_token_seconds_count") == 4  # the first token comes from the prefill
    assert delta("moespec_time_to_first_token_seconds_count") == 1
    assert after['moespec_time_per_output_token_seconds_bucket{le="+Inf"}'] == \
        after["moespec_time_per_output_token_seconds_count"]
    for name in ("moespec_expert_cache_misses_total", "moespec_expert_bytes_moved_total",
                 "moespec_expert_stall_seconds_total", "moespec_queue_length", "moespec_running_requests"):
        assert name in after
    wait_for(lambda: metrics(http)["moespec_expert_cache_hits_total"] > before.get("moespec_expert_cache_hits_total", 0))


def test_metrics_report_the_expert_traffic_of_an_offloaded_model(model_dir):
    llm = LLM(model_dir, expert_cache="50%")
    try:
        with BackgroundServer(create_app(llm)) as s, httpx.Client(base_url=s.url, trust_env=False, timeout=60) as http:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 8, **NO_EOS}
            assert http.post("/v1/completions", json=body).status_code == 200
            names = {"hits": "moespec_expert_cache_hits_total", "misses": "moespec_expert_cache_misses_total",
                     "bytes_moved": "moespec_expert_bytes_moved_total"}
            wait_for(lambda: all(metrics(http)[n] == llm.stats().as_dict()[k] for k, n in names.items()))  # once idle
            assert metrics(http)["moespec_expert_cache_misses_total"] > 0
            assert metrics(http)["moespec_expert_bytes_moved_total"] > 0
    finally:
        llm.close()


def test_load_test_all_complete_and_equal_greedy(model_dir, capsys, monkeypatch):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("load_test", path)
    load_test = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "load_test", load_test)  # its dataclass looks itself up there
    spec.loader.exec_module(load_test)
    argv = ["--model", str(model_dir), "--clients", "4", "--requests", "8", "--max-tokens", "12", "--time-limit", "60"]
    code = load_test.main(argv)
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report
    assert (report["completed"], report["lost"], report["failed"], report["mismatched"]) == (8, 0, 0, 0)
    assert report["completion_tokens"] == 8 * 12


@contextlib.contextmanager
def cli_server(*args: str):
    """`moespec serve ARGS` in a subprocess on a free loopback port: yields (client, outputs),
    where outputs gets the process's output once it has stopped (SIGINT, exit code 0 checked)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moespec.cli", "serve", *args, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs: list[str] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60) as c:
            def up():
                assert proc.poll() is None, proc.stdout.read()
                with contextlib.suppress(httpx.TransportError):
                    return c.get("/health").status_code == 200
            wait_for(up, timeout=60)
            yield c, outputs
    finally:
        proc.send_signal(signal.SIGINT)
        outputs.append(proc.communicate(timeout=30)[0])
    assert proc.returncode == 0, outputs[0]


def test_cli_serve(model_dir):
    with cli_server("--model", str(model_dir), "--max-batch-size", "2") as (c, outputs):
        assert c.get("/v1/models").json()["data"][0]["id"] == MODEL
    assert re.search(r"Uvicorn running on http://127\.0\.0\.1:\d+", outputs[0])


SHIPPED = Path(__file__).resolve().parent.parent / "models" / "tiny-qwen2moe"
ENGINE_OPTIONS = {"expert_cache": "25%", "prefetch": "estimator", "speculative": "self"}


def test_cli_serve_runs_the_engine_options_of_generate():
    """`moespec serve` with an offloaded cache, estimator prefetching and self-speculative decoding:
    greedy completions of requests that join a running batch equal `LLM.generate` with the same
    options, and the metrics show that prefetches and drafts happened."""
    flags = [x for k, v in ENGINE_OPTIONS.items() for x in ("--" + k.replace("_", "-"), v)]
    prompts = ["def add(a, b):\n", "import os\n\n\ndef ", "class Stack:\n    def push(self, x):\n"]
    with cli_server("--model", str(SHIPPED), *flags, "--max-batch-size", "2") as (c, _):
        def complete(prompt: str) -> str:
            body = {"model": SHIPPED.name, "prompt": prompt, "max_tokens": 24, "temperature": 0, **NO_EOS}
            return c.post("/v1/completions", json=body).json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:  # 3 requests, 2 rows: one joins while the others run
            served = list(pool.map(complete, prompts))
        counters = {line.split(" ")[0]: float(line.split(" ")[1]) for line in c.get("/metrics").text.splitlines()
                    if line.startswith("moespec_")}
    llm = LLM(SHIPPED, **ENGINE_OPTIONS)
    assert served == [greedy(llm, p, 24, ignore_eos=True).text for p in prompts]
    assert counters["moespec_expert_prefetches_total"] > 0 and counters["moespec_spec_decode_draft_tokens_total"] > 0
    llm.close()


def test_cli_serve_rejects_bad_options(model_dir, capsys):
    assert cli_main(["serve", "--model", str(model_dir), "--max-batch-size", "0"]) == 2
    assert capsys.readouterr().err == "moespec: error: --max-batch-size must be >= 1, got 0\n"
    assert cli_main(["serve", "--model", str(model_dir), "--port", "99999"]) == 2
    assert capsys.readouterr().err == "moespec: error: --port must be in [0, 65535], got 99999\n"
    with pytest.raises(SystemExit) as e:  # argparse's own errors: one line too, exit code 2
        cli_main(["serve", "--max-queue", "1.5"])
    assert e.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
