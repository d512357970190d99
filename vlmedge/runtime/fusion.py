"""Self-attention as one ONNX Runtime `MultiHeadAttention` node (com.microsoft contrib op, CPU and CUDA kernels; the
CPU one a flash-attention loop), written into an exported graph.

An unfused attention is six kernels per layer (QK^T MatMul, scale, Softmax, MatMul with V and the head transposes),
each a pass over a `heads x tokens x tokens` tensor: at SmolVLM-256M's vision shape (1024 patches, 12 heads) they took
337 ms of 730 in the INT8 graph, the fused op 222 ms (ORT 1.32, 2 threads, AVX-512 EPYC). The rewrite is ONNX
Runtime's transformer optimizer's attention fusion for encoder layers without a mask (`FusionAttentionClip`) asked
for MultiHeadAttention instead of Attention, so Q, K and V stay three MatMuls that quantization treats like any other
linear. The optimizer also fuses residual Add + LayerNormalization into SkipLayerNormalization, which it needs to
find the layers and which is slower on CPU (`measure.SLOW_FUSIONS`): those are split back afterwards.

Attention with a padding or causal mask is left as it is (MultiHeadAttention takes no additive bias here); the caller
checks the rewritten graph's outputs against the original's before keeping it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .measure import SLOW_FUSIONS


def fuse_attention(src: Path, dst: Path) -> int:
    """Write `src` with its unmasked self-attention fused to `dst`; returns the number of MultiHeadAttention nodes
    (0: nothing matched, `dst` not written)."""
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_clip import ClipOnnxModel

    graph = onnx.load(str(src))
    if not _unmasked_softmax(graph):  # a causal decoder's: its optimizer passes would take half a minute at 256M
        return 0
    quiet = logging.getLogger("onnxruntime.transformers")  # it logs one line per pattern it tries
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        model = ClipOnnxModel(graph, num_heads=0, hidden_size=0)  # 0: read from each Reshape
        fusion = model.clip_attention_fusion
        fusion.use_multi_head_attention = True
        fusion.fused_op_type = "MultiHeadAttention"
        generic = fusion.get_num_heads_and_hidden_size

        def heads_and_width(reshape_q):  # torch.onnx writes the head split as (batch, tokens, -1, head size)
            concat = model.match_parent(reshape_q, "Concat", 1)
            size = model.get_constant_value(concat.input[3]) if concat is not None and len(concat.input) == 4 else None
            bias = model.match_parent(reshape_q, "Add", 0)
            widths = [model.get_initializer(i).dims for i in bias.input if model.get_initializer(i)] if bias else []
            if size is not None and len(size) == 1 and size[0] > 0 and len(widths) == 1 and len(widths[0]) == 1:
                width = int(widths[0][0])
                if width % int(size[0]) == 0:
                    return width // int(size[0]), width
            return generic(reshape_q)

        fusion.get_num_heads_and_hidden_size = heads_and_width
        model.optimize(FusionOptions("clip"), add_dynamic_axes=False)  # with it, GELU's tanh form as FastGelu
    finally:
        quiet.setLevel(level)
    fused = sum(n.op_type == "MultiHeadAttention" for n in model.model.graph.node)
    if not fused:
        return 0
    if "SkipLayerNormFusion" in SLOW_FUSIONS:
        _split_skip_layer_norm(model.model)
    model.topological_sort()
    if not any(o.domain == "com.microsoft" for o in model.model.opset_import):
        model.model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    onnx.save(model.model, str(dst))
    return fused


def _unmasked_softmax(model) -> bool:
    """Does a Softmax read scaled scores straight from their MatMul (no mask added between)?"""
    producer = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type == "Softmax":
            p = producer.get(n.input[0])
            if p is not None and (p.op_type == "MatMul" or p.op_type in ("Mul", "Div")
                                  and any(producer.get(i) is not None and producer[i].op_type == "MatMul"
                                          for i in p.input)):
                return True
    return False


def _split_skip_layer_norm(model) -> None:
    """SkipLayerNormalization(x, skip, gamma, beta?, bias?) back to Add (+ Add bias) + LayerNormalization; its fourth
    output (the sum) is the Add's."""
    from onnx import helper

    nodes = []
    for n in model.graph.node:
        if n.op_type != "SkipLayerNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-12)
        x, skip, gamma = n.input[:3]
        beta = n.input[3] if len(n.input) > 3 and n.input[3] else ""
        bias = n.input[4] if len(n.input) > 4 and n.input[4] else ""
        total = n.output[3] if len(n.output) > 3 and n.output[3] else f"{n.name}_sum"
        summed = f"{n.name}_x_skip" if bias else total
        nodes.append(helper.make_node("Add", [x, skip], [summed], name=f"{n.name}_add"))
        if bias:
            nodes.append(helper.make_node("Add", [summed, bias], [total], name=f"{n.name}_add_bias"))
        nodes.append(helper.make_node("LayerNormalization", [total, gamma] + ([beta] if beta else []), [n.output[0]],
                                      name=f"{n.name}_norm", axis=-1, epsilon=eps))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
