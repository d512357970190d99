"""Can the `small` preset's ViT bind attributes to positions at all? A diagnostic, not a vlmedge feature.

Trains the preset's vision tower from scratch, supervised, to predict the spatial relation of the (colour,
shape)-sorted first of two objects to the second (4 classes) from its pooled output, 800 steps x 192 two-object
training images, and prints held-out accuracy every 200 steps (a tower that reaches ~0.9 can bind; the contrastive
teacher's embeddings are probed by `vlmedge eval`'s relation hard negatives). Run from the repository root:

    python benchmarks/relation_probe.py [OUT.json] [--quick]

writes OUT.json (default runs/relation-probe.json): the accuracy at each report and its provenance. `--quick` (the
suite's check of the script): 4 steps on a few hundred images.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import Provenance  # noqa: E402

from vlmedge import families  # noqa: E402
from vlmedge.data.shapes import load_shapes, relation  # noqa: E402
from vlmedge.models import load_preset  # noqa: E402

REL = ["to the left of", "to the right of", "above", "below"]


def main(out: Path, steps: int, batch: int, train_images: int, test_images: int, every: int) -> int:
    run = Provenance.start()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    spec = load_preset("small")
    fam = families.for_preset(spec)
    ds = fam.open_data("shapes", "train", resolution=48, count=train_images)
    vlm = fam.build(spec, fam.tokenizer(spec, ds, np.random.default_rng(0)))
    vit = vlm.model.vision_model.train()

    def pairs(split, n):
        d = load_shapes(split, n, 48)
        idx = [i for i, o in enumerate(d.objects) if len(o) == 2]
        y = [REL.index(relation(*sorted(d.objects[i], key=lambda o: (o.colour, o.shape)))) for i in idx]
        return torch.from_numpy(vlm.preprocess(d.images[idx])), torch.tensor(y)

    xtr, ytr = pairs("train", train_images)
    xte, yte = pairs("test", test_images)
    head = torch.nn.Linear(vit.config.hidden_size, 4)
    opt = torch.optim.AdamW(list(vit.parameters()) + list(head.parameters()), lr=1.5e-3, weight_decay=0.1)
    t0, rng, reports = time.time(), np.random.default_rng(0), []
    for step in range(steps):
        b = rng.integers(len(xtr), size=batch)
        loss = torch.nn.functional.cross_entropy(head(vit(pixel_values=xtr[b]).pooler_output), ytr[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0 or step + 1 == steps:
            with torch.no_grad():
                vit.eval()
                acc = float((head(vit(pixel_values=xte).pooler_output).argmax(1) == yte).float().mean())
                vit.train()
            reports.append({"step": step + 1, "loss": round(loss.item(), 4), "held_out_relation_accuracy": acc,
                            "seconds": round(time.time() - t0, 1)})
            print(f"step {step + 1}: loss {loss.item():.3f}, held-out relation accuracy {acc:.3f} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    run.write(out, {"steps": steps, "batch": batch, "held_out_images": len(yte), "reports": reports})
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/relation-probe.json"))
    ap.add_argument("--quick", action="store_true", help="4 steps on a few hundred images: checks the script")
    a = ap.parse_args()
    sys.exit(main(a.out, *((4, 16, 400, 200, 2) if a.quick else (800, 192, 20000, 3000, 200))))
