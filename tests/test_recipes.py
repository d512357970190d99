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


def test_recipes_are_package_data_and_resolve_by_name():
    import vlmedge

    assert recipes_dir().parent == Path(vlmedge.__file__).parent  # inside the package: a wheel carries them
    assert load_recipe("quickstart").name == "quickstart" and load_recipe("edge-cpu.yaml").name == "edge-cpu"
    with pytest.raises(VlmedgeError, match="shipped recipes: .*quickstart.yaml"):
        load_recipe("no-such-recipe")


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
    # every stage config validates its values at load, naming the recipe line
    (BASE.replace("{steps: 2}", "{batch_size: 1}"), r"r.yaml:4: stages.0.train: train: batch_size=1 is invalid"),
    (BASE.replace("{steps: 2}", "{steps: 0}"), r"r.yaml:4: stages.0.train: train: steps=0 is invalid"),
    (BASE.replace("{steps: 2}", "{batch_size: 30, grad_accum: 4}"), r"train: batch_size=30 .* multiple of grad_accum"),
    (BASE.replace("- export: {}", "- distill: {steps: 0}"), r"r.yaml:5: stages.1.distill: distill: steps=0 is invalid"),
    (BASE.replace("- export: {}", "- distill: {contrastive: 0, affinity: 0, feature: 0}"), r"all loss weights are 0"),
    (BASE.replace("- export: {}", "- distill: {feature: -1}"), r"distill: feature=-1"),
    (BASE.replace("- export: {}", "- prune: {importance: random}"), r"stages.1.prune: prune: importance='random'"),
    (BASE.replace("- export: {}", "- export: {opset: 5}"), r"r.yaml:5: stages.1.export: export: opset=5"),
    (BASE + "  - quantize: {mode: int3}\n", r"r.yaml:6: stages.2.quantize: quantize: mode='int3'"),
    (BASE + "  - quantize: {calibration_batches: 0}\n", r"calibration_batches must be >= 1"),
    (BASE + "data: {count: 0}\n", r"r.yaml:6: data: data: count=0"),
    (BASE + "eval: {retrieval_pairs: 0}\n", r"r.yaml:6: eval: eval: retrieval_pairs=0"),
    (BASE + "measure: {min_runs: 0}\n", r"r.yaml:6: measure: measure: min_runs=0"),
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


@pytest.mark.parametrize("model, stage, message", [
    ("{preset: vqa-tiny}", "prune: {text_cross_heads: 0.5}",
     r"r.yaml:3: stages.0.prune.text_cross_heads: a setting of matching models; this model is a generative model"),
    ("{preset: tiny}", "distill: {tokens: 0.5}",
     r"r.yaml:3: stages.0.distill.tokens: a setting of generative models; this model is a dual_encoder model"),
    ("{preset: match-tiny}", "prune: {vision_heads: 0.5}",
     r"r.yaml:3: stages.0.prune: prune: vision_heads: a matching model has no prunable vision heads; it takes "
     "text_heads, text_mlp, text_layers, text_cross_heads"),
    ("{preset: tiny}", "quantize: {graphs: {decoder: int4}}",
     r"r.yaml:4: stages.1.quantize: quantize: graphs: 'decoder' is not a graph of a dual_encoder export"),
    ("{preset: vqa-tiny, tower: {preset: match-tiny}}", "train: {steps: 1}",
     r"r.yaml:1: model.tower.preset: 'match-tiny' is a matching preset; a tower is trained as a dual_encoder"),
])
def test_another_familys_keys_are_refused_at_load_with_their_line(tmp_path, model, stage, message):
    """Before any training: a recipe key the model's family does not have, named with its line."""
    export = "  - export: {}\n" if stage.startswith("quantize") else ""
    path = _write(tmp_path, f"model: {model}\nstages:\n{export}  - {stage}\n")
    with pytest.raises(VlmedgeError, match=message):
        load_recipe(path)


def test_a_familys_own_settings_keep_their_recipe_keys(tmp_path):
    """A family's settings are keys of their section as before; the loader gives them to the model's family (its
    `Family.options`), its defaults filled in, and refuses another family's with the line."""
    from vlmedge.families.generative import GenerativeEval, GenerativeMeasure
    from vlmedge.families.matching import MatchingEval, MatchingPrune
    from vlmedge.recipe import to_dict

    path = _write(tmp_path, "model: {preset: vqa-tiny}\neval: {vqa_questions: 12}\nmeasure: {image_splitting: 'off'}\n"
                            "stages:\n  - train: {steps: 1}\n")
    r = load_recipe(path)
    assert r.eval.options == GenerativeEval(vqa_questions=12) and r.measure.options == GenerativeMeasure("off")
    assert to_dict(r)["eval"]["vqa_questions"] == 12 and "options" not in to_dict(r)["eval"]
    path = _write(tmp_path, "model: {preset: match-tiny}\neval: {rerank_k: 4}\n"
                            "stages:\n  - train: {steps: 1}\n  - prune: {text_cross_heads: 0.25}\n")
    r = load_recipe(path)
    assert r.eval.options == MatchingEval(rerank_k=4) and r.stages[1].config.options == MatchingPrune(0.25)
    assert r.stages[1].config.ratio("text_cross_heads") == 0.25 and r.stages[1].config.ratio("text_heads") == 0.0
    path = _write(tmp_path, "model: {preset: tiny}\neval: {zero_shot_images: 36, vqa_questions: 12}\n"
                            "stages:\n  - train: {steps: 1}\n")
    with pytest.raises(VlmedgeError, match=r"r.yaml:2: eval.vqa_questions: a setting of generative models; this "
                                           r"model is a dual_encoder model"):
        load_recipe(path)
    path = _write(tmp_path, "model: {preset: match-tiny}\neval: {rerank_k: 0}\nstages:\n  - train: {steps: 1}\n")
    with pytest.raises(VlmedgeError, match=r"r.yaml:2: eval: eval: rerank_k=0; expected an integer >= 1"):
        load_recipe(path)


@pytest.mark.parametrize("fixture", ["tiny_model", "vqa_model"])
def test_a_familys_declared_prunable_parts_are_what_its_models_have(request, fixture):
    from vlmedge import families
    from vlmedge.stages.prune import prunable_keys

    folder = request.getfixturevalue(fixture)
    family = families.of(folder)
    parts = family.prunable(family.load(folder))
    assert prunable_keys(parts) == set(family.prunable_parts)
