"""The `torch` target: the PyTorch model eager, on CPU (or CUDA with device='cuda'); the speedup baseline."""

from __future__ import annotations

import os
from typing import Any

from . import sample_inputs
from ..runtime.measure import MeasureConfig, suite


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), device: str = "cpu",
              dtype: str = "fp32", **_: Any) -> dict[str, Any]:
    import torch

    from ..models import image_features, load_model, text_features
    from ..runtime.measure import cpu_info

    threads = cfg.threads or os.cpu_count()
    torch.set_num_threads(threads)
    vlm = load_model(path)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    model = vlm.model.to(device=device, dtype=torch_dtype).eval()
    pixels, tokens = sample_inputs(vlm.preprocess, vlm.tokenize, cfg.throughput_batch)
    px = torch.from_numpy(pixels).to(device=device, dtype=torch_dtype)
    ids = torch.from_numpy(tokens["input_ids"]).to(device)
    mask = torch.from_numpy(tokens["attention_mask"]).to(device)
    with torch.inference_mode():
        text_embeds = torch.nn.functional.normalize(text_features(model, ids[:1].repeat(36, 1), mask[:1].repeat(36, 1)),
                                                    dim=-1)

    def image(b):
        def run():
            with torch.inference_mode():
                return image_features(model, px[:b])
        return run

    def text(b):
        def run():
            with torch.inference_mode():
                return text_features(model, ids[:b], mask[:b])
        return run

    def zero_shot():
        with torch.inference_mode():
            e = torch.nn.functional.normalize(image_features(model, px[:1]), dim=-1)
            return int((e @ text_embeds.T).argmax())

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else None

    def cuda_timer(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    record = {"target": "torch", "device": torch.cuda.get_device_name() if cuda else cpu_info()[0],
              "threads": threads, "runtime": f"torch {torch.__version__} eager", "precision": dtype}
    return suite(image, text, zero_shot, cfg, record, timer=cuda_timer if cuda else None, sync=sync)
