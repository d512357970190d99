"""A SmolVLM-256M-shaped folder (or, with --size, the 500M's or the 2.2B's) at full size through vlmedge: load,
export, parity, quantize (INT8 dynamic, INT4 MatMulNBits, FP16, mixed), each step's time and peak RSS against the
issue's memory goal (2 x the fp32 weights + 1.5 GiB), and every form timed against PyTorch eager in interleaved rounds.

Its published sizes (vision 768 wide, 12 layers, 512 px, patch 16, pixel shuffle 4 -> 64 image tokens; a 30-layer
576-wide Llama, 9 query and 3 key/value heads), random weights and a byte-level BPE tokenizer of the published
vocabulary size (49152, trained on local text: `peers/smolvlm_peers.bpe_tokenizer`; no hub access here), so the
decoder's vocabulary-wide head and embedding are the real size too. Run from the repository root:

    python benchmarks/smolvlm_256m.py runs/smolvlm-256m [--size 500m] [--forms int8,int4-acc4] [--rounds 3] [--quick]

writes DIR/model, DIR/onnx (`vlmedge export` with no flags but --no-eval), DIR/<form> (`vlmedge quantize` with no
flags but --no-eval and the form's) and DIR/results.json (the published shapes: `tests/test_generative.SMOLVLM_SHAPES`)
(export sizes, parity, each form's size and latency, the 16-token answer p90 ratio of eager to the best form, and
this CPU's ceilings measured in every round: fp32 and int8 GEMM at the vision MLP's shape through ONNX Runtime,
memory bandwidth; per form the vision encoder's GOP/s and share of the ceiling, the prefill in decode steps (the
decoder's prefill timed on its own, and TTFT minus vision), the
decode step against its weights' bytes / bandwidth). Timed on one 512 px frame (`--image-splitting off`, the
figures of the issues) unless told otherwise. Its weights are random: latency and size only. `--quick` (the suite's
check of the script): 1 vision and 1 decoder layer, a 1000-token vocabulary, the INT8 form, one round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from generative import time_interleaved  # noqa: E402  (the peers' interleaved timing)
from provenance import Provenance  # noqa: E402
from smolvlm_peers import bpe_tokenizer  # noqa: E402  (a tokenizer of the published vocabulary size)
from test_generative import SMOLVLM_SHAPES, smolvlm_folder  # noqa: E402  (the suite's builder, at full depth here)

from vlmedge import families  # noqa: E402


def vlmedge(*args: str) -> dict[str, float]:
    """Run a vlmedge command; its wall seconds and its process's peak RSS (GiB), and its exit code where it failed
    (-9: killed, e.g. out of memory)."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "vlmedge", *args], cwd=ROOT)
    _, status, usage = os.wait4(p.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return {"s": round(time.perf_counter() - t, 1), "peak_rss_gib": round(usage.ru_maxrss / 2 ** 20, 2),
            **({"failed": code} if code else {})}


class Steps(dict):
    """Each step's record, kept in DIR/steps.json as it completes, so that a rerun (which skips what is done) still
    reports the steps an earlier run measured."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.is_file() else {})
        self.path = path

    def run(self, name: str, done: Path, *args: str) -> None:
        if not done.is_file():
            self[name] = vlmedge(*args)
            self.path.write_text(json.dumps(self, indent=1))


FORMS = {"int8": ["--mode", "dynamic"],
         "int4": ["--mode", "int4", "--graph", "vision=dynamic", "--block-size", "32"],
         "int4-acc4": ["--mode", "int4", "--graph", "vision=dynamic", "--block-size", "32", "--accuracy-level", "4"],
         "mixed": ["--mode", "mixed", "--block-size", "32", "--accuracy-level", "4"],
         "fp16": ["--mode", "fp16"]}


def main(out: Path, rounds: int = 3, forms: tuple[str, ...] = tuple(FORMS), splitting: str = "off",
         quick: bool = False, size: str = "256m", steps_only: bool = False) -> int:
    run = Provenance.start()
    out.mkdir(parents=True, exist_ok=True)
    model, onnx_dir = out / "model", out / "onnx"
    t0 = time.perf_counter()
    if not (model / "config.json").is_file():
        model.mkdir(exist_ok=True)
        smolvlm_folder(model, size, vision_layers=1 if quick else None, text_layers=1 if quick else None,
                       tokenizer=bpe_tokenizer(1000, files=40) if quick else bpe_tokenizer())
    weights = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    steps = Steps(out / "steps.json")
    steps.setdefault("build", {"s": round(time.perf_counter() - t0, 1)})
    steps.run("export", onnx_dir / "manifest.json", "export", str(model), "--out", str(onnx_dir), "--no-eval",
              *(("--no-tune-threads", "--parity-questions", "2") if quick else ()))
    for name in forms if (onnx_dir / "manifest.json").is_file() else ():
        # quick: 2 x 2 calibration images and no answer agreement (a one-layer model's answers say nothing)
        steps.run(f"quantize {name}", out / name / "manifest.json", "quantize", str(onnx_dir), "--out",
                  str(out / name), "--no-eval", *FORMS[name],
                  *(("--no-tune-threads", "--agreement-questions", "0", "--calibration-batches", "2", "--batch-size",
                     "2") if quick else ()))
    goal = 2 * weights / 2 ** 30 + 1.5
    for step in steps.values():
        if "peak_rss_gib" in step:
            step["within_goal"] = step["peak_rss_gib"] <= goal
    failed = [k for k, v in steps.items() if "failed" in v]
    if not (onnx_dir / "manifest.json").is_file():  # the export failed: its record is the result
        run.write(out / "results.json", {"size": size, "steps": dict(steps), "failed": failed, "quick": quick})
        return 1
    parameters = json.loads((onnx_dir / "manifest.json").read_text())["parameters"]
    results = {"size": size, "shape": SMOLVLM_SHAPES[size], "parameters": parameters,
               "fp32_weights_gib": round(weights / 2 ** 30, 3), "memory_goal_gib": round(goal, 2),
               "steps": dict(steps), "failed": failed,
               "seconds_per_billion_parameters": {k: round(v["s"] / parameters * 1e9, 1) for k, v in steps.items()
                                                  if k != "build" and "failed" not in v}}
    if not steps_only and not failed:
        results.update(interleaved(model, {"fp32": onnx_dir, **{n: out / n for n in forms}}, rounds, splitting,
                                   quick))
    run.write(out / "results.json", {**results, "quick": quick})
    print(json.dumps({k: v for k, v in results.items() if k != "forms"}, indent=2))
    return 0


def work(model) -> dict[str, float]:
    """GOP of one frame through the vision encoder, split into its linears (the int8 kernels of a quantized form)
    and its attention products (fp32 in every form), counted by the family (`vision_flops`)."""
    from vlmedge.families.generative.model import vision_flops

    vision = model.model.model.vision_model
    flops = vision_flops(vision, model.model.config.text_config.hidden_size)
    return {"vision_gop": sum(flops.values()) / 1e9, "vision_attention_gop": flops["attention"] / 1e9,
            "vision_linear_gop": flops["linear"] / 1e9, "patches": vision.embeddings.num_patches}


def interleaved(model: Path, folders: dict[str, Path], rounds: int, splitting: str, quick: bool = False) -> dict:
    """PyTorch eager and every ONNX form, each once per round (vision, ttft, decode, 16-token answer; 2 threads),
    p50 / p90 as the median over rounds, and this CPU's ceilings measured in each round (GEMM at the vision's
    linear shape, fp32 and int8; memory bandwidth): per form the vision encoder's GOP/s and its share of the
    ceiling (its linears at the int8 ceiling when they are int8, attention at the fp32 ceiling), the prefill in
    decode steps (prefill / decode; and (ttft - vision) / decode, which carries the vision's spread) and the decode
    step against its weight bytes / bandwidth. `quick`: a tenth of the time per figure, no warm-up."""
    import numpy as np
    import torch
    from ceilings import bandwidth, gemm

    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.runtime.onnx import onnx_size, read_manifest

    torch.set_num_threads(2)
    family = families.of(model)
    vlm = family.load(model)
    seconds = 0.1 if quick else 1.0  # per ceiling; half of it per scenario
    # at least 3 runs and half a second per scenario: the short ones (prefill, decode) get a dozen samples or more
    cfg = families.configure(MeasureConfig, {"warmup": 0 if quick else 1, "min_runs": 2 if quick else 3,
                                             "min_seconds": seconds / 2, "threads": 2,
                                             "image_splitting": splitting}, family)
    inputs = family.latency_inputs(family.adapter(folders["fp32"], image_splitting=splitting, open_sessions=False), 1)
    w = work(vlm)
    width = vlm.model.config.vision_config.hidden_size
    ceilings: list[dict[str, float]] = []  # at the vision MLP's shape: patches x width x 4 width
    table = time_interleaved(family, {"torch eager fp32": vlm}, folders, inputs, cfg, rounds,
                             between=lambda: ceilings.append({**gemm(w["patches"], width, 4 * width, 2, seconds),
                                                              "bandwidth_gbps": bandwidth(256, seconds)}))
    ceiling = {k: float(np.median([c[k] for c in ceilings])) for k in ceilings[0]}
    for name, row in table.items():
        folder = folders.get(name)
        m = read_manifest(folder) if folder else {}
        int8_vision = (m.get("quantization") or {}).get("graphs", {}).get("vision") in ("dynamic", "static")
        ideal_s = (w["vision_linear_gop"] / (ceiling["int8_gops"] if int8_vision else ceiling["fp32_gflops"])
                   + w["vision_attention_gop"] / ceiling["fp32_gflops"])
        vision_s = row["vision"]["p50_ms"] / 1e3
        row.update({"vision_gops": w["vision_gop"] / vision_s, "vision_share_of_ceiling": ideal_s / vision_s,
                    "prefill_decode_steps": row["prefill"]["p50_ms"] / row["decode"]["p50_ms"],
                    "ttft_minus_vision_decode_steps":
                        (row["ttft"]["p50_ms"] - row["vision"]["p50_ms"]) / row["decode"]["p50_ms"]})
        if folder:
            decoder = folder / m["files"]["decoder"]
            weights = sum(f.stat().st_size for f in decoder.parent.glob(decoder.name + "*"))
            row.update({"size_bytes": onnx_size(folder), "precision": m.get("precision"),
                        "graphs": (m.get("quantization") or {}).get("graphs"), "decoder_bytes": weights,
                        "decode_bound_ms": weights / (ceiling["bandwidth_gbps"] * 1e9) * 1e3})
    best = min(folders, key=lambda n: table[n]["answer"]["p90_ms"])
    return {"threads": 2, "rounds": rounds, "image_splitting": splitting,
            "measure": {k: getattr(cfg, k) for k in ("warmup", "min_runs", "min_seconds")}, "ceilings": ceiling,
            "ceilings_per_round": ceilings, "work": w,
            "forms": table, "best_form": best,
            "answer_p90_eager_over_best": table["torch eager fp32"]["answer"]["p90_ms"] /
            table[best]["answer"]["p90_ms"]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/smolvlm-256m"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated, of {', '.join(FORMS)}")
    ap.add_argument("--image-splitting", default="off", choices=("on", "off", "as-folder"),
                    help="off (default): one 512 px frame, the figures of the issue; on: a 1024x768 image in tiles")
    ap.add_argument("--size", default="256m", choices=tuple(SMOLVLM_SHAPES),
                    help="the published SmolVLM whose shape the folder takes (default 256m)")
    ap.add_argument("--steps-only", action="store_true",
                    help="build, export and quantize (time and peak RSS of each) without the interleaved timing")
    ap.add_argument("--quick", action="store_true",
                    help="1 vision and 1 decoder layer, a small vocabulary, INT8, one round: checks the script")
    a = ap.parse_args()
    if a.quick:
        a.forms, a.rounds = "int8", 1
    chosen = tuple(f for f in a.forms.split(",") if f)
    unknown = [f for f in chosen if f not in FORMS]
    if unknown:
        ap.error(f"--forms: unknown {', '.join(unknown)}; expected some of {', '.join(FORMS)}")
    sys.exit(main(a.out, a.rounds, chosen, a.image_splitting, a.quick, a.size, a.steps_only))
