"""Atomic file and folder writes: an interrupted run never leaves something that looks finished."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """An open file that becomes `path` by an atomic rename once the block ends without error. The temporary name is
    unique per writer, so processes writing the same file at once (DDP ranks filling one cache) never collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename."""
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; a missing file raises `missing`, bad JSON a one-line error naming the file."""
    from .errors import VlmedgeError

    path = Path(path)
    if not path.is_file():
        raise VlmedgeError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmedgeError(f"{path}: not valid JSON ({e})") from None


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final`, on error it is removed.

    A folder at `final` therefore always holds a completed write.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # Move the old folder aside with one atomic rename before deleting it: a kill at any point leaves `final`
    # complete (old or new) or absent, never half-deleted (rmtree in place could leave trainer.json without weights).
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{os.getpid()}.old.partial")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def cache_dir() -> Path:
    """Where generated datasets live: $VLMEDGE_CACHE, else ~/.cache/vlmedge."""
    root = os.environ.get("VLMEDGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlmedge")
    return Path(root)


def folder_size(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
