"""The Llama decoder written as ONNX Runtime's fused operators, the graph onnxruntime-genai's model builder writes
for Llama models: per layer one packed query/key/value MatMul, `GroupQueryAttention` (com.microsoft) with the
rotary embedding inside (cos/sin caches of every position up to `max_position_embeddings`) and the KV cache in
onnx-community's names, one packed gate/up MatMul, and the residual adds fused into
`SkipSimplifiedLayerNormalization`; the LM head its own MatMul (a tied head gets a transposed copy of the
embedding table), applied to the last `logits_to_keep` positions only.

The traced decoder (`model.decode` through torch.onnx) computes the same in plain ops (the rotary embedding, the
grouped heads' repeat, the causal mask and softmax), many small kernels per layer; this graph's decode step equals
onnxruntime-genai's builder's in time and, at fp32, bit for bit (benchmarks/results/genai-decoder-256m.json).

The graph keeps the traced decoder's inputs and outputs (`inputs_embeds`, `attention_mask`, `position_ids`,
`past_key_values.N.key/value`, `logits_to_keep` -> `logits`, `present.N.key/value`), so every runtime that feeds one
feeds the other: GroupQueryAttention reads the total length per row from the attention mask (`seqlens_k`: a
right-aligned row, no left padding) and the rotary positions from `position_ids`. Weights are written tensor by
tensor to the graph's side file, so the export holds the torch model and one layer's packed tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..onnx_export import SideFile

STREAMED_ROPE = ("dynamic", "longrope")
"""Rotary types whose frequencies change with the sequence length: no fixed cos/sin cache, the traced graph."""


def supported(model) -> bool:
    """Can `write` express this decoder (a Llama with a rotary type of fixed frequencies, SiLU, no biases)?"""
    lm = model.model.text_model
    return (len(lm.layers) > 0 and getattr(lm.rotary_emb, "rope_type", "default") not in STREAMED_ROPE
            and all(layer.self_attn.q_proj.bias is None and layer.self_attn.o_proj.bias is None
                    and layer.mlp.gate_proj.bias is None and layer.mlp.down_proj.bias is None for layer in lm.layers)
            and type(lm.layers[0].mlp.act_fn).__name__ in ("SiLU", "SiLUActivation"))


def write(model, path: Path, opset: int, input_names, output_names) -> int:
    """The decoder of `model` (a `GenerativeVLM`'s torch model) as the fused graph at `path`, its weights in the side
    file; returns the bytes of weights written. `input_names` / `output_names`: the traced graph's, in its order
    (inputs_embeds, attention_mask, position_ids, the past, logits_to_keep; logits, the presents)."""
    import onnx
    import torch
    from onnx import TensorProto, helper

    lm = model.model.text_model
    layers = lm.layers
    hidden = lm.config.hidden_size
    kv = layers[0].self_attn.k_proj.out_features // layers[0].self_attn.head_dim
    head_dim = layers[0].self_attn.head_dim
    embeds, mask, positions, *past, keep = input_names
    nodes: list[Any] = []
    initializers: list[Any] = []

    def node(op, inputs, name, outputs=1, domain="", **attrs):
        outs = [f"{name}/output_{i}" if o is None else o
                for i, o in enumerate(outputs if isinstance(outputs, list) else [None] * outputs)]
        nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(name, values, dtype=np.int64):  # a Constant node, as torch.onnx writes small values
        nodes.append(helper.make_node("Constant", [], [name], name=name,
                                      value=onnx.numpy_helper.from_array(np.asarray(values, dtype=dtype), name)))
        return name

    def axes_op(op, x, axes, name, **attrs):  # ReduceSum took axes as an input from opset 13, ReduceMean from 18
        if opset >= (13 if op == "ReduceSum" else 18):
            return node(op, [x, const(f"{name}/axes", axes)], name, **attrs)
        return node(op, [x], name, axes=list(axes), **attrs)

    def matrix(linears):  # (in, out): the linears' weights side by side, as MatMul's second input
        with torch.no_grad():
            w = torch.cat([lin.weight.detach() for lin in linears]).t().contiguous().float()
        return w.numpy()

    with SideFile(path) as weights:
        def weight(name, array):
            initializers.append(weights.add(name, np.asarray(array, dtype=np.float32)))
            return name

        # GroupQueryAttention's lengths from the mask: seqlens_k = valid keys - 1 per row, the total as a scalar
        valid = axes_op("ReduceSum", mask, [1], "/mask/ReduceSum", keepdims=0)
        seqlens = node("Cast", [node("Sub", [valid, const("/mask/one", 1)], "/mask/Sub")], "/mask/seqlens_k",
                       to=TensorProto.INT32)
        total = node("Cast", [node("Gather", [node("Shape", [mask], "/mask/Shape"), const("/mask/axis", 1)],
                                   "/mask/Gather", axis=0)], "/mask/total_sequence_length", to=TensorProto.INT32)
        with torch.no_grad():
            steps = torch.arange(lm.config.max_position_embeddings)[None]
            cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), steps)
        cos_cache = weight("cos_cache", cos[0, :, :head_dim // 2].float().numpy())
        sin_cache = weight("sin_cache", sin[0, :, :head_dim // 2].float().numpy())

        residual = embeds
        h = _rms_norm(node, axes_op, const, weight, embeds, layers[0].input_layernorm, "/layers.0/norm")
        for i, layer in enumerate(layers):
            p = f"/layers.{i}"
            attn, mlp = layer.self_attn, layer.mlp
            if i:
                h, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                         [residual, h, weight(f"layers.{i}.input_layernorm.weight",
                                                              layer.input_layernorm.weight.detach().numpy())],
                                         f"{p}/input_layernorm", outputs=[None, "", "", None], domain="com.microsoft",
                                         epsilon=float(layer.input_layernorm.variance_epsilon))
            qkv = node("MatMul", [h, weight(f"layers.{i}.attn.qkv.weight",
                                            matrix([attn.q_proj, attn.k_proj, attn.v_proj]))], f"{p}/qkv/MatMul")
            out = f"{p}/attn/GroupQueryAttention/output_0"
            nodes.append(attention_node(f"{p}/attn/GroupQueryAttention", qkv, (past[2 * i], past[2 * i + 1]),
                                        seqlens, total, (cos_cache, sin_cache), positions,
                                        [out, output_names[1 + 2 * i], output_names[2 + 2 * i]],
                                        attn.q_proj.out_features // head_dim, kv, float(attn.scaling)))
            o = node("MatMul", [out, weight(f"layers.{i}.attn.o_proj.weight", matrix([attn.o_proj]))],
                     f"{p}/attn/o_proj/MatMul")
            h, _, _, residual = node("SkipSimplifiedLayerNormalization",
                                     [residual, o, weight(f"layers.{i}.post_attention_layernorm.weight",
                                                          layer.post_attention_layernorm.weight.detach().numpy())],
                                     f"{p}/post_attention_layernorm", outputs=[None, "", "", None],
                                     domain="com.microsoft",
                                     epsilon=float(layer.post_attention_layernorm.variance_epsilon))
            width = mlp.gate_proj.out_features
            gate_up = node("MatMul", [h, weight(f"layers.{i}.mlp.gate_up.weight",
                                                matrix([mlp.gate_proj, mlp.up_proj]))], f"{p}/gate_up/MatMul")
            split = {"inputs": [gate_up, const(f"{p}/mlp/split", [width, width])]} if opset >= 13 else \
                {"inputs": [gate_up], "split": [width, width]}
            gate, up = node("Split", split.pop("inputs"), f"{p}/mlp/Split", outputs=2, axis=-1, **split)
            act = node("Mul", [gate, node("Sigmoid", [gate], f"{p}/mlp/act/Sigmoid")], f"{p}/mlp/act/Mul")
            h = node("MatMul", [node("Mul", [act, up], f"{p}/mlp/Mul"),
                                weight(f"layers.{i}.mlp.down_proj.weight", matrix([mlp.down_proj]))],
                     f"{p}/mlp/down_proj/MatMul")
        h = node("SkipSimplifiedLayerNormalization",
                 [residual, h, weight("norm.weight", lm.norm.weight.detach().numpy())], "/norm",
                 domain="com.microsoft", epsilon=float(lm.norm.variance_epsilon))
        # the last `keep` positions (0 or more than there are: all), then the head
        length = node("Gather", [node("Shape", [h], "/keep/Shape"), const("/keep/axis", 1)], "/keep/Gather", axis=0)
        length = node("Unsqueeze", [length, const("/keep/unsqueeze", [0])], "/keep/length") if opset >= 13 else \
            node("Unsqueeze", [length], "/keep/length", axes=[0])
        some = node("And", [node("Greater", [keep, const("/keep/zero", [0])], "/keep/Greater"),
                            node("Less", [keep, length], "/keep/Less")], "/keep/And")
        start = node("Where", [some, node("Sub", [length, keep], "/keep/Sub"), const("/keep/first", [0])],
                     "/keep/Where")
        h = node("Slice", [h, start, const("/keep/end", [np.iinfo(np.int64).max]), const("/keep/axes", [1])],
                 "/keep/Slice")
        node("MatMul", [h, weight("lm_head.weight", matrix([model.lm_head]))], "/lm_head/MatMul",
             outputs=[output_names[0]])

    b, s, t, p_ = "batch_size", "sequence_length", "total_sequence_length", "past_sequence_length"
    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [helper.make_tensor_value_info(embeds, f32, [b, s, hidden]),
              helper.make_tensor_value_info(mask, i64, [b, t]),
              helper.make_tensor_value_info(positions, i64, [b, s]),
              *[helper.make_tensor_value_info(n, f32, [b, kv, p_, head_dim]) for n in past],
              helper.make_tensor_value_info(keep, i64, [1])]
    vocab = model.lm_head.out_features
    outputs = [helper.make_tensor_value_info(output_names[0], f32, [b, "logits_sequence_length", vocab]),
               *[helper.make_tensor_value_info(n, f32, [b, kv, t, head_dim]) for n in output_names[1:]]]
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    graph = helper.make_graph(nodes, "decoder", inputs, outputs, initializers)
    # the oldest IR version of the opset, as torch.onnx writes (onnx's newest is newer than some runtimes read)
    onnx.save_model(helper.make_model(graph, opset_imports=opsets, producer_name="vlmedge",
                                      ir_version=helper.find_min_ir_version_for(opsets, ignore_unknown=True)),
                    str(path))
    return weights.written


def attention_node(name: str, qkv: str, past: tuple[str, str], seqlens: str, total: str, rotary: tuple[str, str],
                   positions: str, outputs: list[str], heads: int, kv_heads: int, scale: float | None = None):
    """One layer's `GroupQueryAttention` node as `write` writes it: packed QKV in, the rotary embedding inside
    (`rotary`: the cos and sin caches, halves not interleaved), no sliding window, the cache in (`past`: key,
    value) and out (`outputs`: the attention's output, present key, present value); `scale` None: 1 / sqrt(head
    size)."""
    from onnx import helper

    return helper.make_node("GroupQueryAttention", [qkv, "", "", *past, seqlens, total, *rotary, positions], outputs,
                            name=name, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1,
                            rotary_interleaved=0, local_window_size=-1, **({} if scale is None else {"scale": scale}))


def _rms_norm(node, axes_op, const, weight, x, norm, name):
    """The first layer's RMS norm in plain ops (there is no residual to fuse yet; ONNX has no RMS norm before
    opset 23 and ONNX Runtime's SimplifiedLayerNormalization is not a checked op): ONNX Runtime's graph
    optimizations fuse this pattern into SimplifiedLayerNormalization when the session opens."""
    square = node("Pow", [x, const(f"{name}/two", 2.0, np.float32)], f"{name}/Pow")
    mean = axes_op("ReduceMean", square, [-1], f"{name}/ReduceMean", keepdims=1)
    root = node("Sqrt", [node("Add", [mean, const(f"{name}/eps", float(norm.variance_epsilon), np.float32)],
                              f"{name}/Add")], f"{name}/Sqrt")
    return node("Mul", [node("Div", [x, root], f"{name}/Div"),
                        weight("layers.0.input_layernorm.weight", norm.weight.detach().numpy())], f"{name}/Mul")
