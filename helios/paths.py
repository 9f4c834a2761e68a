"""Where helios keeps what it builds (converted checkpoints, trained heads, traces), and atomic writes.

Nothing here downloads: the cache only holds what helios derives from installed packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


# The process's umask, read once at import (reading it means setting it, which is not thread-safe later): files and
# folders written atomically get the permissions a plain open() / mkdir() would have given them.
_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """`$HELIOS_CACHE_DIR`, else `~/.cache/helios`; created on demand."""
    root = Path(os.environ.get("HELIOS_CACHE_DIR", Path.home() / ".cache" / "helios")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(final_path: Path) -> list[Path]:
    """Delete the temporaries that killed writers of `final_path` left behind (`.<name>.tmp-<pid>-*` whose process
    no longer exists: a SIGKILL gives no chance to clean up, and a killed GGUF conversion leaves ~0.5 GB)."""
    removed = []
    for stale in final_path.parent.glob(f".{final_path.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    stale.unlink()
            removed.append(stale)
    return removed


@contextlib.contextmanager
def atomic_dir(final_path: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to `final_path` only if the block succeeds.

    A crash or exception leaves no partial `final_path` behind (the temporary directory is removed); what a killed
    process left is removed by the next writer of the same path.
    """
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_path.name}.tmp-{os.getpid()}-", dir=final_path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp's 0700 would make the result private to its writer
        if final_path.exists():
            shutil.rmtree(final_path)
        os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final_path: Path, mode: str = "wb") -> Iterator:
    """Open a temporary sibling file for writing; `os.replace` it onto `final_path` on success."""
    final_path = Path(final_path)
    final_path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final_path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final_path.name}.tmp-{os.getpid()}-", dir=final_path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp's 0600 would make the result private to its writer
        os.replace(tmp_name, final_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def write_json(final_path: Path, data: object, **dumps_kwargs: object) -> None:
    """`data` as JSON (json.dumps with `dumps_kwargs`, e.g. indent), newline-terminated, written atomically."""
    text = json.dumps(data, **dumps_kwargs) + "\n"  # serialise first: a value JSON cannot hold leaves no file
    with atomic_file(Path(final_path), "w") as handle:
        handle.write(text)
