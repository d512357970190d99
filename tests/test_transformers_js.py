"""The generative export loads as written in the runtime its layout is named after: transformers.js in Node
(`tests/js`, installed by `.ci/run` with `npm ci --ignore-scripts`), from a local folder, no hub. One folder carries
fp32, q8 and q4 graphs side by side (the onnx-community file names); each precision's greedy answers must be
token-identical to vlmedge's own runtime on the same images and questions. Skips, saying why, where Node or the
package is absent."""

import json
import re
import shutil
import subprocess

import pytest
from conftest import REPO
from PIL import Image

from vlmedge.artifact import Artifact
from vlmedge.cli import main

JS = REPO / "tests" / "js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(
    NODE is None or not (JS / "node_modules" / "@huggingface" / "transformers").is_dir(),
    reason="needs Node and tests/js/node_modules (cd tests/js && npm ci --ignore-scripts)")


def test_transformers_js_answers_like_vlmedge_from_one_folder_of_three_precisions(vqa_model, tmp_path, monkeypatch):
    """The fp32 graphs keep their weights in side files, as the 2.2B's decoder does (forced here by lowering the
    limit), the quantized ones hold theirs."""
    import vlmedge.stages.export as export_stage
    from vlmedge.families.generative import OnnxGenerator
    from vlmedge.families.generative.data import open_vqa

    monkeypatch.setattr(export_stage, "ONE_FILE_BYTES", 0)
    export, fast = tmp_path / "export", ["--no-eval", "--no-tune-threads", "--quiet"]
    assert main(["export", str(vqa_model), "--out", str(export), "--parity-questions", "2", *fast]) == 0
    for mode, dtype in (("dynamic", "q8"), ("int4", "q4")):  # each precision added to the export's onnx/
        assert main(["quantize", str(export), "--out", str(tmp_path / dtype), "--mode", mode, "--add-to-source",
                     "--agreement-questions", "0", *fast]) == 0
    assert Artifact.load(export).mismatches() == []  # added precisions leave what vlmedge reads as recorded
    names = sorted(p.name for p in (export / "onnx").iterdir())
    graphs = ("decoder_model_merged", "embed_tokens", "vision_encoder")
    assert names == sorted([f"{g}{s}.onnx" for g in graphs for s in ("", "_quantized", "_q4")] +
                           [f"{g}.onnx_data" for g in graphs])

    data = open_vqa("shapes:64", "test", resolution=32)
    items = data.eval_items(8, seed=3)
    jobs = {"dtypes": ["fp32", "q8", "q4"], "max_new_tokens": 16, "items": []}
    for k, item in enumerate(items):
        path = tmp_path / f"{k}.png"
        Image.fromarray(data.images([item.index])[0]).save(path)
        jobs["items"].append({"image": str(path), "question": item.question})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([NODE, str(JS / "generate.mjs"), str(export), str(tmp_path / "jobs.json")], cwd=JS,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    for dtype, folder in (("fp32", export), ("q8", tmp_path / "q8"), ("q4", tmp_path / "q4")):
        ours = OnnxGenerator(folder)
        for job, answer in zip(jobs["items"], got[dtype]):
            pixels, prompt = ours.inputs(Image.open(job["image"]), job["question"])
            assert answer["prompt"] == prompt, (dtype, job["question"])
            assert answer["ids"] == ours.generate_ids(pixels, prompt, 16), (dtype, job["question"])

    # the docs' example (docs/generative.md), as written there, answers as vlmedge does
    readme = (REPO / "docs" / "generative.md").read_text()
    code = re.search(r"the test suite runs this.*?```js\n(.*?)```", readme, re.S).group(1)
    job = jobs["items"][0]
    p = subprocess.run([NODE, "--input-type=module", "-e", code, str(export), job["image"], job["question"], "q4"],
                       cwd=JS, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    expected = OnnxGenerator(tmp_path / "q4").answer(Image.open(job["image"]), job["question"], 24)
    assert p.stdout.strip().splitlines()[-1].strip() == expected


def test_transformers_js_loads_a_smolvlm_256m_shaped_export_with_its_own_processor(smolvlm_export, tmp_path):
    """SmolVLM's own processor config (Idefics3ImageProcessor, splitting on) in a SmolVLM-256M-shaped export: a
    1024x768 image is 4 x 3 tiles and the global image in both runtimes, with the same prompt ids; fed the same
    pixels, vlmedge's runtime writes the 16 tokens transformers.js writes (EOS ignored; random weights). The two
    processors' pixels are not equal: transformers.js resizes between tiles bilinearly on normalised floats, where
    transformers (and vlmedge) resample the image with PIL's Lanczos."""
    import numpy as np

    from vlmedge.families.generative import OnnxGenerator
    from vlmedge.families.generative.data import open_vqa

    _, export = smolvlm_export
    data = open_vqa("shapes:16", "test", resolution=64)
    items = data.eval_items(2, seed=1)
    jobs = {"dtypes": ["fp32"], "max_new_tokens": 16, "ignore_eos": True, "pixels_dir": str(tmp_path), "items": []}
    for k, item in enumerate(items):
        Image.fromarray(data.images([item.index])[0]).resize((1024, 768), Image.BICUBIC).save(tmp_path / f"{k}.png")
        jobs["items"].append({"image": str(tmp_path / f"{k}.png"), "question": item.question})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([NODE, str(JS / "generate.mjs"), str(export), str(tmp_path / "jobs.json")], cwd=JS,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])["fp32"]
    ours = OnnxGenerator(export)
    for k, (job, answer) in enumerate(zip(jobs["items"], got)):
        frames, prompt = ours.inputs(Image.open(job["image"]), job["question"])
        assert answer["prompt"] == prompt
        assert answer["pixels"] == [1, 13, 3, 512, 512] and frames.shape == (13, 3, 512, 512)
        theirs = np.fromfile(tmp_path / f"{k}.f32", dtype="<f4").reshape(answer["pixels"])[0]
        assert answer["ids"] == ours.runtime.generate(theirs, prompt, 16, stop_at_eos=False)
        assert np.abs(theirs - frames).mean() < 0.05  # the same picture, resampled differently


CLIP = ["CLIPVisionModelWithProjection", "CLIPTextModelWithProjection"]


@pytest.mark.parametrize("which, classes", [("tiny_clip", CLIP), ("tiny_model", CLIP),
                                            ("siglip_folder", ["SiglipVisionModel", "SiglipTextModel"])])
def test_transformers_js_embeds_like_vlmedge_from_a_dual_encoder_export(which, classes, request, tmp_path):
    """`export --layout onnx-community` of a CLIP folder, of vlmedge's own dual encoder (ViT + BERT) and of a SigLIP
    folder: transformers.js loads the towers as its CLIP (or SigLIP) vision and text models with the folder's
    processor and tokenizer, fp32 and q8 from one folder, and its embeddings equal vlmedge's within the export's
    parity tolerance (images at the model's resolution: both processors leave them as they are)."""
    import numpy as np

    from vlmedge.data import open_dataset
    from vlmedge.runtime.onnx import OnnxEncoder

    model, export, fast = request.getfixturevalue(which), tmp_path / "export", ["--no-eval", "--no-tune-threads",
                                                                                "--quiet"]
    assert main(["export", str(model), "--out", str(export), "--layout", "onnx-community", *fast]) == 0
    assert main(["quantize", str(export), "--out", str(tmp_path / "q8"), "--mode", "dynamic", "--add-to-source",
                 *fast]) == 0
    assert sorted(p.name for p in (export / "onnx").iterdir()) == [
        "text_model.onnx", "text_model_quantized.onnx", "vision_model.onnx", "vision_model_quantized.onnx"]
    ours = OnnxEncoder(export)
    data = open_dataset("shapes:8", "test", resolution=ours.preprocess.image_size)
    jobs = {"dtypes": ["fp32", "q8"], "classes": classes, "images": [],
            "texts": ["a red circle", "two blue squares on the left"]}
    for k in range(4):
        Image.fromarray(data.images([k])[0]).save(tmp_path / f"{k}.png")
        jobs["images"].append(str(tmp_path / f"{k}.png"))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    p = subprocess.run([NODE, str(JS / "embed.mjs"), str(export), str(tmp_path / "jobs.json")], cwd=JS,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    # padded to the longest, as transformers.js pads: INT8 dynamic quantizes by the whole tensor's range, so the
    # padding's length moves the q8 embeddings by up to 1e-2 (measured), and the comparison needs the same inputs
    tokens = ours.tokenizer(jobs["texts"], padding=True, truncation=True, max_length=ours.manifest["max_length"],
                            return_tensors="np")
    assert got["input_ids"] == tokens["input_ids"].tolist()
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in jobs["images"]])
    for dtype, folder in (("fp32", export), ("q8", tmp_path / "q8")):
        enc = OnnxEncoder(folder)
        assert np.abs(np.asarray(got[dtype]["image_embeds"]) - enc.encode_images(enc.preprocess(images))).max() <= 1e-4
        text = enc.run_text(tokens["input_ids"], tokens["attention_mask"])
        assert np.abs(np.asarray(got[dtype]["text_embeds"]) - text).max() <= 1e-4
