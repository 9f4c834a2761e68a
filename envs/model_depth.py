"""The ModelDepth environment: choose which early-exit LLM, at which depth and exit setting, serves each epoch.

    python -m envs.model_depth                      # default replay env, one random episode
    python -m envs.model_depth --backend live --candidates tiny --steps 3

    import gymnasium, envs                                              # `import envs` registers the ids
    env = gymnasium.make("helios/ModelDepthReplay-v0", slo="throughput")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample(mask=info["action_mask"]))

One step, start to end: env.step(arm) -> the epoch's requests join the episode's scheduler queue at their arrival
times, the arm switch is applied between decode steps -> the scheduler runs the epoch's span of time (live:
helios.engine on the truncated model, measured clock; replay: the recorded traces, the cost model's clock) ->
per-request records of the span (TTFT, TPOT, end-to-end, tokens, exit layers, accuracy) and what is still queued
-> the epoch's metrics (helios.telemetry.span_metrics) -> SLO reward against the reference run (helios.slo) ->
observation (helios.observation, with load features).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import ENV_IDS
from envs.backends import SWITCH_POLICIES, Backend, EpochResult, ServingSpec, mix_reference
from helios.arms import Arm, CandidateSpec, ExitSpec, reference_arm_index
from helios.config import check_keys
from helios.observation import ObservationLayout, build_observation
from helios.slo import METRICS, SLO, slo_from_config
from helios.telemetry import REQUEST_COUNTS
from helios.workloads import capacity_arm, workload_from_config

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BACKENDS: tuple[str, ...] = ("live", "replay")
# Keys of conf/env/*.yaml, i.e. the constructor's configuration arguments.
COMMON_KEYS: tuple[str, ...] = (
    "candidates", "reference", "exits", "workload", "slo", "energy", "memory_budget_mib", "context_tokens",
    "max_batch_size", "new_tokens", "accuracy_metric", "histogram_bins", "on_masked_action", "masked_action_penalty",
    "switch_policy", "max_prefill_tokens", "judge",
)
REPLAY_KEYS: tuple[str, ...] = ("per_source", "variants", "trace_dir", "traces", "build_traces")


class MaskedActionError(ValueError):
    """An arm masked as infeasible was chosen while `on_masked_action="raise"`."""


class ModelDepthEnv(gym.Env[np.ndarray, np.int64]):
    """
    ## Description

    An LLM server with a fixed memory budget serves a drifting workload (code, then prose, then questions, ...) under
    load. Before each epoch the agent picks an *arm*: a candidate model, how many of its layers to load (its depth),
    and an early-exit setting. Truncated models leave memory for more concurrent sequences (the throughput gain of
    HELIOS, arXiv 2504.10724) but may lose accuracy; which arm is best changes as the workload's mix and load drift.
    Two backends share this class: `live` (`helios/ModelDepth-v0`) runs real early-exit inference, `replay`
    (`helios/ModelDepthReplay-v0`) prices the same from recorded traces, fast enough for training.

    ## Epochs

    One scheduler per episode (helios.scheduler: continuous batching under the memory budget, FIFO admission, the
    code the server runs) serves every epoch as a span of its clock (envs/backends.py):
    * open loop (`arrival.kind` poisson or gamma): epoch e is [e x epoch_s, (e + 1) x epoch_s) of the workload's
      timeline; its requests arrive at their workload times. The queue and the running sequences persist across
      epochs: an overloaded epoch leaves a backlog that the next epoch starts with. A step is atomic, so a span
      ends at the first decode step boundary at or after its end.
    * closed loop: the epoch's batch is issued at once and the span lasts until it has finished; no queue carries
      over.
    The clock is virtual: live advances it by the engine's measured compute and skips idle time; replay advances
    it by the calibrated cost model's price of each step (its running rows and their context lengths). Each request
    generates up to its workload `max_tokens` (else `new_tokens`), stopping at EOS.

    ## Action Space

    `Discrete(n_arms)`: index into the arm table (`env.arm_table`, one dict per arm), built from the config as
    candidates x depths x exit settings (an exit setting with no exit point inside a depth is left out there).

    | field        | meaning                                                                          |
    |--------------|----------------------------------------------------------------------------------|
    | candidate    | model name (helios.models)                                                       |
    | depth        | decoder layers loaded (a prefix of the model)                                    |
    | exit         | `none`, or criterion >= threshold at exit points (fractions of the loaded depth) |
    | batch_size   | sequences of `context_tokens` that fit beside the weights, capped: a guaranteed  |
    |              | concurrency; the scheduler reserves prompt + max_tokens per sequence, so usually |
    |              | more run at once (up to max_batch_size)                                          |
    | feasible     | batch_size >= 1; infeasible arms are masked                                      |

    A new arm takes effect between decode steps. An exit-only change keeps the in-flight sequences (free). A
    change of candidate or depth loads the new weights after the in-flight sequences finish on the old arm
    (`switch_policy="drain"`, the default) or preempts them to be re-prefilled on the new arm (`"recompute"`;
    across candidates whose tokenizers differ it falls back to drain). The load's time (measured in live, modelled
    in replay) and energy are charged to the epoch in which the switch happens; a drain that outlasts its epoch
    switches, and is charged, in a later one (`info["load"]["switch_pending"]`). The first epoch pays a cold load.

    `env.action_masks()` and `info["action_mask"]` (bool, one per arm) mark the feasible arms. A masked action is
    refused (`on_masked_action="penalty"`, the default): the loaded arm stays and keeps serving (the epoch's time
    and requests pass; before any arm is loaded, the requests wait), the reward is `-masked_action_penalty`. With
    `on_masked_action="raise"` it raises MaskedActionError. An index outside the table raises ValueError.

    ## Observation Space

    `Box(0, high, (n_obs,), float32)`; `env.observation_names` names every entry. The layout and its builder are
    helios.observation's (its docstring is the table), shared with the server: the last epoch's exit histogram and
    its throughput, latency, energy and accuracy as ratios to the reference (clipped to [0, 16]), its switch time;
    load: `queue_ratio` (requests queued at the epoch's end, plus a closed loop's next batch, over a nominal epoch's
    `reference_requests`), `running_fraction` (sequences running at its end / max_batch_size), `arrival_ratio`
    (its arrivals per second over the workload's rate unit: the measured capacity of its `capacity_of` arm, else its
    base rate; 0 for closed loop), `attainment` (of the SLO's TTFT/TPOT targets; 0 without targets); the next
    epoch's source mixture (helios.workloads.SOURCE_NAMES); the loaded arm (one-hots, depth and batch fractions);
    episode progress.

    After `reset` the telemetry entries are 0 and no arm is loaded (all arm entries 0): the first step pays a cold
    load.

    ## Rewards

    `helios.slo` (`conf/slo/*.yaml`: throughput, latency, energy, accuracy, balanced, goodput, attainment,
    accuracy_under_latency): for each weighted metric, normalised weight x log2(score), score = how many times better
    than the reference; minus a penalty per violated constraint. The epoch's metrics come from its span
    (helios.telemetry.span_metrics):

    | metric           | of the epoch's span                                                              |
    |------------------|----------------------------------------------------------------------------------|
    | throughput_tok_s | tokens produced / busy seconds (prefill + decode + switch)                       |
    | latency_p95_s    | p95 end-to-end of requests finished in it, with the age of those still waiting   |
    | energy_j_per_tok | live: the meter around the span's compute; replay: busy s x the trace's power    |
    |                  | figure (an estimate; `info["energy_source"]` says which)                         |
    | accuracy         | mean of the finished requests' scores (per request, not pooled over tokens; see  |
    |                  | accuracy_metric; replay scores each arm's free-running output, recorded once)    |
    | goodput_rps      | requests/s that met both TTFT and TPOT targets (SLOs with targets)               |
    | attainment       | met / judged; a request is judged once (helios.slo.request_metrics), a rejected  |
    |                  | one counts as missed                                                             |
    | ttft_p95_s       | p95 TTFT (waiting requests count their wait so far); tpot_p95_s likewise         |

    A switch is inside these figures: requests waited for it, and its seconds are busy time. An epoch in which
    nothing happened scores neutral (its metrics are the reference's). The reference is the reference candidate at
    full depth, no exits, already loaded, serving a nominal epoch of each source on the same scheduler path (open
    loop: `reference_requests` arriving evenly over epoch_s at the base rate; closed loop: one batch), mixed by the
    epoch's source weights, measured when the env is first reset (live: once per machine and configuration, then
    read from a cache as capacity is: envs.capacity, `env.reference_record`). Replay pairs the accuracy reference (common random
    numbers): the reference arm's accuracy on the epoch's own requests. `info` carries every component: `metrics`
    (with the request counts met/missed/rejected), `reference`, `scores`, `reward_terms`, `penalties`, and `load`
    (submitted, finished, queued, running, rejected, recomputed, span_s, arrival_rps, switch_policy, switch_pending,
    and episode totals: episode_submitted = episode_finished + queued + running + episode_rejected).

    ## Starting State

    Nothing loaded, no queue, the clock at 0; epoch 0 of the workload. Replay draws one of `variants` samples of the
    workload per episode from the seeded `np_random` (the same seed replays the same episode): variant k has the
    workload's draw k of arrival times, sources and output lengths (`Workload.epoch(e, draw=k)`), so training
    episodes differ as days of the same schedule do; `reset(options={"variant": k})` picks one. Live serves the
    workload's own requests, draw 0 (replay's variant 0). `state_dict()` / `load_state_dict()` resume an episode: replay re-serves the recorded epochs and so
    rebuilds the queue exactly; live resumes cold with an empty queue (see `load_state_dict`).

    ## Planning (replay only)

    `env.simulate(actions, variant)` returns the rewards `actions` would earn, one per epoch, from the episode as it
    stands (queue, running sequences, loaded arm, clock) with draw `variant`'s arrivals, played by `step` on a fork of
    the scheduler; the episode is left as it was. `with env.planning(variant): env.step(...)` does the same step by
    step and nests (a planner branches from a shared prefix). agents/mpc.py plans with it on draws other than the
    episode's own. `env.epoch` is the coming epoch's index.

    ## Episode End

    Terminates after `workload.episode_epochs` steps (drift3: 30), when the workload's schedule (and its drift)
    has played out; never truncates by itself. Requests still queued then are reported, not served.

    ## Arguments

    `gymnasium.make(id, **kwargs)`; an argument left None takes its value from `conf/env/<backend>.yaml`. Group
    arguments take a config name (`slo="latency"` reads conf/slo/latency.yaml) or the config itself.

    | argument              | meaning                                                                      |
    |-----------------------|------------------------------------------------------------------------------|
    | backend               | "live" or "replay" (set by the registered id)                                |
    | candidates            | conf/candidates name, or a list of {name, depths}                            |
    | reference             | candidate whose full-depth run normalises metrics (None: the first)          |
    | exits                 | list of {criterion, threshold, exit_fractions}                               |
    | workload              | conf/workload name or config (helios.workloads); a rate relative to          |
    |                       | capacity(`capacity_of`) is resolved by envs.capacity (measured once, cached) |
    | slo                   | conf/slo name or config (helios.slo)                                         |
    | energy                | conf/energy name or config (live meter; replay uses the trace's power figure)|
    | memory_budget_mib     | memory for resident weights + K/V cache                                      |
    | context_tokens        | K/V per sequence that sizes an arm's guaranteed batch (and its feasibility)  |
    | max_batch_size        | cap on sequences running at once                                             |
    | new_tokens            | max_tokens of a request whose workload draws none                            |
    | accuracy_metric       | judge_score (default): exp(-mean NLL per token) of each output's text under  |
    |                       | `judge`, given the prompt (envs/judge.py; every request scored, an empty     |
    |                       | output 0; live: outside the measured clock). Or rouge_l, exact_match,        |
    |                       | contains_answer (helios.metrics) vs reference texts (requests without one    |
    |                       | are not scored). Epoch accuracy: mean over its scored requests               |
    | judge                 | candidate name of the judge_score model, loaded at full depth on first use   |
    |                       | (default smollm2-135m; tests use tiny-llama)                                 |
    | histogram_bins        | exit-layer histogram buckets                                                 |
    | on_masked_action      | "penalty" or "raise"                                                         |
    | masked_action_penalty | reward of a refused (masked) action, negated                                 |
    | switch_policy         | "drain" or "recompute": in-flight sequences at a change of candidate/depth   |
    | max_prefill_tokens    | cap on one prefill call's padded prompt tokens (helios.scheduler.MemoryBudget)|
    | per_source            | replay: trace requests per workload source                                   |
    | variants              | replay: workload draws (arrivals, sources, lengths), one drawn per episode   |
    | trace_dir             | replay: where traces (and capacities) are cached (None: ~/.cache/helios)     |
    | traces                | replay: {candidate: trace path}, used as given (a missing file is an error)  |
    | build_traces          | replay: record missing traces on first use (False: a missing trace errors)   |

    Replay defaults (conf/env/replay.yaml): the live default's arm table, SmolLM2-135M (shipped in a PyPI package, no
    training on first use) at depths 10/20/30 x 2 exit settings; `candidates="shipped"` adds Gemma-3-270M. The first
    construction records each candidate's trace once per request pool (traces are keyed by the pool: seed, sources,
    source options; helios.workloads.pool_config), cached under trace_dir: a few CPU-minutes for SmolLM2; later
    constructions take seconds (the judge's scores are cached on disk too). Tests use the tiny candidates.

    ## Version History

    * v0: epochs are spans of one continuous-batching scheduler per episode (queue carried over, switches between
      decode steps, goodput/attainment metrics, load features); before, an epoch was a fixed batch served
      statically with a batch latency model. Later in v0: a prefill-token cap per call (`max_prefill_tokens`), the
      judge's score as the default accuracy (`accuracy_metric=judge_score`, `judge`), a `concurrency` metric, and
      replay defaults equal to the live arm table (SmolLM2 alone); replay's `simulate` / `planning` and `epoch`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(
        self,
        backend: Literal["live", "replay"] = "replay",
        *,
        candidates: str | Sequence[Mapping[str, Any]] | None = None,
        reference: str | None = None,
        exits: Sequence[Mapping[str, Any]] | None = None,
        workload: str | Mapping[str, Any] | None = None,
        slo: str | Mapping[str, Any] | None = None,
        energy: str | Mapping[str, Any] | None = None,
        memory_budget_mib: float | None = None,
        context_tokens: int | None = None,
        max_batch_size: int | None = None,
        new_tokens: int | None = None,
        accuracy_metric: str | None = None,
        histogram_bins: int | None = None,
        on_masked_action: Literal["penalty", "raise"] | None = None,
        masked_action_penalty: float | None = None,
        switch_policy: Literal["drain", "recompute"] | None = None,
        max_prefill_tokens: int | None = None,
        judge: str | None = None,
        per_source: int | None = None,
        variants: int | None = None,
        trace_dir: str | Path | None = None,
        traces: Mapping[str, str | Path] | None = None,
        build_traces: bool | None = None,
        render_mode: str | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"unknown render_mode {render_mode!r}; valid: {self.metadata['render_modes']} or None")
        # The configuration arguments the caller set; the others (None) come from conf/env/<backend>.yaml.
        given = {k: v for k, v in locals().items() if k in COMMON_KEYS + REPLAY_KEYS and v is not None}
        if backend == "live" and set(given) & set(REPLAY_KEYS):
            raise ValueError(f"argument(s) {sorted(set(given) & set(REPLAY_KEYS))} apply to the replay backend only")
        cfg = {**env_config(backend), **given}
        self.backend_kind = backend
        self.render_mode = render_mode

        # Everything is validated before any trace is recorded or any model is loaded.
        self.slo: SLO = slo_from_config(_group("slo", cfg["slo"]))
        self.serving = _serving_spec(cfg, backend)
        self.on_masked_action = _choice("on_masked_action", cfg["on_masked_action"], ("penalty", "raise"))
        self.masked_action_penalty = _number("masked_action_penalty", cfg["masked_action_penalty"], minimum=0.0)
        self.backend: Backend = _make_backend(backend, self.serving, cfg)
        self.arms: tuple[Arm, ...] = self.backend.arms
        self._mask = np.array([arm.feasible for arm in self.arms], dtype=bool)

        # A capacity-relative rate needs its arm's capacity before the workload exists (envs.capacity: cached).
        self.capacity: dict[str, Any] | None = None
        capacity_rps = None
        workload_cfg = self.serving.workload_cfg
        if capacity_arm(workload_cfg) is not None:
            from envs.capacity import resolve_capacity

            trace_paths = getattr(self.backend, "trace_paths", None)
            out_dir = Path(cfg["trace_dir"]).expanduser() / "capacity" if backend == "replay" and cfg.get("trace_dir") \
                else None
            self.capacity = resolve_capacity(self.backend, str(capacity_arm(workload_cfg)), workload_cfg,
                                             trace_paths=trace_paths, out_dir=out_dir)
            capacity_rps = self.capacity["capacity_rps"]
        self.backend.bind(workload_from_config(workload_cfg, capacity_rps=capacity_rps))
        self.serving = self.backend.spec
        workload = self.serving.workload
        # The arrival-rate entry of the observation is relative to this many requests/s (0: closed loop, no rate).
        self._rate_unit_rps = workload.capacity_rps or workload.base_rate_per_s or 0.0
        self.episode_epochs = workload.episode_epochs
        self._phases = [workload.phase_at(e) for e in range(self.episode_epochs)]
        self._mixtures = [workload.mixture_at(e) for e in range(self.episode_epochs)]
        # A closed loop issues the next epoch's batch at the boundary: it is waiting when the agent acts.
        issued = [len(workload.epoch(e)) if not self.serving.open_loop else 0 for e in range(self.episode_epochs)]
        self._issued = issued + [0]
        self._mixture_features = [workload.features(e) for e in range(self.episode_epochs)] + [None]
        self.observation_layout = ObservationLayout(tuple(c.name for c in self.serving.candidates),
                                                    len(self.serving.exits), self.serving.histogram_bins,
                                                    self.serving.max_batch_size)
        self.observation_names: tuple[str, ...] = self.observation_layout.names
        self.observation_space = spaces.Box(0.0, self.observation_layout.high, dtype=np.float32)
        self.action_space = spaces.Discrete(len(self.arms))

        self._references: list[dict[str, float]] | None = None  # per epoch, set on the first reset
        self._reference_profile: dict[str, dict[str, float]] | None = None
        self.reference_record: dict[str, Any] | None = None  # live: the cached reference run (envs.capacity)
        self._epoch = 0
        self._loaded: int | None = None
        self._last: dict[str, Any] | None = None
        self._closed = False
        self._reference_arm = reference_arm_index(self.arms)  # fixed by the arm table

    # ------------------------------------------------------------------------------------------ the table

    @property
    def arm_table(self) -> list[dict[str, Any]]:
        """One dict per action index: candidate, depth, exit setting, memory, batch size, feasibility."""
        return [arm.to_dict() for arm in self.arms]

    @property
    def episode_variant(self) -> int | None:
        """Replay: the draw of the workload this episode plays (its variant; replay is deterministic given it and
        the actions); live: None."""
        return getattr(self.backend, "variant", None)

    @property
    def epoch(self) -> int:
        """Epochs served in this episode: the index of the coming one."""
        return self._epoch

    @property
    def reference_arm_index(self) -> int | None:
        """The arm that is the reference run (reference candidate, full depth, no exits), if it is in the table."""
        return self._reference_arm

    def evaluate_arms(self) -> np.ndarray:
        """Replay only: the reward each arm would earn on the coming epoch if it were already loaded (no load time;
        the queue and in-flight sequences as they stand, in-flight ones following the switch policy), -inf for
        masked arms. What oracle baselines and regret need; live cannot know it without serving."""
        if not hasattr(self.backend, "evaluate"):
            raise NotImplementedError("evaluate_arms needs the replay backend (live would have to serve every arm)")
        if self._references is None or self._epoch >= self.episode_epochs:
            raise RuntimeError("evaluate_arms needs a reset episode with epochs left")
        reference = self._epoch_reference(self._epoch)
        rewards = np.full(len(self.arms), -np.inf)
        for index in np.flatnonzero(self._mask):
            result = self.backend.evaluate(self._epoch, int(index))  # type: ignore[attr-defined]
            rewards[index] = self.slo.evaluate(self._values(result, reference), reference).total
        return rewards

    def simulate(self, actions: Sequence[int], variant: int) -> np.ndarray:
        """Replay only: the rewards `actions` would earn, played one per epoch from the episode as it stands (queue,
        running sequences, loaded arm, clock), with the arrivals of workload draw `variant` from the coming epoch on
        (a planner passes a draw other than the episode's: the future it does not know). Played by `step` itself on a
        fork of the scheduler (switches, queues and rewards as the episode would have them); the episode is
        left as it was. Stops at the episode's end. Calls nest inside `planning(variant)`, which forks the fork."""
        rewards = []
        with self.planning(variant):
            for action in actions:
                if self._epoch >= self.episode_epochs:
                    break
                rewards.append(self.step(action)[1])
        return np.array(rewards, dtype=float)

    @contextlib.contextmanager
    def planning(self, variant: int) -> Iterator[None]:
        """Replay only: inside, `step` serves a fork of the episode on draw `variant`'s arrivals; on exit the episode
        (epoch, loaded arm, last info, queue, clock) is as it was. A planner steps a shared prefix once and branches
        from it with nested calls (agents/mpc.py)."""
        if not hasattr(self.backend, "planning"):
            raise NotImplementedError("planning needs the replay backend (live cannot serve an epoch it will not keep)")
        if self._references is None:
            raise RuntimeError("call reset() before planning")
        saved = self._epoch, self._loaded, self._last
        try:
            with self.backend.planning(int(variant)):  # type: ignore[attr-defined]
                yield
        finally:
            self._epoch, self._loaded, self._last = saved

    def _epoch_reference(self, epoch: int) -> dict[str, float]:
        """The reward's reference for `epoch`: the reference run's profile mixed by the epoch's workload; on replay,
        with the reference arm's accuracy on this epoch's own requests (see the Rewards section)."""
        reference = self._references[epoch]  # type: ignore[index]
        paired = getattr(self.backend, "paired_reference_accuracy", None)
        if self._reference_arm is not None and paired is not None:
            accuracy = paired(epoch)
            if accuracy is not None:
                reference = {**reference, "accuracy": accuracy}
        return reference

    def _values(self, result: EpochResult, reference: Mapping[str, float]) -> dict[str, float]:
        """The epoch's metrics (helios.telemetry.span_metrics); the reference's where nothing happened (neutral),
        and the reference's accuracy where no scored request finished."""
        values = result.values(self.slo.targets, accuracy_default=reference["accuracy"])
        if values is not None:
            return values
        # An idle epoch ran no batch and judged no request: the reference's metrics, and zero of every count a
        # served epoch reports, so that every epoch's info["metrics"] has the same keys.
        counts = REQUEST_COUNTS if self.slo.targets else ()
        return {**reference, "concurrency": 0.0, "rejected_requests": 0, **dict.fromkeys(counts, 0)}

    def state_dict(self) -> dict[str, Any]:
        """Where the episode stands: epoch, loaded arm, RNG and the backend's position, which includes the arm played
        at every epoch so far. Replay's `load_state_dict` re-serves those epochs (deterministic), which rebuilds the
        scheduler's queue, running sequences and clock exactly; live cannot re-serve (measured), see there."""
        return {"epoch": self._epoch, "loaded": self._loaded, "np_random": self.np_random.bit_generator.state,
                "backend": self.backend.state_dict(),
                "queued": 0 if self._last is None else int(self._last["load"]["queued"]),
                "running": 0 if self._last is None else int(self._last["load"]["running"])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` after `reset()` (which measures or loads the reference run first).

        replay: re-serves the episode's epochs with the recorded arms from a cold start, rebuilding the queue,
        the running sequences and the clock exactly as they were (the replay clock is modelled, so it repeats).
        live: the epochs are not re-served (that would take their real time again). The episode resumes at the
        saved epoch, cold (nothing loaded: the next step pays a load) and with an empty queue: the `queued` +
        `running` requests in the system at the checkpoint are dropped; the open-loop clock resumes at the epoch's
        start on the workload's timeline, so later arrivals keep their times."""
        if self._references is None:
            raise RuntimeError("call reset() before load_state_dict()")
        epoch = int(state["epoch"])
        backend_state = state["backend"]
        self._loaded = None if state["loaded"] is None else int(state["loaded"])
        if self.backend_kind == "replay":
            self.backend.begin_episode_at(int(backend_state["variant"]))  # type: ignore[attr-defined]
            actions = list(backend_state["actions"])
            if len(actions) != epoch:
                raise ValueError(f"state of epoch {epoch} records {len(actions)} actions; it must record one per epoch")
            for e, action in enumerate(actions):
                self.backend.serve(e, action)
        else:
            self.backend.resume_at(epoch)  # type: ignore[attr-defined]
        self._epoch = epoch
        self.np_random.bit_generator.state = state["np_random"]

    def action_masks(self) -> np.ndarray:
        """True for the arms that fit the memory budget (the name sb3-contrib's MaskablePPO looks for)."""
        return self._mask.copy()

    # ------------------------------------------------------------------------------------------ the loop

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        if self._references is None:  # the reference run, once per environment (live: cached per machine)
            profile = self._reference_run()
            self._reference_profile = {s: {m: v for m, v in p.items() if m in METRICS} for s, p in profile.items()}
            self._references = [mix_reference(self._reference_profile, mixture) for mixture in self._mixtures]
        variant = (options or {}).get("variant")
        if variant is None:
            self.backend.begin_episode(self.np_random)
        elif self.backend_kind != "replay":
            raise ValueError(f"reset option variant={variant!r}: only the replay backend has variants; "
                             "live serves the workload's own draw (variant 0 of replay)")
        else:
            self.backend.begin_episode_at(int(variant))  # type: ignore[attr-defined]
        self._epoch = 0
        self._loaded = None
        self._last = None
        obs = self._observe(None, None, None)
        return obs, {"epoch": 0, "phase": self._phases[0], "action_mask": self._mask.copy(),
                     "reference": dict(self._references[0])}

    def _reference_run(self) -> dict[str, dict[str, float]]:
        """Per source, the reference run's metrics. Replay models it in a fraction of a second; live measures it once
        per machine and configuration and caches it, as it does capacity (envs.capacity.resolve_reference_profile)."""
        if self.backend_kind != "live":
            return self.backend.reference_profile(self.slo.targets)
        from envs.capacity import resolve_reference_profile

        self.reference_record = resolve_reference_profile(self.backend, self.slo.targets)
        return self.reference_record["profile"]

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        arm_index = self._check_action(action)
        epoch = self._epoch
        reference = self._epoch_reference(epoch)
        feasible = bool(self._mask[arm_index])
        if not feasible and self.on_masked_action == "raise":
            raise MaskedActionError(f"action {arm_index} ({self.arms[arm_index].label}) is masked: it does not "
                                    f"fit the memory budget of {self.serving.memory_budget_bytes / 2**20:g} MiB")
        # A refused action changes nothing: the loaded arm (if any) serves the epoch, whose time passes anyway.
        result = self.backend.serve(epoch, arm_index if feasible else None)
        if result.served:
            values = self._values(result, reference)
        else:
            values = dict.fromkeys(METRICS, 0.0)
        if feasible:
            reward = self.slo.evaluate(values, reference)
            self._loaded = arm_index
            total, terms, scores, penalties = reward.total, reward.terms, reward.scores, reward.penalties
        else:
            total, terms, scores = -self.masked_action_penalty, {}, {}
            penalties = {"masked_action": self.masked_action_penalty}
        self._epoch = epoch + 1
        served_arm = self._loaded if self._loaded is not None else arm_index
        ep = self.backend.episode
        span_s = result.end_s - result.start_s
        power_w = result.energy_j / result.busy_s if result.busy_s > 0 else 0.0
        load = {
            "submitted": result.submitted, "finished": len(result.records), "queued": result.queued,
            "running": result.running, "rejected": result.rejected, "recomputed": result.recomputed,
            "max_running": result.max_running, "span_s": span_s,
            "arrival_rps": result.submitted / span_s if self.serving.open_loop and span_s > 0 else 0.0,
            "switch_policy": result.switch_policy, "switch_pending": result.switch_pending,
            "episode_submitted": ep.submitted, "episode_finished": ep.finished, "episode_rejected": ep.rejected,
        }
        info = {
            "epoch": epoch, "phase": self._phases[epoch], "arm": arm_index, "arm_label": self.arms[arm_index].label,
            "batch_size": self.arms[served_arm].batch_size, "masked_action": not feasible,
            "switch": result.switch, "switch_s": result.switch_s,
            # The span's energy per busy second x its switch seconds: replay's exact figure (its energy is seconds
            # x power), live's share of what the meter read over the span.
            "switch_energy_j": power_w * result.switch_s,
            "requests": len(result.records), "tokens": result.output_tokens, "engine_s": result.compute_s,
            "energy_source": result.energy_source, "load": load,
            "metrics": dict(values), "reference": dict(reference), "scores": dict(scores),
            "reward_terms": dict(terms), "penalties": dict(penalties), "action_mask": self._mask.copy(),
            "exit_histogram": result.histogram.tolist(),
        }
        self._last = info
        obs = self._observe(result, values if result.served else None, reference)
        return obs, float(total), self._epoch >= self.episode_epochs, False, info

    def _check_action(self, action: Any) -> int:
        if self._references is None:
            raise RuntimeError("call reset() before step()")
        if self._epoch >= self.episode_epochs:
            raise RuntimeError(f"the episode ended after {self.episode_epochs} epochs; call reset()")
        if isinstance(action, np.ndarray) and action.size == 1:
            action = action.reshape(())[()]
        if isinstance(action, (bool, np.bool_)) or not isinstance(action, (int, np.integer)):
            raise ValueError(f"action must be an integer arm index; got {action!r} ({type(action).__name__})")
        index = int(action)
        if not 0 <= index < len(self.arms):
            raise ValueError(f"action {index} is out of range: valid arm indices are 0..{len(self.arms) - 1}")
        return index

    def _observe(self, result: EpochResult | None, values: Mapping[str, float] | None,
                 reference: Mapping[str, float] | None) -> np.ndarray:
        """helios.observation's vector after an epoch (`values` None: nothing served yet, or an unserved epoch)."""
        served = result is not None and values is not None
        return build_observation(
            self.observation_layout, histogram=result.histogram if served else None,  # type: ignore[union-attr]
            values=values if served else None, reference=reference,
            switch_s=0.0 if result is None else result.switch_s,
            waiting=(0 if result is None else result.queued) + self._issued[self._epoch],
            nominal=self.serving.reference_requests, mixture=self._mixture_features[self._epoch],
            arm=None if self._loaded is None else self.arms[self._loaded], progress=self._epoch / self.episode_epochs,
            running=0 if result is None else result.running,
            arrival_rps=0.0 if result is None or self._last is None else self._last["load"]["arrival_rps"],
            rate_unit_rps=self._rate_unit_rps,
            attainment=values.get("attainment") if served else None)  # type: ignore[union-attr]

    # ------------------------------------------------------------------------------------------ the rest

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            return None
        if self._last is None:
            return f"epoch 0/{self.episode_epochs}: nothing served yet\n"
        info = self._last
        metrics = " ".join(f"{k}={v:.4g}" for k, v in info["metrics"].items())
        return (f"epoch {info['epoch'] + 1}/{self.episode_epochs} phase {info['phase']} arm {info['arm']} "
                f"{info['arm_label']} batch {info['batch_size']} switch {info['switch']} ({info['switch_s']:.3f} s) "
                f"{metrics}\n")

    def close(self) -> None:
        if not self._closed:
            self.backend.close()
            self._closed = True


# ----------------------------------------------------------------------------------------------- configuration


def env_config(backend: str) -> dict[str, Any]:
    """The defaults of `backend` (conf/env/<backend>.yaml), without its `backend` key."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "env" / f"{backend}.yaml"
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if cfg.pop("backend", None) != backend:  # type: ignore[union-attr]
        raise ValueError(f"{path} must say `backend: {backend}`")
    allowed = COMMON_KEYS + (REPLAY_KEYS if backend == "replay" else ())
    check_keys(str(path), cfg, allowed)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


def _group(group: str, value: Any) -> Any:
    """A config group option by name (conf/<group>/<name>.yaml) or the config itself."""
    if isinstance(value, str):
        path = CONF_DIR / group / f"{value}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
            raise ValueError(f"no {group} config named {value!r}; available: {available}")
        from omegaconf import OmegaConf

        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _number(name: str, value: Any, *, minimum: float, integer: bool = False, strict: bool = False) -> Any:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value < minimum or (
        strict and value == minimum
    ):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{name} must be {'an integer' if integer else 'a finite number'} {bound}; got {value!r}")
    return value


def _choice(name: str, value: Any, valid: Sequence[str]) -> Any:
    if value not in valid:
        raise ValueError(f"{name} must be one of {list(valid)}; got {value!r}")
    return value


def _serving_spec(cfg: Mapping[str, Any], backend: str) -> ServingSpec:
    from helios.exit_config import CRITERIA
    from helios.metrics import METRICS as ACCURACY_METRICS
    from helios.models import candidate_names

    candidates_cfg = _group("candidates", cfg["candidates"])
    if isinstance(candidates_cfg, Mapping):
        candidates_cfg = candidates_cfg.get("shortlist")
    if not isinstance(candidates_cfg, list) or not candidates_cfg:
        raise ValueError("candidates must be a conf/candidates name or a non-empty list of {name, depths}")
    candidates = []
    for i, entry in enumerate(candidates_cfg):
        if not isinstance(entry, Mapping) or set(entry) != {"name", "depths"}:
            raise ValueError(f"candidates[{i}] must be a mapping with exactly 'name' and 'depths'; got {entry!r}")
        name, depths = entry["name"], entry["depths"]
        if not isinstance(name, str) or not (name in candidate_names() or "/" in name or Path(name).is_dir()):
            raise ValueError(f"candidates[{i}]: unknown candidate {name!r}; built-in names: {candidate_names()} "
                             "(or a Hugging Face id 'owner/name', or a local checkpoint directory)")
        if not isinstance(depths, list) or not depths or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths
        ) or len(set(depths)) != len(depths):
            raise ValueError(f"candidates[{i}] ({name}): depths must be distinct positive integers; got {depths!r}")
        candidates.append(CandidateSpec(name, tuple(depths)))
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"candidates are listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    reference = cfg["reference"] if cfg.get("reference") is not None else names[0]
    if reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the candidates {names}")

    exits_cfg = cfg["exits"]
    if not isinstance(exits_cfg, list) or not exits_cfg:
        raise ValueError("exits must be a non-empty list of {criterion, threshold, exit_fractions}")
    exits = []
    for i, entry in enumerate(exits_cfg):
        if not isinstance(entry, Mapping) or not set(entry) <= {"criterion", "threshold", "exit_fractions"}:
            raise ValueError(f"exits[{i}] must be a mapping of criterion, threshold, exit_fractions; got {entry!r}")
        criterion = _choice(f"exits[{i}].criterion", entry.get("criterion", "none"), CRITERIA)
        if backend == "replay":  # before any trace is read or recorded: traces cannot price every criterion
            from helios.replay import check_replayable

            check_replayable(criterion)
        threshold = entry.get("threshold", 0.9)
        fractions = entry.get("exit_fractions", [])
        if criterion != "none":
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
                raise ValueError(f"exits[{i}].threshold must be in (0, 1]; got {threshold!r}")
            if not isinstance(fractions, list) or not fractions or any(
                isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1 for f in fractions
            ):
                raise ValueError(f"exits[{i}].exit_fractions must be a non-empty list of fractions in (0, 1) of the "
                                 f"loaded depth; got {fractions!r}")
        fractions = tuple(float(f) for f in fractions) if criterion != "none" else ()
        exits.append(ExitSpec(criterion, float(threshold), fractions))

    # The env scores text against references, or (judge_score) under its judge; fidelity and perplexity need inputs
    # (full-depth tokens, a model) that the env does not give them.
    accuracy_metrics = [m for m, metric in ACCURACY_METRICS.items() if metric.inputs == ("predictions", "references")]
    accuracy_metrics.append("judge_score")
    judge = cfg.get("judge")
    if not isinstance(judge, str) or not (judge in candidate_names() or "/" in judge or Path(judge).is_dir()):
        raise ValueError(f"judge must be a candidate name, one of {candidate_names()} (or a Hugging Face id "
                         f"'owner/name', or a local checkpoint directory); got {judge!r}")
    workload_cfg = _group("workload", cfg["workload"])
    # A capacity-relative rate is resolved once the backend exists (it measures the capacity); until then a
    # placeholder capacity builds the workload, whose pool, mixtures and output lengths do not depend on it.
    placeholder = 1.0 if capacity_arm(workload_cfg) is not None else None
    return ServingSpec(
        candidates=tuple(candidates),
        exits=tuple(exits),
        reference=reference,
        workload=workload_from_config(workload_cfg, capacity_rps=placeholder),
        workload_cfg=dict(workload_cfg),
        memory_budget_bytes=int(_number("memory_budget_mib", cfg["memory_budget_mib"], minimum=0, strict=True) * 2**20),
        context_tokens=_number("context_tokens", cfg["context_tokens"], minimum=1, integer=True),
        max_batch_size=_number("max_batch_size", cfg["max_batch_size"], minimum=1, integer=True),
        new_tokens=_number("new_tokens", cfg["new_tokens"], minimum=1, integer=True),
        accuracy_metric=_choice("accuracy_metric", cfg["accuracy_metric"], accuracy_metrics),
        histogram_bins=_number("histogram_bins", cfg["histogram_bins"], minimum=1, integer=True),
        energy_cfg=dict(_group("energy", cfg["energy"])),
        switch_policy=_choice("switch_policy", cfg["switch_policy"], SWITCH_POLICIES),
        max_prefill_tokens=_number("max_prefill_tokens", cfg["max_prefill_tokens"], minimum=1, integer=True),
        judge=judge,
    )


def _make_backend(kind: str, spec: ServingSpec, cfg: Mapping[str, Any]) -> Backend:
    if kind == "live":
        from envs.backends import LiveBackend

        return LiveBackend(spec)
    from envs.backends import ReplayBackend

    variants = _number("variants", cfg["variants"], minimum=1, integer=True)
    return ReplayBackend(spec, _trace_paths(spec, cfg), variants=variants)


def _trace_paths(spec: ServingSpec, cfg: Mapping[str, Any]) -> dict[str, Path]:
    """The trace of every candidate: as given in `traces` (must exist), else cached under trace_dir, recorded on
    first use when build_traces (depths are checked against each model's config before any recording)."""
    from helios.profiling import ensure_trace, trace_path

    names = [c.name for c in spec.candidates]
    # Traces record the request pool, up to the longest output a request may ask for; a capacity-relative rate is
    # not part of their key: trace_path and ensure_trace key a trace by its request pool (helios.workloads.pool_config).
    workload_cfg, tokens = spec.workload_cfg, spec.trace_tokens
    if cfg.get("traces") is not None:
        given = {name: Path(path).expanduser() for name, path in dict(cfg["traces"]).items()}
        missing = [name for name in names if name not in given]
        if missing:
            raise ValueError(f"traces gives no trace for candidate(s) {missing}")
        absent = [str(given[name]) for name in names if not given[name].exists()]
        if absent:
            raise FileNotFoundError(f"trace file(s) not found: {absent}; record them with scripts/profile_traces.py or "
                                    "leave `traces` unset to build them under trace_dir")
        return {name: given[name] for name in names}
    per_source = _number("per_source", cfg["per_source"], minimum=1, integer=True)
    out_dir = Path(cfg["trace_dir"]).expanduser() if cfg.get("trace_dir") else None
    paths = {name: trace_path(name, workload_cfg, per_source, tokens, out_dir) for name in names}
    missing = [c for c in spec.candidates if not paths[c.name].exists()]
    if missing and not cfg.get("build_traces"):
        raise FileNotFoundError(
            f"no trace for {[c.name for c in missing]} at {[str(paths[c.name]) for c in missing]} and "
            "build_traces=False; pass build_traces=True (records them once) or explicit `traces`"
        )
    if missing:
        from helios.models import memory_profile

        for candidate in missing:  # cheap config reads first: a bad depth fails before minutes of recording
            layers = memory_profile(candidate.name, progress=False).num_layers
            bad = [d for d in candidate.depths if d > layers]
            if bad:
                raise ValueError(f"depths {bad} of {candidate.name!r} exceed its {layers} layers")
        energy_cfg = spec.energy_cfg
        for candidate in missing:
            ensure_trace(candidate.name, workload_cfg, depths=candidate.depths, per_source=per_source,
                         new_tokens=tokens, energy_cfg=energy_cfg, out_dir=out_dir, progress=False)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=BACKENDS, default="replay")
    parser.add_argument("--candidates", default=None, help="a conf/candidates name (default: the env config's)")
    parser.add_argument("--slo", default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps to run (default: one episode)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import gymnasium

    import envs  # noqa: F401  (registers the ids)

    kwargs = {k: v for k, v in {"candidates": args.candidates, "slo": args.slo}.items() if v is not None}
    env = gymnasium.make(ENV_IDS[args.backend], render_mode="ansi", **kwargs)
    unwrapped: ModelDepthEnv = env.unwrapped  # type: ignore[assignment]
    for arm in unwrapped.arm_table:
        print(f"  arm {arm['index']:3d} {arm['label']:48s} batch {arm['batch_size']:3d} "
              f"weights {arm['weight_bytes'] / 2**20:8.1f} MiB{'' if arm['feasible'] else '  (masked)'}")
    obs, info = env.reset(seed=args.seed)
    total = 0.0
    for _ in range(args.steps or unwrapped.episode_epochs):
        action = env.action_space.sample(mask=info["action_mask"].astype(np.int8))
        obs, reward, terminated, truncated, info = env.step(action)
        total += reward
        print(f"{env.render().rstrip()}  reward {reward:+.3f}")
        if terminated or truncated:
            break
    print(f"return {total:+.3f}")
    env.close()


if __name__ == "__main__":
    main()
