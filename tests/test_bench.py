import json

from vlmedge.cli import main


def test_bench_export_folder_model_folder_and_onnx_file(tiny_export, tiny_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    fast = ["--warmup", "1", "--min-runs", "5", "--min-seconds", "0.01"]
    assert main(["bench", str(tiny_export), "--target", "cpu", "--json", str(out), *fast]) == 0
    rec = json.loads(out.read_text())["results"][tiny_export.name]["cpu"]
    for part in ("image", "text", "pair", "zero_shot"):
        assert rec[part]["p50_ms"] > 0 and rec[part]["samples"] >= 5
    assert main(["bench", str(tiny_model), "--target", "torch", "--json", str(out), *fast]) == 0
    assert json.loads(out.read_text())["results"][tiny_model.name]["torch"]["runtime"].startswith("torch")
    assert main(["bench", str(tiny_export / "image_encoder.onnx"), "--json", str(out), *fast]) == 0
    assert json.loads(out.read_text())["results"]["image_encoder.onnx"]["cpu"]["model"]["samples"] >= 5
    assert "p90" in capsys.readouterr().out


def test_bench_refuses_a_target_that_cannot_run_the_artifact(tiny_model, capsys):
    assert main(["bench", str(tiny_model), "--target", "cpu"]) == 1
    assert "targets for it: torch" in capsys.readouterr().err


def test_time_fn_reaches_min_runs_and_keeps_raw_samples_on_request():
    import time

    from vlmedge.runtime.measure import MeasureConfig, time_fn

    calls = []
    r = time_fn(lambda: (calls.append(1), time.sleep(0.001)), MeasureConfig(warmup=2, min_runs=7, min_seconds=0.0),
                keep_samples=True)
    assert len(calls) == 9 and r["samples"] == 7 and len(r["samples_ms"]) == 7
    assert min(r["samples_ms"]) >= 1.0 and r["p50_ms"] >= 1.0
    assert "samples_ms" not in time_fn(lambda: None, MeasureConfig(warmup=0, min_runs=3, min_seconds=0.0))


def test_pool_rounds_takes_each_figure_as_the_median_over_rounds(tiny_export):
    """Three real measurements of one export: the pooled p90 is the middle round's, the sample count their sum,
    the extremes the extremes; a figure no round has stays absent."""
    from vlmedge.runtime.measure import MeasureConfig, pool_rounds
    from vlmedge.targets import get_target

    cfg = MeasureConfig(warmup=1, min_runs=5, min_seconds=0.0)
    rounds = [get_target("cpu")(tiny_export, cfg) for _ in range(3)]
    pooled = pool_rounds(rounds)
    for part in ("image", "pair"):
        p90 = sorted(r[part]["p90_ms"] for r in rounds)
        assert pooled[part]["p90_ms"] == p90[1]
        assert pooled[part]["samples"] == sum(r[part]["samples"] for r in rounds)
        assert pooled[part]["min_ms"] == min(r[part]["min_ms"] for r in rounds)
        assert pooled[part]["max_ms"] == max(r[part]["max_ms"] for r in rounds)
        assert pooled[part]["stable"] == all(r[part]["stable"] for r in rounds)
    assert pooled["threads"] == rounds[0]["threads"] and pooled["device"] == rounds[0]["device"]


def test_bench_profile_lists_kernel_time_per_op_type(tiny_export, tiny_model, tmp_path, capsys, monkeypatch):
    out = tmp_path / "profile.json"
    monkeypatch.chdir(tiny_export.parent)  # a relative path must survive the profiler's change of directory
    assert main(["bench", tiny_export.name, "--profile", "--min-runs", "5", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())
    for tower in ("image", "text"):
        ops = {r["op_type"] for r in prof[tower]}
        assert "MatMul" in ops and all(r["ms_per_run"] > 0 and r["nodes"] >= 1 for r in prof[tower])
        assert abs(sum(r["share"] for r in prof[tower]) - 1) < 1e-6
    assert "image: ORT kernel time by op" in capsys.readouterr().out
    assert main(["bench", str(tiny_model), "--profile"]) == 1
    assert "needs an export folder" in capsys.readouterr().err


def test_bench_profile_of_a_generative_export_splits_prefill_from_the_cached_step(vqa_export, tmp_path):
    """Each graph on the family's real feeds; the decoder's prefill (empty cache, the whole prompt) and its cached
    step (two tokens) apart, each with its own kernel times."""
    out = tmp_path / "profile.json"
    assert main(["bench", str(vqa_export), "--profile", "--min-runs", "3", "--json", str(out), "--threads", "1"]) == 0
    prof = json.loads(out.read_text())
    decoder = sorted((k for k in prof if k.startswith("decoder inputs_embeds 1x")), key=lambda k: -int(k.split("x")[1]))
    assert {"vision", "embed"} <= set(prof) and len(decoder) == 2 and decoder[1].split("x")[1] == "2", list(prof)
    prefill, step = (sum(r["ms_per_run"] for r in prof[k]) for k in decoder)
    assert all("MatMul" in {r["op_type"] for r in prof[k]} for k in decoder) and prefill > step


def test_device_runner_tunes_threads_when_the_artifact_was_tuned_elsewhere(tiny_export, tmp_path):
    """The on-board runner re-tunes an artifact tuned on another machine, and measures with its own choice."""
    import os
    import shutil

    import pytest

    from vlmedge.runtime.measure import MeasureConfig, machine_key
    from vlmedge.targets.runner import run_ort

    if (os.cpu_count() or 1) < 2:
        pytest.skip("thread tuning needs at least 2 cores")
    board = tmp_path / "bundle"
    shutil.copytree(tiny_export, board)
    manifest = json.loads((board / "manifest.json").read_text())
    manifest["threads"] = {"image": 7, "text": 7, "tuned_on": {"cpu": "the build server", "cores": 64}}
    (board / "manifest.json").write_text(json.dumps(manifest))
    fast = MeasureConfig(warmup=1, min_runs=3, min_seconds=0.0, throughput_batch=2)
    result = run_ort(board, fast, providers=["CPUExecutionProvider"])
    tuning = result["thread_tuning"]
    assert tuning["tuned_on"] == machine_key()
    assert result["tower_threads"] == {"image": tuning["image"], "text": tuning["text"]}
    assert run_ort(board, fast, providers=["CPUExecutionProvider"], tune=False)["tower_threads"] == \
        {"image": os.cpu_count(), "text": os.cpu_count()}  # ORT's default, not the other machine's 7


def test_sessions_spin_within_a_run_and_stop_at_its_end_as_set(tiny_export, monkeypatch):
    """Every session stops its threads' spinning when a run ends; `measure.SPINNING` says whether they spin within
    one; both compute the same."""
    import numpy as np

    from vlmedge.runtime import measure
    from vlmedge.runtime.onnx import open_session

    sessions = {}
    for spin in (True, False):
        monkeypatch.setattr(measure, "SPINNING", spin)
        sessions[spin] = open_session(tiny_export / "image_encoder.onnx", 2)
    for spin, sess in sessions.items():
        opts = sess.get_session_options()
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spin else "0")
        assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    shape = [d if isinstance(d, int) else 1 for d in sessions[True].get_inputs()[0].shape]
    feed = {"pixel_values": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    assert np.allclose(*(s.run(None, feed)[0] for s in sessions.values()), atol=1e-6)
