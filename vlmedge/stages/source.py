"""The source stage: the run's starting model when no train stage makes one — a user's folder, used in place, or a
preset built untrained (for latency-only recipes)."""

from __future__ import annotations

from pathlib import Path

from .. import families
from ..artifact import Artifact
from ..disk import atomic_dir
from ..models import load_preset
from . import Context, ModelSpec, register


@register(ModelSpec, kind="source", consumes=None, produces="model", provides="model", reads=("data", "model"))
def run(parent: Artifact | None, cfg: ModelSpec, ctx: Context) -> Artifact:
    if cfg.path:
        families.of(cfg.path).check_folder(cfg.path)
        return ctx.artifact(None, Path(cfg.path).resolve())
    return ctx.artifact(None, _untrained_preset(cfg.preset, ctx))


def _untrained_preset(preset: str, ctx: Context) -> Path:
    import numpy as np

    spec = load_preset(preset)
    family = families.for_preset(spec)
    ds = family.open_data(ctx.data.source, "train", resolution=spec["preprocess"]["image_size"],
                          count=min(ctx.data.count or 5000, 5000))
    tok = family.tokenizer(spec, ds, np.random.default_rng(0))
    model = family.build(spec, tok, source=f"preset:{preset} (untrained)")
    with atomic_dir(ctx.out) as tmp:
        model.save(tmp)
    return ctx.out
