"""Parsers against real published output (tests/fixtures/*/SOURCES.md says where each came from)."""

import json
from pathlib import Path

import pytest

from vlmedge.runtime.parsers import parse_export_times, parse_tegrastats, parse_trtexec, trt_version

FIX = Path(__file__).parent / "fixtures"


def test_trt10_summary_with_three_percentiles():
    r = parse_trtexec((FIX / "trtexec" / "trt10-performance-summary.log").read_text())
    assert r["throughput_qps"] == 130.298
    lat = r["latency"]
    assert (lat["min_ms"], lat["max_ms"], lat["mean_ms"], lat["p50_ms"]) == (5.38672, 13.3664, 7.60628, 7.16092)
    assert (lat["p90_ms"], lat["p95_ms"], lat["p99_ms"]) == (10.2996, 10.8698, 12.9675)
    assert r["gpu_compute"]["p50_ms"] == 7.14139 and r["h2d"]["min_ms"] == 0.0065918  # "H2D Latency" kept apart
    assert r["enqueue"]["p99_ms"] == 14.1848


def test_trt84_single_percentile_and_cv_warning():
    r = parse_trtexec((FIX / "trtexec" / "trt84-single-percentile-unstable.log").read_text())
    assert r["throughput_qps"] == 716.632
    assert r["latency"]["p99_ms"] == 1.55853 and "p90_ms" not in r["latency"]
    assert r["latency"]["p50_ms"] == 1.38037 and r["cv_percent"] == 2.10486


def test_trt7_block_format():
    r = parse_trtexec((FIX / "trtexec" / "trt7-host-latency-blocks.log").read_text())
    assert r["latency"]["min_ms"] == 1.64058 and r["latency"]["p50_ms"] == 1.65601
    assert r["latency"]["p99_ms"] == 1.67065
    assert r["end_to_end"]["p99_ms"] == 3.03931 and r["end_to_end"]["max_ms"] == 7.65552


def test_prefixless_lines_and_exponents():
    text = ("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --onnx=m.onnx\n"
            "Throughput: 1.5e+03 qps\n"
            "Latency: min = 6.5e-01 ms, max = 2 ms, mean = 0.7 ms, median = 0.69 ms, percentile(90%) = 0.8 ms\n")
    r = parse_trtexec(text)
    assert r["version"] == "10.3.0" and r["throughput_qps"] == 1500.0
    assert r["latency"]["min_ms"] == 0.65 and r["latency"]["p90_ms"] == 0.8
    assert trt_version("[TensorRT v8601]") is None and trt_version("TensorRT.trtexec [TensorRT v8601]") == "8.6.1"
    with pytest.raises(ValueError, match="no trtexec performance summary"):
        parse_trtexec("[I] Building engine...\n")


def test_export_times_json():
    records = [{"startEnqMs": i, "endEnqMs": i + 0.1, "latencyMs": 1.0 + i / 100, "computeMs": 0.9 + i / 100}
               for i in range(100)]
    r = parse_export_times(records)
    assert r["samples"] == 100 and r["latency"]["min_ms"] == 1.0 and r["latency"]["max_ms"] == pytest.approx(1.99)
    assert r["latency"]["p50_ms"] == pytest.approx(1.495)
    with pytest.raises(ValueError):
        parse_export_times("[]")


def test_tegrastats_old_and_new():
    old = parse_tegrastats((FIX / "tegrastats" / "tx2-jetpack4.txt").read_text())
    assert (old["ram_used_mb"], old["ram_total_mb"]) == (2020, 7852) and "swap_used_mb" not in old
    assert len(old["cpu"]) == 6 and old["cpu"][1] == {"load_percent": 21, "mhz": 345}
    assert old["power_mw"]["VDD_IN"] == {"now": 3140, "avg": 3208} and old["temperature_c"]["GPU"] == 41.0
    new = parse_tegrastats((FIX / "tegrastats" / "agx-orin-jetpack6.txt").read_text())
    assert new["ram_total_mb"] == 62801 and new["swap_used_mb"] == 19 and len(new["cpu"]) == 12
    assert new["gpu_load_percent"] == 0 and new["power_mw"]["VIN_SYS_5V0"]["now"] == 4025
    assert "GPU" not in new["temperature_c"] and new["temperature_c"]["tj"] == 44.343  # -256C = sensor absent
    with pytest.raises(ValueError):
        parse_tegrastats("hello")


def test_tensorrt_precision_follows_the_export_per_version():
    from vlmedge.runtime.trtexec import PrecisionError, precision_flags

    assert precision_flags((11, 0), "int8-static") == [] and precision_flags((11, 0), "fp16") == []
    assert precision_flags((10, 3), "fp16") == ["--stronglyTyped"]
    assert precision_flags((8, 6), "fp16") == ["--fp16"]
    assert precision_flags((8, 6), "int8-static") == ["--int8", "--fp16"]
    with pytest.raises(PrecisionError, match="no QDQ nodes"):
        precision_flags((8, 6), "int8-dynamic")


def test_tensorrt_target_runs_trtexec_and_parses_it(tiny_export, tmp_path):
    """trtexec is replaced by a script that replays a real TensorRT 10 log: this checks our plumbing (command,
    version detection, parsing, result shape), not TensorRT itself, which is not installed here."""
    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.targets.tensorrt import benchmark

    log = FIX / "trtexec" / "trt10-performance-summary.log"
    fake = tmp_path / "trtexec"
    fake.write_text(f"#!/bin/sh\necho '&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec '\"$*\"\n"
                    f"case \"$*\" in *--help*) exit 0;; esac\ncat {log}\n")
    fake.chmod(0o755)
    r = benchmark(tiny_export, MeasureConfig(), trtexec=str(fake))
    assert r["runtime"] == "TensorRT 10.3 (trtexec)" and r["image"]["p90_ms"] == 10.2996
    assert "--stronglyTyped" in r["command"] and "--exportTimes=" in r["command"]
    assert r["pair_estimate"]["p50_ms"] == pytest.approx(2 * 7.16092)
    # the board runner builds the same engine: same precision flags and warm-up (only where files go differs)
    from vlmedge.targets.runner import run_trtexec

    board = run_trtexec(tiny_export, str(fake), MeasureConfig())
    host = [a for a in json.loads(r["command"]) if not a.startswith(("--saveEngine", "--exportTimes"))]
    assert board["command"] == host and board["runtime"] == "TensorRT 10.3 (trtexec)"
