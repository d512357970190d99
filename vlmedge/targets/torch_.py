"""The `torch` target: the PyTorch model eager, on CPU (or CUDA with device='cuda'); the speedup baseline."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from .. import families
from ..runtime.measure import MeasureConfig, cpu_info


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), device: str = "cpu",
              dtype: str = "fp32", **_: Any) -> dict[str, Any]:
    import torch

    threads = cfg.threads or os.cpu_count()
    torch.set_num_threads(threads)
    family = families.of(path)
    model = family.load(path)
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    adapter = family.adapter(model, **(asdict(cfg.options) if cfg.options is not None else {}))  # the family's own
    scenarios = family.torch_scenarios(model, family.latency_inputs(adapter, cfg.throughput_batch), device,
                                       torch_dtype)
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
    return family.time_scenarios(scenarios, cfg, record, timer=cuda_timer if cuda else None, sync=sync)
