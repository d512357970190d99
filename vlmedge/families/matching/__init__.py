"""The image-text matching family: BLIP's `BlipForImageTextRetrieval` (ITC + ITM), served as a reranker.

Trained with ITC (InfoNCE on the two towers' projections, BLIP's fixed temperature) plus ITM cross-entropy on each
image's own caption and on hard negatives: a caption and an image mined from the ITC similarities of the batch
(BLIP's hard-negative mining, the seed's 硬负样本挖掘; with the loop's neighbour images the batch holds the same
objects in other places) and shapes' one-edit false captions. Exported as three graphs: the image encoder (patch
embeddings and ITC embedding), the text encoder (ITC embedding) and the matcher (patch embeddings + tokens -> match
logit, one image's patches broadcast over k candidates). Timed as deployments use it: encode an image, rerank k
candidates for one image in one matcher call, and a text query end to end (ITC over a gallery of cached image
embeddings, then ITM on the top k).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..._progress import Budget, upper
from ...data import ShapesDataset, open_dataset
from ...data.shapes import load_shapes
from ...errors import VlmedgeError
from ...losses import affinity_loss, contrastive_loss
from ...models import load_tokenizer
from ...models.structure import count_flops, tower_layers
from ...options import Options
from ...preprocess import Preprocess
from ...runtime.measure import random_feeds, thread_record, tuned_threads
from ...runtime.onnx import check_inputs, open_session, read_manifest
from .. import Family, Graph, TrainBatch, register
from ..onnx_export import save_tokenizer
from .model import ARCHITECTURES, build, encode_image, encode_text, load, match_logits
from .tasks import encode_all, evaluate

GRAPH_FILES = {"image": "image_encoder.onnx", "text": "text_encoder.onnx", "matcher": "matcher.onnx"}
"""Its only layout: transformers.js has no BLIP image-text matching model, so no layout of theirs exists to follow."""
MAX_CANDIDATES = 64
"""Candidates one matcher call may score (recorded in the manifest; a device sizes its buffers by it)."""
RERANK_K = 16
"""Candidates in the latency scenarios' rerank."""
GALLERY = 256
"""Cached image embeddings the end-to-end query scenario searches."""


class _MatcherBase:
    """What both adapters share: tokenising and the checks on a matcher call."""

    max_candidates: int | None = None
    where: str = ""

    def tokenize(self, texts: Sequence[str], longest: bool = False) -> dict[str, np.ndarray]:
        """Token ids and mask padded to the model's max_length (what a device feeds), or with `longest` to the
        longest text (training: a shorter sequence, the same result under the mask)."""
        tok = self.tokenizer(list(texts), padding="longest" if longest else "max_length", truncation=True,
                             max_length=self.max_length, return_tensors="np")
        return {"input_ids": tok["input_ids"].astype(np.int64), "attention_mask": tok["attention_mask"].astype(np.int64)}

    def _check(self, patches: np.ndarray, texts: Sequence[str]) -> None:
        if patches.ndim != 3 or patches.shape[1:] != (self.patches, self.width):
            raise VlmedgeError(f"{self.where}: the matcher takes patch embeddings of shape [n, {self.patches}, "
                               f"{self.width}], got {list(patches.shape)} (image and matcher from different exports "
                               "or models?)")
        if len(patches) not in (1, len(texts)):
            raise VlmedgeError(f"{self.where}: {len(patches)} images for {len(texts)} texts; give one image for all "
                               "candidates or one per text")
        if self.max_candidates is not None and len(texts) > self.max_candidates:
            raise VlmedgeError(f"{self.where}: {len(texts)} candidates in one matcher call; the manifest allows "
                               f"{self.max_candidates} (max_candidates)")


class TorchMatcher(_MatcherBase):
    """A PyTorch `MatchingVLM` as a `Matcher` (eager, no gradients)."""

    def __init__(self, vlm):
        self.vlm, self.preprocess, self.tokenizer, self.max_length = vlm, vlm.preprocess, vlm.tokenizer, vlm.max_length
        self.patches, self.width = vlm.patches, vlm.width
        self.where = vlm.source

    def encode(self, pixel_values):
        import torch

        with torch.inference_mode():
            p, e = encode_image(self.vlm.model, torch.from_numpy(pixel_values))
        return p.numpy(), e.numpy()

    def encode_texts(self, texts):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 256):
                tok = self.tokenize(texts[i:i + 256])
                out.append(encode_text(self.vlm.model, *(torch.from_numpy(tok[k]) for k in tok)).numpy())
        return np.concatenate(out)

    def match(self, patches, texts):
        import torch

        self._check(patches, texts)
        tok = self.tokenize(texts)
        with torch.inference_mode():
            return match_logits(self.vlm.model, torch.from_numpy(patches),
                                *(torch.from_numpy(tok[k]) for k in tok)).numpy()


class OnnxMatcher(_MatcherBase):
    """An export folder as a `Matcher`: its three graphs in ONNX Runtime. Threads per graph: `threads`, else the
    count tuned on this CPU (manifest), else ONNX Runtime's default."""

    def __init__(self, folder, threads: int | None = None, providers=None, open_sessions: bool = True,
                 profile=None, **_):
        self.folder = Path(folder)
        self.where = str(self.folder)
        self.manifest = m = read_manifest(self.folder, tuple(GRAPH_FILES))
        self.preprocess = Preprocess(**m["preprocess"])
        self.tokenizer, self.max_length = load_tokenizer(self.folder), int(m["max_length"])
        self.patches, self.width, self.max_candidates = int(m["patches"]), int(m["vision_width"]), \
            int(m["max_candidates"])
        self.threads = {k: threads or tuned_threads(m, k) for k in GRAPH_FILES}
        self.sessions = {}
        if open_sessions:
            self.sessions = {k: open_session(self.folder / m["files"][k], self.threads[k],
                                             providers or ["CPUExecutionProvider"],
                                             f"{profile}-{k}" if profile else None) for k in GRAPH_FILES}
            for k, s in self.sessions.items():
                check_inputs(self.folder / m["files"][k], {i.name: i.shape for i in s.get_inputs()},
                             m.get("inputs", {}).get(k, {}))

    def encode(self, pixel_values):
        p, e = self.sessions["image"].run(None, {"pixel_values": pixel_values.astype(np.float32)})
        return p, e

    def encode_texts(self, texts):
        out = [self.sessions["text"].run(None, self.tokenize(texts[i:i + 256]))[0] for i in range(0, len(texts), 256)]
        return np.concatenate(out)

    def match(self, patches, texts):
        self._check(patches, texts)
        return self.sessions["matcher"].run(None, {"patch_embeds": patches.astype(np.float32),
                                                   **self.tokenize(texts)})[0]


def _modules(model):
    import torch

    class Image(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            return encode_image(self.model, pixel_values)

    class Text(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            return encode_text(self.model, input_ids, attention_mask)

    class Matcher(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, patch_embeds, input_ids, attention_mask):
            return match_logits(self.model, patch_embeds, input_ids, attention_mask)

    return Image().eval(), Text().eval(), Matcher().eval()


def _token_tensors(matcher: TorchMatcher, texts: Sequence[str], device: str) -> dict[str, Any]:
    """Training tokens as torch tensors on `device`, padded to the longest text."""
    import torch

    return {k: torch.from_numpy(v).to(device) for k, v in matcher.tokenize(texts, longest=True).items()}


def _itm_pairs(b: TrainBatch, sim, match):
    """The ITM training pairs of one micro-batch as (image row, caption text, label): every image's own caption (1),
    a caption and an image mined from the ITC similarities (0; drawn in proportion to softmax similarity among the
    pairs that are not true, BLIP's mining), and the loop's one-edit false captions where given (0)."""
    import torch

    captions = b.captions[b.local]
    n = len(captions)
    with torch.no_grad():
        false = ~match
        w_t = torch.softmax(sim.float(), 1) * false + 1e-12 * false
        w_i = torch.softmax(sim.float().t(), 1) * false.t() + 1e-12 * false.t()
        has_t, has_i = false.any(1), false.t().any(1)
        hard_t = torch.multinomial(w_t + (~has_t[:, None]).float(), 1)[:, 0].tolist()
        hard_i = torch.multinomial(w_i + (~has_i[:, None]).float(), 1)[:, 0].tolist()
    pairs = [(i, captions[i], 1.0) for i in range(n)]
    pairs += [(i, captions[hard_t[i]], 0.0) for i in range(n) if has_t[i]]
    pairs += [(hard_i[j], captions[j], 0.0) for j in range(n) if has_i[j]]
    if b.negatives is not None:
        texts = b.negatives[0]
        pairs += [(j - b.local.start, texts[j], 0.0) for j in range(b.local.start, b.local.stop)
                  if texts[j] is not None]
    return pairs


@dataclass(frozen=True)
class MatchingEval(Options):
    """A matching model's evaluation settings (keys of a recipe's `eval` section, flags of `vlmedge eval`)."""

    rerank_k: int = RERANK_K
    """Candidates ITC retrieves for ITM to rerank (retrieval both ways, zero-shot classes)."""

    def __post_init__(self):
        if self.rerank_k < 1:
            raise VlmedgeError(f"eval: rerank_k={self.rerank_k}; expected an integer >= 1")


@dataclass(frozen=True)
class MatchingPrune(Options):
    """A matching model's own prunable part (a key of a recipe's `prune` stage, beside the towers' ratios)."""

    text_cross_heads: float = 0.0
    """Fraction of each text layer's cross-attention heads (to the image's patches) to remove."""


@dataclass(frozen=True)
class MatchingDistill(Options):
    """A matching student's own distillation loss (a key of a recipe's `distill` stage)."""

    matching: float = 1.0
    """KL between the teacher's and the student's match probabilities on the same image-text pairs (the ITM
    head's logits)."""

    WEIGHTS = ("matching",)

    def __post_init__(self):
        if self.matching < 0:
            raise VlmedgeError(f"distill: matching={self.matching} must be >= 0")


class Matching(Family):
    graph_towers = {"image": "vision", "text": "text", "matcher": "text"}
    prunable_parts = ("text_heads", "text_mlp", "text_layers", "text_cross_heads")
    name = "matching"
    architectures = ARCHITECTURES
    layouts = {"flat": GRAPH_FILES}
    options = {"eval": MatchingEval, "prune": MatchingPrune, "distill": MatchingDistill}
    report_metrics = ("itm.mean", "retrieval.rerank_i2t_r1", "itm.relation", "itm.position",
                      "retrieval.itc_i2t_r1", "retrieval.rerank_t2i_r1", "zero_shot.top1")
    headline_scenario = "rerank"
    latency_record = {"rerank_k": RERANK_K, "gallery": GALLERY}
    scenarios_help = (f"image encode, rerank ({RERANK_K} candidates for one image, one matcher call) and query "
                      f"(text -> ITC over {GALLERY} cached image embeddings -> ITM on the top {RERANK_K})")

    # --- models ---
    def build(self, spec, tokenizer, *, seed=0, source="", vision_init=None):
        return build(spec, tokenizer, seed=seed, source=source, vision_init=vision_init)

    def load(self, path, *, attn_implementation="sdpa"):
        return load(path, attn_implementation=attn_implementation)

    def flops(self, model) -> dict[str, int]:
        """FLOPs counted by PyTorch on the real model: one image's encoding, one caption's ITC embedding, one
        (image, caption) match."""
        import torch

        size = model.preprocess.image_size
        tok = {k: torch.from_numpy(v) for k, v in TorchMatcher(model).tokenize(["a photo"]).items()}
        with torch.no_grad():
            patches, _ = encode_image(model.model, torch.zeros(1, 3, size, size))
        return count_flops({"image": lambda: encode_image(model.model, torch.zeros(1, 3, size, size)),
                            "text": lambda: encode_text(model.model, *tok.values()),
                            "matcher": lambda: match_logits(model.model, patches, *tok.values())})

    # --- pruning ---
    def prunable(self, model):
        """The text encoder: self-attention heads, MLP neurons, layers and each layer's cross-attention heads (the
        image encoder's fused qkv projection is not sliced yet)."""
        return {"text": tower_layers(model.model, "text")}

    # --- training ---
    def training_loss(self, model, batch, teacher=None, weights=None):
        import torch
        import torch.nn.functional as F

        b, net = batch, model.model
        rows = b.indices[b.local]
        images = b.data.images(rows)
        pixels = torch.from_numpy(model.preprocess(images)).to(b.device)
        student = TorchMatcher(model)
        tok = _token_tensors(student, b.captions[b.local], b.device)
        scale = torch.tensor(float(net.config.logit_scale_init_value), device=b.device)
        all_rows = [b.indices[j] for j in b.rows]
        match_all = torch.from_numpy(b.data.match(all_rows, [b.specs[j] for j in b.rows]))
        local_match = torch.from_numpy(b.data.match(rows, b.specs[b.local])).to(b.device) > 0
        with b.autocast():
            patches, img = encode_image(net, pixels)
            txt = encode_text(net, tok["input_ids"], tok["attention_mask"])
            itc = contrastive_loss(b.gather(img.float()), b.gather(txt.float()), scale, match_all)
            pairs = _itm_pairs(b, scale.exp() * img.detach() @ txt.detach().t(), local_match)
            which = torch.tensor([p[0] for p in pairs], device=b.device)
            ptok = _token_tensors(student, [p[1] for p in pairs], b.device)
            logits = match_logits(net, patches[which], ptok["input_ids"], ptok["attention_mask"]).float()
        labels = torch.tensor([p[2] for p in pairs], device=b.device)
        itm = F.binary_cross_entropy_with_logits(logits, labels)
        if teacher is None:
            return itc + itm
        return self._distillation(model, teacher, weights, b, images, pairs, img, txt, logits, itc + itm)

    @staticmethod
    def _distillation(model, teacher, w, b, images, pairs, img, txt, logits, own):
        """The student's own ITC + ITM, plus ITC affinity KL, embedding cosine (both as for dual encoders) and the
        KL between the teacher's and the student's match probabilities on the same pairs."""
        import torch
        import torch.nn.functional as F

        tnet = teacher.model
        tm = TorchMatcher(teacher)
        with torch.no_grad():
            t_patches, t_img = encode_image(tnet, torch.from_numpy(teacher.preprocess(images)).to(b.device))
            ttok = _token_tensors(tm, b.captions[b.local], b.device)
            t_txt = encode_text(tnet, ttok["input_ids"], ttok["attention_mask"])
            which = torch.tensor([p[0] for p in pairs], device=b.device)
            ptok = _token_tensors(tm, [p[1] for p in pairs], b.device)
            t_logits = match_logits(tnet, t_patches[which], ptok["input_ids"], ptok["attention_mask"]).float()
        total = w.contrastive * own
        if w.affinity:
            s_scale, t_scale = model.itc_scale, teacher.itc_scale
            total = total + w.affinity * affinity_loss(s_scale * img.float() @ txt.float().t(),
                                                       t_scale * t_img.float() @ t_txt.float().t())
        if w.feature:
            total = total + w.feature * ((1 - (img * t_img).sum(-1)).mean() + (1 - (txt * t_txt).sum(-1)).mean()) / 2
        matching = MatchingDistill.of(w).matching
        if matching:
            p_t = torch.sigmoid(t_logits)
            total = total + matching * F.binary_cross_entropy_with_logits(logits, p_t) \
                - matching * F.binary_cross_entropy(p_t, p_t)  # KL(teacher || student) per pair
        return total

    def before_step(self, model, step: int, cfg) -> None:
        """The two-stage schedule: the image encoder frozen for the first `freeze_vision_steps` steps."""
        frozen = step < (cfg.freeze_vision_steps or 0)
        for p in model.vision_encoder.parameters():
            p.requires_grad_(not frozen)

    # --- export ---
    def graphs(self, model) -> list[Graph]:
        image, text, matcher = _modules(model.model)
        size = model.preprocess.image_size
        width = model.width
        tokens = {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
        return [Graph("image", GRAPH_FILES["image"], image, ("pixel_values",), ("patch_embeds", "image_embeds"),
                      {"pixel_values": {0: "batch"}, "patch_embeds": {0: "batch"}, "image_embeds": {0: "batch"}},
                      {"pixel_values": ["batch", 3, size, size]}),
                Graph("text", GRAPH_FILES["text"], text, ("input_ids", "attention_mask"), ("text_embeds",),
                      {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
                       "text_embeds": {0: "batch"}}, tokens),
                Graph("matcher", GRAPH_FILES["matcher"], matcher, ("patch_embeds", "input_ids", "attention_mask"),
                      ("match_logits",),
                      {"patch_embeds": {0: "images"}, "input_ids": {0: "batch", 1: "sequence"},
                       "attention_mask": {0: "batch", 1: "sequence"}, "match_logits": {0: "batch"}},
                      {"patch_embeds": ["images", model.patches, width], **tokens})]

    def parity_inputs(self, model, n: int, seed: int) -> dict[str, dict[str, Any]]:
        """Random pixels; random token ids with random padding; random patch embeddings (one per pair)."""
        tok = model.tokenizer
        pixels, tokens = random_feeds(model.preprocess.image_size, model.max_length, len(tok), n, seed,
                                      pad_id=tok.pad_token_id or 0, cls_id=tok.cls_token_id)
        width = model.width
        patches = np.random.default_rng(seed).standard_normal((n, model.patches, width)).astype(np.float32)
        return {"image": {"pixel_values": pixels}, "text": tokens, "matcher": {"patch_embeds": patches, **tokens}}

    def manifest_fields(self, model, reference, folder: Path) -> dict[str, Any]:
        return {"preprocess": asdict(model.preprocess), "max_length": model.max_length,
                "tokenizer": save_tokenizer(model.tokenizer, folder), "vocab_size": len(model.tokenizer),
                "source_architecture": model.architecture, "embedding_dim": int(model.model.config.image_text_hidden_size),
                "patches": model.patches, "vision_width": model.width,
                "max_candidates": MAX_CANDIDATES, "logit_scale": model.itc_scale}

    def export_references(self, model, questions: int | Budget = 100, progress: bool = False) -> dict[str, Any]:
        """PyTorch's side of the rerank parity: for `questions` held-out shapes images (a `Budget`: its most, one
        batched pass) ITC's top RERANK_K of a caption pool and PyTorch's match logits for them."""
        questions = upper(questions)
        ds = ShapesDataset(load_shapes("val", max(questions, 2 * RERANK_K), model.preprocess.image_size))
        captions = ds.captions(range(len(ds)), np.random.default_rng(3))
        ref = TorchMatcher(model)
        pixels = model.preprocess(ds.images(list(range(questions))))
        patches, img = ref.encode(pixels)
        top = np.argsort(-(img @ ref.encode_texts(captions).T), axis=1, kind="stable")[:, :RERANK_K]
        texts = [[captions[j] for j in row] for row in top]
        return {"pixels": pixels, "texts": texts,
                "logits": [ref.match(patches[q:q + 1], t) for q, t in enumerate(texts)]}

    def verify_export(self, reference, adapter, progress: bool = False) -> dict[str, Any]:
        """Rerank parity: the ONNX files' match logits for PyTorch's candidates (`export_references`) order them as
        PyTorch's do; at most one order may differ (a near tie can flip on the last bit). Records the largest
        match-logit difference."""
        patches, _ = adapter.encode(reference["pixels"])
        same, worst = 0, 0.0
        for q, (texts, a) in enumerate(zip(reference["texts"], reference["logits"])):
            b = adapter.match(patches[q:q + 1], texts)
            worst = max(worst, float(np.abs(a - b).max()))
            same += bool((np.argsort(-a, kind="stable") == np.argsort(-b, kind="stable")).all())
        n = len(reference["texts"])
        if same < n - 1:
            raise VlmedgeError(f"export: the ONNX matcher reranks {n - same} of {n} held-out queries "
                               f"differently from PyTorch (largest match-logit difference {worst:.2e})")
        return {"rerank_parity": {"queries": n, "k": RERANK_K, "identical_order": same,
                                  "max_abs_diff_logit": worst}}

    # --- runtime, evaluation, latency ---
    def adapter(self, path, **options):
        if not isinstance(path, (str, Path)):
            return TorchMatcher(path)
        if (Path(path) / "manifest.json").is_file():
            return OnnxMatcher(path, **options)
        return TorchMatcher(self.load(path))

    def sanity_check(self, adapter) -> None:
        where = adapter.where
        captions = ["a red circle", "a blue square on the left", "two green triangles", "a small yellow cross"]
        if np.ptp(adapter.encode_texts(captions), axis=0).max() < 1e-6:
            raise VlmedgeError(f"{where}: the text encoder gives every caption the same embedding; check the "
                               "tokenizer and config.json's pad token")
        size = adapter.preprocess.image_size
        images = np.random.default_rng(0).integers(0, 256, size=(4, size, size, 3), dtype=np.uint8)
        patches, emb = adapter.encode(adapter.preprocess(images))
        if np.ptp(emb, axis=0).max() < 1e-6:
            raise VlmedgeError(f"{where}: the image encoder gives every image the same embedding; check the vision "
                               "weights and preprocessor_config.json")

    def evaluate(self, adapter, eval_cfg, progress: bool = False) -> dict[str, Any]:
        self.sanity_check(adapter)
        return evaluate(adapter, eval_cfg, MatchingEval.of(eval_cfg).rerank_k, progress)

    def calibration_feeds(self, adapter, data, batches, batch_size, seed):
        """Real preprocessed feeds per graph; the matcher's patch embeddings come from the fp32 image encoder."""
        ds = open_dataset(data, "val", resolution=adapter.preprocess.image_size, count=batches * batch_size,
                          seed=seed)
        rng = np.random.default_rng(seed)
        out: dict[str, list] = {"image": [], "text": [], "matcher": []}
        for b in range(batches):
            idx = list(range(b * batch_size, min((b + 1) * batch_size, len(ds))))
            if not idx:
                break
            pixels = adapter.preprocess(ds.images(idx))
            tok = adapter.tokenize(ds.captions(idx, rng))
            out["image"].append({"pixel_values": pixels})
            out["text"].append(tok)
            out["matcher"].append({"patch_embeds": adapter.encode(pixels)[0], **tok})
        return out

    def latency_inputs(self, adapter, batch: int, seed: int = 0):
        """One held-out shapes image, its RERANK_K candidate captions (ITC's top of the val captions), a text query
        and a gallery of GALLERY images' cached patch and ITC embeddings, all made by `adapter` as a device would."""
        data = load_shapes("val", GALLERY, adapter.preprocess.image_size, seed=seed)
        captions = data.captions(range(GALLERY), np.random.default_rng(seed))
        patches, emb = encode_all(adapter, data.images)
        pixels = adapter.preprocess(data.images[:1])
        candidates = [captions[j] for j in np.argsort(-(emb[0] @ adapter.encode_texts(captions).T))[:RERANK_K]]
        return {"pixels": pixels, "candidates": adapter.tokenize(candidates), "query": adapter.tokenize(captions[:1]),
                "gallery_patches": patches, "gallery_embeds": emb}

    def torch_scenarios(self, model, inputs, device: str, dtype):
        import torch

        net = model.model.to(device=device, dtype=dtype).eval()
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        px = t(inputs["pixels"]).to(dtype)
        cand, query = {k: t(v) for k, v in inputs["candidates"].items()}, {k: t(v) for k, v in inputs["query"].items()}
        g_patches, g_emb = t(inputs["gallery_patches"]).to(dtype), t(inputs["gallery_embeds"]).to(dtype)
        with torch.inference_mode():
            one = encode_image(net, px)[0]

        def image():
            with torch.inference_mode():
                return encode_image(net, px)

        def rerank():
            with torch.inference_mode():
                return match_logits(net, one, cand["input_ids"], cand["attention_mask"])

        def query_fn():
            with torch.inference_mode():
                q = encode_text(net, query["input_ids"], query["attention_mask"])
                top = torch.topk((g_emb @ q[0]), RERANK_K).indices
                k = len(top)
                return match_logits(net, g_patches[top], query["input_ids"].expand(k, -1),
                                    query["attention_mask"].expand(k, -1))

        return {"image": image, "rerank": rerank, "query": query_fn}

    def onnx_latency(self, folder, cfg, providers):
        """The same scenarios on the export's three sessions."""
        import onnxruntime as ort

        adapter = OnnxMatcher(folder, threads=cfg.threads, providers=providers)
        inputs = self.latency_inputs(adapter, 1)
        s = adapter.sessions
        one = s["image"].run(None, {"pixel_values": inputs["pixels"]})[0]
        cand, query = inputs["candidates"], inputs["query"]
        g_patches, g_emb = inputs["gallery_patches"], inputs["gallery_embeds"]

        def query_fn():
            q = s["text"].run(None, query)[0][0]
            top = np.argpartition(-(g_emb @ q), RERANK_K)[:RERANK_K]
            k = len(top)
            return s["matcher"].run(None, {"patch_embeds": g_patches[top],
                                           **{n: np.repeat(v, k, axis=0) for n, v in query.items()}})

        scenarios = {"image": lambda: s["image"].run(None, {"pixel_values": inputs["pixels"]}),
                     "rerank": lambda: s["matcher"].run(None, {"patch_embeds": one, **cand}),
                     "query": query_fn}
        record = {"runtime": f"onnxruntime {ort.__version__}", "providers": s["matcher"].get_providers(),
                  "precision": adapter.manifest.get("precision", "fp32"), **thread_record(adapter.threads),
                  "thread_tuning": adapter.manifest.get("threads")}
        return self.time_scenarios(scenarios, cfg, record)


register(Matching())
