import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from vlmedge.artifact import Artifact
from vlmedge.pipeline import run
from vlmedge.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    report = run(load_recipe(TINY_RECIPE), out)
    return out, report


def test_compress_writes_the_report_with_every_step(tiny_run):
    from vlmedge.cli import main

    out, report = tiny_run
    assert {"report.json", "report.md", "pareto.png", "recipe.resolved.yaml"} <= {p.name for p in out.iterdir()}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["schema"] == "vlmedge.report/1" and on_disk["complete"]
    names = [s["name"] for s in on_disk["steps"]]
    assert names == ["teacher", "prune", "distill", "export", "quantize-dynamic"]
    teacher, final = on_disk["steps"][0], on_disk["steps"][-1]
    assert set(teacher["latency"]) == {"torch"} and set(final["latency"]) == {"cpu"}
    lat = final["latency"]["cpu"]
    assert all(lat[part]["p50_ms"] > 0 for part in ("image", "text", "pair", "zero_shot"))
    assert lat["threads"] >= 1 and lat["batch"] == 1 and lat["device"]
    assert lat["rounds"] == 2 and lat["pair"]["samples"] >= 2 * 5  # interleaved rounds, pooled
    # the cpu target ran each tower on the thread count tuned into the artifact's manifest
    manifest = json.loads(next(out.glob("04-quantize-*/onnx/manifest.json")).read_text())
    if (os.cpu_count() or 1) > 1:
        assert lat["tower_threads"] == {"image": manifest["threads"]["image"], "text": manifest["threads"]["text"]}
    speedup = final["speedup_vs_teacher"]["cpu"]["pair_p50"]
    assert speedup == pytest.approx(teacher["latency"]["torch"]["pair"]["p50_ms"] / lat["pair"]["p50_ms"], rel=1e-3)
    export = on_disk["steps"][3]  # what quantizing bought: the fp32 export's cpu latency over the final step's
    assert "speedup_vs_export" not in export or set(export["speedup_vs_export"]["cpu"].values()) == {1.0}
    assert final["speedup_vs_export"]["cpu"]["pair_p90"] == pytest.approx(
        export["latency"]["cpu"]["pair"]["p90_ms"] / lat["pair"]["p90_ms"], rel=1e-3)
    assert "teacher" not in [s["name"] for s in on_disk["steps"] if "speedup_vs_export" in s]
    # a planted regression, the quantize step removed: the export judged by a gate on what quantizing bought fails
    budgets = out.parent / "vs-export.yaml"
    budgets.write_text("- 'speedup_vs_export.cpu.pair_p90 >= 1.01'\n- 'compression >= 1.01'\n")
    assert main(["gate", str(out), "--budgets", str(budgets), "--step", "export", "--remeasure", "0"]) == 1
    assert main(["gate", str(out), "--step", "nonesuch"]) == 2
    assert final["size_bytes"] < on_disk["steps"][3]["size_bytes"]
    for metric, kept in final["retention"].items():  # retention is the INT8 figure over the teacher's
        assert kept == pytest.approx(final["metrics"][metric] / teacher["metrics"][metric], rel=1e-6), metric
    for gate in on_disk["gates"]:  # each gate's verdict is its recorded figure against its threshold
        quantity, op, threshold = gate["budget"].split()
        assert gate["passed"] == (gate["value"] <= float(threshold) if op == "<=" else gate["value"] >= float(threshold))
    assert "| quantize-dynamic |" in (out / "report.md").read_text() and "in 2 rounds" in (out / "report.md").read_text()
    # every step is the contract's record: artifact.json beside the product, its parent the step before
    records = [json.loads(next(out.glob(f"{i:02d}-*/artifact.json")).read_text()) for i in range(5)]
    assert [r["parent"] for r in records[1:]] == [records[i]["id"] for i in (0, 1, 2, 3)]
    assert {r["family"] for r in records} == {"dual_encoder"}


def test_rerun_is_cached_and_a_changed_stage_reruns_only_from_there(tiny_run):
    out, _ = tiny_run
    records = {p: p.stat().st_mtime_ns for p in out.glob("*/artifact.json")}
    done = []
    run(load_recipe(TINY_RECIPE), out, on_stage=done.append)
    assert done == ["teacher", "prune", "distill", "export", "quantize-dynamic"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/artifact.json")} == records  # nothing was made again
    before = {p.name for p in out.iterdir() if p.is_dir()}
    run(load_recipe(TINY_RECIPE, ["stages.quantize.per_channel=false"]), out)
    new = {p.name for p in out.iterdir() if p.is_dir()} - before
    assert len(new) == 1 and next(iter(new)).startswith("04-quantize-dynamic-")


def test_killed_run_resumes_to_the_same_metrics(tiny_run, tmp_path):
    """kill -9 during training; the rerun resumes from the checkpoint and ends with the uninterrupted metrics."""
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    recipe = ["compress", str(TINY_RECIPE), "--out", str(out), "--quiet",
              "--set", "stages.train.steps=40", "--set", "stages.train.checkpoint_every=2",
              "--set", "targets=[]", "--set", "gates=[]"]  # the metrics are compared, not timed
    reference = tmp_path / "reference"
    p = subprocess.Popen([sys.executable, "-m", "vlmedge", *recipe], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = None
    deadline = time.time() + 240
    while time.time() < deadline and p.poll() is None:
        found = list(out.glob("00-teacher-*/model/checkpoints/last/trainer.json"))
        if found and json.loads(found[0].read_text())["step"] >= 4:
            ckpt = found[0]
            break
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ckpt is not None, "training never checkpointed"
    assert not list(out.glob("00-teacher-*/artifact.json"))
    code, _, err = run_cli(*recipe)
    assert code == 0, err
    code, _, err = run_cli(*[a if a != str(out) else str(reference) for a in recipe])
    assert code == 0, err
    a = json.loads((out / "report.json").read_text())["steps"]
    b = json.loads((reference / "report.json").read_text())["steps"]
    assert [x["name"] for x in a] == [y["name"] for y in b]
    for x, y in zip(a, b):
        # fp32 steps agree exactly; int8 rounding of last-bit weight differences may flip one borderline sample
        # of this tiny evaluation (its smallest set, the two-object relation pairs, holds 16-20), so the quantized
        # step may differ by one sample at most
        tolerance = 1e-6 if x["stage"] != "quantize" else 1 / 16 + 1e-9
        assert x["metrics"] == pytest.approx(y["metrics"], abs=tolerance), x["name"]


def test_a_failing_stage_stops_with_a_clear_message_and_keeps_earlier_steps(tmp_path):
    out = tmp_path / "fail"
    code, _, err = run_cli("compress", str(TINY_RECIPE), "--out", str(out), "--quiet",
                           "--set", "stages.train.steps=2", "--set", "stages.prune.data=/nonexistent/images")
    assert code == 1
    assert err.strip().startswith("error: stage prune failed: data source not found: /nonexistent/images")
    assert len(err.strip().splitlines()) == 1
    assert list(out.glob("00-teacher-*/artifact.json"))
    assert not list(out.glob("01-prune-*/artifact.json"))


def test_a_ratio_the_model_cannot_take_fails_at_load_before_any_work(tmp_path):
    out = tmp_path / "early"
    code, _, err = run_cli("compress", str(TINY_RECIPE), "--out", str(out), "--quiet",
                           "--set", "stages.prune.vision_heads=0.9")
    assert code == 1
    assert "stages.1.prune: prune: removing 90% of 4 heads per vision layer leaves none" in err
    assert not out.exists() or not list(out.glob("00-teacher-*"))


def test_single_commands_record_skip_and_chain_to_the_recipes_int8(tiny_run, tmp_path, capsys):
    """prune, distill, export and quantize from the recipe's teacher, one command each, with the tiny recipe's
    settings: each writes artifact.json, a rerun skips, and the INT8 graphs are the recipe's, byte for byte."""
    from vlmedge.cli import main

    out, _ = tiny_run
    teacher = next(out.glob("00-teacher-*"))  # a run's step folder is a command's input too
    chain = tmp_path / "chain"
    commands = [["prune", str(teacher), "--out", str(chain / "pruned"), "--heads", "0.5", "--mlp", "0.5",
                 "--calibration-batches", "2", "--batch-size", "16"],
                ["distill", str(chain / "pruned"), "--teacher", str(teacher), "--out", str(chain / "student"),
                 "--steps", "4", "--batch-size", "32", "--data-count", "512"],
                ["export", str(chain / "student"), "--out", str(chain / "onnx")],
                ["quantize", str(chain / "onnx"), "--out", str(chain / "int8"), "--mode", "dynamic"]]
    for args in commands:
        assert main([*args, "--no-eval", "--quiet"]) == 0
        record = json.loads((Path(args[args.index("--out") + 1]) / "artifact.json").read_text())
        assert record["family"] == "dual_encoder" and record["parameters"] > 0
        assert record["data"] == "shapes"  # the teacher's, passed down: what a command without --data evaluates on
    made = {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file()}
    capsys.readouterr()
    for args in commands:
        assert main([*args, "--no-eval"]) == 0
    assert " ".join(capsys.readouterr().out.split()).count(": cached (") == len(commands)
    assert {p: p.stat().st_mtime_ns for p in chain.rglob("*") if p.is_file()} == made
    recipe_int8 = Path(json.loads((out / "report.json").read_text())["steps"][-1]["path"])
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        assert (chain / "int8" / name).read_bytes() == (recipe_int8 / name).read_bytes(), name
    # a changed setting is a new artifact: the folder is made again
    assert main([*commands[3], "--mode", "fp16", "--no-eval", "--quiet"]) == 0
    assert json.loads((chain / "int8" / "manifest.json").read_text())["precision"] == "fp16"


def _records(run_folder: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in run_folder.glob("*/artifact.json")}


def test_a_moved_run_is_cached_and_an_edited_graph_runs_again_from_its_step(tiny_run, tmp_path):
    """A run folder moved elsewhere (the original out of reach) is every step cached; a graph edited inside it
    makes that step again and what follows it, and the steps before it stay cached."""
    import onnx

    out, _ = tiny_run
    moved = tmp_path / "elsewhere" / "tiny"
    shutil.copytree(out, moved)
    aside = out.with_name(out.name + ".aside")
    out.rename(aside)  # nothing may read the folder the run was first written to
    try:
        before = _records(moved)
        done = []
        run(load_recipe(TINY_RECIPE), moved, on_stage=done.append)
        assert len(done) == 5 and _records(moved) == before
        graph = next(moved.glob("03-export-*/onnx/image_encoder.onnx"))
        model = onnx.load(graph)
        model.doc_string = "edited by hand"
        onnx.save(model, graph)
        run(load_recipe(TINY_RECIPE), moved)
    finally:
        aside.rename(out)
    after = _records(moved)
    for step in before:
        if step[:2] in ("00", "01", "02", "03"):
            assert (after[step] == before[step]) == (step[:2] != "03"), step
    assert onnx.load(graph).doc_string != "edited by hand"  # the export was made again
    steps = json.loads((moved / "report.json").read_text())["steps"]
    export, final = Artifact.load(graph.parent.parent), steps[-1]
    # the quantized step is of the export as it is now (made again where the new export's bytes differ)
    assert final["parent"] == export.id and Path(final["path"]).is_relative_to(moved)
    assert Artifact.load(Path(final["path"]).parent).mismatches() == [] and export.mismatches() == []
    assert json.loads((graph.parent.parent / "artifact.json").read_text())["path"] == "onnx"


def test_a_copied_export_is_read_where_it_lies_and_a_broken_copy_names_its_file(tiny_run, tmp_path, capsys):
    """Quantizing a copy of an export step: the copy's own graphs, never the original's; a copy whose graph was
    emptied, overwritten with random bytes or by another graph, or renamed, is a one-line error naming the copy's
    file, and nothing is written."""
    from vlmedge.cli import main

    out, _ = tiny_run
    original = next(out.glob("03-export-*"))
    breakages = {"empty": lambda g: g.write_bytes(b""),
                 "random bytes": lambda g: g.write_bytes(os.urandom(2048)),
                 "another graph": lambda g: shutil.copy(g.with_name("text_encoder.onnx"), g),
                 "renamed": lambda g: g.rename(g.with_name("image_encoder.old.onnx"))}
    for why, breaks in breakages.items():
        copy = tmp_path / why.replace(" ", "-") / "export"
        shutil.copytree(original, copy)
        breaks(copy / "onnx" / "image_encoder.onnx")
        code = main(["quantize", str(copy), "--out", str(copy.parent / "int8"), "--mode", "dynamic", "--no-eval",
                     "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 1 and len(err.splitlines()) == 1, (why, err)
        assert err.startswith(f"error: {copy / 'onnx' / 'image_encoder.onnx'}: "), (why, err)
        assert str(original) not in err and not (copy.parent / "int8").exists(), why
    # an intact copy, the original out of reach: the copy is what is quantized, and the record says so
    copy = tmp_path / "intact" / "export"
    shutil.copytree(original, copy)
    aside = original.with_name(original.name + ".aside")
    original.rename(aside)
    try:
        assert main(["quantize", str(copy), "--out", str(tmp_path / "intact" / "int8"), "--mode", "dynamic",
                     "--no-eval", "--quiet"]) == 0
    finally:
        aside.rename(original)
    record = json.loads((tmp_path / "intact" / "int8" / "artifact.json").read_text())
    assert record["path"] == "." and record["parent"] == json.loads((copy / "artifact.json").read_text())["id"]
    # its export folder named directly (no record there) is a new input: the graph's own error, naming the file
    broken = tmp_path / "empty" / "export"
    code = main(["quantize", str(broken / "onnx"), "--out", str(tmp_path / "empty" / "int8"), "--mode", "dynamic",
                 "--no-eval", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith(f"error: {broken / 'onnx' / 'image_encoder.onnx'}: "), err


def test_eval_of_a_step_writes_beside_the_runs_record_never_over_it(tiny_run, tmp_path):
    """`vlmedge eval` on a run's step folder or on its product: the step's eval.json (the run's record) and the
    product are left as they are; the new figures go to a new eval-<time>.json in the step folder, or to --out."""
    from vlmedge.cli import main

    out, _ = tiny_run
    step = tmp_path / "step"
    shutil.copytree(next(out.glob("04-quantize-*")), step)
    record, product = (step / "eval.json").read_bytes(), sorted(p.name for p in (step / "onnx").iterdir())
    flags = ["--zero-shot-images", "36", "--retrieval-pairs", "16", "--hard-negative-pairs", "8", "--json"]
    for i, path in enumerate((step, step / "onnx")):
        assert main(["eval", str(path), *flags]) == 0
        written = sorted(step.glob("eval-*.json"))
        assert written and json.loads(written[-1].read_text())["metrics"]["zero_shot"]["n"] == 36
        for w in written:
            w.unlink()
    assert (step / "eval.json").read_bytes() == record
    assert sorted(p.name for p in (step / "onnx").iterdir()) == product
    assert main(["eval", str(step / "onnx"), *flags, "--out", str(tmp_path / "mine.json")]) == 0
    assert json.loads((tmp_path / "mine.json").read_text())["config"]["zero_shot_images"] == 36
