"""Prometheus metrics of the server (exposed at GET /metrics in the text format).

    curl -s 127.0.0.1:8000/metrics | grep helios_

Per-request latencies come from the scheduler's RequestRecords (TTFT, TPOT, end-to-end, queueing delay, all
measured from the HTTP request's arrival on the scheduler's wall clock); the gauges are set by the engine worker
after every span. One registry per server (not the process-global one), so that several servers in one process
(tests) do not collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported for the handler)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from helios.arms import Arm

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, max_layers: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("helios_requests", "HTTP API requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.request_latency = Histogram("helios_request_latency_seconds", "HTTP latency of generation requests",
                                         ["endpoint"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.ttft = Histogram("helios_ttft_seconds", "time to first token per sequence (from the request's arrival)",
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("helios_tpot_seconds", "time per output token after the first, per sequence",
                              buckets=TPOT_BUCKETS_S, registry=r)
        self.e2e = Histogram("helios_e2e_seconds", "end-to-end latency per sequence (arrival to last token)",
                             buckets=LATENCY_BUCKETS_S, registry=r)
        self.queueing_delay = Histogram("helios_queueing_delay_seconds", "arrival to admission per sequence",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_length = Gauge("helios_queue_length", "sequences in the scheduler's queue (arrived, not admitted)",
                                  registry=r)
        self.waiting = Gauge("helios_waiting_sequences", "sequences accepted and still without a first token "
                             "(tokenizing, queued or prefilling): bounded by max_queued_sequences", registry=r)
        self.running = Gauge("helios_running_sequences", "sequences admitted and holding K/V", registry=r)
        self.rejections = Counter("helios_rejections", "requests refused, by reason", ["reason"], registry=r)
        self.cancelled = Counter("helios_cancelled_sequences", "sequences cancelled because the client left",
                                 registry=r)
        self.sequence_errors = Counter("helios_sequence_errors", "sequences answered with an error after submission, "
                                       "by HTTP status", ["status"], registry=r)
        self.engine_faults = Counter("helios_engine_faults", "engine steps that raised (in-flight sequences got 500)",
                                     registry=r)
        self.decode_steps = Counter("helios_decode_steps", "decode steps run", registry=r)
        self.prefill_tokens = Counter("helios_prefill_tokens", "context tokens prefilled (recomputes included)",
                                      registry=r)
        self.generated_tokens = Counter("helios_generation_tokens", "tokens generated", registry=r)
        # Layers that produced each token: an exit before the loaded depth shows up below it.
        self.exit_layer = Histogram("helios_exit_layer", "layer count that produced each generated token",
                                    buckets=tuple(float(b) for b in range(1, max_layers + 1)), registry=r)
        self.arm = Gauge("helios_current_arm", "index of the arm being served (one-hot by label)",
                         ["index", "candidate", "depth", "exit"], registry=r)
        self.arm_index = Gauge("helios_current_arm_index", "index of the arm being served", registry=r)
        self.switches = Counter("helios_arm_switches", "arm switches applied", registry=r)
        self.recomputed = Counter("helios_recomputed_sequences", "sequences re-prefilled on a new arm after a "
                                  "recompute switch", registry=r)
        self.switch_seconds = Histogram("helios_arm_switch_seconds", "time to load a new arm",
                                        buckets=LATENCY_BUCKETS_S, registry=r)
        self.epochs = Counter("helios_policy_epochs", "policy decisions taken", registry=r)
        self.reward = Gauge("helios_policy_last_reward", "SLO reward of the last epoch", registry=r)
        self.energy = Counter("helios_energy_joules", "energy of the serving process, by meter source", ["source"],
                              registry=r)

    def set_arm(self, arm: Arm) -> None:
        self.arm.clear()  # exactly one labelled series is 1: the current arm
        self.arm.labels(str(arm.index), arm.candidate, str(arm.depth), arm.exit_name).set(1)
        self.arm_index.set(arm.index)

    def render(self) -> bytes:
        return generate_latest(self.registry)
