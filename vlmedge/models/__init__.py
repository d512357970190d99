"""Models: presets (data, not code) and what every family's folders share: loading a local folder offline
(config, safetensors weights, tokenizer, preprocessing), saving one, a WordPiece tokenizer, parameter counts;
`structure.py` holds the prunable parts and the surgery. Each family's own model code lives in its package
(`families/<name>/model.py`).

The model format is a Hugging Face `save_pretrained` folder with safetensors weights, a tokenizer and a
`preprocessor_config.json`. `load_model`'s default are the dual encoders' architectures:
`VisionTextDualEncoderModel` (the seed's ViT + BERT with linear projections), `CLIPModel` and `SiglipModel`
(sigmoid loss; attention-pooled vision tower, text pooled at the last position).
A model pruned by vlmedge carries its pruning plan in `config.json` (`vlmedge_pruning`) and is rebuilt from it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._hf import quiet_transformers
from ..disk import read_json, write_json
from ..errors import VlmedgeError
from ..preprocess import Preprocess
from .structure import load_pruned

PRESET_DIR = Path(__file__).parent / "presets"
DEFAULT_PRESET = "small"
"""The preset a command or recipe trains unless told otherwise."""
SUPPORTED_ARCHITECTURES = ("VisionTextDualEncoderModel", "CLIPModel", "SiglipModel")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset by name, or a path to a user's preset JSON of the same shape."""
    path = Path(name) if name.endswith(".json") else PRESET_DIR / f"{name}.json"
    return read_json(path, f"unknown preset {name!r}; available: {', '.join(preset_names())} (or a path to a .json)")


def tower_shapes(preset: str | None = None, path: str | None = None) -> dict[str, dict[str, int]]:
    """Each tower's hidden width, MLP width, attention heads and key/value heads, read from a preset or a model
    folder's config.json without building anything (what stage configs check at recipe load); {} when unknown."""
    if path:
        cfg = Path(path) / "config.json"
        raw = read_json(cfg, "") if cfg.is_file() else {}
        towers = {t: raw.get(f"{t}_config") or {} for t in ("vision", "text")} if isinstance(raw, dict) else {}
    elif preset:
        try:
            spec = load_preset(preset)
        except VlmedgeError:
            return {}
        towers = {t: spec.get(t) or {} for t in ("vision", "text")}
    else:
        return {}
    out = {}
    for tower, c in towers.items():
        if isinstance(c, dict) and c.get("hidden_size") and c.get("num_attention_heads"):
            out[tower] = {"hidden_size": int(c["hidden_size"]), "intermediate_size": int(c.get("intermediate_size") or 0),
                          "heads": int(c["num_attention_heads"]),
                          "kv_heads": int(c.get("num_key_value_heads") or c["num_attention_heads"])}
    return out


@dataclass
class VLM:
    """A loaded model with what it needs to embed raw inputs."""

    model: Any  # VisionTextDualEncoderModel | CLIPModel
    tokenizer: Any
    preprocess: Preprocess
    max_length: int
    source: str

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="np")

    def save(self, folder: str | os.PathLike) -> None:
        """Write a self-contained model folder (weights, config, tokenizer, preprocessing)."""
        folder = Path(folder)
        save_weights(self.model, folder)
        self.tokenizer.save_pretrained(folder)
        write_json(folder / "preprocessor_config.json", self.preprocess.to_hf())
        write_json(folder / "vlmedge.json", {"max_length": self.max_length, "source": self.source})


def save_weights(model, folder: Path) -> None:
    """config.json and model.safetensors of a transformers model (`load_weights` reads them back)."""
    if getattr(model.config, "vlmedge_pruning", None):
        # A pruned model is rebuilt by vlmedge (structure.load_pruned), which reads the in-memory key names;
        # save_pretrained would rename keys to the legacy layout that only from_pretrained maps back.
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        state, seen = {}, set()
        for k, v in model.state_dict().items():  # tied weights (a decoder's lm_head) are stored once
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                state[k] = v.detach().contiguous()
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        model.save_pretrained(folder, safe_serialization=True)


def load_weights(folder: Path, config: dict[str, Any], architectures: tuple[str, ...], attn_implementation: str):
    """The transformers model of a checked model folder (`check_model_folder`'s config), offline: rebuilt from its
    recorded pruning shape when vlmedge pruned it; a one-line error naming the folder when it does not load."""
    import transformers

    quiet_transformers()
    arch = next(a for a in config["architectures"] if a in architectures)
    model_cls = getattr(transformers, arch)
    plan = config.get("vlmedge_pruning")
    try:
        if plan:
            return load_pruned(model_cls, folder, plan, attn_implementation)
        _check_size(folder, model_cls)
        model, info = model_cls.from_pretrained(folder, local_files_only=True, attn_implementation=attn_implementation,
                                                output_loading_info=True, ignore_mismatched_sizes=True)
    except VlmedgeError:
        raise
    except Exception as e:
        raise VlmedgeError(f"{folder}: could not load {arch}: {str(e).splitlines()[0][:200]}") from None
    weights = ", ".join(p.name for p in sorted(folder.glob("*.safetensors")))
    for key, stored, wanted in sorted(info.get("mismatched_keys") or ()):
        raise VlmedgeError(f"{folder / weights}: tensor {key} is {tuple(stored)}, config.json makes it "
                           f"{tuple(wanted)}; the config and the weights are of different models")
    for kind in ("missing_keys", "unexpected_keys"):
        keys = sorted(info.get(kind) or ())
        if keys:  # never a silently re-initialised (or silently dropped) tensor
            what = "lacks" if kind == "missing_keys" else "has tensors config.json does not describe:"
            raise VlmedgeError(f"{folder / weights}: {what} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1
                                                                          else ""))
    return model


def _check_size(folder: Path, model_cls) -> None:
    """Before anything is allocated: the parameters config.json describes (counted on the meta device) must be the
    weights' (a config missing a section builds transformers' defaults, gigabytes for a Llama)."""
    import torch
    from safetensors import safe_open

    config = model_cls.config_class.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        described = sum(p.numel() for p in model_cls(config).parameters())
    stored = 0
    for w in sorted(folder.glob("*.safetensors")):
        with safe_open(str(w), framework="np") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    if described > 2 * stored + 1_000_000:  # a few missing tensors are named by the loader below
        raise VlmedgeError(f"{folder / 'config.json'}: describes {described / 1e6:.1f} M parameters, the weights hold "
                           f"{stored / 1e6:.1f} M; a section missing (text_config, vision_config: transformers would "
                           "build its default) or the config of another model")


def train_tokenizer(texts, vocab_size: int):
    """A BERT-style WordPiece tokenizer for the given captions (deterministic: same captions, same ids)."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    texts = list(texts)
    counts = Counter(w for t in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    chars = sorted({c for w in counts for c in w})
    words = sorted(counts, key=lambda w: (-counts[w], w))
    learned = list(dict.fromkeys(chars + ["##" + c for c in chars] + words))
    if len(special) + len(learned) > vocab_size:
        # More distinct words than the vocabulary holds: learn subwords. The trainer numbers (and breaks ties
        # between) tokens in hash-map order, which differs between processes; sorting at least fixes the ids.
        trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trained.normalizer, trained.pre_tokenizer = normalizer, pre
        trained.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
        learned = sorted(t for t in trained.get_vocab() if t not in special)
    # else: every caption word is a token of its own, numbered deterministically (same ids in every process)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(special + learned)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


# --- loading -------------------------------------------------------------------------------------------------------

def check_model_folder(path: str | os.PathLike, architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES
                       ) -> dict[str, Any]:
    """Validate a model folder of one of `architectures` without building it; returns its config. Every failure is
    one line."""
    folder = Path(path)
    if not folder.exists():
        raise VlmedgeError(f"model folder not found: {folder}")
    if not folder.is_dir():
        raise VlmedgeError(f"{folder}: expected a model folder (config.json + model.safetensors), got a file")

    cfg_path = folder / "config.json"
    config = read_json(cfg_path, f"{folder}: no config.json; not a saved model folder")
    archs = config.get("architectures") or []
    if not any(a in architectures for a in archs):
        raise VlmedgeError(f"{cfg_path}: unsupported architecture {archs or config.get('model_type')!r}; "
                           f"expected {' or '.join(architectures)}")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        if pickles:
            raise VlmedgeError(f"{folder}: only pickle checkpoints ({', '.join(pickles)}); vlmedge loads safetensors "
                               "only (convert with a trusted copy of the model: model.save_pretrained(dir))")
        raise VlmedgeError(f"{folder}: no model.safetensors")
    from safetensors import safe_open

    for w in weights:
        try:
            with safe_open(str(w), framework="np") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])[...]  # the last tensor ends at the end of the file: reads a truncation
        except Exception as e:  # safetensors raises its own error types
            raise VlmedgeError(f"{w}: unreadable safetensors file ({str(e).splitlines()[0][:120]})") from None
    return config


def load_model(path: str | os.PathLike, *, attn_implementation: str = "sdpa",
               architectures: tuple[str, ...] = SUPPORTED_ARCHITECTURES, cls: type = VLM) -> VLM:
    """Load a model folder of one of `architectures` (default: the dual encoders'), with its tokenizer and
    preprocessing, offline, as a `cls` (a `VLM`)."""
    folder = Path(path)
    config = check_model_folder(folder, architectures)
    model = load_weights(folder, config, architectures, attn_implementation)
    tokenizer = load_tokenizer(folder)
    check_vocab(folder, tokenizer, getattr(model.config.text_config, "vocab_size", None))
    vision_size = int(getattr(model.config.vision_config, "image_size", 224))
    pre_path = folder / "preprocessor_config.json"
    pre_cfg = read_json_mapping(pre_path)
    preprocess = read_preprocess(pre_path, pre_cfg, vision_size)
    meta_path = folder / "vlmedge.json"
    meta = read_json_mapping(meta_path)
    max_length = int(meta.get("max_length") or min(getattr(model.config.text_config, "max_position_embeddings", 77), 77))
    return cls(model.eval(), tokenizer, preprocess, max_length, str(folder))


TOWER_SHAPE = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
               "image_size")
"""The vision settings an image tower must share with the encoder it starts (two-stage training, `vision_init`)."""


def tower_mismatch(tower: dict[str, Any], target: dict[str, Any]) -> str | None:
    """The first `TOWER_SHAPE` setting where a tower's vision config (`tower`) differs from the encoder's it would
    start (`target`), as 'KEY=TOWER, the preset's is TARGET'; None where they match (a setting a side lacks is not
    compared)."""
    for key in TOWER_SHAPE:
        got, want = tower.get(key), target.get(key)
        if got is not None and want is not None and got != want:
            return f"vision {key}={got}, the preset's is {want}"
    return None


def check_vocab(folder: Path, tokenizer, vocab_size: int | None) -> None:
    """A tokenizer with more tokens than the model's embedding has rows, or any token id past its last row (ids
    need not be dense: added tokens can sit anywhere), would index outside it."""
    if not isinstance(vocab_size, int):
        return
    if len(tokenizer) > vocab_size:
        raise VlmedgeError(f"{folder}: the tokenizer has {len(tokenizer)} tokens, the model's text vocab_size is "
                           f"{vocab_size}; the tokenizer belongs to another model")
    token, top = max(tokenizer.get_vocab().items(), key=lambda kv: kv[1], default=("", -1))
    if top >= vocab_size:
        raise VlmedgeError(f"{folder}: the tokenizer's token {token!r} has id {top}, past the model's text "
                           f"vocab_size {vocab_size}; the tokenizer belongs to another model")


def load_tokenizer(folder: Path):
    """A model folder's tokenizer, offline; a one-line error naming the folder when it has none usable."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise VlmedgeError(f"{folder}: no usable tokenizer ({str(e).splitlines()[0][:160]})") from None


def read_preprocess(path: Path, cfg: dict[str, Any], size: int) -> Preprocess:
    """`Preprocess` from a folder's image processor config (`path`, read as `cfg`) at the vision size `size`."""
    try:
        return Preprocess.from_hf(cfg, size)
    except (TypeError, ValueError, AttributeError) as e:
        raise VlmedgeError(f"{path}: not a usable image processor config ({e})") from None


def read_json_mapping(path: Path) -> dict[str, Any]:
    """An optional JSON object of a model folder ({} when absent); malformed, a one-line error naming the file."""
    if not path.is_file():
        return {}
    data = read_json(path, "")
    if not isinstance(data, dict):
        raise VlmedgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
