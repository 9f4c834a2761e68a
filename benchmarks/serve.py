"""Load and fault benchmark of the OpenAI-compatible server (loopback only; every run bounded in count and time).

    python benchmarks/serve.py --json benchmarks/serve.json                  # 64 clients x 4 requests + Poisson TTFT
    python benchmarks/serve.py --quick                                        # 8 clients x 2 requests
    python benchmarks/serve.py --faults --json benchmarks/serve_faults.json  # 256 clients, mixed traffic and faults
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model helios     # against a running server (no faults)

Without --url, a server (scripts/serve.py, one fixed arm of `--candidate`) is started as a subprocess on a free
loopback port and stopped with SIGTERM afterwards.

Load (default): C closed-loop clients x R requests with the official async `openai` client; half completions, half
chat (every 4th streamed). Reported: errors, latency p50/p95/max per request (wall clock at the client), generated
tokens per second (sum of completion tokens / wall time), first streamed chunk vs whole latency, the server's mean
sequences per decode step (continuous batching, from /metrics). Then `--poisson-requests` streamed requests with
Poisson arrivals at `--poisson-rps` (open loop: arrivals do not wait for answers): client TTFT p50/p95 (first text
chunk) and end-to-end p50/p95; the server's own TTFT histogram mean is reported beside it.

Faults (`--faults`): 256 concurrent raw-httpx clients (`--clients`), `--requests` each, mixed: non-streamed and
streamed completions and chat, greedy and sampled (seeded), clients that disconnect after the first streamed chunk,
malformed requests (bad JSON, wrong types, a lone surrogate, max_tokens 0) and oversized bodies (over the server's
`max_body_mib`). 429s are retried after their Retry-After (at most 5 times), as a client should. Then the delay a
10 MB prompt (under a raised body limit, so it reaches the prompt-length pre-check) adds to a concurrent short
request (median of 5 pairs against 5 alone), the server's peak RSS (VmHWM), and a SIGTERM drain: 8 requests in
flight at the signal must all come back 200. Reported: {clients, requests, errors_5xx, lost_valid_requests,
p50_latency_s, p95_latency_s, peak_rss_mib, short_request_delay_with_large_prompt_s} + details.
Figures and the load they ran under: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(candidate: str, max_batch_size: int, log: Path, overrides: tuple[str, ...] = ()
                 ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), f"port={port}", f"candidate={candidate}",
         "energy.kind=model", "log_level=warning", f"max_batch_size={max_batch_size}",
         f"hydra.run.dir={log.parent / 'serve_run'}", *overrides], cwd=ROOT, env=env, stdout=log.open("w"),
        stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start; see {log}")
        time.sleep(0.25)


async def client_task(client: openai.AsyncOpenAI, model: str, index: int, requests: int, max_tokens: int,
                      latencies: list[float], tokens: list[int], errors: list[str],
                      stream_ttft: list[float], stream_latency: list[float]) -> None:
    for r in range(requests):
        started = time.perf_counter()
        prompt = f"Client {index} request {r}: tell me about"
        try:
            if (index + r) % 2 == 0:
                reply = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                                        temperature=0)
                tokens.append(reply.usage.completion_tokens)
            elif (index + r) % 4 == 1:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True}, temperature=0)
                first = None
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - started
                    if chunk.usage is not None:
                        tokens.append(chunk.usage.completion_tokens)
                if first is not None:
                    stream_ttft.append(first)
                    stream_latency.append(time.perf_counter() - started)
            else:
                reply = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0)
                tokens.append(reply.usage.completion_tokens)
            latencies.append(time.perf_counter() - started)
        except Exception as error:  # noqa: BLE001 (counted and reported: the benchmark's pass criterion)
            errors.append(f"{type(error).__name__}: {error}")


async def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int,
                   api_key: str) -> dict[str, Any]:
    latencies: list[float] = []
    tokens: list[int] = []
    errors: list[str] = []
    stream_ttft: list[float] = []
    stream_latency: list[float] = []
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8), timeout=600)
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, http_client=http) as client:
        started = time.perf_counter()
        await asyncio.gather(*[client_task(client, model, i, requests, max_tokens, latencies, tokens, errors,
                                           stream_ttft, stream_latency)
                               for i in range(clients)])
        wall = time.perf_counter() - started
    lat = np.array(latencies) if latencies else np.array([np.nan])
    return {"clients": clients, "requests_per_client": requests, "requests": clients * requests,
            "errors": len(errors), "error_samples": errors[:5], "max_tokens": max_tokens, "wall_s": wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "latency_max_s": float(np.max(lat)), "completion_tokens": int(sum(tokens)),
            "tokens_per_s": float(sum(tokens) / wall), "requests_per_s": float(len(latencies) / wall),
            # Streamed requests: time to the first text chunk vs to the last (incremental streaming shows as a gap).
            "stream_requests": len(stream_ttft),
            "stream_ttft_p50_s": float(np.median(stream_ttft)) if stream_ttft else None,
            "stream_latency_p50_s": float(np.median(stream_latency)) if stream_latency else None}


def scrape(url: str) -> dict[str, float]:
    """Unlabelled samples of the server's /metrics."""
    values: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.split()[:2]
            values[name] = float(value)
    return values


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Continuous batching between two scrapes: decode steps, and tokens generated per decode step (mean running
    sequences per step, prefill tokens aside)."""
    steps = after.get("helios_decode_steps_total", 0.0) - before.get("helios_decode_steps_total", 0.0)
    tokens = after.get("helios_generation_tokens_total", 0.0) - before.get("helios_generation_tokens_total", 0.0)
    return {"decode_steps": steps, "tokens_per_decode_step": tokens / steps if steps else 0.0}


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def stream_ttft(http: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      ) -> tuple[float | None, float, int]:
    """(client TTFT: first text chunk, end-to-end seconds, HTTP status) of one streamed greedy completion."""
    started = time.perf_counter()
    first = None
    async with http.stream("POST", url + "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0}) as response:
        async for line in response.aiter_lines():
            if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0].get("text"):
                first = time.perf_counter() - started
    return first, time.perf_counter() - started, response.status_code


async def run_poisson(url: str, model: str, rate_rps: float, requests: int, max_tokens: int, seed: int = 0
                      ) -> dict[str, Any]:
    """Open-loop Poisson arrivals of streamed requests: TTFT and end-to-end latency at the client."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1.0 / rate_rps, size=requests))
    before = scrape(url)
    results: list[tuple[float | None, float, int]] = []
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=requests + 8), timeout=600)

    async def one(i: int, at_s: float, start: float) -> None:
        await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
        try:
            results.append(await stream_ttft(http, url, model, f"Request {i}: tell me about", max_tokens))
        except Exception:  # noqa: BLE001 (counted as an error)
            results.append((None, math.nan, -1))

    start = time.perf_counter()
    async with http:
        await asyncio.gather(*[one(i, float(t), start) for i, t in enumerate(arrivals)])
    after = scrape(url)
    ttft = [r[0] for r in results if r[0] is not None and r[2] == 200]
    e2e = [r[1] for r in results if r[2] == 200]
    served_ttft = after.get("helios_ttft_seconds_sum", 0.0) - before.get("helios_ttft_seconds_sum", 0.0)
    served_n = after.get("helios_ttft_seconds_count", 0.0) - before.get("helios_ttft_seconds_count", 0.0)
    return {"rate_rps": rate_rps, "requests": requests, "max_tokens": max_tokens,
            "errors": sum(r[2] != 200 for r in results), "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "e2e_p50_s": pct(e2e, 50), "e2e_p95_s": pct(e2e, 95),
            "server_ttft_mean_s": served_ttft / served_n if served_n else None, **batch_stats(before, after)}


# ------------------------------------------------------------------------------------------------ faults

MALFORMED: tuple[bytes, ...] = (
    b'{"model": "helios", "prompt": ',  # truncated JSON
    b'{"model": "helios", "prompt": 12, "max_tokens": 4}',  # wrong type
    b'{"model": "helios", "prompt": "poison \ud800 here", "max_tokens": 4}',  # a lone surrogate
    b'{"model": "helios", "prompt": "zero", "max_tokens": 0}',  # out of range
)


@dataclasses.dataclass
class FaultTally:
    latencies_s: list[float] = dataclasses.field(default_factory=list)  # valid requests answered 200
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    errors_5xx: int = 0
    lost_valid: int = 0
    valid: int = 0
    retried_429: int = 0
    disconnected: int = 0
    samples: list[str] = dataclasses.field(default_factory=list)

    def status(self, kind: str, code: int | str) -> None:
        key = f"{kind}:{code}"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if isinstance(code, int) and code >= 500:
            self.errors_5xx += 1


async def fault_client(http: httpx.AsyncClient, url: str, model: str, index: int, requests: int, max_tokens: int,
                       oversized: bytes, tally: FaultTally) -> None:
    for r in range(requests):
        k = (index * requests + r) % 20  # the traffic mix, per 20 requests
        if k == 0:  # malformed (4 kinds in turn)
            response = await http.post(url + "/v1/completions", content=MALFORMED[(index + r) % len(MALFORMED)],
                                       headers={"content-type": "application/json"})
            tally.status("malformed", response.status_code)
            continue
        if k == 1:  # oversized body
            try:
                response = await http.post(url + "/v1/completions", content=oversized,
                                           headers={"content-type": "application/json"})
                tally.status("oversized", response.status_code)
            except httpx.TransportError as error:  # the server may close the connection after its 413
                tally.status("oversized", type(error).__name__)
            continue
        if k in (2, 3):  # a client that leaves after the first streamed chunk
            async with http.stream("POST", url + "/v1/completions", json={
                    "model": model, "prompt": f"leaving {index}-{r}", "max_tokens": 4 * max_tokens,
                    "stream": True}) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        break
            tally.status("disconnect", response.status_code)
            tally.disconnected += 1
            continue
        sampled = k % 2 == 0
        sampling = {"temperature": 0.8, "seed": index * 1000 + r} if sampled else {"temperature": 0}
        chat = k % 3 == 0
        streamed = k % 4 == 1
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": streamed, **sampling}
        if chat:
            body["messages"] = [{"role": "user", "content": f"client {index} request {r}"}]
        else:
            body["prompt"] = f"client {index} request {r}: tell me about"
        tally.valid += 1
        started = time.perf_counter()
        ok = False
        for _attempt in range(6):  # 429: retry after Retry-After, at most 5 times
            try:
                if streamed:
                    async with http.stream("POST", url + path, json=body) as response:
                        done = False
                        async for line in response.aiter_lines():
                            done = done or line == "data: [DONE]"
                            if line.startswith("data: {") and '"error"' in line:
                                done = False
                                tally.samples.append(line[:200])
                        code = response.status_code
                        ok = code == 200 and done
                else:
                    response = await http.post(url + path, json=body)
                    code = response.status_code
                    ok = code == 200 and bool(response.json()["choices"])
            except httpx.TransportError as error:
                code = type(error).__name__
            tally.status("valid", code)
            if code == 429:
                tally.retried_429 += 1
                await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                continue
            break
        if ok:
            tally.latencies_s.append(time.perf_counter() - started)
        else:
            tally.lost_valid += 1
            if len(tally.samples) < 5:
                tally.samples.append(f"{path} -> {code}")


async def short_request_s(http: httpx.AsyncClient, url: str, model: str) -> float:
    started = time.perf_counter()
    response = await http.post(url + "/v1/completions", json={"model": model, "prompt": "short", "max_tokens": 4,
                                                               "temperature": 0})
    assert response.status_code == 200, response.text
    return time.perf_counter() - started


async def large_prompt_delay(url: str, model: str, prompt_mb: float, pairs: int = 5) -> dict[str, Any]:
    """Median latency of a short request alone and with a `prompt_mb` MB prompt sent just before it."""
    big = json.dumps({"model": model, "prompt": "x" * int(prompt_mb * 1e6), "max_tokens": 4}).encode()
    alone: list[float] = []
    together: list[float] = []
    big_statuses: list[int] = []
    async with httpx.AsyncClient(timeout=300) as http:
        for _ in range(pairs):
            alone.append(await short_request_s(http, url, model))

            async def send_big() -> None:
                response = await http.post(url + "/v1/completions", content=big,
                                           headers={"content-type": "application/json"})
                big_statuses.append(response.status_code)

            task = asyncio.create_task(send_big())
            await asyncio.sleep(0.05)  # the large body is on its way
            together.append(await short_request_s(http, url, model))
            await task
    return {"prompt_mb": prompt_mb, "alone_p50_s": float(np.median(alone)),
            "with_large_prompt_p50_s": float(np.median(together)),
            "delay_s": float(np.median(together) - np.median(alone)), "large_prompt_statuses": sorted(set(big_statuses))}


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def sigterm_drain(process: subprocess.Popen, url: str, model: str, requests: int = 8) -> dict[str, Any]:
    """Send `requests`, SIGTERM once the server holds them all, and check that each is answered 200."""
    import threading

    results: dict[int, Any] = {}

    def call(i: int) -> None:
        try:
            results[i] = httpx.post(url + "/v1/completions", timeout=300, json={
                "model": model, "prompt": f"drain {i}", "max_tokens": 32, "temperature": 0}).status_code
        except Exception as error:  # noqa: BLE001 (reported)
            results[i] = repr(error)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(requests)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 60
    while time.time() < deadline:
        m = scrape(url)
        if m.get("helios_waiting_sequences", 0) + m.get("helios_running_sequences", 0) >= requests:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(300)
    code = process.wait(120)
    statuses = [results.get(i) for i in range(requests)]
    return {"requests": requests, "statuses": statuses, "all_200": statuses == [200] * requests, "exit_code": code}


async def run_faults(url: str, model: str, clients: int, requests: int, max_tokens: int, oversized_mb: float,
                     deadline_s: float) -> dict[str, Any]:
    tally = FaultTally()
    oversized = json.dumps({"model": model, "prompt": "o" * int(oversized_mb * 1e6), "max_tokens": 4}).encode()
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8), timeout=deadline_s)
    started = time.perf_counter()
    async with http:
        await asyncio.wait_for(asyncio.gather(*[fault_client(http, url, model, i, requests, max_tokens, oversized,
                                                             tally) for i in range(clients)]), deadline_s)
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": clients * requests, "errors_5xx": tally.errors_5xx,
            "lost_valid_requests": tally.lost_valid, "valid_requests": tally.valid,
            "p50_latency_s": pct(tally.latencies_s, 50), "p95_latency_s": pct(tally.latencies_s, 95),
            "wall_s": wall, "retried_429": tally.retried_429, "disconnected_streams": tally.disconnected,
            "statuses": dict(sorted(tally.statuses.items())), "samples": tally.samples[:5]}


def machine_load() -> dict[str, Any]:
    """Where the figures came from: cores and the load average when the run ended (the machine may be shared)."""
    return {"cpus": os.cpu_count(), "loadavg_1_5_15": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; default: start one")
    parser.add_argument("--model", default="helios", help="served model name")
    parser.add_argument("--api-key", default=os.environ.get("HELIOS_API_KEY", "unused"))
    parser.add_argument("--candidate", default="tiny-llama", help="candidate of the started server")
    parser.add_argument("--clients", type=int, default=None, help="default: 64 (load), 256 (faults)")
    parser.add_argument("--requests", type=int, default=None, help="requests per client; default: 4 (load), 2 (faults)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--poisson-rps", type=float, default=4.0, help="Poisson arrival rate of the TTFT run")
    parser.add_argument("--poisson-requests", type=int, default=64, help="0: no Poisson run")
    parser.add_argument("--faults", action="store_true", help="the fault-injection run instead of the load run")
    parser.add_argument("--max-body-mib", type=float, default=12.0, help="faults: the started server's body limit")
    parser.add_argument("--large-prompt-mb", type=float, default=10.0, help="faults: the large prompt's size")
    parser.add_argument("--deadline-s", type=float, default=900.0, help="faults: bound on the mixed-traffic run")
    parser.add_argument("--threads", type=int, default=None, help="the started server's torch threads")
    parser.add_argument("--quick", action="store_true", help="8 clients x 2 requests, 16 Poisson requests")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    clients = args.clients or (8 if args.quick else 256 if args.faults else 64)
    requests = args.requests or (2 if args.quick or args.faults else 4)
    poisson_requests = 16 if args.quick else args.poisson_requests
    process = None
    url = args.url
    if args.faults and url is not None:
        parser.error("--faults starts its own server (it sends it SIGTERM at the end)")
    overrides: tuple[str, ...] = (f"max_body_mib={args.max_body_mib}", f"max_queued_sequences={2 * clients}") \
        if args.faults else ()
    if args.threads:
        overrides += (f"threads={args.threads}",)
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="helios_bench_serve_")) / "server.log"
        process, url = start_server(args.candidate, args.max_batch_size, log, overrides)
    server = {"url": url if args.url else "subprocess", "candidate": None if args.url else args.candidate,
              "max_batch_size": None if args.url else args.max_batch_size, "overrides": list(overrides)}
    try:
        if args.faults:
            result = asyncio.run(run_faults(url, args.model, clients, requests, args.max_tokens,
                                            args.max_body_mib * 1.1, args.deadline_s))
            delay = asyncio.run(large_prompt_delay(url, args.model, args.large_prompt_mb))
            result["short_request_delay_with_large_prompt_s"] = delay["delay_s"]
            result["large_prompt"] = delay
            assert process is not None
            result["peak_rss_mib"] = peak_rss_mib(process.pid)
            result["sigterm_drain"] = sigterm_drain(process, url, args.model)
            process = None
            failed = bool(result["errors_5xx"] or result["lost_valid_requests"] or not result["sigterm_drain"]["all_200"])
        else:
            before = scrape(url)
            result = asyncio.run(run_load(url, args.model, clients, requests, args.max_tokens, args.api_key))
            result.update(batch_stats(before, scrape(url)))
            if poisson_requests:
                result["poisson"] = asyncio.run(run_poisson(url, args.model, args.poisson_rps, poisson_requests,
                                                            args.max_tokens))
            failed = bool(result["errors"] or (result.get("poisson") or {}).get("errors"))
        result["server"] = server
        result["machine"] = machine_load()
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            result_code = process.wait(120)
            print(f"server exited with {result_code} after SIGTERM", file=sys.stderr)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
