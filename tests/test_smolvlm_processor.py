"""vlmedge's SmolVLM processing (numpy and PIL only: what a board runs) gives what transformers' processor gives:
the same frames (tiles, then the global image) with pixel values within 1e-5, and the same prompt ids (the row and
column tile tokens, the image tokens per frame), for images of several sizes and aspect ratios, splitting on and
off."""

import numpy as np
import pytest
from PIL import Image
from test_generative import SMOLVLM_PROCESSOR

from vlmedge.preprocess import Preprocess

SIZES = {"square": (600, 600), "wide": (1024, 768), "tall": (500, 1400), "smaller than a tile": (300, 200),
         "more than 4 tiles": (3000, 2200)}


@pytest.fixture(scope="module")
def tokenizer():
    from vlmedge.families.generative.model import CHAT_TEMPLATE, train_tokenizer

    tok = train_tokenizer(["what colour is the square", "red"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _image(size, seed):
    """A smooth image with detail (a gradient plus noise): resampling filters differ on it if they differ at all."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("splitting", [True, False], ids=["splitting on", "splitting off"])
@pytest.mark.parametrize("name", list(SIZES))
def test_frames_and_prompt_ids_equal_transformers(tokenizer, name, splitting):
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from vlmedge.families.generative.model import prompt_ids

    cfg = {**SMOLVLM_PROCESSOR, "do_image_splitting": splitting}
    theirs = Idefics3Processor(Idefics3ImageProcessorPil(**cfg), tokenizer, image_seq_len=64,
                               chat_template=tokenizer.chat_template)
    image = _image(SIZES[name], seed=len(name))
    question = "what colour is the square"
    text = theirs.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                       "text": question}]}],
                                      add_generation_prompt=True)
    ref = theirs(text=[text], images=[[image]], return_tensors="np")

    pre = Preprocess.from_hf(cfg, 512)
    frames = pre.frames(image)
    assert frames.pixel_values.shape == ref["pixel_values"].shape[1:]
    assert np.abs(frames.pixel_values - ref["pixel_values"][0]).max() <= 1e-5
    assert ref["pixel_attention_mask"].all()  # one image: every frame whole
    ours = prompt_ids(tokenizer, question, 64, 8192, "test", frames.rows, frames.cols)
    assert ours == ref["input_ids"][0].tolist()
    if splitting and name != "square":
        assert frames.rows * frames.cols > 1


def test_a_model_folder_keeps_the_processor_it_came_with():
    """Preprocess -> preprocessor_config.json -> Preprocess is the identity (a model vlmedge writes loads with the
    processor it was read with)."""
    pre = Preprocess.from_hf(SMOLVLM_PROCESSOR, 512)
    assert (pre.image_size, pre.longest_edge, pre.splitting, pre.resample) == (512, 2048, True, 1)
    assert Preprocess.from_hf(pre.to_hf(), 999) == pre
    assert pre.with_splitting("off").splitting is False and pre.with_splitting("as-folder") == pre
    with pytest.raises(ValueError, match="one square image"):
        Preprocess(224, [0.5] * 3, [0.5] * 3).with_splitting("on")
