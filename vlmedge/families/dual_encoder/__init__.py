"""The contrastive dual encoder: the seed's ViT + BERT (`VisionTextDualEncoderModel`), `CLIPModel`, `SiglipModel`.

One family with three architectures: all are two towers with projections to one embedding space, loaded, pruned,
trained (symmetric InfoNCE; SigLIP its pairwise sigmoid loss), exported (one graph per tower) and evaluated
(zero-shot, retrieval, hard negatives) by the same code; only the tower classes differ, and `models` hides that
behind `image_features` / `text_features`.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...data import open_dataset
from ...data.shapes import load_shapes
from ...disk import write_json
from ...errors import VlmedgeError
from ...losses import contrastive_loss, distillation_loss
from ...models import SUPPORTED_ARCHITECTURES, load_model
from ...models.structure import TOWERS, tower_layers
from ...runtime.measure import random_feeds, run_ort, suite
from ...runtime.onnx import OnnxEncoder
from .. import Family, Graph, register
from ..onnx_export import save_tokenizer
from .model import build_from_preset, image_features, measure_flops, text_features
from .tasks import TorchEncoder, class_embeddings, evaluate, zero_shot_classes

GRAPH_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learnable temperature at 1/100


# --- the family -----------------------------------------------------------------------------------------------------

def _tower_modules(model):
    import torch
    import torch.nn.functional as F

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return F.normalize(image_features(self.model, pixel_values), dim=-1)

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return F.normalize(text_features(self.model, input_ids, attention_mask), dim=-1)

    return ImageEncoder().eval(), TextEncoder().eval()


class DualEncoder(Family):
    name = "dual_encoder"
    graph_towers = {"image": "vision", "text": "text"}
    prunable_parts = ("vision_heads", "vision_mlp", "vision_layers", "text_heads", "text_mlp", "text_layers")
    architectures = SUPPORTED_ARCHITECTURES
    layouts = {"flat": GRAPH_FILES,
               "onnx-community": {"image": "onnx/vision_model.onnx", "text": "onnx/text_model.onnx"}}
    report_metrics = ("zero_shot.top1", "retrieval.i2t_distinct_r5", "zero_shot.top5", "retrieval.t2i_r5",
                      "hard_negatives.colour")
    headline_scenario = "pair"
    scenarios_help = ("the image tower, the text tower, the image+text pair and zero-shot classification, plus "
                      "batched throughput")

    def build(self, spec, tokenizer, *, seed=0, source="", vision_init=None):
        if vision_init:
            raise VlmedgeError("--vision-init starts a generative or matching model's image encoder; a dual encoder preset "
                               "trains both towers from scratch (or start from a folder: --init)")
        return build_from_preset(spec, tokenizer, seed=seed, source=source)

    def load(self, path, *, attn_implementation="sdpa"):
        return load_model(path, attn_implementation=attn_implementation)

    def flops(self, model) -> dict[str, int]:
        return measure_flops(model)

    def prunable(self, model) -> dict[str, list]:
        return {t: tower_layers(model.model, t) for t in TOWERS}

    def training_loss(self, model, batch, teacher=None, weights=None):
        import torch

        b, net = batch, model.model
        images, captions = b.data.images(b.indices[b.local]), b.captions[b.local]
        pixels = torch.from_numpy(model.preprocess(images)).to(b.device)

        def encode_texts(vlm, texts):
            tok = vlm.tokenize(texts)
            return text_features(vlm.model, torch.from_numpy(tok["input_ids"]).to(b.device),
                                 torch.from_numpy(tok["attention_mask"]).to(b.device))

        with b.autocast():
            img = image_features(net, pixels)
            txt = encode_texts(model, captions)
        rows = [b.indices[j] for j in b.rows]
        match = torch.from_numpy(b.data.match(rows, [b.specs[j] for j in b.rows]))
        negatives = (None, None)
        if b.negatives is not None:  # text-side hard negatives: the same count on every rank
            texts, specs = b.negatives
            local = [texts[j] for j in range(b.local.start, b.local.stop) if texts[j] is not None]
            with b.autocast():
                neg = b.gather(encode_texts(model, local).float())
            negatives = (neg, torch.from_numpy(b.data.match(rows, [specs[j] for j in b.rows if specs[j] is not None])))
        if teacher is None:
            return contrastive_loss(b.gather(img.float()), b.gather(txt.float()), net.logit_scale, match, *negatives,
                                    logit_bias=getattr(net, "logit_bias", None))
        with torch.no_grad():
            t_img = image_features(teacher.model, torch.from_numpy(teacher.preprocess(images)).to(b.device)).float()
            t_txt = encode_texts(teacher, captions).float()
        loss, _ = distillation_loss(b.gather(img.float()), b.gather(txt.float()), net.logit_scale, b.gather(t_img),
                                    b.gather(t_txt), teacher.model.logit_scale, match, weights, negatives,
                                    getattr(net, "logit_bias", None))
        return loss

    def after_step(self, model) -> None:
        import torch

        with torch.no_grad():
            model.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    # --- export ---
    def graphs(self, model) -> list[Graph]:
        image, text = _tower_modules(model.model)
        size = model.preprocess.image_size
        return [Graph("image", GRAPH_FILES["image"], image, ("pixel_values",), ("image_embeds",),
                      {"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                      {"pixel_values": ["batch", 3, size, size]}),
                Graph("text", GRAPH_FILES["text"], text, ("input_ids", "attention_mask"), ("text_embeds",),
                      {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                       "text_embeds": {0: "batch"}},
                      {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]})]

    def parity_inputs(self, model, n: int, seed: int) -> dict[str, dict[str, Any]]:
        """Random pixels; random token ids with random padding (the padding path is checked too)."""
        tok = model.tokenizer
        if len(tok) < 8:
            raise VlmedgeError(f"{model.source}: the tokenizer has {len(tok)} tokens; not a usable text tokenizer")
        pixels, tokens = random_feeds(model.preprocess.image_size, model.max_length, len(tok), n, seed,
                                      pad_id=tok.pad_token_id or 0, cls_id=tok.cls_token_id)
        return {"image": {"pixel_values": pixels}, "text": tokens}

    def manifest_fields(self, model, reference, folder: Path) -> dict[str, Any]:
        return {"embedding_dim": int(reference["image"].shape[-1]), "preprocess": asdict(model.preprocess),
                "max_length": model.max_length, "tokenizer": save_tokenizer(model.tokenizer, folder),
                "vocab_size": len(model.tokenizer), "source_architecture": model.architecture,
                "logit_scale": float(model.model.logit_scale.detach().exp()),
                **({"logit_bias": float(model.model.logit_bias.detach())}
                   if hasattr(model.model, "logit_bias") else {})}

    def model_files(self, model, folder: Path, layout: str) -> list[str]:
        """onnx-community: the model's config.json and its image processor's config, so that transformers.js loads
        the towers as `CLIPVisionModelWithProjection` / `CLIPTextModelWithProjection` (files vision_model.onnx,
        text_model.onnx; outputs image_embeds, text_embeds, L2-normalised here) with `AutoProcessor` and
        `AutoTokenizer`."""
        if layout != "onnx-community":
            return []
        write_json(folder / "config.json", model.model.config.to_dict())
        write_json(folder / "preprocessor_config.json", model.preprocess.to_hf())
        return ["config.json", "preprocessor_config.json"]

    def export_extras(self, folder: Path, adapter, labels: Sequence[str] = (), eval_cfg=None) -> dict[str, Any]:
        """Zero-shot class embeddings, so a device can classify with the image graph alone: of `labels` (captions,
        each its own prompt), else of the classes zero-shot evaluation scores on `eval_cfg.data` (shapes' colour x
        shape, or the user's labels with the --templates prompts, averaged as evaluation averages them)."""
        classes = [(label, [label]) for label in labels] or \
            (zero_shot_classes(eval_cfg, adapter.preprocess.image_size) if eval_cfg is not None else None)
        if not classes:
            return {}
        embeds = class_embeddings(adapter, [prompts for _, prompts in classes]).astype(np.float32)
        np.save(folder / "zero_shot_text_embeds.npy", embeds)
        write_json(folder / "zero_shot_labels.json", [label for label, _ in classes])
        return {"zero_shot": {"labels": "zero_shot_labels.json", "text_embeds": "zero_shot_text_embeds.npy",
                              "prompts": {label: prompts for label, prompts in classes}}}

    # --- runtime, evaluation, latency ---
    def adapter(self, path, **options):
        """An export folder as an `OnnxEncoder` (options: threads, providers, profile), a model folder (or a loaded
        model) as a `TorchEncoder`."""
        if not isinstance(path, (str, Path)):
            return TorchEncoder(path)
        if (Path(path) / "manifest.json").is_file():
            return OnnxEncoder(path, **options)
        return TorchEncoder(self.load(path))

    def evaluate(self, adapter, eval_cfg, progress: bool = False) -> dict[str, Any]:
        self.sanity_check(adapter)
        return evaluate(adapter, eval_cfg, progress)

    def sanity_check(self, adapter) -> None:
        """Distinct captions (and images) must not all get one embedding: such a tower scores at chance, silently.
        The usual cause is a folder whose tokenizer and config disagree on the special tokens CLIP pools at."""
        where = getattr(adapter, "folder", None) or getattr(getattr(adapter, "vlm", None), "source", "the model")
        captions = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow cross"]
        if np.ptp(adapter.encode_texts(captions), axis=0).max() < 1e-6:
            raise VlmedgeError(f"{where}: the text tower gives every caption the same embedding; likely cause: the "
                               "tokenizer and config.json disagree on the pad/end-of-text token ids (CLIP pools at "
                               "eos_token_id) or the text is truncated to nothing (max_length)")
        size = adapter.preprocess.image_size
        images = np.random.default_rng(0).integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
        if np.ptp(adapter.encode_images(adapter.preprocess(images)), axis=0).max() < 1e-6:
            raise VlmedgeError(f"{where}: the image tower gives every image the same embedding; check the vision "
                               "weights and preprocessor_config.json")

    def calibration_feeds(self, adapter, data: str, batches: int, batch_size: int, seed: int):
        ds = open_dataset(data, "val", resolution=adapter.preprocess.image_size, count=batches * batch_size,
                          seed=seed)
        rng = np.random.default_rng(seed)
        out: dict[str, list] = {"image": [], "text": []}
        for b in range(batches):
            idx = list(range(b * batch_size, min((b + 1) * batch_size, len(ds))))
            if not idx:
                break
            out["image"].append({"pixel_values": adapter.preprocess(ds.images(idx))})
            tok = adapter.tokenize(ds.captions(idx, rng))
            out["text"].append({"input_ids": tok["input_ids"].astype(np.int64),
                                "attention_mask": tok["attention_mask"].astype(np.int64)})
        return out

    def latency_inputs(self, adapter, batch: int, seed: int = 0):
        """A deterministic synthetic image batch and caption batch, preprocessed and tokenised as in deployment."""
        data = load_shapes("val", max(batch, 16), adapter.preprocess.image_size, seed=seed)
        pixels = adapter.preprocess(data.images[:batch])
        rng = np.random.default_rng(seed)
        tokens = adapter.tokenize(data.captions(range(batch), rng))
        return pixels, {k: np.asarray(v, dtype=np.int64) for k, v in tokens.items()
                        if k in ("input_ids", "attention_mask")}

    def onnx_latency(self, folder, cfg, providers):
        """The board runner's ORT timing path, with real preprocessed images and captions."""
        inputs = self.latency_inputs(self.adapter(folder, open_sessions=False), cfg.throughput_batch)
        # threads: cfg.threads, else each tower's count tuned on this CPU (manifest), else ONNX Runtime's default
        return run_ort(Path(folder), cfg, providers=providers, tune=False, inputs=inputs)

    def time_scenarios(self, scenarios, cfg, record, timer=None, sync=None):
        return suite(scenarios["image"], scenarios["text"], scenarios["zero_shot"], cfg, record, timer=timer,
                     sync=sync)

    def torch_scenarios(self, model, inputs, device: str, dtype):
        """image(b), text(b) and zero_shot() on the PyTorch model (36 class embeddings, as the cpu target)."""
        import torch

        pixels, tokens = inputs
        net = model.model.to(device=device, dtype=dtype).eval()
        px = torch.from_numpy(pixels).to(device=device, dtype=dtype)
        ids = torch.from_numpy(tokens["input_ids"]).to(device)
        mask = torch.from_numpy(tokens["attention_mask"]).to(device)
        with torch.inference_mode():
            classes = torch.nn.functional.normalize(
                text_features(net, ids[:1].repeat(36, 1), mask[:1].repeat(36, 1)), dim=-1)

        def image(b):
            def run():
                with torch.inference_mode():
                    return image_features(net, px[:b])
            return run

        def text(b):
            def run():
                with torch.inference_mode():
                    return text_features(net, ids[:b], mask[:b])
            return run

        def zero_shot():
            with torch.inference_mode():
                e = torch.nn.functional.normalize(image_features(net, px[:1]), dim=-1)
                return int((e @ classes.T).argmax())

        return {"image": image, "text": text, "zero_shot": zero_shot}


register(DualEncoder())
