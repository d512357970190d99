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
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ._io import folder_size, write_json, write_text
from .artifact import Artifact, artifact_id, library_versions
from .errors import VlmedgeError
from .recipe import Recipe, Stage, to_dict


def _say(console, text: str) -> None:
    if console is not None:
        console.print(text)


def _clean_partials(folder: Path) -> None:
    for p in folder.glob(".*.partial"):
        shutil.rmtree(p, ignore_errors=True)


def _eval_config(recipe: Recipe):
    from .evaluate import EvalConfig

    e = recipe.eval
    return EvalConfig(data=e.data or recipe.data.source, zero_shot_images=e.zero_shot_images,
                      retrieval_pairs=e.retrieval_pairs, hard_negative_pairs=e.hard_negative_pairs)


def _describe(art: Artifact, folder: Path, eval_cfg, parent: Artifact | None) -> None:
    """Fill in metrics, size, parameters and FLOPs of a finished step, and write its eval.json."""
    from .evaluate import TorchEncoder, evaluate, flat_metrics

    path = Path(art.path)
    if art.kind == "model":
        from .models import count_parameters, load_model
        from .stages.prune import measure_flops

        vlm = load_model(path)
        encoder = TorchEncoder(vlm)
        art.parameters = count_parameters(vlm.model)
        art.flops = measure_flops(vlm)
        art.size_bytes = sum(folder_size(p) for p in path.glob("*.safetensors"))
    else:
        from .stages.export import OnnxEncoder, onnx_size

        encoder = OnnxEncoder(path)
        art.parameters = encoder.manifest.get("parameters") or (parent.parameters if parent else None)
        art.flops = parent.flops if parent else None
        art.size_bytes = onnx_size(path)
    t0 = time.perf_counter()
    metrics = evaluate(encoder, eval_cfg)
    art.seconds["eval"] = round(time.perf_counter() - t0, 1)
    write_json(folder / "eval.json", {"data": eval_cfg.data, "metrics": metrics})
    art.metrics = flat_metrics(metrics)
    art.versions = library_versions()


def run(recipe: Recipe, out: str | Path, *, force: bool = False, console=None,
        on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage of `recipe` into `out`, benchmark, write the report; returns the report."""
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "recipe.resolved.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    eval_cfg = _eval_config(recipe)
    eval_key = dataclasses.asdict(eval_cfg)
    data_key = dataclasses.asdict(recipe.data)
    steps: list[Artifact] = []

    def step(index: int, name: str, stage: str, kind: str, parent: Artifact | None, cfg: dict,
             make: Callable[[Path], tuple[Path, dict]]) -> Artifact:
        """One step: reuse its finished folder, or run `make` into it, describe it and record it."""
        aid = artifact_id(parent.id if parent else None, stage, cfg)
        folder = out / f"{index:02d}-{name}-{aid}"
        art = None if force else Artifact.load(folder)
        if art is not None:
            _say(console, f"[dim]{name}: cached ({folder.name})[/]")
        else:
            _say(console, f"[bold]{name}[/] ({stage}{' <- ' + parent.name if parent else ''}) -> {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            _clean_partials(folder)
            t0 = time.perf_counter()
            try:
                path, info = make(folder)
            except VlmedgeError as e:
                raise VlmedgeError(f"stage {name} failed: {e} (earlier steps are kept in {out})") from None
            art = Artifact(aid, name, stage, kind, str(path), parent=parent.id if parent else None, config=cfg,
                           info=info, seconds={"stage": round(time.perf_counter() - t0, 1)})
            _describe(art, folder, eval_cfg, parent)
            art.save(folder)
        steps.append(art)
        write_report(out, recipe, steps, None, console=None)
        if on_stage:
            on_stage(name)
        return art

    # the teacher: a trained preset, a user's folder, or (no train stage) an untrained preset
    stages = list(recipe.stages)
    first_train = stages.pop(0) if stages and stages[0].kind == "train" else None
    teacher_cfg = {"model": dataclasses.asdict(recipe.model), "data": data_key, "eval": eval_key,
                   "train": dataclasses.asdict(first_train.config) if first_train else None}
    source_config = Path(recipe.model.path or "", "config.json")
    if recipe.model.path and not first_train and source_config.exists():
        teacher_cfg["source_mtime"] = source_config.stat().st_mtime
    teacher = step(0, "teacher", "train" if first_train else "source", "model", None, teacher_cfg,
                   lambda folder: (_make_teacher(recipe, first_train, folder, console), {}))

    last = {"model": teacher, "onnx": None}
    for index, stage in enumerate(stages, start=1):
        parent = last["onnx"] if stage.kind == "quantize" else last["model"]
        cfg = {"stage": dataclasses.asdict(stage.config), "eval": eval_key,
               "data": data_key if stage.kind in ("prune", "distill", "quantize") else None,
               "teacher": teacher.id if stage.kind == "distill" else None}
        art = step(index, stage.name, stage.kind, "onnx" if stage.kind in ("export", "quantize") else "model",
                   parent, cfg, lambda folder, stage=stage, parent=parent: _run_stage(
                       stage, Path(parent.path), Path(teacher.path), folder, recipe, eval_cfg, console))
        if stage.kind == "export":
            last["onnx"] = art
        elif stage.kind != "quantize":
            last["model"] = art

    bench = _bench(recipe, steps, out, force, console)
    return write_report(out, recipe, steps, bench, console=console)


def _make_teacher(recipe: Recipe, train_stage: Stage | None, folder: Path, console) -> Path:
    from .train import TrainConfig, train

    model_dir = folder / "model"
    if train_stage is None:
        if recipe.model.path:
            from .models import check_model_folder
            check_model_folder(recipe.model.path)
            return Path(recipe.model.path).resolve()
        return _untrained_preset(recipe, model_dir)
    if (model_dir / "config.json").is_file():
        return model_dir  # trained before the run was interrupted: only its record is missing
    cfg = TrainConfig.from_schedule(train_stage.config, preset=recipe.model.preset or "small", init=recipe.model.path,
                                    data=recipe.data.source, data_count=recipe.data.count,
                                    skip_bad=recipe.data.skip_bad)
    resume = (model_dir / "checkpoints" / "last" / "trainer.json").is_file()
    if resume:
        _say(console, "  resuming training from its last checkpoint")
    train(cfg, model_dir, resume=resume, progress=console is not None)
    return model_dir


def _untrained_preset(recipe: Recipe, model_dir: Path) -> Path:
    import numpy as np

    from ._io import atomic_dir
    from .data import open_dataset
    from .models import build_from_preset, load_preset, train_tokenizer

    spec = load_preset(recipe.model.preset)
    ds = open_dataset(recipe.data.source, "train", resolution=spec["preprocess"]["image_size"],
                      count=min(recipe.data.count or 5000, 5000))
    rng = np.random.default_rng(0)
    tok = train_tokenizer(ds.captions(rng.integers(len(ds), size=min(3 * len(ds), 15000)), rng), spec["vocab_size"])
    vlm = build_from_preset(spec, tok, source=f"preset:{recipe.model.preset} (untrained)")
    with atomic_dir(model_dir) as tmp:
        vlm.save(tmp)
    return model_dir


def _run_stage(stage: Stage, parent: Path, teacher: Path, folder: Path, recipe: Recipe, eval_cfg,
               console) -> tuple[Path, dict]:
    c = stage.config
    if stage.kind == "prune":
        from .stages.prune import prune

        c = dataclasses.replace(c, data=recipe.data.source)
        return folder / "model", prune(parent, folder / "model", c)
    if stage.kind == "distill":
        from .train import TrainConfig, train

        model_dir = folder / "model"
        if (model_dir / "config.json").is_file():
            return model_dir, {}
        cfg = TrainConfig.from_schedule(c, init=str(parent), data=recipe.data.source, data_count=recipe.data.count,
                                        skip_bad=recipe.data.skip_bad)
        resume = (model_dir / "checkpoints" / "last" / "trainer.json").is_file()
        summary = train(cfg, model_dir, resume=resume, progress=console is not None, teacher=str(teacher),
                        losses_cfg=c.losses)
        return model_dir, {k: summary[k] for k in ("first_loss", "final_loss", "seconds", "samples_per_s")}
    if stage.kind == "export":
        from .stages.export import export

        return folder / "onnx", export(parent, folder / "onnx", c)
    if stage.kind == "quantize":
        from .evaluate import evaluate, flat_metrics
        from .stages.quantize import quantize

        c = dataclasses.replace(c, data=recipe.data.source)
        return folder / "onnx", quantize(parent, folder / "onnx", c,
                                         evaluate_fn=lambda enc: flat_metrics(evaluate(enc, eval_cfg)))
    raise VlmedgeError(f"unknown stage {stage.kind}")


def _bench(recipe: Recipe, steps: list[Artifact], out: Path, force: bool, console) -> dict[str, Any]:
    """Every step on every target it can run on, in one process, one after the other; cached by content."""
    import json

    from .targets import TARGET_KINDS, get_target
    from .runtime.measure import environment

    key = {"steps": [s.id for s in steps], "targets": recipe.targets, "measure": dataclasses.asdict(recipe.measure)}
    path = out / f"bench-{artifact_id(None, 'bench', key)}.json"
    if path.is_file() and not force:
        _say(console, f"[dim]bench: cached ({path.name})[/]")
        return json.loads(path.read_text())
    results: dict[str, dict[str, Any]] = {}
    for s in steps:
        for target, options in recipe.targets:
            if TARGET_KINDS[target] != s.kind:
                continue
            _say(console, f"bench {s.name} on {target}")
            results.setdefault(s.name, {})[target] = get_target(target)(s.path, recipe.measure, **options)
    bench = {"environment": environment(), "measure": dataclasses.asdict(recipe.measure), "results": results}
    write_json(path, bench)
    return bench
