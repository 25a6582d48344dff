"""Load test of `moespec serve`: N concurrent streaming clients, every answer checked.

Starts the server in this process on a free 127.0.0.1 port, then sends `--requests` streaming
/v1/completions requests from `--clients` concurrent clients (greedy, `ignore_eos`, so each
request generates exactly `--max-tokens` tokens). Every request must complete, and its streamed
text must equal a single-request greedy run of `LLM.generate` on the same prompt, computed before
the server starts. Bounded: at most `--requests` requests and `--time-limit` seconds; nothing
leaves the loopback interface. Prints a JSON report; exits 1 if any request was lost, failed or
differs.

    python benchmarks/load_test.py --model models/tiny-mixtral --clients 8 --requests 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass

import httpx

from moespec import LLM
from moespec.serve import BackgroundServer, create_app

PROMPTS = ["def add(a, b):", "for i in range(10):", "import os\n", "class Stack:\n    def push(self, x):",
           "print(", "while True:", "x = [i * i for i in", "return a + b", "with open(path) as f:",
           "if __name__ == '__main__':"]


@dataclass
class Result:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    first_token_s: float | None = None
    latency_s: float = 0.0
    error: str | None = None


async def stream_completion(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> Result:
    """One streaming request, read to its `[DONE]`."""
    res, t0, done = Result(), time.perf_counter(), False
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            res.error = f"HTTP {response.status_code}: {(await response.aread()).decode(errors='replace')}"
            return res
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                res.error = chunk["error"]["message"]
            for choice in chunk.get("choices", []):
                if choice["text"] and res.first_token_s is None:
                    res.first_token_s = time.perf_counter() - t0
                res.text += choice["text"]
                res.finish_reason = choice["finish_reason"] or res.finish_reason
            if chunk.get("usage"):
                res.completion_tokens = chunk["usage"]["completion_tokens"]
    res.latency_s = time.perf_counter() - t0
    if not done and res.error is None:
        res.error = "stream ended without [DONE]"
    return res


async def run_clients(url: str, model: str, prompts: list[str], clients: int, max_tokens: int,
                      time_limit: float) -> dict[int, Result]:
    """Send every prompt once from `clients` concurrent clients; results by prompt index.

    Requests still running at the time limit are missing from the result (lost).
    """
    results: dict[int, Result] = {}
    todo = iter(range(len(prompts)))
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, trust_env=False, timeout=time_limit, limits=limits) as client:

        async def client_loop() -> None:
            for i in todo:
                results[i] = await stream_completion(client, model, prompts[i], max_tokens)

        try:
            await asyncio.wait_for(asyncio.gather(*(client_loop() for _ in range(clients))), time_limit)
        except asyncio.TimeoutError:
            pass
    return results


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def load_test(llm: LLM, clients: int, requests: int, max_tokens: int, time_limit: float,
              max_batch_size: int | None = None) -> dict:
    """Run the test against a fresh server for `llm`; return the report."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
    t0 = time.perf_counter()
    expected = {p: llm.generate(p, max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)[0].text
                for p in dict.fromkeys(prompts)}
    reference_s = time.perf_counter() - t0
    app = create_app(llm, max_batch_size=max_batch_size or clients, max_queue=requests)
    with BackgroundServer(app) as server:
        t0 = time.perf_counter()
        results = asyncio.run(run_clients(server.url, llm.path.name, prompts, clients, max_tokens, time_limit))
        wall = time.perf_counter() - t0
    failed = {i: r.error for i, r in results.items() if r.error is not None}
    ok = {i: r for i, r in results.items() if r.error is None}
    mismatched = [i for i, r in ok.items()
                  if r.text != expected[prompts[i]] or r.completion_tokens != max_tokens or r.finish_reason != "length"]
    tokens = sum(r.completion_tokens for r in ok.values())
    return {
        "clients": clients, "requests": requests, "max_tokens": max_tokens,
        "max_batch_size": max_batch_size or clients,
        "completed": len(ok), "lost": requests - len(results), "failed": len(failed), "mismatched": len(mismatched),
        "errors": sorted(set(failed.values()))[:5],
        "wall_seconds": round(wall, 3), "completion_tokens": tokens, "tokens_per_second": round(tokens / wall, 1),
        "first_token_p50_s": _percentile([r.first_token_s for r in ok.values() if r.first_token_s is not None], 50),
        "latency_p50_s": _percentile([r.latency_s for r in ok.values()], 50),
        "latency_p95_s": _percentile([r.latency_s for r in ok.values()], 95),
        "reference_seconds": round(reference_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--expert-cache", default="100%", help="device budget for routed experts (as `moespec generate`)")
    p.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=32, help="requests in all")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument("--max-batch-size", type=int, default=None, help="server batch rows (default: --clients)")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds for the whole client phase")
    args = p.parse_args(argv)
    cache = int(args.expert_cache) if args.expert_cache.isdigit() else args.expert_cache
    llm = LLM(args.model, device=args.device, dtype=args.dtype, expert_cache=cache)
    try:
        report = load_test(llm, args.clients, args.requests, args.max_tokens, args.time_limit, args.max_batch_size)
    finally:
        llm.close()
    print(json.dumps(report, indent=2))
    return 0 if report["completed"] == args.requests and report["mismatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
