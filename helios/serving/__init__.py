"""OpenAI-compatible serving of the early-exit engine with a policy choosing the arm (scripts/serve.py).

protocol.py (schemas), errors.py (OpenAI error bodies), api.py (routes and middleware), completions.py / chat.py
(one handler per endpoint), frontend.py (checks, limits, tokenization off the engine's thread), core.py (the
scheduler on the wall clock, driven by one engine worker thread), controller.py (observation -> reward -> policy ->
switch, on its own thread), text.py (detokenisation, stop strings, logprobs), metrics.py (Prometheus).
"""
