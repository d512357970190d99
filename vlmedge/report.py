"""The run report: one row per step, as report.json (schema `vlmedge.report/1`), report.md, a Pareto plot and a
terminal table.

report.json, the contract CI tools read::

    schema            "vlmedge.report/1"
    recipe            the resolved recipe
    environment       where latency was measured (CPU model, flags, cores, library versions)
    measure           the measurement settings (warm-up, minimum runs and seconds)
    reference         the step speedups are measured against ("teacher" on the "torch" target)
    steps[]           one per step, in pipeline order:
      name, stage, id, parent, kind ("model" | "onnx"), path
      parameters, flops {image, text} (per sample), size_bytes
      metrics {"zero_shot.top1": 0.93, ...}          fractions in [0, 1]
      retention {"zero_shot.top1": 0.99, ...}        metric / teacher's metric
      latency {TARGET: {target, device, threads, runtime, precision, batch,
                        SCENARIO: {p50_ms, p90_ms, p99_ms, mean_ms, min_ms, max_ms, cv, samples, stable},
                        throughput {batch, images_per_s} (dual encoders), peak_rss_mb}}
                        scenarios per family: image|text|pair|zero_shot (dual encoder), vision|prefill|ttft|decode|answer
                        (generative), image|rerank|query (matching)
      speedup_vs_teacher {TARGET: {SCENARIO_p50, SCENARIO_p90}}   teacher torch latency / this step's, for every
                                                                   scenario both have (image_p50, pair_p90, ...)
      speedup_vs_export {TARGET: {SCENARIO_p50, SCENARIO_p90}}    the run's fp32 export's latency on the same target
                                                                   / this step's (ONNX steps): what quantizing bought
      compression       the run's fp32 export's ONNX bytes / this step's (ONNX steps after the export)
      info              stage-specific facts (pruning shape, parity, quantization scheme, ...)
    gates[]           budget results when the recipe has gates: {budget, passed, value, message}
    complete          false while stages are still running
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from . import families
from .disk import write_json, write_text
from .errors import VlmedgeError
from .gate import Result, check, parse_budget
from .recipe import to_dict
from .runtime.measure import threads_label

SCHEMA = "vlmedge.report/1"
REFERENCE = ("teacher", "torch")


def _family(report: dict):
    """The run's model family: its teacher's (a two-stage recipe's tower is a dual encoder)."""
    steps = report["steps"]
    teacher = next((s for s in steps if s["name"] == REFERENCE[0]), steps[0] if steps else {})
    return families.get(teacher.get("family") or families.DEFAULT)


def _scenarios(record: dict) -> list[str]:
    return [k for k, v in record.items() if isinstance(v, dict) and {"p50_ms", "p90_ms"} <= set(v)]


def _threads(lat: dict[str, Any]) -> str:
    """'2', or 'image 1, text 2' when the towers ran on different counts (tuned per tower)."""
    return threads_label(lat["tower_threads"]) if lat.get("tower_threads") else str(lat.get("threads"))


def _ratios(ref: dict, record: dict) -> dict[str, float]:
    """ref's latency / record's, per scenario both have: {SCENARIO_p50, SCENARIO_p90}."""
    return {f"{name}_{p}": ref[name][f"{p}_ms"] / record[name][f"{p}_ms"]
            for name in _scenarios(record) if name in ref for p in ("p50", "p90")}


def build(recipe, steps, bench: dict | None) -> dict[str, Any]:
    teacher = next((s for s in steps if s.name == REFERENCE[0]), steps[0] if steps else None)
    export = next((s for s in steps if s.stage == "export"), None)
    results = (bench or {}).get("results", {})
    ref = results.get(REFERENCE[0], {}).get(REFERENCE[1])
    rows = []
    for s in steps:
        row = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("config", "files")}
        row["retention"] = {m: v / teacher.metrics[m] for m, v in s.metrics.items()
                            if teacher and teacher.metrics.get(m)}
        row["latency"] = results.get(s.name, {})
        if export is not None and s.kind == "onnx" and s.size_bytes:
            row["compression"] = export.size_bytes / s.size_bytes
        if ref:
            row["speedup_vs_teacher"] = {t: _ratios(ref, r) for t, r in row["latency"].items()}
        base = results.get(export.name, {}) if export is not None and s.kind == "onnx" else {}
        if base:
            row["speedup_vs_export"] = {t: _ratios(base[t], r) for t, r in row["latency"].items() if t in base}
        rows.append(row)
    report = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "recipe": to_dict(recipe),
              "environment": (bench or {}).get("environment"), "measure": (bench or {}).get("measure"),
              "reference": {"step": REFERENCE[0], "target": REFERENCE[1]}, "steps": rows,
              "complete": bench is not None}
    if bench is not None and recipe.gates:
        results = []
        for g in recipe.gates:  # one at a time: a gate naming a quantity the run lacks fails, saying why; the
            try:                # others are still judged
                results += check(report, [parse_budget(g)], remeasure=0)
            except VlmedgeError as e:
                results.append(Result(g, False, None, str(e)))
        report["gates"] = [dataclasses.asdict(r) for r in results]
    return report


def _fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _times(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table_rows(report: dict, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """The step table; `compact` keeps what fits a terminal (two accuracy columns, retention, the family's headline
    latency and speedup)."""
    family = _family(report)
    head, first = family.headline_scenario, family.report_metrics[0]
    targets = sorted({t for s in report["steps"] for t in s.get("latency", {})})
    metrics = family.report_metrics[:2] if compact else family.report_metrics
    flops = next((k for s in report["steps"] for k in (s.get("flops") or {})), None)  # the first part's (image)
    header = ["step", "params", "size MB"] + ([] if compact or not flops else [f"GFLOPs {flops}"])
    header += list(metrics) + [f"retention {first}"]
    extra = () if compact else family.report_latency
    vs_export = {t for s in report["steps"] for t in s.get("speedup_vs_export", {})}
    for t in targets:
        header += [f"{t} {head} p50/p90/p99 ms", f"{t} speedup"] + ([f"{t} p90 vs export"] if t in vs_export else [])
        header += [f"{t} {x} p50 ms" for x in extra]
        if extra and any("tokens_per_s" in s.get("latency", {}).get(t, {}) for s in report["steps"]):
            header += [f"{t} tokens/s"]
    rows = []
    for s in report["steps"]:
        row = [s["name"], _fmt(s.get("parameters") and s["parameters"] / 1e6, ".2f") + "M",
               _fmt(s["size_bytes"] / 1e6, ".2f")]
        row += [] if compact or not flops else [_fmt((s.get("flops") or {}).get(flops) and s["flops"][flops] / 1e9,
                                                     ".3f")]
        row += [_fmt(s["metrics"].get(m)) for m in metrics] + [_fmt(s["retention"].get(first))]
        for t in targets:
            p = s.get("latency", {}).get(t, {}).get(head)
            rec = s.get("latency", {}).get(t, {})
            if p:
                row += [f"{p['p50_ms']:.2f}/{p['p90_ms']:.2f}/{p['p99_ms']:.2f}",
                        _times(s.get("speedup_vs_teacher", {}).get(t, {}).get(f"{head}_p50"))]
            else:
                row += ["-"] * 2
            if t in vs_export:
                row += [_times(s.get("speedup_vs_export", {}).get(t, {}).get(f"{head}_p90"))]
            row += [_fmt((rec.get(x) or {}).get("p50_ms"), ".2f") for x in extra]
            if f"{t} tokens/s" in header:
                row += [_fmt(rec.get("tokens_per_s"), ".1f")]
        rows.append(row)
    return header, rows


def markdown(report: dict) -> str:
    head = _family(report).headline_scenario
    header, rows = table_rows(report)
    lines = [f"# vlmedge report: {report['recipe']['name']}", ""]
    if not report["complete"]:
        lines += ["_Run in progress: latency columns appear when benchmarking is done._", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + measured_lines(report)
    env = report.get("environment") or {}
    if env:
        measure = report.get("measure") or {}
        rounds = measure.get("rounds") or 1
        lines += ["", f"Latency: batch 1, {measure.get('warmup')} warm-up runs, then at least "
                      f"{measure.get('min_runs')} runs and {measure.get('min_seconds')} s per figure; p50/p90/p99 "
                      f"from the raw samples"
                      + (f", every step measured in turn in {rounds} rounds, each figure the median over the rounds"
                         if rounds > 1 else "") + f". Speedup: teacher's PyTorch eager {head} p50 divided by the step's "
                      f"{head} p50; vs export: the fp32 export's {head} p90 on the same target divided by the "
                      f"step's; all measured in the same run.",
                  f"Machine: {env.get('cpu')} ({env.get('cores')} cores), {env.get('system')}; "
                  + ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())]
        for s in report["steps"]:
            for t, lat in s.get("latency", {}).items():
                throughput = lat.get("throughput")
                lines.append(f"- {s['name']} on {t}: {lat['device']}, {lat['runtime']}, {_threads(lat)} threads, "
                             f"{lat['precision']}, {lat[head]['samples']} samples ({head}), CV {lat[head]['cv']:.2f}"
                             + (f"; throughput {throughput['images_per_s']:.0f} img/s at batch {throughput['batch']}"
                                if throughput else ""))
    if report.get("gates"):
        lines += ["", "## Gates", ""]
        lines += [f"- {'PASS' if g['passed'] else 'FAIL'}: `{g['budget']}` ({g['message']})" for g in report["gates"]]
    return "\n".join(lines) + "\n"


def pareto_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    family = _family(report)
    head = family.headline_scenario
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"torch": "o", "cpu": "s", "cuda": "^", "tensorrt": "D", "jetson": "P"}
    for s in report["steps"]:
        acc = next((s["metrics"][m] for m in family.report_metrics if m in s["metrics"]), None)
        for t, lat in s.get("latency", {}).items():
            if acc is None or head not in lat:
                continue
            ax.scatter(lat[head]["p50_ms"], acc, marker=markers.get(t, "x"), s=50)
            ax.annotate(f"{s['name']} ({t})", (lat[head]["p50_ms"], acc), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"{head} latency, p50 (ms, log scale)")
    ax.set_ylabel(family.report_metrics[0])
    ax.set_title(f"{report['recipe']['name']}: accuracy vs latency, one point per step and target")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def measured_lines(report: dict) -> list[str]:
    """Which images each step's metrics measured (steps evaluated alike share a line)."""
    by: dict[str, list[str]] = {}
    for s in report["steps"]:
        if s.get("metrics"):
            by.setdefault(s.get("measured") or "not recorded", []).append(s["name"])
    return [f"Accuracy of {', '.join(names)}: measured on {what}." for what, names in by.items()]


def print_table(report: dict, console) -> None:
    from rich.table import Table

    header, rows = table_rows(report, compact=True)
    table = Table(title=f"vlmedge: {report['recipe']['name']}", show_lines=False)
    for h in header:
        table.add_column(h, justify="left" if h == "step" else "right", overflow="fold")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    for line in measured_lines(report):
        console.print(line, highlight=False, soft_wrap=True)
    for g in report.get("gates", []):
        console.print(f"{'[green]PASS' if g['passed'] else '[red]FAIL'}[/] {g['message']}")


def write_report(out: Path, recipe, steps, bench: dict | None, console=None) -> dict[str, Any]:
    report = build(recipe, steps, bench)
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(report))
    if bench is not None:
        pareto_plot(report, out / "pareto.png")
    if console is not None:
        print_table(report, console)
    return report
