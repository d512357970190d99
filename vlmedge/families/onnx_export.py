"""Export helpers any family with a ViT-style stem or a tokenizer uses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..disk import read_json, write_json
from ..runtime.onnx import side_file


class patchify_as_matmul:
    """While exporting, compute each patch-embedding Conv (kernel == stride, no padding: the ViT and CLIP stems) as
    patchify (Reshape + Transpose) and one MatMul. Same arithmetic; but ONNX Runtime's ConvInteger is a slow kernel
    (measured: the `base` stem as ConvInteger took 4.4 ms of a 16 ms image tower, 53 GOP/s), while a MatMul quantizes
    to the same fused integer GEMM as every other layer. The torch model is restored on exit."""

    def __init__(self, model, image_size: int):
        self.model, self.image_size, self.swapped = model, image_size, []

    def __enter__(self):
        import torch

        for parent in list(self.model.modules()):
            for name, conv in list(parent.named_children()):
                if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == conv.stride and conv.groups == 1
                        and conv.padding == (0, 0) and conv.dilation == (1, 1)):
                    setattr(parent, name, _patch_linear(conv, self.image_size))
                    self.swapped.append((parent, name, conv))
        return self

    def __exit__(self, *exc):
        for parent, name, conv in self.swapped:
            setattr(parent, name, conv)


def _patch_linear(conv, image_size: int):
    import torch

    class PatchLinear(torch.nn.Module):
        """Conv2d(kernel == stride) as patchify + Linear; returns the Conv's [batch, out, h, w] (the pixels past the
        last whole patch dropped, as the Conv drops them)."""

        def __init__(self):
            super().__init__()
            (self.ph, self.pw), self.channels = conv.kernel_size, conv.in_channels
            self.h, self.w = image_size // self.ph, image_size // self.pw
            # `weight` keeps the Conv's name: the towers read `projection.weight.dtype`
            self.weight = torch.nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
            self.bias = conv.bias

        def forward(self, x):
            x = x[:, :, :self.h * self.ph, :self.w * self.pw]  # the Conv's floor: 384 px in 14 px patches is 27
            x = x.reshape(-1, self.channels, self.h, self.ph, self.w, self.pw).permute(0, 2, 4, 1, 3, 5)
            y = torch.nn.functional.linear(x.reshape(-1, self.h * self.w, self.channels * self.ph * self.pw),
                                           self.weight, self.bias)
            return y.transpose(1, 2).reshape(-1, y.shape[-1], self.h, self.w)

    return PatchLinear()


class quiet_export:
    """torch.onnx's TorchScript path warns about tracing on every export; those warnings are not actionable here."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


EXTERNAL_ALIGN = 64 * 1024
"""Tensors of a side file start at multiples of this (onnx's own alignment for large tensors), so that ONNX Runtime
can map them from the file instead of copying them."""


def trace_graph(module, example: tuple, path: Path, input_names, output_names, opset: int,
                dynamic_axes: dict) -> int:
    """torch.onnx's TorchScript export of `module` to `path`, its weights written tensor by tensor to the side file
    `path`_data (`side_file`) instead of into an in-memory protobuf: the export holds the torch module's weights
    plus the tensors constant folding makes (a Linear's transposed weight), not three copies of them (the folded
    tensors, the protobuf, the bytes written; measured on SmolVLM-256M's decoder, 0.55 GB of weights: +1.6 GB of
    RSS through the protobuf, +0.6 GB this way). `finish_graph` makes it one file where it fits. Returns the bytes
    of weights written."""
    import onnx
    import torch
    from torch.onnx._internal.torchscript_exporter import utils as ts

    captured: dict[str, Any] = {}
    to_graph = ts._model_to_graph

    def keep_params(*args, **kwargs):  # the graph's parameters as the exporter leaves them (after folding)
        graph, params, out = to_graph(*args, **kwargs)
        captured.update(params)
        return graph, params, out

    ts._model_to_graph = keep_params
    try:
        torch.onnx.export(module, example, str(path), input_names=list(input_names), output_names=list(output_names),
                          opset_version=opset, dynamic_axes=dynamic_axes, dynamo=False, export_params=False)
    finally:
        ts._model_to_graph = to_graph
    model = onnx.load(str(path))  # the graph alone: its parameters are inputs without values
    params = [i for i in model.graph.input if i.name in captured and i.name not in input_names]
    unknown = [i.name for i in model.graph.input if i.name not in captured and i.name not in input_names]
    if unknown:  # a parameter under a name the exporter did not hand over: the graph would ask for it as an input
        raise RuntimeError(f"{path.name}: traced input {unknown[0]!r} is neither an input nor a parameter")
    with SideFile(path) as weights:
        for i in params:
            t = captured.pop(i.name).detach().contiguous()
            raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
            model.graph.initializer.append(weights.add(i.name, raw, i.type.tensor_type.elem_type))
    names = {i.name for i in params}
    kept = [i for i in model.graph.input if i.name not in names]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    onnx.save_model(model, str(path))
    return weights.written


class SideFile:
    """The side file of the graph at `path` (`side_file`), written tensor by tensor: `add` appends an array's bytes
    (aligned to EXTERNAL_ALIGN where large) and returns the initializer that points at them."""

    def __init__(self, path: Path):
        self.path = side_file(path)
        self.written = 0

    def __enter__(self):
        self._f = open(self.path, "wb")
        return self

    def __exit__(self, *exc):
        self._f.close()

    def add(self, name: str, array: np.ndarray, data_type: int | None = None):
        import onnx

        f = self._f
        if array.nbytes >= EXTERNAL_ALIGN:
            f.write(b"\0" * (-f.tell() % EXTERNAL_ALIGN))
        dtype = data_type if data_type is not None else onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor = onnx.TensorProto(name=name, dims=list(array.shape), data_type=dtype,
                                  data_location=onnx.TensorProto.EXTERNAL)
        for k, v in (("location", self.path.name), ("offset", str(f.tell())), ("length", str(array.nbytes))):
            tensor.external_data.add(key=k, value=v)
        f.write(np.ascontiguousarray(array).data)
        self.written += array.nbytes
        return tensor


def finish_graph(path: Path, defaults: dict, one_file: bool) -> None:
    """A traced graph (`trace_graph`) as shipped, loaded and saved once: the inputs named in `defaults` given those
    values (numpy arrays) as initializers of the same name (in ONNX an initializer that is also a graph input is its
    default, so the input becomes optional), its weights moved into the .onnx file when `one_file` (the protobuf
    holds at most 2 GB), else left in the side file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=one_file)  # a side file's weights stay where they are
    missing = sorted(set(defaults) - {i.name for i in model.graph.input})
    if missing:  # the tracer drops an input that no output depends on
        raise ValueError(f"{path.name}: no graph input {missing[0]!r} to give a default")
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in defaults.items())
    onnx.save_model(model, str(path))
    del model
    if one_file:
        side_file(path).unlink()


def declare_side_files(config: Path, files: list[str]) -> None:
    """Tell transformers.js, in an onnx-community folder's `config.json`, which graphs (`onnx/X.onnx`) keep their
    weights in a side file (`transformers.js_config.use_external_data_format`, one chunk each, keyed by file name as
    it looks them up): it fetches a side file only when told, and in a browser ONNX Runtime finds the weights only
    among the files it is handed."""
    settings = read_json(config, f"{config}: no such file")
    js = settings.setdefault("transformers.js_config", {})
    js["use_external_data_format"] = {**js.get("use_external_data_format", {}), **{Path(f).name: 1 for f in files}}
    write_json(config, settings)


def save_tokenizer(tokenizer, folder: Path) -> list[str]:
    before = set(os.listdir(folder))
    tokenizer.save_pretrained(folder)
    return sorted(set(os.listdir(folder)) - before)
