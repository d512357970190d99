"""`vlmedge ...`: thin commands over the library. Heavy libraries are imported inside the handlers.

Every handler is a plain function of the parsed arguments; `main(argv)` is callable from tests.
A `VlmedgeError` becomes a one-line `error: ...` and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable, Sequence

from . import __version__, families
from .artifact import RECORD
from .bench import bench_paths, print_bench, print_profile, profile_export
from .data import DEFAULT_SOURCE
from .disk import write_json, write_text
from .errors import VlmedgeError
from .evaluate import EvalConfig, measured_on
from .gate import __doc__ as gate_doc
from .gate import check, junit, load_budgets, load_report, markdown, parse_budget, regression
from .models import DEFAULT_PRESET, preset_names
from .pipeline import run
from .preprocess import SPLITTING
from .recipe import __doc__ as recipe_doc
from .recipe import load_recipe, recipe_summary, recipes_dir, shipped_recipes
from .report import print_table
from .runtime.onnx import read_manifest
from .stages import Context, DataSpec, ModelSpec, execute, input_artifact
from .stages.export import ExportConfig
from .stages.prune import IMPORTANCE, PruneConfig
from .stages.quantize import CALIBRATION, MODES, OPTIMIZE, WEIGHT_SCHEMES, QuantizeConfig
from .targets import TARGETS
from .train import PRECISIONS, PRESET_DEFAULT, DistillStage, TrainConfig, TrainStage

EPILOG = """\
The pipeline, one command per stage (each writes a folder the next one reads):
  vlmedge train --preset small --data shapes --out runs/teacher
  vlmedge eval runs/teacher --data shapes
  vlmedge prune runs/teacher --out runs/pruned --heads 0.5 --mlp 0.5
  vlmedge distill runs/pruned --teacher runs/teacher --out runs/student
  vlmedge export runs/student --out runs/onnx
  vlmedge quantize runs/onnx --out runs/int8 --mode dynamic
or all of it from a recipe:
  vlmedge compress recipes/quickstart.yaml --out runs/quickstart
"""


def _print_json(data) -> None:
    print(json.dumps(data, indent=2))


def _metrics_table(metrics: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for group, values in metrics.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if isinstance(v, float):
                table.add_row(f"{group}.{k}", f"{v:.4f}")
    Console().print(table)


# --- handlers ------------------------------------------------------------------------------------------------------

def _config(cls, args, rename: dict[str, str] | None = None, family: families.Family | None = None, **fixed):
    """A stage config from the flags `_add_config_flags` made for it (same names, same defaults), with the settings
    of `family` (the input's) among them; a family's flag given for a model of another family is a one-line
    error."""
    import dataclasses
    import typing

    rename = rename or {}
    values = {}
    for c in (cls, *_family_options(cls)):
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            dest = rename.get(f.name, f.name)
            if f.name in fixed or f.name == "options" or not hasattr(args, dest):
                continue  # a family's flag not given is absent (argparse.SUPPRESS)
            value = getattr(args, dest)
            if value is None and f.default is not None:
                continue  # a repeatable flag not given: the dataclass's default
            if isinstance(value, list) and _is_mapping(hints[f.name]):
                value = _pairs(value, "--" + dest.replace("_", "-"))
            values[f.name] = tuple(value) if isinstance(value, list) else value
    try:
        return families.configure(cls, {**values, **fixed}, family)
    except families.OptionKeyError as e:
        raise VlmedgeError(f"--{rename.get(e.key, e.key).replace('_', '-')}: {e.reason}") from None


def _family_options(cls) -> list[type]:
    """Every family's own settings for `cls`'s section (each adds its flags)."""
    return list(families.options_of(cls.SECTION).values()) if hasattr(cls, "SECTION") else []


def _is_mapping(tp) -> bool:
    """A config field typed `dict[...]` (or `dict[...] | None`): its flag is a repeatable NAME=VALUE."""
    import typing

    return any(typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp)))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """NAME=VALUE flag values as a mapping; a one-line error for one without '='."""
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise VlmedgeError(f"{flag} {item!r}: expected NAME=VALUE, e.g. {flag} decoder=int4")
        out[name] = value
    return out


def _execute(config, args, parent: str | None, *, teacher: str | None = None, model=None, data=None,
             evaluate: bool = True, resume: bool | None = False):
    """Run one stage into --out through the same function the recipe pipeline calls; a rerun with the same input
    and settings finds the recorded artifact and skips. Without --data the data is the input's (what vlmedge
    trained or evaluated it on, as its record says); an input without any is not evaluated (the built-in shapes
    say nothing about a user's model) and is calibrated on shapes."""
    from pathlib import Path

    from rich.console import Console

    source = input_artifact(parent) if parent else None
    known = getattr(args, "data", None) or (source.data if source else None)
    data = data or DataSpec(source=known or DataSpec().source, count=getattr(args, "data_count", None))
    evaluate = evaluate and not getattr(args, "no_eval", False)
    if evaluate and known is None:
        evaluate = False
        print(f"eval: skipped: vlmedge has not trained or evaluated {parent} on any data and no --data was given "
              "(the built-in shapes would say nothing about it); --data DATA evaluates it on yours")
    family = families.of_artifact(source) if source else None
    eval_cfg = families.configure(EvalConfig, {"data": data.source}, family) if evaluate else None
    ctx = Context(data=data, eval=eval_cfg,
                  model=model, teacher=input_artifact(teacher) if teacher else None, progress=not args.quiet,
                  console=None if args.quiet else Console(), resume=resume)
    return execute(config, source, ctx, Path(args.out))


def cmd_train(args) -> int:
    model = ModelSpec(path=args.init) if args.init else ModelSpec(preset=args.preset)
    data = DataSpec(source=args.data, count=args.data_count, skip_bad=args.skip_bad)
    # no evaluation here (as before): `vlmedge eval OUT`, printed below
    art = _execute(_config(TrainStage, args), args, None, model=model, data=data, evaluate=False,
                   resume=args.resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    s = art.info
    if s.get("steps"):
        print(f"trained {s['steps']} steps in {s['seconds']} s ({s['samples_per_s']} samples/s), "
              f"loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}; model in {args.out}")
    print(f"next: vlmedge eval {args.out} --data {args.data}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    # a run's step folder reads as its model or onnx folder; a recorded folder must still hold what its record lists,
    # and its family is the one its files say, as for bench and quantize
    made = input_artifact(args.path)
    product = made.path
    data = args.data or made.data
    if data is None:
        data = EvalConfig.data
        print(f"eval: on the built-in {data}: vlmedge has not trained or evaluated {args.path} on any data; "
              "--data DATA evaluates it on yours", file=sys.stderr if args.json else sys.stdout)
    family = families.of_artifact(made)
    cfg = _config(EvalConfig, args, family=family, data=data)
    metrics = family.evaluate(family.adapter(product), cfg, progress=not args.quiet)
    if args.json:  # the results first: a folder that cannot take eval.json loses nothing
        _print_json(metrics)
    else:
        _metrics_table(metrics, f"{args.path} on {measured_on(metrics) or data}")
    target = _eval_path(Path(args.path), args.out)
    try:
        families.write_eval(target, cfg, metrics)
    except OSError as e:
        raise VlmedgeError(f"cannot write {target} ({e.strerror or e}); the metrics are above") from None
    if not args.json:
        print(f"written: {target}")
    return 0


def _eval_path(folder, out: str | None):
    """Where `vlmedge eval` writes: --out, else FOLDER/eval.json; but never over a recorded step's eval.json (the
    run's record) nor into the product a step vouches for: for a step (FOLDER or its parent holds artifact.json), a
    new eval-<time>.json in the step's folder."""
    import time
    from pathlib import Path

    if out:
        return Path(out)
    step = next((f for f in (folder, folder.parent) if (f / RECORD).is_file()), None)
    if step is None or (step == folder and not (folder / "eval.json").exists()):
        return folder / "eval.json"
    return step / f"eval-{time.strftime('%Y%m%d-%H%M%S')}.json"


def _report(art, out: str) -> None:
    """The step's evaluation (eval.json), as the pipeline records it."""
    import json

    path = os.path.join(out, "eval.json")
    if art.metrics and os.path.isfile(path):
        with open(path) as f:
            record = json.load(f)
        _metrics_table(record["metrics"], f"{out} on {measured_on(record['metrics']) or record['data']}")
    print(f"recorded: {os.path.join(out, 'artifact.json')} (id {art.id}; a rerun with the same input and "
          "settings skips)")


def cmd_prune(args) -> int:
    family = families.of(args.model)
    _both_towers(args, family)
    art = _execute(_config(PruneConfig, args, family=family, data=None),  # data: --data, the run's
                   args, args.model)
    b, a = art.info["before"], art.info["after"]
    parts = "; ".join(f"{part} GFLOPs {b['flops'][part] / 1e9:.4g} -> {a['flops'][part] / 1e9:.4g}"
                      for part in b["flops"])
    print(f"parameters {b['parameters'] / 1e6:.2f}M -> {a['parameters'] / 1e6:.2f}M; {parts}; written {args.out}")
    _report(art, args.out)
    return 0


def _both_towers(args, family) -> None:
    """--heads/--mlp/--layers set every tower of `family`'s models that has the part (--vision-*/--text-* override
    one); a shorthand none of its towers takes is refused before any work, naming the flags that would prune."""
    for kind in ("heads", "mlp", "layers"):
        takes = [t for t in ("vision", "text") if f"{t}_{kind}" in family.prunable_parts]
        if getattr(args, kind) and not takes:
            flags = ", ".join("--" + p.replace("_", "-") for p in family.prunable_parts)
            raise VlmedgeError(f"--{kind}: a {family.name} model has no prunable {kind}; it takes {flags}")
        for tower in ("vision", "text"):
            if getattr(args, f"{tower}_{kind}") is None:
                setattr(args, f"{tower}_{kind}", getattr(args, kind) if tower in takes else 0.0)


def cmd_distill(args) -> int:
    art = _execute(_config(DistillStage, args, family=families.of(args.student)), args, args.student,
                   teacher=args.teacher, resume=args.resume)
    s = art.info
    if s.get("steps"):
        print(f"distilled {s['steps']} steps in {s['seconds']} s, loss {s['first_loss']:.3f} -> "
              f"{s['final_loss']:.3f}; student in {args.out}")
    _report(art, args.out)
    return 0


def cmd_export(args) -> int:
    art = _execute(_config(ExportConfig, args, EXPORT_FLAGS), args, args.model)
    for tower, p in art.info["parity"].items():
        print(f"{tower}: max abs diff {p['max_abs_diff']:.2e}, min cosine {p['cosine_min']:.7f}")
    print(f"{art.info['size_bytes'] / 1e6:.2f} MB of ONNX in {args.out}")
    _say_threads(args.out)
    _report(art, args.out)
    return 0


def cmd_quantize(args) -> int:
    art = _execute(_config(QuantizeConfig, args, QUANTIZE_FLAGS, data=None), args, args.onnx)
    r = art.info
    if r.get("forms"):
        print(f"mixed: kept {r['forms']['why']}")
    print(f"{r.get('precision', r['mode'])}: {r['fp32_size_bytes'] / 1e6:.2f} MB -> {r['size_bytes'] / 1e6:.2f} MB "
          f"({r['fp32_size_bytes'] / r['size_bytes']:.2f}x smaller); weights {r['weight_scheme']} "
          f"({r['why']}); cosine to fp32 >= {min(r['drift'].values()):.4f}")
    if r.get("answer_agreement"):
        a = r["answer_agreement"]
        print(f"greedy answers identical to the fp32 export's on {a['identical']} of {a['questions']} held-out "
              "questions")
    if any(r["kept_fp32"].values()):
        print(f"kept in fp32: {r['kept_fp32']}")
    _say_threads(args.out)
    _report(art, args.out)
    return 0


def cmd_compress(args) -> int:
    from rich.console import Console

    recipe = load_recipe(args.recipe, args.set or [])
    out = args.out or recipe.output or os.path.join("runs", recipe.name)
    console = Console(width=None if sys.stdout.isatty() else 160)
    report = run(recipe, out, force=args.force, console=None if args.quiet else console)
    if args.quiet:
        print_table(report, console)
    print(f"report: {os.path.join(out, 'report.md')}, {os.path.join(out, 'report.json')}, "
          f"{os.path.join(out, 'pareto.png')}")
    return 0


def cmd_recipes(args) -> int:
    for name in shipped_recipes():
        print(f"{name:24s} {recipe_summary(recipes_dir() / name)}")
    return 0


def cmd_gate(args) -> int:
    import dataclasses
    from pathlib import Path

    try:
        report = load_report(args.report)
        if args.budgets:
            budgets = load_budgets(args.budgets)
        else:
            budgets = [parse_budget(g) for g in (report.get("recipe") or {}).get("gates", [])]
        if args.step:  # a budget that names its step keeps it
            budgets = [dataclasses.replace(b, step=b.step or args.step) for b in budgets]
        baseline = load_report(args.baseline) if args.baseline else None
        if not budgets and baseline is None:
            raise VlmedgeError("no budgets: the recipe recorded none; pass --budgets FILE or --baseline REPORT")
        results = check(report, budgets, remeasure=args.remeasure)
    except VlmedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if baseline is not None:
        results += regression(report, baseline, args.tolerance)
    for r in results:
        print(f"{'PASS' if r.passed else 'FAIL'}  {r.budget:40s} {r.message}")
    summary = markdown(results, str(args.report))
    if args.markdown:
        write_text(Path(args.markdown), summary)
    if args.junit:
        write_text(Path(args.junit), junit(results))
    ok = all(r.passed for r in results)
    print(f"gate {'passed' if ok else 'FAILED'}: {sum(r.passed for r in results)}/{len(results)} budgets met")
    return 0 if ok else 1


def cmd_bench(args) -> int:
    from pathlib import Path

    if args.profile:
        if len(args.path) > 1:
            raise VlmedgeError("bench --profile: one export folder at a time")
        args.path = args.path[0]
        profile = profile_export(Path(args.path), runs=args.min_runs or 50, threads=args.threads)
        print_profile(profile)
        out = Path(args.json) if args.json else Path(args.path) / "profile.json"
        write_json(out, profile)
        print(f"written: {out}")
        return 0
    cfg_kwargs = {k: v for k, v in (("threads", args.threads), ("min_runs", args.min_runs),
                                    ("warmup", args.warmup), ("min_seconds", args.min_seconds),
                                    ("image_splitting", args.image_splitting)) if v is not None}
    targets = args.target or (["cpu"] if len(args.path) == 1 else ["cpu", "torch"])
    results = bench_paths([Path(p) for p in args.path], targets, cfg_kwargs)
    print_bench(results)
    first = Path(args.path[0])
    out = Path(args.json) if args.json else (first if first.is_dir() else first.parent) / "bench.json"
    write_json(out, results)
    print(f"written: {out}")
    return 0


# --- parser --------------------------------------------------------------------------------------------------------

def _field_docs(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings (the string under each field), its base classes' too: the flags' help."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError):
            continue
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _add_config_flags(p, cls, *, rename: dict[str, str] | None = None, skip: tuple[str, ...] = (),
                      hidden: tuple[str, ...] = (), helps: dict[str, str] | None = None,
                      choices: dict[str, Sequence[str]] | None = None) -> None:
    """One flag per field of a stage config, named after it (or as `rename` says), with the dataclass's default and
    its attribute docstring as help: the dataclass is the one source of both. Then one per field of each family's
    own settings for the config's section, said in its help; absent from the parsed flags unless given (its
    default is the family's, applied by `_config` once the input's family is known)."""
    import dataclasses
    import typing

    rename, helps, choices = rename or {}, helps or {}, choices or {}
    owners = {cls: None, **{c: name for name, c in families.options_of(getattr(cls, "SECTION", "")).items()}}
    seen = set()
    for c, family in owners.items():
        docs = {**_field_docs(c), **helps}
        hints = typing.get_type_hints(c)
        for f in dataclasses.fields(c):
            if f.name in skip or f.name == "options" or f.name in seen:
                continue
            seen.add(f.name)
            dest = rename.get(f.name, f.name)
            flag = "--" + dest.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            tp = hints[f.name]
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            base = args[0] if typing.get_origin(tp) is not tuple and args else tp
            shown = _preset_default(f) if PRESET_DEFAULT in f.metadata \
                else "" if default in (None, ()) else f" (default: {default})"
            text = (f"({family} models) " if family else "") + docs.get(f.name, "") + shown
            help_text = argparse.SUPPRESS if f.name in hidden else \
                text.replace("%", "%%").strip() or None  # argparse %-formats help
            if family:
                default = argparse.SUPPRESS
            if base is bool:
                p.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
            elif typing.get_origin(base) is tuple or _is_mapping(tp):
                p.add_argument(flag, dest=dest, action="append", default=None if not family else default,
                               help=help_text, metavar="NAME=VALUE" if _is_mapping(tp) else None)
            else:
                p.add_argument(flag, dest=dest, type=base, default=default, choices=choices.get(f.name),
                               help=help_text)


def _preset_default(f) -> str:
    """How --help states a training setting that defaults to the preset's (`train.preset_default`)."""
    return f" (default: the preset's, else {f.metadata[PRESET_DEFAULT]})"


def _data_count_help() -> str:
    """--data-count's help, its default read from TrainConfig (the one place it is written)."""
    import dataclasses

    field = next(f for f in dataclasses.fields(TrainConfig) if f.name == "data_count")
    return (_field_docs(TrainConfig)["data_count"] + _preset_default(field)).replace("%", "%%")


EXPORT_FLAGS = {"zero_shot_labels": "label"}
QUIET_HELP = "no progress (on a terminal a bar; in logs and CI a plain line about every 10 %%)"
QUANTIZE_FLAGS = {"exclude_nodes": "exclude_node", "op_types": "op_type", "exclude_op_types": "exclude_op_type",
                  "graphs": "graph", "int4_graphs": "int4_graph"}
"""Config fields whose flag is named otherwise (the singular of a repeatable flag)."""


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (a dual encoder, or a generative VLM) and write its folder",
                       description="Train a preset from scratch or fine-tune a folder with the model family's own "
                                   "objective: the seed's dual encoder (ViT + BERT + projections) with contrastive "
                                   "InfoNCE; a generative VLM (SmolVLM architecture: vqa-tiny, vqa-small) with the "
                                   "NLL of the answer tokens, its vision encoder optionally started from a "
                                   "contrastively trained tower (--vision-init, two-stage training). Unset options "
                                   "take the preset's defaults. Runs under torchrun for data parallelism (gloo on CPU, "
                                   "nccl on CUDA). OUT records the run (artifact.json): the same command again skips.",
                       epilog="example: vlmedge train --preset small --data shapes --out runs/teacher\n"
                              "resume:  vlmedge train --preset small --data shapes --out runs/teacher --resume\n"
                              "2 procs: torchrun --nproc_per_node 2 -m vlmedge train --preset tiny --out runs/ddp\n"
                              "VQA:     vlmedge train --preset vqa-small --data shapes --vision-init runs/teacher "
                              "--out runs/vqa",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=DEFAULT_PRESET,
                   help=f"{' | '.join(preset_names())} | path to a preset .json (default: {DEFAULT_PRESET})")
    p.add_argument("--init", help="start from this model folder (a dual encoder, CLIP or SmolVLM folder) instead of "
                                  "a preset")
    p.add_argument("--data", default=DEFAULT_SOURCE,
                   help="shapes[:COUNT] | image folder with metadata.jsonl (text and/or label, or question + answer "
                        "rows) | class folders root/<class>/*.jpg (captions from templates) | COCO captions .json | "
                        ".tar shards | a VQA v2 pair Q.json+A.json")
    p.add_argument("--out", required=True, help="model folder to write")
    _add_config_flags(p, TrainStage, choices={"precision": PRECISIONS})
    p.add_argument("--data-count", type=int, help=_data_count_help())
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images instead of failing")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of a model or ONNX folder (the tasks of its family)",
                       description="Evaluate a model folder (PyTorch) or an export folder (ONNX Runtime) and write "
                                   "PATH/eval.json; the tasks come from the folder's model family. A dual encoder on "
                                   "shapes: zero-shot colour x shape top-1/top-5 on held-out single-object images "
                                   "(also split into seen and held-out combinations), Recall@1/5/10 both ways, hard "
                                   "negatives with colour, shape or relation swapped. A dual encoder on your data: "
                                   "Recall@K (image->text also over distinct captions) and, where the data has labels "
                                   "(a label column, class folders), zero-shot top-1/top-5 over its classes (or "
                                   "--classes FILE) with --templates' prompts. A generative VLM: VQA accuracy "
                                   "(VQA v2's answer normalisation; per question type and on held-out colour x shape "
                                   "combinations) and captioning BLEU-4, ROUGE-L, CIDEr and caption-truth, greedy. "
                                   "A matching model (reranker): ITM accuracy on colour, shape, position and relation "
                                   "hard negatives, Recall@1/5 both ways by ITC alone and after ITM reranks ITC's "
                                   "top --rerank-k, zero-shot through the reranker.",
                       epilog="example: vlmedge eval runs/int8 --data shapes --retrieval-pairs 500\n"
                              "labels:  vlmedge eval runs/pets --data photos/ --classes classes.txt "
                              "--templates 'a photo of a {}.|a blurry photo of a {}.'\n"
                              "VQA:     vlmedge eval runs/vqa --data shapes --vqa-questions 800\n"
                              "rerank:  vlmedge eval runs/match --data shapes --rerank-k 16",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="model folder, ONNX export folder, or a run's step folder")
    p.add_argument("--data", help="held-out data: shapes, or your data (as `vlmedge train --data`) (default: the "
                                  "data vlmedge trained or evaluated PATH on, as its record says; else shapes)")
    _add_config_flags(p, EvalConfig, skip=("data",), choices={"image_splitting": SPLITTING})
    p.add_argument("--out", metavar="FILE",
                   help="write the metrics here (default: PATH/eval.json; for a step of a run, or its model or onnx "
                        "folder, a new eval-<time>.json in the step's folder: the step's eval.json is the run's "
                        "record and its product is what the record vouches for)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    p.set_defaults(func=cmd_eval)


def _say_threads(folder) -> None:
    tuning = read_manifest(folder).get("threads")
    if tuning:
        print("threads tuned on this CPU (batch-1 p50): " + "; ".join(
            f"{t} {tuning[t]} (" + ", ".join(f"{n}: {ms:.2f} ms" for n, ms in tuning["p50_ms"][t].items()) + ")"
            for t in tuning["p50_ms"]))


def _add_common(p, data_help: str = "data for calibration and evaluation") -> None:
    p.add_argument("--out", required=True, help="folder to write (it records the step: the same command again skips)")
    p.add_argument("--data", help=f"{data_help} (default: the data vlmedge trained or evaluated the input on, as "
                                  "its record says; for a folder vlmedge has not: shapes for calibration, and no "
                                  "evaluation)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluating the result")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="structured pruning: attention heads, MLP neurons, layers, both towers",
                       description="Remove the least important heads, MLP neurons and layers. Ratios are fractions "
                                   "removed per layer (heads, mlp) or per tower (layers); --heads/--mlp/--layers set "
                                   "every tower that has the part, --vision-*/--text-* override one; a matching "
                                   "model prunes its text encoder (--text-*, and --text-cross-heads for its "
                                   "cross-attention to the image). Importance: taylor (|w*grad| of the family's "
                                   "training loss on calibration batches) or magnitude.",
                       epilog="example: vlmedge prune runs/teacher --out runs/pruned --heads 0.5 --mlp 0.5")
    p.add_argument("model", help="model folder (or the folder of an earlier command or run step)")
    _add_common(p)
    for kind in ("heads", "mlp", "layers"):
        p.add_argument(f"--{kind}", type=float, default=0.0,
                       help=f"fraction of {kind} to remove in every tower that has them (a matching model: its text "
                            "encoder)")
    per_tower = tuple(f"{t}_{k}" for t in ("vision", "text") for k in ("heads", "mlp", "layers"))
    _add_config_flags(p, PruneConfig, skip=("data",), hidden=per_tower, choices={"importance": list(IMPORTANCE)})
    for name in per_tower:  # None: the both-towers flag decides (cmd_prune)
        p.set_defaults(**{name: None})
    p.set_defaults(func=cmd_prune)


def _add_distill(sub) -> None:
    p = sub.add_parser("distill", help="distil a teacher into a student (contrastive, affinity, feature, matching)",
                       description="Train the student (a pruned teacher, or any model folder) against a frozen "
                                   "teacher with weighted losses: its own InfoNCE, affinity mimicking (KL of the "
                                   "in-batch similarity distributions, TinyCLIP) and feature mimicry (cosine to the "
                                   "teacher's embeddings, CLIP-KD); a matching model adds its own ITM loss to the "
                                   "first and --matching: KL of the teacher's and student's match probabilities.",
                       epilog="example: vlmedge distill runs/pruned --teacher runs/teacher --out runs/student "
                              "--steps 600")
    p.add_argument("student", help="student model folder (e.g. the output of vlmedge prune)")
    p.add_argument("--teacher", required=True, help="teacher model folder")
    _add_common(p, "training and evaluation data")
    _add_config_flags(p, DistillStage, choices={"precision": PRECISIONS})
    p.add_argument("--data-count", type=int, help=_data_count_help())
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.set_defaults(func=cmd_distill)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export the family's graphs to ONNX with a parity check and a manifest",
                       description="Write the graphs of the model's family (a dual encoder: image_encoder.onnx and "
                                   "text_encoder.onnx, normalised embeddings; a generative VLM: vision_encoder, "
                                   "embed_tokens, decoder_model_merged with the KV cache; a matching model: "
                                   "image_encoder, text_encoder and matcher.onnx), dynamic batch and sequence, check "
                                   "them with onnx.checker and against PyTorch on fresh random inputs (and greedy "
                                   "answers or rerank orders on held-out data), and write manifest.json with "
                                   "preprocessing and tokenizer files. A generative export, and a dual encoder's with "
                                   "--layout onnx-community, is a model folder transformers.js loads as written "
                                   "(graphs in onnx/, config.json and the processor's configs beside them).",
                       epilog="example: vlmedge export runs/student --out runs/onnx --label 'a red circle'\n"
                              "transformers.js: vlmedge export runs/student --out runs/web --layout onnx-community\n"
                              "         then:   vlmedge quantize runs/web --out runs/web-q8 --add-to-source  "
                              "(q8 beside fp32 in runs/web/onnx)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (or the folder of an earlier command or run step)")
    _add_common(p, "evaluation data")
    _add_config_flags(p, ExportConfig, rename=EXPORT_FLAGS,
                      helps={"zero_shot_labels": "zero-shot label caption to precompute (repeatable)"})
    p.set_defaults(func=cmd_export)


def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="INT8 (dynamic or static QDQ), INT4 weight-only or FP16 with ONNX Runtime's "
                                        "quantizers, per graph",
                       description="Quantize an fp32 export folder. dynamic: the fast CPU default. static: QDQ with "
                                   "calibration batches (MatMul/Gemm/Gather), the form TensorRT consumes. fp16: "
                                   "ORT's float16 converter. int4: MatMulNBits weight-only blocks (ORT's n-bit "
                                   "quantizer; --block-size, --accuracy-level 4 computes in int8). mixed: the "
                                   "--int4-graph graphs tried as INT4 and as INT8, timed side by side, the faster form "
                                   "within --max-drop kept. --graph NAME=MODE sets one graph's mode. --max-drop makes "
                                   "it accuracy-aware: layer groups fall back to fp32 until the metric is within the "
                                   "tolerance.",
                       epilog="examples: vlmedge quantize runs/onnx --out runs/int8 --mode dynamic --max-drop 0.01 "
                              "| vlmedge quantize runs/vqa-onnx --out runs/int4 --mode int4 --graph vision=dynamic "
                              "--block-size 32 | vlmedge quantize runs/vqa-onnx --out runs/mixed --mode mixed "
                              "--max-drop 0.01 --metric vqa.accuracy")
    p.add_argument("onnx", help="fp32 export folder (or the folder of an earlier command or run step)")
    _add_common(p)
    _add_config_flags(p, QuantizeConfig, rename=QUANTIZE_FLAGS, skip=("data",),
                      choices={"mode": MODES, "calibration": CALIBRATION, "weight_scheme": WEIGHT_SCHEMES,
                               "optimize": OPTIMIZE},
                      helps={"graphs": "a graph's own mode, e.g. decoder=int4 (repeatable; the others take --mode)",
                             "int4_graphs": "mixed mode: a graph tried as INT4 (repeatable; default embed, decoder)",
                             "exclude_nodes": "node name or regex kept in fp32 (repeatable)",
                             "op_types": "op type to quantize (repeatable; default MatMul, Gemm, Gather)",
                             "exclude_op_types": "op type kept in fp32 (repeatable)"})
    p.set_defaults(func=cmd_quantize)


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="run a recipe: train, prune, distill, export, quantize, benchmark, report",
                       description="Run every stage of a YAML recipe into OUT (one folder per step, cached by "
                                   "content hash: a rerun skips finished steps, an interrupted one resumes), "
                                   "benchmark every step on the recipe's targets and write report.json, report.md "
                                   "and pareto.png.\n\nThe recipe format:\n" + "\n".join(
                                       recipe_doc.split("\n\n", 2)[-1].splitlines()),
                       epilog="examples:\n  vlmedge compress recipes/quickstart.yaml --out runs/quickstart\n"
                              "  vlmedge compress recipes/quickstart.yaml --out runs/q --set stages.quantize.mode=static"
                              "\n  vlmedge compress edge-cpu --set stages.0.train.steps=20",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="a recipe file, or the name of a shipped recipe (see vlmedge recipes)")
    p.add_argument("--out", help="run folder (default: the recipe's output, else runs/NAME)")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a recipe field, e.g. --set stages.train.steps=100 (repeatable)")
    p.add_argument("--force", action="store_true", help="rerun every stage even if finished")
    p.add_argument("--quiet", action="store_true", help=QUIET_HELP + "; only the final table")
    p.set_defaults(func=cmd_compress)


def _add_recipes(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="latency of a run, an artifact folder or an ONNX file on one or more targets",
                       description="Measure p50/p90/p99 (and mean, min, max, CV) at batch 1 of the scenarios of the "
                                   "artifact's model family. "
                                   + " ".join(f"A {name.replace('_', ' ')} model: {f.scenarios_help}."
                                              for name, f in families.every().items()) +
                                   " PATH is a run folder (every step on every target it can run on), a model folder "
                                   "(torch), an export folder (cpu) or a single .onnx file (cpu); several PATHs are "
                                   "measured in one run (default target: cpu; for several PATHs cpu and torch, each "
                                   "PATH on the one it can run on).",
                       epilog="example: vlmedge bench runs/quickstart --target cpu --target torch\n"
                              "profile: vlmedge bench runs/quickstart/04-quantize-dynamic-*/onnx --profile\n"
                              "VQA:     vlmedge bench runs/vqa runs/vqa-onnx   (torch on the folder, cpu on the export)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="+")
    p.add_argument("--target", action="append", choices=sorted(TARGETS), help="repeatable (default: cpu)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: an export folder's per-tower counts "
                                               "tuned on this CPU, from its manifest; else all cores)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--min-runs", type=int)
    p.add_argument("--min-seconds", type=float)
    p.add_argument("--image-splitting", choices=SPLITTING,
                   help="generative models: time the latency image split into tiles (on), as one global image "
                        "(off), or as the folder's processor config says (default: as-folder)")
    p.add_argument("--json", help="where to write the results (default: PATH/bench.json or PATH/profile.json)")
    p.add_argument("--profile", action="store_true",
                   help="export folders: ONNX Runtime's per-op-type kernel time of each graph instead of latency, on "
                        "real feeds (a generative decoder's prefill and its cached step apart); --min-runs runs each "
                        "(default 50)")
    p.set_defaults(func=cmd_bench)


def _add_gate(sub) -> None:
    p = sub.add_parser("gate", help="check a report against budgets; exit 0 (pass), 1 (fail) or 2 (usage error)",
                       description=gate_doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: vlmedge gate runs/quickstart/report.json --junit gate.xml --markdown gate.md")
    p.add_argument("report", help="report.json (or its run folder)")
    p.add_argument("--budgets", help="YAML list of budgets (default: the gates recorded from the recipe)")
    p.add_argument("--baseline", help="a stored report.json to check for regressions against")
    p.add_argument("--tolerance", type=float, default=0.1, help="relative tolerance for --baseline (default 0.1)")
    p.add_argument("--remeasure", type=int, default=2, help="re-measure unstable latency figures up to N times")
    p.add_argument("--step", metavar="NAME",
                   help="judge this step of the run instead of the last (budgets naming a step keep theirs): "
                        "`--step export` says what the gates make of the run without its quantize step")
    p.add_argument("--junit", help="write JUnit XML here")
    p.add_argument("--markdown", help="write a Markdown summary (for a pull-request comment) here")
    p.set_defaults(func=cmd_gate)


PARSER_BUILDERS: list[Callable] = [_add_train, _add_eval, _add_prune, _add_distill, _add_export, _add_quantize,
                                   _add_compress, _add_recipes, _add_bench, _add_gate]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmedge", description="Train, compress (prune, distill, quantize), export and benchmark "
                                    "vision-language models (dual encoders, generative VLMs, cross-attention "
                                    "matching models) for CPUs, GPUs and Jetson boards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vlmedge {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (anywhere on the line; VLMEDGE_DEBUG=1 too)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The error boundary: a known failure is one line naming the culprit (exit 1, 130 for Ctrl-C); an unexpected
    one is one line too, with the way to see its traceback (`--debug`, or VLMEDGE_DEBUG=1)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("VLMEDGE_DEBUG") == "1"  # anywhere on the line, any command
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except VlmedgeError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (the boundary: never a bare traceback without --debug)
        if debug:
            raise
        where = next((f"{fr.filename}:{fr.lineno}" for fr in reversed(traceback.extract_tb(e.__traceback__))
                      if "vlmedge" in fr.filename), "")
        message = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"error: unexpected {type(e).__name__}: {message} ({where}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
