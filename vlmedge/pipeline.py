"""Runs a recipe: stage by stage, each cached by content hash, resumable, measured, reported.

Layout of a run folder::

    recipe.resolved.yaml          the recipe with every default filled in (and --set applied)
    00-teacher-<id>/              one folder per step: model/ or onnx/, eval.json, artifact.json (written last)
    01-prune-<id>/ ...
    bench-<id>.json               latency of every step on every target, measured in one go
    report.json, report.md, pareto.png

A step whose folder holds `artifact.json` is done and is skipped on a rerun (`force` reruns all). A changed stage
config changes its id and so the ids of every later step: those rerun, earlier ones stay. Stage outputs are written
to temporary folders and moved into place when complete; an interrupted train or distill stage resumes from its
last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from .artifact import Artifact, artifact_id
from .disk import claim_output, write_json, write_text
from .errors import VlmedgeError
from .options import flat
from .recipe import Recipe, to_dict
from .report import write_report
from .runtime.measure import environment, pool_rounds
from .stages import Context, execute, spec_for, step_id
from .targets import TARGET_KINDS, get_target
from .train import TrainStage

TOWER = "tower"
"""The step that trains a two-stage recipe's image tower (`model.tower`)."""


def run(recipe: Recipe, out: str | Path, *, force: bool = False, console=None,
        on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage of `recipe` into `out`, benchmark, write the report; returns the report."""
    sources = (recipe.model.path, recipe.data.source, recipe.eval.data)
    out = claim_output(out, "compress", tuple(s for s in sources if s and Path(s).exists()))
    write_text(out / "recipe.resolved.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    context = Context(data=recipe.data, eval=recipe.eval, model=recipe.model, console=console,
                      progress=console is not None, resume=None, force=force)
    steps: list[Artifact] = []
    folders: dict[str, Path] = {}

    def step(index: int, name: str, config: Any, parent: Artifact | None, ctx: Context) -> Artifact:
        folder = folders[name] = out / f"{index:02d}-{name}-{step_id(config, parent, ctx)}"
        try:
            art = execute(config, parent, ctx, folder, folder / spec_for(config).product, name=name)
        except VlmedgeError as e:
            raise VlmedgeError(f"stage {name} failed: {e} (earlier steps are kept in {out})") from None
        steps.append(art)
        write_report(out, recipe, steps, None, console=None)
        if on_stage:
            on_stage(name)
        return art

    # the teacher: a trained preset, a user's folder fine-tuned, or (no train stage) the folder or untrained preset
    stages = list(recipe.stages)
    first = stages.pop(0) if stages and stages[0].kind == "train" else None
    index = 0
    config = first.config if first else recipe.model
    if recipe.model.tower is not None:  # two-stage: the dual-encoder tower first, its image tower starts the teacher
        t = recipe.model.tower
        tower = step(index, TOWER, TrainStage(steps=t.steps, batch_size=t.batch_size), None,
                     dataclasses.replace(context, model=dataclasses.replace(recipe.model, preset=t.preset,
                                                                            tower=None)))
        config, index = dataclasses.replace(config, vision_init=tower.path), index + 1
    teacher = step(index, "teacher", config, None, context)
    # the later steps answer the questions the teacher answered (a count its evaluation may have chosen by time)
    answered = json.loads((folders["teacher"] / "eval.json").read_text())["metrics"] if context.eval else {}
    context = dataclasses.replace(context, teacher=teacher,
                                  eval=context.eval.pinned(answered) if context.eval else None)
    latest: dict[str, Artifact] = {"model": teacher}  # the newest artifact each later stage may consume, by kind
    for index, stage in enumerate(stages, start=index + 1):
        spec = spec_for(stage.config)
        art = step(index, stage.name, stage.config, latest[spec.consumes], context)
        if spec.provides:
            latest[spec.provides] = art

    bench = _bench(recipe, steps, out, force, console)
    return write_report(out, recipe, steps, bench, console=console)


def _bench(recipe: Recipe, steps: list[Artifact], out: Path, force: bool, console) -> dict[str, Any]:
    """Every step on every target it can run on, in one process, one after the other; cached by content."""
    key = {"steps": [s.id for s in steps], "targets": recipe.targets, "measure": flat(recipe.measure)}
    path = out / f"bench-{artifact_id(None, 'bench', key)}.json"
    if path.is_file() and not force:
        if console is not None:
            console.print(f"[dim]bench: cached ({path.name})[/]")
        return json.loads(path.read_text())
    runs = [(s, target, options) for s in steps if s.name != TOWER  # a means to the teacher, not a deliverable
            for target, options in recipe.targets if TARGET_KINDS[target] == s.kind]
    rounds = recipe.measure.rounds
    measured: dict[tuple[str, str], list[dict[str, Any]]] = {}
    t0 = time.perf_counter()
    for r in range(rounds):  # interleaved: every step once per round
        for k, (s, target, options) in enumerate(runs):
            if console is not None:
                where = f"round {r + 1}/{rounds}, " if rounds > 1 else ""
                console.print(f"bench {s.name} on {target} ({where}{k + 1}/{len(runs)}; "
                              f"elapsed {time.perf_counter() - t0:.0f} s)")
            measured.setdefault((s.name, target), []).append(get_target(target)(s.path, recipe.measure, **options))
    results: dict[str, dict[str, Any]] = {}
    for (name, target), records in measured.items():
        results.setdefault(name, {})[target] = {**pool_rounds(records), **({"rounds": rounds} if rounds > 1 else {})}
    bench = {"environment": environment(), "measure": flat(recipe.measure), "results": results}
    write_json(path, bench)
    return bench
