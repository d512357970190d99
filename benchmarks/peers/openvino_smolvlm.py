"""OpenVINO through optimum-intel on a SmolVLM folder; runs in its own environment (`envs.sh env-openvino`), called by
`smolvlm_peers.py`. Knows nothing of vlmedge: it reads a model folder, images and questions, and prints JSON.

    python openvino_smolvlm.py export MODEL OUT --form int8|int4 --calibration PROMPTS.json
    python openvino_smolvlm.py time OUT PROMPTS.json --threads 2 [--warmup 1 --runs 3]
    python openvino_smolvlm.py answer OUT PROMPTS.json --threads 2 [--until-eos]

Forms, as optimum-intel documents them for SmolVLM ("Get your VLM running in 3 simple steps on Intel CPUs",
OVPipelineQuantizationConfig per component):
* int8: the language model and the text embeddings with 8-bit weights (`OVWeightQuantizationConfig(bits=8)`), the
  vision encoder statically quantized to int8 (`OVQuantizationConfig(bits=8)`, NNCF, calibrated on the prompts' images
  and questions: the documented datasets cannot be downloaded here);
* int4: the language model with 4-bit weights (`OVWeightQuantizationConfig(bits=4, group_size=32)`: its default
  group of 128 does not divide SmolVLM-256M's 576 and nncf refuses it), text embeddings and vision encoder with 8-bit
  weights.
PROMPTS.json: [{"image": path, "question": text}, ...]; `time` uses the first, `answer` all of them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ANSWER_TOKENS = 16  # vlmedge's latency scenarios' (this environment does not have vlmedge)


def _prompts(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _inputs(processor, item: dict):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item["question"]}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(item["image"]).convert("RGB")
    return processor(text=text, images=[image], return_tensors="pt")


def export(model: Path, out: Path, form: str, calibration: Path) -> None:
    from datasets import Dataset
    from optimum.intel import (OVConfig, OVModelForVisualCausalLM, OVPipelineQuantizationConfig, OVQuantizationConfig,
                               OVQuantizer, OVWeightQuantizationConfig)
    from PIL import Image

    fp = OVModelForVisualCausalLM.from_pretrained(model, export=True, load_in_8bit=False)
    if form == "int8":
        items = _prompts(calibration)
        configs = {"lm_model": OVWeightQuantizationConfig(bits=8),
                   "text_embeddings_model": OVWeightQuantizationConfig(bits=8),
                   "vision_embeddings_model": OVQuantizationConfig(bits=8)}
        # "textvqa" names the columns (image, question) of the dataset given, which is the one used
        q = OVPipelineQuantizationConfig(quantization_configs=configs, dataset="textvqa", num_samples=len(items),
                                         processor=str(model))
        data = Dataset.from_dict({"image": [Image.open(i["image"]).convert("RGB") for i in items],
                                  "question": [i["question"] for i in items]})
        OVQuantizer(fp).quantize(calibration_dataset=data, ov_config=OVConfig(quantization_config=q),
                                 save_directory=out)
    elif form == "int4":
        # its default group of 128 does not divide the 576-wide projections (nncf refuses); 32 is vlmedge's block
        configs = {"lm_model": OVWeightQuantizationConfig(bits=4, group_size=32),
                   "text_embeddings_model": OVWeightQuantizationConfig(bits=8),
                   "vision_embeddings_model": OVWeightQuantizationConfig(bits=8)}
        OVQuantizer(fp).quantize(ov_config=OVConfig(quantization_config=OVPipelineQuantizationConfig(
            quantization_configs=configs)), save_directory=out)
    else:
        fp.save_pretrained(out)
    from transformers import AutoProcessor

    AutoProcessor.from_pretrained(model).save_pretrained(out)


def _load(folder: Path, threads: int, precision: str = ""):
    from optimum.intel import OVModelForVisualCausalLM
    from transformers import AutoProcessor

    ov_config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
    if precision:  # OpenVINO's CPU default is bf16 where the CPU has AVX512_BF16 or AMX, else f32
        ov_config["INFERENCE_PRECISION_HINT"] = precision
    return OVModelForVisualCausalLM.from_pretrained(folder, ov_config=ov_config), AutoProcessor.from_pretrained(folder)


def _generate(model, inputs, n: int, until_eos: bool = False):
    """Greedy: `n` new tokens (EOS suppressed until then: what the latency scenarios time), or with `until_eos` up to
    `n`, stopping at EOS (what answers are scored on)."""
    if until_eos:
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)


def time_scenarios(folder: Path, prompts: Path, threads: int, warmup: int, runs: int, precision: str = "") -> dict:
    """vision (the vision embeddings model on the processed frames), ttft (generate 1 token), answer (16 tokens,
    EOS ignored), each `runs` times after `warmup`; decode per token = (answer - ttft) / 15 at each percentile."""
    import numpy as np
    import openvino
    import torch

    torch.set_num_threads(threads)
    model, processor = _load(folder, threads, precision)
    inputs = _inputs(processor, _prompts(prompts)[0])
    scenarios = {"vision": lambda: model.get_vision_embeddings(inputs["pixel_values"], inputs["input_ids"],
                                                               pixel_attention_mask=inputs.get("pixel_attention_mask")),
                 "ttft": lambda: _generate(model, inputs, 1),
                 "answer": lambda: _generate(model, inputs, ANSWER_TOKENS)}
    out = {}
    for name, fn in scenarios.items():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e3)
        out[name] = {"p50_ms": float(np.percentile(samples, 50)), "p90_ms": float(np.percentile(samples, 90)),
                     "samples_ms": samples}
    out["decode"] = {p: (out["answer"][p] - out["ttft"][p]) / (ANSWER_TOKENS - 1) for p in ("p50_ms", "p90_ms")}
    out["tokens_per_s"] = ANSWER_TOKENS / (out["answer"]["p50_ms"] / 1e3)
    out["runtime"] = f"openvino {openvino.__version__}"
    out["inference_precision"] = str(openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT")) \
        if not precision else precision
    out["input_image"] = {"frames": int(inputs["pixel_values"].shape[1]),
                          "prompt_tokens": int(inputs["input_ids"].shape[1])}
    return out


def answers(folder: Path, prompts: Path, threads: int, precision: str = "", until_eos: bool = False
            ) -> list[list[int]]:
    """Greedy ANSWER_TOKENS new token ids for every prompt (EOS suppressed; with `until_eos` stopping at it)."""
    model, processor = _load(folder, threads, precision)
    result = []
    for item in _prompts(prompts):
        inputs = _inputs(processor, item)
        ids = _generate(model, inputs, ANSWER_TOKENS, until_eos)
        result.append([int(t) for t in ids[0, inputs["input_ids"].shape[1]:]])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export")
    e.add_argument("model", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--form", choices=("fp32", "int8", "int4"), required=True)
    e.add_argument("--calibration", type=Path)
    for name in ("time", "answer"):
        s = sub.add_parser(name)
        s.add_argument("folder", type=Path)
        s.add_argument("prompts", type=Path)
        s.add_argument("--threads", type=int, default=2)
        s.add_argument("--warmup", type=int, default=1)
        s.add_argument("--runs", type=int, default=3)
        s.add_argument("--precision", choices=("", "f32", "bf16"), default="",
                       help="OpenVINO's INFERENCE_PRECISION_HINT (default: the plugin's choice for this CPU)")
    sub.choices["answer"].add_argument("--until-eos", action="store_true", help="stop each answer at EOS")
    a = ap.parse_args()
    if a.cmd == "export":
        export(a.model, a.out, a.form, a.calibration)
        print(json.dumps({"out": str(a.out)}))
    elif a.cmd == "time":
        print(json.dumps(time_scenarios(a.folder, a.prompts, a.threads, a.warmup, a.runs, a.precision)))
    else:
        print(json.dumps(answers(a.folder, a.prompts, a.threads, a.precision, a.until_eos)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
