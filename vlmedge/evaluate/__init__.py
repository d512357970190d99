"""What every family's evaluation shares: the evaluation settings (`EvalConfig`), Recall@K, and the flat metric
names gates and reports use. Each family's tasks live in its package (`families/<name>/tasks.py`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import numpy as np

from ..data import DEFAULT_SOURCE, is_shapes, shapes_count
from ..errors import VlmedgeError


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate on. Sizes are per metric family."""

    data: str = DEFAULT_SOURCE
    """Held-out data: shapes (every task), or a captioned dataset (retrieval)."""
    zero_shot_images: int = 1080
    """Single-object held-out images for zero-shot colour x shape classification (36 classes)."""
    retrieval_pairs: int = 1000
    """Image-caption pairs for Recall@K both ways."""
    hard_negative_pairs: int = 500
    """Images per hard-negative test (colour, shape, relation swapped)."""
    classes: str | None = None
    """Zero-shot on labelled data (a label column, class folders): a text file of the class labels, one per line
    (default: the labels found in the data); every label of the data must be among them."""
    templates: str | None = None
    """Zero-shot prompts: a text file with one template per line, or the templates themselves separated by '|',
    each with {} where the class name goes (default: CLIP's 'a photo of a {}.'); a class's embedding is the mean
    over its prompts, as CLIP's evaluation does."""
    seed: int = 0
    options: Any = None
    """The model family's own evaluation settings (`Family.options["eval"]`: a generative model's `vqa_questions`,
    `max_new_tokens`, `image_splitting`; a matching model's `rerank_k`), given as keys of this section."""

    SECTION: ClassVar[str] = "eval"

    def __post_init__(self):
        if is_shapes(self.data):
            shapes_count(self.data)
        for key in ("zero_shot_images", "retrieval_pairs", "hard_negative_pairs"):
            if getattr(self, key) < 1:
                raise VlmedgeError(f"eval: {key}={getattr(self, key)}; expected an integer >= 1")
        self.class_list(), self.template_list()  # bad files fail at load, before any work

    def pinned(self, metrics: dict[str, Any]) -> "EvalConfig":
        """This configuration with what an evaluation chose by time fixed to what it did (its `metrics` as written
        in eval.json; the family's options say what, e.g. the questions a generative model answered): a run's
        later steps are evaluated as its first model was."""
        return replace(self, options=self.options.pinned(metrics)) if self.options is not None else self

    def class_list(self) -> list[str] | None:
        """The --classes file's labels (None: take them from the data)."""
        if self.classes is None:
            return None
        lines = _lines(self.classes, "classes")
        if len(set(lines)) != len(lines):
            dup = next(x for x in lines if lines.count(x) > 1)
            raise VlmedgeError(f"eval: classes file {self.classes}: {dup!r} is listed twice")
        return lines

    def template_list(self) -> list[str]:
        if self.templates is None:
            return list(DEFAULT_TEMPLATES)
        from pathlib import Path

        if Path(self.templates).is_file():
            found = _lines(self.templates, "templates")
        elif "{}" in self.templates:
            found = [t.strip() for t in self.templates.split("|") if t.strip()]
        else:
            raise VlmedgeError(f"eval: templates {self.templates!r}: not a file, and no {{}} where the class name "
                               "goes (e.g. 'a photo of a {}.|a drawing of a {}.')")
        for t in found:
            if t.count("{}") != 1:
                raise VlmedgeError(f"eval: template {t!r} ({self.templates}) needs exactly one {{}} for the class "
                                   "name")
        return found


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def _lines(path: str, key: str) -> list[str]:
    from pathlib import Path

    try:
        lines = [x.strip() for x in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise VlmedgeError(f"eval: {key} file {path}: cannot read ({type(e).__name__}: {e})") from None
    lines = [x for x in lines if x and not x.startswith("#")]
    if not lines:
        raise VlmedgeError(f"eval: {key} file {path} lists nothing")
    return lines


def recall_at_k(sim: np.ndarray, query_keys: Sequence[str], item_keys: Sequence[str], ks=(1, 5, 10)) -> dict:
    """Fraction of queries with a matching item (same caption text) among the top k."""
    item_keys = np.asarray(item_keys, dtype=object)
    return recall_from_hits(sim, item_keys[None, :] == np.asarray(query_keys, dtype=object)[:, None], ks)


def recall_from_hits(sim: np.ndarray, hit: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Fraction of queries (rows) with a hit (`hit[q, i]`) among their top k items by similarity."""
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(hit, order, axis=1)
    return {f"r{k}": float(ranked[:, :k].any(axis=1).mean()) for k in ks}


def measured_on(metrics: dict[str, Any]) -> str | None:
    """Which images an evaluation measured, as its family recorded it (`metrics["data"]["measured"]`: a split of
    shapes, a user's held-out tenth or own split); None for a record written before evaluations said so."""
    return (metrics.get("data") or {}).get("measured")


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """{'zero_shot.top1': 0.93, ...}: the names gates and reports use."""
    out: dict[str, float] = {}
    for group, values in metrics.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, float):
                    out[f"{group}.{k}"] = v
    return out
