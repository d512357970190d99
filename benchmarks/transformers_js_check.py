"""A generative export at its real size as transformers.js loads it: the folder as written, in Node (onnxruntime-node,
`tests/js`, no hub), its greedy tokens against vlmedge's runtime on the same pixels (the suite checks this on tiny
models, `tests/test_transformers_js.py`; a 2.2B decoder is GroupQueryAttention over 32 key/value heads, a
vocabulary-wide head and a graph of more than a gigabyte, which only a real-sized folder exercises).

Held-out shapes scenes at the latency scenarios' camera size (1024 x 768) with their questions; transformers.js
processes each (its processor from the folder), writes its pixels and `--tokens` greedy tokens (EOS ignored), and
vlmedge's runtime (`OnnxGenerator`) answers from those pixels and its own prompt ids. The two processors resample
differently (transformers.js bilinearly on floats, vlmedge with PIL), so the graphs are compared on transformers.js's
pixels and the processors by their mean difference. The dtype transformers.js loads is each graph's by its file's
suffix (the onnx-community names: `_quantized` q8, `_q4` q4, none fp32).

    python benchmarks/transformers_js_check.py FOLDER [--questions 4] [--tokens 16] [--out FILE] [--quick]

FOLDER: a vlmedge export of a generative model, e.g. runs/peers2.2bx3/vlmedge-int8 (a folder whose answers depend
on the question: `peers/smolvlm_peers.py --text-scale 3`). Writes FILE (default FOLDER/transformers-js.json): per
question whether the prompt ids and the tokens are identical, the first token that differs, and each runtime's wall
seconds. Needs Node and `tests/js/node_modules` (`cd tests/js && npm ci --ignore-scripts`); without them the
results say so and the exit code is 2. `--quick` (the suite's check): 2 questions, 4 tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402

JS = ROOT / "tests" / "js"
JS_DTYPE = {"fp32": "fp32", "dynamic": "q8", "static": "int8", "int4": "q4", "fp16": "fp16"}
"""vlmedge's quantization mode of a graph (its file suffix, `runtime.onnx.DTYPE_SUFFIX`) -> transformers.js's dtype."""


def dtypes(manifest: dict) -> str | dict[str, str]:
    """transformers.js's `dtype` for the folder: one name where every graph has the same, else per graph file."""
    from vlmedge.runtime.onnx import DTYPE_SUFFIX

    by_suffix = {suffix: JS_DTYPE[mode] for mode, suffix in DTYPE_SUFFIX.items() if suffix}
    out = {}
    for path in manifest["files"].values():
        stem = Path(path).stem
        suffix = next((s for s in by_suffix if stem.endswith(s)), "")
        out[stem[:len(stem) - len(suffix)]] = by_suffix.get(suffix, "fp32")
    return next(iter(out.values())) if len(set(out.values())) == 1 else out


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a vlmedge export of a generative model")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16, help="greedy tokens per question (EOS ignored)")
    ap.add_argument("--out", type=Path, help="the results file (default: FOLDER/transformers-js.json)")
    ap.add_argument("--quick", action="store_true", help="2 questions, 4 tokens: checks the script")
    a = ap.parse_args()
    prov = Provenance.start()
    questions, tokens = (min(a.questions, 2), min(a.tokens, 4)) if a.quick else (a.questions, a.tokens)
    out = a.out or a.folder / "transformers-js.json"
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@huggingface" / "transformers").is_dir():
        prov.write(out, {"folder": str(a.folder), "quick": a.quick,
                         "left_out": "needs Node and tests/js/node_modules (cd tests/js && npm ci --ignore-scripts)"})
        print(f"error: transformers.js is not installed here (see {out})", file=sys.stderr)
        return 2
    from PIL import Image

    from vlmedge.errors import VlmedgeError
    from vlmedge.families.generative import LATENCY_IMAGE, OnnxGenerator
    from vlmedge.families.generative.data import open_vqa

    try:  # the folder checked before Node runs; its sessions opened after (one runtime's weights in memory at a time)
        dtype = dtypes(OnnxGenerator(a.folder, open_sessions=False).manifest)
    except VlmedgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = open_vqa("shapes:64", "val", resolution=64, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = {"dtypes": [dtype], "max_new_tokens": tokens, "ignore_eos": True, "pixels_dir": tmp, "items": []}
        for k, item in enumerate(data.eval_items(questions, 0)):
            path = Path(tmp) / f"{k}.png"
            Image.fromarray(data.images([item.index])[0]).resize(LATENCY_IMAGE, Image.BICUBIC).save(path)
            jobs["items"].append({"image": str(path), "question": item.question})
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        t0 = time.perf_counter()
        p = subprocess.run([node, str(JS / "generate.mjs"), str(a.folder.resolve()), str(Path(tmp) / "jobs.json")],
                           cwd=JS, capture_output=True, text=True)
        js_seconds = time.perf_counter() - t0
        if p.returncode:
            lines = p.stderr.strip().splitlines()
            print(f"error: transformers.js could not answer from {a.folder}: {lines[-1] if lines else p.returncode}",
                  file=sys.stderr)
            return 1
        # one dtype asked: its answers are the only entry (generate.mjs keys them by the dtype it was given)
        got = next(iter(json.loads(p.stdout.strip().splitlines()[-1]).values()))
        ours = OnnxGenerator(a.folder)
        rows, t0 = [], time.perf_counter()
        for k, (job, answer) in enumerate(zip(jobs["items"], got)):
            frames, prompt = ours.inputs(Image.open(job["image"]), job["question"])
            theirs = np.fromfile(Path(tmp) / f"{k}.f32", dtype="<f4").reshape(answer["pixels"])[0]
            ids = ours.runtime.generate(theirs, prompt, tokens, stop_at_eos=False)
            same_shape = theirs.shape == frames.shape
            rows.append({"question": job["question"], "prompt_identical": answer["prompt"] == prompt,
                         "tokens_identical": answer["ids"] == ids, "ids": ids,
                         "first_difference": first_difference(answer["ids"], ids), "frames": list(theirs.shape),
                         "pixels_mean_abs_diff": round(float(np.abs(theirs - frames).mean()), 4) if same_shape
                         else None})
        ours_seconds = time.perf_counter() - t0
    results = {"folder": str(a.folder), "quick": a.quick, "dtype": dtype, "tokens": tokens, "questions": rows,
               "identical": sum(r["prompt_identical"] and r["tokens_identical"] for r in rows), "of": len(rows),
               "distinct_answers": len({tuple(r["ids"]) for r in rows}),
               "seconds": {"transformers.js (load and answer)": round(js_seconds, 1),
                           "vlmedge (answer)": round(ours_seconds, 1)}}
    full = prov.write(out, results)
    print(json.dumps({k: v for k, v in full.items() if k not in ("provenance", "questions")}, indent=2))
    return 0 if results["identical"] == results["of"] else 1


if __name__ == "__main__":
    sys.exit(main())
