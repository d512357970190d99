"""Compressing the generative VLM: structured pruning of the vision encoder and the grouped-query Llama decoder,
token-level distillation, and per-graph quantization (INT8 / INT4 MatMulNBits / FP16), on the tiny preset."""


import numpy as np
import pytest
import torch

from vlmedge.errors import VlmedgeError


def _inputs(vlm):
    from vlmedge.models.generative import make_batch

    pixels = torch.from_numpy(vlm.preprocess(np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), np.uint8)))
    ids, mask, _ = (torch.from_numpy(a) for a in make_batch(vlm, [("what colour is the circle?", "red"),
                                                                   ("how many shapes are there?", "two")]))
    return pixels, ids, mask


def _logits(net, pixels, ids, mask):
    with torch.no_grad():
        return net(input_ids=ids, attention_mask=mask, pixel_values=pixels[:, None]).logits


def _mask_heads_and_neurons(net, plan):
    """Zero what the plan removes instead of cutting it: o_proj columns of removed query heads, down_proj columns of
    removed MLP neurons (the decoder), out_proj / fc2 columns (the vision encoder)."""
    from vlmedge.models.structure import tower_layers

    for tower in ("vision", "text"):
        for li, p in enumerate(tower_layers(net, tower)):
            if li not in plan[tower]["layers"]:
                continue
            k = plan[tower]["layers"].index(li)
            heads, neurons = plan[tower]["heads"][k], plan[tower]["neurons"][k]
            drop_h = [h for h in range(p.heads) if h not in heads]
            cols = [h * p.head_dim + d for h in drop_h for d in range(p.head_dim)]
            p.o.weight.data[:, cols] = 0
            p.down.weight.data[:, [n for n in range(p.up.out_features) if n not in neurons]] = 0


def test_gqa_head_and_gated_mlp_pruning_equals_masking_and_reloads(vqa_model, tmp_path):
    from vlmedge import families
    from vlmedge.stages.prune import PruneConfig, prune

    cfg = PruneConfig(vision_heads=0.5, vision_mlp=0.5, text_heads=0.5, text_mlp=0.5, importance="taylor",
                      calibration_batches=2, batch_size=8)
    info = prune(vqa_model, tmp_path / "pruned", cfg)
    plan = info["kept"]
    # GQA: 4 query heads share 2 key/value heads; half the key/value heads go, each with both its query heads
    for heads in plan["text"]["heads"]:
        assert len(heads) == 2 and heads[0] // 2 == heads[1] // 2
    assert info["after"]["parameters"] < info["before"]["parameters"]

    family = families.of(tmp_path / "pruned")
    pruned = family.load(tmp_path / "pruned", attn_implementation="eager")
    layer = pruned.model.model.text_model.layers[0].self_attn
    assert (layer.q_proj.out_features, layer.k_proj.out_features) == (2 * layer.head_dim, layer.head_dim)
    assert pruned.model.model.text_model.layers[0].mlp.gate_proj.out_features == 64

    full = family.load(vqa_model, attn_implementation="eager")
    pixels, ids, mask = _inputs(full)
    _mask_heads_and_neurons(full.model, plan)
    torch.testing.assert_close(_logits(pruned.model, pixels, ids, mask), _logits(full.model, pixels, ids, mask),
                               atol=2e-5, rtol=1e-4)
    # the generation path (the explicit-cache decoder the export traces) agrees with transformers' forward
    from vlmedge.models.generative import decode, empty_past, merge, vision_features

    with torch.no_grad():
        net = pruned.model
        embeds = merge(net, ids, vision_features(net, pixels))
        ours, _ = decode(net, embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0), empty_past(net, 2))
    torch.testing.assert_close(ours[mask.bool()], _logits(net, pixels, ids, mask)[mask.bool()], atol=2e-5, rtol=1e-4)


def test_decoder_layers_pruned_reload_and_generate(vqa_model, tmp_path):
    from vlmedge import families
    from vlmedge.stages.prune import PruneConfig, prune

    info = prune(vqa_model, tmp_path / "pruned", PruneConfig(text_layers=0.5, importance="magnitude"))
    assert len(info["kept"]["text"]["layers"]) == 1
    vlm = families.of(tmp_path / "pruned").load(tmp_path / "pruned")
    assert vlm.model.config.text_config.num_hidden_layers == 1
    gen = families.of(tmp_path / "pruned").adapter(vlm)
    pixels = vlm.preprocess(np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3), np.uint8))
    assert isinstance(gen.answer(pixels, "what colour is the circle?", 4), str)  # HF generate with its cache


def test_a_head_ratio_that_leaves_no_key_value_head_is_refused(vqa_model, tmp_path):
    from vlmedge.stages.prune import PruneConfig, prune

    with pytest.raises(VlmedgeError, match="key/value heads .* leaves none"):
        prune(vqa_model, tmp_path / "p", PruneConfig(text_heads=0.75, importance="magnitude"))
    assert not (tmp_path / "p").exists()


def _kl_batch(vlm):
    from vlmedge import families

    draw = families.of(vlm.source).calibration_data(vlm, "shapes:256", 256, seed=5)
    return draw(16, np.random.default_rng(5))


def test_token_distillation_is_zero_against_itself_and_lowers_the_kl(vqa_model, tmp_path):
    from vlmedge import families
    from vlmedge.families.dual_encoder import DistillLosses
    from vlmedge.stages.prune import PruneConfig, prune
    from vlmedge.train import TrainConfig, train

    family = families.of(vqa_model)
    teacher = family.load(vqa_model)
    kl_only = DistillLosses(contrastive=0, affinity=0, feature=0, matching=0, tokens=1, temperature=2)
    batch = _kl_batch(teacher)
    with torch.no_grad():
        assert float(family.training_loss(teacher, batch, teacher, kl_only)) == pytest.approx(0, abs=1e-6)

    prune(vqa_model, tmp_path / "pruned", PruneConfig(text_mlp=0.5, text_heads=0.5, importance="magnitude"))
    student = family.load(tmp_path / "pruned")
    with torch.no_grad():
        before = float(family.training_loss(student, batch, teacher, kl_only))
    train(TrainConfig(steps=25, init=str(tmp_path / "pruned"), batch_size=32, lr=3e-3, warmup_steps=2,
                      data="shapes:512"), tmp_path / "student", progress=False, teacher=str(vqa_model),
          losses_cfg=DistillLosses(feature=0))
    distilled = family.load(tmp_path / "student")
    with torch.no_grad():
        after = float(family.training_loss(distilled, batch, teacher, kl_only))
    assert after < 0.7 * before, (before, after)
