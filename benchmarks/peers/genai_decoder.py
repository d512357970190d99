"""onnxruntime-genai's model builder against vlmedge's decoder (issue 43, point 3: the decoder as ONNX Runtime's
fused operators; vlmedge writes it so itself since cb46684, `families/generative/fused.py`, and traced it before).
Measures; vlmedge does not use the builder.

    bash benchmarks/peers/envs.sh genai      # the builder into runs/peers/genai (pip --target, no dependencies)
    python benchmarks/peers/genai_decoder.py RUN [--rounds 5] [--quick]

RUN is a `benchmarks/smolvlm_256m.py` folder (RUN/model, RUN/onnx, and RUN/int8, RUN/int4-acc4 where made). Writes
RUN/genai/llama (the model's text decoder as a LlamaForCausalLM folder, which the builder reads), RUN/genai/fp32 and
RUN/genai/int4 (the builder's graphs, `exclude_embeds`: like vlmedge's they take `inputs_embeds`; INT4 at accuracy
level 4, blocks of 32), RUN/genai/fp32-dynamic.onnx (the builder's fp32 graph quantized as `vlmedge quantize
--mode dynamic` quantizes a decoder: vlmedge's `quantize_file`) and
RUN/genai-results.json: each graph's operators and size, the fp32 logits and present keys of both decoders on the same
prefill and decode step (max abs diff), and each graph's decode step (past 100) and prefill (80 positions; at most
half the model's context each) p50 in interleaved rounds (2 threads). Without the builder (the suite's run) its rows
are left out and the results say so. `--quick`: one round, fewer runs.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from provenance import Provenance  # noqa: E402

BUILDER = ROOT / "runs" / "peers" / "genai" / "onnxruntime_genai" / "models" / "builder.py"
PAST, PREFILL = 100, 80


def llama_folder(model: Path, out: Path) -> Path:
    """The SmolVLM folder's text decoder and LM head as a LlamaForCausalLM folder with the model's tokenizer."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, SmolVLMForConditionalGeneration

    if (out / "config.json").is_file():
        return out
    vlm = SmolVLMForConditionalGeneration.from_pretrained(model, dtype=torch.float32)
    text = {k: v for k, v in vlm.config.text_config.to_dict().items() if k != "model_type"}
    lm = LlamaForCausalLM(LlamaConfig(**{**text, "architectures": ["LlamaForCausalLM"],
                                         "tie_word_embeddings": vlm.config.tie_word_embeddings}))
    lm.model.load_state_dict(vlm.model.text_model.state_dict())
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict())
    lm.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, out / name)
    return out


def build(llama: Path, out: Path, precision: str) -> Path:
    """The builder's decoder (CPU, embeddings excluded) in `out`; its model.onnx."""
    if not (out / "model.onnx").is_file():
        llama, out = llama.resolve(), out.resolve()  # the builder runs in its own folder (its imports are local)
        subprocess.run([sys.executable, str(BUILDER), "-i", str(llama), "-o", str(out), "-p", precision, "-e", "cpu",
                        "-c", str(out.parent / "cache"), "--extra_options", "exclude_embeds=true",
                        "int4_accuracy_level=4", "int4_block_size=32"], check=True, cwd=BUILDER.parent,
                       stdout=subprocess.DEVNULL)
    return out / "model.onnx"


def dynamic_int8(src: Path, dst: Path) -> Path:
    """`src` quantized as `vlmedge quantize --mode dynamic` quantizes a decoder graph (vlmedge's own function)."""
    from vlmedge.stages.quantize import QuantizeConfig, choose_weight_scheme, quantize_file

    if not dst.is_file():
        quantize_file(src, dst, "decoder", QuantizeConfig(), choose_weight_scheme("auto")[0], None)
    return dst


def session(path: Path):
    """A session as vlmedge's runtime opens one (`ort_session`: no spinning, its slow fusions off), 2 threads."""
    from vlmedge.runtime.measure import ort_session

    return ort_session(path, threads=2)


class Feeds:
    """The same inputs for every decoder: random embeddings after a random cache; `position_ids` and the last
    position's logits only where a graph takes them (vlmedge's; the builder's derive positions from the mask)."""

    def __init__(self, gen: dict, seed: int = 0):
        import numpy as np

        self.gen, self.rng, self.np = gen, np.random.default_rng(seed), np

    def __call__(self, sess, s: int, past, start: int) -> dict:
        np, gen = self.np, self.gen
        names = {i.name for i in sess.get_inputs()}
        feeds = {"inputs_embeds": (self.rng.standard_normal((1, s, gen["hidden_size"])) * 0.05).astype(np.float32),
                 "attention_mask": np.ones((1, start + s), dtype=np.int64)}
        if "position_ids" in names:
            feeds["position_ids"] = np.arange(start, start + s, dtype=np.int64)[None]
        for i in range(gen["layers"]):
            for kv in ("key", "value"):
                feeds[f"past_key_values.{i}.{kv}"] = (
                    past[f"present.{i}.{kv}"] if past is not None else
                    self.rng.standard_normal((1, gen["kv_heads"], start, gen["head_dim"])).astype(np.float32))
        if "logits_to_keep" in {i.name for i in sess.get_overridable_initializers()}:
            feeds["logits_to_keep"] = np.ones(1, dtype=np.int64)
        return feeds


def parity(ours, theirs, gen: dict) -> dict:
    """Both fp32 decoders on one prefill (no cache) and the decode step after it: max |diff| of the last logits
    and of the first layer's present key."""
    import numpy as np

    def run(sess, emb, past, start):
        feeds = Feeds(gen)(sess, emb.shape[1], past, start)
        feeds["inputs_embeds"] = emb
        names = [o.name for o in sess.get_outputs()]
        return dict(zip(names, sess.run(None, feeds)))

    rng = np.random.default_rng(1)
    prompt = (rng.standard_normal((1, 20, gen["hidden_size"])) * 0.05).astype(np.float32)
    step = (rng.standard_normal((1, 1, gen["hidden_size"])) * 0.05).astype(np.float32)
    empty = {f"present.{i}.{kv}": np.zeros((1, gen["kv_heads"], 0, gen["head_dim"]), np.float32)
             for i in range(gen["layers"]) for kv in ("key", "value")}
    a, b = run(ours, prompt, empty, 0), run(theirs, prompt, empty, 0)
    a2, b2 = run(ours, step, a, 20), run(theirs, step, b, 20)
    return {"prefill_logits_max_abs_diff": float(np.abs(a["logits"][:, -1] - b["logits"][:, -1]).max()),
            "decode_logits_max_abs_diff": float(np.abs(a2["logits"][:, -1] - b2["logits"][:, -1]).max()),
            "present_key_max_abs_diff": float(np.abs(a["present.0.key"] - b["present.0.key"]).max()),
            "same_next_token": bool(a2["logits"][0, -1].argmax() == b2["logits"][0, -1].argmax())}


def timed(graphs: dict[str, Path], gen: dict, rounds: int, runs: int, past: int, prefill: int) -> dict[str, dict]:
    """Decode step (after `past` positions) and prefill (`prefill` positions) p50 ms of each graph, the graphs taking
    turns."""
    import numpy as np

    sessions = {name: session(p) for name, p in graphs.items()}
    make = Feeds(gen)
    feeds = {name: (make(s, 1, None, past), make(s, prefill, None, 0)) for name, s in sessions.items()}
    clocks: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in sessions}

    def clock(sess, f, n):
        for _ in range(n):
            t = time.perf_counter()
            sess.run(["logits"], f)
            yield (time.perf_counter() - t) * 1e3

    for name, s in sessions.items():  # warm-up
        for f, n in zip(feeds[name], (2, 1)):
            list(clock(s, f, n))
    for r in range(rounds):
        print(f"round {r + 1}/{rounds}", flush=True)
        for name, s in sessions.items():
            clocks[name]["decode"] += clock(s, feeds[name][0], runs)
            clocks[name]["prefill"] += clock(s, feeds[name][1], max(1, runs // 5))
    out = {}
    for name, c in clocks.items():
        decode, prefill = float(np.median(c["decode"])), float(np.median(c["prefill"]))
        out[name] = {"decode_p50_ms": decode, "prefill_p50_ms": prefill, "prefill_decode_steps": prefill / decode}
    return out


def describe(path: Path) -> dict:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ops = collections.Counter(n.op_type for n in graph.node)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"nodes": len(graph.node), "size_bytes": size, "inputs": [i.name for i in graph.input][:3],
            "ops": dict(ops.most_common(8))}


def main(run_dir: Path, rounds: int, quick: bool) -> int:
    from vlmedge.runtime.onnx import read_manifest

    run = Provenance.start()
    manifest = read_manifest(run_dir / "onnx")
    gen, graphs = manifest["generation"], {"vlmedge fp32": run_dir / "onnx" / manifest["files"]["decoder"]}
    past, prefill = (min(n, manifest["max_length"] // 2) for n in (PAST, PREFILL))  # a small model's context
    for form in ("int8", "int4-acc4"):
        if (run_dir / form / "manifest.json").is_file():
            graphs[f"vlmedge {form}"] = run_dir / form / read_manifest(run_dir / form)["files"]["decoder"]
    results: dict = {"past": past, "prefill_positions": prefill, "threads": 2, "rounds": rounds}
    work = run_dir / "genai"
    if BUILDER.is_file():
        llama = llama_folder(run_dir / "model", work / "llama")
        fp32 = build(llama, work / "fp32", "fp32")
        graphs.update({"genai fp32": fp32,
                       "genai fp32 + vlmedge dynamic int8": dynamic_int8(fp32, work / "fp32-dynamic.onnx"),
                       "genai int4-acc4": build(llama, work / "int4", "int4")})
        results["parity_fp32"] = parity(session(graphs["vlmedge fp32"]), session(fp32), gen)
    else:
        results["left_out"] = f"onnxruntime-genai's builder is not installed ({BUILDER.relative_to(ROOT)}: " \
                              "bash benchmarks/peers/envs.sh genai)"
    results["graphs"] = {name: describe(p) for name, p in graphs.items()}
    results["timings"] = timed(graphs, gen, rounds, 5 if quick else 20, past, prefill)
    run.write(run_dir / "genai-results.json", results)
    for name, t in results["timings"].items():
        print(f"{name:32s} decode {t['decode_p50_ms']:7.2f} ms  prefill({prefill}) {t['prefill_p50_ms']:8.2f} ms "
              f"= {t['prefill_decode_steps']:5.1f} steps  {results['graphs'][name]['nodes']:5d} nodes  "
              f"{results['graphs'][name]['size_bytes'] / 1e6:6.0f} MB")
    print(json.dumps({k: v for k, v in results.items() if k in ("parity_fp32", "left_out")}))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a benchmarks/smolvlm_256m.py folder (model, onnx, int8, int4-acc4)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="one round, fewer runs (the suite's check)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(a.run, 1 if a.quick else a.rounds, a.quick))
