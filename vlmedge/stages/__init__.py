"""The stage contract: every stage is `run(parent: Artifact | None, config, context) -> Artifact`.

A stage module defines its config dataclass (the recipe schema of that stage, validated in `__post_init__`) and one
`run` function, registered for that config type with `@register`. `execute` is the one way a stage runs, for the
recipe pipeline and for the single-stage commands alike: it computes the step's id (a hash of the parent's id, the
stage, its config and what else it reads), skips a step whose folder already records that id in `artifact.json`,
runs the stage, measures what it made (size, parameters, FLOPs, and the family's evaluation on held-out data) and
writes `artifact.json` last, so a folder without it is unfinished whatever else it holds.

Stages ask the family of their input (`vlmedge.families.of_artifact`: the record's family, resolved once when the
record is made) for everything model-specific; they never branch on a family's name, and they know nothing of the CLI or the pipeline.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .. import families
from .._registry import Registry
from ..artifact import FOLDER, RECORD, Artifact, artifact_id, content_id, library_versions, product_files
from ..data import DEFAULT_SOURCE, is_shapes, shapes_count
from ..disk import OUTPUT_MARK, claim_output, folder_size, write_json
from ..errors import VlmedgeError
from ..evaluate import EvalConfig, flat_metrics, measured_on
from ..models import DEFAULT_PRESET
from ..options import flat
from ..runtime.onnx import onnx_size, read_manifest

MODULES = ("source", "train", "prune", "distill", "export", "quantize")


@dataclass(frozen=True)
class TowerSpec:
    """Two-stage training in one recipe: a dual encoder trained first on the recipe's data (the run's `tower`
    step), whose image tower starts the preset's (its train stage's `vision_init`)."""

    preset: str = DEFAULT_PRESET
    """The dual-encoder preset (its ViT must have the model preset's vision shape)."""
    steps: int | None = None
    """Training steps (default: the preset's)."""
    batch_size: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    preset: str | None = None
    """A preset (tiny, small, base, ...) to build and train; a recipe without a train stage uses it untrained."""
    path: str | None = field(default=None, metadata={FOLDER: True})
    """A local model folder (any family's architecture) to start from."""
    tower: TowerSpec | None = None
    """A preset's image tower trained first as a dual encoder (two-stage training), e.g. {preset: small}."""


@dataclass(frozen=True)
class DataSpec:
    source: str = DEFAULT_SOURCE
    """shapes, shapes:COUNT, an image folder with metadata.jsonl, a COCO captions .json or WebDataset .tar shards."""
    count: int | None = None
    """Images to generate or use for training (shapes default: the preset's)."""
    skip_bad: bool = False
    """Skip (and count) unreadable images instead of failing."""

    def __post_init__(self):
        if is_shapes(self.source):
            shapes_count(self.source)
        if self.count is not None and self.count < 1:
            raise VlmedgeError(f"data: count={self.count}; expected an integer >= 1")


@dataclass(frozen=True)
class Context:
    """What a stage may read besides its parent and its config. `out` and `artifact_id` are set per step."""

    data: DataSpec = DataSpec()
    eval: EvalConfig | None = None
    """None: the step is not evaluated (`--no-eval`)."""
    model: ModelSpec | None = None
    """The recipe's starting model (the train and source stages read it)."""
    teacher: Artifact | None = None
    """The distillation teacher."""
    console: Any = None
    progress: bool = False
    resume: bool | None = None
    """Training: True continues from a checkpoint (an error without one), False never does, None does when one
    exists (the pipeline: its step folders are keyed by config, so a checkpoint there is this step's)."""
    force: bool = False
    out: Path | None = None
    artifact_id: str = ""
    stage_kind: str = ""

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)

    def artifact(self, parent: Artifact | None, path: Path, info: dict[str, Any] | None = None,
                 trained_on: str | None = None) -> Artifact:
        """The record of what this step made at `path` (measured and saved by `execute`); `trained_on`: the data a
        training stage learned from (else the parent's data is the artifact's)."""
        spec = spec_for_kind(self.stage_kind)
        return Artifact(self.artifact_id, self.stage_kind, self.stage_kind, spec.produces, str(path),
                        parent=parent.id if parent else None, info=info or {},
                        data=trained_on or (parent.data if parent else None))


@dataclass(frozen=True)
class StageSpec:
    kind: str
    """The stage's key in a recipe (train, prune, ...)."""
    config: type
    run: Callable[[Artifact | None, Any, Context], Artifact]
    consumes: str | None
    """The artifact kind it reads: 'model', 'onnx' (an fp32 export), or None (it starts from nothing)."""
    produces: str
    """The artifact kind it writes: 'model' or 'onnx'."""
    provides: str | None
    """What later stages may consume from it ('model', 'onnx'), None if nothing (quantized graphs)."""
    reads: tuple[str, ...] = ()
    """Context fields that enter the step's id besides parent and config: data, model, teacher."""
    product: str = "model"
    """The product's subfolder in a run's step folder."""


_REGISTRY: Registry[StageSpec] = Registry(__name__, MODULES, "stage")


def register(config: type, *, kind: str, consumes: str | None, produces: str, provides: str | None,
             reads: tuple[str, ...] = ()):
    """Register a stage's `run` for its config type (one verb, one config type)."""

    def wrap(fn):
        _REGISTRY.add(kind, StageSpec(kind, config, fn, consumes, produces, provides, reads,
                                       "onnx" if produces == "onnx" else "model"))
        return fn

    return wrap


def spec_for_kind(kind: str) -> StageSpec:
    return _REGISTRY.get(kind, shown=recipe_kinds())


def spec_for(config: Any) -> StageSpec:
    """The stage registered for this config's type (one verb, one config type)."""
    return next(s for s in _REGISTRY.all().values() if type(config) is s.config)


def recipe_kinds() -> list[str]:
    """The stages a recipe's `stages:` list may name, in pipeline order."""
    return [k for k in _REGISTRY.all() if k != "source"]


# --- one step ------------------------------------------------------------------------------------------------------

def step_id(config: Any, parent: Artifact | None, ctx: Context) -> str:
    """The id of running `config` on `parent` in `ctx`: a hash of the parent's id and content, the stage's config,
    and what else it reads, every folder among them by content (never by where it lies, so a run folder moved or
    copied elsewhere is still cached, and a folder edited in place is new)."""
    spec = spec_for(config)
    key = {"stage": by_content(config), "eval": flat(ctx.eval) if ctx.eval is not None else None,
           "data": asdict(ctx.data) if "data" in spec.reads else None,
           "parent": parent.content if parent else None,
           "teacher": [ctx.teacher.id, ctx.teacher.content] if "teacher" in spec.reads and ctx.teacher else None}
    if "model" in spec.reads:
        key["model"] = by_content(ctx.model) if ctx.model else None
    return artifact_id(parent.id if parent else None, spec.kind, key)


def by_content(config: Any) -> dict[str, Any]:
    """A stage config as a dict, each field that names a folder (`metadata={FOLDER: True}`) replaced by the digest of
    the folder's files where it exists."""
    out = flat(config)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get(FOLDER) and value and Path(value).exists():
            out[f.name] = {"content": content_id(product_files(Path(value)))}
    return out


def execute(config: Any, parent: Artifact | None, ctx: Context, folder: Path, product: Path | None = None,
            name: str | None = None) -> Artifact:
    """Run one stage into `folder` (the record, eval.json) and `product` (what it makes; default: `folder`, as the
    single-stage commands do), or return the record already there for the same id.

    A folder that is its own product is claimed first (`disk.claim_output`): it must be new, empty or this stage's
    earlier output, and neither an input nor above one; a run's step folders sit in a run folder claimed whole."""
    spec = spec_for(config)
    aid = step_id(config, parent, ctx)
    name = name or spec.kind
    folder = Path(folder)
    product = Path(product) if product is not None else folder
    created = not folder.exists()
    if product == folder:
        data = ctx.data.source if ctx.data and Path(ctx.data.source).exists() else None
        claim_output(folder, spec.kind, (parent.path if parent else None, ctx.teacher.path if ctx.teacher else None,
                                         ctx.model.path if ctx.model else None, data))
    done = None if ctx.force else Artifact.load(folder)
    if done is not None and done.id == aid:
        changed = done.mismatches() or ([] if Path(done.path).exists() else [f"{done.path}: missing"])
        if not changed:
            ctx.say(f"[dim]{name}: cached ({folder})[/]")
            return done
        ctx.say(f"{name}: {_first(changed)}; making it again")
        if product != folder:
            shutil.rmtree(product, ignore_errors=True)  # a run's own step product, edited: not resumed from
    ctx.say(f"[bold]{name}[/] ({spec.kind}{' <- ' + parent.name if parent else ''}) -> {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    for partial in folder.glob(".*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        art = spec.run(parent, config, replace(ctx, out=product, artifact_id=aid, stage_kind=spec.kind))
    except BaseException:
        if created and folder.is_dir() and {p.name for p in folder.iterdir()} <= {OUTPUT_MARK}:
            shutil.rmtree(folder, ignore_errors=True)  # failed before writing anything: leave no empty folder behind
        raise
    if product == folder:
        write_json(folder / OUTPUT_MARK, {"command": spec.kind})  # the product replaced the folder: mark it again
    art = replace(art, name=name, config={"stage": flat(config)},
                  seconds={**art.seconds, "stage": round(time.perf_counter() - t0, 1)})
    if os.environ.get("RANK", "0") != "0":
        return art  # data-parallel training: rank 0 describes and records the step
    art = describe(art, folder, ctx, parent)
    art.save(folder)
    return art


def describe(art: Artifact, folder: Path, ctx: Context, parent: Artifact | None) -> Artifact:
    """The finished step's record: its family, size, parameters, FLOPs and files, and its evaluation (written to
    its eval.json)."""
    path = Path(art.path)
    family = families.of(path)  # resolved here, once: later stages read it from the record
    fields: dict[str, Any] = {"family": family.name, "seconds": dict(art.seconds)}
    if art.kind == "model":
        model = family.load(path)
        adapter = family.adapter(model) if ctx.eval is not None else None
        fields.update(parameters=family.parameters(model), flops=family.flops(model),
                      size_bytes=sum(folder_size(p) for p in path.glob("*.safetensors")))
    else:
        adapter = family.adapter(path) if ctx.eval is not None else None
        fields.update(parameters=read_manifest(path).get("parameters") or (parent.parameters if parent else None),
                      flops=parent.flops if parent else None, size_bytes=onnx_size(path))
    if adapter is not None:
        t0 = time.perf_counter()
        metrics = family.evaluate(adapter, ctx.eval, progress=ctx.progress)
        fields["seconds"]["eval"] = round(time.perf_counter() - t0, 1)
        families.write_eval(folder / "eval.json", ctx.eval, metrics)
        fields.update(metrics=flat_metrics(metrics), data=ctx.eval.data, measured=measured_on(metrics))
    return replace(art, **fields, versions=library_versions(), files=product_files(path))


def input_artifact(path: str | os.PathLike) -> Artifact:
    """What a single-stage command reads: a folder a vlmedge command or a run step made (its `artifact.json`, whose
    product may sit in a subfolder), or any model or export folder (a source artifact, its id from the files).

    A recorded folder must still hold what its record lists (a copy, edited or broken, is refused with the file
    named); the record is read where it lies, never followed to where it was first written."""
    folder = Path(path)
    if not folder.exists():
        raise VlmedgeError(f"not found: {folder}")
    made = Artifact.load(folder)
    if made is not None:
        changed = made.mismatches()
        if changed:
            raise VlmedgeError(f"{_first(changed)}: {folder} no longer holds what its {RECORD} records; make it "
                               f"again with the command that wrote it, or delete {folder / RECORD} to use the folder "
                               "as a new input")
        return made
    kind = "onnx" if (folder / "manifest.json").is_file() else "model"
    files = product_files(folder)
    return Artifact(content_id(files), folder.name, "source", kind, str(folder), files=files,
                    family=families.of(folder).name)


def _first(changed: list[str]) -> str:
    return changed[0] + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
