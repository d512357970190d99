"""The tables of README.md, docs/ and benchmarks/README.md, generated from the results files under
benchmarks/results/: none is typed.

Each generated block sits between `<!-- table:NAME -->` and `<!-- /table -->` in its page. `RESULTS` names, per
results file, the one command that regenerates it at HEAD (prerequisites included) and how to render it.

    python benchmarks/tables.py           # rewrite every block from the results files
    python benchmarks/tables.py --check   # exit 1 naming each block that differs (the suite runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "peers"))

STEP_SIZES = ("256m", "500m", "2.2b")
JS_FORMS = ("fp32", "int8", "int4", "fp16")
"""The 2.2B's folders checked in transformers.js (benchmarks/transformers_js_check.py)."""
PEERS = "bash benchmarks/peers/envs.sh env-openvino llama.cpp && "
def _js_command(form: str) -> str:
    """The command behind transformers-js-2.2b-FORM.json: the 2.2B folder (scaled: answers that differ; the INT4 one
    from the sizes benchmark), the form, the check."""
    if form == "int4":
        made = "python benchmarks/smolvlm_256m.py runs/steps-2.2b --size 2.2b --forms int8,int4-acc4"
    else:
        made = ("python benchmarks/peers/smolvlm_peers.py runs/peers2.2bx3 --size 2.2b --text-scale 3 --rounds 0 "
                "--row 'vlmedge int8'")
    if form == "fp16":
        made += (" && vlmedge quantize runs/peers2.2bx3/vlmedge-fp32 --out runs/peers2.2bx3/vlmedge-fp16 "
                 "--mode fp16 --no-eval")
    folder = "runs/steps-2.2b/int4-acc4" if form == "int4" else f"runs/peers2.2bx3/vlmedge-{form}"
    out = f"runs/transformers-js-2.2b-{form}.json"
    return (f"(cd tests/js && npm ci --ignore-scripts) && {made} && python benchmarks/transformers_js_check.py "
            f"{folder} --out {out} && cp {out} benchmarks/results/transformers-js-2.2b-{form}.json")


RESULTS: dict[str, str] = {
    "quickstart.json": "benchmarks/run.sh quickstart",
    "vqa-quickstart.json": "benchmarks/run.sh vqa-quickstart",
    "rerank-quickstart.json": "benchmarks/run.sh rerank-quickstart",
    "edge-cpu.json": "benchmarks/run.sh edge-cpu",
    "peers.json": "benchmarks/peers/run.sh",
    "vqa-peers.json": "benchmarks/run.sh vqa-quickstart && bash benchmarks/peers/envs.sh env-optimum && "
                      "python benchmarks/peers/generative.py runs/bench-vqa-quickstart "
                      "--optimum-python runs/peers/env-optimum/bin/python && "
                      "cp runs/bench-vqa-quickstart/peers.json benchmarks/results/vqa-peers.json",
    "smolvlm-256m.json": "python benchmarks/smolvlm_256m.py runs/smolvlm-256m && "
                         "cp runs/smolvlm-256m/results.json benchmarks/results/smolvlm-256m.json",
    "smolvlm-256m-avx512.json": "python benchmarks/smolvlm_256m.py runs/smolvlm-256m --forms int8,int4-acc4 && "
                                "cp runs/smolvlm-256m/results.json benchmarks/results/smolvlm-256m-avx512.json",
    **{f"smolvlm-steps-{size}.json": f"python benchmarks/smolvlm_256m.py runs/steps-{size} --size {size} "
                                     f"--forms int8,int4-acc4 && cp runs/steps-{size}/results.json "
                                     f"benchmarks/results/smolvlm-steps-{size}.json" for size in STEP_SIZES},
    "int8-kernels-256m.json": "python benchmarks/smolvlm_256m.py runs/steps-256m --size 256m --forms int8,int4-acc4 "
                              "&& python benchmarks/int8_kernels.py runs/steps-256m/int8 && cp "
                              "runs/steps-256m/int8/kernels.json benchmarks/results/int8-kernels-256m.json",
    "vision-attention-256m.json": "python benchmarks/smolvlm_256m.py runs/steps-256m --size 256m --forms "
                                  "int8,int4-acc4 && python benchmarks/vision_attention.py runs/steps-256m/int8 && cp "
                                  "runs/steps-256m/int8/vision-attention.json "
                                  "benchmarks/results/vision-attention-256m.json",
    **{f"prefill-kernels-{size}.json": f"python benchmarks/smolvlm_256m.py runs/steps-{size} --size {size} "
                                        f"--forms int8,int4-acc4 && python benchmarks/prefill_kernels.py "
                                        f"runs/steps-{size}/int8 runs/steps-{size}/int4-acc4 "
                                        f"--out runs/prefill-kernels-{size}.json && cp "
                                        f"runs/prefill-kernels-{size}.json "
                                        f"benchmarks/results/prefill-kernels-{size}.json"
       for size in STEP_SIZES},
    **{f"transformers-js-2.2b-{form}.json": _js_command(form) for form in JS_FORMS},
    "smolvlm-2.2b-peers-head-to-head-amx.json": "bash benchmarks/peers/envs.sh env-openvino && python "
                                                "benchmarks/peers/smolvlm_peers.py runs/peers2.2bx3 --size 2.2b "
                                                "--text-scale 3 --rounds 3 --row 'vlmedge int8' --row 'openvino int8' "
                                                "--row 'openvino int8 f32' --results head-to-head.json && cp "
                                                "runs/peers2.2bx3/head-to-head.json "
                                                "benchmarks/results/smolvlm-2.2b-peers-head-to-head-amx.json",
    "spinning-smolvlm.json": " && ".join(f"python benchmarks/smolvlm_256m.py runs/steps-{size} --size {size} --forms "
                                         "int8,int4-acc4" for size in ("256m", "500m")) +
                             " && vlmedge train --preset small --steps 2 --data-count 256 --out runs/de-small/model "
                             "&& vlmedge export runs/de-small/model --out runs/de-small/onnx --no-eval && vlmedge "
                             "quantize runs/de-small/onnx --out runs/de-small/int8 --no-eval && python "
                             "benchmarks/spinning.py runs/steps-256m/int8 runs/steps-500m/int8 runs/de-small/int8 "
                             "--rounds 3 --out runs/spinning.json && cp runs/spinning.json "
                             "benchmarks/results/spinning-smolvlm.json",
    "genai-decoder-256m.json": "bash benchmarks/peers/envs.sh genai && python benchmarks/smolvlm_256m.py "
                               "runs/steps-256m --size 256m --forms int8,int4-acc4 && python "
                               "benchmarks/peers/genai_decoder.py runs/steps-256m && cp "
                               "runs/steps-256m/genai-results.json benchmarks/results/genai-decoder-256m.json",
    "smolvlm-256m-peers.json": PEERS + "python benchmarks/peers/smolvlm_peers.py runs/peers256 && "
                               "cp runs/peers256/results.json benchmarks/results/smolvlm-256m-peers.json",
    "smolvlm-256m-peers-head-to-head.json": PEERS + "python benchmarks/peers/smolvlm_peers.py runs/peers256 --rounds 5 "
                                            "--row 'vlmedge int8' --row 'openvino int8' --row 'openvino int8 f32' "
                                            "--results head-to-head.json && cp runs/peers256/head-to-head.json "
                                            "benchmarks/results/smolvlm-256m-peers-head-to-head.json",
    "smolvlm-256m-peers-head-to-head-amx.json": "bash benchmarks/peers/envs.sh env-openvino && python "
                                                "benchmarks/peers/smolvlm_peers.py runs/peers256x3 --text-scale 3 "
                                                "--rounds 3 --row 'vlmedge int8' --row 'openvino int8' --row "
                                                "'openvino int8 f32' --results head-to-head.json && cp "
                                                "runs/peers256x3/head-to-head.json "
                                                "benchmarks/results/smolvlm-256m-peers-head-to-head-amx.json",
    "smolvlm-256m-peers-agreement-x3.json": PEERS + "python benchmarks/peers/smolvlm_peers.py runs/peers256x3 "
                                            "--text-scale 3 --rounds 0 && cp runs/peers256x3/results.json "
                                            "benchmarks/results/smolvlm-256m-peers-agreement-x3.json",
    "smolvlm-vqa-peers.json": PEERS + "vlmedge train --preset small --steps 300 --data shapes --data-count 20000 "
                              "--out runs/vqapeers/dual && vlmedge train --preset vqa-wide --data shapes "
                              "--data-count 20000 --vision-init runs/vqapeers/dual --out runs/vqapeers/model && "
                              "python benchmarks/peers/smolvlm_vqa_peers.py runs/vqapeers/model runs/vqapeers && "
                              "cp runs/vqapeers/vqa-results.json benchmarks/results/smolvlm-vqa-peers.json",
    "smolvlm-cpu-256m.json": "python benchmarks/smolvlm_256m.py runs/smolvlm-256m --forms int8 && "
                             "python benchmarks/smolvlm_cpu.py runs/smolvlm-256m/model runs/smolvlm-cpu "
                             "--set stages.distill.steps=4 --set stages.distill.batch_size=2 && "
                             "cp runs/smolvlm-cpu/wall.json benchmarks/results/smolvlm-cpu-256m.json",
    "streaming-rss.json": "python benchmarks/streaming_rss.py runs/streaming && "
                          "cp runs/streaming/results.json benchmarks/results/streaming-rss.json",
    # the two ran side by side on the 2 cores, one thread each
    "matching-designs-blip.json": "python benchmarks/matching_designs.py blip "
                                  "benchmarks/results/matching-designs-blip.json --steps 5000 --threads 1",
    "matching-designs-vilt.json": "python benchmarks/matching_designs.py vilt "
                                  "benchmarks/results/matching-designs-vilt.json --steps 3000 --threads 1",
}
"""Results file -> the command that regenerates it at HEAD, from the repository root with vlmedge installed."""


def _load(name: str) -> dict:
    return json.loads((RESULTS_DIR / name).read_text())


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def source_line(name: str) -> str:
    """Where a generated table comes from: its file, its command, and what the file says of the machine."""
    data = _load(name)
    prov = data.get("provenance")
    env = (prov or {}).get("environment") or data.get("environment") or {}
    cpu = f"{env.get('cpu', '?')}, {env.get('cores', '?')} cores" if env else "machine not recorded"
    flags = [f for f in env.get("cpu_flags", []) if f in ("avx2", "avx512_vnni", "avx512_bf16", "amx_int8")]
    where = f"{cpu}{' (' + ', '.join(flags) + ')' if flags else ''}"
    if prov:
        commit = prov["commit"][:12] + ("-dirty" if prov["commit"].endswith("-dirty") else "")
        made = f"commit {commit}, load average {prov['load_before'][0]} before" + \
            (" (a busy CPU: timings not comparable)" if prov.get("cpu_busy_before") else "")
    else:
        made = "written before results files recorded their command and commit"
    return f"_From `benchmarks/results/{name}` ({where}; {made}); regenerate: `{RESULTS[name]}`._"


def recipe(name: str) -> Callable[[], list[str]]:
    """A recipe report's step table (what `vlmedge compress` prints)."""
    def render() -> list[str]:
        from vlmedge.report import table_rows

        header, rows = table_rows(_load(name), compact=True)
        return _table(header, rows) + ["", source_line(name)]
    return render


GATE_RECIPES = ("quickstart.json", "vqa-quickstart.json", "rerank-quickstart.json")


def gates() -> list[str]:
    """Each shipped quickstart's gates as its last run judged them, and the planted regression ('quantize removed':
    `vlmedge gate RUN --step export --remeasure 0`, written by benchmarks/run.sh beside the report)."""
    rows, sources = [], []
    for name in GATE_RECIPES:
        if not (RESULTS_DIR / name).is_file():
            continue
        report = _load(name)
        planted = RESULTS_DIR / name.replace(".json", "-planted.xml")
        verdicts = {}
        if planted.is_file():
            for case in ET.parse(planted).getroot().iter("testcase"):
                verdicts[case.get("name")] = "fail" if case.find("failure") is not None else "pass"
        for g in report.get("gates") or []:
            rows.append([report["recipe"]["name"], f"`{g['budget']}`", f"{g['value']:.3f}" if g["value"] is not None
                         else "-", "pass" if g["passed"] else "**fail**", verdicts.get(g["budget"], "not run")])
        sources.append(source_line(name))
    return _table(["recipe", "gate", "value", "verdict", "quantize removed"], rows) + [""] + sources


FORM_COLUMNS = ["form", "vision ms", "prefill ms", "decode step ms", "16-token answer ms", "size MB",
                "decode bound ms (bytes / bandwidth)"]


def _form_row(form: str, r: dict) -> list[str]:
    """One form's latencies (p50 / p90), size and decode bound (benchmarks/smolvlm_256m.py's record)."""
    pct = lambda sc: f"{r[sc]['p50_ms']:.1f} / {r[sc]['p90_ms']:.1f}" if sc in r else "-"  # noqa: E731
    return [form, pct("vision"), pct("prefill"), pct("decode"), pct("answer"),
            f"{r['size_bytes'] / 1e6:.0f}" if "size_bytes" in r else "-",
            f"{r['decode_bound_ms']:.1f}" if "decode_bound_ms" in r else "-"]


def smolvlm_forms(name: str) -> Callable[[], list[str]]:
    """The 256M shape's forms against PyTorch eager (benchmarks/smolvlm_256m.py)."""
    def render() -> list[str]:
        rows = [_form_row(form, r) for form, r in _load(name)["forms"].items()]
        return _table(FORM_COLUMNS, rows) + ["", "p50 / p90.", "", source_line(name)]
    return render


def smolvlm_sizes(names: list[str]) -> Callable[[], list[str]]:
    """Per SmolVLM size, every form timed against PyTorch eager, with the decode step against its bound and the
    prefill in decode steps (benchmarks/smolvlm_256m.py --size, without --steps-only)."""
    def render() -> list[str]:
        rows, sources = [], []
        for name in names:
            data = _load(name)
            if "forms" not in data:
                continue
            for form, r in data["forms"].items():
                rows.append([data["size"], *_form_row(form, r),
                             f"{r['decode']['p50_ms'] / r['decode_bound_ms']:.2f}" if "decode_bound_ms" in r else "-",
                             f"{r['prefill_decode_steps']:.1f}"])
            sources.append(source_line(name))
        return _table(["size", *FORM_COLUMNS, "decode / bound", "prefill in decode steps"], rows) + \
            ["", "p50 / p90; one frame at the model's image size (512 px; 384 px at 2.2B), 2 threads.", ""] + sources
    return render


def smolvlm_steps(names: list[str]) -> Callable[[], list[str]]:
    """Per SmolVLM size (benchmarks/smolvlm_256m.py --size): each step's time and peak RSS against the memory goal."""
    def render() -> list[str]:
        rows, sources = [], []
        for name in names:
            data = _load(name)
            steps = data["steps"]
            def cell(k: str) -> str:
                if k not in steps:
                    return "-"
                step = steps[k]
                said = (f" **failed (exit {step['failed']})**" if "failed" in step
                        else "" if step["within_goal"] else " **over**")
                return f"{step['s']:.0f} s / {step['peak_rss_gib']:.2f} GiB{said}"
            rows.append([data["size"], f"{data['parameters'] / 1e6:.0f}M", f"{data['fp32_weights_gib']:.2f}",
                         f"{data['memory_goal_gib']:.2f}", cell("export"), cell("quantize int8"),
                         cell("quantize int4-acc4"),
                         " / ".join(f"{data['seconds_per_billion_parameters'][k]:.0f}"
                                    for k in ("export", "quantize int8") if k in steps)])
            sources.append(source_line(name))
        return _table(["size", "parameters", "fp32 weights GiB", "goal GiB (2 x weights + 1.5)", "export",
                       "quantize INT8 dynamic", "quantize INT4 (acc 4)", "s per 1B parameters (export / INT8)"],
                      rows) + [""] + sources
    return render


def genai_decoder(name: str) -> Callable[[], list[str]]:
    """vlmedge's decoder against onnxruntime-genai's builder's (benchmarks/peers/genai_decoder.py)."""
    def render() -> list[str]:
        data = _load(name)
        rows = [[graph, data["graphs"][graph]["nodes"], f"{data['graphs'][graph]['size_bytes'] / 1e6:.0f}",
                 f"{t['decode_p50_ms']:.2f}", f"{t['prefill_p50_ms']:.1f}", f"{t['prefill_decode_steps']:.1f}"]
                for graph, t in data["timings"].items()]
        parity = data.get("parity_fp32")
        said = (f"fp32 parity of the two decoders: last logits within {parity['decode_logits_max_abs_diff']:.1e} "
                f"after a prefill and a decode step." if parity else data.get("left_out", ""))
        return _table(["decoder", "nodes", "size MB", f"decode step ms (past {data['past']})",
                       f"prefill ms ({data['prefill_positions']} positions)", "prefill in decode steps"], rows) + \
            ["", f"p50 over {data['rounds']} interleaved rounds, {data['threads']} threads. {said}", "",
             source_line(name)]
    return render


def int8_kernels(name: str) -> Callable[[], list[str]]:
    """Which kernels an INT8 export's GEMMs ran on (benchmarks/int8_kernels.py): the profile's int8 share per feed,
    ONNX Runtime's samples per instruction class."""
    def render() -> list[str]:
        data = _load(name)
        rows = [[label, f"{p['kernel_ms']:.2f}", f"{p['int8_gemm_share']:.0%}",
                 ", ".join(f"{k} {v:.0%}" for k, v in list(p["op_types"].items())[:3])]
                for label, p in data["profile"].items() if p["int8_gemm_share"] > 0]
        lines = _table(["graph and feed", "ORT kernel ms / run", "int8 GEMM operators' share", "top op types"],
                       rows)
        if "classes" in data:
            ref = data["reference_u8s8_gemm"]["classes"]
            lines += ["", *_table(["instructions within 64 bytes of the sampled address",
                                   "u8s8 MatMulInteger alone (1024x768x3072): share of ORT's samples",
                                   "the export's profile run: samples", "share of ORT's samples"],
                                  [[k, f"{ref.get(k, {}).get('share_of_onnxruntime', 0):.1%}",
                                    data["classes"].get(k, {}).get("samples", 0),
                                    f"{data['classes'].get(k, {}).get('share_of_onnxruntime', 0):.1%}"]
                                   for k in ("amx", "vnni", "avx2-u8s8", "other")])]
        else:
            lines += ["", f"Samples left out: {data['samples_left_out']}."]
        return lines + ["", source_line(name)]
    return render


def vision_attention(name: str) -> Callable[[], list[str]]:
    """The vision encoder against the ceilings measured beside it, and one layer's attention in each form
    (benchmarks/vision_attention.py)."""
    def render() -> list[str]:
        data = _load(name)
        c, s = data["ceilings"], data["shape"]
        lines = _table(["attention form (one layer, x layers)", "ms / layer", "ms / encoder", "vs MultiHeadAttention",
                        "max diff / max output"],
                       [[f, f"{data['attention_layer_ms'][f]:.2f}", f"{data['attention_encoder_ms'][f]:.0f}",
                         f"{data['attention_vs_mha'][f]:.2f}x", f"{data['relative_error'][f]:.3f}"]
                        for f in data["attention_layer_ms"]])
        lines += ["", *_table(["vision graph (INT8, one frame)", "ms"], [
            ["measured", f"{data['vision_ms']:.0f}"],
            [f"its work at the ceilings (linear {data['gflop']['linear']:.0f} GOP at int8 {c['int8_gops']:.0f} GOP/s, "
             f"attention {data['gflop']['attention']:.1f} GFLOP at fp32 {c['fp32_gflops']:.0f} GFLOP/s)",
             f"{data['vision_ideal_ms']:.0f} ({data['vision_share_of_ceiling']:.0%} of measured)"],
            ["all of it at the int8 ceiling", f"{data['vision_int8_ceiling_ms']:.0f} "
             f"({data['vision_share_of_int8_ceiling']:.0%} of measured)"],
            ["attention at the fp32 ceiling", f"{data['attention_fp32_ceiling_ms']:.0f}"]])]
        shape = f"{s['tokens']} tokens x {s['heads']} heads x {s['width'] // s['heads']}, {s['layers']} layers"
        return lines + ["", f"Shape: {shape}. " + source_line(name)]
    return render


def prefill_kernels(names: list[str]) -> Callable[[], list[str]]:
    """A decoder's kernels at one row and at the prompt's rows, per weight form, and the folders' decoder profiles
    (benchmarks/prefill_kernels.py), one block per results file."""
    def render() -> list[str]:
        lines: list[str] = []
        for name in names:
            data = _load(name)
            c, s, a, rows = data["ceilings"], data["sizes"], data["attention"], data["prompt_rows"]
            body = [[f, ", ".join(k["ops"]), f"{k['decode_ms']:.1f}", f"{k['prefill_ms']:.1f}",
                     f"{k['prefill_decode_steps']:.1f}", f"{k['prefill_gops']:.0f}"]
                    for f, k in data["kernels"].items()]
            body.append(["attention", "GroupQueryAttention", f"{a['decode_ms']:.1f}", f"{a['prefill_ms']:.1f}",
                         f"{a['prefill_ms'] / a['decode_ms']:.1f}",
                         f"{a['prefill_gflops']:.0f} (at the fp32 ceiling: {a['prefill_at_fp32_ceiling_ms']:.1f} ms)"])
            lines += [*([""] if lines else []),
                      f"{s['layers']} layers x {s['width']} wide, {s['heads']} / {s['kv_heads']} heads, "
                      f"a prompt of {rows} rows; ceilings at {rows} x {s['width']} x {s['intermediate']}: "
                      f"u8s8 {c['int8_gops']:.0f} GOP/s, fp32 {c['fp32_gflops']:.0f} GFLOP/s.", "",
                      *_table(["kernel (x layers)", "ONNX Runtime runs", "one row ms", f"{rows} rows ms",
                               "in one-row steps", f"G(FL)OP/s at {rows} rows"], body)]
            for folder, feeds in data["graphs"].items():
                totals = {feed: sum(r["ms_per_run"] for r in table) for feed, table in feeds.items()}
                prefill = max(totals, key=totals.get)
                top = ", ".join(f"{r['op_type']} {r['ms_per_run']:.1f}" for r in feeds[prefill][:3])
                lines += ["", f"`{folder}`'s decoder in ONNX Runtime's profiler: {prefill} {totals[prefill]:.1f} ms "
                              f"({top}); " + "; ".join(f"{feed} {ms:.1f} ms" for feed, ms in totals.items()
                                                       if feed != prefill) + "."]
            lines += ["", source_line(name)]
        return lines
    return render


def transformers_js(names: list[str]) -> Callable[[], list[str]]:
    """A real-sized export's greedy tokens in transformers.js against vlmedge's runtime on the same pixels
    (benchmarks/transformers_js_check.py), a row per results file."""
    def render() -> list[str]:
        rows = []
        for name in names:
            data = _load(name)
            dtype = data["dtype"] if isinstance(data["dtype"], str) else \
                ", ".join(f"{graph} {d}" for graph, d in data["dtype"].items())
            rows.append([f"`{data['folder']}`", dtype, f"{data['identical']}/{data['of']}",
                         data["distinct_answers"], data["tokens"],
                         " / ".join(f"{s:.0f} s" for s in data["seconds"].values())])
        return _table(["folder", "transformers.js dtype", "prompt ids and tokens identical", "distinct answers",
                       "tokens (EOS ignored)", "transformers.js (load and answer) / vlmedge (answer)"], rows) + \
            [""] + [source_line(name) for name in names]
    return render


def spinning(name: str) -> Callable[[], list[str]]:
    """Spin-waiting within a run on and off, per folder and scenario (benchmarks/spinning.py)."""
    def render() -> list[str]:
        data = _load(name)
        rows = []
        for folder, f in data["folders"].items():
            for k in f["on_vs_off_p50"]:
                rows.append([f"{Path(folder).parent.name} {f['precision']}", k,
                             f"{f['off'][k]['p50_ms']:.1f} / {f['off'][k]['p90_ms']:.1f}",
                             f"{f['on'][k]['p50_ms']:.1f} / {f['on'][k]['p90_ms']:.1f}",
                             f"{f['on_vs_off_p50'][k]:.2f}x / {f['on_vs_off_p90'][k]:.2f}x"])
        return _table(["folder", "scenario", "no spinning p50 / p90 ms", "spinning within a run p50 / p90 ms",
                       "on / off"], rows) + ["", source_line(name)]
    return render


def smolvlm_peers(name: str) -> Callable[[], list[str]]:
    def render() -> list[str]:
        from smolvlm_peers import markdown

        return [*markdown(_load(name)["rows"]).splitlines(), "", source_line(name)]
    return render


def vqa_peers() -> list[str]:
    from generative import markdown

    return [*markdown(_load("vqa-peers.json")["rows"]).splitlines(), "", source_line("vqa-peers.json")]


def smolvlm_vqa_peers() -> list[str]:
    from smolvlm_vqa_peers import markdown

    data = _load("smolvlm-vqa-peers.json")
    return [*markdown(data["rows"], data["errors"]).splitlines(), "", source_line("smolvlm-vqa-peers.json")]


def streaming() -> list[str]:
    data = _load("streaming-rss.json")
    rows = [[r["shards"], r["samples"], f"{r['peak_rss_mb']:.0f}", r["seconds"]] for r in data["runs"]]
    return _table(["shards", "samples", "peak RSS MB", "seconds"], rows) + ["", source_line("streaming-rss.json")]


def matching_designs() -> list[str]:
    """The matching teacher's designs, evaluated along their training (benchmarks/matching_designs.py)."""
    names = ["matching-designs-blip.json", "matching-designs-vilt.json"]
    rows = []
    for name in names:
        data = _load(name)
        for r in data["reports"]:
            itm, ret = r["itm"], r["retrieval"]
            rows.append([data["design"], r["step"], *(f"{itm[k]:.3f}" for k in ("colour", "shape", "position",
                                                                               "relation")),
                         f"{r['itc_hard_negatives']['relation']:.3f}", f"{ret['itc_i2t_r1']:.3f}",
                         f"{ret['rerank_i2t_r1']:.3f}"])
    return _table(["design", "step", "ITM colour", "ITM shape", "ITM position", "ITM relation", "ITC relation",
                   "i2t R@1 ITC", "i2t R@1 reranked"], rows) + ["", *(source_line(n) for n in names)]


def commands() -> list[str]:
    """benchmarks/README.md's map: each results file and the one command that regenerates it."""
    return _table(["results file", "regenerated at HEAD by", "in the repository"],
                  [[f"`{name}`", f"`{cmd}`",
                    "yes" if (RESULTS_DIR / name).is_file() else "not yet: run the command"]
                   for name, cmd in RESULTS.items()])


STEP_RESULTS = [f"smolvlm-steps-{size}.json" for size in STEP_SIZES
                if (RESULTS_DIR / f"smolvlm-steps-{size}.json").is_file()]
PREFILL_RESULTS = [f"prefill-kernels-{size}.json" for size in STEP_SIZES
                   if (RESULTS_DIR / f"prefill-kernels-{size}.json").is_file()]
TABLES: dict[str, Callable[[], list[str]]] = {
    "quickstart": recipe("quickstart.json"), "edge-cpu": recipe("edge-cpu.json"),
    "vqa-quickstart": recipe("vqa-quickstart.json"), "rerank-quickstart": recipe("rerank-quickstart.json"),
    "gates": gates,
    "smolvlm-256m": smolvlm_forms("smolvlm-256m-avx512.json"),
    "smolvlm-steps": smolvlm_steps(STEP_RESULTS), "smolvlm-sizes": smolvlm_sizes(STEP_RESULTS),
    "genai-decoder": genai_decoder("genai-decoder-256m.json"),
    "int8-kernels": int8_kernels("int8-kernels-256m.json"),
    "vision-attention": vision_attention("vision-attention-256m.json"),
    "spinning": spinning("spinning-smolvlm.json"),
    "prefill-kernels": prefill_kernels(PREFILL_RESULTS),
    "transformers-js-2.2b": transformers_js([f"transformers-js-2.2b-{f}.json" for f in JS_FORMS]),
    "smolvlm-256m-peers": smolvlm_peers("smolvlm-256m-peers-head-to-head.json"),
    "smolvlm-256m-peers-amx": smolvlm_peers("smolvlm-256m-peers-head-to-head-amx.json"),
    "smolvlm-2.2b-peers-amx": smolvlm_peers("smolvlm-2.2b-peers-head-to-head-amx.json"),
    "vqa-peers": vqa_peers, "smolvlm-vqa-peers": smolvlm_vqa_peers, "streaming-rss": streaming,
    "matching-designs": matching_designs, "commands": commands,
}
PAGES = ("README.md", "docs", "benchmarks/README.md")
BLOCK = re.compile(r"(<!-- table:([\w.-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def pages() -> list[Path]:
    out = []
    for p in PAGES:
        path = ROOT / p
        out += sorted(path.glob("*.md")) if path.is_dir() else [path]
    return out


def regenerate(check: bool) -> list[str]:
    """Every page's blocks from their results; the names of blocks that differed (rewritten unless `check`)."""
    stale, seen = [], set()
    for page in pages():
        text = page.read_text()

        def fill(m: re.Match) -> str:
            name = m.group(2)
            if name not in TABLES:
                raise SystemExit(f"error: {page.relative_to(ROOT)}: no table named {name!r}; known: "
                                 f"{', '.join(TABLES)}")
            seen.add(name)
            body = "\n".join(TABLES[name]()) + "\n"
            if body != m.group(3):
                stale.append(f"{page.relative_to(ROOT)}: {name}")
            return m.group(1) + body + m.group(4)

        new = BLOCK.sub(fill, text)
        if not check and new != text:
            page.write_text(new)
    missing = [n for n in TABLES if n not in seen]
    if missing:
        raise SystemExit(f"error: tables placed on no page: {', '.join(missing)}")
    return stale


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is not what its "
                    "results file renders")
    a = ap.parse_args()
    unknown = sorted(p.name for p in RESULTS_DIR.glob("*.json") if p.name not in RESULTS)
    if unknown:
        print(f"error: benchmarks/results/{unknown[0]} has no command in benchmarks/tables.py RESULTS",
              file=sys.stderr)
        return 1
    stale = regenerate(a.check)
    for s in stale:
        print(f"{'stale' if a.check else 'rewritten'}: {s}")
    return 1 if a.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
