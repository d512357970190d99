"""The prunable structure of a model's transformer towers (a dual encoder's two, a matching model's text encoder, a
generative model's vision encoder and Llama decoder), and the surgery that cuts them.

Attention keeps its head size (every supported attention module reshapes with ``view(..., -1, head_dim)``), so a
layer with fewer heads only needs narrower q/k/v/o projections; we keep the modules' head-count attributes
consistent. With grouped-query attention (fewer key/value heads than query heads) the unit is a group: a key/value
head goes only with all the query heads that share it. A gated MLP's gate, up and down projections lose the same
neurons. HF configs cannot say "layer 3 has 4 heads" (and transformers 5 dropped `prune_heads`), so the shape of
a pruned model (layers, heads and MLP width per layer) is written into `config.json` as `vlmedge_pruning` and the
model is rebuilt from it on load (`load_pruned`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmedgeError

TOWERS = ("vision", "text")
# (q, k, v, o) attribute paths inside one layer, then (up, down) for the MLP, per supported architecture.
_ATTENTION_PATHS = (
    ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),  # ViT (transformers 5)
    ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),  # BERT
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),  # CLIP, SigLIP
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),  # Llama (grouped-query)
)
# (up, down) of the MLP; a gated MLP (Llama) also has a gate projection sliced like `up`.
_MLP_PATHS = (("mlp.fc1", "mlp.fc2"), ("intermediate.dense", "output.dense"), ("mlp.up_proj", "mlp.down_proj"))
_GATE_PATH = "mlp.gate_proj"
# A text layer's cross-attention to the image (BLIP's matching text encoder): queries from the text, keys and values
# from the image's patch embeddings.
_CROSS_PATHS = ("crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                "crossattention.output.dense")
_HEAD_ATTRS = ("num_attention_heads", "num_heads")


# --- locating the parts --------------------------------------------------------------------------------------------

@dataclass
class Attention:
    """One attention block's projections: heads are groups of `head_dim` q/k/v rows and o columns."""

    q: Any
    k: Any
    v: Any
    o: Any
    module: Any  # the module holding q/k/v (its head-count attributes are updated)
    head_dim: int

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.k.out_features // self.head_dim


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
    cross: Attention | None = None
    """The layer's cross-attention to the image, where it has one (matching models' text encoder)."""
    gate: Any = None
    """A gated MLP's gate projection (Llama: down(act(gate(x)) * up(x)))."""

    @property
    def heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def kv_heads(self) -> int:
        """Key/value heads: fewer than `heads` with grouped-query attention, each shared by heads // kv_heads."""
        return self.k.out_features // self.head_dim


def _get(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def tower_root(model, tower: str):
    if not hasattr(model, "vision_model") and hasattr(model, "model"):  # SmolVLM: the towers are in .model
        model = model.model
    if tower == "vision":
        return model.vision_model
    return model.text_model if hasattr(model, "text_model") else model.text_encoder  # BLIP: text_encoder


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
    return next((p for p in _ATTENTION_PATHS if all(_get(layer, x) is not None for x in p)), None)


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
        cross = None
        if _get(layer, _CROSS_PATHS[0]) is not None:
            c_module = _get(layer, _CROSS_PATHS[0].rsplit(".", 1)[0])
            cross = Attention(*(_get(layer, p) for p in _CROSS_PATHS), c_module, c_module.attention_head_size)
        parts.append(LayerParts(layer, q, k, v, o, _get(layer, mlp[0]), _get(layer, mlp[1]), module, head_dim,
                                cross, _get(layer, _GATE_PATH)))
    return parts


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


def kv_groups(heads: list[int], n_heads: int, n_kv: int, where: str = "") -> list[int]:
    """The key/value heads that kept query heads use (grouped-query attention: query head h reads key/value head
    h // (n_heads // n_kv)); a one-line error when a group is kept in part."""
    rep = n_heads // n_kv
    groups = sorted({h // rep for h in heads})
    if len(heads) != len(groups) * rep:
        raise VlmedgeError(f"{where or 'pruning'}: query heads {heads} split a grouped-query group of {rep}; a "
                           "key/value head goes only with all the query heads that share it")
    return groups


def _resize_attention(layer, paths: tuple[str, ...], module, head_dim: int, heads: list[int] | int) -> list[int]:
    """Keep the given query heads of one attention block (q rows, o columns; with grouped-query attention the k/v
    rows of their key/value heads) and update its head counts. An int resizes to that many query heads (and the
    same share of key/value heads)."""
    q, k = _get(layer, paths[0]), _get(layer, paths[1])
    n_heads, n_kv = q.out_features // head_dim, k.out_features // head_dim
    head_idx = list(range(heads)) if isinstance(heads, int) else heads
    kv_idx = kv_groups(head_idx, n_heads, n_kv)
    dims = lambda idx: [h * head_dim + d for h in idx for d in range(head_dim)]  # noqa: E731
    _set(layer, paths[0], _slice_linear(q, out_idx=dims(head_idx)))
    for path in paths[1:3]:
        _set(layer, path, _slice_linear(_get(layer, path), out_idx=dims(kv_idx)))
    _set(layer, paths[3], _slice_linear(_get(layer, paths[3]), in_idx=dims(head_idx)))
    for attr in _HEAD_ATTRS:
        if hasattr(module, attr):
            setattr(module, attr, len(head_idx))
    if hasattr(module, "all_head_size"):
        module.all_head_size = len(head_idx) * head_dim
    return head_idx


def _resize_layer(parts: LayerParts, heads: list[int] | int, neurons: list[int] | int,
                  cross_heads: list[int] | int | None = None) -> None:
    """Keep the given heads, neurons and cross-attention heads (index lists), or resize to counts with
    uninitialised weights."""
    layer = parts.layer
    head_idx = _resize_attention(layer, _attention_paths(layer), parts.attention, parts.head_dim, heads)
    if cross_heads is not None and parts.cross is not None:
        _resize_attention(layer, _CROSS_PATHS, parts.cross.module, parts.cross.head_dim, cross_heads)
    mlp = next(p for p in _MLP_PATHS if _get(layer, p[0]) is not None)
    neuron_idx = list(range(neurons)) if isinstance(neurons, int) else neurons
    for path in (mlp[0], _GATE_PATH) if parts.gate is not None else (mlp[0],):
        _set(layer, path, _slice_linear(_get(layer, path), out_idx=neuron_idx))
    _set(layer, mlp[1], _slice_linear(_get(layer, mlp[1]), in_idx=neuron_idx))
    bias = getattr(getattr(parts.attention, "relative_position_bias", None), "relative_position_bias_table", None)
    if bias is not None:  # Swin: one column of relative position biases per head
        import torch
        bias.data = bias.data[:, torch.as_tensor(head_idx)].clone()


def apply_plan(model, plan: dict[str, Any]) -> None:
    """Cut a model down to `plan` (kept layer, head and neuron indices per tower)."""
    import torch.nn as nn

    for tower, tp in plan.items():
        parts = tower_layers(model, tower)
        kept_layers = tp["layers"]
        cross = tp.get("cross_heads") or [None] * len(kept_layers)
        for li, heads, neurons, cross_heads in zip(kept_layers, tp["heads"], tp["neurons"], cross):
            _resize_layer(parts[li], heads, neurons, cross_heads)
        if len(kept_layers) < len(parts):
            layer_list = _layer_list(tower_root(model, tower))
            _replace_module_list(tower_root(model, tower), layer_list,
                                 nn.ModuleList([layer_list[i] for i in kept_layers]))
            tower_config(model, tower).num_hidden_layers = len(kept_layers)
            for i, layer in enumerate(_layer_list(tower_root(model, tower))):  # a KV cache indexes layers by it
                if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
                    layer.self_attn.layer_idx = i


def _replace_module_list(root, old, new) -> None:
    for name, module in root.named_modules():
        for child_name, child in module.named_children():
            if child is old:
                setattr(module, child_name, new)
                return


def shape_of(model, towers: tuple[str, ...] = TOWERS) -> dict[str, Any]:
    """The per-layer shape config.json records (of the `towers` pruning can change): enough to rebuild the module
    tree before loading weights."""
    out = {}
    for tower in towers:
        parts = tower_layers(model, tower)
        out[tower] = {"heads": [p.heads for p in parts], "intermediate": [p.up.out_features for p in parts]}
        if any(p.cross is not None for p in parts):
            out[tower]["cross_heads"] = [p.cross.heads for p in parts]
    return out


def load_pruned(cls, folder: Path, shape: dict[str, Any], attn_implementation: str):
    """Rebuild a pruned model from its recorded shape and load its safetensors weights (strict)."""
    from safetensors.torch import load_file

    config = cls.config_class.from_pretrained(folder)
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    model = cls(config)
    for tower, tshape in shape.items():
        layers = tower_layers(model, tower)
        cross = tshape.get("cross_heads") or [None] * len(layers)
        for parts, h, m, c in zip(layers, tshape["heads"], tshape["intermediate"], cross):
            _resize_layer(parts, h, m, c)
    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()  # a tied lm_head is stored once (as the embedding)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    missing = [k for k in missing if not k.endswith("position_ids")
               and not (k in params and params[k].data_ptr() in loaded)]
    if missing or unexpected:
        raise VlmedgeError(f"{folder}: weights do not match the recorded pruning shape "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def count_flops(parts: dict[str, Any]) -> dict[str, int]:
    """FLOPs of each part's call (name -> a function of no arguments), counted by PyTorch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    with torch.no_grad():
        for name, fn in parts.items():
            counter = FlopCounterMode(display=False)
            with counter:
                fn()
            out[name] = int(counter.get_total_flops())
    return out
