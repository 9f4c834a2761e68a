"""Learned exit-confidence probes: per exit point, a small MLP on the hidden state that predicts whether exiting there
gives the same token as the model's final layer. The `probe` exit criterion exits when that probability >= threshold.

    python scripts/tune_exits.py candidate=helios-ee-8l heads=false probes=true   # trains and saves the probes

Why: `max_prob` and `margin` need the full-vocabulary head at every exit point (SmolLM2: a third of decode time;
Gemma-3: more than its layers), and CALM's head-free `cosine` saturation exits tokens that are not yet right. CALM
(Schuster et al. 2022, sec. 3.5) also proposes a trained early-exit classifier; here it is an MLP over
[rms-normalised h_e, cos(h_e, h_{e-1}), log rms(h_e)] with one hidden layer of `width` units, trained with binary
cross-entropy on teacher-forced states labelled by "argmax(head(adapter_e(h_e))) == argmax(head(h_L))". Its cost is
about `width` x hidden multiply-adds per row (helios-ee-8l: 1.6% of its LM head; SmolLM2: 0.13%).

Labels depend on the exit heads, so the probes record the fingerprint of the heads they were trained with
("shared" or the sha256 of exit_heads.safetensors) and the engine uses them only with those heads.
Saved as `exit_probes.safetensors` + `exit_probes.json` beside the checkpoint: safetensors and JSON, no pickle.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from torch import nn

from helios.paths import atomic_file, write_json

PROBES_FILE = "exit_probes.safetensors"
PROBES_META = "exit_probes.json"
FORMAT_VERSION = 1


def heads_fingerprint(checkpoint_dir: str | Path) -> str:
    """Which exit heads label a probe's training data: "shared" when no tuned heads are saved, else their sha256."""
    from helios.exits import HEADS_FILE

    path = Path(checkpoint_dir) / HEADS_FILE
    if not path.exists():
        return "shared"
    stat = path.stat()
    return _file_sha256(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _file_sha256(path: str, mtime_ns: int, size: int) -> str:
    """Hashed once per file version and process: SmolLM2's heads are 77 MB, and every engine built (each arm switch)
    checks its probes against them."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def probe_features(hidden: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """[..., H] states after and before the exit layer -> [..., H + 2] probe inputs."""
    hidden32 = hidden.float()
    rms = hidden32.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-6)
    cos = F.cosine_similarity(hidden32, before.float(), dim=-1).unsqueeze(-1)
    return torch.cat([hidden32 / rms, cos, rms.log()], dim=-1)


class ExitProbe(nn.Module):
    """Standardise -> Linear(H + 2, width) -> GELU -> Linear(width, 1): the logit of "this exit agrees"."""

    def __init__(self, hidden_size: int, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size + 2))
        self.register_buffer("scale", torch.ones(hidden_size + 2))
        self.net = nn.Sequential(nn.Linear(hidden_size + 2, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.scale).squeeze(-1)


class ExitProbes(nn.Module):
    """One `ExitProbe` per exit point, keyed by layer count."""

    def __init__(self, hidden_size: int, width: int, exit_layers: Sequence[int]) -> None:
        super().__init__()
        self.hidden_size, self.width = int(hidden_size), int(width)
        self.probes = nn.ModuleDict({str(int(layer)): ExitProbe(hidden_size, width) for layer in exit_layers})

    @property
    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.probes)

    def confidence(self, layer_count: int, hidden: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """P(exiting after `layer_count` layers gives the final layer's token), per row."""
        if str(layer_count) not in self.probes:
            raise ValueError(f"no exit probe for layer {layer_count}; probes exist for layers {self.exit_layers}")
        return torch.sigmoid(self.probes[str(layer_count)](probe_features(hidden, before)))

    def macs(self) -> int:
        return (self.hidden_size + 2) * self.width + self.width + 2 * self.hidden_size

    def save(self, checkpoint_dir: str | Path, metadata: dict[str, Any]) -> Path:
        checkpoint_dir = Path(checkpoint_dir)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {"format_version": FORMAT_VERSION, "hidden_size": self.hidden_size, "width": self.width,
                "exit_layers": self.exit_layers, **metadata}
        with atomic_file(checkpoint_dir / PROBES_FILE) as handle:  # tensors first: metadata vouches for them
            handle.write(save(state))
        write_json(checkpoint_dir / PROBES_META, meta, indent=2)
        return checkpoint_dir / PROBES_FILE


def load_exit_probes(checkpoint_dir: str | Path, *, device: torch.device | str = "cpu") -> ExitProbes | None:
    """Probes saved beside a checkpoint and trained with the heads now saved there, else None."""
    checkpoint_dir = Path(checkpoint_dir)
    tensors, meta_path = checkpoint_dir / PROBES_FILE, checkpoint_dir / PROBES_META
    if not tensors.exists() or not meta_path.exists():
        return None
    fix = "delete both exit_probes files or re-run scripts/tune_exits.py probes=true"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')!r}, this helios reads {FORMAT_VERSION}")
        probes = ExitProbes(int(meta["hidden_size"]), int(meta["width"]), [int(x) for x in meta["exit_layers"]])
        probes.load_state_dict(load_file(str(tensors)))
    except Exception as error:  # JSON, keys, shapes, safetensors header
        raise ValueError(f"{checkpoint_dir}: unreadable exit probes ({error}); {fix}") from error
    if meta.get("heads_fingerprint") != heads_fingerprint(checkpoint_dir):
        return None  # trained for other exit heads: their labels no longer hold
    return probes.to(device).eval().requires_grad_(False)


@torch.no_grad()
def probe_dataset(loaded: Any, texts: Sequence[str], heads: Any | None, exit_layers: Sequence[int], *,
                  max_tokens: int, seq_len: int = 256) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Teacher-forced features and labels per exit layer: ({layer: [N, H + 2]}, {layer: [N] bool agrees})."""
    from helios.exits import FrozenHead, iter_hidden_states, token_chunks

    head = FrozenHead(loaded)
    depth = len(loaded.model.get_decoder().layers)
    chunks, prefix = token_chunks(loaded.tokenizer, texts, max_tokens, seq_len)
    wanted = sorted({*exit_layers, *(layer - 1 for layer in exit_layers if layer > 1), depth})
    features: dict[int, list[torch.Tensor]] = {layer: [] for layer in exit_layers}
    labels: dict[int, list[torch.Tensor]] = {layer: [] for layer in exit_layers}
    for states in iter_hidden_states(loaded, chunks, prefix, wanted):
        final = head.argmax(head.norm(states[depth]))
        for layer in exit_layers:
            hidden = states[layer]
            exit_hidden = hidden if heads is None else heads.transform(layer, hidden)
            labels[layer].append((head.argmax(head.norm(exit_hidden)) == final).cpu())
            before = states[layer - 1] if layer > 1 else hidden
            features[layer].append(probe_features(hidden, before).cpu())
    return ({k: torch.cat(v) for k, v in features.items()}, {k: torch.cat(v) for k, v in labels.items()})


def train_exit_probes(features: dict[int, torch.Tensor], labels: dict[int, torch.Tensor], *, width: int = 64,
                      steps: int = 600, batch: int = 2048, lr: float = 3e-3, weight_decay: float = 1e-4,
                      validation_fraction: float = 0.1, eval_every: int = 25, patience: int = 4,
                      seed: int = 0) -> tuple[ExitProbes, dict[str, Any]]:
    """Binary cross-entropy per exit layer (Adam, at most `steps` minibatches of `batch` tokens); inputs are
    standardised with the training tokens' mean and scale, stored in the probe.

    Early stopping: the last `validation_fraction` of the tokens (whole passages, not a random sample of tokens:
    neighbouring tokens are correlated) is held out; every `eval_every` steps its loss is measured, the probe with the
    best one is kept, and training stops after `patience` evaluations without improvement. Without it, 600 steps
    memorise 20k tokens of SmolLM2's 578 features (training precision 1.00, held-out 0.65 at threshold 0.95).
    `validation_fraction=0` trains all `steps` on every token."""
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1); got {validation_fraction!r}")
    layers = sorted(features)
    hidden_size = int(features[layers[0]].shape[1]) - 2
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    probes = ExitProbes(hidden_size, width, layers)
    started = time.perf_counter()
    final_loss: dict[str, float] = {}
    best_steps: dict[str, int] = {}
    validation_loss: dict[str, float] = {}
    for layer in layers:
        x, y = features[layer].float(), labels[layer].float()
        n_val = int(len(x) * validation_fraction)
        x_val, y_val = x[len(x) - n_val:], y[len(y) - n_val:]
        x, y = x[: len(x) - n_val], y[: len(y) - n_val]
        probe = probes.probes[str(layer)]
        probe.mean.copy_(x.mean(0))
        probe.scale.copy_(x.std(0).clamp_min(1e-4))
        optimizer = torch.optim.Adam(probe.net.parameters(), lr=lr, weight_decay=weight_decay)
        losses: list[float] = []
        best_loss, best_state, best_step, stale = float("inf"), None, steps, 0
        for step in range(1, steps + 1):
            index = torch.randint(len(x), (min(batch, len(x)),), generator=generator)
            loss = F.binary_cross_entropy_with_logits(probe(x[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if n_val and (step % eval_every == 0 or step == steps):
                with torch.no_grad():
                    held = float(F.binary_cross_entropy_with_logits(probe(x_val), y_val))
                if held < best_loss:
                    best_loss, best_step, stale = held, step, 0
                    best_state = {k: v.clone() for k, v in probe.state_dict().items()}
                else:
                    stale += 1
                    if stale >= patience:
                        break
        if best_state is not None:
            probe.load_state_dict(best_state)
            validation_loss[str(layer)] = round(best_loss, 4)
        best_steps[str(layer)] = best_step
        final_loss[str(layer)] = round(sum(losses[-20:]) / len(losses[-20:]), 4)
    probes.eval().requires_grad_(False)
    return probes, {"train_tokens": int(len(labels[layers[0]])), "max_steps_per_layer": steps,
                    "best_step_by_layer": best_steps, "validation_fraction": validation_fraction,
                    "validation_loss_by_layer": validation_loss, "width": width, "loss_by_layer": final_loss,
                    "train_seconds": round(time.perf_counter() - started, 2),
                    "positive_rate_by_layer": {str(k): round(float(labels[k].float().mean()), 4) for k in layers}}


@torch.no_grad()
def precision_coverage(probes: ExitProbes, features: dict[int, torch.Tensor], labels: dict[int, torch.Tensor],
                       thresholds: Sequence[float] = (0.5, 0.8, 0.9, 0.95, 0.99)) -> dict[str, list[dict]]:
    """Held-out: per exit layer and threshold, the share of tokens that would exit (coverage) and the share of those
    whose token agrees with the final layer (precision)."""
    table: dict[str, list[dict]] = {}
    for layer in probes.exit_layers:
        p = torch.sigmoid(probes.probes[str(layer)](features[layer].float()))
        rows = []
        for threshold in thresholds:
            exits = p >= threshold
            rows.append({"threshold": threshold, "coverage": round(float(exits.float().mean()), 4),
                         "precision": round(float(labels[layer][exits].float().mean()), 4) if exits.any() else None})
        table[str(layer)] = rows
    return table
