"""Checks that need hardware this machine may lack; each skips, saying why, where it is absent.

    pytest -m gpu         a CUDA GPU (torch target on CUDA; the cuda target needs onnxruntime-gpu)
    pytest -m tensorrt    trtexec on PATH (or VLMEDGE_TRTEXEC)
    pytest -m jetson      a board: VLMEDGE_JETSON_HOST (and VLMEDGE_JETSON_USER, VLMEDGE_JETSON_KEY)
"""

import os
import shutil

import pytest

from vlmedge.runtime.measure import MeasureConfig

FAST = MeasureConfig(warmup=2, min_runs=5, min_seconds=0.05, throughput_batch=4)


def _cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def _timed(record: dict) -> list[dict]:
    """Every latency figure of a target's record (the dual encoder's pair/image/text, the generative vision/answer)."""
    return [v for v in record.values() if isinstance(v, dict) and "p50_ms" in v]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")
@pytest.mark.parametrize("model", ["tiny_model", "vqa_model"])
def test_torch_target_on_cuda_fp16(model, request):
    from vlmedge.targets import get_target

    r = get_target("torch")(request.getfixturevalue(model), FAST, device="cuda", dtype="fp16")
    assert r["precision"] == "fp16" and "cpu" not in r["device"].lower()
    figures = _timed(r)
    assert figures and all(f["p50_ms"] > 0 for f in figures)


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU")
@pytest.mark.parametrize("export", ["tiny_export", "vqa_export"])
def test_cuda_target_runs_on_the_gpu(export, request):
    import onnxruntime as ort

    from vlmedge.targets import get_target

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without CUDAExecutionProvider (pip install vlmedge[gpu])")
    r = get_target("cuda")(request.getfixturevalue(export), FAST)
    assert r["providers"][0] == "CUDAExecutionProvider" and _timed(r)


@pytest.mark.tensorrt
@pytest.mark.skipif(not (os.environ.get("VLMEDGE_TRTEXEC") or shutil.which("trtexec")), reason="no trtexec")
def test_tensorrt_target_builds_and_times_engines(tiny_export):
    from vlmedge.targets import get_target

    r = get_target("tensorrt")(tiny_export, FAST, trtexec=os.environ.get("VLMEDGE_TRTEXEC"))
    assert r["image"]["p50_ms"] > 0 and r["text"]["p50_ms"] > 0


@pytest.mark.jetson
@pytest.mark.skipif(not os.environ.get("VLMEDGE_JETSON_HOST"), reason="no board (VLMEDGE_JETSON_HOST unset)")
def test_jetson_target_on_a_real_board(tiny_export):
    from vlmedge.targets import get_target

    r = get_target("jetson")(tiny_export, FAST, host=os.environ["VLMEDGE_JETSON_HOST"],
                             user=os.environ.get("VLMEDGE_JETSON_USER"), key=os.environ.get("VLMEDGE_JETSON_KEY"))
    assert r["target"] == "jetson" and r["pair"]["p50_ms"] > 0
