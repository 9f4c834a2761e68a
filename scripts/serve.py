"""Serve the candidates through the early-exit engine behind an OpenAI-compatible API, an exported policy choosing
(candidate, depth, exit threshold) every epoch from live telemetry.

    python scripts/serve.py policy=exports/ucb                 # frozen policy
    python scripts/serve.py policy=exports/ucb learn=true save_policy=exports/ucb_online
    python scripts/serve.py candidate=tiny-llama port=8001     # one fixed arm, no policy
    curl 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "helios", "prompt": "def fibonacci(n):", "max_tokens": 16}'

SIGTERM / Ctrl-C: the server stops admitting at once (new requests on open connections get 503 with Retry-After,
/health turns 503), uvicorn closes the listening socket and waits for the in-flight requests, which the engine
worker serves to the end; then the worker stops and a learned policy is saved. Config: conf/serve.yaml.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from agents import make_agent
    from helios.serving.server import build_server

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if cfg.get("threads"):
        import torch

        torch.set_num_threads(int(cfg.threads))
    plain = OmegaConf.to_container(cfg, resolve=True)
    server = build_server(plain, make_agent=make_agent)  # type: ignore[arg-type]
    logging.getLogger("helios.serving").info("policy %s; arm %s; http://%s:%d/v1", server.policy.describe(),
                                             server.core.arm.label, cfg.host, cfg.port)

    class DrainingServer(uvicorn.Server):
        """uvicorn's SIGTERM/SIGINT handling, after first turning new requests away (503): graceful shutdown then
        waits for in-flight requests, the app's lifespan shutdown stops the worker and saves a learned policy, and
        uvicorn re-raises the signal (exit -15)."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            server.core.begin_drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(server.app, host=cfg.host, port=int(cfg.port), log_level=cfg.log_level,
                            timeout_graceful_shutdown=None, timeout_keep_alive=int(cfg.keep_alive_s))
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
