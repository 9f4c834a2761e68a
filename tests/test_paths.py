"""Atomic writes (helios/paths.py): nothing partial at the final path, and what a SIGKILLed writer left behind is
removed by the next writer of the same path.

    python -m pytest tests/test_paths.py -q
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helios.paths import atomic_dir, atomic_file, write_json

WRITER = """
import sys, time
from pathlib import Path
from helios.paths import atomic_dir
with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.bin").write_bytes(b"x" * 1024)
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_killed_writer_leaves_no_final_path_and_its_temporary_is_cleaned_next_time(tmp_path: Path) -> None:
    final = tmp_path / "checkpoint"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[1])
    assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
    os.kill(writer.pid, signal.SIGKILL)
    assert writer.wait(timeout=30) == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert not final.exists() and len(leftovers) == 1 and (leftovers[0] / "half.bin").exists()
    with atomic_dir(final) as tmp:  # the next writer: the dead writer's temporary goes, its own is renamed
        (tmp / "whole.bin").write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert (final / "whole.bin").read_bytes() == b"y"


def test_a_live_writers_temporary_is_left_alone(tmp_path: Path) -> None:
    final = tmp_path / "trace.parquet"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".trace.parquet.tmp-{sleeper.pid}-abc"
        busy.write_bytes(b"in progress")
        with atomic_file(final) as handle:
            handle.write(b"done")
        assert busy.exists() and final.read_bytes() == b"done"
    finally:
        sleeper.kill()
        sleeper.wait(timeout=30)


def test_a_failed_block_leaves_nothing(tmp_path: Path) -> None:
    final = tmp_path / "heads.safetensors"
    with pytest.raises(RuntimeError):
        with atomic_file(final) as handle:
            handle.write(b"partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_write_json_round_trips_and_a_value_json_cannot_hold_leaves_nothing(tmp_path: Path) -> None:
    import json

    path = tmp_path / "out" / "result.json"
    write_json(path, {"a": [1, 2.5, None]}, indent=1)
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]}
    assert path.read_text().endswith("}\n")
    with pytest.raises(ValueError, match="Out of range float"):
        write_json(path, {"a": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text()) == {"a": [1, 2.5, None]}  # the old file stands
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temporary left


def test_atomic_writes_get_the_permissions_a_plain_write_would(tmp_path: Path) -> None:
    """mkstemp / mkdtemp create 0600 / 0700; the final file and folder must instead follow the umask, like open()
    and mkdir() (a researcher's results and cached checkpoints are read by others on a shared server)."""
    import os

    from helios.paths import atomic_dir, write_json

    umask = os.umask(0)
    os.umask(umask)
    (tmp_path / "plain.json").write_text("{}")
    (tmp_path / "plain_dir").mkdir()
    write_json(tmp_path / "atomic.json", {})
    with atomic_dir(tmp_path / "atomic_dir") as folder:
        (folder / "x").write_text("x")
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == (tmp_path / "plain.json").stat().st_mode & 0o777
    assert (tmp_path / "atomic_dir").stat().st_mode & 0o777 == (tmp_path / "plain_dir").stat().st_mode & 0o777
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == 0o666 & ~umask
