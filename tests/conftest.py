"""Shared fixtures: a tiny trained model and its export, built once per session in a temporary cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
TINY_RECIPE = REPO / "tests" / "tiny.yaml"


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["VLMEDGE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny dual encoder trained for a few steps (session-wide, read-only for tests)."""
    from vlmedge.train import TrainConfig, train

    out = tmp_path_factory.mktemp("tiny") / "model"
    train(TrainConfig(preset="tiny", steps=8, batch_size=32, data_count=512), out, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_model, tmp_path_factory) -> Path:
    from vlmedge.stages.export import export

    out = tmp_path_factory.mktemp("tiny-export") / "onnx"
    export(tiny_model, out)
    return out


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory, tiny_model) -> Path:
    """A randomly initialised tiny CLIPModel folder, saved the way users bring one (with tokenizer and processor)."""
    import json

    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = CLIPConfig(**tiny_tower_configs(tok, max_position_embeddings=32), projection_dim=16)
    out = tmp_path_factory.mktemp("clip") / "clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps({"crop_size": 32, "size": {"shortest_edge": 32}}))
    return out


def tiny_tower_configs(tok, max_position_embeddings: int) -> dict:
    """text_config and vision_config of a 32-wide, 2-layer folder (CLIP, SigLIP) using the tokenizer `tok`."""
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return {"text_config": dict(vocab_size=len(tok), max_position_embeddings=max_position_embeddings,
                                pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                                eos_token_id=tok.sep_token_id, **layers),
            "vision_config": dict(image_size=32, patch_size=8, **layers)}


def run_cli(*args: str, timeout: float = 600) -> tuple[int, str, str]:
    """Run `vlmedge ARGS` in a subprocess (to see real exit codes and stderr)."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "vlmedge", *args], capture_output=True, text=True, cwd=REPO,
                       env={**os.environ}, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="session")
def vqa_model(tmp_path_factory, tiny_model):
    """vqa-tiny trained 60 steps, its vision encoder started from the tiny dual encoder (two-stage training)."""
    out = tmp_path_factory.mktemp("vqa") / "model"
    from vlmedge.train import TrainConfig, train

    train(TrainConfig(steps=60, vision_init=str(tiny_model), freeze_vision_steps=30, preset="vqa-tiny", batch_size=32,
                      data_count=512, warmup_steps=5), out, progress=False)
    return out


@pytest.fixture(scope="session")
def vqa_tiny_run(tmp_path_factory):
    """`tests/vqa-tiny.yaml` compressed end to end: (run folder, report)."""
    from vlmedge.pipeline import run
    from vlmedge.recipe import load_recipe

    out = tmp_path_factory.mktemp("vqa-run") / "run"
    return out, run(load_recipe(str(REPO / "tests" / "vqa-tiny.yaml")), out)


@pytest.fixture(scope="session")
def vqa_export(vqa_model, tmp_path_factory):
    from vlmedge.stages.export import ExportConfig, export

    out = tmp_path_factory.mktemp("vqa-onnx") / "onnx"
    export(vqa_model, out, ExportConfig(tune_threads=False))
    return out


@pytest.fixture(scope="session")
def smolvlm_export(tmp_path_factory) -> tuple[Path, Path]:
    """A SmolVLM-256M-shaped folder at reduced depth (1 vision layer, 2 decoder layers; SmolVLM's own processor
    config, splitting on) and its export: (model folder, export folder)."""
    from test_generative import smolvlm_256m_folder

    from vlmedge.cli import main

    root = tmp_path_factory.mktemp("smolvlm")
    folder = smolvlm_256m_folder(root / "model", vision_layers=1, text_layers=2)
    assert main(["export", str(folder), "--out", str(root / "onnx"), "--quiet", "--no-eval", "--no-tune-threads",
                 "--parity-questions", "4"]) == 0
    return folder, root / "onnx"


@pytest.fixture(scope="session")
def siglip_folder(tmp_path_factory, tiny_model):
    """A randomly initialised SiglipModel saved as a user brings one: config, safetensors, tokenizer and SigLIP's
    processor config (resize to the square, no crop)."""
    import json

    import numpy as np
    import torch
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel

    tok = AutoTokenizer.from_pretrained(tiny_model)
    cfg = SiglipConfig(**tiny_tower_configs(tok, max_position_embeddings=24))
    out = tmp_path_factory.mktemp("siglip") / "siglip"
    torch.manual_seed(0)  # the same weights whatever ran before in this process
    model = SiglipModel(cfg)
    with torch.no_grad():  # a released SigLIP carries learned values (t ~ 117, b ~ -12); the paper starts at 10, -10
        model.logit_scale.fill_(np.log(10.0))
        model.logit_bias.fill_(-10.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": 32, "width": 32},
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}))
    (out / "vlmedge.json").write_text(json.dumps({"max_length": 24}))
    return out
