"""Where a generative decoder's prefill goes, kernel by kernel (issue 43: the prefill within 3 decode steps; INT4's
prefill no slower than INT8's).

A prefill runs the decode step's kernels on the prompt's rows (the image tokens and the question: `vlmedge bench`'s
latency input, one frame) instead of one. Each kernel vlmedge's decoders run is timed at both lengths, at the
folder's decoder sizes (config.json), in interleaved rounds on 2 threads with the sessions' spin-waiting:

* `kernels`: one layer's four weight products (packed QKV, O, packed gate/up, down) through each weight form, made
  by ONNX Runtime's own quantizers as `vlmedge quantize` makes them: `fp32` (MatMul), `int8` (`quantize_dynamic`,
  int8 weights: DynamicQuantizeMatMul once the session fuses it; `--mode dynamic`), `int4-acc4` (MatMulNBits, block
  32, accuracy level 4: int8 compute; `--mode int4 --block-size 32 --accuracy-level 4`) and, beside it, block 64 and
  accuracy level 0 (fp32 compute); per form ms per decoder pass (x layers), GOP/s at the prefill's rows and the
  prefill in decode steps. One layer's weights stay in cache here: in the graph every layer's weights also stream
  from memory (the decode step's bandwidth bound), so these are the compute side of the prefill.
* `attention`: the layer's GroupQueryAttention (rotary inside) over the prompt with an empty cache, and one step
  with the prompt's cache; its two products' work (the prompt's whole square, as ONNX Runtime computes them before
  masking) against the fp32 GEMM ceiling.
* `ceilings`: fp32 and u8s8 GEMM at the MLP's prefill shape (rows x width x intermediate), measured in the same run.
* `graphs`: each FOLDER's decoder through ONNX Runtime's profiler (`vlmedge bench --profile`), op type by op type, at
  its prefill and its cached step: the same kernels in the graph, weights streamed.

    python benchmarks/prefill_kernels.py INT8_FOLDER [INT4_FOLDER ...] [--rounds 5] [--out FILE] [--quick]

FOLDERS: exports of one generative model (`vlmedge quantize`), e.g. runs/steps-256m/int8 runs/steps-256m/int4-acc4;
the first gives the sizes. Writes FILE (default: INT8_FOLDER/prefill-kernels.json). `--quick` (the suite's check):
one round, short ceilings, few runs.
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

FORMS = {"fp32": None, "int8": "dynamic", "int4-acc4": (32, 4), "int4-b64-acc4": (64, 4), "int4-acc0": (32, 0)}
"""Weight form -> how ONNX Runtime's quantizer makes it (None: as exported; (block, accuracy level): MatMulNBits)."""


def sizes(folder: Path) -> dict[str, int]:
    """The decoder's sizes from the export's config.json (Idefics3 / SmolVLM layout)."""
    t = json.loads((folder / "config.json").read_text())["text_config"]
    heads = t["num_attention_heads"]
    head_dim = t.get("head_dim") or t["hidden_size"] // heads
    return {"width": t["hidden_size"], "intermediate": t["intermediate_size"], "heads": heads,
            "kv_heads": t.get("num_key_value_heads") or heads, "head_dim": head_dim, "layers": t["num_hidden_layers"]}


def products(s: dict[str, int]) -> dict[str, tuple[int, int]]:
    """One layer's weight products as the fused decoder packs them: name -> (in, out)."""
    attn = s["heads"] * s["head_dim"]
    return {"qkv": (s["width"], attn + 2 * s["kv_heads"] * s["head_dim"]), "o_proj": (attn, s["width"]),
            "gate_up": (s["width"], 2 * s["intermediate"]), "down": (s["intermediate"], s["width"])}


def layer_graphs(s: dict[str, int], folder: Path) -> dict[str, Path]:
    """The layer's four products, each on its own input (`rows` x in), as a graph per weight form."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    shapes = products(s)
    fp32 = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", [f"{n}_in", f"{n}.weight"], [f"{n}_out"], name=n) for n in shapes], "layer",
        [helper.make_tensor_value_info(f"{n}_in", TensorProto.FLOAT, ["rows", k]) for n, (k, _) in shapes.items()],
        [helper.make_tensor_value_info(f"{n}_out", TensorProto.FLOAT, ["rows", o]) for n, (_, o) in shapes.items()],
        [numpy_helper.from_array((rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32), f"{n}.weight")
         for n, (k, o) in shapes.items()]), opset_imports=[helper.make_opsetid("", 17)])
    fp32.ir_version = 8
    paths = {}
    for form, how in FORMS.items():
        path = folder / f"{form}.onnx"
        if how is None:
            onnx.save(fp32, str(path))
        elif how == "dynamic":
            onnx.save(fp32, str(folder / "source.onnx"))
            quantize_dynamic(str(folder / "source.onnx"), str(path), weight_type=QuantType.QInt8)
        else:
            block, level = how
            q = MatMulNBitsQuantizer(onnx.ModelProto.FromString(fp32.SerializeToString()), block_size=block,
                                     is_symmetric=True, accuracy_level=level)
            q.process()
            onnx.save(q.model.model, str(path))
        paths[form] = path
    return paths


def attention_graph(s: dict[str, int], positions: int, path: Path) -> Path:
    """The layer's GroupQueryAttention as vlmedge's fused decoder writes it (`fused.attention_node`): packed QKV in,
    rotary inside, the cache in and out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vlmedge.families.generative.fused import attention_node

    h, kv, d = s["heads"], s["kv_heads"], s["head_dim"]
    rng = np.random.default_rng(1)
    caches = [numpy_helper.from_array(rng.uniform(-1, 1, (positions, d // 2)).astype(np.float32), n)
              for n in ("cos_cache", "sin_cache")]
    node = attention_node("attention", "qkv", ("past_key", "past_value"), "seqlens_k", "total",
                          ("cos_cache", "sin_cache"), "position_ids", ["out", "present_key", "present_value"], h, kv)
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("qkv", f32, [1, "s", (h + 2 * kv) * d]),
              helper.make_tensor_value_info("past_key", f32, [1, kv, "p", d]),
              helper.make_tensor_value_info("past_value", f32, [1, kv, "p", d]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "s"])]
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("out", "present_key", "present_value")]
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs, caches),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def attention_feed(s: dict[str, int], past: int, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    h, kv, d = s["heads"], s["kv_heads"], s["head_dim"]
    cache = rng.standard_normal((1, kv, past, d)).astype(np.float32)
    return {"qkv": rng.standard_normal((1, rows, (h + 2 * kv) * d)).astype(np.float32), "past_key": cache,
            "past_value": cache.copy(), "seqlens_k": np.array([past + rows - 1], np.int32),
            "total": np.array(past + rows, np.int32), "position_ids": np.arange(past, past + rows)[None]}


def fused_ops(path: Path) -> list[str]:
    """The operators ONNX Runtime runs for the graph at `path`, after its optimizations (its optimized model)."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sorted({n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node})


def prompt_rows(folder: Path) -> int:
    """The decoder's rows in `vlmedge bench`'s prefill: the latency input's prompt, one frame."""
    from vlmedge import families

    family = families.of(folder)
    _, prompt = family.latency_inputs(family.adapter(folder, open_sessions=False, image_splitting="off"), 1)
    return len(prompt)


def time_interleaved(calls: dict[str, object], rounds: int, runs: int) -> dict[str, float]:
    """Median ms of each call: per round each call `runs` times in turn, the median of the rounds' medians."""
    per_round: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            call()
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            per_round[name].append(float(np.median(times)))
    return {name: 1e3 * float(np.median(v)) for name, v in per_round.items()}


def graph_profiles(folders: list[Path], runs: int) -> dict[str, dict[str, list[dict]]]:
    """Each folder's decoder, op type by op type at its prefill and its cached step (`vlmedge bench --profile`)."""
    from vlmedge.bench import profile_export

    out = {}
    for folder in folders:
        profile = profile_export(folder, runs=runs, threads=2)
        out[str(folder)] = {label.split(" ", 1)[1]: [{k: (round(v, 4) if isinstance(v, float) else v)
                                                      for k, v in row.items()} for row in rows]
                            for label, rows in profile.items() if label.startswith("decoder ")}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", type=Path, nargs="+", help="exports of one generative model (the first: its sizes)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--runs", type=int, default=20, help="timed runs per kernel per length per round")
    ap.add_argument("--out", type=Path, help="the results file (default: FOLDER/prefill-kernels.json)")
    ap.add_argument("--quick", action="store_true", help="one round, short ceilings, few runs: checks the script")
    a = ap.parse_args()
    prov = Provenance.start()
    logging.getLogger("onnxruntime").setLevel(logging.WARNING)  # the n-bit quantizer logs every node it quantizes
    from vlmedge.runtime.measure import ort_session

    rounds, runs, seconds = (1, 2, 0.05) if a.quick else (a.rounds, a.runs, 2.0)
    s = sizes(a.folders[0])
    rows = prompt_rows(a.folders[0])
    rng = np.random.default_rng(0)
    shapes = products(s)
    feeds = {n: {f"{p}_in": rng.standard_normal((n, k)).astype(np.float32) for p, (k, _) in shapes.items()}
             for n in (1, rows)}
    with tempfile.TemporaryDirectory() as tmp:
        paths = layer_graphs(s, Path(tmp))
        ops = {form: fused_ops(p) for form, p in paths.items()}
        sessions = {form: ort_session(p, threads=2) for form, p in paths.items()}
        attention = ort_session(attention_graph(s, rows + 1, Path(tmp) / "attention.onnx"), threads=2)
    attention_feeds = {"prefill": attention_feed(s, 0, rows), "decode": attention_feed(s, rows, 1)}
    calls = {f"{form} {n}": (lambda sess=sess, f=feeds[n]: sess.run(None, f))
             for form, sess in sessions.items() for n in (1, rows)}
    calls.update({f"attention {k}": (lambda f=f: attention.run(None, f)) for k, f in attention_feeds.items()})
    ms = time_interleaved(calls, rounds, runs)
    ceiling = ceilings.gemm(rows, s["width"], s["intermediate"], threads=2, seconds=seconds)
    layers = s["layers"]
    weight_ops = 2 * rows * sum(k * o for k, o in shapes.values())  # one layer's products at the prefill's rows
    kernels = {form: {"decode_ms": round(layers * ms[f"{form} 1"], 3),
                      "prefill_ms": round(layers * ms[f"{form} {rows}"], 3),
                      "prefill_decode_steps": round(ms[f"{form} {rows}"] / ms[f"{form} 1"], 2),
                      "prefill_gops": round(weight_ops / ms[f"{form} {rows}"] / 1e6, 1), "ops": ops[form]}
               for form in FORMS}
    # QK^T and the probabilities times V, every query head, over the prompt's whole square (ONNX Runtime computes
    # it and masks the causal half)
    attention_flop = 2 * 2 * s["heads"] * s["head_dim"] * rows * rows
    attn = {"prefill_ms": round(layers * ms["attention prefill"], 3),
            "decode_ms": round(layers * ms["attention decode"], 3),
            "prefill_gflops": round(attention_flop / ms["attention prefill"] / 1e6, 1),
            "prefill_at_fp32_ceiling_ms": round(layers * attention_flop / ceiling["fp32_gflops"] / 1e6, 3)}
    results = {
        "folders": [str(f) for f in a.folders], "quick": a.quick, "sizes": s, "prompt_rows": rows,
        "ceilings": {k: round(v, 1) for k, v in ceiling.items()}, "kernels": kernels, "attention": attn,
        "int4_over_int8_prefill": round(kernels["int4-acc4"]["prefill_ms"] / kernels["int8"]["prefill_ms"], 2),
        "graphs": graph_profiles(a.folders, 2 if a.quick else 20), "rounds": rounds, "runs": runs,
    }
    full = prov.write(a.out or a.folders[0] / "prefill-kernels.json", results)
    print(json.dumps({k: v for k, v in full.items() if k not in ("provenance", "graphs")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
