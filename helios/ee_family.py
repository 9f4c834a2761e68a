"""A family of small Llama models trained from scratch for early exit with LayerSkip's recipe.

    python scripts/train_ee.py name=helios-ee-8l        # or: ensure_checkpoint("helios-ee-8l")

Recipe (Elhoushi et al. 2024, "LayerSkip", arXiv 2404.16710, section 4.1):
  * Early-exit loss: every decoder layer's output goes through the SHARED final RMSNorm + tied LM head; the loss is
    sum_l ẽ(t, l) CE_l with ẽ(t, l) = C(t, l) e(l) / sum_i C(t, i) e(i). e(n) = e_scale * (1 + ... + n) for the
    n-th layer (counted from 1) and e(L) = L + e_scale * (1 + ... + (L - 1)) for the last. The paper counts from
    0, which gives the first layer weight 0; counting from 1 keeps its exit trained, which we need.
    C is the rotational curriculum (exit losses on every R-th layer, the offset rotating each step, the last layer
    always on) or the gradual one (enabled from the last layer down, all on by `gradual_fraction` of training).
  * Layer dropout, per sample: p(l, t) = S(t) D(l) p_max with D(l) = 2^(l / (L - 1)) - 1 (0 for the first layer,
    1 for the last) and, for pretraining from scratch, S(t) = 2^(t / (T - 1)) - 1 (0 at the first step, 1 at the
    last), so at the end the rate rises from 0 at the first layer to p_max at the last.

The checkpoints are toys (minutes of CPU training on a few MB of text) and are labelled `"quality": "toy"`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from helios import corpus
from helios.paths import atomic_dir, cache_dir

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"  # also BOS: documents are separated by it, as in GPT-2
PAD_TOKEN = "<|pad|>"
TRAINING_RECORD = "ee_training.json"


@dataclass(frozen=True)
class EESpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    context_tokens: int
    batch_sequences: int
    train_steps: int
    learning_rate: float
    warmup_steps: int
    train_chars: int  # corpus characters tokenized into the training stream
    tokenizer_chars: int  # the first characters of that stream used to learn the BPE merges
    eval_tokens: int  # held-out tokens scored per exit after training
    p_max: float = 0.1
    dropout_time_curriculum: str = "exponential"  # "exponential" (pretraining from scratch) or "constant"
    curriculum: str = "rotational"  # or "gradual"
    rotation_period: int = 2
    gradual_fraction: float = 0.5
    e_scale: float = 1.0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    grad_clip_norm: float = 1.0
    seed: int = 0
    # One intra-op thread: on a shared 2-core box two OpenMP threads slow down ~5x as soon as another process
    # runs, and a fixed count keeps the result bitwise reproducible.
    train_threads: int = 1
    bf16_autocast: bool = True  # bf16 matmuls (AMX/AVX512-BF16 where present); weights and optimizer stay fp32


SPECS: dict[str, EESpec] = {
    spec.name: spec
    for spec in (
        EESpec(
            name="helios-ee-tiny", num_layers=4, hidden_size=96, num_heads=3, intermediate_size=256,
            vocab_size=512, context_tokens=64, batch_sequences=16, train_steps=300, learning_rate=3e-3,
            warmup_steps=20, train_chars=400_000, tokenizer_chars=200_000, eval_tokens=4096, p_max=0.1,
        ),
        EESpec(
            name="helios-ee-4l", num_layers=4, hidden_size=384, num_heads=6, intermediate_size=1024,
            vocab_size=4096, context_tokens=256, batch_sequences=4, train_steps=900, learning_rate=2e-3,
            warmup_steps=50, train_chars=4_000_000, tokenizer_chars=3_000_000, eval_tokens=16_384, p_max=0.1,
        ),
        EESpec(
            name="helios-ee-8l", num_layers=8, hidden_size=384, num_heads=6, intermediate_size=1024,
            vocab_size=4096, context_tokens=256, batch_sequences=4, train_steps=520, learning_rate=2e-3,
            warmup_steps=40, train_chars=4_000_000, tokenizer_chars=3_000_000, eval_tokens=16_384, p_max=0.1,
        ),
    )
}
EE_NAMES: tuple[str, ...] = tuple(SPECS)


def get_spec(name: str) -> EESpec:
    if name not in SPECS:
        raise ValueError(f"unknown early-exit model {name!r}; valid names: {', '.join(EE_NAMES)}")
    return SPECS[name]


# --- the LayerSkip schedules (pure functions of the step, unit-tested against hand-computed values) ---


def layer_dropout_rates(
    num_layers: int, step: int, total_steps: int, p_max: float, time_curriculum: str = "exponential"
) -> list[float]:
    """p(l, t) = S(t) D(l) p_max for each layer l at step t (0-based)."""
    if time_curriculum == "exponential":
        time_scale = 2.0 ** (step / max(total_steps - 1, 1)) - 1.0
    elif time_curriculum == "constant":
        time_scale = 1.0
    else:
        raise ValueError(f"time_curriculum must be 'exponential' or 'constant', got {time_curriculum!r}")
    return [time_scale * (2.0 ** (layer / max(num_layers - 1, 1)) - 1.0) * p_max for layer in range(num_layers)]


def exits_enabled(
    num_layers: int,
    step: int,
    total_steps: int,
    curriculum: str = "rotational",
    rotation_period: int = 2,
    gradual_fraction: float = 0.5,
) -> list[bool]:
    """C(t, l): which layers' exits carry a loss at step t. The last layer's always does."""
    if curriculum == "rotational":
        enabled = [layer % rotation_period == step % rotation_period for layer in range(num_layers)]
    elif curriculum == "gradual":
        # Layer l joins once training has progressed gradual_fraction * (L-1-l)/(L-1) of the way.
        enabled = [
            step >= gradual_fraction * total_steps * (num_layers - 1 - layer) / max(num_layers - 1, 1)
            for layer in range(num_layers)
        ]
    else:
        raise ValueError(f"curriculum must be 'rotational' or 'gradual', got {curriculum!r}")
    enabled[-1] = True
    return enabled


def exit_loss_weights(enabled: Sequence[bool], e_scale: float = 1.0) -> list[float]:
    """ẽ(t, l): normalised per-exit loss weights; 0 where the exit is disabled."""
    num_layers = len(enabled)
    raw = [e_scale * n * (n + 1) / 2 for n in range(1, num_layers)]
    raw.append(num_layers + e_scale * (num_layers - 1) * num_layers / 2)
    masked = [weight if on else 0.0 for weight, on in zip(raw, enabled, strict=True)]
    total = sum(masked)
    return [weight / total for weight in masked]


def learning_rate_at(step: int, spec: EESpec) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * peak."""
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(spec.train_steps - spec.warmup_steps, 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return spec.learning_rate * (spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine)


# --- model pieces ---


def exit_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every exit (one per decoder layer, the last equal to the model's own output), without a cache."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    logits = []
    for layer in inner.layers:
        # attention_mask=None makes the SDPA path causal (no padding in our packed windows).
        hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        logits.append(model.lm_head(inner.norm(hidden)))
    return logits


def _early_exit_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weights: Sequence[float],
    dropout_rates: Sequence[float],
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict[int, float]]:
    """sum_l weights[l] * CE(exit l), running each layer only on the samples that do not drop it."""
    inner = model.model
    batch_sequences = input_ids.shape[0]
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1])[None]
    position_embeddings = inner.rotary_emb(hidden, position_ids=position_ids)
    loss = hidden.new_zeros((), dtype=torch.float32)
    exit_losses: dict[int, float] = {}
    for layer_index, layer in enumerate(inner.layers):
        kept = torch.arange(batch_sequences)
        if dropout_rates[layer_index] > 0:
            kept = torch.nonzero(torch.rand(batch_sequences, generator=generator) >= dropout_rates[layer_index])[:, 0]
        if kept.numel() == batch_sequences:
            hidden = layer(hidden, attention_mask=None, position_ids=position_ids, position_embeddings=position_embeddings)
        elif kept.numel() > 0:  # dropped samples skip the layer (identity), the rest run it: compute shrinks too
            updated = layer(
                hidden.index_select(0, kept), attention_mask=None, position_ids=position_ids,
                position_embeddings=position_embeddings,
            )
            hidden = hidden.index_copy(0, kept, updated.to(hidden.dtype))
        if weights[layer_index] > 0:
            logits = model.lm_head(inner.norm(hidden)).float()
            exit_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss = loss + weights[layer_index] * exit_loss
            exit_losses[layer_index] = exit_loss.item()
    return loss, exit_losses


@torch.no_grad()
def evaluate_exits(model: torch.nn.Module, windows: torch.Tensor, batch_sequences: int = 8) -> list[dict[str, float]]:
    """Per exit, on (n, context + 1) token windows in fp32: mean next-token CE (nats), top-1 accuracy, and top-1
    agreement with the last layer's prediction."""
    model.eval()
    num_layers = model.config.num_hidden_layers
    loss_sums = [0.0] * num_layers
    correct = [0] * num_layers
    agree = [0] * num_layers
    tokens = 0
    for start in range(0, windows.shape[0], batch_sequences):
        batch = windows[start : start + batch_sequences]
        inputs, labels = batch[:, :-1], batch[:, 1:].reshape(-1)
        per_exit = exit_logits(model, inputs)
        final_top1 = per_exit[-1].argmax(-1).reshape(-1)
        for layer_index, logits in enumerate(per_exit):
            flat = logits.float().reshape(-1, logits.shape[-1])
            top1 = flat.argmax(-1)
            loss_sums[layer_index] += F.cross_entropy(flat, labels, reduction="sum").item()
            correct[layer_index] += int((top1 == labels).sum())
            agree[layer_index] += int((top1 == final_top1).sum())
        tokens += labels.numel()
    return [
        {
            "layer": layer_index + 1,
            "val_loss": loss_sums[layer_index] / tokens,
            "top1_accuracy": correct[layer_index] / tokens,
            "agreement_with_final": agree[layer_index] / tokens,
        }
        for layer_index in range(num_layers)
    ]


# --- data and tokenizer ---


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text round-trips) wrapped as an HF fast tokenizer with eos/bos/pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,  # the default cleanup would rewrite " ." etc. and break round-trips
    )


def _token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """Concatenate the texts' ids, each text followed by EOS."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return torch.tensor([token for ids in encoded for token in (*ids, eos)], dtype=torch.long)


def _take_chars(texts: Sequence[str], max_chars: int) -> list[str]:
    taken: list[str] = []
    total = 0
    for text in texts:
        if total >= max_chars:
            break
        taken.append(text)
        total += len(text)
    return taken


# --- building a checkpoint ---


@contextlib.contextmanager
def _torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train(spec: EESpec, out_dir: Path, *, progress: bool = True) -> dict:
    """Train `spec` from scratch and write an HF checkpoint plus `ee_training.json` into `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    build_start = time.perf_counter()
    build_start_cpu = time.process_time()
    with _torch_threads(spec.train_threads):
        train_texts = corpus.mixed_passages(spec.seed, spec.train_chars, "train")
        heldout_texts = corpus.mixed_passages(spec.seed, 6 * spec.eval_tokens, "heldout")  # ~3 chars/token
        tokenizer = train_tokenizer(_take_chars(train_texts, spec.tokenizer_chars), spec.vocab_size)
        train_ids = _token_stream(tokenizer, train_texts)
        heldout_ids = _token_stream(tokenizer, heldout_texts)
        window = spec.context_tokens + 1
        eval_windows = heldout_ids[: (len(heldout_ids) // window) * window].view(-1, window)
        eval_windows = eval_windows[: max(1, spec.eval_tokens // spec.context_tokens)]

        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.context_tokens,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            attn_implementation="sdpa",
        )
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
        model.train()
        decay = [param for param in model.parameters() if param.dim() >= 2]
        no_decay = [param for param in model.parameters() if param.dim() < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=spec.learning_rate,
            betas=spec.adam_betas,
        )
        data_generator = torch.Generator().manual_seed(spec.seed)
        dropout_generator = torch.Generator().manual_seed(spec.seed + 1)
        train_tokens = spec.train_steps * spec.batch_sequences * spec.context_tokens
        bar = tqdm(range(spec.train_steps), desc=f"train {spec.name}", disable=not progress, unit="step")
        train_start = time.perf_counter()
        train_start_cpu = time.process_time()
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, spec)
            starts = torch.randint(0, len(train_ids) - window, (spec.batch_sequences,), generator=data_generator)
            batch = torch.stack([train_ids[start : start + window] for start in starts.tolist()])
            enabled = exits_enabled(
                spec.num_layers, step, spec.train_steps, spec.curriculum, spec.rotation_period, spec.gradual_fraction
            )
            weights = exit_loss_weights(enabled, spec.e_scale)
            rates = layer_dropout_rates(spec.num_layers, step, spec.train_steps, spec.p_max, spec.dropout_time_curriculum)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.bf16_autocast):
                loss, exit_losses = _early_exit_loss(model, batch[:, :-1], batch[:, 1:], weights, rates, dropout_generator)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", last=f"{exit_losses[spec.num_layers - 1]:.3f}")
        train_seconds = time.perf_counter() - train_start
        # CPU seconds of this (single-threaded) process: what the wall time would be on an otherwise idle machine.
        train_cpu_seconds = time.process_time() - train_start_cpu
        bar.close()

        per_layer = evaluate_exits(model, eval_windows)
        tokenizer.model_max_length = spec.context_tokens  # set only now: the long training stream would warn
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        record = {
            "name": spec.name,
            "quality": "toy",
            "paper": "LayerSkip (Elhoushi et al. 2024, arXiv 2404.16710)",
            "seed": spec.seed,
            "spec": asdict(spec),
            "recipe": {
                "early_exit_loss": {
                    "shared_head": "final RMSNorm + tied LM head",
                    "curriculum": spec.curriculum,
                    "rotation_period": spec.rotation_period,
                    "gradual_fraction": spec.gradual_fraction,
                    "e_scale": spec.e_scale,
                    "layer_weights_all_enabled": exit_loss_weights([True] * spec.num_layers, spec.e_scale),
                },
                "layer_dropout": {
                    "p_max": spec.p_max,
                    "per_layer_scale": "2^(l/(L-1)) - 1",
                    "time_curriculum": spec.dropout_time_curriculum,
                    "final_rates": layer_dropout_rates(
                        spec.num_layers, spec.train_steps - 1, spec.train_steps, spec.p_max, spec.dropout_time_curriculum
                    ),
                },
            },
            "train_tokens": train_tokens,
            "train_stream_tokens": len(train_ids),
            "train_wall_seconds": round(train_seconds, 1),
            "train_cpu_seconds": round(train_cpu_seconds, 1),
            "build_wall_seconds": round(time.perf_counter() - build_start, 1),
            "build_cpu_seconds": round(time.process_time() - build_start_cpu, 1),
            "train_threads": spec.train_threads,
            "eval_tokens": int(eval_windows.shape[0] * spec.context_tokens),
            "uniform_loss_nats": math.log(len(tokenizer)),
            "per_layer": per_layer,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpu": platform.processor() or platform.machine(),
            },
        }
        # build_wall_seconds above stops before the write; the write itself is a few hundred ms.
        (out_dir / TRAINING_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def checkpoint_dir(name: str) -> Path:
    get_spec(name)
    return cache_dir() / "checkpoints" / name


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    # Two processes asking for the same checkpoint build it once: the second waits, then finds it built.
    lock_path = path.parent / f".{path.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_built(path: Path) -> bool:
    return (path / TRAINING_RECORD).is_file() and (path / "model.safetensors").is_file()


def ensure_checkpoint(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """`cache_dir()/checkpoints/<name>`, trained on first use (or again with force=True), written atomically."""
    spec = get_spec(name)
    path = checkpoint_dir(name)
    if is_built(path) and not force:
        return path
    with _build_lock(path):
        if is_built(path) and not force:
            return path
        with atomic_dir(path) as tmp:
            train(spec, tmp, progress=progress)
    return path


def load_record(name: str) -> dict:
    return json.loads((checkpoint_dir(name) / TRAINING_RECORD).read_text())


def format_table(record: dict) -> str:
    lines = [
        f"{record['name']}  ({record['quality']} quality)  train {record['train_wall_seconds']:.0f} s wall "
        f"({record['train_cpu_seconds']:.0f} s CPU), build {record['build_wall_seconds']:.0f} s wall "
        f"({record['build_cpu_seconds']:.0f} s CPU), {record['train_tokens']:,} train tokens, "
        f"{record['eval_tokens']:,} held-out tokens, uniform loss {record['uniform_loss_nats']:.3f}",
        f"{'layer':>5} {'val_loss':>9} {'top1_acc':>9} {'agree_final':>11}",
    ]
    for row in record["per_layer"]:
        lines.append(
            f"{row['layer']:>5} {row['val_loss']:>9.3f} {row['top1_accuracy']:>9.3f} {row['agreement_with_final']:>11.3f}"
        )
    return "\n".join(lines)
