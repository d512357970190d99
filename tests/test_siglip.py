"""SigLIP folders (`SiglipModel`): load, train with the sigmoid loss, prune, distil, export, quantize, like CLIP."""

import json

import numpy as np
import yaml
from conftest import run_cli


def test_siglip_folder_loads_with_its_preprocessing_and_sigmoid_loss(siglip_folder):
    import torch

    from vlmedge import families
    from vlmedge.losses import contrastive_loss

    family = families.of(siglip_folder)
    vlm = family.load(siglip_folder)
    assert family.name == "dual_encoder" and vlm.architecture == "SiglipModel"
    assert vlm.preprocess.squash and vlm.preprocess.image_size == 32
    wide = np.zeros((1, 20, 60, 3), dtype=np.uint8)
    wide[:, :, :30] = 255  # left half white: squashed (not cropped), the left half of the pixels stays white
    px = vlm.preprocess(wide)
    assert px.shape == (1, 3, 32, 32) and px[0, :, :, :14].min() > 0.9 and px[0, :, :, 18:].max() < -0.9
    # the sigmoid loss: -log sigmoid(z (t cos + b)), z = +1 on the diagonal, -1 elsewhere, summed, mean over images
    img, txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(4, 8), dim=-1)
    t, b = torch.tensor(np.log(10.0)), torch.tensor([-10.0])
    z = 2 * torch.eye(4) - 1
    want = -torch.nn.functional.logsigmoid(z * (10 * img @ txt.T - 10)).sum() / 4
    assert torch.allclose(contrastive_loss(img, txt, t, logit_bias=b), want)


def test_siglip_compresses_like_clip(siglip_folder, tmp_path):
    """Fine-tune, prune, distil, export (parity per tower), INT8, with retention and a report."""
    recipe = {"name": "siglip", "model": {"path": str(siglip_folder)}, "data": {"source": "shapes", "count": 512},
              "eval": {"zero_shot_images": 72, "retrieval_pairs": 64, "hard_negative_pairs": 32},
              "stages": [{"train": {"steps": 250, "batch_size": 64, "lr": 0.002}},
                         {"prune": {"vision_heads": 0.5, "vision_mlp": 0.5, "text_mlp": 0.5, "calibration_batches": 2,
                                    "batch_size": 16}},
                         {"distill": {"steps": 10, "batch_size": 32}}, {"export": {}},
                         {"quantize": {"mode": "dynamic"}}],
              "targets": ["cpu"], "measure": {"warmup": 1, "min_runs": 3, "min_seconds": 0.01, "throughput_batch": 2}}
    path = tmp_path / "siglip.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = run_cli("compress", str(path), "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0, err[-2000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["teacher"]["metrics"]["zero_shot.colour"] >= 0.5  # learned (chance 1/6): retention means something
    assert steps["prune"]["parameters"] < steps["teacher"]["parameters"]
    parity = steps["export"]["info"]["parity"]
    assert set(parity) == {"image", "text"} and all(p["cosine_min"] > 0.9999 for p in parity.values())
    manifest = json.loads((tmp_path / "run" / next(p.name for p in (tmp_path / "run").iterdir()
                                                   if "-export-" in p.name) / "onnx" / "manifest.json").read_text())
    assert manifest["source_architecture"] == "SiglipModel" and "logit_bias" in manifest
    assert manifest["preprocess"]["squash"] is True
    assert "zero_shot.top1" in report["steps"][-1]["retention"] and report["steps"][-1]["stage"] == "quantize"
