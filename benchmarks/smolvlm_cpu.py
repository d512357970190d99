"""`recipes/smolvlm-cpu.yaml` end to end on a SmolVLM-256M-shaped folder and a small local VQA set, as a user runs
the template: a local folder, an image folder of questions and answers, `vlmedge compress` with `--set` overrides.

    python benchmarks/smolvlm_cpu.py MODEL_FOLDER runs/smolvlm-cpu [--images 240] [--set key=value ...] [--quick]

MODEL_FOLDER is a SmolVLM-shaped Hugging Face folder (e.g. `runs/peers256/model` from `peers/smolvlm_peers.py`, or
`runs/b256/model` from `smolvlm_256m.py`). The VQA set: shapes scenes written as PNG files with a `metadata.jsonl` of
file_name / question / answer (the layout the template documents), split by vlmedge as for any image folder. Extra
`--set` values go to `vlmedge compress` unchanged (e.g. fewer distillation steps: at 256M on 2 cores the template's
500 steps of 16 x 4 take hours). Prints and writes OUT/wall.json: the wall time, the overrides, and per step its
seconds, metrics, size, compression and speedup, and the gates' verdicts. `--quick` (the suite's check of the
script, on a tiny SmolVLM-architecture folder): 16 images and every stage cut to a step or two (QUICK).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402

QUICK = ["eval.vqa_questions=4", "eval.max_new_tokens=4", "stages.prune.batch_size=2",
         "stages.prune.calibration_batches=1", "stages.distill.steps=2", "stages.distill.batch_size=4",
         "stages.distill.grad_accum=1", "stages.quantize.block_size=16", "stages.quantize.calibration_batches=1",
         "stages.quantize.batch_size=2", "stages.quantize.agreement_questions=2", "measure.warmup=1",
         "measure.min_runs=3", "measure.min_seconds=0", "targets=[cpu]", "gates=[]"]
"""`--quick`'s overrides, before the user's own `--set`s."""


def vqa_folder(out: Path, images: int) -> Path:
    """`images` shapes scenes (128 px PNG) with one question and answer each, as an image folder."""
    import numpy as np
    from PIL import Image

    from vlmedge.families.generative.data import open_vqa

    if (out / "metadata.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    ds = open_vqa(f"shapes:{images}", "train", resolution=128, seed=0)
    pairs, _ = ds.training_captions(range(images), np.random.default_rng(0))
    rows = []
    for i, (question, answer) in enumerate(pairs[:images]):
        Image.fromarray(ds.images([i])[0]).save(out / f"{i:04d}.png")
        rows.append(json.dumps({"file_name": f"{i:04d}.png", "question": question, "answer": answer}))
    (out / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return out


def summary(report: Path) -> dict:
    """Per step its seconds (stage, eval), metrics, size, compression and speedup against the teacher; the gates."""
    if not report.is_file():
        return {}
    r = json.loads(report.read_text())
    keys = ("name", "seconds", "metrics", "size_bytes", "compression", "speedup_vs_teacher")
    return {"steps": [{k: s.get(k) for k in keys} for s in r["steps"]], "gates": r.get("gates")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--quick", action="store_true", help="16 images, every stage a step or two: checks the script")
    a = ap.parse_args()
    run = Provenance.start()
    images = min(a.images, 16) if a.quick else a.images
    data = vqa_folder(a.out.parent / f"{a.out.name}-vqa", images)
    sets = [f"model.path={a.model.resolve()}", f"data.source={data.resolve()}", *(QUICK if a.quick else []), *a.sets]
    cmd = [sys.executable, "-m", "vlmedge", "compress", str(ROOT / "recipes/smolvlm-cpu.yaml"), "--out", str(a.out)]
    for s in sets:
        cmd += ["--set", s]
    print(" ".join(cmd), flush=True)
    t = time.perf_counter()
    code = subprocess.run(cmd).returncode
    wall = time.perf_counter() - t
    record = {"wall_s": round(wall, 1), "returncode": code, "sets": sets, "images": images,
              **summary(a.out / "report.json")}
    a.out.mkdir(parents=True, exist_ok=True)
    run.write(a.out / "wall.json", record)
    print(json.dumps({k: v for k, v in record.items() if k != "steps"}, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main())
