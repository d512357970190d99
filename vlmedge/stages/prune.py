"""Structured pruning of both towers: attention heads, MLP neurons and whole layers.

Importance is a pluggable strategy (`IMPORTANCE`: weight magnitude, or first-order Taylor |w * dL/dw| on
calibration batches of the contrastive loss), separate from the surgery that slices the linear layers.

Attention keeps its head size (every supported attention module reshapes with ``view(..., -1, head_dim)``), so a
layer with fewer heads only needs narrower q/k/v/o projections; we keep the modules' head-count attributes
consistent. HF configs cannot say "layer 3 has 4 heads" (and transformers 5 dropped `prune_heads`), so the shape of
the pruned model (layers, heads and MLP width per layer) is written into `config.json` as `vlmedge_pruning` and the
model is rebuilt from it on load; `pruning_plan.json` beside it records which heads and neurons were kept.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import VlmedgeError

TOWERS = ("vision", "text")
# (q, k, v, o) attribute paths inside one layer, then (up, down) for the MLP, per supported architecture.
_ATTENTION_PATHS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),  # ViT (transformers 5)
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),  # BERT
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),  # CLIP
)
_MLP_PATHS = (("mlp.fc1", "mlp.fc2"), ("intermediate.dense", "output.dense"))
_HEAD_ATTRS = ("num_attention_heads", "num_heads")


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
    batch_size: int = 64
    data: str = "shapes"
    seed: int = 0

    def __post_init__(self):
        for tower in TOWERS:
            for kind in ("heads", "mlp", "layers"):
                r = getattr(self, f"{tower}_{kind}")
                if not 0 <= r < 1:
                    raise VlmedgeError(f"prune: {tower}_{kind}={r} is impossible; expected a fraction in [0, 1) "
                                       "(something must remain)")
        if self.importance not in IMPORTANCE:
            raise VlmedgeError(f"prune: importance={self.importance!r}; expected one of {', '.join(IMPORTANCE)}")


# --- locating the parts --------------------------------------------------------------------------------------------

@dataclass
class LayerParts:
    layer: Any
    q: Any
    k: Any
    v: Any
    o: Any
    up: Any
    down: Any
    attention: Any  # the module holding q/k/v (its head-count attributes are updated)
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim


def _get(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def tower_root(model, tower: str):
    return model.vision_model if tower == "vision" else model.text_model


def _layer_lists(root) -> list:
    """The ModuleLists of transformer layers: one for ViT/BERT/CLIP, one per stage for hierarchical towers (Swin)."""
    import torch.nn as nn

    lists = [m for _, m in root.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) and _attention_paths(m[0])]
    if not lists:
        raise VlmedgeError(f"unsupported tower {type(root).__name__}: no transformer layers with known attention names")
    return lists


def _layer_list(root):
    lists = _layer_lists(root)
    if len(lists) > 1:
        raise VlmedgeError(f"removing whole layers needs a single stack of layers; {type(root).__name__} has "
                           f"{len(lists)} stages (prune its heads and MLP neurons instead)")
    return lists[0]


def _attention_paths(layer):
    return next((p for p in _ATTENTION_PATHS if _get(layer, p[0]) is not None), None)


def tower_config(model, tower: str):
    return model.config.vision_config if tower == "vision" else model.config.text_config


def tower_layers(model, tower: str) -> list[LayerParts]:
    """Every transformer layer of a tower, in order (across stages for hierarchical towers)."""
    parts = []
    for layer in (layer for stack in _layer_lists(tower_root(model, tower)) for layer in stack):
        attn = _attention_paths(layer)
        mlp = next((p for p in _MLP_PATHS if _get(layer, p[0]) is not None), None)
        if mlp is None:
            raise VlmedgeError(f"unsupported layer {type(layer).__name__}: no MLP with known names")
        q, k, v, o = (_get(layer, p) for p in attn)
        module = _get(layer, attn[0].rsplit(".", 1)[0])
        head_dim = getattr(module, "head_dim", None) or getattr(module, "attention_head_size")
        parts.append(LayerParts(layer, q, k, v, o, _get(layer, mlp[0]), _get(layer, mlp[1]), module, head_dim))
    return parts


# --- importance ----------------------------------------------------------------------------------------------------

def _group_scores(parts: list[LayerParts], value: Callable[[Any], Any]) -> dict[str, list[np.ndarray]]:
    """Sum a per-weight score over each head (q/k/v rows, o columns) and each MLP neuron (up row, down column)."""
    heads, neurons = [], []
    for p in parts:
        qkv = sum(value(m.weight).sum(1) + (value(m.bias) if m.bias is not None else 0) for m in (p.q, p.k, p.v))
        per_dim = qkv + value(p.o.weight).sum(0)
        heads.append(per_dim.reshape(p.heads, p.head_dim).sum(1).detach().cpu().numpy())
        up = value(p.up.weight).sum(1) + (value(p.up.bias) if p.up.bias is not None else 0)
        neurons.append((up + value(p.down.weight).sum(0)).detach().cpu().numpy())
    return {"heads": heads, "neurons": neurons}


def magnitude_importance(model, towers: dict[str, list[LayerParts]], cfg: PruneConfig, data) -> dict:
    return {t: _group_scores(parts, lambda w: w.abs()) for t, parts in towers.items()}


def taylor_importance(model, towers: dict[str, list[LayerParts]], cfg: PruneConfig, data) -> dict:
    """First-order Taylor: |w * dL/dw| summed over calibration batches of the contrastive loss."""
    import torch

    from ..models import image_features, text_features
    from ..train import contrastive_loss

    vlm, ds = data
    model.zero_grad(set_to_none=True)
    model.train()
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.calibration_batches):
        idx = rng.integers(len(ds), size=cfg.batch_size).tolist()
        texts, specs = ds.training_captions(idx, rng)
        tok = vlm.tokenize(texts)
        img = image_features(model, torch.from_numpy(vlm.preprocess(ds.images(idx))))
        txt = text_features(model, torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"]))
        contrastive_loss(img, txt, model.logit_scale, torch.from_numpy(ds.match(idx, specs))).backward()
    model.eval()
    scores = {}
    for tower, parts in towers.items():
        params = {id(m.weight): m.weight for p in parts for m in (p.q, p.k, p.v, p.o, p.up, p.down)}
        params.update({id(m.bias): m.bias for p in parts for m in (p.q, p.k, p.v, p.up) if m.bias is not None})
        grads = {k: (w.detach() * w.grad).abs() if w.grad is not None else torch.zeros_like(w) for k, w in params.items()}
        scores[tower] = _group_scores(parts, lambda w: grads[id(w)])
    model.zero_grad(set_to_none=True)
    return scores


IMPORTANCE: dict[str, Callable] = {"magnitude": magnitude_importance, "taylor": taylor_importance}


# --- surgery -------------------------------------------------------------------------------------------------------

def _slice_linear(linear, out_idx=None, in_idx=None):
    import torch
    import torch.nn as nn

    w = linear.weight.data
    if out_idx is not None:
        w = w[torch.as_tensor(out_idx)]
    if in_idx is not None:
        w = w[:, torch.as_tensor(in_idx)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    new.weight.data = w.clone()
    if linear.bias is not None:
        b = linear.bias.data
        new.bias.data = (b[torch.as_tensor(out_idx)] if out_idx is not None else b).clone()
    return new


def _set(layer, path: str, module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(_get(layer, parent_path) if parent_path else layer, name, module)


def _resize_layer(parts: LayerParts, heads: list[int] | int, neurons: list[int] | int) -> None:
    """Keep the given heads and neurons (index lists), or resize to counts with uninitialised weights."""
    layer = parts.layer
    attn = _attention_paths(layer)
    head_idx = list(range(heads)) if isinstance(heads, int) else heads
    dims = [h * parts.head_dim + d for h in head_idx for d in range(parts.head_dim)]
    for path in attn[:3]:
        _set(layer, path, _slice_linear(_get(layer, path), out_idx=dims))
    _set(layer, attn[3], _slice_linear(_get(layer, attn[3]), in_idx=dims))
    mlp = next(p for p in _MLP_PATHS if _get(layer, p[0]) is not None)
    neuron_idx = list(range(neurons)) if isinstance(neurons, int) else neurons
    _set(layer, mlp[0], _slice_linear(_get(layer, mlp[0]), out_idx=neuron_idx))
    _set(layer, mlp[1], _slice_linear(_get(layer, mlp[1]), in_idx=neuron_idx))
    bias = getattr(getattr(parts.attention, "relative_position_bias", None), "relative_position_bias_table", None)
    if bias is not None:  # Swin: one column of relative position biases per head
        import torch
        bias.data = bias.data[:, torch.as_tensor(head_idx)].clone()
    for attr in _HEAD_ATTRS:
        if hasattr(parts.attention, attr):
            setattr(parts.attention, attr, len(head_idx))
    if hasattr(parts.attention, "all_head_size"):
        parts.attention.all_head_size = len(head_idx) * parts.head_dim


def _keep_count(n: int, ratio: float, what: str) -> int:
    keep = int(round(n * (1 - ratio)))
    if keep < 1:
        raise VlmedgeError(f"prune: removing {ratio:.0%} of {n} {what} leaves none; lower the ratio")
    return keep


def apply_plan(model, plan: dict[str, Any]) -> None:
    """Cut a model down to `plan` (kept layer, head and neuron indices per tower)."""
    import torch.nn as nn

    for tower, tp in plan.items():
        parts = tower_layers(model, tower)
        kept_layers = tp["layers"]
        for li, heads, neurons in zip(kept_layers, tp["heads"], tp["neurons"]):
            _resize_layer(parts[li], heads, neurons)
        if len(kept_layers) < len(parts):
            layer_list = _layer_list(tower_root(model, tower))
            _replace_module_list(tower_root(model, tower), layer_list,
                                 nn.ModuleList([layer_list[i] for i in kept_layers]))
            tower_config(model, tower).num_hidden_layers = len(kept_layers)


def _replace_module_list(root, old, new) -> None:
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return


def shape_of(model) -> dict[str, Any]:
    """The per-layer shape config.json records: enough to rebuild the module tree before loading weights."""
    out = {}
    for tower in TOWERS:
        parts = tower_layers(model, tower)
        out[tower] = {"heads": [p.heads for p in parts], "intermediate": [p.up.out_features for p in parts]}
    return out


def load_pruned(cls, folder: Path, shape: dict[str, Any], attn_implementation: str):
    """Rebuild a pruned model from its recorded shape and load its safetensors weights (strict)."""
    from safetensors.torch import load_file

    config = cls.config_class.from_pretrained(folder)
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    model = cls(config)
    for tower in TOWERS:
        for parts, h, m in zip(tower_layers(model, tower), shape[tower]["heads"], shape[tower]["intermediate"]):
            _resize_layer(parts, h, m)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise VlmedgeError(f"{folder}: weights do not match the recorded pruning shape "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


# --- the stage -----------------------------------------------------------------------------------------------------

def make_plan(model, cfg: PruneConfig, data=None) -> dict[str, Any]:
    towers = {t: tower_layers(model, t) for t in TOWERS}
    scores = IMPORTANCE[cfg.importance](model, towers, cfg, data)
    plan = {}
    for tower, parts in towers.items():
        s = scores[tower]
        # whole layers first: the least important by their heads' and neurons' share of the tower's total
        head_total = sum(x.sum() for x in s["heads"]) or 1.0
        neuron_total = sum(x.sum() for x in s["neurons"]) or 1.0
        layer_score = [h.sum() / head_total + n.sum() / neuron_total for h, n in zip(s["heads"], s["neurons"])]
        n_layers = _keep_count(len(parts), getattr(cfg, f"{tower}_layers"), f"{tower} layers")
        layers = sorted(np.argsort(layer_score)[::-1][:n_layers].tolist())
        heads, neurons = [], []
        for li in layers:
            p = parts[li]
            keep_h = _keep_count(p.heads, getattr(cfg, f"{tower}_heads"), f"heads in {tower} layer {li}")
            keep_n = _keep_count(p.up.out_features, getattr(cfg, f"{tower}_mlp"), f"MLP neurons in {tower} layer {li}")
            heads.append(sorted(np.argsort(s["heads"][li])[::-1][:keep_h].tolist()))
            neurons.append(sorted(np.argsort(s["neurons"][li])[::-1][:keep_n].tolist()))
        plan[tower] = {"layers": layers, "heads": heads, "neurons": neurons}
    return plan


def measure_flops(vlm) -> dict[str, int]:
    """FLOPs of one image and one caption (batch 1), counted by PyTorch's FlopCounterMode on the real model."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..models import image_features, text_features

    size = vlm.preprocess.image_size
    tok = vlm.tokenize(["a photo"])
    out = {}
    with torch.no_grad():
        for name, fn in (("image", lambda: image_features(vlm.model, torch.zeros(1, 3, size, size))),
                         ("text", lambda: text_features(vlm.model, torch.from_numpy(tok["input_ids"]),
                                                        torch.from_numpy(tok["attention_mask"])))):
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = int(counter.get_total_flops())
    return out


def prune(source: str | os.PathLike, out: str | os.PathLike, cfg: PruneConfig = PruneConfig(),
          progress: bool = False) -> dict[str, Any]:
    """Prune a model folder into `out` (written atomically). Returns parameters and FLOPs before and after."""
    from .._io import atomic_dir, write_json
    from ..models import count_parameters, load_model

    vlm = load_model(source, attn_implementation="eager")
    before = {"parameters": count_parameters(vlm.model), "flops": measure_flops(vlm)}
    data = None
    if cfg.importance == "taylor":
        from ..data import open_dataset
        data = (vlm, open_dataset(cfg.data, "train", resolution=vlm.preprocess.image_size,
                                  count=cfg.calibration_batches * cfg.batch_size * 2, seed=cfg.seed))
    plan = make_plan(vlm.model, cfg, data)
    apply_plan(vlm.model, plan)
    vlm.model.config.vlmedge_pruning = shape_of(vlm.model)
    after = {"parameters": count_parameters(vlm.model), "flops": measure_flops(vlm)}
    vlm.source = f"pruned:{source}"
    with atomic_dir(out) as tmp:
        vlm.save(tmp)
        write_json(tmp / "pruning_plan.json", {"config": asdict(cfg), "kept": plan, "before": before,
                                               "after": after})
    return {"before": before, "after": after, "plan_shape": shape_of(vlm.model)}
