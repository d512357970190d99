"""The generative family against what users would do otherwise: same model, same questions, one harness.

    python benchmarks/peers/generative.py RUN_DIR [--questions 700] [--rounds 5] [--optimum-python PY] [--quick]

RUN_DIR is a finished `vlmedge compress recipes/vqa-quickstart.yaml` run: its teacher (a SmolVLM-architecture model
folder), its fp32 export and its final artifact. Rows:

* PyTorch eager fp32: Hugging Face `generate` with its KV cache (vlmedge's `torch` scenarios), of the teacher and of
  the distilled student (the model the exports hold);
* `torch.ao.quantization.quantize_dynamic` of each (Linear -> dynamic INT8), same `generate`;
* ONNX Runtime's own n-bit quantizer run by hand on vlmedge's fp32 export (`MatMulNBitsQuantizer` on the decoder
  and the embedding with its documented defaults, block 128, symmetric, accuracy level 4): the like-for-like INT4;
* Optimum (`optimum-cli export onnx --task image-text-to-text` + ORTQuantizer) in its own environment when
  `--optimum-python` is given: its exact error and versions are recorded when it cannot export the model;
* vlmedge: the fp32 export (of the student) and the recipe's final artifact.

"answer p90 vs eager" divides the teacher's eager answer p90 by the row's.

Accuracy: vlmedge's evaluator on the same held-out questions for every row. Latency: batch 1, the vision / ttft /
decode / 16-token answer scenarios, every row once per round (interleaved: drift on this shared machine hits all
alike), p50 and p90 as the median over rounds. Writes RUN_DIR/peers.json and prints a Markdown table. `--quick`
(the suite's check of the script, on a tiny run): 8 questions, one round, a few timing runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402


def _steps(run: Path) -> dict[str, dict]:
    report = json.loads((run / "report.json").read_text())
    return {s["name"]: s for s in report["steps"]}


def _nbits_by_hand(export: Path, out: Path) -> Path:
    """vlmedge's fp32 export with its decoder and embedding quantized by ORT's MatMulNBitsQuantizer directly."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(export, out)
    files = json.loads((export / "manifest.json").read_text())["files"]  # onnx/... in the onnx-community layout
    for name, types in ((files["decoder"], ("MatMul",)), (files["embed"], ("Gather",))):
        q = MatMulNBitsQuantizer(onnx.load(str(export / name)), block_size=128, is_symmetric=True, accuracy_level=4,
                                 op_types_to_quantize=types)
        q.process()
        q.model.save_model_to_file(str(out / name), use_external_data_format=False)
    return out


SCENARIOS = ("vision", "prefill", "ttft", "decode", "answer")  # prefill: vlmedge's and eager's records only


def time_interleaved(family, models: dict, folders: dict, inputs, cfg, rounds: int, between=None, extra=None
                     ) -> dict[str, dict]:
    """Each PyTorch model (HF `generate`, the `torch` scenarios), each ONNX folder and each of `extra` (name -> a
    callable returning the same record, e.g. a peer timed in its own environment) once per round, `rounds` rounds:
    name -> {scenario: {p50_ms, p90_ms, by_round}, tokens_per_s}, each the median over the rounds (by_round: each
    round's figures, for the spread). `between()` runs at the
    start of every round (a ceiling measured alongside)."""
    import torch

    timers = {name: (lambda m=m: family.time_scenarios(family.torch_scenarios(m, inputs, "cpu", torch.float32), cfg,
                                                       {})) for name, m in models.items()}
    timers.update({name: (lambda f=f: family.onnx_latency(f, cfg, ["CPUExecutionProvider"]))
                   for name, f in folders.items()})
    timers.update(extra or {})
    recs: dict[str, list[dict]] = {name: [] for name in timers}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        if between is not None:
            between()
        for name, fn in timers.items():
            recs[name].append(fn())
    return {name: {**{sc: {**{f"{p}_ms": float(np.median([x[sc][f"{p}_ms"] for x in rs])) for p in ("p50", "p90")},
                           "by_round": {f"{p}_ms": [float(x[sc][f"{p}_ms"]) for x in rs] for p in ("p50", "p90")}}
                      for sc in SCENARIOS if all(sc in x for x in rs)},
                   "tokens_per_s": float(np.median([x["tokens_per_s"] for x in rs]))} for name, rs in recs.items()}


def _optimum(python: str, teacher: Path, out: Path) -> dict:
    """Optimum's documented export of the model in its own environment; its result or its exact error."""
    cli = str(Path(python).parent / "optimum-cli")
    versions = subprocess.run([python, "-c", "import optimum.version, transformers, onnxruntime; print("
                               "optimum.version.__version__, transformers.__version__, onnxruntime.__version__)"],
                              capture_output=True, text=True).stdout.split()
    p = subprocess.run([cli, "export", "onnx", "--model", str(teacher), "--task", "image-text-to-text", str(out)],
                       capture_output=True, text=True)
    error = None
    if p.returncode:
        lines = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
    return {"versions": dict(zip(("optimum", "transformers", "onnxruntime"), versions)), "returncode": p.returncode,
            "error": error}


def markdown(rows: dict[str, dict]) -> str:
    """The rows as the table benchmarks/tables.py puts in the docs."""
    lines = ["| row | VQA acc | size MB | vision p50 | TTFT p50 | decode/token p50 | answer p50 / p90 ms | tokens/s | "
             "answer p90 vs eager |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "latency" not in r:
            lines.append(f"| {name} | failed: {r.get('optimum', {}).get('error')} | | | | | | | |")
            continue
        lat = r["latency"]
        lines.append(f"| {name} | {r['metrics']['vqa.accuracy']:.3f} | {(r['size_bytes'] or 0) / 1e6:.2f} | "
                     f"{lat['vision']['p50_ms']:.2f} | {lat['ttft']['p50_ms']:.2f} | {lat['decode']['p50_ms']:.2f} | "
                     f"{lat['answer']['p50_ms']:.2f} / {lat['answer']['p90_ms']:.2f} | {lat['tokens_per_s']:.0f} | "
                     f"{r['answer_p90_speedup_vs_eager']:.2f}x |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--questions", type=int, default=700)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--optimum-python", help="python of an environment with optimum-onnx (benchmarks/peers/envs.sh)")
    ap.add_argument("--quick", action="store_true", help="8 questions, one round, few timing runs: checks the script")
    args = ap.parse_args()
    if args.quick:
        args.questions, args.rounds = min(args.questions, 8), 1
    run = Provenance.start()

    import torch

    from vlmedge import families
    from vlmedge.evaluate import EvalConfig, flat_metrics
    from vlmedge.families.generative import TorchGenerator
    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.runtime.onnx import onnx_size

    torch.set_num_threads(2)
    steps = _steps(args.run)
    teacher, export = Path(steps["teacher"]["path"]), Path(steps["export"]["path"])
    final = Path(list(steps.values())[-1]["path"])
    family = families.of(teacher)
    work = args.run / "peers"
    work.mkdir(exist_ok=True)
    rows: dict[str, dict] = {}

    student = Path(next(s["path"] for s in steps.values() if s["id"] == steps["export"]["parent"]))
    folder_size = lambda p: sum(f.stat().st_size for f in Path(p).glob("*.safetensors"))  # noqa: E731
    torch_rows = {}
    for label, folder in (("teacher", teacher), ("student", student)):  # the student: what the exports hold
        vlm = family.load(folder)
        ao = dataclasses.replace(vlm, model=torch.ao.quantization.quantize_dynamic(
            family.load(folder).model, {torch.nn.Linear}, dtype=torch.qint8))
        torch_rows[f"PyTorch eager fp32 (HF generate), {label}"] = (vlm, folder_size(folder))
        torch_rows[f"torch.ao dynamic INT8 (HF generate), {label}"] = (ao, None)
    nbits = _nbits_by_hand(export, work / "ort-nbits")
    onnx_rows = {"ONNX Runtime n-bit quantizer by hand (INT4 decoder + embedding)": nbits,
                 "vlmedge fp32 export": export, f"vlmedge recipe ({list(steps)[-1]})": final}
    if args.optimum_python:
        rows["Optimum export + ORTQuantizer"] = {"optimum": _optimum(args.optimum_python, teacher,
                                                                     work / "optimum")}
    eval_cfg = families.configure(EvalConfig, {"vqa_questions": args.questions}, family)
    for name, (model, size) in torch_rows.items():
        t0 = time.perf_counter()
        rows[name] = {"metrics": flat_metrics(family.evaluate(TorchGenerator(model), eval_cfg)), "size_bytes": size,
                      "eval_s": time.perf_counter() - t0}
    for name, folder in onnx_rows.items():
        t0 = time.perf_counter()
        rows[name] = {"metrics": flat_metrics(family.evaluate(family.adapter(folder), eval_cfg)),
                      "size_bytes": onnx_size(folder), "eval_s": time.perf_counter() - t0}
    for name, (model, size) in torch_rows.items():
        if size is None:  # torch.ao: its weights as torch saves them (int8 packed)
            import io

            buf = io.BytesIO()
            torch.save(model.model.state_dict(), buf)
            rows[name]["size_bytes"] = buf.tell()

    cfg = MeasureConfig(warmup=1, min_runs=3, min_seconds=0.0) if args.quick else \
        MeasureConfig(warmup=3, min_runs=20, min_seconds=0.5)
    inputs = family.latency_inputs(family.adapter(export), 1)
    latency = time_interleaved(family, {name: m for name, (m, _) in torch_rows.items()}, onnx_rows, inputs, cfg,
                               args.rounds)
    for name, lat in latency.items():
        rows[name]["latency"] = lat
    eager = rows["PyTorch eager fp32 (HF generate), teacher"]["latency"]["answer"]["p90_ms"]
    for row in rows.values():
        if "latency" in row:
            row["answer_p90_speedup_vs_eager"] = eager / row["latency"]["answer"]["p90_ms"]
    ours = rows[f"vlmedge recipe ({list(steps)[-1]})"]
    peers = {n: r for n, r in rows.items() if "latency" in r and not n.startswith("vlmedge")
             and r["metrics"]["vqa.accuracy"] >= ours["metrics"]["vqa.accuracy"] - 1e-9}
    result = {"run": str(args.run), "questions": args.questions, "rounds": args.rounds, "quick": args.quick,
              "measure": dataclasses.asdict(cfg), "rows": rows, "best_peer_at_equal_or_better_accuracy": None}
    if peers:
        best = min(peers, key=lambda n: peers[n]["latency"]["answer"]["p90_ms"])
        result["best_peer_at_equal_or_better_accuracy"] = {
            "name": best, "ratio_answer_p90": peers[best]["latency"]["answer"]["p90_ms"] /
            ours["latency"]["answer"]["p90_ms"]}
    run.write(args.run / "peers.json", result)
    print(markdown(rows))
    print(json.dumps(result["best_peer_at_equal_or_better_accuracy"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
