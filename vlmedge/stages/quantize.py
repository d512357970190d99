"""Quantization of an export folder with ONNX Runtime's own tools (never a hand-written quantizer).

Modes:
* ``dynamic``: INT8 weights (per-tensor by default), activations quantized at run time; the fast default on CPUs.
  Saved after ONNX Runtime's offline graph optimization (fused DynamicQuantizeMatMul nodes).
* ``static``: INT8 QDQ with calibration batches from the dataset (MinMax, Entropy or Percentile), per-channel
  weights, only MatMul/Gemm (+ Gather) by default: quantizing every op type wrecks text towers. This is the
  explicit quantization form TensorRT 10/11 consume. The graph is typed by ONNX Runtime's symbolic shape inference
  first, so that activations past its fused operators are quantized too (`_typed`).
* ``fp16``: ORT's float16 converter, fp32 inputs and outputs kept.
* ``int4``: weight-only 4-bit blocks (`MatMulNBits`, and `GatherBlockQuantized` for an embedding table) through
  ONNX Runtime's n-bit quantizer; `block_size` weights per scale, `accuracy_level` the kernel's compute type
  (4: int8 dot products, fast on CPUs with VNNI).
* ``mixed``: each graph in `int4_graphs` tried as INT4 and as INT8 dynamic, the others INT8 dynamic; the forms are
  timed side by side (the family's headline scenario, interleaved rounds) and, with `max_drop`, evaluated: the
  fastest form within the tolerance is kept, and the manifest says which and why.

`graphs` sets a mode per graph (e.g. {vision: dynamic, decoder: int4}); the others take `mode`.

On x86 CPUs without VNNI, u8s8 MatMulInteger can saturate its 16-bit intermediate sums; there `reduce_range`
(7-bit weights) is chosen. The choice and its reason are recorded in the manifest.

Accuracy-aware mode (`max_drop` on a metric): layer groups are ranked by how much quantizing each alone moves the
embeddings, and the worst are kept in fp32, one by one, until the quantized artifact is within the tolerance.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import families
from .._progress import Budget, Progress, paced
from ..artifact import Artifact
from ..data import DEFAULT_SOURCE
from ..disk import atomic_dir, write_json
from ..errors import VlmedgeError
from ..evaluate import EvalConfig, flat_metrics
from ..families.onnx_export import declare_side_files
from ..runtime.measure import SLOW_FUSIONS, MeasureConfig, cpu_info, release_memory
from ..runtime.onnx import (MANIFEST, graph_file, graph_files, onnx_size, open_session, read_manifest,
                            record_thread_tuning, side_file)
from . import Context, register
from .export import ONE_FILE_BYTES, copy_support_files

AGREEMENT_SECONDS = 60.0
"""The time an unset `agreement_questions` may take per form."""
DRIFT_SECONDS = 30.0
"""The time the drift check may take per graph (at least one calibration batch)."""
DRIFT_BATCHES = 2
"""Calibration batches prepared for the drift check when nothing else needs them (a mode without calibration): at
most that many of `calibration_batches` (a SmolVLM-256M's 8 x 16 images took 27 s to prepare through the fp32 vision
graph and the drift used 6 of its 32 four-frame chunks; the 2.2B's so400m tower is 5x that)."""
MODES = ("dynamic", "static", "fp16", "int4", "mixed")
GRAPH_MODES = ("dynamic", "static", "fp16", "int4", "fp32")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
PRECISION = {"dynamic": "int8-dynamic", "static": "int8-static", "fp16": "fp16", "int4": "int4", "fp32": "fp32"}
CALIBRATION = ("minmax", "entropy", "percentile")
WEIGHT_SCHEMES = ("auto", "u8s8", "reduce_range", "u8u8")
OPTIMIZE = ("auto", "none", "basic", "extended")


@dataclass(frozen=True)
class QuantizeConfig:
    mode: str = "dynamic"
    weight_scheme: str = "auto"
    """auto (by the CPU's instruction set), u8s8, reduce_range (7-bit weights) or u8u8."""
    per_channel: bool | None = None
    """One scale per output channel of each weight. None (auto): per-channel for static QDQ (what TensorRT wants,
    and what keeps calibrated models accurate); per-tensor for dynamic, where per-channel stores an fp32 scale and a
    zero point per channel (3 % of the small model's INT8 file) for no measured gain (quickstart: minimum embedding
    cosine to fp32 0.9994 per-tensor vs 0.9995 per-channel; zero-shot top-1 0.930 vs 0.934, Recall@5 0.500 vs
    0.498)."""
    calibration: str = "minmax"
    calibration_batches: int = 8
    batch_size: int = 16
    op_types: tuple[str, ...] = ("MatMul", "Gemm", "Gather")
    """Op types to quantize (static and dynamic). The export writes the ViT/CLIP patch embedding as a MatMul, so it
    is quantized too; Conv is left out because ONNX Runtime's ConvInteger kernel is slow (the `base` stem: 4.4 ms as
    ConvInteger, about 0.2 ms more in the integer MatMuls as one of them)."""
    exclude_nodes: tuple[str, ...] = ()
    """Node names (or regular expressions) kept in fp32."""
    exclude_op_types: tuple[str, ...] = ()
    optimize: str = "auto"
    """Save the quantized graph after ONNX Runtime's offline optimization: none, basic or extended. auto: extended
    for dynamic INT8 (fuses DynamicQuantizeLinear + MatMulInteger + scale into one contrib op: fewer nodes, a smaller
    file; the result needs ONNX Runtime, which dynamic INT8 needs anyway), none for static QDQ and fp16 (kept in
    standard ONNX for TensorRT and other runtimes)."""
    graphs: dict[str, str] | None = None
    """A mode per graph name (the manifest's `files`: image, text; vision, embed, decoder; ...), overriding `mode`
    for those graphs; fp32 leaves a graph as exported."""
    block_size: int = 32
    """INT4: weights per quantization block along the input dimension (a power of two >= 16 that divides every
    quantized width)."""
    accuracy_level: int | None = None
    """INT4: MatMulNBits' compute type: None/0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (with VNNI the fast one)."""
    int4_graphs: tuple[str, ...] | None = None
    """mixed: the graphs tried as INT4; None: the family's (`Family.int4_graphs`: a generative model's embed and
    decoder, none of a dual encoder's or a matching model's)."""
    max_drop: float | None = None
    """Accuracy-aware: the largest allowed drop of `metric` against the fp32 export; None disables."""
    metric: str = "zero_shot.top1"
    tune_threads: bool = True
    """Record the fastest thread count per tower on this machine in the manifest (see ExportConfig)."""
    agreement_questions: int | None = None
    """Held-out inputs on which the quantized artifact's end result is compared with the fp32 export's (a
    generative model: greedy answers); 0 skips. None: as many as fit in AGREEMENT_SECONDS at the pace of the first
    two (2 to 100), said in the log; every form of `mixed` answers the same ones."""
    data: str | None = None
    """Calibration data (static mode, accuracy-aware mode, drift); None: the run's data (recipe `data.source`, the
    command's --data)."""
    add_to_source: bool = False
    """An onnx-community export (`export --layout onnx-community`; the generative family's always is): also add the
    quantized graphs, with their dtype suffix, to the source export's onnx/ beside its fp32 graphs, so that one
    folder carries each precision (transformers.js picks one by dtype). The source's record still holds: it checks
    only the files it lists."""
    seed: int = 0

    @property
    def channelwise(self) -> bool:
        """`per_channel` resolved for `mode` (see there)."""
        return self.channelwise_for(self.mode)

    def channelwise_for(self, mode: str) -> bool:
        """`per_channel` resolved for one graph's mode."""
        return self.per_channel if self.per_channel is not None else mode == "static"

    def __post_init__(self):
        checks = [(self.mode in MODES, "mode", MODES), (self.calibration in CALIBRATION, "calibration", CALIBRATION),
                  (self.weight_scheme in WEIGHT_SCHEMES, "weight_scheme", WEIGHT_SCHEMES),
                  (self.optimize in OPTIMIZE, "optimize", OPTIMIZE)]
        for ok, key, allowed in checks:
            if not ok:
                raise VlmedgeError(f"quantize: {key}={getattr(self, key)!r}; expected one of {', '.join(allowed)}")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise VlmedgeError(f"quantize: max_drop={self.max_drop}; expected a fraction in [0, 1)")
        if self.calibration_batches < 1:
            raise VlmedgeError("quantize: calibration_batches must be >= 1")
        if self.agreement_questions is not None and self.agreement_questions < 0:
            raise VlmedgeError(f"quantize: agreement_questions={self.agreement_questions}; expected >= 0")
        for graph, mode in (self.graphs or {}).items():
            if mode not in GRAPH_MODES:
                raise VlmedgeError(f"quantize: graphs.{graph}={mode!r}; expected one of {', '.join(GRAPH_MODES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise VlmedgeError(f"quantize: block_size={self.block_size}; expected a power of two >= 16 (MatMulNBits)")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise VlmedgeError(f"quantize: accuracy_level={self.accuracy_level}; expected one of 0, 1, 2, 3, 4 "
                               "(4: int8 compute)")

    def mode_of(self, graph: str) -> str:
        """The mode of one graph (`graphs`, else `mode`; `mixed` resolves per form before this is asked)."""
        return (self.graphs or {}).get(graph, self.mode)

    def check_graphs(self, graphs, where: str) -> None:
        """Every graph the config names (`graphs`, and `int4_graphs` where set) is one of `graphs`: a misspelt or
        another family's graph name is an error, not a setting silently ignored."""
        named = [*(self.graphs or {}), *(self.int4_graphs or ())]
        for graph in named:
            if graph not in graphs:
                key = "graphs" if graph in (self.graphs or {}) else "int4_graphs"
                raise VlmedgeError(f"quantize: {key}: {graph!r} is not a graph of {where}; its graphs are "
                                   f"{', '.join(graphs)}")

    def int4_of(self, family) -> tuple[str, ...]:
        """The graphs `mixed` tries as INT4: `int4_graphs`, else the family's."""
        return self.int4_graphs if self.int4_graphs is not None else family.int4_graphs

    def check_model(self, shapes: dict[str, dict[str, int]], family) -> None:
        """At recipe load, against the model's tower shapes (`models.tower_shapes`) and its family's graphs (graph
        -> tower): the graphs named exist, and INT4's block size divides the widths of the towers whose graphs it
        quantizes."""
        graph_towers = family.graph_towers
        self.check_graphs(list(graph_towers), f"a {family.name} export")
        int4 = [g for g in graph_towers if self.mode_of(g) == "int4"
                or (self.mode == "mixed" and g in self.int4_of(family) and g not in (self.graphs or {}))]
        towers = [t for t in ("vision", "text") if t in shapes and any(graph_towers[g] == t for g in int4)]
        self.check_widths({t: [shapes[t]["hidden_size"], shapes[t]["intermediate_size"]] for t in towers},
                          "quantize")

    def check_widths(self, widths: dict[str, list[int]], where: str = "quantize") -> None:
        """A one-line error when INT4's block size does not divide a width that a graph quantized to INT4
        multiplies by (`widths`: graph -> input widths of its MatMuls)."""
        for graph, ks in widths.items():
            bad = sorted({k for k in ks if k % self.block_size})
            if bad:
                raise VlmedgeError(f"{where}: block_size={self.block_size} does not divide the {graph} width "
                                   f"{bad[0]}; choose a block size that divides {', '.join(map(str, sorted(set(ks))))}")


CONTRIB_TYPES = {"DefaultTensorType": 1}
"""The element type (onnx FLOAT) ORT's quantizers assume for outputs of contrib ops its shape inference cannot type
(an export's MultiHeadAttention)."""


def choose_weight_scheme(requested: str) -> tuple[str, str]:
    """(scheme, why). VNNI (AVX512-VNNI or AVX-VNNI) computes u8s8 dot products without 16-bit saturation."""
    if requested != "auto":
        return requested, "requested"

    flags = cpu_info()[1]
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"}:
        return "u8s8", "CPU has VNNI: u8s8 accumulates in 32 bits"
    if "avx2" in flags:
        return "reduce_range", "AVX2 without VNNI: u8s8 can saturate 16-bit sums, 7-bit weights avoid it"
    return "u8s8", "not an x86 AVX2 CPU (ARM and GPU kernels do not saturate)"


class _Calibration:
    """ORT CalibrationDataReader over preprocessed dataset batches, for one tower."""

    def __init__(self, batches: list[dict[str, np.ndarray]]):
        self.batches = batches
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return self.batches[self.pos - 1]

    def rewind(self):
        self.pos = 0


def calibration_batches(family, encoder, cfg: QuantizeConfig) -> dict[str, list[dict[str, np.ndarray]]]:
    """Real preprocessed inputs per graph of the export `encoder` (its `family` makes them from `cfg.data`)."""
    return family.calibration_feeds(encoder, cfg.data or DEFAULT_SOURCE, cfg.calibration_batches, cfg.batch_size,
                                    cfg.seed)


def _node_names(path: Path) -> list[tuple[str, str]]:
    import onnx

    return [(n.name, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


def _excluded(path: Path, cfg: QuantizeConfig, extra: tuple[str, ...] = ()) -> list[str]:
    patterns = [re.compile(p) for p in (*cfg.exclude_nodes, *extra)]
    return [name for name, op in _node_names(path)
            if op in cfg.exclude_op_types or any(p.fullmatch(name) or p.search(name) for p in patterns)]


def quantize_file(src: Path, dst: Path, tower: str, cfg: QuantizeConfig, scheme: str,
                  calib: dict[str, list] | None, extra_exclude: tuple[str, ...] = ()) -> None:
    """Quantize one ONNX file with ORT's quantizers (in the graph's mode, `cfg.mode_of`)."""
    import logging

    # ORT's quantizer logs a pre-processing suggestion on the root logger every call, and importing its n-bit
    # quantizer sets the root logger to INFO (logging.basicConfig): a line per node of the graph
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _quantize_file(src, dst, tower, cfg, scheme, calib, extra_exclude)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _quantize_file(src: Path, dst: Path, tower: str, cfg: QuantizeConfig, scheme: str,
                   calib: dict[str, list] | None, extra_exclude: tuple[str, ...]) -> None:
    import shutil

    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    exclude = _excluded(src, cfg, extra_exclude)
    op_types = [o for o in cfg.op_types if o not in cfg.exclude_op_types]
    mode = cfg.mode_of(tower)
    if mode == "fp32":
        shutil.copyfile(src, dst)
        return
    if mode == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

        model = onnx.load(str(src))
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        # An INT4 Gather makes ORT's quantizer stamp opset 21 on the graph without converting its other ops (an
        # opset-17 ReduceMean then fails to load): embedding tables are quantized in graphs of opset >= 21 or with no
        # MatMul (the embed graph), the MatMuls everywhere.
        gather = opset >= 21 or not any(n.op_type == "MatMul" for n in model.graph.node)
        types = tuple(o for o in ("MatMul", "Gather") if o in op_types and (o != "Gather" or gather))
        algo = DefaultWeightOnlyQuantConfig(block_size=cfg.block_size, is_symmetric=True,
                                            accuracy_level=cfg.accuracy_level, op_types_to_quantize=types)
        q = MatMulNBitsQuantizer(model, block_size=cfg.block_size, is_symmetric=True,
                                 accuracy_level=cfg.accuracy_level, nodes_to_exclude=exclude,
                                 op_types_to_quantize=types, algo_config=algo)
        q.process()
        _save_graph(q.model.model, dst)
        return
    if mode == "fp16":
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        # shapes inferred through the files (ONNX's in-memory inference stops at protobuf's 2 GB), into the output's
        # folder: the converter's own path-based inference would write its temporary file beside the source
        shapes = dst.with_name(f".{dst.name}.shapes")
        onnx.shape_inference.infer_shapes_path(str(src), str(shapes))
        model = onnx.load(str(shapes), load_external_data=False)
        shapes.unlink()
        onnx.external_data_helper.load_external_data_for_model(model, str(src.parent))
        model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                         node_block_list=exclude or None,
                                         op_block_list=list(cfg.exclude_op_types) or None)
        _save_graph(model, dst)
        return
    weight_type = QuantType.QUInt8 if scheme == "u8u8" else QuantType.QInt8
    reduce_range = scheme == "reduce_range"
    per_channel = cfg.channelwise_for(mode)
    if mode == "dynamic":
        _quantize_dynamic(src, dst, op_types_to_quantize=op_types, per_channel=per_channel,
                          reduce_range=reduce_range, weight_type=weight_type, nodes_to_exclude=exclude,
                          extra_options=dict(CONTRIB_TYPES))
        level = "extended" if cfg.optimize == "auto" else cfg.optimize
        if level != "none":
            optimize_offline(dst, level)
        return
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[cfg.calibration]
    with _typed(src, dst.parent) as typed:
        quantize_static(typed, dst, _Calibration(calib[tower]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=weight_type, nodes_to_exclude=exclude,
                        calibrate_method=method,
                        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True, **CONTRIB_TYPES})


@contextlib.contextmanager
def _typed(src: Path, folder: Path):
    """`src` with every tensor's type and shape, from ONNX Runtime's symbolic shape inference (which knows its
    contrib ops), in a temporary file in `folder`; `src` itself where that inference fails. ONNX's own inference stops
    at the first contrib op (an export's MultiHeadAttention, FastGelu), and ORT's QDQ quantizer leaves an activation
    it cannot type in fp32: SmolVLM-256M's static INT8 vision graph had 7 QuantizeLinear for 73 MatMuls and took
    832 ms a frame against fp32's 736; typed, 122 and 335 ms (dynamic INT8: 293)."""
    import tempfile

    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    with tempfile.TemporaryDirectory(dir=folder, prefix=".typed-") as tmp:
        try:
            model = SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True, guess_output_rank=True)
        except Exception:  # noqa: BLE001  (a graph it cannot follow is quantized as ONNX's inference leaves it)
            yield src
            return
        typed = _save_apart(model, Path(tmp) / src.name)
        del model
        release_memory()
        yield typed


def _quantize_dynamic(src: Path, dst: Path, **options) -> None:
    """ONNX Runtime's `quantize_dynamic` with the fp32 weights read from disk one at a time.

    Given a path, ORT's dynamic quantizer loads the graph with all its weights, then (onnx_quantizer's
    `save_and_reload_model_with_shape_infer`, after rewriting Gemms) deep-copies it, saves the copy and loads it again
    while the first is still referenced: three copies of the fp32 weights at once (peak RSS 4.7 GiB for the 500M's
    1.4 GB decoder, 19.9 GiB for the 2.2B's 6.8 GB one). Here it gets the graph without its weights, which stay in
    their external file (the source's side file, or a temporary one beside `dst` for a graph that holds its weights
    inline); ONNX's `numpy_helper.to_array`, which ORT calls for each weight it quantizes, reads that tensor from disk
    relative to the working directory, which is the weights' folder during the call (the process's: not for threads
    that quantize side by side); ORT's reload becomes shape inference of the weightless graph in memory. The fp32
    tensors left unquantized are read back into `dst`, which holds its weights inline as before (the 500M's decoder:
    1.15 GiB peak from a side file, 2.78 from inline weights; the file byte for byte ORT's own).

    Where this ONNX Runtime lacks the functions replaced, the plain call."""
    import importlib
    import tempfile

    import onnx
    from onnxruntime.quantization import quant_utils, quantize_dynamic

    modules = [importlib.import_module(f"onnxruntime.quantization.{m}") for m in ("quantize", "onnx_quantizer")]
    name = "save_and_reload_model_with_shape_infer"
    if not all(hasattr(m, name) for m in modules):
        quantize_dynamic(src, dst, **options)
        return

    def infer_in_memory(model):
        inferred = onnx.shape_inference.infer_shapes(model)
        quant_utils.add_infer_metadata(inferred)
        return inferred

    dst = dst.resolve()
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".weights-") as tmp:
        graph = onnx.load(str(src), load_external_data=False)
        folder = src.resolve().parent
        if any(t.data_location != onnx.TensorProto.EXTERNAL and t.ByteSize() > 1024 for t in graph.graph.initializer):
            onnx.external_data_helper.load_external_data_for_model(graph, str(folder))  # any kept apart already
            path = _save_apart(graph, Path(tmp) / "graph.onnx")
            del graph
            release_memory()
            graph = onnx.load(str(path), load_external_data=False)
            folder = Path(tmp)
        saved = [getattr(m, name) for m in modules]
        here = os.getcwd()
        try:
            for m in modules:
                setattr(m, name, infer_in_memory)
            os.chdir(folder)
            quantize_dynamic(graph, dst, **options)
        finally:
            os.chdir(here)
            for m, f in zip(modules, saved):
                setattr(m, name, f)
        del graph
        out = onnx.load(str(dst), load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(out, str(folder))
        onnx.save_model(out, str(dst))


def _save_graph(model, path: Path) -> None:
    """`model` at `path` with its weights inline, or in its side file where they reach protobuf's 2 GB limit
    (`ONE_FILE_BYTES`, as the export decides: the 2.2B's fp16 decoder is 3.4 GB)."""
    import onnx

    if sum(t.ByteSize() for t in model.graph.initializer) >= ONE_FILE_BYTES:
        _save_apart(model, path)
    else:
        onnx.save(model, str(path))


def _save_apart(model, path: Path) -> Path:
    """`model` saved to `path` with its weights in its side file (`side_file`); `path`."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, location=side_file(path).name)
    return path


def optimize_offline(path: Path, level: str) -> None:
    """Replace an ONNX file by ONNX Runtime's optimized graph of it (CPU provider; `level`: basic or extended)."""
    import onnx
    import onnxruntime as ort

    tmp = path.with_name(path.name + ".opt")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}[level]
    opts.optimized_model_filepath = str(tmp)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=list(SLOW_FUSIONS))
    model = onnx.load(str(tmp))
    del model.graph.value_info[:]  # shape annotations of intermediate tensors: ORT infers them again at load
    onnx.save(model, str(tmp))
    tmp.replace(path)


def _layer_groups(path: Path) -> dict[str, list[str]]:
    """Quantizable nodes grouped by transformer layer (from the exporter's scoped names), others under 'other'."""
    groups: dict[str, list[str]] = {}
    for name, op in _node_names(path):
        if op not in QuantizeConfig.op_types:
            continue
        m = re.search(r"layers?[./_](\d+)", name)
        groups.setdefault(f"layer{m.group(1)}" if m else "other", []).append(name)
    return groups


def quantize(source: str | os.PathLike, out: str | os.PathLike, cfg: QuantizeConfig = QuantizeConfig(),
             evaluate_fn: Callable[[Any], dict[str, float]] | None = None, progress: bool = False,
             family: families.Family | None = None) -> dict[str, Any]:
    """Quantize an export folder into `out` (written atomically). Returns sizes, scheme, the per-graph modes (and
    for `mixed` every form tried), and what was kept in fp32.

    `evaluate_fn` (the family's adapter of an export folder -> flat metrics) is needed for the accuracy-aware mode
    (`cfg.max_drop`); `progress` reports its rounds (each one evaluation). `family`: the export's (default: read
    from the folder).
    """
    source = Path(source)
    manifest = read_manifest(source)
    if manifest.get("precision", "fp32") != "fp32":
        raise VlmedgeError(f"{source}: already quantized ({manifest['precision']}); quantize the fp32 export")
    if cfg.add_to_source and manifest.get("layout") != "onnx-community":
        raise VlmedgeError(f"quantize: add_to_source needs an export in the onnx-community layout (vlmedge export "
                           f"--layout onnx-community); {source} is in the {manifest.get('layout', 'flat')} layout, "
                           "whose graphs share one name across precisions")

    family = family or families.of(source)
    files = manifest["files"]
    cfg.check_graphs(list(files), str(source))
    forms = _forms(cfg, files, cfg.int4_of(family))
    for form in forms:
        form.check_widths(_int4_widths(source, files, form), f"quantize ({source})")
    int8 = any(m in ("dynamic", "static") for f in forms for m in f.graphs.values())
    scheme, why = choose_weight_scheme(cfg.weight_scheme) if int8 else ("none", "no INT8 graph")
    fp32 = functools.cache(lambda: family.adapter(source))  # the fp32 export's sessions
    fp32()  # every graph loads in ONNX Runtime (else a one-line error) before any work
    static = any(m == "static" for f in forms for m in f.graphs.values())
    if static or cfg.max_drop is not None:
        calib = calibration_batches(family, fp32(), cfg)
    else:  # closed while the graphs are written, reopened for the checks after: the weights are not held twice
        calib = None
        fp32.cache_clear()
    kept: dict[str, list[str]] = {graph: [] for graph in files}
    info: dict[str, Any] = {}
    reference = None
    if cfg.max_drop is not None:
        if evaluate_fn is None:
            raise VlmedgeError("quantize: max_drop needs an evaluator (run through the CLI or a recipe)")
        reference = evaluate_fn(fp32())
        if cfg.metric not in reference:
            raise VlmedgeError(f"quantize: metric {cfg.metric!r} not produced by the evaluator; "
                               f"available: {', '.join(sorted(reference))}")
    groups = {t: _layer_groups(source / n) for t, n in files.items()}
    with atomic_dir(out) as tmp:
        copy_support_files(source, tmp)

        def build(form: QuantizeConfig, keep: dict[str, list[str]], folder: Path = tmp):
            written = _output_files(manifest, form)
            with Progress(f"quantize: writing the {_precision(form)} graphs", len(files), enabled=progress,
                          unit="graphs", every=1 / len(files), after=2.0) as bar:
                for i, (tower, name) in enumerate(files.items()):
                    extra = tuple(re.escape(n) for g in keep[tower] for n in groups[tower].get(g, []))
                    quantize_file(source / name, folder / written[tower], tower, form, scheme, calib, extra)
                    release_memory()  # the quantizer's protobuf copies of this graph
                    bar.update(i + 1, graph=written[tower])
            return family.adapter(folder)

        if len(forms) > 1:  # the chosen form's graphs are moved into `tmp`
            cfg, info["forms"], agreed = _choose_form(forms, source, tmp, family, build, manifest, scheme, why,
                                                      fp32, evaluate_fn if reference else None, reference, progress)
            _write_manifest(tmp, manifest, cfg, scheme, why, kept)
            encoder = family.adapter(tmp)
        else:
            cfg = forms[0]
            _write_manifest(tmp, manifest, cfg, scheme, why, kept)
            encoder = build(cfg, kept)
        if reference is not None:
            score = evaluate_fn(encoder)[cfg.metric]
            info["accuracy_aware"] = {"metric": cfg.metric, "reference": reference[cfg.metric], "steps": []}
            # ranking the groups quantizes each alone and runs it on the calibration batches: minutes at SmolVLM-256M's
            # size, so only when a group has to go back
            order = [] if reference[cfg.metric] - score <= cfg.max_drop else \
                _sensitivity_order(family, source, tmp, files, groups, cfg, scheme, calib, fp32(), progress)
            with Progress("quantize: layer groups back to fp32", len(order), enabled=progress, unit="groups") as bar:
                for k, (tower, group) in enumerate(order):
                    bar.update(k, **{cfg.metric: score})
                    if reference[cfg.metric] - score <= cfg.max_drop:
                        break
                    kept[tower].append(group)
                    encoder = build(cfg, kept)
                    score = evaluate_fn(encoder)[cfg.metric]
                    info["accuracy_aware"]["steps"].append({"kept_fp32": f"{tower}:{group}", cfg.metric: score})
            info["accuracy_aware"]["final"] = score
            info["accuracy_aware"]["within_tolerance"] = reference[cfg.metric] - score <= cfg.max_drop
            _write_manifest(tmp, manifest, cfg, scheme, why, kept)
        # the checks: the fp32 export's outputs and answers first, then the quantized folder's, one set of sessions
        # open at a time (the 2.2B's fp16 held both: 19.4 GiB, the fp16 weights cast to fp32 on a CPU)
        encoder = None
        release_memory()
        calib = calib or calibration_batches(
            family, fp32(), replace(cfg, calibration_batches=min(cfg.calibration_batches, DRIFT_BATCHES)))
        reuse = len(forms) > 1 and not any(kept.values())  # the chosen form's agreement as it was checked
        expected = None if reuse else family.agreement_reference(fp32(), _agreement(cfg), progress)
        references = _reference_outputs(fp32(), calib, progress)
        fp32.cache_clear()
        release_memory()
        encoder = family.adapter(tmp)
        info["drift"] = _drift(references, encoder, calib, progress)
        info.update(agreed if reuse else family.output_agreement(expected, encoder, progress))
        tune = {g: {k: v[:1] for k, v in batches[0].items()} for g, batches in calib.items()}
        encoder = calib = None  # the checks' sessions and inputs go before the thread tuning opens its own
        fp32.cache_clear()
        release_memory()
        _declare_apart(tmp, read_manifest(tmp)["files"].values())
        record_thread_tuning(tmp, cfg.tune_threads, tune, progress)
    info.update({"mode": cfg.mode, "graphs": cfg.graphs, "precision": _precision(cfg),
                 "per_channel": cfg.channelwise, "weight_scheme": scheme, "why": why, "kept_fp32": kept,
                 "size_bytes": onnx_size(out), "fp32_size_bytes": onnx_size(source)})
    if cfg.add_to_source:
        info["added_to_source"] = _add_to_source(Path(out), source, files)
    return info


def _add_to_source(out: Path, source: Path, own: dict[str, str]) -> list[str]:
    """Copy the quantized graphs of `out` (and their external data) into the source export beside its own graphs,
    each through a hidden temporary renamed into place; a graph kept fp32 is the source's own file and is skipped.
    Returns the files added."""
    import shutil

    added = []
    for name in read_manifest(out)["files"].values():
        if name in own.values():
            continue
        for rel in graph_files(out, name):
            dest = source / rel
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.copy2(out / rel, tmp)
            tmp.replace(dest)
            added.append(rel)
    _declare_apart(source, [rel for rel in added if rel.endswith(".onnx")])
    return added


def _declare_apart(folder: Path, names) -> None:
    """Declare the graphs among `names` that keep their weights in a side file in the folder's config.json, where
    the folder is a model folder transformers.js loads (`declare_side_files`)."""
    apart = [name for name in names if len(graph_files(folder, name)) > 1]
    if apart and "config.json" in read_manifest(folder).get("model_files", []):
        declare_side_files(folder / "config.json", apart)


def _forms(cfg: QuantizeConfig, files: dict[str, str], int4_graphs: tuple[str, ...]) -> list[QuantizeConfig]:
    """The configurations to build, each with a mode for every graph: one, or for `mixed` the INT4 form (its
    `int4_graphs` as INT4) and the INT8 form (every graph not set in `graphs` INT8 dynamic)."""
    if cfg.mode != "mixed":
        return [replace(cfg, graphs={g: cfg.mode_of(g) for g in files})]
    fixed = cfg.graphs or {}
    int8 = {g: fixed.get(g, "dynamic") for g in files}
    int4 = {g: "int4" if g in int4_graphs and g not in fixed else m for g, m in int8.items()}
    return [replace(cfg, graphs=g) for g in ([int4, int8] if int4 != int8 else [int8])]


def _precision(cfg: QuantizeConfig) -> str:
    modes = set(cfg.graphs.values()) - {"fp32"} or {"fp32"}
    return PRECISION[modes.pop()] if len(modes) == 1 else "mixed"


def _int4_widths(source: Path, files: dict[str, str], cfg: QuantizeConfig) -> dict[str, list[int]]:
    """Per graph quantized to INT4: the input widths (K) of its MatMuls with constant weights."""
    import onnx

    out = {}
    for graph, name in files.items():
        if cfg.mode_of(graph) != "int4":
            continue
        model = onnx.load(str(source / name), load_external_data=False)
        weights = {i.name: list(i.dims) for i in model.graph.initializer}
        out[graph] = [weights[n.input[1]][0] for n in model.graph.node
                      if n.op_type == "MatMul" and len(weights.get(n.input[1], [])) == 2]
    return out


def _choose_form(forms, source, tmp, family, build, manifest, scheme, why, fp32, evaluate_fn, reference, progress):
    """Build every form into a scratch folder of `tmp`, time the family's headline scenario on each in interleaved
    rounds (and evaluate each with `evaluate_fn`), keep the fastest within the tolerance: its graphs are moved into
    `tmp`, the scratch folders removed. `fp32()`: the fp32 export's adapter. Returns (the chosen form, the record of
    all, the chosen form's output agreement)."""
    import shutil

    head = family.headline_scenario
    folders, record, agreement = [], [], []
    expected = family.agreement_reference(fp32(), _agreement(forms[0]), progress)  # every form answers the same
    for i, form in enumerate(forms):
        folder = tmp / f".form-{i}"
        folder.mkdir()
        copy_support_files(source, folder)
        _write_manifest(folder, manifest, form, scheme, why, {g: [] for g in form.graphs})
        adapter = build(form, {g: [] for g in form.graphs}, folder)
        agreement.append(family.output_agreement(expected, adapter, progress))
        entry = {"form": "+".join(sorted(set(form.graphs.values()))), "graphs": form.graphs,
                 "precision": _precision(form), "size_bytes": onnx_size(folder), **agreement[-1]}
        if evaluate_fn is not None:
            entry[form.metric] = evaluate_fn(adapter)[form.metric]
            entry["within_tolerance"] = reference[form.metric] - entry[form.metric] <= form.max_drop
        folders.append(folder)
        record.append(entry)
    quick = MeasureConfig(warmup=3, min_runs=10, min_seconds=0.3)
    rounds = 3
    samples: list[list[float]] = [[] for _ in forms]
    with Progress("quantize: timing the forms", rounds, enabled=progress, unit="rounds") as bar:
        for r in range(rounds):
            bar.update(r)
            for i, folder in enumerate(folders):
                samples[i].append(family.onnx_latency(folder, quick, ["CPUExecutionProvider"])[head]["p50_ms"])
    for entry, times in zip(record, samples):
        entry[f"{head}_p50_ms"] = float(np.median(times))
    ok = [i for i, e in enumerate(record) if e.get("within_tolerance", True)]
    key = f"{head}_p50_ms"
    if ok:
        best = min(ok, key=lambda i: record[i][key])
    else:  # none within the tolerance: the most accurate, which the layer fallback then improves
        best = max(range(len(record)), key=lambda i: record[i][forms[i].metric])
    fastest = min(range(len(record)), key=lambda i: record[i][key])
    reason = f"{record[best]['form']} ({', '.join(f'{g}: {m}' for g, m in forms[best].graphs.items())})"
    if fastest != best:
        reason += (f": the faster {record[fastest]['form']} form misses the tolerance "
                   f"({forms[fastest].metric} {record[fastest][forms[fastest].metric]:.4f})")
    else:
        others = [f"{record[i]['form']} {record[i][key] / record[best][key]:.2f}x slower" for i in
                  range(len(record)) if i != best]
        reason += f": the fastest form on this CPU ({head} p50 {record[best][key]:.2f} ms; {', '.join(others)})"
    for name in _output_files(manifest, forms[best]).values():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (folders[best] / name).replace(tmp / name)
    for folder in folders:
        shutil.rmtree(folder)
    return forms[best], {"tried": record, "chosen": best, "why": reason}, agreement[best]


def _agreement(cfg: QuantizeConfig) -> "int | Budget":
    """`agreement_questions`, or when unset the time budget that chooses it."""
    if cfg.agreement_questions is not None:
        return cfg.agreement_questions
    return Budget(AGREEMENT_SECONDS, most=100, hint="agreement_questions (--agreement-questions)")


def _output_files(manifest: dict, cfg: QuantizeConfig) -> dict[str, str]:
    """Each graph's file in the quantized folder: with the dtype suffix of its mode in the onnx-community layout
    (`onnx/decoder_model_merged_q4.onnx`), so that one folder can hold several precisions side by side."""
    return {g: graph_file(n, cfg.mode_of(g), manifest.get("layout")) for g, n in manifest["files"].items()}


def _write_manifest(folder: Path, manifest: dict, cfg: QuantizeConfig, scheme: str, why: str, kept) -> None:
    manifest = {k: v for k, v in manifest.items() if k != "threads"}  # the fp32 graphs' tuning; tuned again after
    write_json(folder / MANIFEST, {**manifest, "files": _output_files(manifest, cfg), "precision": _precision(cfg),
                                   "quantization": {**asdict(cfg), "per_channel": cfg.channelwise,
                                                    "weight_scheme": scheme, "why": why, "kept_fp32": kept}})


def _outputs(session, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """A session's first output on each calibration batch."""
    return [session.run(None, b)[0] for b in batches]


def _cosines(ref: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    """Cosine per sample between two graphs' outputs on the same batches (each sample's output flattened); outputs
    of one value per sample (a match logit) are compared as one vector per batch."""
    out = []
    for a, b in zip(ref, got):
        a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
        if a.shape[1] == 1:
            a, b = a.T, b.T
        out.append((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12))
    return np.concatenate(out)


def _reference_outputs(ref, calib: dict[str, list], progress: bool = False) -> dict[str, list[np.ndarray]]:
    """The fp32 export's outputs per graph on calibration inputs, for `_drift`: as many batches as fit in half of
    DRIFT_SECONDS (the quantized graph answers the same batches after; 128 frames of 512 px through a vision graph
    take minutes at SmolVLM-256M's size), with progress."""
    out = {}
    for tower, session in ref.sessions.items():
        out[tower], batches = [], calib[tower]
        with Progress(f"quantize: {tower} outputs of fp32", len(batches), enabled=progress, unit="batches",
                      after=2.0) as bar:
            for k, batch in paced(batches, Budget(DRIFT_SECONDS / 2, most=len(batches), least=1), bar):
                out[tower].append(session.run(None, batch)[0])
                bar.update(k + 1)
    return out


def _drift(references: dict[str, list], enc, calib: dict[str, list], progress: bool = False) -> dict[str, float]:
    """Cosine between the fp32 graphs' outputs (`_reference_outputs`) and the quantized graphs' on the same
    calibration batches (1.0 = unchanged), per graph, with progress."""
    out = {}
    for tower, session in enc.sessions.items():
        want, got = references[tower], []
        with Progress(f"quantize: {tower} drift against fp32", len(want), enabled=progress, unit="batches",
                      after=2.0) as bar:
            for k, batch in enumerate(calib[tower][:len(want)]):
                got.append(session.run(None, batch)[0])
                bar.update(k + 1)
        out[f"{tower}_cosine_min"] = float(_cosines(want, got).min())
    return out


def _sensitivity_order(family, source, tmp, files, groups, cfg, scheme, calib, fp32,
                       progress: bool = False) -> list[tuple[str, str]]:
    """Layer groups, most damaging first: each quantized alone, scored by embedding cosine to fp32, with progress."""
    calib = calib or calibration_batches(family, fp32, cfg)
    towers = [(t, n) for t, n in files.items() if cfg.mode_of(t) != "fp32"]
    scores = []
    with Progress("quantize: ranking layer groups by their damage", sum(len(groups[t]) for t, _ in towers),
                  enabled=progress, unit="groups", after=2.0) as bar:
        for tower, name in towers:
            ref = _outputs(fp32.sessions[tower], calib[tower])
            for group in groups[tower]:
                others = tuple(re.escape(n) for g, nodes in groups[tower].items() if g != group for n in nodes)
                probe = Path(tmp) / f".probe-{Path(name).name}"
                quantize_file(source / name, probe, tower, cfg, scheme, calib, others)
                got = _outputs(open_session(probe), calib[tower])
                probe.unlink()
                scores.append((float(_cosines(ref, got).mean()), tower, group))
                bar.update(len(scores), graph=tower)
    return [(t, g) for _, t, g in sorted(scores)]


@register(QuantizeConfig, kind="quantize", consumes="onnx", produces="onnx", provides=None, reads=("data",))
def run(parent: Artifact, cfg: QuantizeConfig, ctx: Context) -> Artifact:
    cfg = replace(cfg, data=cfg.data or ctx.data.source)
    family = families.of_artifact(parent)
    eval_cfg = ctx.eval or EvalConfig(data=cfg.data)
    info = quantize(parent.path, ctx.out, cfg,
                    evaluate_fn=lambda adapter: flat_metrics(family.evaluate(adapter, eval_cfg)), progress=ctx.progress,
                    family=family)
    return ctx.artifact(parent, ctx.out, info)
