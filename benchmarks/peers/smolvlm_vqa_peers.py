"""VQA accuracy of vlmedge's forms and OpenVINO's on a trained SmolVLM-architecture folder, on the same held-out
shapes questions and pixels: the accuracy half of the peers comparison, which random weights cannot give.

    bash benchmarks/peers/envs.sh env-openvino llama.cpp      # once (as for smolvlm_peers.py)
    vlmedge train --preset small --steps 300 --data shapes --data-count 20000 --out runs/vqapeers/dual
    vlmedge train --preset vqa-wide --data shapes --data-count 20000 --vision-init runs/vqapeers/dual \
        --out runs/vqapeers/model                            # vqa-quickstart's teacher, 9 minutes here
    python benchmarks/peers/smolvlm_vqa_peers.py runs/vqapeers/model runs/vqapeers [--questions 280]

Rows: PyTorch eager fp32, vlmedge's fp32 export, INT8 dynamic and INT4 (accuracy level 4, vision INT8), OpenVINO
fp32 (f32 inference: its own prompt and pixel path before any quantization), int8 (8-bit weights, static int8
vision calibrated on 16 training scenes) and int4 (4-bit weights, group 32), and
OpenVINO int8 with the f32 inference hint, llama.cpp F32, Q8_0 and Q4_K_M (mmproj Q8_0; its own prompt and image
path, `llama-mtmd-cli`). Every row answers the same questions on the same images at the model's
resolution with up to 16 greedy tokens, stopping at the end-of-utterance token and scored by vlmedge's VQA score
(`evaluate.vqa.vqa_score`); agreement is the count of answers identical to eager's. Where a peer's converter
refuses the folder, the row says so (its own message is in the log); where a peer's environment is not built, its
rows are left out and `errors` says so; `--no-peers` leaves them out too. Writes OUT/vqa-results.json. `--quick`
(a check of the script): 8 questions, vlmedge's INT8 form and, where its environment is built, OpenVINO's only (the
suite adds `--no-peers`: CI builds no peer environment, and OpenVINO's export alone took half a minute here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import Provenance  # noqa: E402
from smolvlm_peers import (llama_forms, llama_run, log, openvino_answers, openvino_forms, peer_missing,  # noqa: E402
                           peer_ready, vlmedge_forms)

from vlmedge.families.generative import ANSWER_TOKENS  # noqa: E402


def write_questions(out: Path, image_size: int, questions: int) -> tuple[list, Path, Path]:
    """Held-out items (as vlmedge's evaluation draws them), their images as PNG at the model's size, the prompts
    file the peers read, and 16 training scenes for OpenVINO's calibration."""
    from PIL import Image

    from vlmedge.families.generative.data import open_vqa

    folder = out / "vqa-prompts"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n, name in (("val", questions, "eval"), ("train", 16, "calibration")):
        ds = open_vqa("shapes", split, resolution=image_size, count=n, seed=0)
        rows = []
        for k, it in enumerate(ds.eval_items(n, 0)):
            path = folder / f"{name}-{k:04d}.png"
            Image.fromarray(ds.images([it.index])[0]).save(path)
            rows.append({"image": str(path.resolve()), "question": it.question, "answers": list(it.answers),
                         "type": it.type})
        (folder / f"{name}.json").write_text(json.dumps(rows, indent=1))
        written[name] = rows
    return written["eval"], folder / "eval.json", folder / "calibration.json"


def main(model: Path, out: Path, questions: int, threads: int = 2, quick: bool = False, peers: bool = True) -> int:
    import numpy as np
    import torch
    from PIL import Image

    from vlmedge import families
    from vlmedge.families.generative.model import decode_answer
    from vlmedge.families.generative.tasks import vqa_score

    run = Provenance.start()
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf"  # the model folder as the peers read it
    if not (hf / "config.json").is_file():
        shutil.copytree(model, hf, dirs_exist_ok=True)
        peer_ready(hf)
    family = families.of(model)
    eager = family.adapter(model)
    items, prompts, calibration = write_questions(out, eager.preprocess.image_size, questions)
    folders = vlmedge_forms(model, out, ("int8",) if quick else ("int8", "int4-acc4"), quick)
    answers: dict[str, list[str]] = {}
    for name, adapter in {"torch eager fp32": eager,
                          **{n: family.adapter(f, threads=threads) for n, f in folders.items()}}.items():
        log(f"{name}: {len(items)} questions")
        answers[name] = [adapter.answer(Image.open(it["image"]).convert("RGB"), it["question"], ANSWER_TOKENS)
                         for it in items]
    tokenizer, eos = eager.tokenizer, eager.eos_id
    errors = {}
    ov, llama = {}, {}
    setup = "not built: run `bash benchmarks/peers/envs.sh env-openvino llama.cpp` first"
    skipped = "left out (--no-peers)"
    if not peers or peer_missing("openvino"):
        errors["openvino"] = f"{peer_missing('openvino')} {setup}" if peers else skipped
    else:
        try:  # OpenVINO's fp32 too: what its own prompt and pixel path give before any quantization
            ov = openvino_forms(hf, out, calibration, ("int8",) if quick else ("fp32", "int8", "int4"))
        except RuntimeError as e:
            errors["openvino"] = str(e)
    for name, (folder, precision) in ov.items():
        log(f"{name}: {len(items)} questions")
        try:
            answers[name] = [decode_answer(tokenizer, ids, eos)
                             for ids in openvino_answers(folder, prompts, threads, precision, until_eos=True)]
        except RuntimeError as e:
            errors[name] = str(e)
    if not peers or peer_missing("llama.cpp"):
        errors["llama.cpp"] = f"{peer_missing('llama.cpp')} {setup}" if peers else skipped
    else:
        try:
            llama = llama_forms(hf, out)
        except subprocess.CalledProcessError as e:  # the converter's own message is the last line it printed above
            errors["llama.cpp"] = f"{Path(e.cmd[-1]).name if e.cmd else 'conversion'}: exit code {e.returncode}"
    for name, (gguf, mmproj) in llama.items():
        log(f"{name}: {len(items)} questions")
        try:
            answers[name] = [llama_run(gguf, mmproj, it, threads, ANSWER_TOKENS, until_eos=True)[0] for it in items]
        except RuntimeError as e:  # e.g. a word-level tokenizer: the GGUF has no merges and llama.cpp cannot load it
            errors[name] = next((line.split(" E ", 1)[-1] for line in str(e).splitlines() if "error" in line),
                                str(e).splitlines()[0])

    reference = answers["torch eager fp32"]
    rows = {}
    for name, texts in answers.items():
        scores = [vqa_score(a, it["answers"]) for a, it in zip(texts, items) if it["type"] != "describe"]
        rows[name] = {"vqa_accuracy": float(np.mean(scores)), "n": len(scores),
                      "identical_to_eager": sum(a == r for a, r in zip(texts, reference)), "of": len(texts)}
    result = {"model": str(model), "questions": len(items), "answer_tokens": ANSWER_TOKENS, "threads": threads,
              "quick": quick,
              "rows": rows, "errors": errors, "examples": {n: t[:8] for n, t in answers.items()},
              "expected": [it["answers"][0] for it in items[:8]]}
    run.write(out / "vqa-results.json", result)
    print(markdown(rows, errors))
    return 0


def markdown(rows: dict[str, dict], errors: dict[str, str]) -> str:
    """The rows (and the peers that could not run) as the table benchmarks/tables.py puts in the docs."""
    lines = ["| row | VQA accuracy | identical to eager |", "|---|---|---|"]
    lines += [f"| {name} | {r['vqa_accuracy']:.3f} (n={r['n']}) | {r['identical_to_eager']}/{r['of']} |"
              for name, r in rows.items()]
    return "\n".join(lines + [f"| {name} | - | {why} |" for name, why in errors.items()])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--questions", type=int, default=280)
    ap.add_argument("--quick", action="store_true", help="8 questions, vlmedge's and OpenVINO's INT8 only: checks "
                    "the script")
    ap.add_argument("--no-peers", action="store_true", help="vlmedge's rows and eager's only, even where a peer's "
                    "environment is built")
    a = ap.parse_args()
    sys.exit(main(a.model, a.out, min(a.questions, 8) if a.quick else a.questions, quick=a.quick,
                  peers=not a.no_peers))
