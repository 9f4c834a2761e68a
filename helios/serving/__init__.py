"""OpenAI-compatible serving of the early-exit engine with a policy choosing the arm (scripts/serve.py).

protocol.py (request/response schemas), batcher.py (dynamic batching + arm switching in one worker thread),
metrics.py (Prometheus), api.py (FastAPI app and handlers).
"""
