"""The dual encoder's model code: building the seed's ViT + BERT (or a CLIP, a SigLIP) from a preset, and the two
embedding functions training, evaluation, distillation and export share. Loading a folder is `models.load_model`
(the dual encoders' architectures are its default)."""

from __future__ import annotations

from typing import Any

from ..._hf import quiet_transformers
from ...errors import VlmedgeError
from ...models import VLM, load_preset
from ...models.structure import count_flops
from ...preprocess import Preprocess

# --- embedding (the same two functions serve training, evaluation, distillation and export) -----------------------

def image_features(model, pixel_values):
    """Projected, unnormalised image embeddings of a dual encoder (VisionTextDualEncoder or CLIP)."""
    out = model.get_image_features(pixel_values=pixel_values)
    return out if not hasattr(out, "pooler_output") else out.pooler_output


def text_features(model, input_ids, attention_mask):
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return out if not hasattr(out, "pooler_output") else out.pooler_output


# --- building ------------------------------------------------------------------------------------------------------

def build_from_preset(preset: dict[str, Any] | str, tokenizer, *, seed: int = 0, source: str = "") -> VLM:
    """A freshly initialised dual encoder of a preset's shape, with the given tokenizer.

    `architecture` (default `dual_encoder`) picks the seed's VisionTextDualEncoder (any HF vision and text tower by
    their `model_type`), `clip` (a CLIPModel: CLIP vision and text configs; the text tower pools at [SEP]) or
    `siglip` (a SiglipModel: the text tower pools at the last position, projected to the vision width).
    """
    import math

    import torch
    from transformers import AutoConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    quiet_transformers()
    spec = load_preset(preset) if isinstance(preset, str) else preset
    vision = dict(spec["vision"])
    text = dict(spec["text"])
    architecture = spec.get("architecture", "dual_encoder")
    tokens = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    if architecture == "clip":
        from transformers import CLIPConfig, CLIPModel

        text.update(tokens, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=spec["projection_dim"])
        model = CLIPModel(config)
        positions = model.vision_model.embeddings.position_embedding.weight
    elif architecture == "dual_encoder":
        dropout_free = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # deterministic, resumable
        vision_cfg = AutoConfig.for_model(vision.pop("model_type"), **{**dropout_free, **vision})
        text_cfg = AutoConfig.for_model(text.pop("model_type"), **{**dropout_free, **tokens, **text})
        config = VisionTextDualEncoderConfig.from_vision_text_configs(vision_cfg, text_cfg,
                                                                      projection_dim=spec["projection_dim"])
        model = VisionTextDualEncoderModel(config=config)
        positions = getattr(model.vision_model.embeddings, "position_embeddings", None)
    elif architecture == "siglip":
        from transformers import SiglipConfig, SiglipModel

        text.update(tokens, bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
                    projection_size=vision["hidden_size"])
        model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
        with torch.no_grad():  # the SigLIP paper's start, t = 10 and b = -10 (Hugging Face's init is t = 1, b = 0:
            model.logit_scale.fill_(math.log(10.0))  # every pair's logit near 0, and a 64-pair batch learned
            model.logit_bias.fill_(-10.0)  # nothing in 300 steps; from the paper's start, as much as InfoNCE)
        positions = model.vision_model.embeddings.position_embedding.weight
    else:
        raise VlmedgeError(f"preset: architecture={architecture!r}; expected dual_encoder, clip or siglip")
    if spec.get("vision_position_init") == "sincos":
        if positions is None:
            raise VlmedgeError("preset: vision_position_init=sincos needs a ViT-style learned position table")
        _sincos_positions(positions.data.view(-1, positions.shape[-1]))
    pre = Preprocess(**spec["preprocess"])
    return VLM(model.eval(), tokenizer, pre, int(spec["max_length"]), source or "preset")


def _sincos_positions(table) -> None:
    """Start a ViT's learned position table (1 + g*g, d; SigLIP's g*g, no class token) at 2-D sine-cosine values
    (MAE), the class slot at 0.

    At a small init std the position signal is dwarfed by the patch content and a narrow ViT trained contrastively
    never picks it up (measured: a linear probe read an object's position at chance after 800 steps), so captions
    that say where an object is could not be matched.
    """
    import math

    import torch

    d, n = table.shape[-1], table.shape[0]
    cls = 0 if math.isqrt(n) ** 2 == n else 1
    g = math.isqrt(n - cls)
    q = d // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float32) / q)
    ys, xs = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    parts = [f(c.reshape(-1, 1) * omega) for c in (xs, ys) for f in (torch.sin, torch.cos)]
    grid = torch.cat(parts, dim=1)
    with torch.no_grad():
        table.zero_()
        table[cls:, :grid.shape[1]] = grid


def measure_flops(vlm) -> dict[str, int]:
    """FLOPs of one image and one caption (batch 1) of a dual encoder, counted on the real model."""
    import torch

    size = vlm.preprocess.image_size
    tok = vlm.tokenize(["a photo"])

    return count_flops({"image": lambda: image_features(vlm.model, torch.zeros(1, 3, size, size)),
                        "text": lambda: text_features(vlm.model, torch.from_numpy(tok["input_ids"]),
                                                      torch.from_numpy(tok["attention_mask"]))})
