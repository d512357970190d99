"""The one record passed from stage to stage.

An artifact's id is a hash of its parent's id and its own stage configuration (and the data it saw), so a rerun of a
recipe recognises finished stages and a changed stage invalidates itself and everything after it. `artifact.json`
is written last, atomically: a stage folder without it is unfinished, whatever else it holds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._io import write_json

RECORD = "artifact.json"


@dataclass
class Artifact:
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

    def save(self, folder: Path) -> None:
        write_json(folder / RECORD, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> "Artifact | None":
        path = folder / RECORD
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError):
            return None


# Bumped when a stage's output for the same configuration changes (a new graph form, a fix), so that a rerun into an
# old run folder makes that step and every later one again instead of reusing what older code made. A stage at
# revision 1 hashes as it always did.
STAGE_REVISIONS = {
    "export": 3,  # 2: patch embedding exported as patchify + MatMul; 3: tuned thread counts in the manifest
    "quantize": 3,  # 2: no SkipLayerNormalization in the saved graph, Conv no longer a default op type; 3: threads
}


def artifact_id(parent: str | None, stage: str, config: Any) -> str:
    record = {"parent": parent, "stage": stage, "config": config}
    if STAGE_REVISIONS.get(stage, 1) > 1:
        record["revision"] = STAGE_REVISIONS[stage]
    blob = json.dumps(record, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def library_versions() -> dict[str, str]:
    from . import __version__

    out = {"vlmedge": __version__}
    for mod in ("torch", "transformers", "onnx", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            continue
    return out
