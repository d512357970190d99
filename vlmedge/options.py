"""A model family's own settings, beside the shared ones of a recipe section.

A shared config (`EvalConfig`, `ExportConfig`, `PruneConfig`, `DistillStage`, `MeasureConfig`) names its section
(`SECTION`) and carries the family's settings for it in `options`: an instance of the dataclass the family declares
for that section (`Family.options`, e.g. the generative family's `vqa_questions`, the matching family's
`rerank_k`). A recipe and the command line still give them as keys of the section (`eval: {vqa_questions: 40}`,
`--vqa-questions 40`); the recipe loader and the CLI route them to the model's family, and a key of another family
is a one-line error naming the family it belongs to. The family reads its settings back with `Mine.of(cfg)`, its
defaults where a config was made without them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Options:
    """Base of a family's settings for one section; subclasses are frozen dataclasses validated in
    `__post_init__`."""

    @classmethod
    def of(cls, cfg: Any):
        """`cfg.options` when it is this family's, else this family's defaults."""
        found = getattr(cfg, "options", None)
        return found if isinstance(found, cls) else cls()

    def pinned(self, metrics: dict[str, Any]) -> "Options":
        """These settings with what an evaluation chose by time (`metrics`, as in eval.json) fixed to what it did;
        unchanged unless a family chooses something by time."""
        return self


def shared_fields(cls) -> list[str]:
    """A shared config's own keys (its `options` field is not one a user writes)."""
    return [f.name for f in dataclasses.fields(cls) if f.name != "options"]


def flat(cfg) -> dict[str, Any]:
    """A config as a recipe section writes it: its own fields, then its family's options as keys beside them."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "options"}
    options = getattr(cfg, "options", None)
    if options is not None:
        out.update(dataclasses.asdict(options))
    return out
