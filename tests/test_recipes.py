from pathlib import Path

import pytest

from vlmedge.errors import VlmedgeError
from vlmedge.recipe import load_recipe, recipes_dir, shipped_recipes

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name):
    recipe = load_recipe(recipes_dir() / name)
    assert recipe.stages and recipe.targets
    text = (recipes_dir() / name).read_text()
    assert text.startswith("#"), "each shipped recipe opens with a comment saying what it is for"


def test_shipped_recipes_exist():
    assert {"quickstart.yaml", "edge-cpu.yaml", "jetson-orin.yaml", "gpu-server.yaml",
            "from-clip-folder.yaml"} <= set(shipped_recipes())


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


BASE = """name: t
model: {preset: tiny}
stages:
  - train: {steps: 2}
  - export: {}
"""


@pytest.mark.parametrize("text, message", [
    (BASE + "colour: red\n", r"r.yaml:6: colour: unknown key"),
    (BASE.replace("{steps: 2}", "{steps: two}"), r"r.yaml:4: stages.0.train.steps: expected an integer, got 'two'"),
    (BASE.replace("{steps: 2}", "{stepz: 2}"), r"stages.0.train.stepz: unknown key; expected one of: steps"),
    ("name: t\nstages: [export]\n", r"model: required"),
    (BASE.replace("- export: {}", "- compile: {}"), r"r.yaml:5: stages.1: unknown stage 'compile'"),
    (BASE.replace("- export: {}", "- quantize: {}\n  - export: {}"), r"stages.1: quantize needs an fp32 ONNX export"),
    (BASE.replace("- train: {steps: 2}\n", "- export: {}\n  - train: {steps: 2}\n"), r"train must be the first"),
    (BASE + "targets: [quantum]\n", r"targets.0: unknown target 'quantum'"),
    (BASE.replace("- export: {}", "- prune: {vision_heads: 1.5}"), r"stages.1.prune: prune: vision_heads=1.5"),
    (BASE + "gates: ['cpu.pair.p90 is fast']\n", r"gates.0: budget 'cpu.pair.p90 is fast'"),
    ("model: [oops\n", r"invalid YAML"),
])
def test_malformed_recipes_fail_before_any_work(tmp_path, text, message):
    with pytest.raises(VlmedgeError, match=message):
        load_recipe(_write(tmp_path, text))


def test_set_overrides_any_field(tmp_path):
    path = _write(tmp_path, BASE + "  - quantize: {mode: dynamic}\n")
    r = load_recipe(path, ["stages.train.steps=7", "stages.quantize.mode=static", "model.preset=small",
                           "measure.min_runs=3"])
    assert r.stages[0].config.steps == 7 and r.stages[2].config.mode == "static"
    assert r.model.preset == "small" and r.measure.min_runs == 3
    with pytest.raises(VlmedgeError, match=r"stages.0.train.steps: expected an integer"):
        load_recipe(path, ["stages.0.train.steps=many"])
    with pytest.raises(VlmedgeError, match="expected KEY.PATH=VALUE"):
        load_recipe(path, ["stages.train.steps"])


def test_recipes_command_lists_them(capsys):
    from vlmedge.cli import main

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "quickstart.yaml" in out and "edge-cpu.yaml" in out
