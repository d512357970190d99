"""The dual encoder's tasks: zero-shot top-1/top-5, retrieval Recall@K, hard-negative accuracy.

The evaluator only needs an `Encoder`: something with `preprocess` (raw images -> pixel values), `encode_images`
and `encode_texts` returning L2-normalised numpy embeddings. `TorchEncoder` wraps a PyTorch model; the ONNX
Runtime and TensorRT encoders of the export stage implement the same three members, so the artifact that ships is
the one that is scored.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..._progress import LARGE, Progress
from ...data import ShapesDataset, class_name, is_shapes, measured, open_dataset
from ...data.shapes import zero_shot_classes as shapes_classes
from ...data.shapes import zero_shot_prompts
from ...errors import VlmedgeError
from ...evaluate import EvalConfig, normalise, recall_at_k, recall_from_hits
from .model import image_features, text_features


class Encoder(Protocol):
    preprocess: Any

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...


class TorchEncoder:
    """A PyTorch `VLM` as an `Encoder` (eager, no gradients)."""

    def __init__(self, vlm, batch_size: int = 256, device: str = "cpu"):
        self.vlm, self.batch_size, self.device = vlm, batch_size, device
        self.preprocess = vlm.preprocess
        self.tokenize = vlm.tokenize

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = [image_features(self.vlm.model, torch.from_numpy(pixel_values[i:i + self.batch_size]).to(self.device))
                   for i in range(0, len(pixel_values), self.batch_size)]
        return normalise(torch.cat(out).float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                tok = self.vlm.tokenize(list(texts[i:i + self.batch_size]))
                out.append(text_features(self.vlm.model, torch.from_numpy(tok["input_ids"]).to(self.device),
                                         torch.from_numpy(tok["attention_mask"]).to(self.device)))
        return normalise(torch.cat(out).float().cpu().numpy())


def _embed_images(encoder: Encoder, images: np.ndarray, batch: int = 256, progress: bool = False) -> np.ndarray:
    out = []
    with Progress("eval: images", len(images), enabled=progress and len(images) >= LARGE, unit="images") as bar:
        for i in range(0, len(images), batch):
            out.append(encoder.encode_images(encoder.preprocess(images[i:i + batch])))
            bar.update(min(i + batch, len(images)))
    return np.concatenate(out)


def evaluate(encoder: Encoder, cfg: EvalConfig = EvalConfig(), progress: bool = False) -> dict[str, Any]:
    """All metrics the data supports, as a nested dict of fractions in [0, 1]."""
    resolution = encoder.preprocess.image_size
    if is_shapes(cfg.data):
        return _evaluate_shapes(encoder, cfg, resolution)

    ds = open_dataset(cfg.data, "test", resolution=resolution, count=max(cfg.retrieval_pairs, cfg.zero_shot_images),
                      progress=progress)
    out: dict[str, Any] = {"retrieval": _retrieval(encoder, ds, cfg.seed, cfg.retrieval_pairs, progress),
                           "data": {"measured": ds.measured}}
    if ds.labels is not None:
        n = min(len(ds), cfg.zero_shot_images)
        classes = user_classes(ds.labels[:n], cfg, ds.source_labels)
        truth = np.array([[c for c, _ in classes].index(label) for label in ds.labels[:n]])
        out["zero_shot"] = zero_shot(encoder, ds.images(range(n)), truth, [p for _, p in classes], progress)
        out["zero_shot"].pop("predicted")
    return out


def user_classes(labels: Sequence[str], cfg: EvalConfig, every: Sequence[str] | None = None
                 ) -> list[tuple[str, list[str]]]:
    """(label, prompts) per zero-shot class of labelled data: the --classes file's, else `every` label of the
    source (a held-out split may lack some), else the labels' sorted."""
    names = cfg.class_list()
    if names is None:
        names = sorted(set(every or labels))
    else:
        missing = sorted(set(labels) - set(names))
        if missing:
            raise VlmedgeError(f"eval: label {missing[0]!r} of {cfg.data} is not in the classes file {cfg.classes} "
                               f"({len(missing)} label(s) missing)")
    if len(names) < 2:
        raise VlmedgeError(f"eval: zero-shot needs at least 2 classes; {cfg.data} has {names}")
    templates = cfg.template_list()
    return [(n, [t.format(class_name(n)) for t in templates]) for n in names]


def zero_shot_classes(cfg: EvalConfig, resolution: int) -> list[tuple[str, list[str]]] | None:
    """The classes (label, prompts) zero-shot evaluation scores on `cfg.data`, or None where it has no labels: what
    an export precomputes as its label embeddings."""
    if is_shapes(cfg.data):
        return [(f"{c} {s}", zero_shot_prompts(c, s)) for c, s in shapes_classes()]
    ds = open_dataset(cfg.data, "test", resolution=resolution, count=cfg.zero_shot_images)
    return None if ds.labels is None else user_classes(ds.labels, cfg, ds.source_labels)


def class_embeddings(encoder: Encoder, prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """One L2-normalised embedding per class: the mean of its prompts' embeddings (CLIP's prompt ensembling)."""
    flat = [p for ps in prompts for p in ps]
    emb = encoder.encode_texts(flat)
    bounds = np.cumsum([0] + [len(ps) for ps in prompts])
    return normalise(np.stack([emb[a:b].mean(0) for a, b in zip(bounds[:-1], bounds[1:])]))


def zero_shot(encoder: Encoder, images: np.ndarray, truth: np.ndarray, prompts: Sequence[Sequence[str]],
              progress: bool = False) -> dict:
    """Top-1 / top-5 of classifying `images` (true class indices `truth`) by their nearest class embedding."""
    scores = _embed_images(encoder, images, progress=progress) @ class_embeddings(encoder, prompts).T
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    return {"n": len(truth), "classes": len(prompts), "top1": float((top5[:, 0] == truth).mean()),
            "top5": float((top5 == truth[:, None]).any(1).mean()), "predicted": top5[:, 0]}


def _retrieval(encoder: Encoder, ds, seed: int, count: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Recall@K both ways. Image->text three ways where they differ:

    * ``i2t_rK``: over every image's drawn caption, a hit = a caption identical to the image's own (copies of one
      caption crowd the top k: with 10 classes x 4 templates R@5 cannot exceed R@1);
    * ``i2t_distinct_rK``: over the distinct captions, each once, a hit = one of the image's captions (the drawn
      one, or any the data lists for it);
    * ``i2t_true_rK`` (data whose match matrix is about content, shapes): over the distinct captions, a hit = a
      caption that truly describes the image.
    """
    idx = list(range(min(len(ds), count or len(ds))))
    captions, specs = ds.training_captions(idx, np.random.default_rng([seed, 3]))
    img = _embed_images(encoder, ds.images(idx), progress=progress)
    txt = encoder.encode_texts(captions)
    sim = img @ txt.T
    i2t = recall_at_k(sim, captions, captions)
    t2i = recall_at_k(sim.T, captions, captions)
    first = {c: j for j, c in reversed(list(enumerate(captions)))}
    distinct = sorted(first.values())
    matched = ds.match(idx, [specs[j] for j in distinct]) > 0
    identical = np.asarray(captions, dtype=object)[:, None] == np.asarray(captions, dtype=object)[distinct][None, :]
    content = getattr(ds, "match_is_content", False)
    out = {"n": len(idx), "distinct_captions": len(distinct), **{f"i2t_{k}": v for k, v in i2t.items()},
           **{f"i2t_distinct_{k}": v for k, v in
              recall_from_hits(sim[:, distinct], identical if content else identical | matched).items()}}
    if content:
        out.update({f"i2t_true_{k}": v for k, v in recall_from_hits(sim[:, distinct], matched).items()})
    return {**out, **{f"t2i_{k}": v for k, v in t2i.items()}}


def _evaluate_shapes(encoder: Encoder, cfg: EvalConfig, resolution: int) -> dict[str, Any]:
    from ...data.shapes import HELD_OUT, load_shapes, swapped_caption, zero_shot_classes, zero_shot_prompts

    single = load_shapes("test", cfg.zero_shot_images, resolution, seed=cfg.seed, single_object=True)
    classes = zero_shot_classes()
    truth = np.array([classes.index((o[0].colour, o[0].shape)) for o in single.objects])
    zs = zero_shot(encoder, single.images, truth, [zero_shot_prompts(c, s) for c, s in classes])
    top1 = zs.pop("predicted")
    held = np.array([classes[t] in HELD_OUT for t in truth])
    pred = [classes[p] for p in top1]
    zs.update({
        "top1_seen": float((top1 == truth)[~held].mean()), "top1_heldout": float((top1 == truth)[held].mean()),
        "colour": float(np.mean([p[0] == classes[t][0] for p, t in zip(pred, truth)])),
        "shape": float(np.mean([p[1] == classes[t][1] for p, t in zip(pred, truth)])),
    })

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
    return {"zero_shot": zs, "retrieval": retrieval, "hard_negatives": hard,
            "data": {"measured": measured(cfg.data, "test", False, len(single) + len(mixed), 0)}}
