"""Model families: what the stages, the evaluator and the targets ask of a kind of model.

A family is one package (`families/<name>/`) that registers one `Family`: its `__init__` holds the `Family`
subclass, beside it the family's model code (`model.py`), its data adapters (`data.py`, where the shared datasets
of `vlmedge.data` do not serve) and its tasks (`tasks.py`: the evaluation). Stages never branch on a family's name: they ask the family of
their input (`of(path)`) to load it, count it, show its prunable structure, give its training loss and calibration
inputs, declare the graphs it exports, open an exported artifact for evaluation and timing, and evaluate it. A model
folder says its family through `config.json` (`architectures`), an export folder through `manifest.json`
(`family`), a preset through its `family` key (default `dual_encoder`).

Adding a family: write the package `families/<name>/` with a `Family` subclass in its `__init__`, `register(...)` an
instance at the end of it, add its name to `MODULES`, and ship its presets as JSON (`models/presets/`, with
`"family"`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

from .._registry import Registry
from ..data import open_dataset
from ..disk import read_json, write_json
from ..errors import VlmedgeError
from ..models import check_model_folder, count_parameters, train_tokenizer
from ..models.structure import apply_plan, shape_of
from ..options import Options, flat, shared_fields
from ..runtime.measure import time_each
from .onnx_export import patchify_as_matmul

MODULES = ("dual_encoder", "generative", "matching")
DEFAULT = "dual_encoder"


@dataclass
class Graph:
    """One ONNX graph a family exports: the module to trace, its inputs and outputs and their dynamic axes."""

    name: str
    """The graph's name in the manifest (`files`, `inputs`, `threads`): image, text, ..."""
    file: str
    module: Any
    """A torch module whose forward takes the inputs in `input_names` order."""
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    declared: dict[str, list[Any]] = field(default_factory=dict)
    """Each input's shape as recorded in the manifest, named axes ('batch', 'sequence') for dynamic ones."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Inputs the graph holds a value for (numpy arrays): written as initializers that are also graph inputs, so a
    runtime that knows one may feed it and one that does not (transformers.js) sees no extra required input."""
    write: Callable[[Path, int], int] | None = None
    """Writes the graph to a path at an opset itself, as ONNX Runtime's fused operators, its weights in the side file
    (`onnx_export.SideFile`), and returns the bytes of weights; the export uses it instead of tracing `module`
    (which still gives the reference outputs) unless told not to fuse (`fuse_attention: false`)."""


@dataclass
class TrainBatch:
    """One micro-batch of the training loop: this rank's rows `local` of the global batch (`indices`, with the
    captions drawn for them), and `rows`, every rank's rows of the same micro-batch (what a contrastive loss
    contrasts against, through `gather`)."""

    data: Any
    indices: list[int]
    captions: list[str]
    specs: list[Any]
    local: slice
    rows: list[int]
    gather: Callable[[Any], Any]
    device: str
    autocast: Callable[[], Any]
    """A context manager for the forward pass (mixed precision on CUDA, a no-op in fp32)."""
    negatives: tuple[list, list] | None = None
    """(texts, specs) per row of `indices`: a false caption one edit from a true one, or None where a row has none
    (text-side hard negatives, NegCLIP)."""


class _Capability:
    name: str = ""

    def _lacks(self, what: str):
        return VlmedgeError(f"the {self.name} family cannot {what}")


class Model(_Capability):
    """Building, loading, counting and pruning a model (train, source, prune, distill, and every record). `load` and
    `build` are what a family must have; the rest have defaults."""

    architectures: tuple[str, ...] = ()
    """Hugging Face `architectures` (config.json) of the folders this family loads."""
    prunable_parts: tuple[str, ...] = ()
    """The prune ratios (`{tower}_{kind}`) its models take: what a recipe's prune stage is checked against at load
    (`prunable`, on the loaded model, is the same parts)."""

    def build(self, spec: dict[str, Any], tokenizer, *, seed: int = 0, source: str = "",
              vision_init: str | None = None):
        """A freshly initialised model of a preset's shape (`vision_init`: a model folder whose image tower starts
        this model's, for the families that take one)."""
        raise self._lacks("build a model from a preset")

    def tokenizer(self, spec: dict[str, Any], ds, rng):
        """A tokenizer learnt from the training data `ds` (what a preset trained from scratch uses): by default a
        WordPiece vocabulary of its captions."""
        sample = rng.integers(len(ds), size=min(len(ds) * 3, 30000))
        return train_tokenizer(ds.captions(sample, rng), spec["vocab_size"])

    def open_data(self, source: str, split: str, **options):
        """The dataset the training loop draws from (`data.open_dataset`'s options): by default the captioned
        datasets."""
        return open_dataset(source, split, **options)

    def load(self, path: str | Path, *, attn_implementation: str = "sdpa"):
        """A model folder, loaded offline (safetensors only)."""
        raise self._lacks(f"load {path}")

    def check_folder(self, path: str | Path) -> dict[str, Any]:
        """Validate a model folder of this family's architectures without building it; its config."""
        return check_model_folder(path, self.architectures)

    def parameters(self, model) -> int:
        return count_parameters(model.model)

    def flops(self, model) -> dict[str, int]:
        """FLOPs of one sample per part (batch 1); {} where they are not counted."""
        return {}

    def prunable(self, model) -> dict[str, list]:
        """Per part, its transformer layers as `models.structure.LayerParts` (heads, MLP neurons); {}: nothing."""
        return {}

    def apply_plan(self, model, plan: dict[str, Any]) -> None:
        """Cut the model to the kept layers, heads and neurons (the surgery of `models.structure`), and record the
        pruned shape of the towers in the plan in config.json so the folder reloads."""
        apply_plan(model.model, plan)
        model.model.config.vlmedge_pruning = shape_of(model.model, tuple(plan))


class Training(_Capability):
    """The loss of the one training loop (train, distill) and what pruning's Taylor importance draws."""

    def training_loss(self, model, batch: TrainBatch, teacher=None, weights=None):
        """The loss of one micro-batch (the one training loop calls it): the family's own objective, or with a
        frozen `teacher` the distillation objective weighted by `weights`."""
        raise self._lacks("be trained")

    def before_step(self, model, step: int, cfg) -> None:
        """Before each optimizer step (e.g. a tower frozen for the first steps of a two-stage schedule)."""

    def after_step(self, model) -> None:
        """After each optimizer step (e.g. clamping a learnable temperature)."""

    def calibration_data(self, model, data: str, count: int, seed: int) -> Callable[[int, Any], TrainBatch]:
        """A batch drawer `(batch_size, rng) -> TrainBatch` over the data (random training batches, one process,
        CPU, fp32): Taylor importance takes the gradient of `training_loss` on such batches."""
        ds = self.open_data(data, "train", resolution=model.preprocess.image_size, count=count, seed=seed)

        def draw(batch_size: int, rng) -> TrainBatch:
            idx = rng.integers(len(ds), size=batch_size).tolist()
            texts, specs = ds.training_captions(idx, rng)
            return TrainBatch(ds, idx, texts, specs, slice(0, batch_size), list(range(batch_size)),
                              gather=lambda x: x, device="cpu", autocast=contextlib.nullcontext)

        return draw


class Exporting(_Capability):
    """The graphs the export stage traces, checks and describes. `graphs` and `parity_inputs` are what a family
    must have to be exported."""

    graph_towers: dict[str, str] = {}
    """Which tower (vision, text) each exported graph computes: what a recipe checks stage settings against."""
    layouts: dict[str, dict[str, str]] = {}
    """The export layouts it writes, each graph's file per layout; the first is the default. `onnx-community`: a
    model folder transformers.js loads as written (graphs in onnx/, config.json and the processor's configs beside
    them; quantized graphs carry their dtype suffix, so precisions share the folder)."""
    int4_graphs: tuple[str, ...] = ()
    """The graphs quantize's `mixed` mode tries as INT4 unless told (`QuantizeConfig.int4_graphs`)."""

    def graphs(self, model) -> list[Graph]:
        raise self._lacks("be exported")

    def tracing(self, model):
        """A context manager around the export (graph-form rewrites): by default each ViT-style patch-embedding Conv
        traced as patchify + MatMul."""
        return patchify_as_matmul(model.model, model.preprocess.image_size)

    def parity_inputs(self, model, n: int, seed: int) -> dict[str, dict[str, Any]]:
        """Fresh random feeds per graph for the parity check (numpy)."""
        raise self._lacks("check an export's parity")

    def manifest_fields(self, model, reference: dict[str, Any], folder: Path) -> dict[str, Any]:
        """What the family records in an export's manifest besides files, inputs and parity (and the support files
        it writes into `folder`: tokenizer, ...)."""
        return {}

    def model_files(self, model, folder: Path, layout: str) -> list[str]:
        """The files besides the graphs and the tokenizer that `layout` needs (an onnx-community folder's
        config.json and processor configs), written into `folder`; their names."""
        return []

    def export_extras(self, folder: Path, adapter, labels: Sequence[str] = (), eval_cfg=None) -> dict[str, Any]:
        """Precomputed data an export carries for a device (e.g. zero-shot label embeddings: of `labels` given, else
        of the classes `eval_cfg`'s evaluation scores), computed with the export's `adapter`; manifest additions."""
        return {}

    def export_references(self, model, questions, progress: bool = False) -> Any:
        """The PyTorch side of `verify_export`, computed before export frees the model (its ONNX Runtime sessions
        open after, so the two are never held together): e.g. PyTorch's greedy answers to `questions` held-out
        questions (a count or a `_progress.Budget` of time; `progress` where that takes long)."""
        return None

    def verify_export(self, reference, adapter, progress: bool = False) -> dict[str, Any]:
        """Checks of the exported files beyond per-graph parity, run by export on the open `adapter` against
        `export_references` (e.g. greedy answers token-identical to PyTorch's); raises a VlmedgeError on failure;
        manifest additions."""
        return {}


class Tasks(_Capability):
    """What evaluation, export checks and quantization ask: the artifact as an object that answers, its tasks and
    real inputs. `adapter` is what a family must have to be evaluated or timed."""

    report_metrics: tuple[str, ...] = ()
    """The run report's accuracy columns (flat metric names): the first is the Pareto plot's accuracy axis and the
    retention column's metric, the first two fit a terminal."""

    def adapter(self, path: str | Path, **options):
        """The artifact (model folder or export folder) as the object evaluation and timing use; for an export folder
        it has `folder` and `sessions` (graph name -> ONNX Runtime session), which export parity and quantization
        run."""
        raise self._lacks(f"open {path}")

    def sanity_check(self, adapter) -> None:
        """Raise a VlmedgeError naming the likely cause when distinct real inputs all give one output (a collapsed
        tower evaluates at chance without a word); export and evaluation call it."""

    def evaluate(self, adapter, eval_cfg, progress: bool = False) -> dict[str, Any]:
        """Every task that applies, as nested metrics; `flat_metrics` names them for gates; {}: no task.
        `progress`: report the long parts (`vlmedge._progress`)."""
        return {}

    def calibration_feeds(self, adapter, data: str, batches: int, batch_size: int, seed: int
                          ) -> dict[str, list[dict[str, Any]]]:
        """Real preprocessed feeds per graph of an export folder, for static quantization and drift."""
        raise self._lacks("calibrate a static quantization")

    def agreement_reference(self, reference, inputs, progress: bool = False) -> Any:
        """What `output_agreement` compares a quantized export with: `reference`'s (the fp32 export's) end results
        on `inputs` held-out inputs (a count or a `_progress.Budget`; 0: none); None where the cosines say it all.
        Taken first, so that the reference can be closed before the quantized export opens."""
        return None

    def output_agreement(self, expected, adapter, progress: bool = False) -> dict[str, Any]:
        """What quantization records beyond output cosines: how often `adapter` (a quantized export) gives the end
        results `expected` holds (`agreement_reference`; a generative model: identical greedy answers); {} where
        there is nothing to compare."""
        return {}


class Scenarios(_Capability):
    """Latency: the family's scenarios, named callables on the PyTorch model and on an export; the runtime times
    them (`runtime.measure.time_each`) and assembles the record."""

    headline_scenario: str = ""
    """The latency scenario the report's latency columns and the Pareto plot show."""
    report_latency: tuple[str, ...] = ()
    """Further scenarios whose p50 the full report table shows (a generative model's ttft and decode per token)."""
    latency_record: dict[str, Any] = {}
    """Settings of the scenarios a latency record states (a generative answer's token count, ...)."""
    scenarios_help: str = ""
    """The scenarios in words, from the family's own constants (`vlmedge bench --help` lists every family's)."""

    def latency_inputs(self, adapter, batch: int) -> tuple[Any, ...]:
        """Deployment-like inputs for the latency scenarios (the `cpu` and `torch` targets)."""
        raise self._lacks("be timed")

    def torch_scenarios(self, model, inputs, device: str, dtype) -> dict[str, Callable]:
        """The latency scenarios on the PyTorch model (the `torch` target), as `time_scenarios` takes them."""
        raise self._lacks("be timed in PyTorch")

    def time_scenarios(self, scenarios: dict[str, Callable], cfg, record: dict[str, Any], timer=None, sync=None
                       ) -> dict[str, Any]:
        """The latency record: each scenario timed with the shared method, after `record` and `latency_record`."""
        return time_each(scenarios, cfg, {**record, **self.latency_record}, timer=timer, sync=sync)

    def onnx_latency(self, folder: Path, cfg, providers: list[str]) -> dict[str, Any]:
        """The same scenarios on an export folder in ONNX Runtime (the `cpu` and `cuda` targets)."""
        raise self._lacks("be timed in ONNX Runtime")


class Family(Model, Training, Exporting, Tasks, Scenarios):
    """A kind of model: the capabilities the stages, the evaluator and the targets ask of it. Each method says which
    stage asks for it; a family overrides what it has (what it lacks is a one-line error naming the family)."""

    options: dict[str, type[Options]] = {}
    """Its own settings per recipe section (`eval`, `prune`, `distill`, `measure`: a frozen `Options` dataclass),
    carried in that section's config as `options` and given by users as keys of the section (`vlmedge.options`)."""


_REGISTRY: Registry[Family] = Registry(__name__, MODULES, "model family")


def register(family: Family) -> Family:
    return _REGISTRY.add(family.name, family)


def every() -> dict[str, Family]:
    """Every registered family by name."""
    return _REGISTRY.all()


def get(name: str) -> Family:
    return _REGISTRY.get(name)


def for_config(config: dict[str, Any], where: str) -> Family:
    """The family that loads a model folder with this `config.json`."""
    archs = config.get("architectures") or []
    for family in _REGISTRY.all().values():
        if any(a in family.architectures for a in archs):
            return family
    supported = [a for f in _REGISTRY.all().values() for a in f.architectures]
    raise VlmedgeError(f"{where}: unsupported architecture {archs or config.get('model_type')!r}; "
                       f"vlmedge loads {' or '.join(supported)}")


def for_preset(spec: dict[str, Any]) -> Family:
    return get(spec.get("family", DEFAULT))


def of(path: str | Path) -> Family:
    """The family of an artifact: an export folder (manifest.json) or a model folder (config.json)."""
    folder = Path(path)
    if (folder / "manifest.json").is_file():
        record = read_json(folder / "manifest.json", "")
        return get((record if isinstance(record, dict) else {}).get("family", DEFAULT))
    onnx = folder.is_dir() and any(p for d in (folder, folder / "onnx") for p in d.glob("*.onnx"))
    if onnx and not any(folder.glob("*.safetensors")):  # an export folder (flat or onnx-community) lacking its manifest
        raise VlmedgeError(f"{folder}: ONNX files but no manifest.json; not a vlmedge export folder (make one with "
                           "vlmedge export; a single graph: vlmedge bench FILE.onnx)")
    if (folder / "config.json").is_file():
        record = read_json(folder / "config.json", "")
        return for_config(record if isinstance(record, dict) else {}, str(folder / "config.json"))
    return get(DEFAULT)  # its loader says what is wrong with the folder (missing, no config.json, ...)


def of_artifact(art) -> Family:
    """The family of a stage's record (`Artifact.family`, resolved when it was made); a record without one (vlmedge
    < 0.3) is read from its product's files."""
    return get(art.family) if art.family else of(art.path)


def options_of(section: str) -> dict[str, type[Options]]:
    """Every registered family's own settings for one recipe section: family name -> its `Options` class."""
    return {name: f.options[section] for name, f in _REGISTRY.all().items() if section in f.options}


class OptionKeyError(VlmedgeError):
    """A key of a recipe section (or a flag) that neither the shared config nor the model's family takes."""

    def __init__(self, section: str, key: str, reason: str):
        super().__init__(f"{section}: {key}: {reason}")
        self.key, self.reason = key, reason


def split_options(cls, values: dict[str, Any], family: Family | None, lenient: bool = False
                  ) -> tuple[dict[str, Any], type[Options] | None, dict[str, Any]]:
    """A section's keys (`values`, as a recipe or the flags give them) split for `cls` (a shared config with a
    `SECTION`): (its own keys, the `Options` class `family` declares for the section or None, that class's keys). A
    key that neither takes raises `OptionKeyError`, naming the family it belongs to where it is another's; `lenient`
    drops it instead (a record an older vlmedge wrote, whose shared configs held every family's keys). Without a
    `family` (a recipe's model folder not on this machine) the keys choose: the one family whose settings hold them
    all."""
    section = getattr(cls, "SECTION", None)
    shared = shared_fields(cls)
    if family is not None or not section:
        own_cls = family.options.get(section) if family is not None and section else None
    else:
        rest = {k for k in values if k not in shared}
        own_cls = next((c for c in options_of(section).values() if rest and rest <= {f.name for f in fields(c)}),
                       None)
    own = {f.name for f in fields(own_cls)} if own_cls else set()
    for key in values:
        if key in shared or key in own or lenient:
            continue
        others = [name for name, c in options_of(section).items() if key in {f.name for f in fields(c)}] \
            if section else []
        if others:
            this = f"this model is a {family.name} model" if family is not None else "this model's family is unknown"
            raise OptionKeyError(section, key, f"a setting of {' and '.join(others)} models; {this}")
        takes = shared + sorted(own)
        raise OptionKeyError(section or cls.__name__, key, f"unknown key; expected one of: {', '.join(takes)}")
    return ({k: v for k, v in values.items() if k in shared}, own_cls,
            {k: v for k, v in values.items() if k in own})


def configure(cls, values: dict[str, Any], family: Family | None, lenient: bool = False):
    """`cls` (a shared config) from a section's keys, the family's among them (`split_options`); its own defaults
    for the family's settings not given."""
    shared, own_cls, own = split_options(cls, values, family, lenient)
    try:
        return cls(**shared, **({"options": own_cls(**own)} if own_cls is not None else {}))
    except ValueError as e:  # the board-safe MeasureConfig validates with ValueError
        raise VlmedgeError(str(e)) from None


def write_eval(path: Path, cfg, metrics: dict[str, Any]) -> None:
    """An evaluation record (a step's `eval.json`): the data, the evaluation settings (the family's as keys beside
    the shared ones) and every metric."""
    write_json(path, {"data": cfg.data, "config": flat(cfg), "metrics": metrics})
