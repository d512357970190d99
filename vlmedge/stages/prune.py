"""Structured pruning of both towers: attention heads, MLP neurons and whole layers (and a matching model's
cross-attention heads).

Importance is a pluggable strategy (`IMPORTANCE`: weight magnitude, or first-order Taylor |w * dL/dw| on
calibration batches of the family's training loss), separate from the surgery that slices the linear layers
(`models.structure`, which also rebuilds a pruned model on load); `pruning_plan.json` beside the pruned model
records which heads and neurons were kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar

import numpy as np

from .. import families
from ..artifact import Artifact
from ..data import DEFAULT_SOURCE
from ..disk import atomic_dir, write_json
from ..errors import VlmedgeError
from ..models.structure import TOWERS, LayerParts
from ..options import flat, shared_fields
from . import Context, register

KINDS = ("heads", "mlp", "layers", "cross_heads")
"""What a ratio removes per tower (`{tower}_{kind}`: vision_heads, text_cross_heads, ...)."""


@dataclass(frozen=True)
class PruneConfig:
    """Fractions to remove, per tower and kind; 0 keeps everything."""

    vision_heads: float = 0.0
    vision_mlp: float = 0.0
    vision_layers: float = 0.0
    text_heads: float = 0.0
    text_mlp: float = 0.0
    text_layers: float = 0.0
    importance: str = "taylor"
    """magnitude (weights only) or taylor (|w * grad| of the contrastive loss on calibration batches)."""
    calibration_batches: int = 8
    """Batches of the training loss whose gradients Taylor importance sums."""
    batch_size: int = 64
    """Images per calibration batch."""
    data: str | None = None
    """Calibration data for Taylor importance; None: the run's data (recipe `data.source`, the command's --data)."""
    seed: int = 0
    options: Any = None
    """The model family's own prunable parts (`Family.options["prune"]`: a matching model's `text_cross_heads`),
    given as keys of the stage."""

    SECTION: ClassVar[str] = "prune"

    def ratio(self, key: str) -> float:
        """The fraction to remove of one part (`{tower}_{kind}`: this config's, else its family's options')."""
        return float(getattr(self, key) if key in shared_fields(PruneConfig) else getattr(self.options, key, 0.0))

    def __post_init__(self):
        for tower in TOWERS:
            for kind in KINDS:
                r = self.ratio(f"{tower}_{kind}")
                if not 0 <= r < 1:
                    raise VlmedgeError(f"prune: {tower}_{kind}={r} is impossible; expected a fraction in [0, 1) "
                                       "(something must remain)")
        if self.importance not in IMPORTANCE:
            raise VlmedgeError(f"prune: importance={self.importance!r}; expected one of {', '.join(IMPORTANCE)}")

    def check_model(self, shapes: dict[str, dict[str, int]], family) -> None:
        """At recipe load, against the model's family (`prunable_parts`: a ratio for a part its models do not have
        is refused) and tower shapes (`models.tower_shapes`): a head ratio that leaves a tower no (key/value) head
        is refused before any work."""
        for tower in TOWERS:
            for kind in KINDS:
                key = f"{tower}_{kind}"
                if self.ratio(key) and key not in family.prunable_parts:
                    raise VlmedgeError(f"prune: {key}: a {family.name} model has no prunable {tower} "
                                       f"{kind.replace('_', '-')}; it takes {', '.join(family.prunable_parts)}")
        for tower, shape in shapes.items():
            rep = shape["heads"] // shape["kv_heads"]
            unit = f"key/value heads ({rep} query heads each)" if rep > 1 else "heads"
            _keep_count(shape["kv_heads"], self.ratio(f"{tower}_heads"), f"{unit} per {tower} layer")


# --- importance ----------------------------------------------------------------------------------------------------

def _head_scores(a, value: Callable[[Any], Any]) -> np.ndarray:
    """A per-weight score summed over each head of an attention block (q/k/v rows, o columns); with grouped-query
    attention over each group (a key/value head and the query heads that share it), the unit pruning removes."""
    rows = lambda m: value(m.weight).sum(1) + (value(m.bias) if m.bias is not None else 0)  # noqa: E731
    per_q = (rows(a.q) + value(a.o.weight).sum(0)).reshape(a.heads, a.head_dim).sum(1)
    per_kv = (rows(a.k) + rows(a.v)).reshape(a.kv_heads, a.head_dim).sum(1)
    return (per_q.reshape(a.kv_heads, -1).sum(1) + per_kv).detach().cpu().numpy()


def _group_scores(parts: list[LayerParts], value: Callable[[Any], Any]) -> dict[str, list[np.ndarray]]:
    """Sum a per-weight score over each head group (`_head_scores`), each MLP neuron (up and gate rows, down column)
    and each cross-attention head where a layer has one."""
    heads, neurons, cross = [], [], []
    for p in parts:
        heads.append(_head_scores(p, value))
        up = sum(value(m.weight).sum(1) + (value(m.bias) if m.bias is not None else 0)
                 for m in (p.up, p.gate) if m is not None)
        neurons.append((up + value(p.down.weight).sum(0)).detach().cpu().numpy())
        cross.append(_head_scores(p.cross, value) if p.cross is not None else None)
    return {"heads": heads, "neurons": neurons, "cross_heads": cross}


def magnitude_importance(family, model, parts: dict[str, list[LayerParts]], cfg: PruneConfig, data: str) -> dict:
    return {t: _group_scores(layers, lambda w: w.abs()) for t, layers in parts.items()}


def taylor_importance(family, model, parts: dict[str, list[LayerParts]], cfg: PruneConfig, data: str) -> dict:
    """First-order Taylor: |w * dL/dw| summed over calibration batches of the family's training loss."""
    import torch

    draw = family.calibration_data(model, data, cfg.calibration_batches * cfg.batch_size * 2, cfg.seed)
    net = model.model
    net.zero_grad(set_to_none=True)
    net.train()
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.calibration_batches):
        family.training_loss(model, draw(cfg.batch_size, rng)).backward()
    net.eval()
    scores = {}
    for tower, layers in parts.items():
        linears = [(m, i < 3 or i >= 4) for p in layers for i, m in enumerate((p.q, p.k, p.v, p.o, p.up, p.gate))
                   if m is not None]
        linears += [(p.down, False) for p in layers]
        linears += [(m, i < 3) for p in layers if p.cross is not None
                    for i, m in enumerate((p.cross.q, p.cross.k, p.cross.v, p.cross.o))]
        params = {id(m.weight): m.weight for m, _ in linears}
        params.update({id(m.bias): m.bias for m, scored in linears if scored and m.bias is not None})
        grads = {k: (w.detach() * w.grad).abs() if w.grad is not None else torch.zeros_like(w) for k, w in params.items()}
        scores[tower] = _group_scores(layers, lambda w: grads[id(w)])
    net.zero_grad(set_to_none=True)
    return scores


IMPORTANCE: dict[str, Callable] = {"magnitude": magnitude_importance, "taylor": taylor_importance}


def _keep_count(n: int, ratio: float, what: str) -> int:
    keep = int(round(n * (1 - ratio)))
    if keep < 1:
        raise VlmedgeError(f"prune: removing {ratio:.0%} of {n} {what} leaves none; lower the ratio")
    return keep


def _kept_heads(scores: np.ndarray, a, ratio: float, what: str) -> list[int]:
    """The query heads kept: the most important heads, or with grouped-query attention the most important groups
    (a ratio applies to the key/value heads, and each kept one keeps all its query heads)."""
    rep = a.heads // a.kv_heads
    unit = f"key/value heads ({rep} query heads each)" if rep > 1 else "heads"
    keep = _keep_count(a.kv_heads, ratio, f"{unit} in {what}")
    return [g * rep + r for g in sorted(np.argsort(scores)[::-1][:keep].tolist()) for r in range(rep)]


# --- the stage -----------------------------------------------------------------------------------------------------

def prunable_keys(parts: dict[str, list[LayerParts]]) -> set[str]:
    """The ratios (`{tower}_{kind}`) a model's prunable parts (`Family.prunable`) take."""
    return {f"{t}_{k}" for t, layers in parts.items() for k in KINDS
            if k != "cross_heads" or any(p.cross is not None for p in layers)}


def make_plan(family, model, cfg: PruneConfig, data: str = DEFAULT_SOURCE) -> dict[str, Any]:
    """Kept layer, head and neuron indices per prunable part of `model` (a family's loaded model)."""
    parts = family.prunable(model)
    takes = prunable_keys(parts)
    for tower in TOWERS:
        for kind in KINDS:
            ratio = cfg.ratio(f"{tower}_{kind}")
            if ratio and f"{tower}_{kind}" not in takes:
                raise VlmedgeError(f"prune: {tower}_{kind}={ratio}, but {model.architecture} has no prunable "
                                   f"{tower} {kind.replace('_', '-')}; prune its {' and '.join(parts)} tower only (e.g. "
                                   f"{next(iter(parts))}_heads, --{next(iter(parts))}-heads)")
    scores = IMPORTANCE[cfg.importance](family, model, parts, cfg, data)
    plan = {}
    for tower, layers_of in parts.items():
        s = scores[tower]
        # whole layers first: the least important by their heads' and neurons' share of the tower's total
        head_total = sum(x.sum() for x in s["heads"]) or 1.0
        neuron_total = sum(x.sum() for x in s["neurons"]) or 1.0
        layer_score = [h.sum() / head_total + n.sum() / neuron_total for h, n in zip(s["heads"], s["neurons"])]
        n_layers = _keep_count(len(layers_of), cfg.ratio(f"{tower}_layers"), f"{tower} layers")
        layers = sorted(np.argsort(layer_score)[::-1][:n_layers].tolist())
        heads, neurons, cross = [], [], []
        for li in layers:
            p = layers_of[li]
            keep_n = _keep_count(p.up.out_features, cfg.ratio(f"{tower}_mlp"), f"MLP neurons in {tower} layer {li}")
            heads.append(_kept_heads(s["heads"][li], p, cfg.ratio(f"{tower}_heads"), f"{tower} layer {li}"))
            neurons.append(sorted(np.argsort(s["neurons"][li])[::-1][:keep_n].tolist()))
            if p.cross is not None:
                cross.append(_kept_heads(s["cross_heads"][li], p.cross, cfg.ratio(f"{tower}_cross_heads"),
                                         f"{tower} layer {li}'s cross-attention"))
        plan[tower] = {"layers": layers, "heads": heads, "neurons": neurons, **({"cross_heads": cross} if cross else {})}
    return plan


def prune(source: str | os.PathLike, out: str | os.PathLike, cfg: PruneConfig = PruneConfig(),
          family: families.Family | None = None) -> dict[str, Any]:
    """Prune a model folder (of `family`; default: read from the folder) into `out` (written atomically). Returns
    parameters and FLOPs before and after."""
    family = family or families.of(source)
    model = family.load(source, attn_implementation="eager")
    before = {"parameters": family.parameters(model), "flops": family.flops(model)}
    plan = make_plan(family, model, cfg, cfg.data or DEFAULT_SOURCE)
    family.apply_plan(model, plan)
    after = {"parameters": family.parameters(model), "flops": family.flops(model)}
    model.source = f"pruned:{source}"
    with atomic_dir(out) as tmp:
        model.save(tmp)
        write_json(tmp / "pruning_plan.json", {"config": flat(cfg), "kept": plan, "before": before,
                                               "after": after})
    return {"before": before, "after": after, "kept": plan}


@register(PruneConfig, kind="prune", consumes="model", produces="model", provides="model", reads=("data",))
def run(parent: Artifact, cfg: PruneConfig, ctx: Context) -> Artifact:
    cfg = replace(cfg, data=cfg.data or ctx.data.source)
    return ctx.artifact(parent, ctx.out, prune(parent.path, ctx.out, cfg, families.of_artifact(parent)))
