"""Tuned exit heads: a light adapter per exit point that maps an intermediate hidden state into the space the
model's own final norm + LM head expect (the head stays shared, as in LayerSkip; the adapter is what is trained).

    python scripts/tune_exits.py candidate=smollm2-135m     # trains and saves heads beside the cached checkpoint

Saved as `exit_heads.safetensors` (+ `exit_heads.json` metadata) in the candidate's checkpoint directory; the
engine loads them when present. Only safetensors and JSON: no pickle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from helios.paths import atomic_file

HEADS_FILE = "exit_heads.safetensors"
META_FILE = "exit_heads.json"
FORMAT_VERSION = 1


class ExitAdapter(nn.Module):
    """h -> h + up(down(norm(h))): a residual low-rank (rank < hidden) or full (rank == hidden) linear map.

    Initialised to the identity (up = 0), so an untrained adapter is exactly the shared head.
    """

    def __init__(self, hidden_size: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, hidden_size, bias=True)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.down(self.norm(hidden)))

    @property
    def macs(self) -> int:
        return self.down.weight.numel() + self.up.weight.numel()


class TunedExitHeads(nn.Module):
    """One `ExitAdapter` per exit point, keyed by layer count (number of layers that produced the hidden state)."""

    def __init__(self, hidden_size: int, rank: int, exit_layers: list[int]) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.rank = rank
        self.adapters = nn.ModuleDict({str(layer): ExitAdapter(hidden_size, rank) for layer in exit_layers})

    @property
    def exit_layers(self) -> list[int]:
        return sorted(int(k) for k in self.adapters)

    def transform(self, layer_count: int, hidden: torch.Tensor) -> torch.Tensor:
        adapter = self.adapters[str(layer_count)] if str(layer_count) in self.adapters else None
        return hidden if adapter is None else adapter(hidden)

    def macs(self, layer_count: int) -> int:
        key = str(layer_count)
        return self.adapters[key].macs if key in self.adapters else 0

    def save(self, checkpoint_dir: str | Path, metadata: dict | None = None) -> Path:
        checkpoint_dir = Path(checkpoint_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {
            "format_version": FORMAT_VERSION,
            "hidden_size": self.hidden_size,
            "rank": self.rank,
            "exit_layers": self.exit_layers,
            **(metadata or {}),
        }
        # Heads first, metadata last: a reader only trusts heads whose metadata exists and matches.
        with atomic_file(checkpoint_dir / HEADS_FILE) as handle:
            handle.write(_safetensors_bytes(state))
        with atomic_file(checkpoint_dir / META_FILE, "w") as handle:
            json.dump(meta, handle, indent=2)
        return checkpoint_dir / HEADS_FILE


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(state)


def load_exit_heads(
    checkpoint_dir: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TunedExitHeads | None:
    """Tuned heads saved beside a checkpoint, or None when there are none (the engine then uses the shared head)."""
    checkpoint_dir = Path(checkpoint_dir)
    heads, meta_path = checkpoint_dir / HEADS_FILE, checkpoint_dir / META_FILE
    if not heads.exists() or not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{meta_path}: exit-head format version {meta.get('format_version')!r}, this helios reads "
            f"{FORMAT_VERSION}; re-run scripts/tune_exits.py"
        )
    module = TunedExitHeads(int(meta["hidden_size"]), int(meta["rank"]), [int(x) for x in meta["exit_layers"]])
    module.load_state_dict(load_file(str(heads)))
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


__all__ = ["ExitAdapter", "TunedExitHeads", "load_exit_heads", "save_file"]
