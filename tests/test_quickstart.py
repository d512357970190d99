"""The README's main job end to end: `pytest -m slow` (about 12 minutes on a 2-core CPU)."""

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_quickstart_recipe_keeps_what_its_teacher_learned(tmp_path):
    out = tmp_path / "quickstart"
    code, _, err = run_cli("compress", "quickstart", "--out", str(out), "--quiet", timeout=2300)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    teacher, int8, fp32 = steps["teacher"], steps["quantize-dynamic"], steps["export"]
    # the teacher learned its task (else every retention figure is meaningless): 36 classes, chance is 0.028
    assert teacher["metrics"]["zero_shot.top1"] >= 0.9 and teacher["metrics"]["retrieval.t2i_r5"] >= 0.6
    for metric in ("zero_shot.top1", "retrieval.i2t_r5", "retrieval.t2i_r5"):
        assert int8["metrics"][metric] / teacher["metrics"][metric] >= 0.95, metric
    assert fp32["size_bytes"] / int8["size_bytes"] >= 3.0
    assert int8["parameters"] < 0.6 * teacher["parameters"]
    assert all(g["passed"] for g in report["gates"]), report["gates"]
