"""The generative VLM: SmolVLM's architecture (`SmolVLMForConditionalGeneration`, Idefics3's design) as
transformers implements it — a SigLIP-style vision transformer, a pixel-shuffle connector that cuts the image tokens
by scale_factor², and a Llama decoder with grouped-query attention.

A model is a Hugging Face folder (config, safetensors, tokenizer, `preprocessor_config.json`, chat template) like
SmolVLM-256M-Instruct's. Prompts follow SmolVLM's chat template and processor: one global image,

    <|im_start|>User:<fake_token_around_image><global-img><image>...<image><fake_token_around_image>QUESTION<end_of_utterance>\nAssistant:

or, with image splitting, each tile's `<fake_token_around_image><row_R_col_C><image>...` (a newline after each row)
before the global image; the answer ends with `<end_of_utterance>`. Three functions compute the model the way every
consumer uses it (training, generation, export): `vision_features` (pixels -> image tokens after the connector), `merge` (token
embeddings with the image tokens in their placeholders) and `decode` (the decoder with an explicit KV cache, written
with the model's own modules so that the ONNX export traces one graph for prefill and decode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..._hf import quiet_transformers
from ...disk import read_json
from ...errors import VlmedgeError
from ...models import (VLM, check_model_folder, check_vocab, load_tokenizer, load_weights, read_json_mapping,
                       read_preprocess, tower_mismatch)
from ...preprocess import Preprocess

ARCHITECTURES = ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
SPECIAL = {"pad": "<pad>", "unk": "<unk>", "start": "<|im_start|>", "end": "<end_of_utterance>",
           "around": "<fake_token_around_image>", "global": "<global-img>", "image": "<image>"}


@dataclass
class GenerativeVLM(VLM):
    """A loaded generative model (SmolVLMForConditionalGeneration | Idefics3ForConditionalGeneration) with its
    tokenizer, preprocessing and prompt format."""

    @property
    def image_tokens(self) -> int:
        v = self.model.config.vision_config
        return (v.image_size // v.patch_size) ** 2 // self.model.config.scale_factor ** 2

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(SPECIAL["end"]))

    def prompt_ids(self, question: str, rows: int = 0, cols: int = 0) -> list[int]:
        return prompt_ids(self.tokenizer, question, self.image_tokens, self.max_length, self.source, rows, cols)

    def answer_ids(self, answer: str) -> list[int]:
        return answer_ids(self.tokenizer, answer, self.eos_id)

    def decode_answer(self, ids: Sequence[int]) -> str:
        return decode_answer(self.tokenizer, ids, self.eos_id)


def tile_token(row: int, col: int) -> str:
    """The token before the tile in row `row`, column `col` (from 1) of a split image."""
    return f"<row_{row}_col_{col}>"


def prompt_text(question: str, image_tokens: int, rows: int = 0, cols: int = 0) -> str:
    """SmolVLM's user turn for one image of `rows` x `cols` tiles (0 x 0: the global image only), as its processor
    expands `<image>` (`image_tokens` per tile)."""
    around, image = SPECIAL["around"], SPECIAL["image"] * image_tokens
    tiles = "".join("".join(f"{around}{tile_token(r + 1, c + 1)}{image}" for c in range(cols)) + "\n"
                    for r in range(rows))
    glob = f"{around}{SPECIAL['global']}{image}{around}"
    picture = tiles + "\n" + glob if rows else glob
    return f"{SPECIAL['start']}User:{picture}{question}{SPECIAL['end']}\nAssistant:"


def prompt_ids(tokenizer, question: str, image_tokens: int, max_length: int, where: str = "", rows: int = 0,
               cols: int = 0) -> list[int]:
    """The token ids of a question's prompt for an image of `rows` x `cols` tiles; a one-line error when the
    tokenizer has no tile tokens or the prompt does not fit the model's context."""
    if rows and tokenizer.convert_tokens_to_ids(tile_token(rows, cols)) in (None, tokenizer.unk_token_id):
        raise VlmedgeError(f"{where or 'prompt'}: the tokenizer has no {tile_token(rows, cols)} token for a "
                           f"{rows}x{cols}-tile image; use image splitting off")
    ids = tokenizer(prompt_text(question, image_tokens, rows, cols), add_special_tokens=False)["input_ids"]
    if len(ids) >= max_length:
        frames = rows * cols + 1
        raise VlmedgeError(f"{where or 'prompt'}: the prompt is {len(ids)} tokens ({frames * image_tokens} of them "
                           f"the image{f', {frames} frames' if rows else ''}); the model's context is {max_length} "
                           f"(question: {question[:60]!r})")
    return ids


def answer_ids(tokenizer, answer: str, eos_id: int) -> list[int]:
    """The token ids an answer is trained on after the prompt: the answer, then `<end_of_utterance>`."""
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [eos_id]


def decode_answer(tokenizer, ids: Sequence[int], eos_id: int) -> str:
    ids = list(ids)
    if eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def train_tokenizer(texts: Sequence[str]):
    """A word-level tokenizer for the training texts (questions and answers) plus SmolVLM's special tokens;
    deterministic (same texts, same ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer, pre = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t))})
    words += sorted({w for w, _ in pre.pre_tokenize_str("user : assistant :")} - set(words))
    special = list(SPECIAL.values())
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + words)}, unk_token=SPECIAL["unk"]))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece(prefix="##")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=SPECIAL["unk"], pad_token=SPECIAL["pad"],
                                   eos_token=SPECIAL["end"], bos_token=SPECIAL["start"])
    tiles = [tile_token(r, c) for r in range(1, 7) for c in range(1, 7)]  # SmolVLM's: up to 6 x 6 tiles
    fast.add_special_tokens({"additional_special_tokens": [SPECIAL[k] for k in ("around", "global", "image")]
                             + tiles})
    fast.chat_template = CHAT_TEMPLATE
    return fast


# SmolVLM-256M-Instruct's template (its messages' content lists of {"type": "image"} / {"type": "text"})
CHAT_TEMPLATE = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                 "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


# --- building ------------------------------------------------------------------------------------------------------

def check_shapes(vision: Any, text: Any, scale_factor: Any, where: str) -> None:
    """The sizes a SmolVLM needs to be buildable, checked before anything is allocated (a preset's sections or a
    folder's config.json): each section present, widths divisible by head counts, key/value heads dividing the
    query heads, the patch grid (floored, as the patch convolution computes it: SmolVLM-Instruct's 384 px in 14 px
    patches is 27 x 27) divisible by the pixel-shuffle scale factor. One line naming `where` and the key."""
    for name, section in (("vision", vision), ("text", text)):
        if not isinstance(section, dict):
            raise VlmedgeError(f"{where}: no {name} section (an object of sizes)")
    def size(section: dict, name: str, key: str, default: int | None = None) -> int:
        value = section.get(key, default)
        if type(value) is not int or value < 1:
            raise VlmedgeError(f"{where}: {name}.{key} = {value!r}; expected a positive integer")
        return value

    for name, section in (("vision", vision), ("text", text)):
        heads = size(section, name, "num_attention_heads")
        if size(section, name, "hidden_size") % heads:
            raise VlmedgeError(f"{where}: {name}.hidden_size {section['hidden_size']} is not divisible by "
                               f"num_attention_heads {heads}")
    kv = size(text, "text", "num_key_value_heads", text["num_attention_heads"])
    if text["num_attention_heads"] % kv:
        raise VlmedgeError(f"{where}: text.num_key_value_heads {kv} does not divide num_attention_heads "
                           f"{text['num_attention_heads']}")
    image, patch = size(vision, "vision", "image_size"), size(vision, "vision", "patch_size")
    if type(scale_factor) is not int or scale_factor < 1:
        raise VlmedgeError(f"{where}: scale_factor = {scale_factor!r}; expected a positive integer")
    if patch > image or (image // patch) % scale_factor:  # the patch convolution floors: 384 px / 14 px -> 27
        raise VlmedgeError(f"{where}: a {image} px image in {patch} px patches is a grid of {image // patch} x "
                           f"{image // patch} patches, which the scale_factor {scale_factor} does not divide")


def build(spec: dict[str, Any], tokenizer, *, seed: int = 0, source: str = "", vision_init: str | None = None):
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    check_shapes(spec.get("vision"), spec.get("text"), spec.get("scale_factor"), source or "preset")
    quiet_transformers()
    ids = {k: int(tokenizer.convert_tokens_to_ids(v)) for k, v in SPECIAL.items()}
    text = {**spec["text"], "vocab_size": len(tokenizer), "pad_token_id": ids["pad"], "bos_token_id": ids["start"],
            "eos_token_id": ids["end"], "tie_word_embeddings": True}
    vision = dict(spec["vision"])
    config = SmolVLMConfig(vision_config=vision, text_config={"model_type": "llama", **text},
                           scale_factor=int(spec["scale_factor"]), image_token_id=ids["image"],
                           pad_token_id=ids["pad"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = SmolVLMForConditionalGeneration(config)
    model.generation_config.eos_token_id = ids["end"]
    model.generation_config.pad_token_id = ids["pad"]
    if vision_init:
        init_vision(model, vision_init)
    pre = Preprocess(**spec["preprocess"])
    return GenerativeVLM(model.eval(), tokenizer, pre, int(spec["max_length"]), source or "preset")


def init_vision(model, folder: str | os.PathLike) -> dict[str, Any]:
    """Start the vision transformer from a contrastively trained image tower (two-stage training): the `ViT` of a
    vlmedge dual encoder (`VisionTextDualEncoderModel`), mapped weight by weight (its class token and pooler are
    dropped: SmolVLM's encoder has neither and reads every patch), or a SigLIP vision tower (`SiglipModel` /
    `SiglipVisionModel`: the same classes, copied as they are). Shapes must agree with the preset's vision config."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise VlmedgeError(f"--vision-init {folder}: not a model folder (no config.json)")
    config = read_json(folder / "config.json", "")
    archs = config.get("architectures") or []
    target = model.model.vision_model
    tcfg = model.config.vision_config
    if "VisionTextDualEncoderModel" in archs:
        check_model_folder(folder)
        if config.get("vlmedge_pruning"):
            raise VlmedgeError(f"--vision-init {folder}: a pruned dual encoder; start from the unpruned teacher")
        vc = config.get("vision_config", {})
        if vc.get("model_type") != "vit":
            raise VlmedgeError(f"--vision-init {folder}: its vision tower is {vc.get('model_type')!r}; expected vit")
        weights = {k[len("vision_model."):]: v for k, v in _weights(folder, load_file).items()
                   if k.startswith("vision_model.")}
        state = _vit_to_siglip(weights, tcfg.num_hidden_layers)
        source_cfg = vc
    elif any(a in ("SiglipModel", "SiglipVisionModel") for a in archs):
        check_model_folder(folder, ("SiglipModel", "SiglipVisionModel"))  # safetensors, whole (not a pickle)
        prefix = "vision_model."
        weights = _weights(folder, load_file)
        state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix) and ".head." not in k
                 and not k.startswith(prefix + "head.")}
        source_cfg = config.get("vision_config", config)
    else:
        raise VlmedgeError(f"--vision-init {folder}: {archs or config.get('model_type')!r} has no vision tower vlmedge "
                           "can map; expected a vlmedge dual encoder (ViT) or a SigLIP folder (a CLIP tower normalises "
                           "before its first layer, which SmolVLM's encoder has no place for)")
    differs = tower_mismatch(source_cfg, tcfg.to_dict())
    if differs:
        raise VlmedgeError(f"--vision-init {folder}: {differs}; use a tower of the same shape (the `small` dual "
                           "encoder for vqa-small, `tiny` for vqa-tiny)")
    missing, unexpected = target.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VlmedgeError(f"--vision-init {folder}: weights do not map ({len(missing)} missing, e.g. "
                           f"{(missing or unexpected)[0]})")
    return {"vision_init": str(folder), "mapped": len(state)}


def _weights(folder: Path, load_file) -> dict[str, Any]:
    out = {}
    for w in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(w)))
    return out


def _vit_to_siglip(w: dict[str, Any], layers: int) -> dict[str, Any]:
    """HF ViT weight names -> SmolVLM (SigLIP) vision weight names."""
    state = {"embeddings.patch_embedding.weight": w["embeddings.patch_embeddings.projection.weight"],
             "embeddings.patch_embedding.bias": w["embeddings.patch_embeddings.projection.bias"],
             "embeddings.position_embedding.weight": w["embeddings.position_embeddings"][0, 1:],  # class slot dropped
             "post_layernorm.weight": w["layernorm.weight"], "post_layernorm.bias": w["layernorm.bias"]}
    names = {"attention.attention.query": "self_attn.q_proj", "attention.attention.key": "self_attn.k_proj",
             "attention.attention.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
             "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "layernorm_before": "layer_norm1",
             "layernorm_after": "layer_norm2"}
    for i in range(layers):
        for src, dst in names.items():
            for p in ("weight", "bias"):
                state[f"encoder.layers.{i}.{dst}.{p}"] = w[f"encoder.layer.{i}.{src}.{p}"]
    return state


# --- loading -------------------------------------------------------------------------------------------------------

def load(path: str | os.PathLike, *, attn_implementation: str = "sdpa") -> GenerativeVLM:
    folder = Path(path)
    config = check_model_folder(folder, ARCHITECTURES)
    resolved = _resolved_config(folder, config)  # sizes a saved config leaves out are its class's defaults
    check_shapes(resolved["vision_config"], resolved["text_config"], resolved.get("scale_factor"),
                 str(folder / "config.json"))
    tokenizer = load_tokenizer(folder)
    for name in SPECIAL.values():
        if name not in ("<pad>", "<unk>") and tokenizer.convert_tokens_to_ids(name) in (None, tokenizer.unk_token_id):
            raise VlmedgeError(f"{folder}: the tokenizer has no {name} token; not a SmolVLM-style tokenizer")
    image_id = tokenizer.convert_tokens_to_ids(SPECIAL["image"])
    if config.get("image_token_id") != image_id:
        raise VlmedgeError(f"{folder / 'config.json'}: image_token_id = {config.get('image_token_id')!r}, but the "
                           f"tokenizer's {SPECIAL['image']} is {image_id}: image features would land in the wrong "
                           "places")
    check_vocab(folder, tokenizer, resolved["text_config"].get("vocab_size"))
    model = load_weights(folder, config, ARCHITECTURES, attn_implementation)
    pre_path = folder / "preprocessor_config.json"
    size = int(model.config.vision_config.image_size)
    preprocess = read_preprocess(pre_path, read_json_mapping(pre_path), size)
    if preprocess.image_size != size:
        raise VlmedgeError(f"{pre_path}: image tiles of {preprocess.image_size} px (max_image_size), but the vision "
                           f"encoder reads {size} px (config.json vision_config.image_size)")
    meta = read_json_mapping(folder / "vlmedge.json")
    max_length = int(meta.get("max_length") or min(model.config.text_config.max_position_embeddings, 2048))
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = int(tokenizer.convert_tokens_to_ids(SPECIAL["end"]))
    return GenerativeVLM(model.eval(), tokenizer, preprocess, max_length, str(folder))


def _resolved_config(folder: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """config.json with its class's defaults filled in, as transformers will build it; both sections required (a
    missing one would be transformers' default model, gigabytes for a Llama)."""
    import transformers

    for section in ("vision_config", "text_config"):
        if not isinstance(raw.get(section), dict):
            raise VlmedgeError(f"{folder / 'config.json'}: no {section} (an object of sizes); transformers would build "
                               "its default model")
    arch = next(a for a in raw["architectures"] if a in ARCHITECTURES)
    try:
        return getattr(transformers, arch).config_class.from_pretrained(folder, local_files_only=True).to_dict()
    except Exception as e:  # transformers' own validation errors
        raise VlmedgeError(f"{folder / 'config.json'}: not a usable {arch} config "
                           f"({str(e).splitlines()[0][:160]})") from None


# --- the forward pieces (training, generation and export use these) ------------------------------------------------

def vision_flops(vision_model, text_width: int) -> dict[str, int]:
    """2 x multiply-adds of one frame through a SigLIP vision encoder (torch; its weights may be on the meta device)
    and the connector into a `text_width`-wide decoder, counted from its modules, so a pruned encoder counts as it
    is: `linear` (the patch embedding, every linear layer, the connector) and `attention` (each layer's two
    products, QK^T and the probabilities times V). The position embedding is a lookup: not counted."""
    import torch

    patches = vision_model.embeddings.num_patches
    weights = sum(m.weight.numel() for m in vision_model.encoder.modules() if isinstance(m, torch.nn.Linear))
    # the connector maps patches / scale² tokens of width x scale² to the decoder: patches x width x text_width
    weights += vision_model.embeddings.patch_embedding.weight.numel() + vision_model.config.hidden_size * text_width
    widths = sum(layer.self_attn.q_proj.out_features for layer in vision_model.encoder.layers)
    return {"linear": 2 * patches * weights, "attention": 4 * patches * patches * widths}


def vision_encode(model, pixel_values):
    """(N, 3, H, W) pixels of full, unpadded images -> the vision transformer's patch outputs (N, patches, width):
    SmolVLM's vision model for one global image each (every patch real, so the patch positions are 0..P-1), written
    without its padding logic so the graph stays static."""
    vm = model.model.vision_model
    emb = vm.embeddings
    x = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
    x = x + emb.position_embedding.weight[None]
    return vm.post_layernorm(vm.encoder(inputs_embeds=x, attention_mask=None).last_hidden_state)


def vision_features(model, pixel_values):
    """Pixels -> image tokens after the connector (N, image tokens, text hidden size): `get_image_features`."""
    return model.model.connector(vision_encode(model, pixel_values))


def merge(model, input_ids, image_features):
    """Token embeddings with each row's image placeholders replaced by its image features (in order)."""
    embeds = model.model.text_model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


def decode(model, inputs_embeds, attention_mask, position_ids, past: Sequence[tuple[Any, Any]], layers=None,
           logits_to_keep=None):
    """The Llama decoder with an explicit cache: `past` holds per layer (key, value) of shape (B, kv heads, P, d)
    (P may be 0: prefill); returns logits (B, S, V) and the presents (past + this call's keys and values).
    `logits_to_keep` (a (1,) int64 tensor): logits of the last that many positions only, 0 for all (a prefill
    needs one row of the vocabulary-wide head, not one per prompt token).

    The model's own modules (norms, rotary embedding, projections, MLP) computed in plain tensor ops, so one traced
    graph serves every past length; equal to transformers' forward with a DynamicCache (tested). `layers`: one
    callable per decoder layer taking `layer_step`'s arguments after the layer (the export passes `layer_modules`,
    so each layer's ONNX nodes are named `/layers.N/...`).
    """
    import torch

    lm = model.model.text_model
    s = inputs_embeds.shape[1]
    past_len = past[0][0].shape[2]
    cos, sin = lm.rotary_emb(inputs_embeds, position_ids)
    q_pos = torch.arange(s, device=inputs_embeds.device) + past_len
    k_pos = torch.arange(attention_mask.shape[1], device=inputs_embeds.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device).masked_fill(
        ~allowed, torch.finfo(inputs_embeds.dtype).min)
    h = inputs_embeds
    presents = []
    steps = layers if layers is not None else [lambda *a, layer=layer: layer_step(layer, *a) for layer in lm.layers]
    for step, (pk, pv) in zip(steps, past):
        h, k, v = step(h, pk, pv, cos, sin, bias)
        presents.append((k, v))
    h = lm.norm(h)
    if logits_to_keep is not None:
        h = h[:, last_positions(h.shape[1], logits_to_keep, h.device)]
    return model.lm_head(h), presents


def last_positions(length, keep, device=None):
    """A mask over `length` positions of the last `keep` ((1,) int64 tensor; 0: all). Computed from the keep
    tensor, so a traced graph takes any value at run time."""
    import torch

    pos = torch.arange(length, device=device)
    return pos >= torch.where(keep > 0, length - keep, torch.zeros_like(keep))


def layer_step(layer, h, pk, pv, cos, sin, bias, qkv=None, gate_up=None):
    """One Llama decoder layer on hidden states `h` after its cache (pk, pv): (new h, keys, values). `qkv`,
    `gate_up`: the layer's query, key and value projections as one linear, and its MLP's gate and up projections
    as one (`layer_modules`), where given."""
    import torch
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    b, s, _ = h.shape
    attn = layer.self_attn
    head_dim = attn.head_dim  # head counts per layer: pruning may have removed some
    heads, kv = attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim
    x = layer.input_layernorm(h)
    if qkv is None:
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    else:
        q, k, v = qkv(x).split([heads * head_dim, kv * head_dim, kv * head_dim], dim=-1)
    q = q.view(b, s, heads, head_dim).transpose(1, 2)
    k = k.view(b, s, kv, head_dim).transpose(1, 2)
    v = v.view(b, s, kv, head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    rep = heads // kv
    kr = k[:, :, None].expand(b, kv, rep, k.shape[2], head_dim).reshape(b, heads, k.shape[2], head_dim)
    vr = v[:, :, None].expand(b, kv, rep, v.shape[2], head_dim).reshape(b, heads, v.shape[2], head_dim)
    scores = q @ kr.transpose(-1, -2) * attn.scaling + bias
    out = (torch.softmax(scores.float(), dim=-1).to(q.dtype) @ vr).transpose(1, 2).reshape(b, s, heads * head_dim)
    h = h + attn.o_proj(out)
    x = layer.post_attention_layernorm(h)
    if gate_up is None:
        return h + layer.mlp(x), k, v
    gate, up = gate_up(x).chunk(2, dim=-1)
    return h + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up), k, v


def fused_linear(*linears):
    """One linear computing `linears` side by side (their weights and biases concatenated on the output axis)."""
    import torch

    first = linears[0]
    fused = torch.nn.Linear(first.in_features, sum(lin.out_features for lin in linears),
                            bias=first.bias is not None, dtype=first.weight.dtype, device=first.weight.device)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


def layer_modules(model):
    """The decoder's layers as modules whose forward is `layer_step` (a ModuleList: traced inside a module that
    holds it as `layers`, each layer's nodes carry its index), each layer's query, key and value projections
    traced as one MatMul and its gate and up projections as one: the same arithmetic in fewer, wider matrix
    products (fewer kernel calls and activation quantizations per step, wider GEMMs in a prefill)."""
    import torch

    class Step(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer
            attn, mlp = layer.self_attn, layer.mlp
            self.qkv = fused_linear(attn.q_proj, attn.k_proj, attn.v_proj)
            self.gate_up = fused_linear(mlp.gate_proj, mlp.up_proj)

        def forward(self, *args):
            return layer_step(self.layer, *args, qkv=self.qkv, gate_up=self.gate_up)

    return torch.nn.ModuleList(Step(layer) for layer in model.model.text_model.layers)


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the decoder's KV cache, from its modules (a pruned decoder keeps the
    same count in every layer: one ratio applies to all)."""
    layers = model.model.text_model.layers
    attn = layers[0].self_attn
    kv = {layer.self_attn.k_proj.out_features // attn.head_dim for layer in layers}
    if len(kv) > 1:
        raise VlmedgeError(f"the decoder's layers have different key/value head counts {sorted(kv)}; the export's "
                           "KV cache needs one")
    return len(layers), kv.pop(), attn.head_dim


def empty_past(model, batch: int = 1, dtype=None):
    import torch

    layers, kv, head_dim = kv_shape(model)
    z = torch.zeros(batch, kv, 0, head_dim, dtype=dtype or model.dtype)
    return [(z, z) for _ in range(layers)]


def make_batch(vlm: GenerativeVLM, pairs: Sequence[tuple[str, str]]):
    """Right-padded input ids, attention mask and labels (-100 on the prompt, image tokens and padding: the loss is
    the NLL of the answer tokens only) for (question, answer) pairs."""
    rows = [(vlm.prompt_ids(q), vlm.answer_ids(a)) for q, a in pairs]
    width = min(max(len(p) + len(a) for p, a in rows), vlm.max_length)
    pad = vlm.tokenizer.pad_token_id
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    labels = np.full((len(rows), width), -100, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, (p, a) in enumerate(rows):
        seq = (p + a)[:width]
        ids[r, :len(seq)] = seq
        mask[r, :len(seq)] = 1
        labels[r, len(p):len(seq)] = a[:len(seq) - len(p)]
    return ids, mask, labels
