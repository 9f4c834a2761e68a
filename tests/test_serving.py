"""The OpenAI-compatible server, checked with the official `openai` client against a real uvicorn on loopback.

    python -m pytest tests/test_serving.py -q

Servers run in a thread (uvicorn.Server) on a free 127.0.0.1 port with the tiny test model, except the SIGTERM test
(a subprocess of scripts/serve.py, so that the signal reaches a real process) and one slow SmolLM2 test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from agents import make_agent
from helios.serving.server import build_server

ROOT = Path(__file__).resolve().parents[1]
TINY_CONTEXT = 256  # small, so that a too-long prompt is cheap to build


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_config(**overrides: Any) -> dict[str, Any]:
    cfg = {"policy": None, "learn": False, "candidate": "tiny-llama", "depth": None, "initial_arm": None,
           "api_key": None, "served_model_name": "helios", "default_max_tokens": 8, "epoch_s": 60.0,
           "memory_budget_mib": 64, "context_tokens": TINY_CONTEXT, "max_batch_size": 8, "device": "cpu",
           "dtype": "float32", "energy": {"kind": "model"}, "slo": None}
    cfg.update(overrides)
    return cfg


class ThreadServer:
    """uvicorn in a background thread; `stop()` is uvicorn's graceful shutdown (which drains the engine worker)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.parts = build_server(cfg, make_agent=make_agent)
        self.app, self.core, self.controller = self.parts.app, self.parts.core, self.parts.controller
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server() -> Iterator[ThreadServer]:
    running = ThreadServer(serve_config())
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def hf_greedy_text(prompt: str, max_new_tokens: int) -> str:
    """Independent reference: Hugging Face generate (greedy) on the full tiny model, decoded like the server."""
    import torch

    from tests.conftest import load_cached

    loaded = load_cached("tiny-llama")
    ids = loaded.tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    return loaded.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------ happy paths


def test_models_list(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["helios"]


def test_completion_is_greedy_and_matches_hf_generate(client: openai.OpenAI, server: ThreadServer) -> None:
    prompt = "def fibonacci(n):"
    response = client.completions.create(model="helios", prompt=prompt, max_tokens=12, temperature=0)
    text = response.choices[0].text
    engine = server.core.engine
    result = engine.generate(engine.encode([prompt]), 12)
    tokens = [t for t in result.tokens[0] if t not in engine.eos_ids]
    assert text == engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
    assert text == hf_greedy_text(prompt, 12)
    assert response.usage.completion_tokens == len(tokens)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_chat_and_streaming_agree(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    full = client.chat.completions.create(model="helios", messages=messages, max_tokens=10, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="helios", messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True}, temperature=0)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_stream(client: openai.OpenAI) -> None:
    full = client.completions.create(model="helios", prompt="The capital of France is", max_tokens=6, seed=3)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="helios", prompt="The capital of France is", max_tokens=6, stream=True, seed=3))
    assert streamed == full.choices[0].text


# ------------------------------------------------------------------------------------------------ sampling


def test_same_seed_same_text_through_the_openai_client(server: ThreadServer) -> None:
    """A seeded request gives the same text alone and batched with other (sampled and greedy) requests; another
    seed gives another text; and it is not the greedy text (it really samples)."""
    prompt, args = "Once upon a time", {"model": "helios", "max_tokens": 12, "temperature": 1.0, "top_p": 0.95}
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    first = client.completions.create(prompt=prompt, seed=42, **args).choices[0].text

    async def crowd() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            replies = await asyncio.gather(
                aclient.completions.create(prompt="noise", seed=1, **args),
                aclient.completions.create(prompt=prompt, seed=42, **args),
                aclient.completions.create(prompt="more noise here", temperature=0, model="helios", max_tokens=5),
                aclient.completions.create(prompt=prompt, seed=43, **args))
        return [r.choices[0].text for r in replies]

    texts = asyncio.run(crowd())
    assert texts[1] == first
    assert texts[3] != first
    assert first != hf_greedy_text(prompt, 12)
    chat = [client.chat.completions.create(model="helios", messages=[{"role": "user", "content": "hi"}], seed=7,
                                           max_tokens=10, temperature=1.2, extra_body={"top_k": 50})
            for _ in range(2)]
    assert chat[0].choices[0].message.content == chat[1].choices[0].message.content


def test_n_choices_are_seed_plus_index_on_both_endpoints(client: openai.OpenAI) -> None:
    args = {"model": "helios", "max_tokens": 8, "temperature": 1.0}
    prompts = ["alpha", "beta"]
    many = client.completions.create(prompt=prompts, n=3, seed=5, **args)
    assert [c.index for c in many.choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        for i in range(3):
            single = client.completions.create(prompt=prompt, seed=5 + i, **args).choices[0].text
            assert many.choices[p * 3 + i].text == single
    assert len({c.text for c in many.choices[:3]}) > 1
    messages = [{"role": "user", "content": "tell me"}]
    chat = client.chat.completions.create(messages=messages, n=3, seed=9, **args)
    assert [c.index for c in chat.choices] == [0, 1, 2]
    for i in range(3):
        single = client.chat.completions.create(messages=messages, seed=9 + i, **args).choices[0].message.content
        assert chat.choices[i].message.content == single
    pieces: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in client.chat.completions.create(messages=messages, n=3, seed=9, stream=True, **args):
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert pieces == {c.index: c.message.content for c in chat.choices}
    assert finishes == {c.index: c.finish_reason for c in chat.choices}


def hf_greedy_logprobs(prompt: str, max_new_tokens: int) -> tuple[list[int], list[list[float]]]:
    """Greedy tokens and log_softmax of HF's raw logits at each generated position (HF generate's output_logits)."""
    import torch

    from tests.conftest import load_cached

    loaded = load_cached("tiny-llama")
    ids = loaded.tokenizer(prompt, add_special_tokens=True, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id,
                                    output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [torch.log_softmax(step[0].double(), dim=-1).tolist() for step in out.logits]


def test_logprobs_shapes_and_values_on_both_endpoints(client: openai.OpenAI) -> None:
    prompt = "def fibonacci(n):"
    reply = client.completions.create(model="helios", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    choice = reply.choices[0]
    tokens, reference = hf_greedy_logprobs(prompt, 8)
    lp = choice.logprobs
    n = reply.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for t in range(n):
        assert lp.token_logprobs[t] == pytest.approx(reference[t][tokens[t]], abs=1e-4)  # HF's raw log-softmax
        top = sorted(reference[t], reverse=True)[:3]
        values = sorted(lp.top_logprobs[t].values(), reverse=True)
        # Keys are token texts: byte tokens that decode alike (U+FFFD) share a key, so there may be fewer than 3.
        assert 1 <= len(values) <= 4 and values[0] == pytest.approx(top[0], abs=1e-4)
        assert all(any(v == pytest.approx(r, abs=1e-4) for r in top) for v in values)
    sampled = client.completions.create(model="helios", prompt=prompt, max_tokens=8, temperature=1.5, seed=1,
                                        logprobs=0).choices[0].logprobs
    assert all(len(top) == 1 for top in sampled.top_logprobs)  # logprobs=0: the chosen token only
    chat = client.chat.completions.create(model="helios", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0.8, seed=2, logprobs=True, top_logprobs=4)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens  # (EOS is neither content nor counted)
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode())
        values = [alt.logprob for alt in entry.top_logprobs]
        assert len(values) == 4 and values == sorted(values, reverse=True) and entry.logprob <= values[0] + 1e-6
    assert client.chat.completions.create(model="helios", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4).choices[0].logprobs is None
    streamed: list = []
    for chunk in client.chat.completions.create(model="helios", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=8, temperature=0.8, seed=2, logprobs=True, top_logprobs=4,
                                                stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                streamed += c.logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_logprobs_stop_with_the_text_a_stop_string_cuts(client: openai.OpenAI) -> None:
    """With a stop string, logprobs cover exactly the tokens that make the returned text: the shortest prefix of
    HF's greedy tokens whose decode starts with that text."""
    from tests.conftest import load_cached

    prompt = "def fibonacci(n):"
    full = hf_greedy_text(prompt, 12)
    stop = next(c for c in full[3:] if c != "\ufffd" and c.isprintable())
    reply = client.completions.create(model="helios", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                      stop=[stop])
    text, lp = reply.choices[0].text, reply.choices[0].logprobs
    assert text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"
    tokens, reference = hf_greedy_logprobs(prompt, 12)
    decode = load_cached("tiny-llama").tokenizer.decode
    kept = len(lp.tokens)
    assert decode(tokens[:kept]).startswith(text) and not decode(tokens[: kept - 1]).startswith(text)
    assert lp.token_logprobs == pytest.approx([reference[t][tokens[t]] for t in range(kept)], abs=1e-4)


def test_bad_sampling_parameters_get_400_naming_valid_values(server: ThreadServer) -> None:
    url, chat = server.url + "/v1/completions", server.url + "/v1/chat/completions"
    ok = {"model": "helios", "prompt": "hi", "max_tokens": 2}
    ok_chat = {"model": "helios", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [(url, {"temperature": -1}, "temperature", "[0, 2]"), (url, {"temperature": 3}, "temperature", "[0, 2]"),
             (url, {"top_p": 0}, "top_p", "(0, 1]"), (chat, {"top_p": 1.5}, "top_p", "(0, 1]"),
             (url, {"top_k": -3}, "top_k", ">= 1, or 0 / -1"), (url, {"logprobs": 21}, "logprobs", "0..20"),
             (url, {"n": 0}, "n", "at least 1"), (url, {"n": 65}, "n", "at most 64"),
             (url, {"echo": True, "logprobs": 1}, "echo", "echo=false"),
             (chat, {"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
             (chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0..20")]
    for endpoint, extra, param, valid in cases:
        body = {**(ok if endpoint == url else ok_chat), **extra}
        error = assert_openai_error(httpx.post(endpoint, json=body), 400)
        assert error["param"] == param and valid in error["message"], (extra, error)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=r"\[0, 2\]"):
        client.completions.create(model="helios", prompt="hi", max_tokens=2, temperature=-1)


def test_streaming_is_incremental(client: openai.OpenAI, server: ThreadServer) -> None:
    """The first chunk reaches the client while the engine is still decoding: the decode loop is held at its 8th step
    until the client has seen text, which a stream sent after the sequence finished could never satisfy."""
    executor = server.core.executor
    original = executor.decode
    client_saw_text = threading.Event()
    held: list[bool] = []
    steps = [0]

    def gated(seqs: list) -> float:
        steps[0] += 1
        if steps[0] == 8:
            held.append(client_saw_text.wait(timeout=20))
        return original(seqs)

    executor.decode = gated  # type: ignore[method-assign]
    try:
        pieces = []
        for chunk in client.completions.create(model="helios", prompt="def fibonacci(n):", max_tokens=12,
                                               stream=True, temperature=0):
            if chunk.choices and chunk.choices[0].text:
                pieces.append(chunk.choices[0].text)
                client_saw_text.set()
    finally:
        del executor.decode  # back to the class's method
    assert held == [True], "no text reached the client before the sequence finished decoding"
    assert len(pieces) > 1
    assert "".join(pieces) == hf_greedy_text("def fibonacci(n):", 12)


def test_text_stream_holds_back_stop_strings_and_split_characters() -> None:
    """Fed token by token, the stream never sends a stop string's beginning or half a character, and its pieces
    concatenate to the stop-truncated decode of the whole output."""
    from helios.models import byte_tokenizer
    from helios.serving.text import TextStream

    tokenizer = byte_tokenizer()
    text = "abc ÉTÉ xy STOP here"
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, frozenset(), ["STOP"], max_tokens=100)
    pieces = [stream.push(t) for t in tokens]
    sent = "".join(pieces)
    assert sent == "abc ÉTÉ xy "
    assert all("\ufffd" not in p for p in pieces)
    assert "S" not in sent and stream.done
    assert stream.rest("abc ÉTÉ xy ") == ""
    # Once "S" (which may begin "STOP") has arrived, nothing past "xy " has been sent.
    through_s = len(tokenizer(text[: text.index("S") + 1], add_special_tokens=False)["input_ids"])
    assert "".join(pieces[:through_s]) == "abc ÉTÉ xy "
    limited = TextStream(tokenizer, frozenset(), [], max_tokens=3)
    assert "".join(limited.push(t) for t in tokens) == "abc"


def metric(server: ThreadServer, name: str) -> float:
    """One unlabelled sample of the server's /metrics (0 when absent)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_concurrent_requests_share_decode_steps(server: ThreadServer) -> None:
    """Continuous batching: 12 concurrent requests decode together (more tokens than decode steps), all answered."""
    steps_before, tokens_before = metric(server, "helios_decode_steps_total"), metric(server, "helios_generation_tokens_total")

    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0) as aclient:
            replies = await asyncio.gather(*[aclient.completions.create(model="helios", prompt=f"item {i}",
                                                                        max_tokens=8, temperature=0)
                                             for i in range(12)])
        return [r.choices[0].text for r in replies]

    texts = asyncio.run(run())
    assert len(texts) == 12
    steps = metric(server, "helios_decode_steps_total") - steps_before
    tokens = metric(server, "helios_generation_tokens_total") - tokens_before
    assert tokens >= 12 and steps > 0
    assert tokens / steps > 1.5  # one request per step would be <= 8 / 7 tokens per decode step


def test_metrics_and_health(server: ThreadServer, client: openai.OpenAI) -> None:
    client.completions.create(model="helios", prompt="x", max_tokens=4)
    text = httpx.get(server.url + "/metrics").text
    for name in ("helios_requests_total", "helios_request_latency_seconds_bucket", "helios_generation_tokens_total",
                 "helios_ttft_seconds_bucket", "helios_tpot_seconds_bucket", "helios_e2e_seconds_bucket",
                 "helios_queueing_delay_seconds_bucket", "helios_queue_length", "helios_running_sequences",
                 "helios_waiting_sequences", "helios_exit_layer_bucket", "helios_current_arm{"):
        assert name in text, name
    assert metric(server, "helios_ttft_seconds_count") >= 1
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["arm"]["candidate"] == "tiny-llama"


# ------------------------------------------------------------------------------------------------ faults


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_faults_get_4xx_and_the_worker_survives(server: ThreadServer, client: openai.OpenAI) -> None:
    url = server.url + "/v1/completions"
    ok = {"model": "helios", "prompt": "hi", "max_tokens": 2}
    assert_openai_error(httpx.post(url, content=b'{"model": "helios", "prompt": ', headers={
        "content-type": "application/json"}), 400)
    assert assert_openai_error(httpx.post(url, json={"model": "helios"}), 400)["param"] == "prompt"
    assert assert_openai_error(httpx.post(url, json={**ok, "max_tokens": "many"}), 400)["param"] == "max_tokens"
    assert_openai_error(httpx.post(url, json={**ok, "prompt": 12}), 400)
    for bad in (0, -5, 10**9):
        assert assert_openai_error(httpx.post(url, json={**ok, "max_tokens": bad}), 400)["param"] == "max_tokens"
    long_prompt = "x" * (TINY_CONTEXT + 10)
    error = assert_openai_error(httpx.post(url, json={**ok, "prompt": long_prompt}), 400)
    assert error["code"] == "context_length_exceeded"
    chat = server.url + "/v1/chat/completions"
    assert_openai_error(httpx.post(chat, json={"model": "helios", "messages": []}), 400)
    assert_openai_error(httpx.post(chat, json={"model": "helios", "messages": [{"role": "wizard", "content": "x"}]}),
                        400)
    assert_openai_error(httpx.post(chat, json={"model": "helios", "messages": [{"role": "user",
                                                                                "content": long_prompt}]}), 400)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="helios", prompt="hi", max_tokens=0)
    # A client that leaves mid-stream: the server ends that stream and goes on.
    with httpx.stream("POST", chat, json={"model": "helios", "messages": [{"role": "user", "content": "go"}],
                                          "max_tokens": 16, "stream": True}) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    assert client.completions.create(model="helios", prompt="still alive", max_tokens=3).choices[0].text is not None
    assert server.core.alive and httpx.get(server.url + "/health").status_code == 200
    assert 'status="5' not in httpx.get(server.url + "/metrics").text  # no 5xx was ever answered


def test_api_key() -> None:
    running = ThreadServer(serve_config(api_key="s3cret"))
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=running.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=running.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="helios", prompt="a", max_tokens=2).choices
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------------ policy + switching


def bandit_export(tmp_path: Path, agent: str = "ucb") -> Path:
    """A two-arm export (tiny-llama at full depth and at half depth) of a fresh agent, without training."""
    from helios.arms import arms_from_dicts
    from helios.observation import ObservationLayout
    from helios.policy import SCHEMA

    arms = []
    for index, depth in enumerate((6, 3)):
        arms.append({"index": index, "label": f"tiny-llama@{depth}/6 exit=none", "candidate": "tiny-llama",
                     "depth": depth, "num_layers": 6, "exit": "none", "criterion": "none", "threshold": 0.9,
                     "exit_points": [], "weight_bytes": 1, "kv_bytes_per_seq": 1, "batch_size": 4, "feasible": True})
    document = {"schema": SCHEMA, "kind": "bandit", "agent": agent, "arm_table": arms, "seed": 0,
                "observation_names": list(ObservationLayout.for_arms(arms_from_dicts(arms), 8, 8).names), "slo": None,
                "export": make_agent(agent, n_arms=2).export()}
    out = tmp_path / "export"
    out.mkdir()
    (out / "policy.json").write_text(json.dumps(document))
    return out


def test_policy_switches_arms_without_failing_requests(tmp_path: Path) -> None:
    """The controller thread decides every 50 ms from live epochs and switches arms while requests keep coming."""
    export = bandit_export(tmp_path)
    running = ThreadServer(serve_config(policy=str(export), learn=True, epoch_s=0.05))
    try:
        async def run() -> list[Any]:
            replies: list[Any] = []
            async with openai.AsyncOpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0) as aclient:
                for wave in range(40):  # waves until both arms have served (bounded), epochs pass meanwhile
                    replies += await asyncio.gather(*[aclient.chat.completions.create(
                        model="helios", messages=[{"role": "user", "content": f"q{wave}-{i}"}], max_tokens=4)
                        for i in range(6)])
                    if wave >= 3 and len({r.system_fingerprint for r in replies}) == 2:
                        break
            return replies

        replies = asyncio.run(run())
        assert all(r.choices[0].message.content is not None for r in replies)  # every request answered
        served = {r.system_fingerprint for r in replies}
        assert served == {"tiny-llama@6/6 exit=none", "tiny-llama@3/6 exit=none"}  # both arms served, no failure
        controller = running.controller
        assert controller.policy.agent.t >= 2  # learned online from epoch rewards
        log = list(controller.epoch_log)
        assert len(log) >= 2
        # A switch is charged to an epoch after the decision (the worker applies it between decode steps), never
        # twice; the observation's switch_ratio says the same as the record; the start-up load opens no epoch.
        names = controller.layout.names
        charged = [r["switch_s"] > 0 for r in log]
        assert [r["observation"][names.index("switch_ratio")] > 0 for r in log] == charged
        assert not charged[0] and any(charged)
        assert sum(charged) <= sum(r["next_arm"] != r["arm"] for r in log)
    finally:
        running.stop()


def test_sigterm_drains_in_flight_requests(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HELIOS_API_KEY": ""}
    env.pop("HELIOS_API_KEY")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "serve.py"), f"port={port}", "energy.kind=model",
         "log_level=warning", "max_batch_size=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.time() < deadline, "server did not start"
            time.sleep(0.2)
        results: dict[int, Any] = {}
        finished: list[float] = []

        def call(i: int) -> None:
            try:
                status = httpx.post(url + "/v1/completions", timeout=120, json={
                    "model": "helios", "prompt": f"request {i}", "max_tokens": 60, "temperature": 0}).status_code
                results[i] = status
                finished.append(time.time())
            except Exception as error:  # noqa: BLE001 (recorded, asserted below)
                results[i] = repr(error)

        def in_flight() -> float:
            lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
            return sum(float(line.split()[-1]) for line in lines
                       if line.startswith(("helios_waiting_sequences ", "helios_running_sequences ")))

        # 8 requests at batch cap 2: 4 rounds of 60 decode steps, so most are still queued when all are in.
        threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        deadline = time.time() + 60
        while in_flight() < 8:  # SIGTERM only once the server holds all eight (queued or decoding)
            assert time.time() < deadline and not results, f"requests did not all arrive: {results}"
            time.sleep(0.05)
        keep_alive = httpx.Client(timeout=30)
        assert keep_alive.get(url + "/health").status_code == 200  # an open connection for after the signal
        signalled = time.time()
        process.send_signal(signal.SIGTERM)
        try:  # a new request on an open connection is turned away with 503 (or the connection is closed)
            late = keep_alive.post(url + "/v1/completions", json={"model": "helios", "prompt": "late", "max_tokens": 2})
            assert late.status_code == 503 and late.headers["retry-after"], late.text
            assert late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass
        keep_alive.close()
        for thread in threads:
            thread.join(120)
        assert [results.get(i) for i in range(8)] == [200] * 8, results
        assert max(finished) > signalled  # some were still in flight at SIGTERM, and were served
        # uvicorn re-raises the signal once shut down, so a drained server ends "killed by SIGTERM" (or 0)
        assert process.wait(60) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()


# ------------------------------------------------------------------------------------------------ slow: SmolLM2


@pytest.mark.slow
def test_smollm2_chat_through_openai_client() -> None:
    running = ThreadServer(serve_config(candidate="smollm2-135m", memory_budget_mib=1024, context_tokens=512))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0, timeout=120)
        prompt = "The capital of France is"
        text = client.completions.create(model="helios", prompt=prompt, max_tokens=6, temperature=0).choices[0].text
        engine = running.core.engine
        tokens = [t for t in engine.generate(engine.encode([prompt]), 6).tokens[0] if t not in engine.eos_ids]
        assert text == engine.loaded.tokenizer.decode(tokens, skip_special_tokens=True)
        assert "Paris" in text
        chat = client.chat.completions.create(model="helios", max_tokens=8,
                                              messages=[{"role": "user", "content": "Say hello."}])
        assert chat.choices[0].message.content.strip()
    finally:
        running.stop()


def test_onnx_policy_serves(tmp_path: Path) -> None:
    """An SB3 policy exported to ONNX picks the arm from the live observation (frozen), end to end."""
    import gymnasium as gym

    from agents.sb3 import build_model
    from helios.policy import SCHEMA
    from tests.test_export import export_module

    document = json.loads((bandit_export(tmp_path) / "policy.json").read_text())
    names = document["observation_names"]

    class Env(gym.Env):
        observation_space = gym.spaces.Box(0.0, 16.0, (len(names),), np.float32)
        action_space = gym.spaces.Discrete(len(document["arm_table"]))

        def reset(self, *, seed=None, options=None):
            return np.zeros(len(names), np.float32), {}

        def step(self, action):
            return np.zeros(len(names), np.float32), 0.0, False, False, {}

    run = tmp_path / "run"
    run.mkdir()
    build_model("ppo", Env(), {"n_steps": 8, "batch_size": 8}, seed=0).save(str(run / "ppo_model.zip"))
    (run / "policy.json").write_text(json.dumps({"schema": SCHEMA, "agent": "ppo", "kind": "stable-baselines3",
                                                 "arm_table": document["arm_table"], "observation_names": names}))
    export = export_module().export_run(run, tmp_path / "onnx").parent
    running = ThreadServer(serve_config(policy=str(export), epoch_s=0.05))
    try:
        assert running.parts.policy.kind == "onnx"
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="x", max_retries=0)
        for i in range(60):  # until two epochs were decided (bounded)
            assert client.completions.create(model="helios", prompt=f"p{i}", max_tokens=3).choices[0].text is not None
            if len(running.controller.epoch_log) >= 2:
                break
        log = list(running.controller.epoch_log)
        assert len(log) >= 2  # it decided every epoch from live observations
    finally:
        running.stop()
    # Independently of helios.policy: onnxruntime on the observation each epoch logged, clipped to the exported
    # bounds, argmax over the feasible arms (all of them here) = the arm the server switched to.
    import onnxruntime as ort

    exported = json.loads((export / "policy.json").read_text())
    session = ort.InferenceSession(str(export / "policy.onnx"), providers=["CPUExecutionProvider"])
    low, high = (np.asarray(exported["onnx"][k], np.float32) for k in ("observation_low", "observation_high"))
    for record in log:
        obs = np.clip(np.asarray(record["observation"], np.float32), low, high)[None]
        assert obs[0, names.index("throughput_ratio")] > 0  # a live observation, not the empty one
        scores = session.run(["scores"], {"observation": obs})[0][0]
        assert record["next_arm"] == int(np.argmax(scores))
