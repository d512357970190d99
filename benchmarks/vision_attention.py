"""A generative export's vision encoder against this CPU's ceilings, and its attention in every form ONNX Runtime's
quantizers can give it (issue 43, point 4).

The export writes the vision encoder's attention as ONNX Runtime's fp32 `MultiHeadAttention` (no mask: every patch of
a frame is real, so the all-ones pixel mask never reaches attention) and INT8 quantizes the linear layers around it.
Is the attention worth quantizing too? One layer's attention at the encoder's shape (tokens x heads x head size,
from the folder's config.json) is timed, in interleaved rounds, as

* `mha-fp32`: the export's MultiHeadAttention (ONNX Runtime's CPU flash-attention loop);
* `matmul-fp32`: the same computation unfused (MatMul, scale, Softmax, MatMul);
* `static-int8`: that graph through ONNX Runtime's static quantizer with vlmedge's static-mode options (QDQ,
  MinMax-calibrated on the feeds; Q and the probabilities uint8, K and V int8 symmetric through its per-tensor
  overrides, so both products are u8s8; the quantizer quantizes each product's output too);
* `dynamic-int8`: that graph through its dynamic quantizer with run-time B operands allowed (`MatMulConstBOnly`
  off: DynamicQuantizeLinear on every operand, then MatMulInteger).

with each form's largest difference to `matmul-fp32` relative to the output's largest value (on random feeds of the
encoder's shape: a check that each form computes attention, not the model's accuracy). In the same run: the fp32
and u8s8 GEMM ceilings (`ceilings.gemm` at the MLP's shape, tokens x width x intermediate) and the INT8 vision graph
on one frame, against the time its work would take at the ceilings: the linear layers (patch embedding, projections,
MLP, connector) at the int8 ceiling, the attention products at the fp32 one (`ideal_ms`), or every product at the
int8 one (`int8_ceiling_ms`).

    python benchmarks/vision_attention.py FOLDER [--rounds 5] [--quick]

FOLDER: an INT8 export of a generative model (`vlmedge quantize --mode dynamic`), e.g. runs/steps-256m/int8. Writes
FOLDER/vision-attention.json. `--quick` (the suite's check): one round, short ceilings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import ceilings  # noqa: E402
from provenance import Provenance  # noqa: E402

FORMS = ("mha-fp32", "matmul-fp32", "static-int8", "dynamic-int8")


def shape(folder: Path) -> dict[str, int]:
    """The vision encoder's sizes from the export's config.json (Idefics3 / SmolVLM layout)."""
    config = json.loads((folder / "config.json").read_text())
    v = config["vision_config"]
    side = v["image_size"] // v["patch_size"]
    return {"tokens": side * side, "width": v["hidden_size"], "heads": v["num_attention_heads"],
            "layers": v["num_hidden_layers"], "intermediate": v["intermediate_size"], "patch": v["patch_size"],
            "image_size": v["image_size"], "text_width": config["text_config"]["hidden_size"]}


def flops(folder: Path) -> dict[str, int]:
    """2 x multiply-adds of one frame (linear layers, attention products), counted by the family
    (`vision_flops`) on the vision encoder of the export's config.json built without weights (the meta device)."""
    import torch
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

    from vlmedge.families.generative.model import vision_flops

    config = SmolVLMConfig(**json.loads((folder / "config.json").read_text()))
    with torch.device("meta"):
        vision = SmolVLMVisionTransformer(config.vision_config)
    return vision_flops(vision, config.text_config.hidden_size)


def attention_graphs(s: dict[str, int], folder: Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, Path]:
    """One layer's attention in each form, as files in `folder`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    t, h, w = s["tokens"], s["heads"], s["width"]
    d = w // h
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, t, w]) for n in ("q", "k", "v")]
    out = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, t, w])]
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]

    def save(name: str, nodes, inits=()) -> Path:
        model = helper.make_model(helper.make_graph(nodes, name, io, out, list(inits)), opset_imports=opsets)
        model.ir_version = 8
        path = folder / f"{name}.onnx"
        onnx.save(model, str(path))
        return path

    paths = {"mha-fp32": save("mha-fp32", [helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"],
                                                             domain="com.microsoft", num_heads=h)])}
    inits = [numpy_helper.from_array(np.array([1, t, h, d], np.int64), "heads"),
             numpy_helper.from_array(np.array([1, t, w], np.int64), "width"),
             numpy_helper.from_array(np.array(d ** -0.5, np.float32), "scale")]
    nodes = []
    for x, perm in (("q", (0, 2, 1, 3)), ("k", (0, 2, 3, 1)), ("v", (0, 2, 1, 3))):
        nodes += [helper.make_node("Reshape", [x, "heads"], [f"{x}_split"]),
                  helper.make_node("Transpose", [f"{x}_split"], [f"{x}_heads"], perm=perm)]
    nodes += [helper.make_node("MatMul", ["q_heads", "k_heads"], ["scores"], name="qk"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "v_heads"], ["context"], name="pv"),
              helper.make_node("Transpose", ["context"], ["merged"], perm=(0, 2, 1, 3)),
              helper.make_node("Reshape", ["merged", "width"], ["out"])]
    paths["matmul-fp32"] = plain = save("matmul-fp32", nodes, inits)

    class Reader:
        def __init__(self):
            self.left = iter(feeds)

        def get_next(self):
            return next(self.left, None)

    logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizers suggest pre-processing on the root logger
    signed = {"quant_type": QuantType.QInt8, "symmetric": True}
    paths["static-int8"] = folder / "static-int8.onnx"
    quantize_static(plain, paths["static-int8"], Reader(), quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True,
                                   "TensorQuantOverrides": {"k_heads": [signed], "v_heads": [signed]}})
    paths["dynamic-int8"] = folder / "dynamic-int8.onnx"
    quantize_dynamic(plain, paths["dynamic-int8"], op_types_to_quantize=["MatMul"],
                     extra_options={"MatMulConstBOnly": False})
    return paths


def check_quantized(paths: dict[str, Path]) -> dict[str, dict[str, int]]:
    """The op types each int8 form holds, counted: both products must be quantized (4 operands) for the timing to
    mean anything."""
    from collections import Counter

    import onnx

    return {name: dict(sorted(Counter(n.op_type for n in onnx.load(str(paths[name])).graph.node).items()))
            for name in ("static-int8", "dynamic-int8")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="an INT8 export of a generative model")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the forms and the vision graph)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per form per round")
    ap.add_argument("--quick", action="store_true", help="one round, short ceilings: checks the script")
    a = ap.parse_args()
    prov = Provenance.start()
    from vlmedge.runtime.measure import cpu_info, ort_session
    from vlmedge.runtime.onnx import read_manifest

    rounds, runs, seconds = (1, 2, 0.05) if a.quick else (a.rounds, a.runs, 2.0)
    s = shape(a.folder)
    manifest = read_manifest(a.folder)
    rng = np.random.default_rng(0)
    feeds = [{n: rng.standard_normal((1, s["tokens"], s["width"])).astype(np.float32) for n in ("q", "k", "v")}
             for _ in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        paths = attention_graphs(s, Path(tmp), feeds)
        ops = check_quantized(paths)
        sessions = {name: ort_session(p, threads=2) for name, p in paths.items()}
    vision = ort_session(a.folder / manifest["files"]["vision"], threads=2)
    size = s["image_size"]
    frame = {"pixel_values": rng.uniform(-1, 1, (1, 1, 3, size, size)).astype(np.float32),
             "pixel_attention_mask": np.ones((1, 1, size, size), dtype=bool)}
    reference = sessions["matmul-fp32"].run(None, feeds[0])[0]
    scale = float(np.abs(reference).max())
    error = {name: float(np.abs(sess.run(None, feeds[0])[0] - reference).max() / scale)
             for name, sess in sessions.items()}
    vision.run(None, frame)
    times: dict[str, list[float]] = {name: [] for name in (*FORMS, "vision")}
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        for name in FORMS:
            for _ in range(runs):
                t0 = time.perf_counter()
                sessions[name].run(None, feeds[0])
                times[name].append(time.perf_counter() - t0)
        for _ in range(max(1, runs // 2)):
            t0 = time.perf_counter()
            vision.run(None, frame)
            times["vision"].append(time.perf_counter() - t0)
    ceiling = ceilings.gemm(s["tokens"], s["width"], s["intermediate"], threads=2, seconds=seconds)
    work = flops(a.folder)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    ideal = 1e3 * (work["linear"] / ceiling["int8_gops"] + work["attention"] / ceiling["fp32_gflops"]) / 1e9
    all_int8 = 1e3 * (work["linear"] + work["attention"]) / ceiling["int8_gops"] / 1e9
    attention_ms = {name: ms[name] * s["layers"] for name in FORMS}
    results = {
        "folder": str(a.folder), "quick": a.quick, "cpu_flags": sorted(cpu_info()[1] & {
            "avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}),
        "shape": s, "gflop": {k: round(v / 1e9, 3) for k, v in work.items()}, "ceilings": ceiling,
        "attention_layer_ms": {name: round(ms[name], 3) for name in FORMS},
        "attention_encoder_ms": {name: round(v, 3) for name, v in attention_ms.items()},
        "attention_fp32_ceiling_ms": round(1e3 * work["attention"] / ceiling["fp32_gflops"] / 1e9, 3),
        "attention_vs_mha": {name: round(ms[name] / ms["mha-fp32"], 3) for name in FORMS},
        "relative_error": {name: round(v, 5) for name, v in error.items()},
        "int8_forms_ops": ops,
        "vision_ms": round(ms["vision"], 3),
        "vision_ideal_ms": round(ideal, 3), "vision_int8_ceiling_ms": round(all_int8, 3),
        "vision_share_of_ceiling": round(ideal / ms["vision"], 3),
        "vision_share_of_int8_ceiling": round(all_int8 / ms["vision"], 3),
        "rounds": rounds, "runs": runs,
    }
    full = prov.write(a.folder / "vision-attention.json", results)
    print(json.dumps({k: v for k, v in full.items() if k != "provenance"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
