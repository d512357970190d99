"""The image-text matching model: BLIP's `BlipForImageTextRetrieval` as transformers implements it — a ViT image
encoder, a BERT-style text encoder whose layers cross-attend to the image's patch embeddings, an ITM head (match /
no match from the fused [CLS] state) and the ITC projections of both towers to one embedding space.

The seed's 交叉注意力 matching model: the text's tokens attend to the image's patches (Q from the text, K and V from
the image) layer by layer, so a caption's word order can bind to where things are, which one vector per image and
per text (the dual encoder) cannot. Served as a reranker: ITC retrieves the top k candidates cheaply from cached
embeddings, ITM rescores them.

Three functions compute the model the way every consumer uses it (training, evaluation, export): `encode_image`
(pixels -> patch embeddings and the normalised ITC embedding), `encode_text` (the text encoder without the image ->
normalised ITC embedding) and `match_logits` (patch embeddings + tokens -> one match logit per pair; the image's
patches broadcast over k candidate texts when one image is given).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..._hf import quiet_transformers
from ...errors import VlmedgeError
from ...models import VLM, check_model_folder, load_model, tower_mismatch
from ...preprocess import Preprocess

ARCHITECTURES = ("BlipForImageTextRetrieval",)


class MatchingVLM(VLM):
    """A loaded `BlipForImageTextRetrieval` with its tokenizer and preprocessing."""

    @property
    def itc_scale(self) -> float:
        """The fixed ITC temperature's inverse (BLIP's 1/0.07; config `logit_scale_init_value` is its log)."""
        return math.exp(float(self.model.config.logit_scale_init_value))

    @property
    def patches(self) -> int:
        """Patch embeddings per image (the class token included): what a matcher cross-attends to."""
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size) ** 2 + 1

    @property
    def width(self) -> int:
        """The width of a patch embedding."""
        return int(self.model.config.vision_config.hidden_size)

    @property
    def vision_encoder(self):
        """The image encoder's module (what the two-stage schedule freezes)."""
        return self.model.vision_model


def encode_image(model, pixel_values):
    """(patch embeddings [N, P, D], normalised ITC embeddings [N, E]) of `BlipForImageTextRetrieval`."""
    import torch.nn.functional as F

    patches = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return patches, F.normalize(model.vision_proj(patches[:, 0]), dim=-1)


def encode_text(model, input_ids, attention_mask):
    """Normalised ITC text embeddings: the text encoder alone (no cross-attention), [CLS] projected."""
    import torch.nn.functional as F

    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_proj(hidden[:, 0]), dim=-1)


def match_logits(model, patches, input_ids, attention_mask):
    """One ITM logit per (image, text) pair, log p(match) - log p(no match); `patches` of one image ([1, P, D])
    broadcast over all the texts (rerank k candidates in one call). The image's cross-attention keys and values are
    then computed once, not once per candidate: the attention's matmuls broadcast the batch of 1. Every patch is
    attended to (no patch mask, as BLIP's all-ones image mask)."""
    fused = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=patches).last_hidden_state
    itm = model.itm_head(fused[:, 0])
    return itm[:, 1] - itm[:, 0]


# --- building ------------------------------------------------------------------------------------------------------

def build(spec: dict[str, Any], tokenizer, *, seed: int = 0, source: str = "", vision_init: str | None = None):
    import torch
    from transformers import BlipConfig, BlipForImageTextRetrieval

    quiet_transformers()
    dropout_free = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # deterministic, resumable
    text = {**dropout_free, **spec["text"], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
            "encoder_hidden_size": spec["vision"]["hidden_size"], "is_decoder": True}
    vision = {"attention_dropout": 0.0, **spec["vision"]}
    config = BlipConfig(vision_config=vision, text_config=text, image_text_hidden_size=int(spec["projection_dim"]))
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config)
    if vision_init:
        init_vision(model, vision_init)
    pre = Preprocess(**spec["preprocess"])
    return MatchingVLM(model.eval(), tokenizer, pre, int(spec["max_length"]), source or "preset")


def init_vision(model, folder: str | os.PathLike) -> dict[str, Any]:
    """Start the image encoder from a contrastively trained ViT (two-stage training): a vlmedge dual encoder's
    `vision_model`, mapped weight by weight (q, k, v into BLIP's fused qkv; its pooler and projection are not used:
    BLIP projects the class token after the final norm). Shapes must agree with the preset's vision config."""
    import torch
    from safetensors.torch import load_file

    folder = Path(folder)
    want = "expected a vlmedge dual encoder with a ViT image tower"
    try:
        config = check_model_folder(folder, ("VisionTextDualEncoderModel",))
    except VlmedgeError as e:
        raise VlmedgeError(f"--vision-init: {e}; {want}") from None
    if config.get("vision_config", {}).get("model_type") != "vit":
        raise VlmedgeError(f"--vision-init {folder}: {want}")
    if config.get("vlmedge_pruning"):
        raise VlmedgeError(f"--vision-init {folder}: a pruned dual encoder; start from the unpruned teacher")
    vc, target = config["vision_config"], model.config.vision_config
    differs = tower_mismatch(vc, target.to_dict())
    if differs:
        raise VlmedgeError(f"--vision-init {folder}: {differs}; use a tower of the same shape (`small` for "
                           "match-small)")
    w = {}
    for f in sorted(folder.glob("*.safetensors")):
        w.update({k[len("vision_model."):]: v for k, v in load_file(str(f)).items() if k.startswith("vision_model.")})
    w = {k.replace(".attention.q_proj.", ".attention.attention.query.")
          .replace(".attention.k_proj.", ".attention.attention.key.")
          .replace(".attention.v_proj.", ".attention.attention.value.")
          .replace(".attention.o_proj.", ".attention.output.dense."): v for k, v in w.items()}  # either key layout
    try:
        state = {"embeddings.class_embedding": w["embeddings.cls_token"],
                 "embeddings.position_embedding": w["embeddings.position_embeddings"],
                 "embeddings.patch_embedding.weight": w["embeddings.patch_embeddings.projection.weight"],
                 "embeddings.patch_embedding.bias": w["embeddings.patch_embeddings.projection.bias"],
                 "post_layernorm.weight": w["layernorm.weight"], "post_layernorm.bias": w["layernorm.bias"]}
        for i in range(target.num_hidden_layers):
            src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
            for t in ("weight", "bias"):
                state[f"{dst}self_attn.qkv.{t}"] = torch.cat([w[f"{src}attention.attention.{n}.{t}"]
                                                              for n in ("query", "key", "value")])
                for a, b in (("self_attn.projection", "attention.output.dense"), ("layer_norm1", "layernorm_before"),
                             ("layer_norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
                             ("mlp.fc2", "output.dense")):
                    state[f"{dst}{a}.{t}"] = w[f"{src}{b}.{t}"]
    except KeyError as e:
        raise VlmedgeError(f"--vision-init {folder}: weights do not map (no {e.args[0]})") from None
    model.vision_model.load_state_dict(state, strict=True)
    return {"vision_init": str(folder), "mapped": len(state)}


def load(path: str | os.PathLike, *, attn_implementation: str = "sdpa") -> MatchingVLM:
    """A `BlipForImageTextRetrieval` folder, offline (eager attention: transformers has no SDPA path for BLIP)."""
    return load_model(path, attn_implementation="eager", architectures=ARCHITECTURES, cls=MatchingVLM)
