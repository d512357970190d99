"""Hostile and careless inputs, one test per class of what a user can do wrong: nothing lost, nothing written outside
the output folder, bounded parsing, one line instead of a traceback, no silent acceptance, readable files."""

import io
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RECIPE, run_cli

from vlmedge.cli import main
from vlmedge.data import open_dataset
from vlmedge.errors import VlmedgeError
from vlmedge.recipe import load_recipe

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, code: int, fragment: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not err.startswith("error: unexpected"), err  # the CLI's catch-all is never what names a bad input
    assert fragment in err, err
    return err


# --- 1. nothing lost through --out ---------------------------------------------------------------------------------

def test_out_never_replaces_what_vlmedge_did_not_make(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    before = _tree(model)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    documents = tmp_path / "Documents"
    documents.mkdir()
    (documents / "thesis.tex").write_text("years of work")
    cases = [(a_file, "is a file"), (documents, "not made by vlmedge"), (model, "is the input"),
             (tmp_path, "is the input")]
    for out, why in cases:
        code = main(["prune", str(model), "--out", str(out), "--heads", "0.5", "--no-eval", "--quiet"])
        _one_line_error(capsys, code, why)
    # the pipeline's run folder follows the same policy, --force included
    for args in (["--out", str(documents)], ["--out", str(documents), "--force"], ["--out", str(a_file)]):
        _one_line_error(capsys, main(["compress", str(TINY_RECIPE), "--quiet", *args]), "--out")
    assert _tree(model) == before
    assert a_file.read_text() == "mine" and (documents / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in documents.iterdir()) == ["thesis.tex"]
    # the folder of another command is not this command's either
    pruned = tmp_path / "pruned"
    assert main(["prune", str(model), "--out", str(pruned), "--heads", "0.5", "--importance", "magnitude",
                 "--no-eval", "--quiet"]) == 0
    made = _tree(pruned)
    _one_line_error(capsys, main(["export", str(model), "--out", str(pruned), "--no-eval", "--quiet"]),
                    "holds the output of vlmedge prune")
    assert _tree(pruned) == made
    # a command that fails before writing anything leaves no folder behind
    code = main(["prune", str(model), "--out", str(tmp_path / "never"), "--heads", "0.99", "--importance",
                 "magnitude", "--no-eval", "--quiet"])
    _one_line_error(capsys, code, "leaves none")
    assert not (tmp_path / "never").exists()
    # train --out FILE: refused before any data is loaded
    _one_line_error(capsys, main(["train", "--preset", "tiny", "--out", str(a_file), "--quiet"]), "is a file")
    assert a_file.read_text() == "mine"


def test_out_where_nothing_can_be_written_is_refused(tiny_model, tmp_path, capsys):
    """A folder the user cannot write (chmod 555); as root, which writes through permissions (as CI runs), a
    folder under /proc, where nothing can be created: either way a one-line error before any work, nothing made."""
    if ROOT:
        code = main(["prune", str(tiny_model), "--out", "/proc/vlmedge-nowhere/pruned", "--no-eval", "--quiet"])
        _one_line_error(capsys, code, "cannot write there")
        assert not Path("/proc/vlmedge-nowhere").exists()
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code = main(["prune", str(tiny_model), "--out", str(locked / "pruned"), "--no-eval", "--quiet"])
        _one_line_error(capsys, code, "not writable")
        assert not (locked / "pruned").exists()
    finally:
        locked.chmod(0o755)


# --- 2. a recipe writes only where it is told ------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [("name", "../escape", "a run name is"),
                                                  ("name", "a/b", "a run name is"),
                                                  ("output", "../outside", "inside the working directory"),
                                                  ("output", "/tmp/anywhere", "inside the working directory")])
def test_run_names_and_outputs_cannot_leave_the_runs_folder(tmp_path, key, value, message):
    text = TINY_RECIPE.read_text().replace("name: tiny", f"name: tiny\n{key}: {value!r}" if key == "output"
                                           else f"name: {value!r}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(VlmedgeError, match=message):
        load_recipe(recipe)


# --- 3. bounded parsing ----------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory read from /proc (Linux)")
def test_nested_alias_recipe_is_refused_quickly_in_little_memory(tmp_path):
    """The classic 'billion laughs' in YAML: 9 levels of 9 aliases expand to 9**9 strings."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: x\nmodel: {preset: tiny}\nstages: [export]\n")
    # peak memory of the process image (VmHWM): ru_maxrss would carry over the forking pytest process's size
    probe = ("import re, time; t = time.perf_counter()\n"
             "from vlmedge.cli import main\n"
             f"code = main(['compress', {str(bomb)!r}, '--out', {str(tmp_path / 'run')!r}])\n"
             "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
             "print(code, time.perf_counter() - t, int(hwm) / 1024)")
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120)
    code, seconds, peak_mb = p.stdout.split()
    assert code == "1" and "anchors and aliases" in p.stderr and "bomb.yaml:1" in p.stderr
    print(f"nested-alias recipe refused in {float(seconds):.2f} s, peak RSS {float(peak_mb):.0f} MB")
    assert float(peak_mb) < 200
    assert not (tmp_path / "run").exists()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels (a decompression bomb's header; its pixels are never decoded)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def _png(colour=(255, 0, 0)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_huge_image_is_refused_by_name_and_skippable(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "bomb.png").write_bytes(_png_header(30000, 30000))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": n, "text": f"image {n}"})
                                                       for n in ("ok.png", "bomb.png")))
    with pytest.raises(VlmedgeError, match=r"bomb.png: cannot read image .*pixels"):
        open_dataset(str(tmp_path), resolution=16)
    ds = open_dataset(str(tmp_path), resolution=16, skip_bad=True)
    assert len(ds) == 1 and ds.skipped == ["bomb.png"]


# --- 4. one line, not a traceback ------------------------------------------------------------------------------------

def test_broken_files_get_one_line_naming_them(tiny_model, tiny_export, tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"caption": "x"}]}))
    with pytest.raises(VlmedgeError, match=r"captions.json: annotations\[0\] needs image_id"):
        open_dataset(str(coco), resolution=16)

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    (model / "preprocessor_config.json").write_text("{not json")
    _one_line_error(capsys, main(["eval", str(model)]), "preprocessor_config.json: not valid JSON")

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["preprocess"]["image_size"] = 64  # the graph takes 32
    (export / "manifest.json").write_text(json.dumps(manifest))
    _one_line_error(capsys, main(["eval", str(export)]), "image_encoder.onnx: input pixel_values axis 2 is 32")
    _one_line_error(capsys, main(["bench", str(export), "--min-runs", "2"]), "axis 2 is 32 in the graph")


def test_eval_shows_the_metrics_before_a_folder_refuses_eval_json(tiny_model, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("checkpoints"))
    (model / "eval.json").mkdir()  # cannot be written, even by root
    code = main(["eval", str(model), "--data", "shapes", "--zero-shot-images", "36", "--retrieval-pairs", "16",
                 "--hard-negative-pairs", "8", "--json"])
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["zero_shot"]["n"] == 36
    assert err.startswith("error: ") and f"cannot write {model / 'eval.json'}" in err
    assert len(err.strip().splitlines()) == 1


def test_an_unexpected_failure_is_one_line_and_debug_shows_it(tiny_model, monkeypatch, capsys):
    import vlmedge.families.dual_encoder as family

    def broken(*_, **__):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.setattr(family.DualEncoder, "evaluate", broken)
    code = main(["eval", str(tiny_model)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "unexpected RuntimeError: something nobody foresaw" in err and "--debug" in err
    with pytest.raises(RuntimeError):
        main(["eval", str(tiny_model), "--debug"])


# --- 5. no silent acceptance -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [("", "caption '' is empty"), (None, "caption None is empty"),
                                           ("   ", "caption '   ' is empty"),
                                           ("x" * 3000, "caption of 3000 characters")])
def test_empty_null_and_huge_captions_are_refused_with_their_line(tmp_path, text, message):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "fine"}) + "\n" +
                                             json.dumps({"file_name": "a.png", "text": text}) + "\n")
    with pytest.raises(VlmedgeError, match=rf"metadata.jsonl:2: {message}"):
        open_dataset(str(tmp_path), resolution=16)


def test_dangling_coco_ids_are_reported(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(_png())
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 1, "caption": "a"}, {"image_id": 9, "caption": "b"}]}))
    assert len(open_dataset(str(coco), resolution=16)) == 1
    assert "1 image_id(s) with captions but no image entry (e.g. 9)" in capsys.readouterr().err
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                                "annotations": [{"image_id": 9, "caption": "b"}]}))
    with pytest.raises(VlmedgeError, match=r"captions.json: no annotation's image_id is among the images"):
        open_dataset(str(coco), resolution=16)


def test_bad_data_sources_fail_alike_everywhere(tiny_model, tiny_export, tmp_path, capsys):
    _one_line_error(capsys, main(["eval", str(tiny_model), "--data", "shapes:abc"]), "shapes:COUNT")
    _one_line_error(capsys, main(["train", "--preset", "tiny", "--data", "shapes:abc", "--out",
                                  str(tmp_path / "t")]), "shapes:COUNT")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_export / "image_encoder.onnx", bare)
    _one_line_error(capsys, main(["eval", str(bare)]), "ONNX files but no manifest.json")


def test_another_familys_flag_is_one_line_naming_the_family(tiny_model, tiny_export, tmp_path, capsys):
    """A family's own flags (`Family.options`) are offered by every command whose section has them, and refused
    for a model of another family before any work."""
    _one_line_error(capsys, main(["eval", str(tiny_model), "--vqa-questions", "3"]),
                    "--vqa-questions: a setting of generative models; this model is a dual_encoder model")
    _one_line_error(capsys, main(["prune", str(tiny_model), "--out", str(tmp_path / "p"), "--text-cross-heads",
                                  "0.5", "--no-eval", "--quiet"]),
                    "--text-cross-heads: a setting of matching models; this model is a dual_encoder model")
    _one_line_error(capsys, main(["bench", str(tiny_export), "--image-splitting", "on"]),
                    "measure: image_splitting: a setting of generative models; this model is a dual_encoder model")
    assert not (tmp_path / "p").exists()


def test_a_collapsed_text_tower_is_an_error_not_chance(tiny_clip, tmp_path, capsys):
    """A CLIP folder whose config names an end-of-text id its tokenizer never emits pools every caption at the
    first token: every caption gets one embedding."""
    clip = tmp_path / "clip"
    shutil.copytree(tiny_clip, clip)
    config = json.loads((clip / "config.json").read_text())
    config["text_config"]["eos_token_id"] = config["text_config"]["vocab_size"] - 1
    (clip / "config.json").write_text(json.dumps(config))
    _one_line_error(capsys, main(["eval", str(clip)]), "the text tower gives every caption the same embedding")
    _one_line_error(capsys, main(["export", str(clip), "--out", str(tmp_path / "onnx"), "--no-eval", "--quiet"]),
                    "the text tower gives every caption the same embedding")
    assert not (tmp_path / "onnx" / "manifest.json").exists()


# --- 6. readable files, Ctrl-C, examples -----------------------------------------------------------------------------

def test_written_files_honour_the_umask(tiny_model, tiny_export):
    mask = os.umask(0)
    os.umask(mask)
    for path in (tiny_export / "manifest.json", tiny_model / "vlmedge.json", tiny_model / "preprocessor_config.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_ctrl_c_keeps_a_checkpoint_and_exits_130(tmp_path):
    out = tmp_path / "t"
    p = subprocess.Popen([sys.executable, "-m", "vlmedge", "train", "--preset", "tiny", "--steps", "1000000",
                          "--batch-size", "16", "--data-count", "256", "--checkpoint-every", "2", "--out", str(out),
                          "--quiet"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and p.poll() is None and not (out / "checkpoints/last/trainer.json").exists():
        time.sleep(0.2)  # training is under way (a million steps: it cannot finish first)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "checkpoint saved; continue with --resume" in err and len(err.strip().splitlines()) == 1
    assert (out / "checkpoints" / "last" / "trainer.json").is_file() and not (out / "artifact.json").exists()


def test_the_hostile_recipe_run_writes_nothing_outside(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE.read_text().replace("name: tiny", "name: ../../escaped"))
    code, _, err = run_cli("compress", str(recipe))
    assert code == 1 and "a run name is" in err and not (REPO.parent / "escaped").exists()
    assert np.all([not p.name.startswith("escaped") for p in REPO.parent.iterdir()])
