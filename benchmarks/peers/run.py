"""vlmedge against what users would do otherwise, on the same models, measured by one harness in one run.

    benchmarks/peers/run.sh [--quick]     (builds the peers' environments, then runs this file in runs/peers/env-inc)

1. Models: the `small` teacher trained on shapes as the seed's dual encoder (the quickstart recipe's teacher) and
   as a CLIPModel (`small-clip` preset, same widths and training), and the `base` preset with a minimal teacher
   (2 steps: its latency and size mean something, its accuracy does not).
2. Flows, each as its own documentation gives it:
   * PyTorch eager fp32, and `torch.ao.quantization.quantize_dynamic` (Linear -> dynamic INT8);
   * Hugging Face Optimum (CLIP form only: optimum-onnx cannot export a VisionTextDualEncoderModel):
     `optimum-cli export onnx` + `ORTQuantizer` dynamic INT8 with the CPU's preset, in its own environment;
   * Intel Neural Compressor's ONNX sibling (`onnx-neural-compressor`) dynamic INT8 on vlmedge's fp32 export, and
     INC 3.x for PyTorch where its flow runs on this machine, in its own environment;
   * vlmedge: the fp32 export, the INT8 stage alone (export + quantize), and the full recipe (prune + distill +
     export + INT8: `quickstart` for the small models, `edge-cpu` for base).
3. One harness: accuracy with vlmedge's evaluator on the same held-out data; batch-1 image, text and pair latency
   measured in interleaved rounds (every variant once per round, so drift on this shared machine hits all alike);
   size on disk; the ratio to PyTorch eager fp32 of the same model in the same run.

Writes runs/peers/{full,quick}/results.json and benchmarks/RESULTS.md. A flow that fails is reported as failed with its
error, not left out.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
ENVS = ROOT / "runs" / "peers"  # the peers' environments (benchmarks/peers/envs.sh)
WORK = ENVS / "full"  # artifacts of this run; runs/peers/quick for --quick
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))  # benchmarks/: ceilings, provenance


@dataclass
class Variant:
    model: str
    name: str
    flow: str
    encoder: Any = None
    image: Callable[[], Any] | None = None
    text: Callable[[], Any] | None = None
    size_bytes: int | None = None
    flops: dict[str, int] | None = None
    error: str | None = None
    threads: str | None = None
    """ONNX variants: the intra-op threads of the main timing ('1', 'image 1, text 2', ...)."""
    one_thread: Callable[[], Any] | None = None
    """ONNX variants: the pair again with both towers on 1 thread, timed in the same rounds ('pair_1t')."""
    metrics: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=lambda: {"image": [], "text": [], "pair": []})


def sh(*cmd: str, env_bin: Path | None = None, log: Path | None = None) -> str:
    """Run a command (from the repository root); its output goes to `log`; raises with the tail on failure."""
    exe = [str(env_bin / cmd[0])] if env_bin else [cmd[0]]
    proc = subprocess.run(exe + list(cmd[1:]), cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if log:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]  # the exception line
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {' | '.join(tail)}")
    return proc.stdout


def vlmedge(*args: str, log: str) -> str:
    return sh(sys.executable, "-m", "vlmedge", *args, log=WORK / "logs" / f"{log}.log")


# --- building the artifacts ---------------------------------------------------------------------------------------

def compress(recipe: str, out: Path, overrides: list[str], log: str) -> dict[str, Any]:
    args = ["compress", recipe if "/" in recipe else f"recipes/{recipe}", "--out", str(out), "--quiet"]
    for o in overrides:
        args += ["--set", o]
    t0 = time.perf_counter()
    vlmedge(*args, log=log)
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = time.perf_counter() - t0  # this run's time (cached steps take seconds)
    return report


def step(report: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in report["steps"] if s["stage"] == stage or s["name"] == stage)


def final(report: dict[str, Any]) -> dict[str, Any]:
    return report["steps"][-1]


def sample_inputs(model, batch: int):
    """The latency inputs the targets use (shapes images and captions, preprocessed as the model says)."""
    from vlmedge import families

    return families.get("dual_encoder").latency_inputs(model, batch)


def export_and_quantize(model: Path, out: Path, log: str) -> tuple[Path, Path]:
    """vlmedge's own export and INT8 of a model. Each command records its artifact (its id hashes the input's, the
    settings and the stage's revision): a rerun with the same teacher and code skips, a retrained teacher or a
    changed export or quantize stage is made again."""
    fp32, int8 = out / "vlmedge-fp32", out / "vlmedge-int8"
    vlmedge("export", str(model), "--out", str(fp32), "--no-eval", "--quiet", log=f"{log}-export")
    vlmedge("quantize", str(fp32), "--out", str(int8), "--no-eval", "--quiet", log=f"{log}-quantize")
    return fp32, int8


def wrap_onnx(files: dict[str, Path], like: Path, out: Path, precision: str) -> Path:
    """A peer's ONNX towers as an export folder (vlmedge's manifest, tokenizer and preprocessing of the same model),
    so the same evaluator and harness run them."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((like / "manifest.json").read_text())
    for tower, src in files.items():
        # one self-contained file, as vlmedge ships it (INC writes the weights as external data beside the graph)
        onnx.save(onnx.load(str(src)), str(out / manifest["files"][tower]))
    for f in like.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json" or f.name == "vocab.txt":
            shutil.copyfile(f, out / f.name)
    manifest.update(precision=precision, source=str(files))
    manifest.pop("threads", None)  # vlmedge's thread tuning of its own graphs: a peer's run at its default
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def split_clip(combined: Path, out: Path) -> dict[str, Path]:
    """Optimum exports CLIP as one graph (text and image in, both embeddings out): cut out each tower."""
    import onnx.utils

    out.mkdir(parents=True, exist_ok=True)
    towers = {"image": (["pixel_values"], ["image_embeds"]), "text": (["input_ids", "attention_mask"], ["text_embeds"])}
    result = {}
    for tower, (inputs, outputs) in towers.items():
        path = out / f"{tower}.onnx"
        onnx.utils.extract_model(str(combined), str(path), inputs, outputs)
        result[tower] = path
    return result


def peer_flow(env_name: str, script: str, source: Path, out: Path, log: str) -> dict[str, Any]:
    """Run a peer's flow script in its own environment once (its JSON summary is kept in OUT/flow.json)."""
    env = ENVS / env_name / "bin"
    if not (env / "python").exists():
        raise RuntimeError(f"runs/peers/{env_name} missing: run benchmarks/peers/envs.sh")
    info_file = out / "flow.json"
    if not info_file.exists():
        stdout = sh("python", str(Path(__file__).parent / script), str(source), str(out), env_bin=env,
                    log=WORK / "logs" / f"{log}.log")
        out.mkdir(parents=True, exist_ok=True)
        info_file.write_text(stdout.strip().splitlines()[-1])
    return json.loads(info_file.read_text())


def optimum_flow(clip_model: Path, like: Path, out: Path) -> tuple[Path, Path, dict]:
    info = peer_flow("env-optimum", "optimum_flow.py", clip_model, out, "optimum")
    fp32 = wrap_onnx(split_clip(Path(info["fp32"]), out / "split-fp32"), like, out / "fp32-folder", "fp32")
    int8 = wrap_onnx(split_clip(Path(info["int8"]), out / "split-int8"), like, out / "int8-folder", "int8-dynamic")
    return fp32, int8, info


def inc_onnx_flow(fp32_export: Path, out: Path) -> tuple[Path, dict]:
    info = peer_flow("env-inc", "inc_flow.py", fp32_export, out, f"inc-{out.parent.name}")
    files = {t: Path(p) for t, p in info["files"].items()}
    return wrap_onnx(files, fp32_export, out / "folder", "int8-dynamic"), info


# --- variants -------------------------------------------------------------------------------------------------------

def torch_variant(model_name: str, name: str, flow: str, folder: Path, ao_int8: bool = False) -> Variant:
    import torch

    from vlmedge.families.dual_encoder.model import image_features, text_features
    from vlmedge.families.dual_encoder.tasks import TorchEncoder
    from vlmedge.models import load_model

    vlm = load_model(folder)
    if ao_int8:
        vlm.model = torch.ao.quantization.quantize_dynamic(vlm.model, {torch.nn.Linear}, dtype=torch.qint8)
    buf = io.BytesIO()
    torch.save(vlm.model.state_dict(), buf)  # size of the weights as PyTorch would store them (written, never loaded)
    pixels, tokens = sample_inputs(vlm, 1)
    px, ids, mask = (torch.from_numpy(a) for a in (pixels, tokens["input_ids"], tokens["attention_mask"]))

    def image():
        with torch.inference_mode():
            return image_features(vlm.model, px)

    def text():
        with torch.inference_mode():
            return text_features(vlm.model, ids, mask)

    return Variant(model_name, name, flow, TorchEncoder(vlm), image, text, size_bytes=len(buf.getvalue()))


class CompiledEncoder:
    """Two compiled batch-1 tower functions as an `Encoder` (exported graphs are specialised to batch 1)."""

    def __init__(self, vlm, image_fn, text_fn):
        self.vlm, self.image_fn, self.text_fn, self.preprocess = vlm, image_fn, text_fn, vlm.preprocess

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        from vlmedge.evaluate import normalise
        with torch.no_grad():
            return normalise(np.concatenate([self.image_fn(torch.from_numpy(p[None])).numpy() for p in pixel_values]))

    def encode_texts(self, texts) -> np.ndarray:
        import torch

        from vlmedge.evaluate import normalise
        tok = self.vlm.tokenize(list(texts))
        with torch.no_grad():
            return normalise(np.concatenate([
                self.text_fn(torch.from_numpy(i[None]), torch.from_numpy(m[None])).numpy()
                for i, m in zip(tok["input_ids"], tok["attention_mask"])]))


def inc_pt_variant(model_name: str, folder: Path) -> Variant:
    """INC 3.x for PyTorch, its documented dynamic W8A8 flow: export -> prepare -> convert -> torch.compile.
    (One calibration forward before convert: without it the observers keep default ranges and the output is
    garbage, measured cosine 0.28 to fp32 on a tiny CLIP.)"""
    import torch
    from neural_compressor.torch.export import export
    from neural_compressor.torch.quantization import DynamicQuantConfig, convert, prepare
    from torch._inductor import config as inductor_config

    from vlmedge.families.dual_encoder.model import image_features, text_features
    from vlmedge.models import load_model

    vlm = load_model(folder)
    model = vlm.model.eval()

    class Image(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, px):
            return image_features(self.m, px)

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids, mask):
            return text_features(self.m, ids, mask)

    pixels, tokens = sample_inputs(vlm, 1)
    px, ids, mask = (torch.from_numpy(a) for a in (pixels, tokens["input_ids"], tokens["attention_mask"]))
    inductor_config.freezing = True
    compiled = []
    for module, example in ((Image(), (px,)), (Text(), (ids, mask))):
        prepared = prepare(export(module, example_inputs=example), quant_config=DynamicQuantConfig())
        with torch.no_grad():
            prepared(*example)
        fn = torch.compile(convert(prepared))
        with torch.no_grad():
            fn(*example)  # compile now, not in the first timed call
        compiled.append(fn)
    image_fn, text_fn = compiled

    def image():
        with torch.no_grad():
            return image_fn(px)

    def text():
        with torch.no_grad():
            return text_fn(ids, mask)

    return Variant(model_name, "INC PyTorch dynamic INT8 (compiled)", "inc", CompiledEncoder(vlm, image_fn, text_fn),
                   image, text)  # an in-memory compiled graph: no file on disk to size


def onnx_variant(model_name: str, name: str, flow: str, folder: Path, threads: int | None) -> Variant:
    """threads=None: the tuned per-tower counts of a vlmedge manifest (what vlmedge's runners use)."""
    from vlmedge.runtime.measure import threads_label
    from vlmedge.runtime.onnx import OnnxEncoder, onnx_size

    enc, single = OnnxEncoder(folder, threads=threads), OnnxEncoder(folder, threads=1)
    pixels, tokens = sample_inputs(enc, 1)

    def one_thread():
        single.run_image(pixels)
        single.run_text(tokens["input_ids"], tokens["attention_mask"])
    return Variant(model_name, name, flow, enc, lambda: enc.run_image(pixels),
                   lambda: enc.run_text(tokens["input_ids"], tokens["attention_mask"]), size_bytes=onnx_size(folder),
                   threads=threads_label(enc.threads), one_thread=one_thread)


def attempt(variants: list[Variant], model_name: str, name: str, flow: str, build: Callable[[], Variant]) -> None:
    try:
        variants.append(build())
    except Exception as e:  # a peer's flow failing is a result: reported, not hidden
        traceback.print_exc(file=sys.stderr)
        variants.append(Variant(model_name, name, flow, error=f"{type(e).__name__}: {str(e)[:300]}"))


# --- measuring ------------------------------------------------------------------------------------------------------

def measure(variants: list[Variant], rounds: int, runs: int) -> None:
    from vlmedge.runtime.measure import MeasureConfig, time_fn

    live = [v for v in variants if v.error is None]
    cfg = MeasureConfig(warmup=3, min_runs=runs, min_seconds=0.0)
    for r in range(rounds):
        print(f"latency round {r + 1}/{rounds}", flush=True)
        for v in live:
            def pair(v=v):
                v.image()
                v.text()
            timed = [("image", v.image), ("text", v.text), ("pair", pair)]
            for kind, fn in timed + ([("pair_1t", v.one_thread)] if v.one_thread else []):
                v.samples.setdefault(kind, [])
                v.samples[kind] += time_fn(fn, cfg, keep_samples=True)["samples_ms"]


def evaluate_all(variants: list[Variant], eval_cfg) -> None:
    from vlmedge.evaluate import flat_metrics
    from vlmedge.families.dual_encoder.tasks import evaluate

    for v in variants:
        if v.error is None and v.model != "base":
            t0 = time.perf_counter()
            v.metrics = flat_metrics(evaluate(v.encoder, eval_cfg))
            print(f"evaluated {v.model}/{v.name} in {time.perf_counter() - t0:.1f} s: "
                  f"top1 {v.metrics.get('zero_shot.top1', float('nan')):.3f}", flush=True)


def ceilings(seconds: float = 3.0) -> dict[str, float]:
    """This machine's ONNX Runtime GEMM ceilings (2048^3, all cores): fp32 MatMul and u8s8 MatMulInteger."""
    from ceilings import gemm

    return gemm(2048, 2048, 2048, os.cpu_count(), seconds)


# --- main -----------------------------------------------------------------------------------------------------------

def common_flows(variants: list[Variant], model: str, folder: Path, out: Path, threads: int) -> Path:
    """The flows every model goes through: PyTorch eager and torch.ao, vlmedge's export and INT8 stage, INC for
    PyTorch and INC's ONNX flow (on vlmedge's fp32 export). Returns the fp32 export folder."""
    fp32, int8 = export_and_quantize(folder, out, model)
    variants += [torch_variant(model, "PyTorch eager fp32", "torch", folder),
                 torch_variant(model, "torch.ao dynamic INT8", "torch.ao", folder, ao_int8=True),
                 onnx_variant(model, "vlmedge export fp32 (ORT)", "vlmedge", fp32, None),
                 onnx_variant(model, "vlmedge INT8 stage alone", "vlmedge", int8, None)]
    attempt(variants, model, "INC PyTorch dynamic INT8 (compiled)", "inc", lambda: inc_pt_variant(model, folder))
    attempt(variants, model, "INC ONNX dynamic INT8", "inc",
            lambda: onnx_variant(model, "INC ONNX dynamic INT8", "inc", inc_onnx_flow(fp32, out / "inc")[0], threads))
    return fp32


def recipe_variant(variants: list[Variant], model: str, name: str, report: dict[str, Any]) -> None:
    """The last artifact of a vlmedge recipe run, with its FLOPs (for the GOP/s figure)."""
    variants.append(onnx_variant(model, name, "vlmedge", ROOT / final(report)["path"], None))
    variants[-1].flops = final(report)["flops"]


def build_variants(quick: bool, threads: int) -> tuple[list[Variant], dict[str, Any]]:
    train_quick = ["stages.train.steps=60", "stages.distill.steps=40"] if quick else []
    context: dict[str, Any] = {}
    variants: list[Variant] = []

    # small, dual encoder: the quickstart recipe (its teacher is the model every flow starts from)
    print("quickstart recipe (small dual encoder) ...", flush=True)
    qs = context["quickstart"] = compress("quickstart.yaml", WORK / "quickstart", train_quick, "quickstart")
    common_flows(variants, "small", ROOT / step(qs, "train")["path"], WORK / "small", threads)
    recipe_variant(variants, "small", "vlmedge quickstart recipe", qs)

    # small, CLIPModel: trained with the same settings; Optimum's flow runs on this form
    print("small-clip teacher and recipe ...", flush=True)
    clip = WORK / "small-clip"
    if not (clip / "model.safetensors").exists():
        vlmedge("train", "--preset", "small-clip", "--data", "shapes", "--out", str(clip),
                *(["--steps", "60"] if quick else []), log="small-clip-train")
    cfp32 = common_flows(variants, "small-clip", clip, WORK / "clip", threads)

    def optimum(which: int, name: str) -> Variant:
        if "optimum" not in context:
            context["optimum"] = optimum_flow(clip, cfp32, WORK / "clip" / "optimum")
        return onnx_variant("small-clip", name, "optimum", context["optimum"][which], threads)

    for which, name in enumerate(("Optimum export fp32 (ORT)", "Optimum ORTQuantizer dynamic INT8")):
        attempt(variants, "small-clip", name, "optimum", lambda which=which, name=name: optimum(which, name))
    # the quickstart's compression stages (prune, distill, export, INT8) on the CLIP teacher
    cr = context["clip-recipe"] = compress(str(Path(__file__).parent / "clip-small.yaml"), WORK / "clip-recipe",
                                           [f"model.path={clip}"] + (["stages.distill.steps=40"] if quick else []),
                                           "clip-recipe")
    recipe_variant(variants, "small-clip", "vlmedge quickstart stages", cr)

    # base: latency and size only
    print("edge-cpu recipe (base, minimal teacher) ...", flush=True)
    base_overrides = ["stages.train.steps=2", "stages.train.batch_size=8", "stages.distill.steps=2",
                      "stages.distill.batch_size=8", "data.count=256", "eval.zero_shot_images=72",
                      "eval.retrieval_pairs=64", "eval.hard_negative_pairs=16"]
    edge = context["edge-cpu"] = compress("edge-cpu.yaml", WORK / "edge-cpu", base_overrides, "edge-cpu")
    common_flows(variants, "base", ROOT / step(edge, "train")["path"], WORK / "base", threads)
    recipe_variant(variants, "base", "vlmedge edge-cpu recipe", edge)
    return variants, context


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short training, small eval sets, fewer timing rounds")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 7, quick 3)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown from the last results.json (or --from), measuring nothing")
    parser.add_argument("--from", dest="source", type=Path,
                        help="with --render-only: the results file to render (e.g. benchmarks/results/peers.json)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global WORK
    WORK = ENVS / ("quick" if args.quick else "full")
    if args.render_only:
        from report_md import render
        Path(args.results).write_text(render(json.loads((args.source or WORK / "results.json").read_text())))
        return 0
    from provenance import Provenance
    run = Provenance.start()
    WORK.mkdir(parents=True, exist_ok=True)
    from vlmedge.evaluate import EvalConfig
    from vlmedge.runtime.measure import environment

    threads = os.cpu_count() or 1
    import torch
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    variants, context = build_variants(args.quick, threads)
    eval_cfg = EvalConfig(zero_shot_images=216, retrieval_pairs=300, hard_negative_pairs=100) if args.quick \
        else EvalConfig()
    evaluate_all(variants, eval_cfg)
    rounds = args.rounds or (3 if args.quick else 7)
    measure(variants, rounds, runs=10 if args.quick else 20)
    print("machine ceilings ...", flush=True)
    ceiling = ceilings()

    from report_md import render, summarise
    rows = summarise(variants)
    results = {"quick": args.quick, "rounds": rounds, "environment": environment(), "ceilings": ceiling,
               "eval": eval_cfg.__dict__, "seconds": time.perf_counter() - t0, "rows": rows,
               "flows": {"optimum": context["optimum"][2]} if "optimum" in context else {},
               "recipes": {k: {"wall_s": v["wall_s"], "out": str(WORK / k)} for k, v in context.items()
                           if isinstance(v, dict)}}
    results = run.write(WORK / "results.json", results)
    if not args.quick:  # what RESULTS.md renders, kept beside the other results files
        shutil.copyfile(WORK / "results.json", ROOT / "benchmarks" / "results" / "peers.json")
    Path(args.results).write_text(render(results))
    print(f"wrote {args.results} and {WORK / 'results.json'} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
