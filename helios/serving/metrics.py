"""Prometheus metrics of the server (exposed at GET /metrics in the text format).

    curl -s 127.0.0.1:8000/metrics | grep helios_

One registry per server (not the process-global one), so that several servers in one process (tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported for the handler)

from helios.arms import Arm

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self, max_layers: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helios_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("helios_request_latency_seconds", "end-to-end latency of generation requests",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("helios_queue_wait_seconds", "time from arrival to the start of its batch",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.batch_latency = Histogram("helios_batch_seconds", "engine time per batch", buckets=LATENCY_BUCKETS,
                                       registry=r)
        self.batch_size = Histogram("helios_batch_size", "requests per engine batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prompt_tokens = Counter("helios_prompt_tokens", "prompt tokens processed", registry=r)
        self.generated_tokens = Counter("helios_generation_tokens", "tokens generated", registry=r)
        # Layers that produced each token: an exit before the loaded depth shows up below it.
        self.exit_layer = Histogram("helios_exit_layer", "layer count that produced each generated token",
                                    buckets=tuple(float(b) for b in range(1, max_layers + 1)), registry=r)
        self.arm = Gauge("helios_current_arm", "index of the arm being served (one-hot by label)",
                         ["index", "candidate", "depth", "exit"], registry=r)
        self.arm_index = Gauge("helios_current_arm_index", "index of the arm being served", registry=r)
        self.switches = Counter("helios_arm_switches", "arm switches (model loads)", registry=r)
        self.switch_seconds = Histogram("helios_arm_switch_seconds", "time to load a new arm",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.epochs = Counter("helios_policy_epochs", "policy decisions taken", registry=r)
        self.reward = Gauge("helios_policy_last_reward", "SLO reward of the last epoch", registry=r)
        self.energy = Counter("helios_energy_joules", "energy spent in the engine, by meter source", ["source"],
                              registry=r)
        self.queue_depth = Gauge("helios_queue_depth", "requests waiting for a batch", registry=r)
        self.errors = Counter("helios_engine_errors", "engine batches that raised (requests answered with errors)",
                              registry=r)

    def set_arm(self, arm: Arm) -> None:
        self.arm.clear()  # exactly one labelled series is 1: the current arm
        self.arm.labels(str(arm.index), arm.candidate, str(arm.depth), arm.exit_name).set(1)
        self.arm_index.set(arm.index)

    def render(self) -> bytes:
        return generate_latest(self.registry)
