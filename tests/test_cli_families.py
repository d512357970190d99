"""Every single-stage command on every family, as a user types it: train, eval, prune, distill, export, quantize and
bench on a tiny model of each family, each exiting 0 and writing what it says."""

from __future__ import annotations

import json

import pytest

from vlmedge.cli import main

FAST_EVAL = {"dual_encoder": ["--zero-shot-images", "36", "--retrieval-pairs", "32", "--hard-negative-pairs", "16"],
             "generative": ["--vqa-questions", "8"],
             "matching": ["--zero-shot-images", "36", "--retrieval-pairs", "32", "--hard-negative-pairs", "16",
                          "--rerank-k", "4"]}
PRESETS = {"dual_encoder": "tiny", "generative": "vqa-tiny", "matching": "match-tiny"}
ARTIFACTS = {"dual_encoder": {"image_encoder.onnx", "text_encoder.onnx"},
             "generative": {"vision_encoder.onnx", "embed_tokens.onnx", "decoder_model_merged.onnx"},
             "matching": {"image_encoder.onnx", "text_encoder.onnx", "matcher.onnx"}}


@pytest.mark.parametrize("family", list(PRESETS))
def test_every_single_stage_command_runs_on_the_family(family, tmp_path, capsys):
    def run(*args: str) -> str:
        code = main(list(args))
        out, err = capsys.readouterr()
        assert code == 0, f"vlmedge {' '.join(args)} exited {code}: {err}"
        return out

    model, pruned, student = tmp_path / "model", tmp_path / "pruned", tmp_path / "student"
    onnx, int8 = tmp_path / "onnx", tmp_path / "int8"
    run("train", "--preset", PRESETS[family], "--steps", "4", "--batch-size", "16", "--data-count", "256",
        "--out", str(model), "--quiet")
    assert (model / "model.safetensors").is_file() and (model / "artifact.json").is_file()

    run("eval", str(model), *FAST_EVAL[family], "--quiet")
    record = json.loads((model / "eval.json").read_text())
    assert record["metrics"] and record["data"]

    # the help's own example, on every family: parts a family lacks are not asked of it
    summary = run("prune", str(model), "--out", str(pruned), "--heads", "0.5", "--mlp", "0.5",
                  "--calibration-batches", "1", "--batch-size", "8", "--no-eval")
    assert (pruned / "model.safetensors").is_file() and "GFLOPs" in summary
    after = json.loads((pruned / "artifact.json").read_text())
    assert after["info"]["after"]["parameters"] < after["info"]["before"]["parameters"], after["info"]

    run("distill", str(pruned), "--teacher", str(model), "--out", str(student), "--steps", "2", "--batch-size", "8",
        "--data-count", "256", "--no-eval", "--quiet")
    assert (student / "model.safetensors").is_file()

    run("export", str(student), "--out", str(onnx), "--no-eval", "--no-tune-threads", "--parity-questions", "2",
        "--quiet")
    assert ARTIFACTS[family] <= {p.name for p in onnx.rglob("*.onnx")} and (onnx / "manifest.json").is_file()

    run("quantize", str(onnx), "--out", str(int8), "--mode", "dynamic", "--no-eval", "--no-tune-threads",
        "--calibration-batches", "1", "--batch-size", "2", "--agreement-questions", "2", "--quiet")
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest.get("quantization") and len(manifest["files"]) == len(ARTIFACTS[family]), manifest
    assert all((int8 / f).is_file() for f in manifest["files"].values()), manifest["files"]

    timings = tmp_path / "bench.json"
    run("bench", str(int8), "--target", "cpu", "--warmup", "1", "--min-runs", "3", "--min-seconds", "0",
        "--json", str(timings))
    assert json.loads(timings.read_text())
