"""`vlmedge ...`: thin commands over the library. Heavy libraries are imported inside the handlers.

Every handler is a plain function of the parsed arguments; `main(argv)` is callable from tests.
A `VlmedgeError` becomes a one-line `error: ...` and exit code 1; usage errors exit with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from .errors import VlmedgeError

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

def cmd_train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(preset=args.preset, init=args.init, data=args.data, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      grad_accum=args.grad_accum, hard_negatives=args.hard_negatives, precision=args.precision,
                      data_count=args.data_count, seed=args.seed, checkpoint_every=args.checkpoint_every,
                      skip_bad=args.skip_bad)
    summary = train(cfg, args.out, resume=args.resume, progress=not args.quiet)
    if summary.get("world_size", 1) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(f"trained {summary['steps']} steps in {summary['seconds']} s ({summary['samples_per_s']} samples/s), "
          f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; model in {args.out}")
    print(f"next: vlmedge eval {args.out} --data {args.data}")
    return 0


def cmd_eval(args) -> int:
    from .evaluate import EvalConfig, evaluate_folder

    cfg = EvalConfig(data=args.data, zero_shot_images=args.zero_shot_images, retrieval_pairs=args.retrieval_pairs,
                     hard_negative_pairs=args.hard_negative_pairs)
    metrics = evaluate_folder(args.path, cfg)
    if args.json:
        _print_json(metrics)
    else:
        _metrics_table(metrics, f"{args.path} on {args.data}")
        print(f"written: {os.path.join(args.path, 'eval.json')}")
    return 0


# --- parser --------------------------------------------------------------------------------------------------------

def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a dual encoder (symmetric InfoNCE) and write its model folder",
                       description="Train the seed's dual encoder (ViT + BERT + projections, learnable temperature) "
                                   "with contrastive InfoNCE. Unset options take the preset's defaults. Runs under "
                                   "torchrun for data parallelism (gloo on CPU, nccl on CUDA).",
                       epilog="example: vlmedge train --preset small --data shapes --out runs/teacher\n"
                              "resume:  vlmedge train --preset small --data shapes --out runs/teacher --resume\n"
                              "2 procs: torchrun --nproc_per_node 2 -m vlmedge train --preset tiny --out runs/ddp",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="tiny | small | base | path to a preset .json (default: small)")
    p.add_argument("--init", help="start from this model folder (VisionTextDualEncoder or CLIP) instead of a preset")
    p.add_argument("--data", default="shapes",
                   help="shapes[:COUNT] | image folder with metadata.jsonl | COCO captions .json | .tar shards")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (gradient accumulation)")
    p.add_argument("--hard-negatives", type=float, default=0.25,
                   help="fraction of each batch drawn as one-attribute neighbours (hard-negative mining; shapes)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: fp32 on CPU (bf16 is emulated there), bf16 on CUDA")
    p.add_argument("--data-count", type=int, help="images to generate/use (shapes default: preset's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) unreadable images instead of failing")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval and hard-negative accuracy of a model or ONNX folder",
                       description="Evaluate a model folder (PyTorch) or an export folder (ONNX Runtime) and write "
                                   "PATH/eval.json. On shapes: zero-shot colour x shape top-1/top-5 on held-out "
                                   "single-object images (also split into seen and held-out combinations), "
                                   "Recall@1/5/10 both ways, hard negatives with colour, shape or relation swapped.")
    p.add_argument("path", help="model folder or ONNX export folder")
    p.add_argument("--data", default="shapes")
    p.add_argument("--zero-shot-images", type=int, default=1080)
    p.add_argument("--retrieval-pairs", type=int, default=1000)
    p.add_argument("--hard-negative-pairs", type=int, default=500)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_eval)


PARSER_BUILDERS: list[Callable] = [_add_train, _add_eval]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="vlmedge", description="Train, compress (prune, distill, quantize), export and benchmark "
                                    "vision-language dual encoders for CPUs, GPUs and Jetson boards.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"vlmedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in PARSER_BUILDERS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.func(args)
    except VlmedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
