import json
import shutil
import xml.etree.ElementTree as ET

import pytest

from vlmedge.cli import main
from vlmedge.errors import VlmedgeError
from vlmedge.gate import check, load_report, parse_budget


def _report(tmp_path, **latency):
    step = {"name": "final", "path": "x", "kind": "onnx", "size_bytes": 4_000_000, "parameters": 10,
            "metrics": {"zero_shot.top1": 0.9}, "retention": {"zero_shot.top1": 0.98},
            "latency": {"cpu": {"target": "cpu", "threads": 2,
                                "pair": {"p50_ms": 10.0, "p90_ms": latency.get("p90", 12.0), "p99_ms": 15.0,
                                         "cv": 0.05, "stable": True}}},
            "speedup_vs_teacher": {"cpu": {"pair_p50": 4.5, "pair_p90": 4.2}},
            "speedup_vs_export": {"cpu": {"pair_p50": 1.6, "pair_p90": 1.4}}}
    report = {"schema": "vlmedge.report/1", "steps": [step], "measure": {}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    return path


def test_budget_parsing():
    b = parse_budget("distill: retention.zero_shot.top1 >= 0.97")
    assert (b.step, b.quantity, b.op, b.value) == ("distill", "retention.zero_shot.top1", ">=", 0.97)
    with pytest.raises(VlmedgeError, match="QUANTITY OP NUMBER"):
        parse_budget("fast enough")


def test_gate_passes_and_fails_with_exit_codes_and_junit(tmp_path, capsys):
    path = _report(tmp_path)
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("gates:\n  - 'cpu.pair.p90_ms <= 50'\n  - 'speedup.cpu.pair_p50 >= 4'\n"
                       "  - 'zero_shot.top1 >= 0.85'\n  - 'retention.zero_shot.top1 >= 0.97'\n  - 'size_mb <= 5'\n")
    junit = tmp_path / "gate.xml"
    md = tmp_path / "gate.md"
    assert main(["gate", str(path), "--budgets", str(budgets), "--junit", str(junit), "--markdown", str(md)]) == 0
    suite = ET.parse(junit).getroot()
    assert suite.get("tests") == "5" and suite.get("failures") == "0"
    assert "passed" in md.read_text()

    for threshold, code in ((1.3, 0), (1.5, 1)):  # relative to the run's fp32 export
        budgets.write_text(f"- 'speedup_vs_export.cpu.pair_p90 >= {threshold}'\n")
        assert main(["gate", str(path), "--budgets", str(budgets)]) == code

    tight = tmp_path / "tight.yaml"
    tight.write_text("- 'cpu.pair.p90_ms <= 5'\n")
    assert main(["gate", str(path), "--budgets", str(tight), "--junit", str(junit)]) == 1
    err = capsys.readouterr().out
    assert "cpu.pair.p90_ms = 12 violates <= 5" in err
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "1" and suite.find("testcase/failure") is not None


def test_gate_regression_against_a_baseline(tmp_path):
    base = _report(tmp_path)
    shutil.copy(base, tmp_path / "baseline.json")
    slow = _report(tmp_path, p90=30.0)
    assert main(["gate", str(slow), "--baseline", str(tmp_path / "baseline.json"), "--tolerance", "0.1"]) == 1
    assert main(["gate", str(tmp_path / "baseline.json"), "--baseline", str(tmp_path / "baseline.json")]) == 0


def test_gate_usage_errors_exit_2(tmp_path, capsys):
    assert main(["gate", str(tmp_path / "missing.json")]) == 2
    path = _report(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 'latency is low'\n")
    assert main(["gate", str(path), "--budgets", str(bad)]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(VlmedgeError, match="not a vlmedge report"):
        (tmp_path / "x.json").write_text("{}")
        load_report(tmp_path / "x.json")


def test_check_names_the_missing_quantity(tmp_path):
    """A quantity another step has but the budget's step lacks fails that budget (exit 1, a regression)."""
    report = load_report(_report(tmp_path))
    report["steps"].insert(0, {**report["steps"][0], "name": "teacher",
                               "latency": {"cuda": report["steps"][0]["latency"]["cpu"]}})
    (r,) = check(report, [parse_budget("cuda.pair.p90_ms <= 5")])
    assert not r.passed and "not found in step 'final'" in r.message


def test_a_quantity_no_step_has_is_a_usage_error_naming_the_closest(tmp_path, capsys):
    path = _report(tmp_path)
    budgets = tmp_path / "budgets.yaml"
    for typo, meant in (("cpu.pair.p90_msx <= 50", "cpu.pair.p90_ms"), ("retention.zero_shot.top_1 >= 0.9",
                                                                       "retention.zero_shot.top1"),
                        ("speedup.cpu.pair_p09 >= 4", "speedup.cpu.pair_p90")):
        budgets.write_text(f"- 'cpu.pair.p50_ms <= 50'\n- '{typo}'\n")
        assert main(["gate", str(path), "--budgets", str(budgets)]) == 2, typo
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"did you mean {meant}" in err, err
    with pytest.raises(VlmedgeError, match="known, e.g.") as e:
        check(load_report(path), [parse_budget("latency <= 5")])
    assert e.value.exit_code == 2


def test_a_retention_of_a_first_step_that_scores_zero_says_why_it_is_missing(tmp_path):
    """A model that has not learned the task (a random-weights folder: VQA 0) gives no retention; the error says so
    instead of suggesting the plain metric."""
    report = load_report(_report(tmp_path))
    first = report["steps"][0]
    metric = next(iter(first["metrics"]))
    report["steps"] = [{**s, "metrics": {**s["metrics"], metric: 0.0},
                        "retention": {k: v for k, v in s.get("retention", {}).items() if k != metric}}
                       for s in report["steps"]]
    with pytest.raises(VlmedgeError, match=rf"scores {metric} = 0, so no retention can be computed") as e:
        check(report, [parse_budget(f"retention.{metric} >= 0.97")])
    assert e.value.exit_code == 2


def test_an_unstable_figure_over_budget_is_measured_again_on_the_artifact(tiny_export, tmp_path):
    """A latency figure marked unstable (its CV over max_cv) is re-measured on the step's real artifact before it
    counts as failed; a stable one is not."""
    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.targets import get_target

    fast = {"warmup": 1, "min_runs": 5, "min_seconds": 0.01}
    rec = get_target("cpu")(tiny_export, MeasureConfig(**fast))
    absurd = 1e6  # ms per pair: no real run of the tiny export comes near it
    rec["pair"] = {**rec["pair"], "p90_ms": absurd, "cv": 3.0, "stable": False}
    step = {"name": "final", "path": str(tiny_export), "kind": "onnx", "latency": {"cpu": rec}, "metrics": {}}
    report = {"schema": "vlmedge.report/1", "steps": [step], "measure": fast}
    budget = [parse_budget(f"cpu.pair.p90_ms <= {absurd / 10}")]
    assert not check(report, budget, remeasure=0)[0].passed
    again = check(report, budget, remeasure=1)[0]
    assert again.passed and again.value < absurd / 10 and "re-measured 1x" in again.message
    rec["pair"]["stable"] = True  # stable figures are not second-guessed
    assert not check(report, budget, remeasure=1)[0].passed


def test_a_recipe_gate_naming_a_missing_quantity_fails_alone_and_the_others_are_judged():
    """The report judges a recipe's gates one by one: a gate no step can answer (a retention over a teacher that
    scores 0) fails with its reason, and the compression gate beside it still gets its verdict."""
    import dataclasses

    from vlmedge.artifact import Artifact
    from vlmedge.recipe import load_recipe, recipes_dir
    from vlmedge.report import build

    recipe = dataclasses.replace(load_recipe(recipes_dir() / "quickstart.yaml"),
                                 gates=("retention.zero_shot.top1 >= 0.97", "compression >= 3"))
    steps = [Artifact(id="a", name="teacher", stage="source", kind="model", path="t", metrics={"zero_shot.top1": 0.0}),
             Artifact(id="b", name="export", stage="export", kind="onnx", path="e", size_bytes=4_000_000),
             Artifact(id="c", name="final", stage="quantize", kind="onnx", path="q", size_bytes=1_000_000)]
    gates = {g["budget"]: g for g in build(recipe, steps, {"results": {}})["gates"]}
    assert not gates["retention.zero_shot.top1 >= 0.97"]["passed"]
    assert "no retention can be computed" in gates["retention.zero_shot.top1 >= 0.97"]["message"]
    assert gates["compression >= 3"]["passed"] and gates["compression >= 3"]["value"] == 4.0

