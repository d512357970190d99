"""Evaluation of an image-text matching model (ITC retrieval + ITM reranking), through a `Matcher`: its PyTorch
model or its export folder, the same calls.

* ``itm``: hard negatives scored by the matching head: a true caption against one that differs in one thing (colour,
  shape, position of one object; two objects swapped, so the relation reads backwards); accuracy = the true one gets
  the higher match logit. ``itc_hard_negatives``: the same pairs by ITC cosine alone, for comparison.
* ``retrieval``: Recall@K image->text (over the distinct captions) and text->image (over the images), by ITC alone
  and after ITM reranks ITC's top ``rerank_k``; on shapes a hit is a caption that truly describes the image.
* ``zero_shot`` (shapes): colour x shape classes, ITC's top ``rerank_k`` classes reranked by ITM.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from ..._progress import Progress
from ...data import ShapesDataset, is_shapes, measured, open_dataset
from ...data.shapes import load_shapes, swapped_caption, zero_shot_classes, zero_shot_prompts

HARD_NEGATIVE_KINDS = ("colour", "shape", "position", "relation")


class Matcher(Protocol):
    preprocess: Any

    def encode(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(patch embeddings [N, P, D], normalised ITC embeddings [N, E])."""

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def match(self, patches: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """Match logits of (patches[i], texts[i]), or of one image's patches ([1, P, D]) with every text."""


def encode_all(matcher: Matcher, images: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(patch embeddings, ITC embeddings) of raw images, preprocessed and encoded in batches."""
    parts = [matcher.encode(matcher.preprocess(images[i:i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate([p for p, _ in parts]), np.concatenate([e for _, e in parts])


def _match_pairs(matcher: Matcher, patches: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Match logits of (patches[i], texts[i]), in calls of at most the matcher's `max_candidates` pairs."""
    batch = getattr(matcher, "max_candidates", None) or 256
    return np.concatenate([matcher.match(patches[i:i + batch], texts[i:i + batch])
                           for i in range(0, len(texts), batch)])


def recall_of_order(order: np.ndarray, hit: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """R@K of ranked candidate lists (`order` [Q, k], indices into `hit`'s columns)."""
    got = np.take_along_axis(hit, order, axis=1)
    return {f"r{k}": float(got[:, :k].any(1).mean()) for k in ks}


def rerank(matcher: Matcher, sim: np.ndarray, k: int, score) -> np.ndarray:
    """ITC's top k per row of `sim`, reordered by `score(row, candidates) -> ITM logits` (stable on ties)."""
    top = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    out = np.empty_like(top)
    for q in range(len(top)):
        out[q] = top[q][np.argsort(-score(q, top[q]), kind="stable")]
    return out


def retrieval(matcher: Matcher, patches: np.ndarray, img: np.ndarray, captions: Sequence[str], hit: np.ndarray,
              k: int, progress: bool = False) -> dict[str, Any]:
    """ITC and reranked Recall@1/5 both ways; `hit[i, j]`: caption j is a right answer for image i."""
    txt = matcher.encode_texts(list(captions))
    sim = img @ txt.T
    k = min(k, *sim.shape)
    ks = sorted({x for x in (1, 5) if x <= k} | {k})  # R@k: the same both ways (reranking reorders the top k)
    out: dict[str, Any] = {"n_images": len(img), "n_captions": len(captions), "k": k}
    with Progress("rerank image->text", len(img), enabled=progress, unit="queries", every=0.25) as bar:
        def i2t(q, cand):
            bar.update(q + 1)
            return matcher.match(patches[q:q + 1], [captions[j] for j in cand])
        order_i2t = rerank(matcher, sim, k, i2t)
    with Progress("rerank text->image", len(captions), enabled=progress, unit="queries", every=0.25) as bar:
        def t2i(q, cand):
            bar.update(q + 1)
            return matcher.match(patches[cand], [captions[q]] * len(cand))
        order_t2i = rerank(matcher, sim.T, k, t2i)
    for name, s, order, h in (("i2t", sim, order_i2t, hit), ("t2i", sim.T, order_t2i, hit.T)):
        itc = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out.update({f"itc_{name}_{m}": v for m, v in recall_of_order(itc, h, ks).items()})
        out.update({f"rerank_{name}_{m}": v for m, v in recall_of_order(order, h, ks).items()})
    return out


def hard_negatives(matcher: Matcher, data_single, data_mixed, n: int, seed: int) -> tuple[dict, dict]:
    """(ITM accuracy, ITC accuracy) per kind on `n` images each: the true caption must score above the false one."""
    rng = np.random.default_rng([seed, 5])
    itm, itc = {}, {}
    pairs = [i for i, o in enumerate(data_mixed.objects) if len(o) == 2][:n]
    for kind in HARD_NEGATIVE_KINDS:
        data, idx = (data_mixed, pairs) if kind == "relation" else (data_single, list(range(min(n, len(data_single)))))
        if not idx:
            continue
        true, false = (list(x) for x in zip(*(swapped_caption(data.objects[i], kind, rng) for i in idx)))
        patches, img = encode_all(matcher, data.images[idx])
        itm[kind] = float((_match_pairs(matcher, patches, true) > _match_pairs(matcher, patches, false)).mean())
        itc[kind] = float(((img * matcher.encode_texts(true)).sum(1) > (img * matcher.encode_texts(false)).sum(1))
                          .mean())
    itm["mean"] = float(np.mean([itm[k] for k in HARD_NEGATIVE_KINDS if k in itm]))
    itm["n"] = {"single": min(n, len(data_single)), "relation": len(pairs)}
    return itm, itc


def zero_shot(matcher: Matcher, data, k: int) -> dict[str, Any]:
    """Colour x shape classification: ITC's nearest classes (mean embedding over the prompts), the top k reranked by
    the ITM logit of the class's first prompt."""
    classes = zero_shot_classes()
    prompts = [zero_shot_prompts(c, s) for c, s in classes]
    truth = np.array([classes.index((o[0].colour, o[0].shape)) for o in data.objects])
    emb = matcher.encode_texts([p for ps in prompts for p in ps]).reshape(len(classes), len(prompts[0]), -1).mean(1)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    patches, img = encode_all(matcher, data.images)
    sim = img @ emb.T
    k = min(k, len(classes))
    order = rerank(matcher, sim, k, lambda q, cand: matcher.match(patches[q:q + 1], [prompts[c][0] for c in cand]))
    return {"n": len(truth), "classes": len(classes), "k": k,
            "itc_top1": float((sim.argmax(1) == truth).mean()), "top1": float((order[:, 0] == truth).mean()),
            "top5": float((order[:, :5] == truth[:, None]).any(1).mean())}


def evaluate(matcher: Matcher, cfg, rerank_k: int = 16, progress: bool = False) -> dict[str, Any]:
    """The matching tasks on `cfg`'s data (an `EvalConfig`), ITM reranking ITC's top `rerank_k`."""
    size = matcher.preprocess.image_size
    if is_shapes(cfg.data):
        single = load_shapes("test", cfg.zero_shot_images, size, seed=cfg.seed, single_object=True)
        mixed = load_shapes("test", cfg.retrieval_pairs, size, seed=cfg.seed)
        itm, itc = hard_negatives(matcher, single, mixed, cfg.hard_negative_pairs, cfg.seed)
        out: dict[str, Any] = {"itm": itm, "itc_hard_negatives": itc, "zero_shot": zero_shot(matcher, single,
                                                                                               rerank_k)}
        ds = ShapesDataset(mixed)
        out["data"] = {"measured": measured(cfg.data, "test", False, len(single) + len(mixed), 0)}
    else:
        ds = open_dataset(cfg.data, "val", resolution=size, count=cfg.retrieval_pairs, seed=cfg.seed)
        out = {"data": {"measured": ds.measured}}
    idx = list(range(min(len(ds), cfg.retrieval_pairs)))
    captions, specs = ds.training_captions(idx, np.random.default_rng([cfg.seed, 3]))
    first = {c: j for j, c in reversed(list(enumerate(captions)))}
    distinct = sorted(first.values())
    hit = ds.match(idx, [specs[j] for j in distinct]) > 0
    if not getattr(ds, "match_is_content", False):  # listed captions: the drawn one counts too
        hit |= np.asarray(captions, dtype=object)[:, None] == np.asarray(captions, dtype=object)[distinct][None, :]
    patches, img = encode_all(matcher, ds.images(idx))
    out["retrieval"] = retrieval(matcher, patches, img, [captions[j] for j in distinct], hit, rerank_k, progress)
    return out
