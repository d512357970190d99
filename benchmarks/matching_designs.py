"""Which matching-model design learns to bind words to objects? A diagnostic for the reranker, not a vlmedge feature.

Trains a matching teacher on shapes in one of three designs, through vlmedge's own training loop (`train.train`)
and the matching family's own objective (ITC + ITM on each image's caption, ITC-mined negatives and one-edit false
captions), and evaluates the family's tasks every `--every` steps (ITM colour / shape / position / relation hard
negatives, retrieval by ITC and reranked by ITM):

* ``blip``: the family's model as shipped, `BlipForImageTextRetrieval` (one stream: the text cross-attends to the
  patches), its ViT started from a `small` dual encoder trained first (`--tower`, as `rerank-quickstart` does);
* ``vilt``: one stream both ways, `ViltForImageAndTextRetrieval` (text and patch tokens in one transformer: every
  layer, each token attends to both), its layers started from the same dual encoder's ViT (the same weight names);
  ITC from the same transformer run on the image tokens alone and on the text alone;
* ``lxmert``: the seed's two streams with co-attention (ViLBERT / LXMERT), `LxmertForPreTraining`: language,
  object-relationship and cross-modality encoders over raw 8 px patches with their boxes, from scratch (its post-LN
  layers cannot take the pre-LN ViT's weights); ITC on the two single-modality encoders' outputs.

The vilt and lxmert designs replace the family's model functions (`build`, `encode_image`, `encode_text`,
`match_logits`) in this process only, so the family trains and evaluates them through the calls it uses for BLIP.
Run from the repository root:

    python benchmarks/matching_designs.py DESIGN [OUT.json] [--steps N] [--every N] [--tower DIR] [--quick]

writes OUT.json (default runs/matching-designs-DESIGN.json): every evaluation and its provenance. `--quick` (the
suite's check of the script): 2 steps of a tiny run. A CPU run of 5000 BLIP steps takes about 30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import Provenance  # noqa: E402

import vlmedge.families.matching as family_module  # noqa: E402
from vlmedge import families  # noqa: E402
from vlmedge.evaluate import EvalConfig  # noqa: E402
from vlmedge.families.matching import MatchingEval, TorchMatcher  # noqa: E402
from vlmedge.families.matching.model import MatchingVLM  # noqa: E402
from vlmedge.preprocess import Preprocess  # noqa: E402
from vlmedge.train import TrainConfig, train  # noqa: E402

ITC_SCALE = float(np.log(1 / 0.07))  # BLIP's fixed ITC temperature, as the family reads it from the config
PATCH = 8  # the side of the raw pixel patches LXMERT reads as its objects


class Design(MatchingVLM):
    """A matching model whose config is flat (one hidden size for image and text, as ViLT's and LXMERT's are)."""

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)


class Vilt(Design):
    """One stream: the matcher's input is the image's embedded tokens (class token + patches, positions added)."""

    @property
    def patches(self) -> int:
        return self.model.vilt.embeddings.patch_embeddings.num_patches + 1

    @property
    def vision_encoder(self):
        return self.model.vilt.embeddings.patch_embeddings

    @staticmethod
    def image_tokens(model, pixels):
        e = model.vilt.embeddings
        x = e.patch_embeddings(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([e.cls_token.expand(len(x), -1, -1), x], 1) + e.position_embeddings
        return x + e.token_type_embeddings.weight[1]

    @staticmethod
    def layers(model, x, mask):
        ext = None if mask is None else (1.0 - mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in model.vilt.encoder.layer:
            x = layer(x, ext)[0]
        return model.vilt.layernorm(x)

    @staticmethod
    def text_tokens(model, ids):
        e = model.vilt.embeddings
        return e.text_embeddings(input_ids=ids) + e.token_type_embeddings.weight[0]

    @classmethod
    def encode_image(cls, model, pixels):
        tokens = cls.image_tokens(model, pixels)
        return tokens, F.normalize(cls.layers(model, tokens, None)[:, 0], dim=-1)

    @classmethod
    def encode_text(cls, model, ids, mask):
        return F.normalize(cls.layers(model, cls.text_tokens(model, ids), mask)[:, 0], dim=-1)

    @classmethod
    def match_logits(cls, model, image, ids, mask):
        text = cls.text_tokens(model, ids)
        image = image.expand(len(text), -1, -1) if len(image) == 1 else image
        ones = torch.ones(image.shape[:2], dtype=mask.dtype, device=mask.device)
        fused = cls.layers(model, torch.cat([text, image], 1), torch.cat([mask, ones], 1))
        return model.rank_output(model.vilt.pooler(fused))[:, 0]

    @staticmethod
    def config(tokenizer, spec):
        from transformers import ViltConfig, ViltForImageAndTextRetrieval

        v = spec["vision"]
        return ViltForImageAndTextRetrieval, ViltConfig(
            vocab_size=len(tokenizer), hidden_size=v["hidden_size"], num_hidden_layers=v["num_hidden_layers"],
            num_attention_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
            image_size=v["image_size"], patch_size=v["patch_size"], max_position_embeddings=32,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_image_length=-1,
            pad_token_id=tokenizer.pad_token_id, initializer_range=v.get("initializer_range", 0.02))

    @staticmethod
    def start_from_tower(model, tower: str) -> None:
        """The dual encoder's ViT weights under ViLT's names (the same layer layout: `vilt.` + the ViT's key)."""
        from safetensors.torch import load_file

        state = {"vilt." + k[len("vision_model."):]: v for k, v in load_file(f"{tower}/model.safetensors").items()
                 if k.startswith("vision_model.") and ".pooler." not in k}
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise SystemExit(f"--tower {tower}: weights ViLT has no place for: {unexpected[:3]}")


class Lxmert(Design):
    """Two streams: the matcher's input is the object-relationship encoder's output (one state per patch)."""

    @property
    def patches(self) -> int:
        return (self.preprocess.image_size // PATCH) ** 2

    @property
    def vision_encoder(self):
        return self.model.lxmert.encoder.r_layers

    @staticmethod
    def boxes(side: int, device):
        g = torch.arange(side, dtype=torch.float32, device=device) / side
        y, x = torch.meshgrid(g, g, indexing="ij")
        return torch.stack([x, y, x + 1 / side, y + 1 / side], -1).reshape(-1, 4)

    @classmethod
    def encode_image(cls, model, pixels):
        n, c, h, w = pixels.shape
        feats = pixels.reshape(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
        feats = feats.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)
        v = model.lxmert.encoder.visn_fc(feats, cls.boxes(h // PATCH, pixels.device).expand(n, -1, -1))
        for layer in model.lxmert.encoder.r_layers:
            v = layer(v, None)[0]
        return v, F.normalize(v.mean(1), dim=-1)

    @staticmethod
    def text_states(model, ids, mask):
        h = model.lxmert.embeddings(ids, torch.zeros_like(ids))
        ext = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in model.lxmert.encoder.layer:
            h = layer(h, ext)[0]
        return h, ext

    @classmethod
    def encode_text(cls, model, ids, mask):
        return F.normalize(cls.text_states(model, ids, mask)[0][:, 0], dim=-1)

    @classmethod
    def match_logits(cls, model, v, ids, mask):
        h, ext = cls.text_states(model, ids, mask)
        v = v.expand(len(h), -1, -1) if len(v) == 1 else v
        for layer in model.lxmert.encoder.x_layers:
            h, v = layer(h, ext, v, None)[:2]
        itm = model.cls.seq_relationship(model.lxmert.pooler(h))
        return itm[:, 1] - itm[:, 0]

    @staticmethod
    def config(tokenizer, spec):
        from transformers import LxmertConfig, LxmertForPreTraining

        v, t = spec["vision"], spec["text"]  # the preset's widths; its ViT's depth for the image stream
        return LxmertForPreTraining, LxmertConfig(
            vocab_size=len(tokenizer), hidden_size=v["hidden_size"], num_attention_heads=v["num_attention_heads"],
            intermediate_size=v["intermediate_size"], l_layers=t["num_hidden_layers"],
            r_layers=v["num_hidden_layers"], x_layers=t["num_hidden_layers"], visual_feat_dim=3 * PATCH * PATCH,
            visual_pos_dim=4, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            task_obj_predict=False, task_qa=False, task_mask_lm=False, pad_token_id=tokenizer.pad_token_id)

    start_from_tower = None


DESIGNS = {"vilt": Vilt, "lxmert": Lxmert}


def use_design(name: str, built: list) -> None:
    """Route the matching family's model functions to `name`'s (nothing for blip); every built model is appended
    to `built` (what the periodic evaluation reads)."""
    original = family_module.build

    def build(spec, tokenizer, *, seed=0, source="", vision_init=None):
        if name == "blip":
            vlm = original(spec, tokenizer, seed=seed, source=source, vision_init=vision_init)
        else:
            design = DESIGNS[name]
            cls, config = design.config(tokenizer, spec)
            config.logit_scale_init_value = ITC_SCALE
            torch.manual_seed(seed)
            model = cls(config)
            if vision_init and design.start_from_tower:
                design.start_from_tower(model, vision_init)
            vlm = design(model.eval(), tokenizer, Preprocess(**spec["preprocess"]), int(spec["max_length"]),
                         source or name)
        built.append(vlm)
        return vlm

    family_module.build = build
    if name != "blip":
        design = DESIGNS[name]
        family_module.encode_image = design.encode_image
        family_module.encode_text = design.encode_text
        family_module.match_logits = design.match_logits


def main(args) -> int:
    run = Provenance.start()
    torch.set_num_threads(args.threads)
    family = families.get("matching")
    tower = args.tower
    work = Path(tempfile.mkdtemp(prefix="matching-designs-"))
    try:
        if args.design != "lxmert" and tower is None:  # the dual encoder whose ViT starts blip's and vilt's
            tower = str(work / "tower")
            print(f"training the dual-encoder tower ({args.tower_steps} steps) ...", flush=True)
            train(TrainConfig(preset=args.tower_preset, steps=args.tower_steps, data_count=args.data_count,
                              seed=args.seed), tower, progress=False)
        built: list = []
        use_design(args.design, built)
        ev = EvalConfig(data="shapes", zero_shot_images=args.eval_images, retrieval_pairs=args.eval_pairs,
                        hard_negative_pairs=args.hard_negatives, seed=args.seed, options=MatchingEval(rerank_k=16))
        reports, t0 = [], time.time()

        def evaluate(step: int) -> None:
            vlm = built[-1]
            vlm.model.eval()
            m = family.evaluate(TorchMatcher(vlm), ev)
            vlm.model.train()
            r = {"step": step, "seconds": round(time.time() - t0, 1),
                 "itm": {k: round(v, 4) for k, v in m["itm"].items() if k != "n"},
                 "itc_hard_negatives": {k: round(v, 4) for k, v in m["itc_hard_negatives"].items()},
                 "retrieval": {k: round(v, 4) for k, v in m["retrieval"].items() if k.endswith("_r1")},
                 "relation_pairs": m["itm"]["n"]["relation"]}
            reports.append(r)
            ret = r["retrieval"]
            print(f"step {step}: ITM colour {r['itm']['colour']:.3f} shape {r['itm']['shape']:.3f} position "
                  f"{r['itm']['position']:.3f} relation {r['itm']['relation']:.3f}; i2t R@1 ITC "
                  f"{ret['itc_i2t_r1']:.3f} reranked {ret['rerank_i2t_r1']:.3f} ({r['seconds']:.0f} s)", flush=True)

        def on_step(step: int, loss: float) -> None:
            if (step + 1) % args.every == 0 or step + 1 == args.steps:
                evaluate(step + 1)

        summary = train(TrainConfig(preset=args.preset, steps=args.steps, batch_size=args.batch_size,
                                    data_count=args.data_count, vision_init=tower, seed=args.seed),
                        work / "model", progress=False, on_step=on_step)
        params = sum(p.numel() for p in built[-1].model.parameters())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run.write(args.out, {"design": args.design, "architecture": built[-1].architecture, "parameters": params,
                         "steps": args.steps, "batch_size": args.batch_size, "tower_steps": args.tower_steps,
                         "train_seconds": summary["seconds"], "reports": reports})
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("design", choices=["blip", *DESIGNS])
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--every", type=int, default=500, help="evaluate every this many steps (and at the end)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--tower", help="a trained `small` dual encoder folder (default: train one first)")
    ap.add_argument("--tower-steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 steps of match-tiny: checks the script")
    a = ap.parse_args()
    a.out = a.out or Path(f"runs/matching-designs-{a.design}.json")
    # the evaluation of rerank-quickstart's recipe
    a.preset, a.tower_preset, a.data_count, a.eval_images, a.eval_pairs, a.hard_negatives = \
        "match-small", "small", 20000, 540, 500, 400
    if a.quick:
        a.preset, a.tower_preset, a.data_count, a.eval_images, a.eval_pairs, a.hard_negatives = \
            "match-tiny", "tiny", 256, 36, 32, 16
        a.steps, a.every, a.batch_size, a.tower_steps = 2, 1, 16, 2
    sys.exit(main(a))
