"""Parsers for what devices print: trtexec performance summaries (TensorRT 7 to 11), `--exportTimes` JSON, tegrastats.

Standard library only: the Jetson runner imports this module on the board.

trtexec (samples/common/sampleReporting.cpp) prints, per metric, one line::

    [10/03/2024-10:47:59] [I] Latency: min = 5.38672 ms, max = 13.3664 ms, mean = 7.60628 ms, median = 7.16092 ms,
                                       percentile(90%) = 10.2996 ms, percentile(95%) = 10.8698 ms, ...

with or without the ``[date] [I]`` prefix, one or several percentiles; TensorRT 7 printed blocks instead
(``Host Latency`` then ``min: 1.64 ms (end to end 1.66 ms)`` ... ``percentile: 1.67 ms at 99% (...)``).
"""

from __future__ import annotations

import json
import re
from typing import Any

_PREFIX = re.compile(r"^(?:\[[^\]]*\]\s*)?(?:\[[A-Z]\]\s*)?")
_PAIR = re.compile(r"(min|max|mean|median|percentile\((\d+(?:\.\d+)?)%\))\s*=\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*ms")
_VERSION = re.compile(r"TensorRT\.trtexec\s*\[TensorRT v(\d+)\]")
_SUMMARY_NAMES = {"Latency": "latency", "End-to-End Host Latency": "end_to_end", "Enqueue Time": "enqueue",
                  "H2D Latency": "h2d", "GPU Compute Time": "gpu_compute", "D2H Latency": "d2h"}
_TRT7_BLOCKS = {"Host Latency": "latency", "GPU Compute": "gpu_compute", "Enqueue Time": "enqueue",
                "H2D Latency": "h2d", "D2H Latency": "d2h"}
_TRT7_LINE = re.compile(r"^(min|max|mean|median|percentile):\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*ms(?:\s*at\s*([\d.]+)%)?"
                        r"(?:\s*\(end to end\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*ms)?")


def _strip(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\n")).strip()


def trt_version(text: str) -> str | None:
    """'10.3.0' from the run header `&&&& RUNNING TensorRT.trtexec [TensorRT v100300]` (8.x prints v8601)."""
    m = _VERSION.search(text)
    if not m:
        return None
    v = m.group(1)
    if len(v) >= 6:  # v100300: major 10, minor 03, patch 00
        return f"{int(v[:-4])}.{int(v[-4:-2])}.{int(v[-2:])}"
    return f"{int(v[0])}.{int(v[1])}.{int(v[2:])}"  # v8601 -> 8.6.1


def _stats(pairs: dict[str, float], percentiles: dict[float, float]) -> dict[str, Any]:
    out: dict[str, Any] = {f"{k}_ms": v for k, v in pairs.items()}
    if "median_ms" in out:
        out["p50_ms"] = out["median_ms"]
    for p, v in percentiles.items():
        out[f"p{p:g}_ms"] = v
    out["percentiles"] = {f"{p:g}": v for p, v in percentiles.items()}
    return out


def parse_trtexec(text: str) -> dict[str, Any]:
    """The performance summary of a trtexec log: throughput and latency statistics per metric, warnings, version."""
    result: dict[str, Any] = {"version": trt_version(text), "warnings": []}
    block: str | None = None
    trt7: dict[str, tuple[dict, dict]] = {}
    for raw in text.splitlines():
        line = _strip(raw)
        if not line:
            continue
        if raw.lstrip().startswith("[") and "] [W]" in raw:
            result["warnings"].append(line)
            m = re.search(r"coefficient of variance = ([\d.]+)%", line)
            if m:
                result["cv_percent"] = float(m.group(1))
        m = re.match(r"^Throughput:\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*qps", line)
        if m:
            result["throughput_qps"] = float(m.group(1))
            continue
        name, sep, rest = line.partition(":")
        if sep and name in _SUMMARY_NAMES and "=" in rest:
            pairs, percentiles = {}, {}
            for key, pct, value in _PAIR.findall(rest):
                if pct:
                    percentiles[float(pct)] = float(value)
                else:
                    pairs[key] = float(value)
            result[_SUMMARY_NAMES[name]] = _stats(pairs, percentiles)
            block = None
            continue
        if line in _TRT7_BLOCKS:
            block = _TRT7_BLOCKS[line]
            trt7[block] = ({}, {})
            continue
        if block:
            m7 = _TRT7_LINE.match(line)
            if m7:
                key, value, pct, e2e = m7.groups()
                pairs, percentiles = trt7[block]
                if key == "percentile":
                    percentiles[float(pct or 99)] = float(value)
                else:
                    pairs[key] = float(value)
                if e2e and block == "latency":
                    e_pairs, e_pct = trt7.setdefault("end_to_end", ({}, {}))
                    if key == "percentile":
                        e_pct[float(pct or 99)] = float(e2e)
                    else:
                        e_pairs[key] = float(e2e)
                continue
            m = re.match(r"^throughput:\s*([-+]?[\d.]+)\s*qps", line)
            if m and block == "latency":
                result.setdefault("throughput_qps", float(m.group(1)))
            block = None if not line.startswith(("walltime", "throughput")) else block
    for name, (pairs, percentiles) in trt7.items():
        result.setdefault(name, _stats(pairs, percentiles))
    if "latency" not in result:
        raise ValueError("no trtexec performance summary found (expected a 'Latency: min = ...' line)")
    return result


def parse_export_times(data: str | list) -> dict[str, Any]:
    """`trtexec --exportTimes=FILE`: a JSON list of per-inference records (latencyMs, computeMs, ...)."""
    records = json.loads(data) if isinstance(data, str) else data
    if not isinstance(records, list) or not records:
        raise ValueError("exportTimes: expected a non-empty JSON list of timing records")
    out: dict[str, Any] = {"samples": len(records)}
    for key, name in (("latencyMs", "latency"), ("computeMs", "gpu_compute"), ("endToEndMs", "end_to_end"),
                      ("inMs", "h2d"), ("outMs", "d2h")):
        values = sorted(float(r[key]) for r in records if key in r)
        if values:
            out[name] = _percentiles(values)
    return out


def _percentiles(values: list[float]) -> dict[str, float]:
    def pct(p: float) -> float:
        k = (len(values) - 1) * p / 100
        lo, hi = int(k), min(int(k) + 1, len(values) - 1)
        return values[lo] + (values[hi] - values[lo]) * (k - lo)

    return {"min_ms": values[0], "max_ms": values[-1], "mean_ms": sum(values) / len(values), "p50_ms": pct(50),
            "p90_ms": pct(90), "p99_ms": pct(99)}


_TEGRA_RAM = re.compile(r"RAM (\d+)/(\d+)MB")
_TEGRA_SWAP = re.compile(r"SWAP (\d+)/(\d+)MB")
_TEGRA_CPU = re.compile(r"CPU \[([^\]]*)\]")
_TEGRA_GPU = re.compile(r"GR3D_FREQ (\d+)%")
_TEGRA_TEMP = re.compile(r"\b([A-Za-z][\w]*)@(-?[\d.]+)C\b")
_TEGRA_POWER = re.compile(r"\b([A-Z][A-Z0-9_]+) (\d+)(?:mW)?/(\d+)(?:mW)?\b")


def parse_tegrastats(line: str) -> dict[str, Any]:
    """One tegrastats line: RAM, swap, per-core CPU load and clock, GPU load, temperatures, power rails (mW)."""
    out: dict[str, Any] = {}
    m = _TEGRA_RAM.search(line)
    if not m:
        raise ValueError(f"not a tegrastats line: {line[:60]!r}")
    out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _TEGRA_SWAP.search(line)
    if m:
        out["swap_used_mb"], out["swap_total_mb"] = int(m.group(1)), int(m.group(2))
    m = _TEGRA_CPU.search(line)
    if m:
        cores = []
        for c in m.group(1).split(","):
            load, _, freq = c.partition("%@")
            cores.append({"load_percent": int(load) if load.isdigit() else None,
                          "mhz": int(freq) if freq.isdigit() else None})
        out["cpu"] = cores
    m = _TEGRA_GPU.search(line)
    if m:
        out["gpu_load_percent"] = int(m.group(1))
    out["temperature_c"] = {k: float(v) for k, v in _TEGRA_TEMP.findall(line) if float(v) > -100}
    out["power_mw"] = {k: {"now": int(a), "avg": int(b)} for k, a, b in _TEGRA_POWER.findall(line)
                       if k not in ("RAM", "SWAP")}
    return out
