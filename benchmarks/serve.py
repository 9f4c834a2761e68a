"""Load benchmark of the OpenAI-compatible server: C concurrent clients x R requests each, zero errors expected.

    python benchmarks/serve.py --json benchmarks/serve.json                 # 64 clients x 4 requests, tiny-llama
    python benchmarks/serve.py --quick                                       # 8 clients x 2 requests
    python benchmarks/serve.py --url http://127.0.0.1:8000 --model helios    # against a running server

Without --url, a server (scripts/serve.py, one fixed arm of `--candidate`) is started as a subprocess on a free
loopback port and stopped with SIGTERM afterwards. Clients use the official async `openai` client; half of the
requests are completions, half chat (every 4th one streamed). Reported: errors, latency p50/p95/max per request
(wall clock at the client), generated tokens per second over the whole run (sum of completion tokens / wall time),
time to the first streamed text chunk against the streamed request's whole latency,
and the server's batch-size distribution from /metrics (how much dynamic batching happened).
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def start_server(candidate: str, max_batch_size: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), f"port={port}", f"candidate={candidate}",
         "energy.kind=model", "log_level=warning", f"max_batch_size={max_batch_size}",
         f"hydra.run.dir={log.parent / 'serve_run'}"], cwd=ROOT, env=env, stdout=log.open("w"),
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
                reply = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
                tokens.append(reply.usage.completion_tokens)
            elif (index + r) % 4 == 1:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True,
                    stream_options={"include_usage": True})
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
                    model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens)
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


def batch_stats(url: str) -> dict[str, float]:
    """Mean engine batch size and batch count, from the server's Prometheus histogram."""
    text = httpx.get(url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        for key in ("helios_batch_size_sum", "helios_batch_size_count"):
            if line.startswith(key + " "):
                values[key] = float(line.split()[-1])
    count = values.get("helios_batch_size_count", 0.0)
    return {"batches": count, "mean_batch_size": values.get("helios_batch_size_sum", 0.0) / max(count, 1.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="a running server; default: start one")
    parser.add_argument("--model", default="helios", help="served model name")
    parser.add_argument("--api-key", default=os.environ.get("HELIOS_API_KEY", "unused"))
    parser.add_argument("--candidate", default="tiny-llama", help="candidate of the started server")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="8 clients x 2 requests")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests = 8, 2
    process = None
    url = args.url
    if url is None:
        log = Path(tempfile.mkdtemp(prefix="helios_bench_serve_")) / "server.log"
        process, url = start_server(args.candidate, args.max_batch_size, log)
    try:
        result = asyncio.run(run_load(url, args.model, args.clients, args.requests, args.max_tokens, args.api_key))
        result.update(batch_stats(url))
        result["server"] = {"url": url if args.url else "subprocess", "candidate": None if args.url else args.candidate,
                            "max_batch_size": None if args.url else args.max_batch_size}
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            result_code = process.wait(120)
            print(f"server exited with {result_code} after SIGTERM", file=sys.stderr)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    if result["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
