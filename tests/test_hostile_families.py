"""Bad inputs of the generative and matching families, one test per class: each is a one-line error naming the
file (and the key, JSON path or tensor) at fault, read where it is read; none reaches the CLI's catch-all
("error: unexpected ...")."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from safetensors.torch import load_file, save_file

from vlmedge.cli import main


def _refused(capsys, argv: list[str], *fragments: str) -> str:
    code = main([*argv, "--quiet"] if argv[0] not in ("eval", "bench") else argv)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not err.startswith("error: unexpected"), err  # the catch-all is the last resort, never reached here
    for fragment in fragments:
        assert fragment in err, err
    return err


def _eval(path, data="shapes:16") -> list[str]:
    return ["eval", str(path), "--data", data, "--vqa-questions", "4", "--json"]


# --- users' VQA data --------------------------------------------------------------------------------------------------

def _vqa_pair(folder: Path, questions, annotations) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    q, a = folder / "questions.json", folder / "annotations.json"
    q.write_bytes(questions if isinstance(questions, bytes) else json.dumps({"questions": questions}).encode())
    a.write_text(json.dumps({"annotations": annotations}))
    return f"{q}+{a}"


def test_vqa_pairs_with_ids_that_are_not_ids_or_repeat_name_the_entry(vqa_model, tmp_path, capsys):
    good_q = [{"question_id": 1, "image_id": 7, "question": "what colour?"},
              {"question_id": 2, "image_id": 8, "question": "what shape?"}]
    good_a = [{"question_id": 1, "answers": [{"answer": "red"}]}, {"question_id": 2, "answers": ["circle"]}]
    cases = {
        "list id": ([{**good_q[0], "question_id": [1]}, good_q[1]], good_a,
                    "questions.json: questions[0]: question_id [1] is not an id"),
        "dict image": ([good_q[0], {**good_q[1], "image_id": {"x": 1}}], good_a,
                       "questions.json: questions[1]: image_id {'x': 1} is not an id"),
        "duplicated question": ([good_q[0], {**good_q[1], "question_id": 1}], good_a,
                                "questions.json: questions[1]: question_id 1 is also questions[0]"),
        "duplicated annotation": (good_q, [good_a[0], good_a[0]],
                                  "annotations.json: annotations[1]: question_id 1 is also annotations[0]"),
        "long question": ([{**good_q[0], "question": "why " * 30000}, good_q[1]], good_a,
                          "questions.json: questions[0]: question of 120000 characters; at most 2000"),
        "not UTF-8": (b'{"questions": [{"question": "\xff\xfe"}]}', good_a, "questions.json: not UTF-8 text"),
        "nested": (("[" * 100000 + "]" * 100000).encode(), good_a, "questions.json: JSON nested too deeply"),
    }
    for name, (questions, annotations, expected) in cases.items():
        source = _vqa_pair(tmp_path / name.replace(" ", "-"), questions, annotations)
        _refused(capsys, _eval(vqa_model, source), expected)


def test_metadata_rows_with_a_numeric_file_name_or_bad_bytes_name_the_line(vqa_model, tmp_path, capsys):
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "question": "q?", "answer": "a"}\n'
                                           '{"file_name": 12, "question": "q?", "answer": "a"}\n')
    _refused(capsys, _eval(vqa_model, str(folder)), "metadata.jsonl:2: file_name 12 is not a file name")
    (folder / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "question": "\xff", "answer": "a"}\n')
    _refused(capsys, _eval(vqa_model, str(folder)), "metadata.jsonl: not UTF-8 text")


# --- model folders and presets ----------------------------------------------------------------------------------------

def _copy(folder: Path, to: Path) -> Path:
    shutil.copytree(folder, to, ignore=shutil.ignore_patterns("checkpoints"))
    return to


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_an_image_token_id_that_is_not_the_tokenizers_image_token_is_refused(vqa_model, tmp_path, capsys):
    model = _copy(vqa_model, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    for wrong in (config["image_token_id"] - 1, 100000):  # another token; no token at all
        _edit_json(model / "config.json", image_token_id=wrong)
        _refused(capsys, _eval(model), f"{model / 'config.json'}: image_token_id = {wrong}, but the tokenizer's "
                                       f"<image> is {config['image_token_id']}")


def test_missing_or_misshapen_weight_tensors_are_named_never_reinitialised(vqa_model, tmp_path, capsys):
    model = _copy(vqa_model, tmp_path / "m")
    weights = load_file(model / "model.safetensors")
    dropped = {k: v for k, v in weights.items() if "text_model.layers.1." not in k}
    save_file(dropped, model / "model.safetensors", metadata={"format": "pt"})
    _refused(capsys, _eval(model), f"{model / 'model.safetensors'}: lacks model.text_model.layers.1.")
    key = "model.connector.modality_projection.proj.weight"
    save_file({**weights, key: weights[key][:, :-8].contiguous()}, model / "model.safetensors",
              metadata={"format": "pt"})
    _refused(capsys, _eval(model), f"tensor {key} is", "config.json makes it")


def test_a_config_without_text_config_is_refused_before_it_allocates(vqa_model, tmp_path):
    """transformers builds its default Llama (6.6 B parameters, killed at 4.1 GB before this check): the error
    comes first, within 200 MB of what loading the intact model takes."""
    model = _copy(vqa_model, tmp_path / "m")
    probe = ("import resource, sys; from vlmedge.cli import main; code = main(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, code)")

    def peak_mb(folder: Path) -> tuple[int, int, str]:
        p = subprocess.run([sys.executable, "-c", probe, *_eval(folder, "shapes:4")[:2], "--data", "shapes:4",
                            "--vqa-questions", "1", "--quiet"], capture_output=True, text=True, cwd=REPO,
                           timeout=300)
        mb, code = p.stdout.split()[-2:]
        return int(mb), int(code), p.stderr.strip()

    intact, code, err = peak_mb(model)
    assert code == 0, err
    _edit_json(model / "config.json", text_config=None)
    broken, code, err = peak_mb(model)
    assert code == 1 and err == f"error: {model / 'config.json'}: no text_config (an object of sizes); " \
                               "transformers would build its default model", err
    _edit_json(model / "config.json", text_config={"model_type": "llama"})  # present, but every size a default
    broken2, code, err = peak_mb(model)
    assert code == 1 and "describes 66" in err and "M parameters, the weights hold 0.2 M" in err, err
    assert max(broken, broken2) < intact + 200, (intact, broken, broken2)


@pytest.mark.parametrize("edit, expected", [
    ({"text": {"num_key_value_heads": 3}}, "text.num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"scale_factor": 3}, "a 32 px image in 8 px patches is a grid of 4 x 4 patches, which the scale_factor 3 does "
                          "not divide"),
    ({"vision": {"hidden_size": 66}}, "vision.hidden_size 66 is not divisible by num_attention_heads 4"),
    ({"text": None}, "no text section"),
])
def test_preset_shapes_a_smolvlm_cannot_take_are_refused_before_building(tmp_path, capsys, edit, expected):
    from vlmedge.models import PRESET_DIR

    spec = json.loads((PRESET_DIR / "vqa-tiny.json").read_text())
    for key, value in edit.items():
        if value is None:
            spec.pop(key)
        else:
            spec[key] = {**spec[key], **value} if isinstance(value, dict) else value
    preset = tmp_path / "bad.json"
    preset.write_text(json.dumps(spec))
    _refused(capsys, ["train", "--preset", str(preset), "--out", str(tmp_path / "out"), "--steps", "1",
                      "--data-count", "32"], f"preset:{preset}: {expected}")
    assert not (tmp_path / "out" / "config.json").exists()


def test_a_patch_grid_the_convolution_floors_is_accepted_exported_and_answers_alike(tmp_path, capsys):
    """SmolVLM-Instruct (2.2B) reads 384 px in 14 px patches: a 27 x 27 grid (the patch convolution drops the last
    6 px), pixel shuffle 3. The same floor at test size: 35 px in 8 px patches (4 x 4, 3 px dropped), shuffle 2;
    trained and exported, its parity checks passing."""
    from vlmedge.cli import main
    from vlmedge.models import PRESET_DIR

    spec = json.loads((PRESET_DIR / "vqa-tiny.json").read_text())
    spec["vision"]["image_size"] = 35
    spec["preprocess"].update(image_size=35, longest_edge=35)
    preset, model, onnx = tmp_path / "floor.json", tmp_path / "model", tmp_path / "onnx"
    preset.write_text(json.dumps(spec))
    for args in (["train", "--preset", str(preset), "--out", str(model), "--steps", "2", "--batch-size", "8",
                  "--data-count", "64", "--quiet"],
                 ["export", str(model), "--out", str(onnx), "--no-tune-threads", "--parity-questions", "2",
                  "--no-eval", "--quiet"]):
        code = main(args)
        assert code == 0, capsys.readouterr().err
    assert json.loads((model / "config.json").read_text())["vision_config"]["image_size"] == 35
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["parity"]["vision"]["cosine_min"] > 0.9999, manifest["parity"]
    assert manifest["generation_parity"]["identical"] == manifest["generation_parity"]["questions"] == 2


# --- export folders ---------------------------------------------------------------------------------------------------

def test_a_generative_export_with_a_missing_or_swapped_graph_or_manifest_names_it(vqa_export, tmp_path, capsys):
    def broken(name: str) -> Path:
        return _copy(vqa_export, tmp_path / name)

    folder = broken("missing")
    (folder / "onnx" / "decoder_model_merged.onnx").unlink()
    _refused(capsys, _eval(folder), f"{folder / 'onnx' / 'decoder_model_merged.onnx'}: missing (files.decoder in "
                                    f"{folder / 'manifest.json'})")
    folder = broken("swapped")  # the vision graph under the decoder's name
    shutil.copy(folder / "onnx" / "vision_encoder.onnx", folder / "onnx" / "decoder_model_merged.onnx")
    _refused(capsys, _eval(folder), f"{folder / 'onnx' / 'decoder_model_merged.onnx'}: not this export's decoder "
                                    "graph: it has no input 'inputs_embeds'")
    folder = broken("corrupt")
    (folder / "onnx" / "decoder_model_merged.onnx").write_bytes(b"\x08\x07garbage")
    _refused(capsys, _eval(folder), f"{folder / 'onnx' / 'decoder_model_merged.onnx'}: ONNX Runtime cannot load it")
    folder = broken("no-files")
    _edit_json(folder / "manifest.json", files=None)
    _refused(capsys, _eval(folder), f"{folder / 'manifest.json'}: 'files' must map each graph name")
    folder = broken("wrong-family")  # a dual encoder's reader on a generative export
    _edit_json(folder / "manifest.json", family="dual_encoder")
    _refused(capsys, _eval(folder)[:4], "files has no 'image' graph (it has vision, embed, decoder)")
    folder = broken("image-tokens")
    manifest = json.loads((folder / "manifest.json").read_text())
    _edit_json(folder / "manifest.json", generation={**manifest["generation"], "image_tokens": 9})
    _refused(capsys, _eval(folder), f"{folder / 'manifest.json'}: generation.image_tokens does not fit "
                                    "onnx/vision_encoder.onnx (the prompt has 9 image tokens; the image gives "
                                    f"{manifest['generation']['image_tokens']})")
    folder = broken("no-tokenizer")
    (folder / "tokenizer.json").unlink()
    _refused(capsys, _eval(folder), f"{folder}: no usable tokenizer")


# --- the classes a held-out hostile run found -------------------------------------------------------------------

def test_an_export_without_its_manifest_is_named_by_the_manifest(vqa_export, tmp_path, capsys):
    copy = shutil.copytree(vqa_export, tmp_path / "export", ignore=shutil.ignore_patterns("artifact.json"))
    (copy / "manifest.json").unlink()  # onnx-community layout: config.json beside onnx/, read as a model folder before
    _refused(capsys, _eval(copy), f"{copy}: ONNX files but no manifest.json")


def test_eval_refuses_a_recorded_export_whose_manifest_changed_as_bench_and_quantize_do(vqa_model, tmp_path, capsys):
    copy = tmp_path / "export"  # recorded: its artifact.json says generative and lists the manifest's sha256
    assert main(["export", str(vqa_model), "--out", str(copy), "--no-eval", "--no-tune-threads", "--parity-questions",
                 "1", "--quiet"]) == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "family": "dual_encoder"}))
    changed = f"{copy / 'manifest.json'}: changed since it was written"
    for argv, fragment in ((_eval(copy), changed), (["quantize", str(copy), "--out", str(tmp_path / "q")], changed),
                           (["bench", str(copy)], f"{copy / 'manifest.json'}: files has no 'image' graph")):
        _refused(capsys, argv, fragment)  # all three refuse, naming the manifest; none believes the record over it


def test_a_folder_with_two_vqa_pairs_is_refused_naming_them(vqa_model, tmp_path, capsys):
    one = [{"question_id": 1, "image_id": 7, "question": "what colour?"}]
    _vqa_pair(tmp_path / "v2", one, [{"question_id": 1, "answers": ["red"]}])
    for name in ("val_questions.json", "val_annotations.json"):
        shutil.copy(tmp_path / "v2" / name.split("_")[1], tmp_path / "v2" / name)
    _refused(capsys, _eval(vqa_model, str(tmp_path / "v2")), "holds 2 question files and 2 annotation files",
             "give one pair as QUESTIONS.json+ANNOTATIONS.json")


def test_a_tower_narrower_than_the_models_encoder_is_refused_at_load_with_its_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: narrow\nmodel:\n  preset: vqa-small\n  tower: {preset: tiny, steps: 6}\n"
                      "stages:\n  - train: {steps: 2}\n")
    _refused(capsys, ["compress", str(recipe), "--out", str(tmp_path / "run")],
             f"{recipe}:4: model.tower.preset: tower 'tiny': vision hidden_size=64, the preset's is 128")
    assert not (tmp_path / "run").exists()  # refused before any work


def test_skip_bad_says_how_many_images_it_skipped(tmp_path, capsys):
    from PIL import Image

    rows = []
    for i in range(12):
        Image.new("RGB", (40, 40), (20 * i, 40, 90)).save(tmp_path / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a colour patch number {i}"})
    (tmp_path / "3.png").write_bytes(b"not a png")
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path), "--steps", "1", "--batch-size", "4", "--quiet",
            "--out", str(tmp_path / "model")]
    _refused(capsys, argv, "3.png: cannot read image", "use --skip-bad")
    assert main([*argv, "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "data: skipped 1 unreadable image(s) of" in out and "e.g. 3.png" in out, out
    info = json.loads((tmp_path / "model" / "artifact.json").read_text())["info"]
    assert info["skipped_images"] == 1
