"""Greedy generation from a generative VLM's ONNX export with ONNX Runtime; needs only numpy and onnxruntime, so a
board runner can carry it.

The export's three graphs, in `onnx/` (the layout onnx-community publishes for SmolVLM and transformers.js loads):

    vision_encoder.onnx        pixel_values (B,N,3,H,W), pixel_attention_mask (B,N,H,W) bool
                               -> image_features (B*N, image tokens, hidden)
    embed_tokens.onnx          input_ids (B,S) -> inputs_embeds (B,S,hidden)
    decoder_model_merged.onnx  inputs_embeds, attention_mask (B,P+S), position_ids (B,S),
                               past_key_values.N.key / .value (B,kv heads,P,head dim)
                               [logits_to_keep (1,) int64, default 0: all]
                               -> logits (B,S,vocab), present.N.key / .value (B,kv heads,P+S,head dim)

N is an image's frames: its tiles and the global image when it is split (`Preprocess.frames`), else 1; the
features fill the prompt's image tokens in order. One decoder graph serves the prefill (P = 0) and every decode
step. The cache stays in ONNX Runtime: each step's `present` OrtValues are fed back as the next step's `past` (no
copy of the whole cache into numpy per token). `logits_to_keep` is an input with a default (an initializer that is
also a graph input), so transformers.js, which does not know it, gets every position's logits; this loop asks for the
last position's only, so a prefill runs the vocabulary-wide head once, not once per prompt token.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

FILES = {"vision": "onnx/vision_encoder.onnx", "embed": "onnx/embed_tokens.onnx",
         "decoder": "onnx/decoder_model_merged.onnx"}
"""Where the export writes each graph: the onnx-community layout (graphs in `onnx/` beside config.json)."""


LOGITS_TO_KEEP = "logits_to_keep"
"""The decoder's optional input: logits of the last that many positions ((1,) int64), 0 (its default) for all."""

GENERATION_KEYS = ("image_token_id", "image_tokens", "eos_token_id", "layers", "kv_heads", "head_dim")
"""The manifest's `generation` integers the loop needs."""


FRAMES_PER_RUN = 4
"""The most frames one vision run encodes: a split image's frames go through the vision graph in groups of this many,
so its memory does not grow with the split (attention scores are frames x heads x patches² floats: 50 MB a frame at
SmolVLM-256M's 1024 patches x 12 heads, 0.85 GB for a 17-frame split image in one run)."""


def past_names(layers: int) -> list[str]:
    """The decoder's cache inputs, in order: past_key_values.N.key and .value per layer."""
    return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def vision_feeds(frames: np.ndarray) -> dict[str, np.ndarray]:
    """The vision graph's feeds for one image's frames (N, 3, H, W): every pixel real."""
    n, _, h, w = frames.shape
    return {"pixel_values": frames[None], "pixel_attention_mask": np.ones((1, n, h, w), dtype=bool)}


class GraphMismatch(ValueError):
    """A session that is not the graph the loop needs under its name (another graph saved under it): `graph` and
    `why`, for a caller that knows the file to name it."""

    def __init__(self, graph: str, why: str):
        super().__init__(f"the {graph} graph {why}")
        self.graph, self.why = graph, why


def check_sessions(sessions: dict, manifest: dict) -> None:
    """Each session takes the inputs the loop feeds it (the decoder: one past key and value per manifest layer);
    `GraphMismatch` for the first that does not."""
    needs = {"vision": ["pixel_values", "pixel_attention_mask"], "embed": ["input_ids"],
             "decoder": ["inputs_embeds", "attention_mask", "position_ids",
                         *past_names(int(manifest["generation"]["layers"]))]}
    for graph, names in needs.items():
        have = [i.name for i in sessions[graph].get_inputs()]
        missing = [n for n in names if n not in have]
        if missing:
            raise GraphMismatch(graph, f"has no input {missing[0]!r} (its inputs: {', '.join(have[:4])}"
                                       f"{', ...' * (len(have) > 4)})")


class GreedyDecoder:
    """Batch-1 greedy decoding over three ONNX Runtime sessions (`sessions`: vision, embed, decoder)."""

    def __init__(self, sessions: dict, manifest: dict):
        check_sessions(sessions, manifest)
        self.vision, self.embed, self.decoder = (sessions[k] for k in ("vision", "embed", "decoder"))
        gen = manifest["generation"]
        self.image_token_id = int(gen["image_token_id"])
        self.eos_id = int(gen["eos_token_id"])
        self.layers, self.kv_heads, self.head_dim = (int(gen[k]) for k in ("layers", "kv_heads", "head_dim"))
        self.max_length = int(manifest["max_length"])
        self.past_names = past_names(self.layers)
        self.present_names = [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]
        self._empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self._past_dtype())
        # an export from before the input existed computes every position's logits: nothing to feed
        self._last_only = ({LOGITS_TO_KEEP: np.ones(1, dtype=np.int64)}
                           if LOGITS_TO_KEEP in {i.name for i in self.decoder.get_overridable_initializers()} else {})

    def _past_dtype(self):
        t = next(i.type for i in self.decoder.get_inputs() if i.name == self.past_names[0])
        return np.float16 if "float16" in t else np.float32

    def image_features(self, frames: np.ndarray) -> np.ndarray:
        """One image's frames (N, 3, H, W) -> its features (N, image tokens, hidden), FRAMES_PER_RUN frames a
        run."""
        return np.concatenate([self.vision.run(None, vision_feeds(frames[i:i + FRAMES_PER_RUN]))[0]
                               for i in range(0, len(frames), FRAMES_PER_RUN)])

    def prefill_embeds(self, features: np.ndarray, prompt: Sequence[int]) -> np.ndarray:
        ids = np.asarray(prompt, dtype=np.int64)[None]
        embeds = self.embed.run(None, {"input_ids": ids})[0]
        slots = ids[0] == self.image_token_id
        features = features.reshape(-1, features.shape[-1])
        if slots.sum() != len(features):
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens; the image gives {len(features)}")
        embeds[0, slots] = features.astype(embeds.dtype)
        return embeds

    def feeds(self, embeds: np.ndarray, past: list | None, start: int) -> dict:
        """The decoder's inputs for `embeds` at positions start.. after `past` (None: an empty cache)."""
        s = embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, start + s), dtype=np.int64),
                 "position_ids": np.arange(start, start + s, dtype=np.int64)[None]}
        for k, name in enumerate(self.past_names):
            feeds[name] = past[k] if past is not None else self._empty
        return feeds

    def step(self, embeds: np.ndarray, past: list | None, start: int):
        """One decoder call on `embeds` at positions start..; returns (next token id, presents as OrtValues)."""
        import onnxruntime as ort

        feeds = {k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(v)
                 for k, v in {**self.feeds(embeds, past, start), **self._last_only}.items()}
        out = self.decoder.run_with_ort_values(["logits", *self.present_names], feeds)
        logits = out[0].numpy()
        return int(np.argmax(logits[0, -1])), out[1:]

    def generate(self, frames: np.ndarray, prompt: Sequence[int], max_new_tokens: int,
                 stop_at_eos: bool = True) -> list[int]:
        """Greedy ids after the prompt for one image's `frames`: until EOS (kept) or `max_new_tokens` or the
        context's end; with `stop_at_eos=False` exactly `max_new_tokens` (what latency scenarios time)."""
        token, past = self.step(self.prefill_embeds(self.image_features(frames), prompt), None, 0)
        ids = [token]
        position = len(prompt)
        while (token != self.eos_id or not stop_at_eos) and len(ids) < max_new_tokens \
                and position + 1 < self.max_length:
            embeds = self.embed.run(None, {"input_ids": np.array([[token]], dtype=np.int64)})[0]
            token, past = self.step(embeds, past, position)
            position += 1
            ids.append(token)
        return ids
