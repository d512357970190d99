"""The distill stage: the student (the parent: a pruned teacher, or any model folder) trained against the frozen
teacher (`context.teacher`) by the one training loop, with the family's distillation losses."""

from __future__ import annotations

from ..artifact import Artifact
from ..errors import VlmedgeError
from ..train import DistillStage, TrainConfig
from . import Context, register
from .train import fit


@register(DistillStage, kind="distill", consumes="model", produces="model", provides="model",
          reads=("data", "teacher"))
def run(parent: Artifact | None, cfg: DistillStage, ctx: Context) -> Artifact:
    if parent is None or ctx.teacher is None:
        raise VlmedgeError("distill: needs a student model and a teacher")
    config = TrainConfig.from_schedule(cfg, init=parent.path, data=ctx.data.source, data_count=ctx.data.count,
                                       skip_bad=ctx.data.skip_bad)
    summary = fit(config, ctx, teacher=ctx.teacher.path, losses_cfg=cfg.losses)
    return ctx.artifact(parent, ctx.out, summary, trained_on=ctx.data.source)
