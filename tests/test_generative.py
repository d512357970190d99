"""The generative VLM family (SmolVLM architecture): training, the KV-cache decoder, export, the ONNX generation
runtime, evaluation, latency scenarios and its one-line errors, on the tiny preset."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from vlmedge.errors import VlmedgeError
from vlmedge.families.generative import GenerativeEval
from vlmedge.train import TrainConfig, train

TINY = dict(preset="vqa-tiny", batch_size=32, data_count=512, warmup_steps=5)


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_training_lowers_the_answer_nll(vqa_model):
    losses = _losses(vqa_model)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    config = json.loads((vqa_model / "config.json").read_text())
    assert config["architectures"] == ["SmolVLMForConditionalGeneration"]


def test_vision_init_maps_the_dual_encoder_tower_and_freezes_it(tiny_model, tmp_path):
    """The ViT's weights land in SmolVLM's vision transformer and stay fixed while frozen: the frozen tower computes
    exactly what the dual encoder's ViT layers compute on its patches without the class token (SmolVLM's encoder has
    no class slot)."""
    from vlmedge import families
    from vlmedge.families.generative.model import vision_encode
    from vlmedge.models import load_model

    out = tmp_path / "frozen"
    train(TrainConfig(steps=4, vision_init=str(tiny_model), freeze_vision_steps=4, **TINY), out, progress=False)
    vqa = families.of(out).load(out)
    dual = load_model(tiny_model)
    pixels = torch.from_numpy(dual.preprocess(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)))
    with torch.no_grad():
        vit = dual.model.vision_model
        patches = vit.embeddings.patch_embeddings(pixels) + vit.embeddings.position_embeddings[:, 1:]
        for layer in vit.layers:
            patches = layer(patches)
            patches = patches[0] if isinstance(patches, tuple) else patches
        reference = vit.layernorm(patches)
        ours = vision_encode(vqa.model, pixels)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = TrainConfig(steps=6, checkpoint_every=3, freeze_vision_steps=4, **TINY)
    train(cfg, tmp_path / "full", progress=False)

    def crash(step, loss):
        if step == 4:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        train(cfg, tmp_path / "cut", progress=False, on_step=crash)
    assert train(cfg, tmp_path / "cut", resume=True, progress=False)["resumed_from"] == 3
    assert _losses(tmp_path / "cut")[-3:] == pytest.approx(_losses(tmp_path / "full")[3:], abs=1e-5)


def test_kv_cache_decoding_equals_full_recomputation(vqa_model):
    """The export's decoder function: prefill + one cached step per token gives the logits of recomputing the whole
    sequence, and both equal transformers' own forward."""
    from vlmedge import families
    from vlmedge.families.generative.model import decode, empty_past, make_batch, merge, vision_features

    vlm = families.of(vqa_model).load(vqa_model, attn_implementation="eager")
    net = vlm.model
    pixels = torch.from_numpy(vlm.preprocess(np.random.default_rng(1).integers(0, 256, (1, 32, 32, 3), np.uint8)))
    ids, mask, _ = (torch.from_numpy(a) for a in make_batch(vlm, [("what colour is the circle?", "red")]))
    with torch.no_grad():
        embeds = merge(net, ids, vision_features(net, pixels))
        positions = torch.arange(ids.shape[1])[None]
        full, _ = decode(net, embeds, mask, positions, empty_past(net))
        hf = net(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, None]).logits
        torch.testing.assert_close(full, hf, atol=1e-5, rtol=1e-4)
        split = ids.shape[1] - 3
        logits, past = decode(net, embeds[:, :split], mask[:, :split], positions[:, :split], empty_past(net))
        steps = [logits]
        for t in range(split, ids.shape[1]):
            logits, past = decode(net, embeds[:, t:t + 1], mask[:, :t + 1], positions[:, t:t + 1], past)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_export_has_the_edge_layout_and_generates_like_pytorch(vqa_export):
    import onnx

    manifest = json.loads((vqa_export / "manifest.json").read_text())
    assert manifest["family"] == "generative"
    assert manifest["files"] == {"vision": "onnx/vision_encoder.onnx", "embed": "onnx/embed_tokens.onnx",
                                 "decoder": "onnx/decoder_model_merged.onnx"}
    # a model folder in the onnx-community layout (what transformers.js loads: tests/test_transformers_js.py)
    assert manifest["layout"] == "onnx-community"
    for name in ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json"):
        assert (vqa_export / name).is_file(), name
    assert json.loads((vqa_export / "processor_config.json").read_text()) == {
        "image_seq_len": 4, "processor_class": "SmolVLMProcessor"}
    assert json.loads((vqa_export / "tokenizer_config.json").read_text())["chat_template"] == manifest["chat_template"]
    decoder = onnx.load(str(vqa_export / "onnx" / "decoder_model_merged.onnx"), load_external_data=False)
    inputs = [i.name for i in decoder.graph.input]
    outputs = [o.name for o in decoder.graph.output]
    assert inputs[:3] == ["inputs_embeds", "attention_mask", "position_ids"]
    assert inputs[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"]
    # each layer's q/k/v projections are one MatMul, its gate and up projections another, its attention one
    # GroupQueryAttention with the rotary embedding inside, its residual adds fused into its norms
    matmuls = {n.name for n in decoder.graph.node if n.op_type == "MatMul"}
    assert {"/layers.0/qkv/MatMul", "/layers.0/gate_up/MatMul", "/lm_head/MatMul"} <= matmuls
    assert not [n for n in matmuls if "q_proj" in n or "gate_proj" in n]
    layers = manifest["generation"]["layers"]
    ops = [n.op_type for n in decoder.graph.node]
    assert ops.count("GroupQueryAttention") == layers == manifest["fused_attention"]["decoder"]
    assert ops.count("SkipSimplifiedLayerNormalization") == 2 * layers and "Softmax" not in ops
    gqa = next(n for n in decoder.graph.node if n.op_type == "GroupQueryAttention")
    assert onnx.helper.get_attribute_value(next(a for a in gqa.attribute if a.name == "do_rotary")) == 1
    assert manifest["generation"]["image_tokens"] == 4 and manifest["chat_template"]
    parity = manifest["generation_parity"]
    assert parity["questions"] == 100 and parity["identical"] >= 99
    assert all(p["max_abs_diff"] < 1e-4 for p in manifest["parity"].values())


def test_the_traced_decoder_is_kept_when_fusion_is_off(vqa_model, tmp_path):
    """`fuse_attention: false` (`--no-fuse-attention`): the decoder traced from the model's modules, as for a rotary
    embedding GroupQueryAttention cannot hold (`fused.supported`); the same parity and answers."""
    import onnx

    from vlmedge.stages.export import ExportConfig, export

    from vlmedge import families
    from vlmedge.families.generative import fused

    export(vqa_model, tmp_path, ExportConfig(parity_questions=4, tune_threads=False, fuse_attention=False))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    ops = {n.op_type for n in onnx.load(str(tmp_path / manifest["files"]["decoder"])).graph.node}
    assert "GroupQueryAttention" not in ops and "Softmax" in ops
    assert manifest["fused_attention"] == {} and manifest["generation_parity"]["identical"] >= 3
    model = families.of(vqa_model).load(vqa_model).model  # a rotary embedding whose frequencies follow the length
    assert fused.supported(model)
    model.model.text_model.rotary_emb.rope_type = "dynamic"
    assert not fused.supported(model)


def test_graphs_over_the_protobuf_limit_keep_their_weights_in_a_side_file(vqa_model, tmp_path, monkeypatch):
    """A graph whose weights protobuf cannot hold (the 2.2B's 6.8 GB decoder) ships as X.onnx plus X.onnx_data (the
    name transformers.js derives, and config.json tells it to fetch); forced here by lowering the limit: every graph
    keeps its side file, holds its defaults, passes the export's parity and loads the way a browser loads it (the
    graph's bytes and its side file handed over in memory under that name); INT8 is quantized from it."""
    import onnx
    import onnxruntime as ort

    import vlmedge.stages.export as export_stage

    monkeypatch.setattr(export_stage, "ONE_FILE_BYTES", 0)
    out = tmp_path / "onnx"
    export_stage.export(vqa_model, out, export_stage.ExportConfig(parity_questions=2, tune_threads=False))
    manifest = json.loads((out / "manifest.json").read_text())
    for file in manifest["files"].values():
        graph = onnx.load(str(out / file), load_external_data=False)
        assert (out / f"{file}_data").stat().st_size > 0
        assert {t.data_location for t in graph.graph.initializer if t.dims and np.prod(t.dims) > 1} == \
            {onnx.TensorProto.EXTERNAL}, file
    decoder = onnx.load(str(out / manifest["files"]["decoder"]), load_external_data=False)
    assert "logits_to_keep" in {t.name for t in decoder.graph.initializer}
    assert manifest["generation_parity"]["identical"] == manifest["generation_parity"]["questions"] == 2
    config = json.loads((out / "config.json").read_text())
    assert config["transformers.js_config"]["use_external_data_format"] == {
        Path(f).name: 1 for f in manifest["files"].values()}
    for file in manifest["files"].values():
        options, data = ort.SessionOptions(), (out / f"{file}_data").read_bytes()
        options.add_external_initializers_from_files_in_memory([f"{Path(file).name}_data"], [data], [len(data)])
        ort.InferenceSession((out / file).read_bytes(), options, providers=["CPUExecutionProvider"])
    # INT8 from it: ORT's quantizer reads the weights from the side files, the graphs it writes hold them inline
    from vlmedge.stages.quantize import QuantizeConfig, quantize

    info = quantize(out, tmp_path / "q8", QuantizeConfig(agreement_questions=2, tune_threads=False))
    q8 = json.loads((tmp_path / "q8" / "manifest.json").read_text())
    assert sorted(f"onnx/{p.name}" for p in (tmp_path / "q8" / "onnx").iterdir()) == sorted(q8["files"].values())
    assert info["answer_agreement"]["questions"] == 2 and min(info["drift"].values()) > 0.9


def test_the_decoder_keeps_the_last_logits_when_asked_and_all_by_default(vqa_export):
    """`logits_to_keep` is an input with a default (transformers.js, which feeds no such input, sees only the
    required ones and gets every position's logits); the runtime's prefill asks for the last position's only."""
    import onnxruntime as ort

    from vlmedge.runtime.generate import past_names

    gen = json.loads((vqa_export / "manifest.json").read_text())["generation"]
    session = ort.InferenceSession(str(vqa_export / "onnx" / "decoder_model_merged.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert "logits_to_keep" not in [i.name for i in session.get_inputs()]
    assert [i.name for i in session.get_overridable_initializers()] == ["logits_to_keep"]
    rng, s = np.random.default_rng(0), 6
    feeds = {"inputs_embeds": rng.standard_normal((2, s, gen["hidden_size"])).astype(np.float32),
             "attention_mask": np.ones((2, s), dtype=np.int64), "position_ids": np.tile(np.arange(s), (2, 1)),
             **{n: np.zeros((2, gen["kv_heads"], 0, gen["head_dim"]), dtype=np.float32)
                for n in past_names(gen["layers"])}}
    every = session.run(["logits"], feeds)[0]
    assert every.shape[:2] == (2, s)
    for keep in (1, 3, s + 4):  # more than the positions: all of them
        kept = session.run(["logits"], {**feeds, "logits_to_keep": np.array([keep], dtype=np.int64)})[0]
        np.testing.assert_array_equal(kept, every[:, -keep:])


def test_onnx_runtime_generation_equals_pytorch_generate(vqa_model, vqa_export):
    """The numpy + onnxruntime greedy loop against HF generate, answer by answer, on held-out questions; and the
    evaluation of both within 0.005."""
    from vlmedge import families
    from vlmedge.evaluate import EvalConfig
    from vlmedge.families.generative.data import open_vqa

    fam = families.of(vqa_export)
    onnx_gen, torch_gen = fam.adapter(vqa_export), fam.adapter(vqa_model)
    ds = open_vqa("shapes:64", "val", resolution=32, seed=3)
    for it in ds.eval_items(24, seed=3):
        pixels, prompt = torch_gen.inputs(ds.images([it.index])[0], it.question)
        assert onnx_gen.generate_ids(pixels, prompt, 12) == torch_gen.generate_ids(pixels, prompt, 12), it
    cfg = EvalConfig(data="shapes", options=GenerativeEval(vqa_questions=80))
    a, b = fam.evaluate(onnx_gen, cfg), fam.evaluate(torch_gen, cfg)
    assert abs(a["vqa"]["accuracy"] - b["vqa"]["accuracy"]) <= 0.005
    assert set(a["vqa"]) >= {"accuracy", "type_colour", "type_relation", "type_count", "held_out"}
    assert {"bleu4", "rouge_l", "cider", "truth"} <= set(a["caption"])


def test_bench_times_the_generation_phases_on_torch_and_cpu(vqa_model, vqa_export, tmp_path):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli("bench", str(vqa_model), str(vqa_export), "--min-runs", "5", "--min-seconds", "0.05",
                                "--warmup", "1", "--json", str(out))
    assert code == 0, err
    results = json.loads(out.read_text())["results"]
    torch_rec, cpu_rec = results[vqa_model.name]["torch"], results[vqa_export.name]["cpu"]
    for rec in (torch_rec, cpu_rec):
        assert {"vision", "prefill", "ttft", "decode", "answer"} <= set(rec) and rec["tokens_per_s"] > 0
        assert rec["answer"]["p50_ms"] > rec["decode"]["p50_ms"]
    assert "prefill" in stdout and "ttft" in stdout and "decode" in stdout


def test_gate_reads_the_generative_latency(vqa_export, tmp_path):
    """`cpu.answer.p90_ms` and friends are report quantities like the dual encoder's."""
    from vlmedge.gate import quantity
    from vlmedge.runtime.measure import MeasureConfig
    from vlmedge.targets import get_target

    rec = get_target("cpu")(vqa_export, MeasureConfig(warmup=1, min_runs=3, min_seconds=0.01))
    value, _ = quantity({"latency": {"cpu": rec}}, "cpu.answer.p90_ms")
    assert value == rec["answer"]["p90_ms"] > 0


# --- user data and folders -------------------------------------------------------------------------------------------

def _png(path, colour):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_vqa_v2_pair_and_metadata_rows_load(tmp_path):
    from vlmedge.families.generative.data import open_vqa

    _png(tmp_path / "v2" / "COCO_000000000001.jpg", (200, 0, 0))
    _png(tmp_path / "v2" / "COCO_000000000002.jpg", (0, 0, 200))
    (tmp_path / "v2" / "questions.json").write_text(json.dumps({"questions": [
        {"question_id": 10, "image_id": 1, "question": "what colour is it?"},
        {"question_id": 20, "image_id": 2, "question": "what colour is it?"}]}))
    (tmp_path / "v2" / "annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": 10, "answers": [{"answer": "red"}] * 10, "answer_type": "other"},
        {"question_id": 20, "answers": [{"answer": "blue"}] * 9 + [{"answer": "navy"}], "answer_type": "other"}]}))
    ds = open_vqa(str(tmp_path / "v2"), resolution=32)
    assert len(ds) == 2 and ds.images([0]).shape == (1, 32, 32, 3)
    assert [i.answers[0] for i in ds.eval_items(10)] == ["red", "blue"]
    folder = tmp_path / "meta"
    _png(folder / "a.png", (0, 200, 0))
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "question": "what colour?",
                                                       "answer": "green"}) + "\n")
    pairs, _ = open_vqa(str(folder), resolution=32).training_captions([0], np.random.default_rng(0))
    assert pairs == [("what colour?", "green")]


def test_vqa_score_normalises_as_vqa_v2():
    from vlmedge.families.generative.tasks import normalise_answer, vqa_score

    assert normalise_answer("Two.") == "2" and normalise_answer("the top-left") == "top left"
    assert vqa_score("red", ["red"] * 2 + ["crimson"] * 8) == pytest.approx(2 / 3)
    assert vqa_score("Red", ["red"]) == 1.0 and vqa_score("blue", ["red"]) == 0.0


@pytest.mark.parametrize("case, expected", [
    ("missing_question", "question_id 99 is not among the questions"),
    ("answer_not_text", "answers[0]: answer 5 is empty or not text"),
])
def test_bad_vqa_files_get_one_line_errors(tmp_path, case, expected):
    from vlmedge.families.generative.data import open_vqa

    _png(tmp_path / "COCO_000000000001.jpg", (200, 0, 0))
    (tmp_path / "questions.json").write_text(json.dumps({"questions": [
        {"question_id": 1, "image_id": 1, "question": "what colour is it?"}]}))
    ann = {"question_id": 99 if case == "missing_question" else 1,
           "answers": [{"answer": 5 if case == "answer_not_text" else "red"}]}
    (tmp_path / "annotations.json").write_text(json.dumps({"annotations": [ann]}))
    with pytest.raises(VlmedgeError, match=re.escape(expected)) as e:
        open_vqa(str(tmp_path), resolution=32)
    assert "annotations.json" in str(e.value) and "\n" not in str(e.value)


def test_a_prompt_longer_than_the_context_is_refused(vqa_model):
    from vlmedge import families

    vlm = families.of(vqa_model).load(vqa_model)
    with pytest.raises(VlmedgeError, match=r"the prompt is \d+ tokens .* the model's context is 64"):
        vlm.prompt_ids("what colour is the circle " * 20)


def test_vision_init_from_another_architecture_is_refused(vqa_model, tmp_path):
    with pytest.raises(VlmedgeError, match="no vision tower vlmedge can map"):
        train(TrainConfig(steps=2, vision_init=str(vqa_model), **TINY), tmp_path / "m", progress=False)
    code, _, err = run_cli("train", "--preset", "vqa-tiny", "--vision-init", str(tmp_path / "nope"), "--steps", "2",
                           "--out", str(tmp_path / "m2"), "--quiet")
    assert code != 0 and "not a model folder" in err and "Traceback" not in err


SMOLVLM_SHAPES = {
    "256m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16),
             "text": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                          num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0),
             "scale_factor": 4},
    "500m": {"vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            image_size=512, patch_size=16),
             "text": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                          num_key_value_heads=5, max_position_embeddings=8192, rope_theta=100000.0),
             "scale_factor": 4},
    "2.2b": {"vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            image_size=384, patch_size=14),
             "text": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                          num_key_value_heads=32, max_position_embeddings=16384, rope_theta=273768.0),
             "scale_factor": 3},
}
"""The published sizes of SmolVLM-256M-Instruct, SmolVLM-500M-Instruct (SigLIP-B/16 at 512 px + SmolLM2-360M) and
SmolVLM-Instruct (2.2B: SigLIP so400m/14 at 384 px + SmolLM2-1.7B), from their config.json files."""


def smolvlm_256m_folder(folder, vision_layers: int, text_layers: int, tokenizer=None):
    """A folder laid out as SmolVLM-256M-Instruct's (`smolvlm_folder`)."""
    return smolvlm_folder(folder, "256m", vision_layers, text_layers, tokenizer)


def smolvlm_folder(folder, shape: str, vision_layers: int | None = None, text_layers: int | None = None,
                   tokenizer=None):
    """A folder laid out as a published SmolVLM's (`SMOLVLM_SHAPES`: 256M: vision 768 wide at 512 px, patch 16,
    pixel shuffle 4 -> 64 image tokens; a 576-wide Llama with 9 query and 3 key/value heads), random weights,
    depth reduced as asked (None: the published depth), a small word-level tokenizer with its special tokens and chat
    template (or the `tokenizer` given, e.g. the peers' byte-level BPE of the published vocabulary size), and its
    processor config (image splitting on, as published: tiles of the vision's image size)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from vlmedge.families.generative.data import open_vqa
    from vlmedge.families.generative.model import SPECIAL, train_tokenizer

    tok = tokenizer
    if tok is None:
        ds = open_vqa("shapes:200", "train", resolution=32)
        pairs, _ = ds.training_captions(range(200), np.random.default_rng(0))
        tok = train_tokenizer([t for qa in pairs for t in qa])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    spec = SMOLVLM_SHAPES[shape]
    vision = {**spec["vision"], "num_hidden_layers": vision_layers or spec["vision"]["num_hidden_layers"]}
    text = {**spec["text"], "num_hidden_layers": text_layers or spec["text"]["num_hidden_layers"]}
    cfg = SmolVLMConfig(
        vision_config=vision,
        text_config=dict(model_type="llama", **text, vocab_size=len(tok), pad_token_id=ids["pad"],
                         bos_token_id=ids["start"], eos_token_id=ids["end"], tie_word_embeddings=True),
        scale_factor=spec["scale_factor"], image_token_id=ids["image"], tie_word_embeddings=True)
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    tile = vision["image_size"]
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**SMOLVLM_PROCESSOR, "max_image_size": {"longest_edge": tile}, "size": {"longest_edge": 4 * tile}}))
    return folder


SMOLVLM_PROCESSOR = {
    "do_convert_rgb": True, "do_image_splitting": True, "do_normalize": True, "do_pad": True, "do_rescale": True,
    "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "Idefics3ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_image_size": {"longest_edge": 512}, "processor_class": "Idefics3Processor",
    "resample": 1, "rescale_factor": 0.00392156862745098, "size": {"longest_edge": 2048}}
"""SmolVLM-256M-Instruct's image processor config: 512 px tiles of an image whose longest edge is resized to 2048."""


@pytest.mark.parametrize("shape,patches", [("256m", 32 * 32), ("2.2b", 27 * 27)])
def test_vision_flops_count_the_encoders_matmuls_as_its_sizes_say(shape, patches):
    """The vision work that reports (`flops`) and the ceiling benchmarks divide by, counted from the modules of an
    encoder built on the meta device at a published size: every linear layer, the patch embedding and the
    connector per patch, each layer's two attention products (14 px patches of a 384 px image: 27 x 27, floored);
    the position-embedding lookup is not a matmul. Heads pruned from a layer take their products with them."""
    from transformers import SmolVLMVisionConfig
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMVisionTransformer

    from vlmedge.families.generative.model import vision_flops

    spec = SMOLVLM_SHAPES[shape]
    v, text_width = spec["vision"], spec["text"]["hidden_size"]
    with torch.device("meta"):
        vision = SmolVLMVisionTransformer(SmolVLMVisionConfig(**v))
    w, layers = v["hidden_size"], v["num_hidden_layers"]
    per_patch = layers * (4 * w * w + 2 * w * v["intermediate_size"]) + 3 * v["patch_size"] ** 2 * w + w * text_width
    assert vision_flops(vision, text_width) == {"linear": 2 * patches * per_patch,
                                                "attention": 4 * patches * patches * w * layers}
    attn = vision.encoder.layers[0].self_attn  # half the heads of one layer gone, as pruning leaves it
    with torch.device("meta"):
        attn.q_proj = torch.nn.Linear(w, w // 2)
    assert vision_flops(vision, text_width)["attention"] == 4 * patches * patches * w * (layers - 0.5)


def test_a_smolvlm2_folder_as_published_exports_and_quantizes(tmp_path):
    """SmolVLM2-500M-Video-Instruct's config.json as published (untied head, `head_dim`, its vision keys, a pad id
    outside the vocabulary at the top level) at reduced depth, with this tokenizer's vocabulary and ids, and its
    processor files (`SmolVLMImageProcessor` with `video_sampling`): exported with parity, quantized to INT8."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    from vlmedge.cli import main
    from vlmedge.families.generative.data import open_vqa
    from vlmedge.families.generative.model import SPECIAL, train_tokenizer

    ds = open_vqa("shapes:200", "train", resolution=32)
    pairs, _ = ds.training_captions(range(200), np.random.default_rng(0))
    tok = train_tokenizer([t for qa in pairs for t in qa])
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in SPECIAL.items()}
    config = {
        "architectures": ["SmolVLMForConditionalGeneration"], "image_token_id": ids["image"], "model_type": "smolvlm",
        "pad_token_id": 128002, "scale_factor": 4, "tie_word_embeddings": False, "torch_dtype": "float32",
        "use_cache": False, "vocab_size": len(tok),
        "text_config": {"architectures": ["VLlama3ForCausalLM"], "head_dim": 64, "hidden_size": 960,
                        "intermediate_size": 2560, "is_llama_config": True, "max_position_embeddings": 8192,
                        "model_type": "llama", "neftune_noise_alpha": 0.0, "num_attention_heads": 15,
                        "num_hidden_layers": 2, "num_key_value_heads": 5, "pad_token_id": ids["pad"],
                        "pixel_shuffle_factor": 4, "qk_layer_norms": False, "rms_norm_eps": 1e-05,
                        "rope_interleaved": False, "rope_theta": 100000, "torch_dtype": "bfloat16",
                        "use_resampler": False, "vocab_size": len(tok), "bos_token_id": ids["start"],
                        "eos_token_id": ids["end"]},
        "vision_config": {"hidden_size": 768, "image_size": 512, "max_image_size": {"longest_edge": 512},
                          "model_type": "smolvlm_vision", "num_attention_heads": 12, "patch_size": 16,
                          "size": {"longest_edge": 2048}, "tie_word_embeddings": False, "use_base_siglip": False,
                          "num_hidden_layers": 1}}
    model = tmp_path / "model"
    torch.manual_seed(0)
    SmolVLMForConditionalGeneration(SmolVLMConfig(**config)).save_pretrained(model)
    (model / "config.json").write_text(json.dumps(config))  # as published, not as transformers writes it back
    tok.save_pretrained(model)
    (model / "preprocessor_config.json").write_text(json.dumps({
        **SMOLVLM_PROCESSOR, "image_processor_type": "SmolVLMImageProcessor", "processor_class": "SmolVLMProcessor",
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}}))
    (model / "processor_config.json").write_text(json.dumps({"image_seq_len": 64,
                                                             "processor_class": "SmolVLMProcessor"}))
    fast = ["--quiet", "--no-eval", "--no-tune-threads"]
    assert main(["export", str(model), "--out", str(tmp_path / "onnx"), "--parity-questions", "1", *fast]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())  # the question a 17-frame split image
    assert manifest["generation"]["image_tokens"] == 64 and manifest["generation_parity"]["identical"] == 1
    assert manifest["generation_parity"]["split_questions"] == 1
    assert {k: manifest["preprocess"][k] for k in ("image_size", "longest_edge", "splitting")} == \
        {"image_size": 512, "longest_edge": 2048, "splitting": True}
    assert main(["quantize", str(tmp_path / "onnx"), "--out", str(tmp_path / "q8"), "--agreement-questions", "0",
                 *fast]) == 0  # random weights: agreement would say nothing


def test_static_int8_quantizes_the_activations_past_fused_operators(smolvlm_export, tmp_path):
    """ONNX's shape inference cannot type what follows the export's fused MultiHeadAttention and FastGelu, and ORT's
    static quantizer leaves an untyped activation in fp32; typed by ORT's symbolic shape inference first, every
    MatMul of the static vision graph reads quantized activations."""
    import onnx

    from vlmedge.stages.quantize import QuantizeConfig, quantize

    _, export = smolvlm_export
    source = onnx.load(str(export / json.loads((export / "manifest.json").read_text())["files"]["vision"])).graph
    assert {"MultiHeadAttention", "FastGelu"} <= {n.op_type for n in source.node}
    quantize(export, tmp_path / "q", QuantizeConfig(graphs={"vision": "static"}, calibration_batches=1, batch_size=1,
                                                    agreement_questions=0, tune_threads=False))
    files = json.loads((tmp_path / "q" / "manifest.json").read_text())["files"]
    graph = onnx.load(str(tmp_path / "q" / files["vision"])).graph
    made_by = {o: n.op_type for n in graph.node for o in n.output}
    assert {made_by.get(n.input[0]) for n in graph.node if n.op_type == "MatMul"} == {"DequantizeLinear"}
    assert not [p for p in (tmp_path / "q").rglob("*") if p.name.startswith(".typed-")]


def test_a_smolvlm_256m_shaped_folder_loads_exports_and_benches(smolvlm_export, tmp_path):
    _, export = smolvlm_export
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["generation"]["image_tokens"] == 64 and manifest["generation"]["kv_heads"] == 3
    # SmolVLM's processor as the folder asks: 512 px tiles of an image resized to 2048 px, split
    assert {k: manifest["preprocess"][k] for k in ("image_size", "longest_edge", "splitting", "resample")} == \
        {"image_size": 512, "longest_edge": 2048, "splitting": True, "resample": 1}
    assert manifest["generation_parity"]["identical"] >= 3  # transformers' generate on the same frames and prompt
    frames = {}
    for setting, runs in (("as-folder", "1"), ("off", "3")):  # split: 13 frames of 512 px, seconds a run
        code, out, err = run_cli("bench", str(export), "--min-runs", runs, "--min-seconds", "0", "--warmup", "0",
                                 "--image-splitting", setting, "--json", str(tmp_path / "b.json"))
        assert code == 0 and "answer" in out, err
        record = next(iter(json.loads((tmp_path / "b.json").read_text())["results"].values()))["cpu"]
        frames[setting] = record["input_image"]
    # 1024x768 -> 2048x1536 -> 4 x 3 tiles of 512 and the global image; 64 image tokens each
    assert frames["as-folder"]["frames"] == 13 and frames["off"]["frames"] == 1
    # each tile: <fake_token_around_image><row_R_col_C> and its image tokens (this tokenizer drops the newlines)
    assert frames["as-folder"]["prompt_tokens"] - frames["off"]["prompt_tokens"] == 12 * (64 + 2)


def test_a_users_folder_is_not_evaluated_on_shapes_and_its_checks_fit_a_time_budget(smolvlm_export, tmp_path,
                                                                                   monkeypatch, capsys):
    """`vlmedge export` and `quantize` of a user's folder without --data: no evaluation on the built-in shapes (one
    line says so), parity and answer agreement on as many questions as a time budget fits (a line states the count,
    the record keeps it), plain progress lines."""
    import vlmedge.stages.export as export_stage
    import vlmedge.stages.quantize as quantize_stage
    from vlmedge.cli import main

    monkeypatch.setattr(export_stage, "PARITY_SECONDS", 1.0)  # the 256M shape's budgets, at this reduced depth
    monkeypatch.setattr(quantize_stage, "AGREEMENT_SECONDS", 1.0)
    monkeypatch.setattr(quantize_stage, "DRIFT_SECONDS", 0.1)
    model, _ = smolvlm_export
    onnx_dir, int8 = tmp_path / "onnx", tmp_path / "int8"
    assert main(["export", str(model), "--out", str(onnx_dir), "--no-tune-threads"]) == 0
    out = capsys.readouterr().out
    assert f"eval: skipped: vlmedge has not trained or evaluated {model} on any data" in out
    parity = json.loads((onnx_dir / "manifest.json").read_text())["generation_parity"]
    assert parity["budget_s"] == 1.0 and parity["split_questions"] == 1 and 3 <= parity["questions"] < 100
    said = [line for line in out.splitlines() if "budget" in line]
    assert said == [next(line for line in said if line.startswith(  # PyTorch answers first, under half the budget
        f"export: generation parity (PyTorch): {parity['questions']} questions (the first 1, then "))], out
    for runtime in ("PyTorch", "ONNX Runtime"):  # then ONNX Runtime the same questions, the model freed
        assert f"export: generation parity ({runtime}): {parity['questions']}/{parity['questions']} (100%)" in out
    record = json.loads((onnx_dir / "artifact.json").read_text())
    assert record["metrics"] == {} and record["data"] is None and not (onnx_dir / "eval.json").exists()
    assert main(["quantize", str(onnx_dir), "--out", str(int8), "--no-tune-threads", "--calibration-batches", "2",
                 "--batch-size", "1"]) == 0
    out = capsys.readouterr().out
    assert f"eval: skipped: vlmedge has not trained or evaluated {onnx_dir} on any data" in out
    info = json.loads((int8 / "artifact.json").read_text())["info"]
    agreement = info["answer_agreement"]
    assert agreement["budget_s"] == 1.0 and 2 <= agreement["questions"] < 100
    assert f"quantize: answer agreement (fp32): {agreement['questions']} questions (the first 1, then " in out
    assert set(info["drift"]) == {"vision_cosine_min", "embed_cosine_min", "decoder_cosine_min"}


def test_parity_counts_two_zero_rows_as_equal():
    """A padding token's embedding is all zeros in both runtimes: equal, not a cosine of 0 (which failed the export
    of a SmolVLM-256M-shaped folder whose random parity ids hit the pad id)."""
    from vlmedge.stages.export import _parity

    zeros = np.zeros((2, 8), dtype=np.float32)
    assert _parity(zeros, zeros) == {"max_abs_diff": 0.0, "cosine_min": 1.0}
    assert _parity(zeros + 1, -(zeros + 1))["cosine_min"] == pytest.approx(-1.0)


def test_an_export_whose_vision_graph_takes_no_frames_says_to_export_again(vqa_export, tmp_path):
    """An export of vlmedge < 0.3: its vision graph takes pixel_values (B, 3, H, W) and no pixel_attention_mask."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from vlmedge.families.generative import OnnxGenerator

    old = tmp_path / "old"
    shutil.copytree(vqa_export, old)
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["image_features"])], "old",
                              [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 32, 32])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, old / "onnx" / "vision_encoder.onnx")
    with pytest.raises(VlmedgeError, match=r"vision_encoder.onnx: .* no input 'pixel_attention_mask'.*export the "
                                           r"model again"):
        OnnxGenerator(old)


def test_export_fuses_unmasked_self_attention_only(vqa_export, smolvlm_export, tiny_export):
    """The vision towers' attention is one MultiHeadAttention per layer (no SkipLayerNormalization, which is slower
    here); the causal decoder's is GroupQueryAttention (written so, not rewritten), a padded text tower keeps its
    own. Parity with PyTorch is checked at export."""
    import onnx

    for folder, layers, text_layers in ((vqa_export, 2, 2), (smolvlm_export[1], 1, 2)):
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["fused_attention"] == {"vision": layers, "decoder": text_layers}
        ops = [n.op_type for n in onnx.load(str(folder / manifest["files"]["vision"])).graph.node]
        assert ops.count("MultiHeadAttention") == layers and "Softmax" not in ops
        assert "SkipLayerNormalization" not in ops
        decoder = onnx.load(str(folder / manifest["files"]["decoder"]), load_external_data=False)
        assert "MultiHeadAttention" not in {n.op_type for n in decoder.graph.node}
    assert "text" not in json.loads((tiny_export / "manifest.json").read_text()).get("fused_attention", {})


def test_a_fused_graph_whose_outputs_differ_is_not_kept(vqa_export, tmp_path):
    """The guard behind the fusion: a rewritten graph that computes something else leaves the original in place."""
    import shutil

    import onnx
    from onnx import numpy_helper

    from vlmedge.stages.export import _fused

    manifest = json.loads((vqa_export / "manifest.json").read_text())
    graph = tmp_path / "vision.onnx"
    shutil.copyfile(vqa_export / manifest["files"]["vision"], graph)
    before = graph.read_bytes()

    def wrong(src, dst):  # the same graph with one weight changed
        model = onnx.load(str(src))
        init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
        onnx.save(model, str(dst))
        return 1

    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((1, 1, 3, 32, 32)).astype(np.float32),
             "pixel_attention_mask": np.ones((1, 1, 32, 32), dtype=bool)}
    assert _fused(graph, feeds, 1e-4, wrong) == 0
    assert graph.read_bytes() == before and not list(tmp_path.glob("*.fused"))
