"""Budgets for CI: turn a run's report.json into pass/fail, a Markdown summary and JUnit XML.

A budget is one line: ``[STEP:] QUANTITY OP NUMBER``. STEP defaults to the last step of the run (what ships).

* latency, absolute:     ``cpu.pair.p90_ms <= 50``, ``torch.image.p50_ms < 20``, ``cpu.throughput.images_per_s >= 100``
* speed relative to the teacher measured in the same run (robust on noisy CI machines): ``speedup.cpu.pair_p90 >= 4``;
  relative to the run's fp32 export on the same target (what the steps after the export bought):
  ``speedup_vs_export.cpu.answer_p90 >= 1.3``
* accuracy:              ``zero_shot.top1 >= 0.95``, ``retrieval.i2t_r5 >= 0.6``, ``retention.zero_shot.top1 >= 0.97``
* size:                  ``size_mb <= 20``, ``parameters <= 5e6``, ``compression >= 3`` (the run's fp32 export's
  ONNX bytes / the step's)
* generative:            ``cpu.answer.p90_ms <= 200``, ``cpu.ttft.p50_ms``, ``cpu.decode.p50_ms`` (per token),
  ``cpu.tokens_per_s >= 50``, ``vqa.accuracy``, ``retention.vqa.type_colour``, ``caption.cider``

Regression against a stored baseline report: every accuracy metric may drop and every latency p90 may grow by at
most a relative tolerance. A latency budget that fails on a figure whose coefficient of variation is above the
measurement's `max_cv` is re-measured (up to `remeasure` times) before it counts as failed.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from . import families
from .disk import read_json, read_yaml
from .errors import VlmedgeError
from .runtime.measure import MeasureConfig
from .targets import get_target

SPEEDUPS = {"speedup": "speedup_vs_teacher", "speedup_vs_export": "speedup_vs_export"}
"""A budget's ratio quantity -> the report field it reads."""
OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}
_BUDGET = re.compile(r"^\s*(?:(?P<step>[\w.-]+)\s*:\s*)?(?P<quantity>[\w.]+)\s*(?P<op><=|>=|==|<|>)\s*"
                     r"(?P<value>[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Budget:
    text: str
    step: str | None
    quantity: str
    op: str
    value: float


def parse_budget(text: str) -> Budget:
    m = _BUDGET.match(text)
    if not m:
        raise VlmedgeError(f"budget {text!r}: expected '[STEP:] QUANTITY OP NUMBER', e.g. 'cpu.pair.p90_ms <= 50'")
    return Budget(text.strip(), m["step"], m["quantity"], m["op"], float(m["value"]))


def load_budgets(path: str | Path) -> list[Budget]:
    path = Path(path)
    if not path.is_file():
        raise VlmedgeError(f"budgets file not found: {path}")
    data = read_yaml(path)
    items = data.get("gates", data.get("budgets")) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise VlmedgeError(f"{path}: expected a list of budgets (or a mapping with 'gates:')")
    return [parse_budget(str(b)) for b in items]


def load_report(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = read_json(path, f"report not found: {path}")
    if not isinstance(report, dict) or not str(report.get("schema", "")).startswith("vlmedge.report/"):
        raise VlmedgeError(f"{path}: not a vlmedge report (schema {report.get('schema')!r})")
    return report


def _step(report: dict, name: str | None) -> dict:
    steps = report.get("steps") or []
    if not steps:
        raise VlmedgeError("report has no steps")
    if name is None:
        return steps[-1]
    for s in steps:
        if s["name"] == name:
            return s
    raise VlmedgeError(f"no step {name!r} in the report; steps: {', '.join(s['name'] for s in steps)}")


def quantity(step: dict, q: str) -> tuple[float | None, dict | None]:
    """The value of a quantity in a report step, and the latency record it came from (for re-measuring)."""
    parts = q.split(".")
    latency = step.get("latency") or {}
    if parts[0] in latency:
        rec = latency[parts[0]]
        node: Any = rec
        for p in parts[1:]:
            node = node.get(p) if isinstance(node, dict) else None
        return (float(node) if isinstance(node, (int, float)) else None), rec
    if parts[0] in SPEEDUPS and len(parts) == 3:
        return (step.get(SPEEDUPS[parts[0]]) or {}).get(parts[1], {}).get(parts[2]), None
    if parts[0] == "retention":
        return (step.get("retention") or {}).get(".".join(parts[1:])), None
    if q == "size_mb":
        return step["size_bytes"] / 1e6, None
    if q in ("parameters", "size_bytes", "compression"):
        return step.get(q), None
    return (step.get("metrics") or {}).get(q), None


@dataclass
class Result:
    budget: str
    passed: bool
    value: float | None
    message: str


def known_quantities(step: dict) -> set[str]:
    """Every quantity a budget can name in a report step (what `quantity` resolves)."""
    out = {"size_mb", *(q for q in ("parameters", "size_bytes", "compression") if step.get(q) is not None)}
    out.update(step.get("metrics") or {})
    out.update(f"retention.{m}" for m in step.get("retention") or {})
    out.update(f"{q}.{t}.{k}" for q, field in SPEEDUPS.items() for t, rec in (step.get(field) or {}).items()
               for k in rec)
    for target, rec in (step.get("latency") or {}).items():
        for k, v in rec.items():
            if isinstance(v, dict):
                out.update(f"{target}.{k}.{stat}" for stat, x in v.items() if isinstance(x, (int, float)))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out.add(f"{target}.{k}")
    return out


def _unknown(report: dict, b: Budget) -> VlmedgeError | None:
    """A usage error for a budget whose quantity no step of the report has (a typo), naming the closest ones."""
    import difflib

    known = set().union(*(known_quantities(s) for s in report.get("steps") or []))
    if b.quantity in known:
        return None
    close = difflib.get_close_matches(b.quantity, sorted(known), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"known, e.g.: {', '.join(sorted(known)[:6])}"
    metric = b.quantity.removeprefix("retention.")
    steps = report.get("steps") or []
    if metric != b.quantity and steps and steps[0].get("metrics", {}).get(metric) == 0:
        # a retention divides by the first step's figure: a model that scores 0 has not learned the task
        hint = (f"the first step ({steps[0].get('name')}) scores {metric} = 0, so no retention can be computed: it "
                f"has not learned this task on this data (check it before compressing it)")
    error = VlmedgeError(f"budget {b.text!r}: no step of the report has a quantity {b.quantity!r}; {hint}")
    error.exit_code = 2
    return error


def check(report: dict, budgets: list[Budget], remeasure: int = 2) -> list[Result]:
    """Each budget's verdict. A quantity no step has is a usage error (exit 2, raised before anything is judged);
    one the budget's step lacks, though others have it, fails that budget."""
    for b in budgets:
        if (error := _unknown(report, b)) is not None:
            raise error
    results = []
    for b in budgets:
        step = _step(report, b.step)
        value, rec = quantity(step, b.quantity)
        if value is None:
            results.append(Result(b.text, False, None, f"{b.quantity} not found in step {step['name']!r}"))
            continue
        passed = OPS[b.op](value, b.value)
        tries = 0
        while not passed and rec is not None and not _stable(rec, b.quantity) and tries < remeasure:
            rec = _remeasure(report, step, rec)
            value, _ = quantity({**step, "latency": {rec["target"]: rec}}, b.quantity)
            passed = value is not None and OPS[b.op](value, b.value)
            tries += 1
        note = f" (re-measured {tries}x: unstable)" if tries else ""
        msg = f"{step['name']}: {b.quantity} = {value:.4g} {'meets' if passed else 'violates'} {b.op} {b.value:g}{note}"
        results.append(Result(b.text, passed, value, msg))
    return results


def _stable(rec: dict, q: str) -> bool:
    component = q.split(".")[1] if "." in q else ""
    return bool((rec.get(component) or {}).get("stable", True))


def _remeasure(report: dict, step: dict, rec: dict) -> dict:
    family = families.of(step["path"])
    cfg = families.configure(MeasureConfig, {**report.get("measure", {}), "threads": rec.get("threads")}, family,
                             lenient=True)
    return get_target(rec["target"])(step["path"], cfg)


def regression(report: dict, baseline: dict, tolerance: float) -> list[Result]:
    """Accuracy may drop and latency p90 may grow by at most `tolerance` (relative) against the baseline."""
    cur, base = _step(report, None), _step(baseline, None)
    results = []
    for metric, ref in (base.get("metrics") or {}).items():
        value = (cur.get("metrics") or {}).get(metric)
        if value is None or not ref:
            continue
        ok = value >= ref * (1 - tolerance)
        results.append(Result(f"regression: {metric}", ok, value,
                              f"{metric} {value:.4f} vs baseline {ref:.4f} (allowed drop {tolerance:.0%})"))
    for target, rec in (base.get("latency") or {}).items():
        for component in (k for k, v in rec.items() if isinstance(v, dict) and "p90_ms" in v):  # every scenario
            ref = rec[component]["p90_ms"]
            value = ((cur.get("latency") or {}).get(target, {}).get(component) or {}).get("p90_ms")
            if ref is None or value is None:
                continue
            ok = value <= ref * (1 + tolerance)
            results.append(Result(f"regression: {target}.{component}.p90_ms", ok, value,
                                  f"{target}.{component}.p90_ms {value:.2f} vs baseline {ref:.2f} "
                                  f"(allowed growth {tolerance:.0%})"))
    return results


def markdown(results: list[Result], report_path: str) -> str:
    ok = all(r.passed for r in results)
    lines = [f"### vlmedge gate: {'passed' if ok else 'FAILED'} ({sum(r.passed for r in results)}/{len(results)})",
             "", f"Report: `{report_path}`", "", "| | budget | measured |", "|---|---|---|"]
    for r in results:
        lines.append(f"| {'✅' if r.passed else '❌'} | `{r.budget}` | {r.message} |")
    return "\n".join(lines) + "\n"


def junit(results: list[Result]) -> str:
    suite = ET.Element("testsuite", name="vlmedge.gate", tests=str(len(results)),
                       failures=str(sum(not r.passed for r in results)))
    for r in results:
        case = ET.SubElement(suite, "testcase", classname="vlmedge.gate", name=r.budget)
        if not r.passed:
            ET.SubElement(case, "failure", message=r.message).text = r.message
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)
