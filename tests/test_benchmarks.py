"""Every script under benchmarks/ runs here in its tiny mode, so that a change to vlmedge that breaks one fails the
suite (the scripts import vlmedge's configs, families and runtime directly). Real-size runs stay in benchmarks/.

The SmolVLM-256M scripts are seeded with the suite's trained vqa-tiny folder (the same architecture, a fraction of
the width) where each would build its 256M-shaped folder: they export, quantize, time and write their results on it
in seconds, not the minutes the real shape takes. The scripts that run inside the peers' own environments
(OpenVINO, Optimum, INC, llama.cpp) cannot run here: they are compiled, their shell scripts parsed, and the rows
they feed are left out by the scripts that call them (which say so in their results)."""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PEER_ENV_SCRIPTS = ("peers/openvino_smolvlm.py", "peers/optimum_flow.py", "peers/inc_flow.py")


def script(*args: str, timeout: float = 300) -> str:
    """Run a benchmarks/ script from the repository root; its stdout (a failure shows its stderr)."""
    cmd = ["bash", *args] if args[0].endswith(".sh") else [sys.executable, *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def provenance(path: Path, command: str) -> dict:
    """The results file's record of how it was made (benchmarks/provenance.py)."""
    results = json.loads(path.read_text())
    prov = results["provenance"]
    assert prov["command"].startswith(command), prov["command"]
    assert prov["commit"] != "unknown" and len(prov["load_before"]) == 3 and len(prov["load_after"]) == 3
    assert prov["environment"]["cpu_flags"] is not None and "onnxruntime" in prov["environment"]["versions"]
    assert prov["cpu_busy_before"] == (prov["load_before"][0] >= 0.5)
    return results


def seed(folder: Path, **links: Path) -> Path:
    """`folder` with NAME -> target symlinks: what a script finds made and so does not build again."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        (folder / name.replace("_", "-")).symlink_to(target, target_is_directory=True)
    return folder


def test_every_script_is_covered_here():
    """A new script under benchmarks/ needs its tiny run in this file."""
    source = Path(__file__).read_text()
    scripts = sorted(str(p.relative_to(BENCH)) for p in BENCH.rglob("*") if p.suffix in (".py", ".sh"))
    assert [s for s in scripts if s not in source] == []


def test_ceilings_quick():
    out = json.loads(script("benchmarks/ceilings.py", "--quick", "--threads", "1"))
    assert out["128x128x128"]["int8_gops"] > 0 and out["bandwidth_gbps"] > 0


def test_relation_probe_quick(tmp_path):
    script("benchmarks/relation_probe.py", str(tmp_path / "probe.json"), "--quick")
    results = provenance(tmp_path / "probe.json", "python benchmarks/relation_probe.py")
    assert [r["step"] for r in results["reports"]] == [2, 4]
    assert 0 <= results["reports"][-1]["held_out_relation_accuracy"] <= 1


@pytest.mark.parametrize("design", ["blip", "vilt", "lxmert"])
def test_matching_designs_quick(tmp_path, design):
    script("benchmarks/matching_designs.py", design, str(tmp_path / "d.json"), "--quick")
    results = provenance(tmp_path / "d.json", "python benchmarks/matching_designs.py")
    assert results["architecture"] == {"blip": "BlipForImageTextRetrieval", "vilt": "ViltForImageAndTextRetrieval",
                                       "lxmert": "LxmertForPreTraining"}[design]
    assert [r["step"] for r in results["reports"]] == [1, 2]
    assert 0 <= results["reports"][-1]["itm"]["relation"] <= 1


def test_streaming_rss_quick(tmp_path):
    script("benchmarks/streaming_rss.py", str(tmp_path), "--quick")
    results = provenance(tmp_path / "results.json", "python benchmarks/streaming_rss.py")
    assert [r["shards"] for r in results["runs"]] == [1, 2] and results["ratio_2_to_1"] > 0


@pytest.fixture(scope="module")
def smolvlm_256m_run(tmp_path_factory, vqa_model):
    out = seed(tmp_path_factory.mktemp("s256") / "run", model=vqa_model)
    script("benchmarks/smolvlm_256m.py", str(out), "--quick")
    return out


def test_gpu_check_quick_runs_on_the_cpu(tmp_path, vqa_model, smolvlm_256m_run):
    # its vqa-small slot is trained and exported by the script; the 256M slot is seeded, export included
    out = seed(tmp_path / "gpu", smolvlm_256m=vqa_model, smolvlm_256m_onnx=smolvlm_256m_run / "onnx")
    script("benchmarks/gpu_check.sh", str(out), "--quick")
    results = provenance(out / "gpu_check.json", "python benchmarks/gpu_check.py")
    assert results["gpu_tests"]["failures"] == 0 and results["gpu_tests"]["errors"] == 0
    for row in results["models"].values():
        assert row["cpu"]["answer"]["p50_ms"] > 0, row  # the reference row times on any machine
        if results["cuda"] is None:
            assert row["torch-cuda-fp16"] == {"error": "no CUDA GPU"}


def test_smolvlm_256m_quick(smolvlm_256m_run):
    results = provenance(smolvlm_256m_run / "results.json", "python benchmarks/smolvlm_256m.py")
    assert set(results["forms"]) == {"torch eager fp32", "fp32", "int8"} and results["quick"]
    int8 = results["forms"]["int8"]
    assert int8["decode_bound_ms"] > 0 and int8["prefill_decode_steps"] > 0 and results["ceilings"]["int8_gops"] > 0
    steps = results["steps"]  # each step's time and peak RSS, against the memory goal of the fp32 weights' size
    assert set(steps) == {"build", "export", "quantize int8"}
    assert all(steps[k]["peak_rss_gib"] > 0.1 and steps[k]["s"] > 0 for k in ("export", "quantize int8"))
    assert results["memory_goal_gib"] == pytest.approx(2 * results["fp32_weights_gib"] + 1.5, abs=0.01)


def test_smolvlm_peers_quick_times_vlmedge_without_the_peers(tmp_path, vqa_model, smolvlm_256m_run):
    out = seed(tmp_path / "peers", model=vqa_model, vlmedge_fp32=smolvlm_256m_run / "onnx",
               vlmedge_int8=smolvlm_256m_run / "int8")
    script("benchmarks/peers/smolvlm_peers.py", str(out), "--quick", "--row", "vlmedge int8")
    results = provenance(out / "results.json", "python benchmarks/peers/smolvlm_peers.py")
    assert set(results["rows"]) == {"torch eager fp32", "vlmedge int8"}
    assert results["agreement"]["vlmedge int8"]["of"] == 2


def test_genai_decoder_quick(smolvlm_256m_run):
    """vlmedge's decoders timed; onnxruntime-genai's builder's beside them where it is installed (envs.sh genai),
    its fp32 graph equal to vlmedge's; without it, its rows left out and the results say why."""
    script("benchmarks/peers/genai_decoder.py", str(smolvlm_256m_run), "--quick")
    results = provenance(smolvlm_256m_run / "genai-results.json", "python benchmarks/peers/genai_decoder.py")
    assert results["timings"]["vlmedge fp32"]["decode_p50_ms"] > 0
    if "left_out" in results:
        assert not [name for name in results["timings"] if name.startswith("genai")]
    else:
        assert results["parity_fp32"]["decode_logits_max_abs_diff"] < 1e-4
        assert results["graphs"]["genai fp32"]["ops"]["GroupQueryAttention"] > 0


def test_int8_kernels_quick(smolvlm_256m_run):
    """The INT8 form's profile and, where perf may sample, ONNX Runtime's samples classed by kernel."""
    script("benchmarks/int8_kernels.py", str(smolvlm_256m_run / "int8"), "--quick")
    results = provenance(smolvlm_256m_run / "int8" / "kernels.json", "python benchmarks/int8_kernels.py")
    assert max(v["int8_gemm_share"] for v in results["profile"].values()) > 0
    if "samples_left_out" not in results:
        assert results["onnxruntime_samples"] > 0
        assert sum(c["samples"] for c in results["classes"].values()) == results["onnxruntime_samples"]


def test_vision_attention_quick(smolvlm_256m_run):
    """Every attention form computes attention (within int8 rounding of the fp32 one), both int8 forms run their
    products quantized, and the vision graph is set against the ceilings measured beside it."""
    script("benchmarks/vision_attention.py", str(smolvlm_256m_run / "int8"), "--quick")
    results = provenance(smolvlm_256m_run / "int8" / "vision-attention.json", "python benchmarks/vision_attention.py")
    error = results["relative_error"]  # the static form's scores pass through uint8 before the softmax
    assert error["mha-fp32"] < 1e-4 and error["dynamic-int8"] < 0.1 and error["static-int8"] < 0.5
    ops = results["int8_forms_ops"]  # both products quantized, every operand
    assert ops["dynamic-int8"]["MatMulInteger"] == 2 and ops["dynamic-int8"]["DynamicQuantizeLinear"] == 4
    assert ops["static-int8"]["QuantizeLinear"] >= 4 and "MatMul" in ops["static-int8"]
    assert all(v > 0 for v in results["attention_layer_ms"].values()) and results["vision_ms"] > 0
    for ideal, share in (("vision_ideal_ms", "vision_share_of_ceiling"),
                         ("vision_int8_ceiling_ms", "vision_share_of_int8_ceiling")):  # each share from its figures
        assert results[share] > 0
        assert results[share] == pytest.approx(results[ideal] / results["vision_ms"], rel=0.05)  # ms rounded


def test_prefill_kernels_quick(smolvlm_256m_run, tmp_path):
    """Each weight form runs the kernel `vlmedge quantize` gives it, timed at one row and at the latency prompt's
    rows, the attention beside them and the folder's decoder profiled at both lengths."""
    folder = smolvlm_256m_run / "int8"
    script("benchmarks/prefill_kernels.py", str(folder), "--quick", "--out", str(tmp_path / "prefill.json"))
    results = provenance(tmp_path / "prefill.json", "python benchmarks/prefill_kernels.py")
    kernels = results["kernels"]
    assert kernels["int8"]["ops"] == ["DynamicQuantizeMatMul"] and kernels["fp32"]["ops"] == ["MatMul"]
    assert all(kernels[f]["ops"] == ["MatMulNBits"] for f in ("int4-acc4", "int4-b64-acc4", "int4-acc0"))
    assert results["prompt_rows"] > results["sizes"]["heads"]  # the image tokens and the question
    assert all(k["prefill_ms"] > 0 and k["decode_ms"] > 0 and k["prefill_gops"] > 0 for k in kernels.values())
    assert results["int4_over_int8_prefill"] == pytest.approx(
        kernels["int4-acc4"]["prefill_ms"] / kernels["int8"]["prefill_ms"], rel=0.01)
    assert results["attention"]["prefill_ms"] > 0 and results["ceilings"]["int8_gops"] > 0
    ops = {row["op_type"] for rows in results["graphs"][str(folder)].values() for row in rows}
    assert len(results["graphs"][str(folder)]) == 2 and {"DynamicQuantizeMatMul", "GroupQueryAttention"} <= ops


def test_transformers_js_check_quick(smolvlm_256m_run, tmp_path):
    """transformers.js answers from the INT8 export (q8, every graph) as vlmedge's runtime does on its pixels; where
    Node or the package is absent the results say so and the script exits 2."""
    out = tmp_path / "transformers-js.json"
    p = subprocess.run([sys.executable, "benchmarks/transformers_js_check.py", str(smolvlm_256m_run / "int8"),
                        "--quick", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    results = provenance(out, "python benchmarks/transformers_js_check.py")
    if "left_out" in results:
        assert p.returncode == 2 and "error: transformers.js is not installed" in p.stderr
        return
    assert p.returncode == 0, p.stderr[-2000:]
    assert results["dtype"] == "q8" and results["identical"] == results["of"] == 2
    assert all(len(q["ids"]) == 4 and q["pixels_mean_abs_diff"] < 0.05 for q in results["questions"])


def test_spinning_quick(smolvlm_256m_run, tiny_export, tmp_path):
    """Both settings timed on a generative and a dual-encoder export, each scenario's ratio recorded."""
    script("benchmarks/spinning.py", str(smolvlm_256m_run / "int8"), str(tiny_export), "--quick",
           "--out", str(tmp_path / "spinning.json"))
    results = provenance(tmp_path / "spinning.json", "python benchmarks/spinning.py")
    generative, dual = (results["folders"][str(f)] for f in (smolvlm_256m_run / "int8", tiny_export))
    assert {"vision", "decode", "answer"} <= set(generative["on_vs_off_p50"]) and "pair" in dual["on_vs_off_p50"]
    assert all(r > 0 for f in (generative, dual) for r in f["on_vs_off_p90"].values())


def test_smolvlm_vqa_peers_quick(tmp_path, vqa_model, smolvlm_256m_run):
    out = seed(tmp_path / "vqa", vlmedge_fp32=smolvlm_256m_run / "onnx", vlmedge_int8=smolvlm_256m_run / "int8")
    script("benchmarks/peers/smolvlm_vqa_peers.py", str(vqa_model), str(out), "--quick", "--no-peers")
    results = provenance(out / "vqa-results.json", "python benchmarks/peers/smolvlm_vqa_peers.py")
    assert set(results["rows"]) == {"torch eager fp32", "vlmedge fp32", "vlmedge int8"}
    assert results["errors"] == {"openvino": "left out (--no-peers)", "llama.cpp": "left out (--no-peers)"}


def test_smolvlm_cpu_quick(tmp_path, vqa_model):
    script("benchmarks/smolvlm_cpu.py", str(vqa_model), str(tmp_path / "run"), "--quick")
    results = provenance(tmp_path / "run" / "wall.json", "python benchmarks/smolvlm_cpu.py")
    assert results["returncode"] == 0 and [s["name"] for s in results["steps"]][-1].startswith("quantize")


def test_generative_peers_quick(vqa_tiny_run):
    run_dir, _ = vqa_tiny_run
    script("benchmarks/peers/generative.py", str(run_dir), "--quick")
    results = provenance(run_dir / "peers.json", "python benchmarks/peers/generative.py")
    assert results["rows"]["vlmedge fp32 export"]["latency"]["answer"]["p50_ms"] > 0


def test_run_sh_quick(tmp_path):
    """One recipe (each is measured by the same function; the others differ by their overrides)."""
    script("benchmarks/run.sh", "quickstart", "--quick", str(tmp_path), timeout=600)
    for name in ("quickstart",):
        report = provenance(tmp_path / f"{name}.json", "benchmarks/run.sh quickstart --quick")
        assert report["steps"][-1]["name"].startswith("quantize") and (tmp_path / f"{name}.md").is_file()
        planted = (tmp_path / f"{name}-planted.xml").read_text()  # judged as if quantize were removed
        assert "<testcase" in planted and len(report["gates"]) == planted.count("<testcase")


def test_peers_results_md_is_rendered_from_its_results_file(tmp_path):
    """RESULTS.md is generated from results/peers.json (by peers/report_md.py), not typed: rendering it again gives
    the same bytes."""
    out = tmp_path / "RESULTS.md"
    script("benchmarks/peers/run.py", "--render-only", "--from", "benchmarks/results/peers.json", "--results", str(out))
    assert out.read_text() == (BENCH / "RESULTS.md").read_text()


def test_the_docs_tables_are_generated_from_the_results_files():
    """Every table in README.md, docs/ and benchmarks/README.md is what benchmarks/tables.py renders from its results
    file, and every results file has its command there."""
    script("benchmarks/tables.py", "--check")


def test_the_peer_environment_scripts_compile_and_parse():
    """peers/run.sh, envs.sh and the scripts that run in the peers' environments need those environments (minutes
    of downloads and a llama.cpp build): here they are only compiled and parsed."""
    for name in PEER_ENV_SCRIPTS:
        py_compile.compile(str(BENCH / name), doraise=True)
    for name in ("peers/run.sh", "peers/envs.sh"):
        subprocess.run(["bash", "-n", str(BENCH / name)], check=True)
    script("benchmarks/peers/openvino_smolvlm.py", "--help")
