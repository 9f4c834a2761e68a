"""Record a replay trace: run a candidate at full depth on a pool of requests and capture its exit dynamics.

    python scripts/profile_traces.py candidate=smollm2-135m workload=drift3       # the Hydra entry point around this

1. Full-depth greedy outputs (the engine, exits off): the reference every setting is compared with.
2. One teacher-forced forward pass per request over prompt + output, hidden states of every layer captured:
   per layer, the exit head's token, max probability, top-1 minus top-2 margin, and cos(h_l, h_{l-1}).
3. The cost model, calibrated on this hardware at several depths and on batches of 1 to CALIBRATION_MAX_BATCH
   sequences (helios.costmodel), and the power figure that turns busy seconds into (estimated) joules.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helios.calibration import calibrate
from helios.costmodel import CostModel
from helios.energy import EnergyMeter
from helios.engine import EarlyExitEngine
from helios.exit_config import ExitConfig
from helios.models import estimate_weight_bytes, text_config
from helios.traces import Trace

# Batches up to the scenario's: full depth serves a 2x burst with ~28 sequences at once (38 at most). Calibrated up to 8,
# the linear model extrapolated and replay put full depth's burst goodput 59% below live's; up to 32, 4% below; up to
# 64 changed replay's figures by a few percent only, for 45 s more calibration (benchmarks/sim_to_real.py,
# benchmarks/RESULTS.md). Part of the trace's key, so older traces are recorded again.
CALIBRATION_MAX_BATCH = 32


@torch.inference_mode()
def layer_signals(engine: EarlyExitEngine, prompt: list[int], generated: list[int]) -> dict[str, np.ndarray]:
    """Per generated position and layer count 1..L: exit-head token, max prob, margin, cos(h_l, h_{l-1})."""
    model, depth = engine.model, engine.depth
    captured: list[torch.Tensor] = []
    last_layer = engine.layers[depth - 1]
    handle = last_layer.register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        ids = torch.tensor([prompt + generated[:-1]], device=engine.device)
        states = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    finally:
        handle.remove()
    # HF's last hidden state is after the final norm; the hook gives the pre-norm one the engine works with.
    hidden = [*states[:depth], captured[0]]
    span = slice(len(prompt) - 1, len(prompt) - 1 + len(generated))
    n = len(generated)
    pred = np.zeros((n, depth), dtype=np.int64)
    max_prob = np.zeros((n, depth), dtype=np.float32)
    margin = np.zeros((n, depth), dtype=np.float32)
    cosine = np.zeros((n, depth), dtype=np.float32)
    for layer in range(1, depth + 1):
        h = hidden[layer][0, span]
        logits = engine.logits(h, layer)  # tuned head of this layer when the engine has one
        probs = torch.softmax(logits.float(), dim=-1)
        top2 = probs.topk(2, dim=-1)
        pred[:, layer - 1] = top2.indices[:, 0].cpu().numpy()
        max_prob[:, layer - 1] = top2.values[:, 0].cpu().numpy()
        margin[:, layer - 1] = (top2.values[:, 0] - top2.values[:, 1]).cpu().numpy()
        cosine[:, layer - 1] = F.cosine_similarity(h, hidden[layer - 1][0, span], dim=-1).float().cpu().numpy()
    return {"pred": pred, "max_prob": max_prob, "margin": margin, "cosine": cosine}


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def record_trace(
    engine: EarlyExitEngine,
    prompts: Sequence[list[int]],
    sources: Sequence[str],
    *,
    new_tokens: int,
    batch_size: int,
    calibration_engines: Sequence[EarlyExitEngine],
    meter: EnergyMeter,
    model_power_w: float,
    extra_meta: dict | None = None,
    progress: bool = True,
    calibration_runs: int = 16,
    calibration_max_batch: int = CALIBRATION_MAX_BATCH,
) -> Trace:
    """Everything a replay of this candidate needs (see module docstring). `engine` must be at full depth."""
    loaded = engine.loaded
    if loaded.depth != loaded.num_layers:
        raise ValueError(f"record traces at full depth ({loaded.num_layers}), not {loaded.depth}")
    outputs: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"{loaded.name}: full-depth outputs", disable=not progress):
        batch = [list(p) for p in prompts[start : start + batch_size]]
        outputs += engine.generate(batch, new_tokens, stop_at_eos=False).tokens
    columns: dict[str, list] = {k: [] for k in ("request_id", "source", "position", "prompt_len", "full_token")}
    signals: dict[str, list[np.ndarray]] = {k: [] for k in ("pred", "max_prob", "margin", "cosine")}
    for rid, (prompt, generated, source) in enumerate(
        tqdm(list(zip(prompts, outputs, sources)), desc=f"{loaded.name}: layer signals", disable=not progress)
    ):
        layer_data = layer_signals(engine, list(prompt), generated)
        for key, value in layer_data.items():
            signals[key].append(value)
        n = len(generated)
        columns["request_id"] += [rid] * n
        columns["source"] += [source] * n
        columns["position"] += list(range(n))
        columns["prompt_len"] += [len(prompt)] * n
        columns["full_token"] += generated

    meter.start()
    cost_model, records = calibrate(calibration_engines, prompts, runs_per_engine=calibration_runs,
                                    max_batch=calibration_max_batch, progress=progress)
    reading = meter.stop()
    busy_s = sum(r["prefill_s"] + r["decode_s"] for r in records)
    if reading.source in ("nvml", "rapl"):
        power_w, energy_source = reading.energy_j / max(busy_s, 1e-9), f"replay:{reading.source}"
    else:
        power_w, energy_source = model_power_w, "model"

    config = text_config(loaded.model.config)
    elem = torch.tensor([], dtype=loaded.dtype).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    meta = {
        "candidate": loaded.name,
        "checkpoint": loaded.checkpoint,
        "num_layers": loaded.num_layers,
        "heads": "tuned" if engine.exit_heads is not None else "shared",
        "device": engine.device.type,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "eos_ids": engine.eos_ids,
        "prompts": [list(map(int, p)) for p in prompts],
        "cost_model": cost_model.to_dict(),
        "power_w": power_w,
        "energy_source": energy_source,
        "weight_bytes_by_depth": {
            str(d): estimate_weight_bytes(loaded.model.config, d, elem) for d in range(1, loaded.num_layers + 1)
        },
        "kv_bytes_per_token_layer": 2 * int(config.num_key_value_heads) * int(head_dim) * elem,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "helios_commit": _git_commit(),
        **(extra_meta or {}),
    }
    return Trace(
        meta=meta,
        request_id=np.array(columns["request_id"], dtype=np.int64),
        source=np.array(columns["source"], dtype=object),
        position=np.array(columns["position"], dtype=np.int32),
        prompt_len=np.array(columns["prompt_len"], dtype=np.int32),
        full_token=np.array(columns["full_token"], dtype=np.int64),
        **{k: np.concatenate(v) for k, v in signals.items()},
    )


__all__ = ["CostModel", "layer_signals", "record_trace"]


def _heads_fingerprint(candidate: str) -> str | None:
    """Hash of the tuned exit heads the engine would load for `candidate` (None: shared head). Part of a trace's
    key, so that training heads after recording makes replay re-record instead of disagreeing with live."""
    import hashlib

    from helios.paths import cache_dir

    for folder in (cache_dir() / "checkpoints" / candidate, Path(candidate).expanduser()):
        meta = folder / "exit_heads.json"
        if meta.is_file():
            return hashlib.sha256(meta.read_bytes()).hexdigest()[:12]
    return None


def trace_path(candidate: str, workload_cfg: dict, per_source: int, new_tokens: int, out_dir: Path | None = None,
               calibration_max_batch: int = CALIBRATION_MAX_BATCH) -> Path:
    """Where the trace of (candidate, workload, pool size, tokens, calibration's batch range) lives: a content hash
    keeps variants apart."""
    import hashlib
    import json

    from helios.paths import cache_dir

    from helios.workloads import pool_config

    # Keyed by the request pool, not the scenario: scenarios over the same sources share a recording.
    fields = {"workload": pool_config(workload_cfg), "per_source": per_source, "new_tokens": new_tokens,
              "calibration_max_batch": calibration_max_batch}
    heads = _heads_fingerprint(candidate)
    if heads is not None:
        fields["exit_heads"] = heads
    key = json.dumps(fields, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    safe = candidate.replace("/", "--")
    return (out_dir or cache_dir() / "traces") / f"{safe}-{digest}.parquet"


def ensure_trace(
    candidate: str,
    workload_cfg: dict,
    *,
    depths: Sequence[int] = (),
    per_source: int = 16,
    new_tokens: int = 24,
    batch_size: int = 8,
    energy_cfg: dict | None = None,
    out_dir: Path | None = None,
    force: bool = False,
    progress: bool = True,
    calibration_runs: int = 16,
    calibration_max_batch: int = CALIBRATION_MAX_BATCH,
) -> Path:
    """The cached trace of `candidate` on `workload_cfg`, recorded on first use (atomically)."""
    from helios.energy import meter_from_config
    from helios.models import load_candidate
    from helios.traces import write_trace
    from helios.workloads import encode_requests, pool_config, workload_from_config

    workload_cfg = pool_config(workload_cfg)  # what the trace records: the request pool (trace_path)
    path = trace_path(candidate, workload_cfg, per_source, new_tokens, out_dir, calibration_max_batch)
    if path.exists() and not force:
        return path
    workload = workload_from_config(workload_cfg)  # validates before any model loads
    requests = workload.pool(per_source)
    full = load_candidate(candidate, progress=progress)
    engine = EarlyExitEngine(full)
    prompts = encode_requests(requests, full.tokenizer, engine.max_context - new_tokens)
    depth_set = sorted({d for d in depths if 1 <= d < full.num_layers})
    # Load times, taken after the first load has warmed the checkpoint files (as a model switch in a running server
    # finds them): the replay environment prices model/depth switches with them (envs/backends.py).
    calibration, load_timings = [engine], []
    for depth in depth_set[:2] or [full.num_layers]:
        start = time.perf_counter()
        loaded = load_candidate(candidate, depth, progress=progress)
        load_timings.append({"depth": depth, "weight_bytes": loaded.weight_bytes, "load_s": time.perf_counter() - start})
        if depth < full.num_layers:
            calibration.append(EarlyExitEngine(loaded))
    energy_cfg = dict(energy_cfg or {"kind": "auto"})
    meter = meter_from_config(energy_cfg, device=engine.device.type)
    model_cfg = dict(energy_cfg.get("model") or {})
    model_power_w = float(model_cfg.get("watts_per_core", 6.0)) * torch.get_num_threads() + float(
        model_cfg.get("static_w", 0.0)
    )
    trace = record_trace(
        engine, prompts, [r.source for r in requests], new_tokens=new_tokens, batch_size=batch_size,
        calibration_engines=calibration, meter=meter, model_power_w=model_power_w,
        extra_meta={"workload": workload_cfg, "request_names": [r.request_id for r in requests],
                    "references": [r.reference for r in requests], "per_source": per_source,
                    "load_timings": load_timings},
        progress=progress, calibration_runs=calibration_runs, calibration_max_batch=calibration_max_batch,
    )
    write_trace(trace, path)
    return path


def free_running_path(trace_file: Path, depth: int, exit_config: ExitConfig) -> Path:
    """Where `free_running_outputs` caches one setting's outputs: beside the trace, named by the setting."""
    import hashlib
    import json

    setting = json.dumps({"depth": int(depth), "criterion": exit_config.criterion,
                          "threshold": float(exit_config.threshold), "exit_points": sorted(exit_config.exit_points)}
                         if exit_config.enabled else {"depth": int(depth), "criterion": "none"}, sort_keys=True)
    digest = hashlib.sha256(setting.encode()).hexdigest()[:12]
    return trace_file.parent / f"{trace_file.stem}.free" / f"depth{int(depth)}-{digest}.json"


def free_running_outputs(trace_file: Path, trace: Trace, depth: int, exit_config: ExitConfig, *,
                         batch_size: int = 8) -> dict[int, list[int]]:
    """Each trace request's greedy output from the candidate truncated to `depth` layers with `exit_config`, as live
    generates it (free-running: every token it emits is fed back), `new_tokens` long without stopping at EOS (the
    caller cuts it), by trace request id. The trace itself is teacher-forced on the full-depth output, whose tokens a
    truncated arm's own predictions are not: judged, those positionwise predictions are not text (replay scored them
    ~30x below live, benchmarks/RESULTS.md), so replay judges these instead. Full depth without exits is the trace's own
    output; any other setting is generated once and cached beside the trace (atomically)."""
    import json

    from helios.models import load_candidate
    from helios.paths import atomic_file

    ids = trace.requests()
    if int(depth) == trace.num_layers and not exit_config.enabled:
        order = np.argsort(trace.position, kind="stable")
        tokens, requests = trace.full_token[order], trace.request_id[order]
        return {rid: tokens[requests == rid].tolist() for rid in ids}
    path = free_running_path(trace_file, depth, exit_config)
    if path.exists():
        return {int(rid): tokens for rid, tokens in json.loads(path.read_text())["outputs"].items()}
    prompts = trace.meta["prompts"]
    new_tokens = int(trace.meta["new_tokens"])
    engine = EarlyExitEngine(load_candidate(str(trace.meta["candidate"]), int(depth), progress=False))
    outputs: dict[int, list[int]] = {}
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        tokens = engine.generate([list(prompts[rid]) for rid in chunk], new_tokens, exit_config, stop_at_eos=False).tokens
        outputs.update(zip(chunk, tokens))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as handle:
        handle.write(json.dumps({"candidate": trace.meta["candidate"], "depth": int(depth),
                                 "exit_config": dataclasses.asdict(exit_config), "new_tokens": new_tokens,
                                 "outputs": {str(rid): tokens for rid, tokens in outputs.items()}}))
    return outputs
