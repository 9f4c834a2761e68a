"""The environment's judge: `helios.metrics.judge_score` of one served output under a fixed model at full depth.

    judge = Judge("smollm2-135m", prompt_margin=16)
    judge.score(request, output_text)          # exp(-mean NLL per judge token of the text), given the prompt

Why a judge and how it was chosen: benchmarks/RESULTS.md, "An accuracy that separates arms". What it scores:
  output   the text the serving candidate produced (decoded with its own tokenizer, special tokens skipped), re-encoded
           with the judge's tokenizer without special tokens, so that every candidate is scored on the judge's one
           scale (comparable across candidates whatever their vocabulary). A candidate that is the judge's own model
           passes its token ids (`ids=`, special tokens dropped): the tokens as generated, not a re-encoding of their
           text, which can merge differently (a truncated model emits non-canonical token sequences).
  context  the request's prompt as the judge would be served it: `helios.workloads.encode_requests` with the judge's
           tokenizer (a chat request through the judge's chat template), cut to the judge's context minus
           `prompt_margin` tokens, exactly as the env cuts prompts for serving (envs.backends.LiveBackend.prompt_ids).
  empty    an output with no text (EOS first, or only special tokens) has nothing to judge; it scores 0.0, as ROUGE-L
           scores an empty prediction, so that an arm cannot raise its accuracy by answering nothing.
No reference text is needed: every finished request is scored.

The model loads on the first score that misses the caches (once per env), in eval mode, under inference_mode. One
forward prices every prefix of an output: the judge is causal, so a prefix's tokens have the same NLLs
(`helios.metrics.token_nlls`). `score(..., full_text=...)` (replay: the arm's whole teacher-forced output of the
request) judges the full text once and scores each shorter output the scheduler cut from it (max_tokens, EOS) from
those NLLs, when its judge tokens are a prefix of the full text's (else it runs its own forward). `score(...,
served_nlls=...)` (live, when the judge's own model at full depth, exits off, served the output) takes the NLLs the
engine computed while serving (its logprobs): the same numbers up to float rounding, with no forward. Per-token NLLs may be
cached on disk (`disk_cache=True`: replay, and live, whose greedy outputs repeat when an arm serves a request again): one small JSON file per judged output under
`helios.paths.cache_dir()/judge`, named by a hash of what determines them: the judge's name, its checkpoint's
identity (config and weight file sizes, plus helios' provenance record), the judge's context ids and output ids.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from helios.workloads import Request


class Judge:
    """judge_score under candidate `name` at full depth (module docstring)."""

    def __init__(self, name: str, *, prompt_margin: int, disk_cache: bool = False) -> None:
        self.name = name
        self.prompt_margin = int(prompt_margin)
        self.disk_cache = disk_cache
        self._tokenizer: Any = None
        self._model: Any = None
        self._max_context: int | None = None
        self._identity: str | None = None
        self.forwards = 0  # outputs judged by the model (cache misses): what the judge cost
        self.served = 0  # outputs scored from the NLLs their serving computed (`score(..., served_nlls=)`)
        # context -> [(output ids, per-token NLLs)] judged so far: shorter outputs are priced from their prefixes
        self._judged: dict[tuple[int, ...], list[tuple[list[int], list[float]]]] = {}

    # -- lazy parts: the tokenizer and config are cheap, the model is loaded only when a score is not cached

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from helios.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.name, progress=False)
        return self._tokenizer

    @property
    def checkpoint(self) -> str:
        from helios.models import resolve_checkpoint

        return resolve_checkpoint(self.name, progress=False)

    @property
    def max_context(self) -> int:
        if self._max_context is None:
            from transformers import AutoConfig

            from helios.models import text_config

            config = text_config(AutoConfig.from_pretrained(self.checkpoint))
            self._max_context = int(getattr(config, "max_position_embeddings", 1 << 30))
        return self._max_context

    @property
    def model(self) -> Any:
        if self._model is None:
            from helios.models import load_candidate

            loaded = load_candidate(self.name, progress=False)  # full depth; load_candidate sets eval, no grad
            loaded.model.eval()
            self._model = loaded.model
        return self._model

    def identity(self) -> str:
        """The judge checkpoint's identity for the disk cache: its config, helios' provenance record (GGUF package and
        version) and the names and sizes of its weight files. Sizes, not contents: hashing ~0.5 GB per env is not
        worth it, and a re-conversion of the same package writes the same sizes and the same weights."""
        if self._identity is None:
            root = Path(self.checkpoint)
            parts: list[str] = [self.name]
            if root.is_dir():
                for file in ("config.json", "helios_source.json"):
                    if (root / file).exists():
                        parts.append((root / file).read_text())
                parts += [f"{p.name}:{p.stat().st_size}" for p in sorted(root.glob("*.safetensors"))]
            else:
                parts.append(str(root))  # a hub id: its name is all that is known without loading it
            self._identity = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
        return self._identity

    # -- scoring

    def context_ids(self, request: Request) -> list[int]:
        """The prompt of `request` as the judge is served it (module docstring: context)."""
        from helios.workloads import encode_requests

        return encode_requests([request], self.tokenizer, max(1, self.max_context - self.prompt_margin))[0]

    def output_ids(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def score(self, request: Request, text: str | None = None, *, ids: list[int] | None = None,
              context: list[int] | None = None, full_text: str | None = None,
              full_ids: list[int] | None = None, served_nlls: list[float] | None = None) -> float:
        """judge_score of output `text` of `request` (module docstring), or of `ids` already in the judge's vocabulary;
        `context`: its context ids, if known; `full_text` / `full_ids`: a longer output that it begins (judged once,
        its prefixes priced from it); `served_nlls`: per token of `ids`, its NLL as the judge's own model at full depth
        served it, given this context (the engine's logprobs): the judge's forward would repeat them, so none runs."""
        output = self.output_ids(text or "") if ids is None else self._plain(ids)
        if not output:
            return 0.0
        full_context = self.context_ids(request) if context is None else context
        context = self._fit(full_context, len(output))
        nlls = self._prefix_nlls(context, output)
        if nlls is None and served_nlls is not None and ids is not None and context and context == full_context:
            if len(served_nlls) != len(ids):
                raise ValueError(f"served_nlls has {len(served_nlls)} values for {len(ids)} token ids")
            special = set(self.tokenizer.all_special_ids)
            nlls = [float(v) for t, v in zip(ids, served_nlls) if int(t) not in special]
            self.served += 1
        if nlls is None and (full_text is not None or full_ids is not None) and context:
            full = self._plain(full_ids) if full_ids is not None else self.output_ids(full_text or "")
            if full[:len(output)] == output and self._fit(context, len(full)) == context:
                self._judge(context, full)
                nlls = self._prefix_nlls(context, output)
        if nlls is None:
            nlls = self._judge(context, output)
        if not nlls:  # nothing scored (no context and a one-token output): judge_score has no value either
            raise ValueError(f"judge {self.name}: nothing to score in a {len(output)}-token output without context")
        value = math.exp(-sum(nlls) / len(nlls))
        if not math.isfinite(value):
            raise RuntimeError(f"judge {self.name} gave a non-finite score {value}")
        return value

    def _plain(self, ids: list[int]) -> list[int]:
        """Token ids without the judge's special tokens (EOS, BOS, ...), as decoding with skip_special_tokens drops."""
        special = set(self.tokenizer.all_special_ids)
        return [int(t) for t in ids if int(t) not in special]

    def _fit(self, context: list[int], output_len: int) -> list[int]:
        """A re-tokenised output may be longer than the serving margin (e.g. a byte-level judge): keep the most recent
        context that fits the judge's window beside it, as encode_requests does."""
        room = self.max_context - output_len
        if room < len(context):
            return context[-room:] if room > 0 else []
        return context

    def _prefix_nlls(self, context: list[int], output: list[int]) -> list[float] | None:
        """The NLLs of `output` from an output judged before that it begins (same context); None if there is none.
        With context, token i of the output is scored whatever its length, so a prefix's NLLs are the first ones."""
        n = len(output)
        for judged, nlls in self._judged.get(tuple(context), ()):
            if len(judged) >= n and judged[:n] == output and context:
                return nlls[:n]
        return None

    def _judge(self, context: list[int], output: list[int]) -> list[float]:
        """Per-token NLLs of `output` given `context` (disk cache, else one forward), remembered for its prefixes."""
        path = self._cache_path(context, output) if self.disk_cache else None
        nlls: list[float] | None = None
        if path is not None and path.exists():
            try:
                nlls = [float(x) for x in json.loads(path.read_text())["nll"]]
            except (OSError, ValueError, KeyError, TypeError):
                nlls = None  # unreadable (e.g. a foreign or older file): recompute and overwrite
        if nlls is None:
            import torch

            from helios.metrics import token_nlls

            self.forwards += 1
            with torch.inference_mode():
                nlls = token_nlls(self.model, [output], [context] if context else None)[0]
            if path is not None:
                from helios.paths import write_json

                write_json(path, {"judge": self.name, "nll": nlls})
        self._judged.setdefault(tuple(context), []).append((list(output), nlls))
        return nlls

    def _cache_path(self, context: list[int], output: list[int]) -> Path:
        from helios.paths import cache_dir

        key = json.dumps([self.name, self.identity(), context, output], separators=(",", ":"))
        digest = hashlib.sha256(key.encode()).hexdigest()
        return cache_dir() / "judge" / digest[:2] / f"{digest}.json"
