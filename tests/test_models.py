import json
import shutil

import pytest
import torch

from vlmedge.errors import VlmedgeError
from vlmedge.evaluate import EvalConfig
from vlmedge.families.dual_encoder.tasks import TorchEncoder, evaluate
from vlmedge.models import count_parameters, load_model


def test_presets_are_the_advertised_size():
    from vlmedge.families.dual_encoder.model import build_from_preset
    from vlmedge.models import load_preset, train_tokenizer

    tok = train_tokenizer(["a red circle", "a blue square"], 64)
    assert count_parameters(build_from_preset("tiny", tok).model) < 2_000_000
    base = load_preset("base")
    assert base["vision"]["patch_size"] == 16 and base["vision"]["image_size"] == 224
    assert base["projection_dim"] == 512 and base["text"]["hidden_size"] == 768


def test_clip_preset_builds_a_clipmodel_with_sincos_positions(tmp_path):
    """`architecture: clip` presets build a CLIPModel that pools text at [SEP] and starts from 2-D sin-cos positions."""
    from vlmedge.families.dual_encoder.model import build_from_preset, text_features
    from vlmedge.models import load_preset, train_tokenizer

    spec = load_preset("small-clip")
    spec["vision"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    spec["text"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    tok = train_tokenizer(["a red circle", "a blue square on the left"], 64)
    vlm = build_from_preset(spec, tok)
    assert vlm.architecture == "CLIPModel" and vlm.model.config.text_config.eos_token_id == tok.sep_token_id
    table = vlm.model.vision_model.embeddings.position_embedding.weight.detach()
    assert torch.all(table[0] == 0) and float(table[1:].abs().max()) == pytest.approx(1.0, abs=1e-6)
    ids = vlm.tokenize(["a red circle", "a red circle on the left"])
    with torch.no_grad():
        emb = text_features(vlm.model, torch.from_numpy(ids["input_ids"]), torch.from_numpy(ids["attention_mask"]))
    assert emb.shape == (2, spec["projection_dim"]) and not torch.allclose(emb[0], emb[1])
    vlm.save(tmp_path / "m")
    assert load_model(tmp_path / "m").architecture == "CLIPModel"
    with pytest.raises(VlmedgeError, match="architecture='rnn'"):
        build_from_preset({**spec, "architecture": "rnn"}, tok)


def test_model_folder_round_trip(tiny_model, tmp_path):
    a = load_model(tiny_model)
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= \
        {p.name for p in tiny_model.iterdir()}
    a.save(tmp_path / "copy")
    b = load_model(tmp_path / "copy")
    px = torch.randn(2, 3, 32, 32)
    from vlmedge.families.dual_encoder.model import image_features
    with torch.no_grad():
        assert torch.equal(image_features(a.model, px), image_features(b.model, px))


def test_clip_folder_loads_and_evaluates_the_same_way(tiny_clip):
    vlm = load_model(tiny_clip)
    assert vlm.architecture == "CLIPModel" and vlm.preprocess.image_size == 32
    cfg = EvalConfig(zero_shot_images=36, retrieval_pairs=16, hard_negative_pairs=8)
    metrics = evaluate(TorchEncoder(vlm), cfg)
    assert metrics["zero_shot"]["n"] == 36 and metrics["zero_shot"]["classes"] == 36
    r = metrics["retrieval"]
    assert r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] and r["t2i_r1"] <= r["t2i_r5"] <= r["t2i_r10"]
    from vlmedge import families

    family = families.of(tiny_clip)  # the family a CLIP folder names gives the same numbers
    assert family.name == "dual_encoder" and family.evaluate(family.adapter(tiny_clip), cfg) == metrics


def test_bad_model_folders_get_one_line_errors(tiny_model, tmp_path):
    with pytest.raises(VlmedgeError, match="model folder not found"):
        load_model(tmp_path / "nope")

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(VlmedgeError, match="unsupported architecture"):
        load_model(bert)

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model, truncated, ignore=shutil.ignore_patterns("checkpoints"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VlmedgeError, match="unreadable safetensors") as e:
        load_model(truncated)
    assert "\n" not in str(e.value)

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model, pickled, ignore=shutil.ignore_patterns("checkpoints", "*.safetensors"))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04.")
    with pytest.raises(VlmedgeError, match="only pickle checkpoints"):
        load_model(pickled)


def test_eval_cli_writes_eval_json(tiny_model, tmp_path):
    from vlmedge.cli import main

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("checkpoints"))
    assert main(["eval", str(folder), "--zero-shot-images", "36", "--retrieval-pairs", "32",
                 "--hard-negative-pairs", "8", "--json"]) == 0
    metrics = json.loads((folder / "eval.json").read_text())["metrics"]
    cfg = EvalConfig(zero_shot_images=36, retrieval_pairs=32, hard_negative_pairs=8)
    assert metrics == json.loads(json.dumps(evaluate(TorchEncoder(load_model(folder)), cfg)))  # the real figures
