"""The one record passed from stage to stage.

An artifact's id is a hash of its parent's id and content, its own stage configuration and what else it read (the
data, the teacher, a folder a setting names), so a rerun of a recipe recognises finished stages and a changed stage
or input invalidates that step and everything after it. `artifact.json` is written last, atomically: a stage folder
without it is unfinished, whatever else it holds.

A folder is what it contains. The record stores its product's path relative to the record's folder (absolute only
for a product outside it: a user's model used in place) and the sha256 of every file the product ships
(`files`); loading a record never redirects to where the folder was first written, and `mismatches` says which files
are no longer what the record vouches for (copied and edited, truncated, replaced, missing).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .disk import RECORD_FILES, write_json

RECORD = "artifact.json"
FOLDER = "folder"
"""A stage config field's metadata key: the value names a model folder the stage reads, which enters the step's id
by its content (`field(default=None, metadata={FOLDER: True})`)."""
NOT_SHIPPED = ("checkpoints", "engines")
"""Subfolders of a product that are working state, not what it ships: training checkpoints (kept for resume) and
the `tensorrt` target's engine cache."""


@dataclass(frozen=True)
class Artifact:
    """What a stage made: its product's path, its family, its measurements. Frozen: `stages.execute` completes a
    stage's record (`dataclasses.replace`) before anything else reads it."""

    id: str
    name: str
    """The step's name in reports (teacher, prune, distill, export, quantize-dynamic, ...)."""
    stage: str
    kind: str
    """'model' (PyTorch model folder) or 'onnx' (export folder)."""
    path: str
    """The product: a model folder or an export folder."""
    parent: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    parameters: int | None = None
    flops: dict[str, int] | None = None
    size_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    family: str = ""
    """The model family's name (`vlmedge.families`), resolved once when the record is made."""
    files: dict[str, str] = field(default_factory=dict)
    """What the product ships, as written: relative file path -> sha256. Empty in records of vlmedge < 0.2."""
    data: str | None = None
    """The data that says how well it does: what it was evaluated on, else what it was trained on, else its
    parent's; None for a user's folder vlmedge has neither trained nor evaluated (a single command then evaluates
    it only on the --data given, never silently on the built-in shapes)."""
    measured: str | None = None
    """Which images its metrics measured, as its family's evaluation says (a split of shapes, the held-out tenth of
    a user's source, or the source's own split): never the images it trained on."""

    @property
    def content(self) -> str:
        """A digest of `files`: equal for equal contents wherever the folder lies."""
        return content_id(self.files)

    def mismatches(self) -> list[str]:
        """How the product's files differ from what the record vouches for: '<path>: <why>' per missing or changed
        file, [] if none (or if the record is too old to list its files). Files added beside them are not a
        difference: what vlmedge reads is what the record lists (another precision's graphs added to an
        onnx-community folder's `onnx/`, a README)."""
        if not self.files:
            return []
        root = Path(self.path)
        if not root.is_dir():
            return [f"{root}: missing"]
        out = []
        for name, digest in self.files.items():  # only what is recorded is read (and hashed)
            if not (root / name).is_file():
                out.append(f"{root / name}: missing")
            elif _sha256(root / name) != digest:
                out.append(f"{root / name}: changed since it was written (sha256 differs)")
        return out

    def save(self, folder: Path) -> None:
        record = asdict(self)
        product, folder = Path(self.path).resolve(), Path(folder).resolve()
        inside = product == folder or product.is_relative_to(folder)
        record["path"] = os.path.relpath(product, folder) if inside else str(product)
        write_json(folder / RECORD, record)

    @classmethod
    def load(cls, folder: Path) -> "Artifact | None":
        """The record in `folder`, its product resolved inside `folder` (None if there is no readable record)."""
        folder = Path(folder)
        path = folder / RECORD
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            art = cls(**record)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            return None
        if not isinstance(art.path, str) or not isinstance(art.files, dict):
            return None
        return replace(art, path=str(_product(folder, art.path, legacy="files" not in record and art.stage != "source")))


def _product(folder: Path, recorded: str, legacy: bool) -> Path:
    """Where a record's product is now: relative paths are the folder's; a record of vlmedge < 0.2 holds the
    absolute path it was written at, which is mapped into the folder (a run step's model/ or onnx/, else the folder
    itself), never followed."""
    if not os.path.isabs(recorded):
        return Path(os.path.normpath(folder / recorded))
    if not legacy:
        return Path(recorded)  # a product outside the record's folder: a user's model used in place
    name = Path(recorded).name
    return folder / name if name in ("model", "onnx") and (folder / name).is_dir() else folder


def product_files(root: Path) -> dict[str, str]:
    """sha256 of every file a product ships (records, marks, temporaries and checkpoints left out), by relative
    path. Cached per process on each file's size and modification time."""
    root = Path(root)
    if root.is_file():
        return {root.name: _sha256(root)}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_SHIPPED and not d.startswith("."))
        for name in sorted(filenames):
            if name in RECORD_FILES or name.startswith("."):
                continue
            full = Path(dirpath) / name
            out[full.relative_to(root).as_posix()] = _sha256(full)
    return out


_DIGESTS: dict[tuple, str] = {}


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def content_id(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]


# Bumped when a stage's output for the same configuration changes (a new graph form, a fix), so that a rerun into an
# old run folder makes that step and every later one again instead of reusing what older code made; "*" for a
# change of every stage's id.
STAGE_REVISIONS = {
    "*": 2,  # 2: ids include the content of the inputs (vlmedge 0.2)
    "export": 7,  # 2: patch embedding exported as patchify + MatMul; 3: tuned thread counts in the manifest;
    # 4: the generative export in the onnx-community layout (config.json, processor configs, graphs in onnx/);
    # 5: the generative vision graph takes (B, N, 3, H, W) frames and pixel_attention_mask (SmolVLM's processor);
    # 6: unmasked self-attention fused into MultiHeadAttention; 7: the decoder's optional logits_to_keep input and
    # its q/k/v and gate/up projections traced as one MatMul each
    "quantize": 4,  # 2: no SkipLayerNormalization in the saved graph, Conv no longer a default op type; 3: threads;
    # 4: graphs of an onnx-community export carry their dtype suffix (_quantized, _int8, _q4, _fp16)
}


def artifact_id(parent: str | None, stage: str, config: Any) -> str:
    record = {"parent": parent, "stage": stage, "config": config,
              "revision": [STAGE_REVISIONS["*"], STAGE_REVISIONS.get(stage, 1)]}
    blob = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    out = {"vlmedge": __version__}
    for mod in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            continue
    return out
