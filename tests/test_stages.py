import json
import os
import shutil

import numpy as np
import pytest
import torch

from vlmedge.errors import VlmedgeError
from vlmedge.families.dual_encoder.model import image_features, text_features
from vlmedge.models import count_parameters, load_model
from vlmedge.runtime.onnx import OnnxEncoder
from vlmedge.stages.export import ExportConfig, export
from vlmedge.stages.prune import PruneConfig, prune
from vlmedge.stages.quantize import QuantizeConfig, quantize

HALF = dict(vision_heads=0.5, vision_mlp=0.5, text_heads=0.5, text_mlp=0.5, calibration_batches=2, batch_size=16)


@pytest.fixture(scope="module")
def pruned(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pruned") / "model"
    result = prune(tiny_model, out, PruneConfig(**HALF, vision_layers=0.5))
    return out, result


def test_pruning_really_shrinks_and_reloads_identically(pruned):
    out, result = pruned
    before, after = result["before"], result["after"]
    assert after["parameters"] < 0.7 * before["parameters"]
    assert after["flops"]["image"] < 0.6 * before["flops"]["image"]
    assert after["flops"]["text"] < before["flops"]["text"]
    shape = json.loads((out / "config.json").read_text())["vlmedge_pruning"]
    assert shape["vision"]["heads"] == [2] and shape["text"]["heads"] == [2, 2]
    plan = json.loads((out / "pruning_plan.json").read_text())
    assert len(plan["kept"]["vision"]["neurons"][0]) == 64

    a, b = load_model(out), load_model(out, attn_implementation="eager")
    px = torch.randn(3, 3, 32, 32)
    tok = a.tokenize(["a red circle", "a small blue square on the left", "x"])
    ids, mask = torch.from_numpy(tok["input_ids"]), torch.from_numpy(tok["attention_mask"])
    with torch.no_grad():
        assert torch.allclose(image_features(a.model, px), image_features(b.model, px), atol=1e-5)
        assert torch.allclose(text_features(a.model, ids, mask), text_features(b.model, ids, mask), atol=1e-5)
    assert count_parameters(a.model) == after["parameters"]


def test_pruned_model_equals_the_model_before_saving(tiny_model):
    """Surgery keeps the function of kept heads: zeroing the removed heads' weights gives the same output."""
    from vlmedge import families
    from vlmedge.models.structure import apply_plan, tower_layers
    from vlmedge.stages.prune import make_plan

    vlm = load_model(tiny_model, attn_implementation="eager")
    cfg = PruneConfig(vision_heads=0.5, text_heads=0.5, importance="magnitude")
    plan = make_plan(families.get("dual_encoder"), vlm, cfg)
    masked = load_model(tiny_model, attn_implementation="eager")
    for tower in ("vision", "text"):
        for li, parts in enumerate(tower_layers(masked.model, tower)):
            for h in range(parts.heads):
                if h not in plan[tower]["heads"][li]:
                    sl = slice(h * parts.head_dim, (h + 1) * parts.head_dim)
                    parts.o.weight.data[:, sl] = 0
    apply_plan(vlm.model, plan)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(image_features(vlm.model, px), image_features(masked.model, px), atol=1e-5)


def test_impossible_ratio_is_refused_before_any_write(tiny_model, tmp_path):
    with pytest.raises(VlmedgeError, match="vision_heads=1.0 is impossible"):
        PruneConfig(vision_heads=1.0)
    with pytest.raises(VlmedgeError, match="leaves none"):
        prune(tiny_model, tmp_path / "out", PruneConfig(vision_heads=0.9, importance="magnitude"))
    assert not (tmp_path / "out").exists()


def test_export_parity_and_manifest(tiny_export):
    manifest = json.loads((tiny_export / "manifest.json").read_text())
    for tower in ("image", "text"):
        assert manifest["parity"][tower]["max_abs_diff"] <= 1e-4
        assert manifest["parity"][tower]["cosine_min"] >= 0.9999
    assert manifest["preprocess"]["image_size"] == 32 and "tokenizer.json" in manifest["tokenizer"]
    enc = OnnxEncoder(tiny_export)
    e = enc.encode_texts(["a red circle", "a blue square on the left"])
    assert e.shape == (2, manifest["embedding_dim"]) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    e = enc.encode_images(enc.preprocess(np.zeros((5, 32, 32, 3), np.uint8)))  # dynamic batch
    assert e.shape[0] == 5


def test_export_of_pruned_and_clip_models(pruned, tiny_clip, tmp_path):
    for src, name in ((pruned[0], "pruned"), (tiny_clip, "clip")):
        r = export(src, tmp_path / name, ExportConfig(zero_shot_labels=("a red circle", "a blue square")))
        assert r["parity"]["image"]["max_abs_diff"] <= 1e-4 and r["parity"]["text"]["cosine_min"] >= 0.9999
        assert np.load(tmp_path / name / "zero_shot_text_embeds.npy").shape[0] == 2


def test_corrupted_onnx_and_wrong_folder(tiny_export, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_export, broken)
    (broken / "image_encoder.onnx").write_bytes(b"garbage")
    with pytest.raises(VlmedgeError, match="image_encoder.onnx: ONNX Runtime cannot load it"):
        OnnxEncoder(broken)
    with pytest.raises(VlmedgeError, match="cannot load"):
        quantize(broken, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    with pytest.raises(VlmedgeError, match="not an export folder"):
        quantize(tiny_model, tmp_path / "q2")
    with pytest.raises(VlmedgeError, match="no config.json"):
        export(tiny_export, tmp_path / "e")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("mode", ["dynamic", "static", "fp16"])
def test_quantization_modes(tiny_export, tmp_path, mode):
    r = quantize(tiny_export, tmp_path / mode, QuantizeConfig(mode=mode, calibration_batches=2, batch_size=8))
    assert r["size_bytes"] < r["fp32_size_bytes"]
    assert min(r["drift"].values()) > 0.95
    manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
    assert manifest["precision"] == ("fp16" if mode == "fp16" else f"int8-{mode}")
    OnnxEncoder(tmp_path / mode).encode_texts(["a red circle"])
    if mode == "static":
        import onnx
        ops = {n.op_type for n in onnx.load(str(tmp_path / mode / "image_encoder.onnx")).graph.node}
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


# Integer matrix products in a dynamic INT8 graph, before and after ONNX Runtime's offline fusion.
INT8_MATMULS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


def _node_ops(path) -> list[tuple[str, str]]:
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(path)).graph.node]


def _op_types(path) -> list[str]:
    return [op for _, op in _node_ops(path)]


def test_quantize_keeps_named_nodes_and_op_types_in_fp32(tiny_export, tmp_path):
    r = quantize(tiny_export, tmp_path / "q", QuantizeConfig(exclude_op_types=("Gather",),
                                                             exclude_nodes=(r".*layers?\.0/.*",)))
    assert r["size_bytes"] < r["fp32_size_bytes"]
    ops = _op_types(tmp_path / "q" / "text_encoder.onnx")
    assert "Gather" in ops and INT8_MATMULS & set(ops)
    assert "MatMul" in ops  # layer 0 stayed fp32


def test_dynamic_int8_is_saved_optimized_and_matches_the_unoptimized_graph(tiny_export, tmp_path):
    """The offline-optimized file fuses quantize + integer MatMul + rescale: fewer nodes, smaller, same outputs."""
    plain = quantize(tiny_export, tmp_path / "plain", QuantizeConfig(optimize="none"))
    fused = quantize(tiny_export, tmp_path / "fused", QuantizeConfig())
    for name in ("image_encoder.onnx", "text_encoder.onnx"):
        a, b = _op_types(tmp_path / "plain" / name), _op_types(tmp_path / "fused" / name)
        assert len(b) < len(a) and "DynamicQuantizeMatMul" in b and "MatMulInteger" not in b, (a, b)
        assert "SkipLayerNormalization" not in b  # a slower kernel than Add + LayerNormalization: not fused
    # the patch embedding is exported as a MatMul (ORT's ConvInteger is slow) and quantized with the other layers
    assert not {"Conv", "ConvInteger"} & set(_op_types(tiny_export / "image_encoder.onnx"))
    plain_image = _node_ops(tmp_path / "plain" / "image_encoder.onnx")
    assert any(n.startswith("/vision_model/embeddings/") for n, op in plain_image if op == "MatMulInteger")
    assert fused["size_bytes"] < plain["size_bytes"]
    texts = ["a red circle", "a small blue square on the left"]
    pixels = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    a, b = OnnxEncoder(tmp_path / "plain"), OnnxEncoder(tmp_path / "fused")
    np.testing.assert_allclose(a.encode_texts(texts), b.encode_texts(texts), atol=1e-5)
    np.testing.assert_allclose(a.encode_images(pixels), b.encode_images(pixels), atol=1e-5)


def test_dynamic_int8_reads_the_weights_from_disk_and_writes_what_onnx_runtime_writes(tiny_export, tmp_path):
    """ORT's quantizer is handed the graph without its weights (read one at a time from the source's side file, or a
    temporary one for a graph holding them inline): the file written is byte for byte the one ORT's own call writes,
    nothing is left beside the source or the output, and the working directory is given back."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vlmedge.stages.quantize import _quantize_dynamic

    src = tiny_export / "text_encoder.onnx"
    side = tmp_path / "side"
    side.mkdir()
    onnx.save_model(onnx.load(str(src)), str(side / "text.onnx"), save_as_external_data=True,
                    location="text.onnx.data", size_threshold=0)
    options = dict(op_types_to_quantize=["MatMul", "Gather"], per_channel=False, weight_type=QuantType.QInt8)
    quantize_dynamic(src, tmp_path / "ort.onnx", **options, extra_options={})
    here = os.getcwd()
    out = tmp_path / "out"
    out.mkdir()
    for source in (src, side / "text.onnx"):
        _quantize_dynamic(source, out / f"{source.parent.name}.onnx", **options, extra_options={})
        assert (out / f"{source.parent.name}.onnx").read_bytes() == (tmp_path / "ort.onnx").read_bytes(), source
    assert os.getcwd() == here
    assert sorted(os.listdir(out)) == sorted([f"{tiny_export.name}.onnx", "side.onnx"])
    assert sorted(os.listdir(side)) == ["text.onnx", "text.onnx.data"]


def test_accuracy_aware_quantization_falls_back_until_within_tolerance(tiny_export, tmp_path):
    """A metric that counts quantized nodes forces fallbacks: the loop must keep groups until within tolerance."""

    def fake_metric(enc):
        n = sum(op in INT8_MATMULS for s in ("image_encoder.onnx", "text_encoder.onnx")
                for op in _op_types(enc.folder / s))
        return {"zero_shot.top1": 1.0 - 0.01 * n}

    r = quantize(tiny_export, tmp_path / "q", QuantizeConfig(max_drop=0.05, calibration_batches=1, batch_size=8),
                 evaluate_fn=fake_metric)
    aa = r["accuracy_aware"]
    assert aa["within_tolerance"] and aa["steps"], aa
    assert sum(len(v) for v in r["kept_fp32"].values()) == len(aa["steps"])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="thread tuning needs at least 2 cores")
def test_thread_tuning_is_recorded_per_tower_and_used_only_on_the_same_machine(tiny_export, tmp_path):
    from vlmedge.runtime.measure import machine_key

    tuning = json.loads((tiny_export / "manifest.json").read_text())["threads"]
    counts = {int(n) for n in tuning["p50_ms"]["image"]}
    assert {1, os.cpu_count()} <= counts and tuning["tuned_on"] == machine_key()
    for tower in ("image", "text"):  # the recorded choice is the fastest measured count
        assert tuning[tower] == min(counts, key=lambda n: tuning["p50_ms"][tower][str(n)])
    assert OnnxEncoder(tiny_export).threads == {"image": tuning["image"], "text": tuning["text"]}
    assert OnnxEncoder(tiny_export, threads=2).threads == {"image": 2, "text": 2}
    # another machine: the tuning does not apply (ONNX Runtime's default)
    moved = tmp_path / "moved"
    shutil.copytree(tiny_export, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["threads"]["tuned_on"]["cpu"] = "another CPU"
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert OnnxEncoder(moved).threads == {"image": None, "text": None}
    # a quantized folder gets its own tuning, or none when asked: never the fp32 export's
    quantize(tiny_export, tmp_path / "q", QuantizeConfig(tune_threads=False))
    assert "threads" not in json.loads((tmp_path / "q" / "manifest.json").read_text())


def test_a_stage_keeps_its_own_data_and_takes_the_runs_otherwise(tiny_model, tmp_path):
    """prune.data / quantize.data given in a recipe are used, not replaced by the run's data; unset, they are the
    run's (and the step id says which)."""
    from vlmedge.stages import Context, DataSpec, execute, input_artifact, step_id

    parent = input_artifact(tiny_model)
    ctx = Context(data=DataSpec(source="shapes"))
    own = PruneConfig(vision_heads=0.5, calibration_batches=1, batch_size=8, data="shapes:256")
    art = execute(own, parent, ctx, tmp_path / "own")
    assert json.loads((tmp_path / "own" / "pruning_plan.json").read_text())["config"]["data"] == "shapes:256"
    assert art.parent == parent.id and (tmp_path / "own" / "artifact.json").is_file() and art.metrics == {}
    runs = PruneConfig(vision_heads=0.5, calibration_batches=1, batch_size=8)
    execute(runs, parent, ctx, tmp_path / "runs")
    assert json.loads((tmp_path / "runs" / "pruning_plan.json").read_text())["config"]["data"] == "shapes"
    assert step_id(runs, parent, ctx) != step_id(runs, parent, Context(data=DataSpec(source="shapes:256")))


def test_adding_precisions_to_a_flat_export_is_refused(tiny_export, tmp_path):
    """A dual encoder's export names its graphs the same in every precision: adding a quantized one into it would
    replace the fp32 graph, so it is refused before any work, the source untouched."""
    from vlmedge.artifact import product_files
    from vlmedge.stages.quantize import QuantizeConfig, quantize

    before = product_files(tiny_export)
    with pytest.raises(VlmedgeError, match="add_to_source needs an export in the onnx-community layout"):
        quantize(tiny_export, tmp_path / "q", QuantizeConfig(add_to_source=True))
    assert product_files(tiny_export) == before and not (tmp_path / "q").exists()
