"""Recipes: the YAML schema, its validation and `--set` overrides.

A recipe says what model to start from, on what data, which stages to run in order (each with its typed config),
how to evaluate, which targets to benchmark on and which gates the result must pass. Every error names the recipe
file, the key path and, where known, the line; all of it is checked before any work starts.

    name: quickstart
    model: {preset: small}              # or {path: /models/my-clip}
    data: {source: shapes, count: 20000}
    eval: {zero_shot_images: 1080, retrieval_pairs: 1000}
    stages:
      - train: {steps: 600}
      - prune: {vision_heads: 0.5, vision_mlp: 0.5, text_heads: 0.5, text_mlp: 0.5}
      - distill: {steps: 300}
      - export: {}
      - quantize: {mode: dynamic}
    targets: [torch, cpu]
    measure: {warmup: 10, min_runs: 50}
    gates: ["cpu.pair.p90_ms <= 50", "retention.zero_shot.top1 >= 0.97"]
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import families
from .disk import read_yaml
from .errors import VlmedgeError
from .evaluate import EvalConfig
from .gate import parse_budget
from .models import load_preset, preset_names, tower_mismatch, tower_shapes
from .options import flat
from .runtime.measure import MeasureConfig
from .stages import DataSpec, ModelSpec, recipe_kinds, spec_for_kind
from .targets import TARGETS


@dataclass(frozen=True)
class Stage:
    kind: str
    name: str
    config: Any


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    data: DataSpec
    eval: EvalConfig
    """Its data defaults to data.source."""
    stages: tuple[Stage, ...]
    targets: tuple[tuple[str, dict], ...]
    measure: MeasureConfig
    gates: tuple[str, ...]
    output: str | None
    description: str = ""
    source_file: str = ""
    raw: dict = field(default_factory=dict, compare=False)


# --- typed construction with errors that name the key ----------------------------------------------------------------

class _Where:
    """Maps key paths to line numbers of the YAML source."""

    def __init__(self, file: str, text: str | None):
        self.file, self.lines = file, {}
        if text is not None:
            try:
                self._walk(yaml.compose(text), "")
            except yaml.YAMLError:
                pass

    def _walk(self, node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = f"{path}.{k.value}" if path else str(k.value)
                self.lines[p] = k.start_mark.line + 1
                self._walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = f"{path}.{i}"
                self.lines[p] = v.start_mark.line + 1
                self._walk(v, p)

    def error(self, path: str, message: str) -> VlmedgeError:
        probe = path
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = f":{self.lines[probe]}" if probe in self.lines else ""
        return VlmedgeError(f"{self.file}{line}: {path or '(top level)'}: {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value, tp, path: str, where: _Where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], path, where)
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise where.error(path, f"expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], f"{path}.{i}", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise where.error(path, f"expected a mapping like {{decoder: int4}}, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{path}.{k}", where) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.error(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(path, f"expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise where.error(path, f"expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, where)
    return value


def build(cls, data: Any, path: str, where: _Where, family: families.Family | None = None):
    """A dataclass from a mapping: unknown keys, wrong types and invalid values are errors naming the key. A shared
    config with a `SECTION` also takes `family`'s own settings for it as keys (`families.split_options`)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise where.error(path, f"expected a mapping of {cls.__name__} settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    key_path = lambda k: f"{path}.{k}" if path else k  # noqa: E731
    try:  # unknown keys too: the same check for every config
        data, own_cls, own = families.split_options(cls, data, family)
    except families.OptionKeyError as e:
        raise where.error(key_path(e.key), e.reason) from None
    extra = {"options": build(own_cls, own, path, where)} if own_cls is not None else {}
    kwargs = {k: _coerce(v, hints[k], key_path(k), where) for k, v in data.items()}
    try:
        return cls(**kwargs, **extra)
    except (VlmedgeError, ValueError) as e:  # a config's own validation (`__post_init__`)
        raise where.error(path, str(e)) from None


# --- loading -------------------------------------------------------------------------------------------------------

TOP_LEVEL = ("name", "description", "model", "data", "eval", "stages", "targets", "measure", "gates", "output")


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        shipped = recipes_dir() / f"{path.name if path.suffix else path.name + '.yaml'}"
        if shipped.is_file():
            path = shipped
        else:
            raise VlmedgeError(f"recipe not found: {path} (shipped recipes: {', '.join(shipped_recipes())})")

    text = path.read_text(errors="replace")
    data = read_yaml(path, text)  # bounded: no aliases, so the line map below walks the file as written
    where = _Where(str(path), text)
    for item in overrides:
        data = apply_override(data, item, where)
    return parse_recipe(data, where, str(path))


def apply_override(data: dict, item: str, where: _Where) -> dict:
    """`key.path=value` (value parsed as YAML). List entries (stages) are addressed by index, kind or name, and a
    stage's config is entered implicitly: `stages.quantize.mode=static`."""
    if "=" not in item:
        raise VlmedgeError(f"--set {item!r}: expected KEY.PATH=VALUE")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise VlmedgeError(f"--set {key}: cannot parse value {raw!r}") from None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _stage_index(node, part)
            if idx is None:
                raise VlmedgeError(f"--set {key}: no list entry {part!r}")
            if last:
                node[idx] = value
                break
            if isinstance(node[idx], str):
                node[idx] = {node[idx]: {}}
            node = node[idx]
            if isinstance(node, dict) and len(node) == 1 and parts[i + 1] not in node:
                kind = next(iter(node))
                if node[kind] is None:
                    node[kind] = {}
                node = node[kind]
            continue
        if not isinstance(node, dict):
            raise VlmedgeError(f"--set {key}: {'.'.join(parts[:i]) or 'the recipe'} is not a mapping")
        if last:
            node[part] = value
            break
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
    return data


def _stage_index(items: list, part: str) -> int | None:
    if part.isdigit():
        return int(part) if int(part) < len(items) else None
    for i, item in enumerate(items):
        if item == part:
            return i
        if isinstance(item, dict) and (part in item or (isinstance(next(iter(item.values()), None), dict)
                                                        and next(iter(item.values())).get("name") == part)):
            return i
    return None


def parse_recipe(data: Any, where: _Where, source_file: str = "") -> Recipe:
    if not isinstance(data, dict):
        raise where.error("", "a recipe is a mapping with keys: " + ", ".join(TOP_LEVEL))
    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise where.error(unknown[0], f"unknown key; expected one of: {', '.join(TOP_LEVEL)}")
    if "model" not in data:
        raise where.error("model", "required: {preset: NAME} or {path: FOLDER}")
    if "stages" not in data or not data["stages"]:
        raise where.error("stages", "required: a list of stages (train, prune, distill, export, quantize)")
    model = build(ModelSpec, data["model"], "model", where)
    if (model.preset is None) == (model.path is None):
        raise where.error("model", "give exactly one of preset or path")
    if model.tower is not None and model.preset is None:
        raise where.error("model.tower", "a tower starts a preset's image encoder; a model folder (path) has one")
    if model.preset:
        if model.preset not in preset_names() and not model.preset.endswith(".json"):
            raise where.error("model.preset", f"unknown preset {model.preset!r}; expected one of "
                                              f"{', '.join(preset_names())}")

    family = _family(model, where)
    data_spec = build(DataSpec, data.get("data"), "data", where)
    raw_eval = data.get("eval") or {}
    if isinstance(raw_eval, dict) and raw_eval.get("data") is None:
        raw_eval = dict(raw_eval)
        raw_eval["data"] = data_spec.source  # evaluate on the run's data unless told otherwise
    eval_spec = build(EvalConfig, raw_eval, "eval", where, family)
    stages = _parse_stages(data["stages"], model, where, family)
    _check_against_model(stages, model, where, family)
    if model.tower is not None and (stages[0].kind != "train" or stages[0].config.vision_init):
        raise where.error("model.tower", "needs a first train stage without vision_init (the tower becomes it)")
    targets = []
    raw_targets = data.get("targets", ["torch", "cpu"])
    if not isinstance(raw_targets, list):
        raise where.error("targets", "expected a list of target names or {name: options}")
    for i, t in enumerate(raw_targets):
        name, options = (t, {}) if isinstance(t, str) else (next(iter(t)), next(iter(t.values())) or {}) \
            if isinstance(t, dict) and len(t) == 1 else (None, None)
        if name is None or not isinstance(options, dict):
            raise where.error(f"targets.{i}", f"expected a target name or {{name: {{options}}}}, got {t!r}")
        if name not in TARGETS:
            raise where.error(f"targets.{i}", f"unknown target {name!r}; available: {', '.join(TARGETS)}")
        targets.append((name, options))
    measure = build(MeasureConfig, data.get("measure"), "measure", where, family)
    gates = data.get("gates") or []
    if not isinstance(gates, list) or not all(isinstance(g, str) for g in gates):
        raise where.error("gates", "expected a list of budget expressions like 'cpu.pair.p90_ms <= 50'")
    for i, g in enumerate(gates):
        try:
            parse_budget(g)
        except VlmedgeError as e:
            raise where.error(f"gates.{i}", str(e)) from None
    name = str(data.get("name") or Path(source_file).stem or "recipe")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or ".." in name:
        raise where.error("name", f"{name!r}: a run name is letters, digits, '.', '_' and '-' (it names the run "
                                  "folder runs/NAME: no separators, no '..')")
    output = data.get("output")
    if output is not None and (not isinstance(output, str) or Path(output).is_absolute()
                               or ".." in Path(output).parts):
        raise where.error("output", f"{output!r}: a relative folder inside the working directory (no '..'); "
                                    "pass --out for anywhere else")
    return Recipe(name, model, data_spec, eval_spec, tuple(stages), tuple(targets), measure, tuple(gates),
                  output, str(data.get("description", "")), source_file, data)


def _parse_stages(items: Any, model: ModelSpec, where: _Where, family: families.Family | None) -> list[Stage]:
    kinds = recipe_kinds()
    if not isinstance(items, list):
        raise where.error("stages", "expected a list like [{train: {...}}, {export: {}}]")
    have = {"model"}  # a model path, or a preset (trained by a train stage, else used untrained)
    stages, names = [], set()
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise where.error(f"stages.{i}", f"expected one stage as {{kind: {{config}}}}, got {item!r}")
        kind, cfg = next(iter(item.items()))
        if kind not in kinds:
            raise where.error(f"stages.{i}", f"unknown stage {kind!r}; expected one of: {', '.join(kinds)}")
        spec = spec_for_kind(kind)
        cfg = dict(cfg or {})
        name = str(cfg.pop("name", "")) or kind
        if kind == "quantize" and name == kind:
            name = f"quantize-{cfg.get('mode', 'dynamic')}"
        base, n = name, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.add(name)
        if kind == "train" and stages:
            raise where.error(f"stages.{i}", "train must be the first stage (it makes the teacher)")
        if spec.consumes == "onnx" and "onnx" not in have:
            raise where.error(f"stages.{i}", f"{kind} needs an fp32 ONNX export from an earlier stage; "
                                             "add an export stage before it")
        if spec.provides:
            have.add(spec.provides)
        stages.append(Stage(kind, name, build(spec.config, cfg, f"stages.{i}.{kind}", where, family)))
    return stages


def _family(model: ModelSpec, where: _Where) -> families.Family | None:
    """The family of the recipe's model (its folder's, else its preset's); None where the model cannot say: a folder
    not on this machine (a recipe checked elsewhere) or one its own loader will refuse, naming what is wrong, when
    the run starts."""
    if model.path and not Path(model.path).exists():
        return None
    try:
        return families.of(model.path) if model.path else families.for_preset(load_preset(model.preset))
    except VlmedgeError:
        return None


def _check_against_model(stages: list[Stage], model: ModelSpec, where: _Where,
                         family: families.Family | None) -> None:
    """Stage settings the model's family or shape makes impossible (another family's keys or graphs, a head ratio
    leaving no key/value head, an INT4 block size that does not divide a width, a tower that is not a dual
    encoder), refused at load with the recipe's line, before any work."""
    if model.tower is not None:
        try:
            tower = families.for_preset(load_preset(model.tower.preset))
        except VlmedgeError as e:
            raise where.error("model.tower.preset", str(e)) from None
        if tower.name != families.DEFAULT:
            raise where.error("model.tower.preset", f"{model.tower.preset!r} is a {tower.name} preset; a tower is "
                                                    f"trained as a {families.DEFAULT} (tiny, small, ...)")
        differs = tower_mismatch(load_preset(model.tower.preset).get("vision", {}),
                                 load_preset(model.preset).get("vision", {}))
        if differs:
            raise where.error("model.tower.preset", f"tower {model.tower.preset!r}: {differs} ({model.preset!r}); a "
                                                    "tower starts the preset's image encoder and must have its shape")
    if family is None:
        return
    shapes = tower_shapes(model.preset, model.path)
    for i, stage in enumerate(stages):
        check = getattr(stage.config, "check_model", None)
        if check is not None:
            try:
                check(shapes, family)
            except VlmedgeError as e:
                raise where.error(f"stages.{i}.{stage.kind}", str(e)) from None


def recipes_dir() -> Path:
    """The shipped recipes: package data (the repository's recipes/ is a link to it), so a wheel has them too."""
    return Path(__file__).resolve().parent / "recipes"


def shipped_recipes() -> list[str]:
    return sorted(p.name for p in recipes_dir().glob("*.yaml"))


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe: what it is for."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# ").strip():
            return line.strip("# ").strip()
    return ""


def to_dict(recipe: Recipe) -> dict[str, Any]:
    """The fully resolved recipe (every default filled in), as saved with a run."""
    return {"name": recipe.name, "description": recipe.description, "model": dataclasses.asdict(recipe.model),
            "data": dataclasses.asdict(recipe.data), "eval": flat(recipe.eval),
            "stages": [{s.kind: {"name": s.name, **flat(s.config)}} for s in recipe.stages],
            "targets": [{n: o} for n, o in recipe.targets], "measure": flat(recipe.measure),
            "gates": list(recipe.gates), "output": recipe.output}
