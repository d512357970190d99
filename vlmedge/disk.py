"""Files on disk: atomic file and folder writes (an interrupted run never leaves something that looks finished),
JSON/YAML reads with one-line errors, the one output-folder policy and the cache folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .errors import VlmedgeError


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """An open file that becomes `path` by an atomic rename once the block ends without error. The temporary name is
    unique per writer, so processes writing the same file at once (DDP ranks filling one cache) never collide."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a shipped manifest must be readable as open() makes it
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to `path` through a temporary file and an atomic rename."""
    with atomic_file(path) as f:
        json.dump(data, f, indent=2, sort_keys=False, default=_json_default)
        f.write("\n")


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; a missing file raises `missing`, bad JSON a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise VlmedgeError(missing)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VlmedgeError(f"{path}: not valid JSON ({e})") from None


MAX_YAML_BYTES = 1 << 20  # recipes and budget files are a few KB


def read_yaml(path: str | os.PathLike, text: str | None = None) -> Any:
    """Parse a small YAML file safely and boundedly: no tags beyond plain data (safe_load), no anchors or aliases
    (a 700-byte file of nested aliases expands to gigabytes), at most 1 MB; every failure one line naming the
    file (and the line, where YAML knows it)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text() if text is None else text
    except (OSError, UnicodeDecodeError) as e:
        raise VlmedgeError(f"{path}: cannot read ({e})") from None
    if len(text) > MAX_YAML_BYTES:
        raise VlmedgeError(f"{path}: {len(text)} bytes; a recipe or budget file is at most {MAX_YAML_BYTES} bytes")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):  # events only: nothing is expanded
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                line = event.start_mark.line + 1
                raise VlmedgeError(f"{path}:{line}: YAML anchors and aliases (&name, *name) are not accepted; "
                                   "write the values out")
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise VlmedgeError(f"{path}{line}: invalid YAML ({str(e).splitlines()[0]})") from None


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
    tmp.chmod(0o777 & ~_umask())
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


OUTPUT_MARK = ".vlmedge-output"
"""Written into every output folder vlmedge claims: which command made it (a rerun of that command may replace it)."""
RECORD_FILES = ("artifact.json", "eval.json", "bench.json", "profile.json", OUTPUT_MARK)
"""What vlmedge writes about a folder, not part of what it ships (not copied into a derived artifact or a bundle,
not in its record's file digests)."""


def made_by(folder: Path) -> str | None:
    """The command that made `folder` (its mark, or the stage its artifact.json records), None if not vlmedge."""
    folder = Path(folder)
    for name, key in ((OUTPUT_MARK, "command"), ("artifact.json", "stage")):
        try:
            return str(json.loads((folder / name).read_text())[key])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return "compress" if (folder / "recipe.resolved.yaml").is_file() else None  # a run folder of an older vlmedge


def claim_output(out: str | os.PathLike, command: str, inputs: tuple = ()) -> Path:
    """The one output-folder policy of every command and the pipeline, checked before any work: `out` must not
    exist, be empty, or be a folder vlmedge made for the same command; never a file, an input or a folder above an
    input, nor somewhere that cannot be written. Marks the folder as `command`'s and returns it."""
    out = Path(out)
    target = out.resolve()
    for src in inputs:
        if src is not None and Path(src).exists():
            source = Path(src).resolve()
            if source == target or source.is_relative_to(target):
                raise VlmedgeError(f"--out {out}: is the input {src} or a folder holding it; writing there would "
                                   "destroy the input; choose a new folder")
    if out.exists() and not out.is_dir():
        raise VlmedgeError(f"--out {out}: is a file, not a folder; choose a new folder (nothing was changed)")
    if out.is_dir() and any(out.iterdir()):
        owner = made_by(out)
        if owner is None:
            raise VlmedgeError(f"--out {out}: is a folder of other files (not made by vlmedge); refusing to replace "
                               "it; choose a new or empty folder")
        if owner != command:
            raise VlmedgeError(f"--out {out}: holds the output of vlmedge {owner}, not {command}; choose another "
                               "folder")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise VlmedgeError(f"--out {out}: {existing} is not writable")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / OUTPUT_MARK).exists():
            write_json(out / OUTPUT_MARK, {"command": command})
    except OSError as e:
        raise VlmedgeError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out
