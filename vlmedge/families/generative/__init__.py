"""The generative VLM family: SmolVLM's architecture (image tokens into a Llama decoder that writes the answer),
trained with the NLL of the answer tokens, evaluated by VQA accuracy and captioning metrics, exported as the three
graphs edge runtimes load (vision encoder, token embedding, decoder with its KV cache) and timed per phase
(vision encode, time to first token, decode per token, whole answer).

Compression runs through the same stages as the other families: pruning of both parts (`prunable`: the vision
encoder and the grouped-query Llama decoder), token-level distillation (`training_loss` with a teacher), and
quantization per graph (`calibration_feeds`, `output_agreement`: greedy answers against the fp32 export's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..._progress import Budget, Progress, paced, upper
from ...disk import write_json
from ...errors import VlmedgeError
from ...models import load_tokenizer
from ...models.structure import TOWERS, tower_layers
from ...options import Options
from ...preprocess import SPLITTING, Preprocess
from ...runtime.generate import (FILES, FRAMES_PER_RUN, GENERATION_KEYS, LOGITS_TO_KEEP, GraphMismatch,
                                 GreedyDecoder, past_names, vision_feeds)
from ...runtime.measure import thread_record, tuned_threads
from ...runtime.onnx import MANIFEST, open_session, read_manifest
from .. import Family, Graph, register
from ..onnx_export import save_tokenizer
from . import fused
from .data import open_vqa
from .model import (ARCHITECTURES, CHAT_TEMPLATE, SPECIAL, answer_ids, build, decode, decode_answer, empty_past,
                    kv_shape, layer_modules, load, make_batch, merge, prompt_ids, train_tokenizer, vision_encode,
                    vision_features, vision_flops)
from .tasks import evaluate_generator

ANSWER_TOKENS = 16
"""Tokens in the latency scenarios' whole answer (EOS ignored, so every artifact writes the same count)."""
LATENCY_IMAGE = (1024, 768)
"""The latency scenarios' image (width, height): a camera frame, which SmolVLM's processor splits into tiles."""
VQA_SECONDS = 300.0
"""The time an unset `vqa_questions` may take per evaluated step."""


def _check_splitting(section: str, value: str) -> None:
    if value not in SPLITTING:
        raise VlmedgeError(f"{section}: image_splitting={value!r}; expected one of {', '.join(SPLITTING)}")


@dataclass(frozen=True)
class GenerativeEval(Options):
    """A generative model's evaluation settings (keys of a recipe's `eval` section, flags of `vlmedge eval`)."""

    vqa_questions: int | None = None
    """Questions to answer (every type in turn: VQA accuracy per type, captions for 'describe').
    None: up to 800, as many as fit in VQA_SECONDS at the pace of the first ten (a tiny model answers 800 in
    seconds; a SmolVLM-256M, at the 2.6 s an answer measured on 2 cores, about 115), said in the log; a recipe's
    later steps answer the questions its first model answered."""
    max_new_tokens: int = 24
    """Longest answer the model may write (greedy decoding)."""
    image_splitting: str = "as-folder"
    """Split each image into tiles (on: SmolVLM's processor), one global image (off), or as the model's
    preprocessor_config.json says (as-folder)."""

    def __post_init__(self):
        _check_splitting("eval", self.image_splitting)
        for key in ("vqa_questions", "max_new_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise VlmedgeError(f"eval: {key}={getattr(self, key)}; expected an integer >= 1")

    def questions(self) -> int | Budget:
        """`vqa_questions`, or when unset the time budget that chooses it."""
        return self.vqa_questions or Budget(VQA_SECONDS, most=800, least=10, hint="vqa_questions (--vqa-questions)")

    def pinned(self, metrics: dict[str, Any]) -> "GenerativeEval":
        """An unset `vqa_questions` fixed to the count an evaluation answered (`questions` in its metrics)."""
        if self.vqa_questions is None and "questions" in metrics:
            return replace(self, vqa_questions=int(metrics["questions"]))
        return self


@dataclass(frozen=True)
class GenerativeMeasure(Options):
    """A generative model's latency settings (keys of a recipe's `measure` section); the adapter's options."""

    image_splitting: str = "as-folder"
    """Split the latency image into tiles (on), time one global image (off), or as the folder says (as-folder)."""

    def __post_init__(self):
        _check_splitting("measure", self.image_splitting)


@dataclass(frozen=True)
class GenerativeDistill(Options):
    """A generative student's own distillation loss (keys of a recipe's `distill` stage)."""

    tokens: float = 1.0
    """Token-level KL between the teacher's and the student's next-token distributions on the answer tokens
    (softened by `temperature`, scaled by its square)."""
    temperature: float = 2.0
    """The token-level KL's softmax temperature."""

    WEIGHTS = ("tokens",)

    def __post_init__(self):
        if self.tokens < 0:
            raise VlmedgeError(f"distill: tokens={self.tokens} must be >= 0")
        if not self.temperature > 0:
            raise VlmedgeError(f"distill: temperature={self.temperature} must be > 0")


class _Answers:
    """What both generators share: an image and a question as the model reads them (`inputs`: the image's frames,
    tiles first when it is split, and the prompt with a placeholder per image token), and greedy answers. Each sets
    `preprocess` (SmolVLM's processing, splitting as the folder says unless `image_splitting` overrides it)."""

    preprocess: Any
    where: str

    def with_splitting(self, setting: str):
        """This generator with image splitting `on`, `off` or `as-folder` (its sessions shared)."""
        import copy

        other = copy.copy(self)
        other._split(setting)
        return other

    def _split(self, setting: str) -> None:
        """`preprocess` with splitting as `setting` says; a one-line error naming the model where it cannot split."""
        try:
            self.preprocess = self.preprocess.with_splitting(setting)
        except ValueError as e:
            raise VlmedgeError(f"{self.where}: {e}") from None

    def inputs(self, image, question: str) -> tuple[np.ndarray, list[int]]:
        """One image (uint8 HWC or PIL) and a question -> (frames (N, 3, H, W), prompt ids)."""
        frames = self.preprocess.frames(image)
        return frames.pixel_values, self.prompt_ids(question, frames.rows, frames.cols)

    def answer(self, image, question: str, max_new_tokens: int) -> str:
        frames, prompt = self.inputs(image, question)
        return decode_answer(self.tokenizer, self.generate_ids(frames, prompt, max_new_tokens), self.eos_id)


class TorchGenerator(_Answers):
    """A PyTorch `GenerativeVLM` as a `Generator`: Hugging Face `generate` (greedy, with its KV cache; a split
    image's frames and `pixel_attention_mask` as transformers' processor gives them)."""

    def __init__(self, vlm, image_splitting: str = "as-folder"):
        self.vlm, self.tokenizer, self.eos_id, self.where = vlm, vlm.tokenizer, vlm.eos_id, vlm.source
        self.preprocess = vlm.preprocess
        self._split(image_splitting)

    def prompt_ids(self, question: str, rows: int = 0, cols: int = 0) -> list[int]:
        return self.vlm.prompt_ids(question, rows, cols)

    def generate_ids(self, frames: np.ndarray, prompt: list[int], max_new_tokens: int) -> list[int]:
        import torch

        ids = torch.tensor([prompt])
        pixels = torch.from_numpy(frames)[None]
        max_new_tokens = max(1, min(max_new_tokens, self.vlm.max_length - len(prompt)))  # the ONNX loop's bound
        with torch.inference_mode():
            out = self.vlm.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                          pixel_attention_mask=torch.ones(pixels.shape[:2] + pixels.shape[3:],
                                                                          dtype=torch.bool),
                                          max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=self.vlm.eos_id, pad_token_id=self.vlm.tokenizer.pad_token_id)
        return out[0, len(prompt):].tolist()


class OnnxGenerator(_Answers):
    """An export folder as a `Generator` (the runtime's greedy loop, with the folder's tokenizer). Threads per graph:
    `threads`, else the count tuned on this CPU (manifest), else ONNX Runtime's default."""

    def __init__(self, folder, threads: int | None = None, providers=None, open_sessions: bool = True,
                 image_splitting: str = "as-folder", profile=None, **_):
        self.folder = Path(folder)
        self.where = str(self.folder)
        self.manifest = m = read_manifest(self.folder, tuple(FILES))
        gen = m.get("generation")
        if not isinstance(gen, dict) or not all(type(gen.get(k)) is int for k in GENERATION_KEYS):
            raise VlmedgeError(f"{self.folder / MANIFEST}: generation must hold the integers "
                               f"{', '.join(GENERATION_KEYS)}")
        self.preprocess = Preprocess(**m["preprocess"])
        self._split(image_splitting)
        self.tokenizer = load_tokenizer(self.folder)
        self.eos_id = int(gen["eos_token_id"])
        self.threads = {k: threads or tuned_threads(m, k) for k in FILES}
        self.sessions = {}
        if open_sessions:
            self.sessions = {k: open_session(self.folder / m["files"][k], self.threads[k],
                                             providers or ["CPUExecutionProvider"],
                                             f"{profile}-{k}" if profile else None) for k in FILES}
            try:
                self.runtime = GreedyDecoder(self.sessions, m)
            except GraphMismatch as e:
                old = e.graph == "vision" and "pixel_attention_mask" in e.why  # vlmedge < 0.3: one image per row
                hint = " (an export of vlmedge < 0.3, whose vision graph takes no frames: export the model again)" \
                    if old else ""
                raise VlmedgeError(f"{self.folder / m['files'][e.graph]}: not this export's {e.graph} graph: it "
                                   f"{e.why}{hint}") from None

    def prompt_ids(self, question: str, rows: int = 0, cols: int = 0) -> list[int]:
        return prompt_ids(self.tokenizer, question, int(self.manifest["generation"]["image_tokens"]),
                          int(self.manifest["max_length"]), str(self.folder), rows, cols)

    def generate_ids(self, frames, prompt, max_new_tokens) -> list[int]:
        try:
            return self.runtime.generate(frames, prompt, max_new_tokens)
        except ValueError as e:  # the prompt's image-token count (the manifest's) against the vision graph's output
            raise VlmedgeError(f"{self.folder / MANIFEST}: generation.image_tokens does not fit "
                               f"{self.manifest['files']['vision']} ({e})") from None


PROCESSOR = "SmolVLMProcessor"


def _model_files(model, folder: Path) -> list[str]:
    """The files beside `onnx/` that make the export a model folder transformers.js loads as written (the
    onnx-community layout): config.json with the exported decoder's shape (a pruned model's layers and heads),
    generation_config.json, the image processor and processor configs naming SmolVLM's processor, and the chat
    template in tokenizer_config.json (where every reader finds it; the tokenizer is saved first). Returns their
    names."""
    import json

    layers, kv, head_dim = kv_shape(model.model)
    first = model.model.model.text_model.layers[0].self_attn
    config = model.model.config.to_dict()
    config.pop("vlmedge_pruning", None)  # the export's shape is written out below
    config["text_config"].update(num_hidden_layers=layers, num_key_value_heads=kv, head_dim=head_dim,
                                 num_attention_heads=first.q_proj.out_features // head_dim)
    write_json(folder / "config.json", config)
    model.model.generation_config.to_json_file(folder / "generation_config.json")
    write_json(folder / "preprocessor_config.json", {**model.preprocess.to_hf(), "processor_class": PROCESSOR})
    write_json(folder / "processor_config.json", {"image_seq_len": model.image_tokens, "processor_class": PROCESSOR})
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(chat_template=getattr(model.tokenizer, "chat_template", None) or CHAT_TEMPLATE,
                      processor_class=PROCESSOR)
    write_json(folder / "tokenizer_config.json", tok_config)
    return ["config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
            "tokenizer_config.json"]


def _modules(model):
    import torch

    layers = len(model.model.text_model.layers)

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values, pixel_attention_mask):
            """(B, N, 3, H, W) frames -> (B*N, image tokens, hidden). Padding frames (the mask's zeros) are zeroed,
            not dropped: a batch of images with different frame counts gives features for its padding too."""
            mask = pixel_attention_mask[:, :, None].to(pixel_values.dtype)
            return vision_features(self.model, (pixel_values * mask).flatten(0, 1))

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.model.text_model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed(input_ids)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.layers = layer_modules(model)  # nodes named /layers.N/...: quantization's layer groups

        def forward(self, inputs_embeds, attention_mask, position_ids, *past_and_keep):
            *past, keep = past_and_keep
            logits, presents = decode(self.model, inputs_embeds, attention_mask, position_ids,
                                      [(past[2 * i], past[2 * i + 1]) for i in range(layers)], self.layers, keep)
            return (logits, *[t for kv in presents for t in kv])

    return Vision().eval(), Embed().eval(), Decoder().eval()


def _forward(net, pixels, ids, mask):
    """Teacher-forced logits (B, S, vocab) of image + prompt + answer, and the image features the decoder reads. A
    vision tower frozen by the two-stage schedule keeps no graph."""
    import torch

    frozen = not any(p.requires_grad for p in net.model.vision_model.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
        encoded = vision_encode(net, pixels)
    feats = net.model.connector(encoded)
    embeds = merge(net, ids, feats)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, _ = decode(net, embeds, mask, positions, empty_past(net, len(ids), embeds.dtype))
    return logits, feats


SPLIT_QUESTIONS = 1
"""Questions of a parity or agreement check whose image is split into tiles when the model splits (the rest are
one global image each): a split shapes image is 17 frames and a 1,100-token prefill, measured at SmolVLM-256M's
full size on 2 cores at about half a minute for PyTorch (SDPA) and ONNX Runtime (four frames a run) together."""


def _reference_answers(a, questions: int | Budget, label: str = "answers", progress: bool = False
                       ) -> dict[str, Any]:
    """Greedy answers (24 tokens at most) of generator `a` on held-out shapes questions (images rendered at most
    64 px, processed as `a` processes them: resized; the first SPLIT_QUESTIONS split when it splits), the reference a
    second generator's answers are compared with (`_compare_answers`). `questions`: a count, or a `Budget` of time
    for both passes (the split questions come on top): this first pass takes half of it. Answering one generator
    after the other, not side by side, lets the first be freed before the second opens (export: the PyTorch model
    before the ONNX Runtime sessions)."""
    ds = open_vqa(f"shapes:{max(upper(questions), 16)}", "val", resolution=min(a.preprocess.image_size, 64))
    items = ds.eval_items(upper(questions))
    split = SPLIT_QUESTIONS if a.preprocess.splitting else 0
    whole = a.with_splitting("off")
    pace = replace(questions, seconds=questions.seconds / 2) if isinstance(questions, Budget) else questions
    answers = []
    with Progress(label, len(items), enabled=progress, unit="questions") as bar:
        for k, it in paced(items, pace, bar, timed_from=split):
            g = a if k < split else whole
            frames, prompt = g.inputs(ds.images([it.index])[0], it.question)
            if k < split:  # minutes at SmolVLM-256M's size: say so before it starts
                bar.say(f"{label}: question {k + 1}, its image split into {len(frames)} frames "
                        f"({len(prompt)} prompt tokens)")
            answers.append((it, k < split, g.generate_ids(frames, prompt, 24)))
            bar.update(k + 1)
    return {"data": ds, "answers": answers,
            **({"budget_s": questions.seconds} if isinstance(questions, Budget) else {})}


def _compare_answers(reference: dict[str, Any], b, label: str = "answers", progress: bool = False
                     ) -> dict[str, Any]:
    """Generator `b`'s greedy answers to the questions of `reference` (`_reference_answers`), each image processed
    as the reference processed it: how many are token-identical, and the first that is not."""
    ds, answers = reference["data"], reference["answers"]
    same, first_diff = 0, None
    whole = b.with_splitting("off")
    with Progress(label, len(answers), enabled=progress, unit="questions") as bar:
        for k, (it, split, want) in enumerate(answers):
            g = b if split else whole
            got = g.generate_ids(*g.inputs(ds.images([it.index])[0], it.question), 24)
            same += got == want
            if got != want and first_diff is None:
                first_diff = {"question": it.question, "reference": decode_answer(g.tokenizer, want, g.eos_id),
                              "other": decode_answer(g.tokenizer, got, g.eos_id)}
            bar.update(k + 1)
    return {"questions": len(answers), "identical": same, "first_difference": first_diff,
            "split_questions": sum(split for _, split, _ in answers),
            **({"budget_s": reference["budget_s"]} if "budget_s" in reference else {})}


class Generative(Family):
    name = "generative"
    architectures = ARCHITECTURES
    layouts = {"onnx-community": FILES}
    report_metrics = ("vqa.accuracy", "vqa.held_out", "caption.cider")
    options = {"eval": GenerativeEval, "measure": GenerativeMeasure, "distill": GenerativeDistill}
    int4_graphs = ("embed", "decoder")
    headline_scenario = "answer"
    report_latency = ("vision", "prefill", "ttft", "decode")
    latency_record = {"answer_tokens": ANSWER_TOKENS}
    scenarios_help = (f"on a {LATENCY_IMAGE[0]}x{LATENCY_IMAGE[1]} image (split into tiles as --image-splitting "
                      "says): vision encode, the decoder's prefill, time to first token (ttft), one decode step with "
                      f"the KV cache (decode), a whole {ANSWER_TOKENS}-token answer (answer), tokens/s and peak RSS")
    graph_towers = {"vision": "vision", "embed": "text", "decoder": "text"}
    prunable_parts = ("vision_heads", "vision_mlp", "vision_layers", "text_heads", "text_mlp", "text_layers")

    # --- models ---
    def build(self, spec, tokenizer, *, seed=0, source="", vision_init=None):
        return build(spec, tokenizer, seed=seed, source=source, vision_init=vision_init)

    def tokenizer(self, spec, ds, rng):
        sample = rng.integers(len(ds), size=min(len(ds) * 4, 40000))
        pairs, _ = ds.training_captions(sample, rng)
        return train_tokenizer([t for qa in pairs for t in qa])

    def open_data(self, source, split, **kw):
        return open_vqa(source, split, **kw)

    def load(self, path, *, attn_implementation="sdpa"):
        return load(path, attn_implementation=attn_implementation)

    def flops(self, model) -> dict[str, int]:
        """Multiply-adds x 2 of the matmuls per sample: the vision encoder over its patches with the connector
        (`model.vision_flops`), the decoder over one image prompt (the image tokens and 16 text tokens)."""
        t = model.model.config.text_config
        vision = sum(vision_flops(model.model.model.vision_model, t.hidden_size).values())
        prompt = model.image_tokens + 16
        decoder_params = sum(p.numel() for n, p in model.model.model.text_model.layers.named_parameters()
                             if p.dim() == 2)
        decoder = 2 * prompt * (decoder_params + t.hidden_size * t.vocab_size) \
            + 4 * prompt * prompt * t.hidden_size * t.num_hidden_layers
        return {"vision": int(vision), "decoder": int(decoder)}

    # --- pruning ---
    def prunable(self, model):
        """Both parts: the vision encoder (heads, MLP neurons, layers) and the Llama decoder (layers, grouped-query
        head groups, gated MLP neurons), as the `vision` and `text` towers of a pruning plan. Pruning keeps the
        widths, so the connector (vision width x scale² -> decoder width) is unchanged."""
        return {t: tower_layers(model.model, t) for t in TOWERS}

    # --- training ---
    def training_loss(self, model, batch, teacher=None, weights=None):
        """The answer tokens' NLL; with a frozen `teacher` (same tokenizer) the distillation objective: that NLL
        (`contrastive` weight: the student's own loss), token-level KL to the teacher's next-token distributions on
        the answer tokens (`tokens`, at `temperature`) and 1 - cosine of the image features the decoder reads
        (`feature`, when both feed the same decoder width)."""
        import torch
        import torch.nn.functional as F

        b = batch
        rows = b.indices[b.local]
        pixels = torch.from_numpy(model.preprocess(b.data.images(rows))).to(b.device)
        ids, mask, labels = (torch.from_numpy(a).to(b.device) for a in make_batch(model, b.captions[b.local]))
        with b.autocast():
            logits, feats = _forward(model.model, pixels, ids, mask)
        logits, target = logits[:, :-1].float(), labels[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        if teacher is None:
            return nll
        if teacher.tokenizer.get_vocab() != model.tokenizer.get_vocab():
            raise VlmedgeError(f"distill: the teacher ({teacher.source}) and the student ({model.source}) have "
                               "different tokenizers; token-level distillation needs one vocabulary")
        with torch.no_grad(), b.autocast():
            t_logits, t_feats = _forward(teacher.model, pixels.to(teacher.model.dtype), ids, mask)
        answer = target != -100
        w, own = weights, GenerativeDistill.of(weights)
        temp = own.temperature
        parts = {"nll": nll}
        if own.tokens:
            s_log = F.log_softmax(logits[answer] / temp, -1)
            t_log = F.log_softmax(t_logits[:, :-1].float()[answer] / temp, -1)
            parts["tokens"] = F.kl_div(s_log, t_log, log_target=True, reduction="batchmean") * temp ** 2
        if w.feature and feats.shape == t_feats.shape:
            parts["feature"] = (1 - F.cosine_similarity(feats.float(), t_feats.float(), dim=-1)).mean()
        scale = {"nll": w.contrastive, "tokens": own.tokens, "feature": w.feature}
        return sum(scale[k] * v for k, v in parts.items())

    def before_step(self, model, step: int, cfg) -> None:
        """The two-stage schedule: the vision tower frozen for the first `freeze_vision_steps` steps."""
        frozen = step < (cfg.freeze_vision_steps or 0)
        for p in model.model.model.vision_model.parameters():
            p.requires_grad_(not frozen)

    # --- export ---
    def graphs(self, model) -> list[Graph]:
        """The three graphs with onnx-community's axis names (batch_size, num_images, sequence_length,
        past_sequence_length, total_sequence_length); the decoder written as GroupQueryAttention layers
        (`fused.write`) where its rotary embedding allows."""
        vision, embed, decoder = _modules(model.model)
        layers, _, _ = kv_shape(model.model)
        size = model.preprocess.image_size
        past = past_names(layers)
        present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        b, seq, total = "batch_size", "sequence_length", "total_sequence_length"
        dynamic = {"inputs_embeds": {0: b, 1: seq}, "attention_mask": {0: b, 1: total},
                   "position_ids": {0: b, 1: seq}, "logits": {0: b, 1: "logits_sequence_length"},
                   **{p: {0: b, 2: "past_sequence_length"} for p in past}, **{p: {0: b, 2: total} for p in present}}
        images = {0: b, 1: "num_images"}
        inputs = ("inputs_embeds", "attention_mask", "position_ids", *past, LOGITS_TO_KEEP)
        outputs = ("logits", *present)
        return [Graph("vision", FILES["vision"], vision, ("pixel_values", "pixel_attention_mask"), ("image_features",),
                      {"pixel_values": images, "pixel_attention_mask": images, "image_features": {0: "frames"}},
                      {"pixel_values": [b, "num_images", 3, size, size],
                       "pixel_attention_mask": [b, "num_images", size, size]}),
                Graph("embed", FILES["embed"], embed, ("input_ids",), ("inputs_embeds",),
                      {"input_ids": {0: b, 1: seq}, "inputs_embeds": {0: b, 1: seq}}, {"input_ids": [b, seq]}),
                Graph("decoder", FILES["decoder"], decoder, inputs, outputs, dynamic,
                      {"inputs_embeds": [b, seq, model.model.config.text_config.hidden_size],
                       "attention_mask": [b, total], "position_ids": [b, seq]},
                      defaults={LOGITS_TO_KEEP: np.zeros(1, dtype=np.int64)},
                      write=(lambda path, opset: fused.write(model.model, path, opset, inputs, outputs))
                      if fused.supported(model.model) else None)]

    def parity_inputs(self, model, n: int, seed: int) -> dict[str, dict[str, Any]]:
        """Random pixels (two frames per image) and token ids; for the decoder a decode step, a random embedding
        after a random cache of 5 positions (GroupQueryAttention takes a batch of more than one row only there, or
        with an empty cache; a prefill is checked end to end by `verify_export`'s answers)."""
        rng = np.random.default_rng(seed)
        cfg = model.model.config.text_config
        layers, kv, head_dim = kv_shape(model.model)
        size, s, p = model.preprocess.image_size, 1, 5
        dec = {"inputs_embeds": rng.standard_normal((n, s, cfg.hidden_size)).astype(np.float32) * 0.05,
               "attention_mask": np.ones((n, p + s), dtype=np.int64),
               "position_ids": np.tile(np.arange(p, p + s, dtype=np.int64), (n, 1))}
        for i in range(layers):
            for name in ("key", "value"):
                dec[f"past_key_values.{i}.{name}"] = rng.standard_normal((n, kv, p, head_dim)).astype(np.float32)
        dec[LOGITS_TO_KEEP] = np.zeros(1, dtype=np.int64)  # every position's logits are compared
        return {"vision": {"pixel_values": rng.uniform(-1, 1, (n, 2, 3, size, size)).astype(np.float32),
                           "pixel_attention_mask": np.ones((n, 2, size, size), dtype=bool)},
                "embed": {"input_ids": rng.integers(0, cfg.vocab_size, (n, 12)).astype(np.int64)},  # pad included
                "decoder": dec}

    def manifest_fields(self, model, reference, folder: Path) -> dict[str, Any]:
        layers, kv, head_dim = kv_shape(model.model)
        tok = model.tokenizer
        tokenizer = save_tokenizer(tok, folder)
        return {"preprocess": asdict(model.preprocess), "max_length": model.max_length,
                "tokenizer": tokenizer, "vocab_size": len(tok),
                "source_architecture": model.architecture,
                "chat_template": getattr(tok, "chat_template", None),
                "generation": {"image_token_id": model.image_token_id, "image_tokens": model.image_tokens,
                               "eos_token_id": model.eos_id, "pad_token_id": tok.pad_token_id,
                               "special_tokens": {k: int(tok.convert_tokens_to_ids(v)) for k, v in SPECIAL.items()},
                               "decoding": "greedy", "layers": layers, "kv_heads": kv, "head_dim": head_dim,
                               "hidden_size": model.model.config.text_config.hidden_size}}

    def model_files(self, model, folder, layout):
        return _model_files(model, folder)

    def export_references(self, model, questions: int | Budget = 100, progress: bool = False) -> dict[str, Any]:
        """PyTorch `generate`'s greedy answers to held-out shapes questions, with SDPA attention (the traced graphs'
        eager attention computes the same, in a fraction of the memory on a split image's frames)."""
        model.model.set_attn_implementation("sdpa")
        return _reference_answers(TorchGenerator(model), questions, "export: generation parity (PyTorch)", progress)

    def verify_export(self, reference, adapter, progress: bool = False) -> dict[str, Any]:
        """Greedy answers of the ONNX files against PyTorch's (`export_references`): at most one may differ (a tie
        between two logits can flip on the last bit)."""
        record = _compare_answers(reference, adapter, "export: generation parity (ONNX Runtime)", progress)
        if record["identical"] < record["questions"] - 1:
            raise VlmedgeError(f"export: greedy answers from the ONNX files differ from PyTorch generate on "
                               f"{record['questions'] - record['identical']} of {record['questions']} questions "
                               f"(e.g. {record['first_difference']})")
        return {"generation_parity": record}

    def agreement_reference(self, reference, inputs: int | Budget, progress: bool = False) -> Any:
        """The fp32 export's greedy answers to held-out questions (`_reference_answers`)."""
        return _reference_answers(reference, inputs, "quantize: answer agreement (fp32)", progress) if inputs else None

    def output_agreement(self, expected, adapter, progress: bool = False) -> dict[str, Any]:
        """The fraction of held-out questions whose greedy answer (token ids) the quantized export writes exactly
        as the fp32 export did (`agreement_reference`)."""
        if expected is None:
            return {}
        record = _compare_answers(expected, adapter, "quantize: answer agreement", progress)
        return {"answer_agreement": {**record, "fraction": record["identical"] / record["questions"]}}

    # --- runtime, evaluation, latency ---
    def adapter(self, path, image_splitting: str = "as-folder", **options):
        if not isinstance(path, (str, Path)):
            return TorchGenerator(path, image_splitting)
        if (Path(path) / "manifest.json").is_file():
            return OnnxGenerator(path, image_splitting=image_splitting, **options)
        return TorchGenerator(self.load(path), image_splitting)

    def sanity_check(self, adapter) -> None:
        where = adapter.where
        size = adapter.preprocess.image_size
        images = np.random.default_rng(0).integers(0, 256, size=(2, size, size, 3), dtype=np.uint8)
        pixels = adapter.preprocess(images)
        feats = [self._features(adapter, pixels[i:i + 1]) for i in range(2)]
        if np.abs(feats[0] - feats[1]).max() < 1e-6:
            raise VlmedgeError(f"{where}: the vision encoder gives every image the same features; check the vision "
                               "weights and preprocessor_config.json")

    @staticmethod
    def _features(adapter, pixels):
        if isinstance(adapter, OnnxGenerator):
            return adapter.runtime.image_features(pixels)
        import torch

        with torch.inference_mode():
            return vision_features(adapter.vlm.model, torch.from_numpy(pixels)).numpy()

    def evaluate(self, adapter, eval_cfg, progress: bool = False) -> dict[str, Any]:
        self.sanity_check(adapter)
        own = GenerativeEval.of(eval_cfg)
        adapter = adapter.with_splitting(own.image_splitting)
        questions = own.questions()
        ds = open_vqa(eval_cfg.data, "val", resolution=adapter.preprocess.image_size, count=upper(questions),
                      seed=eval_cfg.seed)
        items = ds.eval_items(upper(questions), eval_cfg.seed)
        return {**evaluate_generator(adapter, ds, items, own.max_new_tokens, progress, questions),
                "data": {"measured": ds.measured}}

    def calibration_feeds(self, adapter, data, batches, batch_size, seed):
        """Real feeds per graph from training questions of `data` (the fp32 export computes what each graph
        reads): vision, `batch_size` images per batch as the frames of one; embed, one prompt + answer per batch
        (its image one global frame: a split image's 13-17 frames would make every decoder feed a 1,000-token
        prefill, minutes per quantization at SmolVLM-256M's size); decoder, per question a
        prefill of the image, prompt and answer but its last two tokens (empty cache) and a step over those two
        with the prefill's cache (the two shapes the runtime calls)."""
        ds = open_vqa(data, "train", resolution=adapter.preprocess.image_size, count=max(batches * batch_size, 16),
                      seed=seed)
        rng = np.random.default_rng(seed)
        rt, whole = adapter.runtime, adapter.with_splitting("off")
        out: dict[str, list] = {"vision": [], "embed": [], "decoder": []}
        for b in range(batches):
            idx = rng.integers(len(ds), size=batch_size).tolist()
            pixels = adapter.preprocess(ds.images(idx))
            out["vision"] += [vision_feeds(pixels[i:i + FRAMES_PER_RUN])
                              for i in range(0, len(pixels), FRAMES_PER_RUN)]
            (question, answer), = ds.training_captions(idx[:1], rng)[0]
            frames, prompt = whole.inputs(ds.images(idx[:1])[0], question)
            ids = prompt + answer_ids(adapter.tokenizer, answer, rt.eos_id)
            out["embed"].append({"input_ids": np.asarray([ids], dtype=np.int64)})
            embeds = rt.prefill_embeds(rt.image_features(frames), ids)
            split = len(ids) - 2
            prefill = rt.feeds(embeds[:, :split], None, 0)
            out["decoder"].append(prefill)
            presents = rt.decoder.run(rt.present_names, prefill)
            out["decoder"].append(rt.feeds(embeds[:, split:], presents, split))
        return out

    def latency_inputs(self, adapter, batch: int, seed: int = 0):
        """A held-out shapes scene at LATENCY_IMAGE (a camera frame's size: split into tiles when the adapter
        splits) and a question, processed and tokenised as in deployment: (frames, prompt ids)."""
        from PIL import Image

        ds = open_vqa("shapes:16", "val", resolution=64, seed=seed)
        item = ds.eval_items(1, seed)[0]
        image = Image.fromarray(ds.images([item.index])[0]).resize(LATENCY_IMAGE, Image.BICUBIC)
        return adapter.inputs(image, item.question)

    def torch_scenarios(self, model, inputs, device: str, dtype):
        """Hugging Face's own path (`generate`, its DynamicCache), batch 1: vision (encode one image), prefill (the
        decoder over the image features and prompt -> the first token's logits, as `generate` runs it: a fresh cache,
        the last position's logits only), ttft (image + prompt -> first token), decode (one cached step at the
        prompt's length; the cache is cropped back after each call) and answer (a whole greedy answer of
        ANSWER_TOKENS tokens, EOS ignored)."""
        import torch
        from transformers import DynamicCache

        frames, prompt = inputs
        net = model.model.to(device=device, dtype=dtype).eval()
        px = torch.from_numpy(frames).to(device=device, dtype=dtype)
        ids = torch.tensor([prompt], device=device)
        pad = model.tokenizer.pad_token_id

        def gen(n):
            with torch.inference_mode():
                return net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=px[None],
                                    max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

        with torch.inference_mode():
            cache = DynamicCache(config=net.config.text_config)
            first = net(input_ids=ids, pixel_values=px[None], cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        step_mask = torch.ones(1, len(prompt) + 1, dtype=torch.long, device=device)

        def decode():
            with torch.inference_mode():
                net(input_ids=first, attention_mask=step_mask, cache=cache, use_cache=True)
                cache.crop(-1)  # back to the prompt

        def vision():
            with torch.inference_mode():
                return vision_features(net, px)

        with torch.inference_mode():
            embeds = merge(net, ids, vision())

        def prefill():
            with torch.inference_mode():
                return net(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=True,
                           cache=DynamicCache(config=net.config.text_config), logits_to_keep=1).logits

        return {"vision": vision, "prefill": prefill, "ttft": lambda: gen(1), "decode": decode,
                "answer": lambda: gen(ANSWER_TOKENS)}

    def onnx_latency(self, folder, cfg, providers):
        """The same scenarios on the export with the runtime's greedy loop (the cache kept as OrtValues)."""
        import onnxruntime as ort

        adapter = OnnxGenerator(folder, threads=cfg.threads, providers=providers,
                                image_splitting=GenerativeMeasure.of(cfg).image_splitting)
        frames, prompt = self.latency_inputs(adapter, 1)
        rt = adapter.runtime
        embeds = rt.prefill_embeds(rt.image_features(frames), prompt)
        first, past = rt.step(embeds, None, 0)
        step_embeds = rt.embed.run(None, {"input_ids": np.array([[first]], dtype=np.int64)})[0]
        scenarios = {"vision": lambda: rt.image_features(frames), "prefill": lambda: rt.step(embeds, None, 0),
                     "ttft": lambda: rt.step(rt.prefill_embeds(rt.image_features(frames), prompt), None, 0),
                     "decode": lambda: rt.step(step_embeds, past, len(prompt)),
                     "answer": lambda: rt.generate(frames, prompt, ANSWER_TOKENS, stop_at_eos=False)}
        record = {"runtime": f"onnxruntime {ort.__version__}", "providers": rt.decoder.get_providers(),
                  "precision": adapter.manifest.get("precision", "fp32"), **thread_record(adapter.threads),
                  "thread_tuning": adapter.manifest.get("threads"),
                  "input_image": {"size": list(LATENCY_IMAGE), "splitting": adapter.preprocess.splitting,
                            "frames": len(frames), "prompt_tokens": len(prompt)}}
        return self.time_scenarios(scenarios, cfg, record)

    def time_scenarios(self, scenarios, cfg, record, timer=None, sync=None):
        result = super().time_scenarios(scenarios, cfg, record, timer=timer, sync=sync)
        return {**result, "tokens_per_s": ANSWER_TOKENS / (result["answer"]["p50_ms"] / 1e3)}


register(Generative())
