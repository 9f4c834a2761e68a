"""Serve the candidates through the early-exit engine behind an OpenAI-compatible API, an exported policy choosing
(candidate, depth, exit threshold) every epoch from live telemetry.

    python scripts/serve.py policy=exports/ucb                 # frozen policy
    python scripts/serve.py policy=exports/ucb learn=true save_policy=exports/ucb_online
    python scripts/serve.py candidate=tiny-llama port=8001     # one fixed arm, no policy
    curl 127.0.0.1:8000/v1/completions -H 'content-type: application/json' \
         -d '{"model": "helios", "prompt": "def fibonacci(n):", "max_tokens": 16}'

SIGTERM / Ctrl-C: uvicorn stops accepting connections, waits for in-flight requests, then the batcher drains its
queue and stops. Config: conf/serve.yaml.
"""

from __future__ import annotations

import logging
import warnings

import hydra
from omegaconf import DictConfig, OmegaConf

warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/.*' is validated against ConfigStore schema")


@hydra.main(config_path="../conf", config_name="serve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import uvicorn

    from agents import make_agent
    from helios.serving.server import build_server

    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    plain = OmegaConf.to_container(cfg, resolve=True)
    app, batcher = build_server(plain, make_agent=make_agent)  # type: ignore[arg-type]
    logging.getLogger("helios.serving").info("policy %s; arm %s; http://%s:%d/v1", batcher.policy.describe(),
                                             batcher.arm.label, cfg.host, cfg.port)
    # uvicorn installs SIGTERM/SIGINT handlers: graceful shutdown waits for in-flight requests, then the app's
    # lifespan shutdown drains the batcher and saves a learned policy; uvicorn then re-raises the signal (exit -15).
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.log_level, timeout_graceful_shutdown=None)


if __name__ == "__main__":
    main()
