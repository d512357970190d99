"""Accuracy of any dual encoder: zero-shot top-1/top-5, retrieval Recall@K, hard-negative accuracy.

The evaluator only needs an `Encoder`: something with `preprocess` (raw images -> pixel values), `encode_images`
and `encode_texts` returning L2-normalised numpy embeddings. `TorchEncoder` wraps a PyTorch model; the ONNX
Runtime and TensorRT encoders of the export stage implement the same three members, so the artifact that ships is
the one that is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import VlmedgeError



class Encoder(Protocol):
    preprocess: Any

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class TorchEncoder:
    """A PyTorch `VLM` as an `Encoder` (eager, no gradients)."""

    def __init__(self, vlm, batch_size: int = 256, device: str = "cpu"):
        self.vlm, self.batch_size, self.device = vlm, batch_size, device
        self.preprocess = vlm.preprocess
        self.tokenize = vlm.tokenize

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        from ..models import image_features

        with torch.no_grad():
            out = [image_features(self.vlm.model, torch.from_numpy(pixel_values[i:i + self.batch_size]).to(self.device))
                   for i in range(0, len(pixel_values), self.batch_size)]
        return _normalise(torch.cat(out).float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        from ..models import text_features

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.vlm.tokenize(list(texts[i:i + self.batch_size]))
                out.append(text_features(self.vlm.model, torch.from_numpy(tok["input_ids"]).to(self.device),
                                         torch.from_numpy(tok["attention_mask"]).to(self.device)))
        return _normalise(torch.cat(out).float().cpu().numpy())


@dataclass
class EvalConfig:
    """What to evaluate on. Sizes are per metric family."""

    data: str = "shapes"
    """Held-out data: shapes (every task), or a captioned dataset (retrieval)."""
    zero_shot_images: int = 1080
    """Single-object held-out images for zero-shot colour x shape classification (36 classes)."""
    retrieval_pairs: int = 1000
    """Image-caption pairs for Recall@K both ways."""
    hard_negative_pairs: int = 500
    """Images per hard-negative test (colour, shape, relation swapped)."""
    vqa_questions: int = 800
    """Questions for a generative model (every type in turn: VQA accuracy per type, captions for 'describe')."""
    max_new_tokens: int = 24
    """Longest answer a generative model may write (greedy decoding)."""
    seed: int = 0

    def __post_init__(self):
        from ..data import is_shapes, shapes_count

        if is_shapes(self.data):
            shapes_count(self.data)
        for key in ("zero_shot_images", "retrieval_pairs", "hard_negative_pairs", "vqa_questions", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise VlmedgeError(f"eval: {key}={getattr(self, key)}; expected an integer >= 1")


def _embed_images(encoder: Encoder, images: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([encoder.encode_images(encoder.preprocess(images[i:i + batch]))
                           for i in range(0, len(images), batch)])


def recall_at_k(sim: np.ndarray, query_keys: Sequence[str], item_keys: Sequence[str], ks=(1, 5, 10)) -> dict:
    """Fraction of queries with a matching item (same caption text) among the top k."""
    order = np.argsort(-sim, axis=1)
    item_keys = np.asarray(item_keys, dtype=object)
    hits = item_keys[order] == np.asarray(query_keys, dtype=object)[:, None]
    return {f"r{k}": float(hits[:, :k].any(axis=1).mean()) for k in ks}


def evaluate(encoder: Encoder, cfg: EvalConfig = EvalConfig(), progress: bool = False) -> dict[str, Any]:
    """All metrics the data supports, as a nested dict of fractions in [0, 1]."""
    from ..data import is_shapes

    resolution = encoder.preprocess.image_size
    if is_shapes(cfg.data):
        return _evaluate_shapes(encoder, cfg, resolution)
    from ..data import open_dataset

    ds = open_dataset(cfg.data, "test", resolution=resolution, count=cfg.retrieval_pairs)
    return {"retrieval": _retrieval(encoder, ds, cfg.seed)}


def _retrieval(encoder: Encoder, ds, seed: int) -> dict[str, Any]:
    idx = list(range(len(ds)))
    captions = ds.captions(idx, np.random.default_rng([seed, 3]))
    img = _embed_images(encoder, ds.images(idx))
    txt = encoder.encode_texts(captions)
    sim = img @ txt.T
    i2t = recall_at_k(sim, captions, captions)
    t2i = recall_at_k(sim.T, captions, captions)
    return {"n": len(idx), **{f"i2t_{k}": v for k, v in i2t.items()}, **{f"t2i_{k}": v for k, v in t2i.items()}}


def _evaluate_shapes(encoder: Encoder, cfg: EvalConfig, resolution: int) -> dict[str, Any]:
    from ..data import ShapesDataset
    from ..data.shapes import HELD_OUT, load_shapes, swapped_caption, zero_shot_classes, zero_shot_prompts

    single = load_shapes("test", cfg.zero_shot_images, resolution, seed=cfg.seed, single_object=True)
    classes = zero_shot_classes()
    prompts = [p for c, s in classes for p in zero_shot_prompts(c, s)]
    per_class = len(prompts) // len(classes)
    class_emb = _normalise(encoder.encode_texts(prompts).reshape(len(classes), per_class, -1).mean(1))
    img = _embed_images(encoder, single.images)
    scores = img @ class_emb.T
    truth = np.array([classes.index((o[0].colour, o[0].shape)) for o in single.objects])
    top5 = np.argsort(-scores, axis=1)[:, :5]
    top1 = top5[:, 0]
    held = np.array([classes[t] in HELD_OUT for t in truth])
    pred = [classes[p] for p in top1]
    zero_shot = {
        "n": len(truth), "classes": len(classes),
        "top1": float((top1 == truth).mean()), "top5": float((top5 == truth[:, None]).any(1).mean()),
        "top1_seen": float((top1 == truth)[~held].mean()), "top1_heldout": float((top1 == truth)[held].mean()),
        "colour": float(np.mean([p[0] == classes[t][0] for p, t in zip(pred, truth)])),
        "shape": float(np.mean([p[1] == classes[t][1] for p, t in zip(pred, truth)])),
    }

    mixed = load_shapes("test", cfg.retrieval_pairs, resolution, seed=cfg.seed)
    retrieval = _retrieval(encoder, ShapesDataset(mixed), cfg.seed)

    rng = np.random.default_rng([cfg.seed, 5])
    hard: dict[str, Any] = {}
    pairs = [i for i, o in enumerate(mixed.objects) if len(o) == 2][:cfg.hard_negative_pairs]
    for kind, data, idx in (("colour", single, range(min(cfg.hard_negative_pairs, len(single)))),
                            ("shape", single, range(min(cfg.hard_negative_pairs, len(single)))),
                            ("relation", mixed, pairs)):
        idx = list(idx)
        if not idx:
            continue
        true, false = zip(*(swapped_caption(data.objects[i], kind, rng) for i in idx))
        e = _embed_images(encoder, data.images[idx])
        t, f = encoder.encode_texts(list(true)), encoder.encode_texts(list(false))
        hard[kind] = float(((e * t).sum(1) > (e * f).sum(1)).mean())
    hard["n"] = {"colour": min(cfg.hard_negative_pairs, len(single)), "relation": len(pairs)}
    return {"zero_shot": zero_shot, "retrieval": retrieval, "hard_negatives": hard}


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """{'zero_shot.top1': 0.93, ...}: the names gates and reports use."""
    out: dict[str, float] = {}
    for group, values in metrics.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if isinstance(v, float):
                    out[f"{group}.{k}"] = v
    return out
