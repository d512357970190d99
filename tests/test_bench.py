import json

from vlmedge.cli import main


def test_bench_export_folder_model_folder_and_onnx_file(tiny_export, tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    fast = ["--warmup", "1", "--min-runs", "5", "--min-seconds", "0.01"]
    assert main(["bench", str(tiny_export), "--target", "cpu", "--json", str(out), *fast]) == 0
    rec = json.loads(out.read_text())["results"][tiny_export.name]["cpu"]
    for part in ("image", "text", "pair", "zero_shot"):
        assert rec[part]["p50_ms"] <= rec[part]["p90_ms"] <= rec[part]["p99_ms"] and rec[part]["samples"] >= 5
    assert main(["bench", str(tiny_model), "--target", "torch", "--json", str(out), *fast]) == 0
    assert json.loads(out.read_text())["results"][tiny_model.name]["torch"]["runtime"].startswith("torch")
    assert main(["bench", str(tiny_export / "image_encoder.onnx"), "--json", str(out), *fast]) == 0
    assert json.loads(out.read_text())["results"]["image_encoder.onnx"]["cpu"]["model"]["samples"] >= 5
    assert "p90" in capsys.readouterr().out


def test_bench_refuses_a_target_that_cannot_run_the_artifact(tiny_model, capsys):
    assert main(["bench", str(tiny_model), "--target", "cpu"]) == 1
    assert "targets for it: torch" in capsys.readouterr().err
