"""What this CPU can do, measured through ONNX Runtime in the same run as the figures compared with it.

* `gemm`: an fp32 `MatMul` and a u8s8 `MatMulInteger` (the kernel ONNX Runtime's dynamic INT8 MatMuls run) of one
  shape, timed in turn, as GFLOP/s and GOP/s (2 x M x N x K over the median time);
* `bandwidth`: the memory bandwidth one large copy gets (GB/s, read + write), the bound of a decode step that
  streams every weight once.

    python benchmarks/ceilings.py [--threads 2] [--quick]

`--quick` (the suite's check of the script): small shapes, a fraction of a second per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def _median_time(fn, seconds: float) -> float:
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm(m: int, k: int, n: int, threads: int | None = None, seconds: float = 2.0,
         kinds: tuple[str, ...] = ("fp32_gflops", "int8_gops")) -> dict[str, float]:
    """fp32 GFLOP/s and int8 GOP/s (`kinds`: either) of an (m x k) @ (k x n) product with a constant (weight) right
    operand."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    out = {}
    for name, (op, a_type, b, a) in {
        "fp32_gflops": ("MatMul", TensorProto.FLOAT, rng.standard_normal((k, n)).astype(np.float32),
                        rng.standard_normal((m, k)).astype(np.float32)),
        "int8_gops": ("MatMulInteger", TensorProto.UINT8, rng.integers(-127, 127, (k, n)).astype(np.int8),
                      rng.integers(0, 255, (m, k)).astype(np.uint8)),
    }.items():
        if name not in kinds:
            continue
        y_type = TensorProto.FLOAT if op == "MatMul" else TensorProto.INT32
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], name,
                                  [helper.make_tensor_value_info("a", a_type, [m, k])],
                                  [helper.make_tensor_value_info("y", y_type, [m, n])],
                                  [numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out[name] = 2 * m * k * n / _median_time(lambda: sess.run(None, {"a": a}), seconds) / 1e9
    return out


def bandwidth(megabytes: int = 512, seconds: float = 2.0) -> float:
    """GB/s moved (read + write) by numpy copying a `megabytes` array into another: one thread, a floor for the
    machine's bandwidth (a decode step's weights stream through every core's loads)."""
    src = np.ones(megabytes * 2 ** 20 // 8)
    dst = np.empty_like(src)
    return 2 * src.nbytes / _median_time(lambda: np.copyto(dst, src), seconds) / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small shapes, short timings: checks the script")
    a = ap.parse_args()
    shapes, seconds, megabytes = (((128, 128, 128), (64, 768, 3072)), 0.05, 16) if a.quick else \
        (((2048, 2048, 2048), (1024, 768, 3072)), 2.0, 512)
    print(json.dumps({"threads": a.threads,
                      **{"x".join(map(str, s)): gemm(*s, a.threads, seconds) for s in shapes},
                      "bandwidth_gbps": bandwidth(megabytes, seconds)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
