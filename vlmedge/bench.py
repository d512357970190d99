"""`vlmedge bench`: measure a run folder, an artifact folder or a single ONNX file on one or more targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from . import families
from .data import DEFAULT_SOURCE
from .errors import VlmedgeError
from .options import flat
from .runtime.measure import MeasureConfig, cpu_info, environment, time_fn
from .runtime.onnx import open_session
from .targets import TARGET_KINDS, artifact_kind, get_target


def bench_paths(paths: list[Path], targets: list[str], cfg_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Several artifacts in one run (e.g. a model folder on `torch` and its export on `cpu`), one after the other on
    the same machine; results keyed by artifact name."""
    runs = [bench_path(p, targets, cfg_kwargs) for p in paths]
    merged = runs[0]
    for r in runs[1:]:
        for name, per_target in r["results"].items():
            merged["results"].setdefault(name, {}).update(per_target)
    return merged


def bench_path(path: Path, targets: list[str], cfg_kwargs: dict[str, Any]) -> dict[str, Any]:
    if not path.exists():
        raise VlmedgeError(f"{path}: not found")
    report = json.loads((path / "report.json").read_text()) if (path / "report.json").is_file() else None
    steps = [s["path"] for s in report["steps"]] if report else [path]
    family = None if path.is_file() else families.of(steps[0])  # a family's settings (image_splitting) are its own
    cfg = families.configure(MeasureConfig, cfg_kwargs, family)
    results: dict[str, dict[str, Any]] = {}
    if path.is_file() and path.suffix == ".onnx":
        results[path.name] = {"cpu": bench_onnx_file(path, cfg)}
    elif report is not None:
        for step in report["steps"]:
            for t in targets:
                if TARGET_KINDS[t] == step["kind"]:
                    results.setdefault(step["name"], {})[t] = get_target(t)(step["path"], cfg)
    else:
        kind = artifact_kind(path)
        usable = [t for t in targets if TARGET_KINDS[t] == kind]
        if not usable:
            raise VlmedgeError(f"{path} is a {kind} folder; targets for it: "
                               f"{', '.join(t for t, k in TARGET_KINDS.items() if k == kind)}")
        results[path.name] = {t: get_target(t)(path, cfg) for t in usable}
    return {"environment": environment(), "measure": flat(cfg), "results": results}


def bench_onnx_file(path: Path, cfg: MeasureConfig) -> dict[str, Any]:
    """One ONNX file with random inputs (dynamic dimensions: batch 1, sequence 16)."""
    sess = open_session(path, cfg.threads)
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        shape = [d if isinstance(d, int) else (1 if i == 0 else 16) for i, d in enumerate(inp.shape)]
        feeds[inp.name] = (rng.integers(0, 100, shape).astype(np.int64) if "int" in inp.type
                           else rng.standard_normal(shape).astype(np.float32))
    return {"target": "cpu", "device": cpu_info()[0], "threads": cfg.threads, "batch": 1,
            "model": time_fn(lambda: sess.run(None, feeds), cfg)}


def print_bench(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="vlmedge bench (ms, batch 1)")
    for col in ("artifact", "target", "part", "p50", "p90", "p99", "cv", "samples"):
        table.add_column(col, justify="left" if col in ("artifact", "target", "part") else "right")
    for name, per_target in results["results"].items():
        for target, rec in per_target.items():
            for part in ("image", "text", "pair", "zero_shot", "model", "vision", "prefill", "ttft", "decode",
                         "answer", "rerank", "query"):
                s = rec.get(part)
                if s:
                    table.add_row(name, target, part, f"{s['p50_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['p99_ms']:.2f}",
                                  f"{s['cv']:.2f}", str(s["samples"]))
    Console().print(table)


def profile_export(folder: Path, runs: int = 50, threads: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per-op-type time of each graph of an export folder at batch 1, from ONNX Runtime's own profiler, on the real
    feeds the family makes for calibration (one held-out shapes sample; a generative decoder's prefill and its
    cached step apart).

    Returns, per graph and feed (`decoder inputs_embeds 1x79x576`), rows {op_type, ms_per_run, share, nodes}
    sorted by time: what a speed push starts from (unfused subgraphs, fp32 islands between quantized ops, layout
    conversions show up here).
    """
    import tempfile

    if artifact_kind(folder) != "onnx":
        raise VlmedgeError(f"{folder}: --profile needs an export folder (manifest.json)")
    out: dict[str, list[dict[str, Any]]] = {}
    family = families.of(folder)
    feeds = family.calibration_feeds(family.adapter(folder, threads=threads), DEFAULT_SOURCE, 1, 1, 0)
    with tempfile.TemporaryDirectory() as tmp:
        enc = family.adapter(folder, threads=threads, profile=Path(tmp) / "ort")
        for graph, sess in enc.sessions.items():
            labels = []
            for feed in feeds[graph]:
                first = next(iter(feed))
                labels.append(f"{graph} {first} {'x'.join(map(str, feed[first].shape))}")
                for _ in range(runs):
                    sess.run(None, feed)
            events = json.loads(Path(sess.end_profiling()).read_text())
            for k, label in enumerate(labels):
                out[label if len(labels) > 1 else graph] = _op_table(_runs(events, k * runs, (k + 1) * runs), runs)
    return out


def _runs(events: list[dict[str, Any]], first: int, last: int) -> list[dict[str, Any]]:
    """The kernel events of the session's runs first..last-1 (in the order they ran; the profiler's model_run
    events bound each run)."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")[first:last]
    return [e for e in events if any(a <= e.get("ts", -1) <= b for a, b in spans)]


def _op_table(events: list[dict[str, Any]], runs: int) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = {}
    nodes: dict[str, set[str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals.setdefault(op, []).append(e["dur"] / 1e3)
            nodes.setdefault(op, set()).add(e["name"])
    all_ms = sum(sum(v) for v in totals.values()) or 1.0
    rows = [{"op_type": op, "ms_per_run": sum(v) / runs, "share": sum(v) / all_ms, "nodes": len(nodes[op])}
            for op, v in totals.items()]
    return sorted(rows, key=lambda r: -r["ms_per_run"])


def print_profile(profile: dict[str, list[dict[str, Any]]], top: int = 12) -> None:
    from rich.console import Console
    from rich.table import Table

    for tower, rows in profile.items():
        table = Table(title=f"{tower}: ORT kernel time by op")
        for col in ("op type", "ms/run", "share", "nodes"):
            table.add_column(col, justify="left" if col == "op type" else "right")
        for r in rows[:top]:
            table.add_row(r["op_type"], f"{r['ms_per_run']:.3f}", f"{r['share']:.0%}", str(r["nodes"]))
        Console().print(table)
