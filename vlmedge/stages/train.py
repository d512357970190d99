"""The train stage: a preset trained from scratch, or a model folder (the parent, or the recipe's `model.path`)
fine-tuned, by the one training loop (`vlmedge.train`): checkpoints, resume, progress, data parallelism."""

from __future__ import annotations

from pathlib import Path

from ..artifact import Artifact
from ..models import DEFAULT_PRESET
from ..train import TrainConfig, TrainStage, train
from . import Context, register


@register(TrainStage, kind="train", consumes=None, produces="model", provides="model", reads=("data", "model"))
def run(parent: Artifact | None, cfg: TrainStage, ctx: Context) -> Artifact:
    model = ctx.model
    init = parent.path if parent is not None else (model.path if model else None)
    config = TrainConfig.from_schedule(cfg, preset=(model.preset if model else None) or DEFAULT_PRESET, init=init,
                                       data=ctx.data.source, data_count=ctx.data.count, skip_bad=ctx.data.skip_bad)
    summary = fit(config, ctx)
    return ctx.artifact(parent, ctx.out, summary, trained_on=ctx.data.source)


def fit(config: TrainConfig, ctx: Context, **distill) -> dict:
    """Train into `ctx.out`, resuming from its last checkpoint as `ctx.resume` says; the summary a record keeps."""
    out = Path(ctx.out)
    checkpoint = (out / "checkpoints" / "last" / "trainer.json").is_file()
    if ctx.resume is None and (out / "config.json").is_file() and not checkpoint:
        return {}  # trained before the run was interrupted: only its record is missing
    resume = checkpoint if ctx.resume is None else ctx.resume
    if resume:
        ctx.say("  resuming training from its last checkpoint")
    summary = train(config, out, resume=resume, progress=ctx.progress, **distill)
    return {k: summary[k] for k in ("first_loss", "final_loss", "seconds", "samples_per_s", "steps", "world_size",
                                   "skipped_images", "measured")}
