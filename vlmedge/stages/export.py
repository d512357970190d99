"""ONNX export per tower, with a parity check, and the ONNX Runtime encoder that scores exported artifacts.

An export folder holds::

    image_encoder.onnx   pixel_values (N,3,H,W) -> image_embeds (N,D), L2-normalised
    text_encoder.onnx    input_ids, attention_mask (N,L) -> text_embeds (N,D), L2-normalised
    manifest.json        preprocessing, tokenizer files, embedding size, opset, source, parity, precision
    tokenizer files      so a device needs nothing else
    zero_shot_labels.json + zero_shot_text_embeds.npy (optional): a device can classify with the image encoder alone
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import atomic_dir, write_json
from ..errors import VlmedgeError
from ..runtime.onnx import MANIFEST, MANIFEST_FORMAT, OnnxEncoder, onnx_size, record_thread_tuning

TOWER_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx"}
TWO_GB = 2 * 1024 ** 3


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    max_abs_diff: float = 1e-4
    """Parity: largest allowed |onnx - torch| on any embedding element."""
    min_cosine: float = 0.9999
    parity_samples: int = 4
    zero_shot_labels: tuple[str, ...] = field(default_factory=tuple)
    """Captions whose normalised text embeddings are precomputed into the export (e.g. 'a red circle')."""
    tune_threads: bool = True
    """Time each tower at 1, 2, 4, ... threads on this machine and record the fastest in the manifest, which
    vlmedge's runners use when no thread count is given."""
    seed: int = 0

    def __post_init__(self):
        if not 11 <= self.opset <= 21:
            raise VlmedgeError(f"export: opset={self.opset}; expected 11..21")


def _wrappers(model):
    import torch
    import torch.nn.functional as F

    from ..models import image_features, text_features

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


class _patchify_as_matmul:
    """While exporting, compute each patch-embedding Conv (kernel == stride, no padding: the ViT and CLIP stems) as
    patchify (Reshape + Transpose) and one MatMul. Same arithmetic; but ONNX Runtime's ConvInteger is a slow kernel
    (measured: the `base` stem as ConvInteger took 4.4 ms of a 16 ms image tower, 53 GOP/s), while a MatMul quantizes
    to the same fused integer GEMM as every other layer. The torch model is restored on exit."""

    def __init__(self, model, image_size: int):
        self.model, self.image_size, self.swapped = model, image_size, []

    def __enter__(self):
        import torch

        for parent in list(self.model.modules()):
            for name, conv in list(parent.named_children()):
                if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.groups == 1
                        and conv.padding == (0, 0) and conv.dilation == (1, 1)
                        and self.image_size % conv.kernel_size[0] == 0 == self.image_size % conv.kernel_size[1]):
                    setattr(parent, name, _patch_linear(conv, self.image_size))
                    self.swapped.append((parent, name, conv))
        return self

    def __exit__(self, *exc):
        for parent, name, conv in self.swapped:
            setattr(parent, name, conv)


def _patch_linear(conv, image_size: int):
    import torch

    class PatchLinear(torch.nn.Module):
        """Conv2d(kernel == stride) as patchify + Linear; returns the Conv's [batch, out, h, w]."""

        def __init__(self):
            super().__init__()
            (self.ph, self.pw), self.channels = conv.kernel_size, conv.in_channels
            self.h, self.w = image_size // self.ph, image_size // self.pw
            # `weight` keeps the Conv's name: the towers read `projection.weight.dtype`
            self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
            self.bias = conv.bias

        def forward(self, x):
            x = x.reshape(-1, self.channels, self.h, self.ph, self.w, self.pw).permute(0, 2, 4, 1, 3, 5)
            y = torch.nn.functional.linear(x.reshape(-1, self.h * self.w, self.channels * self.ph * self.pw),
                                           self.weight, self.bias)
            return y.transpose(1, 2).reshape(-1, y.shape[-1], self.h, self.w)

    return PatchLinear()


def _random_inputs(vlm, n: int, seed: int):
    """Fresh inputs for parity: random pixels, random token ids with random padding."""
    rng = np.random.default_rng(seed)
    size = vlm.preprocess.image_size
    pixels = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    vocab = len(vlm.tokenizer)
    ids = rng.integers(5, vocab, size=(n, vlm.max_length)).astype(np.int64)
    mask = np.ones_like(ids)
    for i in range(n):
        length = int(rng.integers(3, vlm.max_length + 1))
        ids[i, length:] = vlm.tokenizer.pad_token_id or 0
        mask[i, length:] = 0
        ids[i, 0] = vlm.tokenizer.cls_token_id if vlm.tokenizer.cls_token_id is not None else ids[i, 0]
    return pixels, ids, mask


def export(source: str | os.PathLike, out: str | os.PathLike, cfg: ExportConfig = ExportConfig()) -> dict[str, Any]:
    """Export a model folder to ONNX (one file per tower), check it, and write the manifest."""
    import onnx
    import torch

    from ..models import count_parameters, load_model

    vlm = load_model(source, attn_implementation="eager")  # eager attention: a graph ORT's fusions recognise
    image_enc, text_enc = _wrappers(vlm.model)
    pixels, ids, mask = _random_inputs(vlm, max(2, cfg.parity_samples), cfg.seed)
    large = count_parameters(vlm.model) * 4 > TWO_GB
    with atomic_dir(out) as tmp:
        with torch.no_grad(), _quiet_export(), _patchify_as_matmul(vlm.model, vlm.preprocess.image_size):
            torch.onnx.export(image_enc, (torch.from_numpy(pixels[:1]),), str(tmp / TOWER_FILES["image"]),
                              input_names=["pixel_values"], output_names=["image_embeds"], opset_version=cfg.opset,
                              dynamic_axes={"pixel_values": {0: "batch"}, "image_embeds": {0: "batch"}},
                              dynamo=False)
            torch.onnx.export(text_enc, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                              str(tmp / TOWER_FILES["text"]), input_names=["input_ids", "attention_mask"],
                              output_names=["text_embeds"], opset_version=cfg.opset,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"},
                                            "text_embeds": {0: "batch"}}, dynamo=False)
        for name in TOWER_FILES.values():
            path = tmp / name
            if large:  # protobuf cannot hold more than 2 GB: weights go to a side file
                m = onnx.load(str(path))
                onnx.save_model(m, str(path), save_as_external_data=True, location=f"{name}.data")
            onnx.checker.check_model(str(path), full_check=True)
        with torch.no_grad():
            ref_img = image_enc(torch.from_numpy(pixels)).numpy()
            ref_txt = text_enc(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        tokenizer_files = _save_tokenizer(vlm.tokenizer, tmp)
        manifest = {
            "format": MANIFEST_FORMAT, "precision": "fp32", "files": dict(TOWER_FILES),
            "embedding_dim": int(ref_img.shape[-1]), "opset": cfg.opset,
            "inputs": {"image": {"pixel_values": ["batch", 3, vlm.preprocess.image_size, vlm.preprocess.image_size]},
                       "text": {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}},
            "preprocess": asdict(vlm.preprocess), "max_length": vlm.max_length, "tokenizer": tokenizer_files,
            "vocab_size": len(vlm.tokenizer),
            "source_model": str(source), "source_architecture": vlm.architecture,
            "parameters": count_parameters(vlm.model),
            "logit_scale": float(vlm.model.logit_scale.detach().exp()),
        }
        write_json(tmp / MANIFEST, manifest)
        enc = OnnxEncoder(tmp)
        parity = {"image": _parity(enc.run_image(pixels), ref_img), "text": _parity(enc.run_text(ids, mask), ref_txt)}
        for tower, p in parity.items():
            if p["max_abs_diff"] > cfg.max_abs_diff or p["cosine_min"] < cfg.min_cosine:
                raise VlmedgeError(f"export: {tower} tower parity failed (max abs diff {p['max_abs_diff']:.2e} > "
                                   f"{cfg.max_abs_diff:.0e} or cosine {p['cosine_min']:.6f} < {cfg.min_cosine})")
        manifest["parity"] = parity
        if cfg.zero_shot_labels:
            write_zero_shot(enc, tmp, cfg.zero_shot_labels)
            manifest["zero_shot"] = {"labels": "zero_shot_labels.json", "text_embeds": "zero_shot_text_embeds.npy"}
        write_json(tmp / MANIFEST, manifest)
        record_thread_tuning(tmp, cfg.tune_threads)
    return {"parity": parity, "size_bytes": onnx_size(out)}


class _quiet_export:
    """torch.onnx's TorchScript path warns about tracing on every export; those warnings are not actionable here."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _save_tokenizer(tokenizer, folder: Path) -> list[str]:
    before = set(os.listdir(folder))
    tokenizer.save_pretrained(folder)
    return sorted(set(os.listdir(folder)) - before)


def _parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
    return {"max_abs_diff": float(np.abs(got - ref).max()), "cosine_min": float(cos.min())}


def write_zero_shot(encoder: "OnnxEncoder", folder: Path, labels: Sequence[str]) -> None:
    np.save(folder / "zero_shot_text_embeds.npy", encoder.encode_texts(list(labels)).astype(np.float32))
    write_json(folder / "zero_shot_labels.json", list(labels))


def copy_support_files(src: Path, dst: Path) -> None:
    """Copy everything of an export folder except the ONNX files (manifest, tokenizer, zero-shot data)."""
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith((".onnx", ".onnx.data")) and p.name != "eval.json":
            shutil.copy2(p, dst / p.name)
