"""The runtime of exported artifacts: the manifest, ONNX Runtime sessions, the ONNX encoder, thread tuning.

Stages write export folders, and evaluation, targets and bench read them through this module; it knows nothing of
stages. An export folder holds its graphs (`manifest["files"]`: graph name -> ONNX file), `manifest.json` (format,
family, precision, declared inputs, preprocessing, tokenizer files, parity, thread tuning) and what a device needs
besides (tokenizer files, zero-shot data).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._hf import quiet_transformers
from .._progress import Progress
from ..disk import folder_size, read_json, write_json
from ..errors import VlmedgeError
from ..preprocess import Preprocess
from .measure import ort_session, tune_threads, tuned_threads

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "vlmedge-onnx/1"


def record_thread_tuning(folder: Path, enabled: bool, feeds: dict | None = None, progress: bool = False) -> None:
    """Tune the graphs' thread counts on this machine into the folder's manifest (`feeds`: batch-1 inputs per
    graph; default random image and text inputs)."""
    bars: dict[str, Progress] = {}

    def on_round(tower: str, done: int, rounds: int) -> None:
        if tower not in bars:
            bars[tower] = Progress(f"threads: timing {tower} at each thread count", rounds, enabled=progress, unit="rounds",
                                   every=1 / rounds, after=2.0)
        if done == rounds:  # the tower is done (early when its budget ran out)
            bars[tower].retotal(rounds)
            bars[tower].update(done)
            bars[tower].close()
        else:
            bars[tower].update(done)

    tuning = tune_threads(folder, feeds=feeds, on_round=on_round) if enabled else None
    if tuning:
        write_json(folder / MANIFEST, {**read_manifest(folder), "threads": tuning})


SIDE_FILE = "_data"
"""A graph that keeps its weights apart (over protobuf's 2 GB) keeps them in its file's name + this: `X.onnx_data`,
onnx-community's and Optimum's naming, the name transformers.js derives from the graph's."""
SIDE_FILES = (SIDE_FILE, ".data")
"""Side-file suffixes read: vlmedge wrote `X.onnx.data` until its exports took onnx-community's naming."""


def side_file(path: Path) -> Path:
    """The side file a graph written now keeps its weights in."""
    return path.with_name(path.name + SIDE_FILE)


def graph_files(folder: str | os.PathLike, name: str) -> list[str]:
    """A graph's files in an export folder, relative to it: the ONNX file and its external data where there is any."""
    return [rel for rel in (name, *(name + s for s in SIDE_FILES)) if (Path(folder) / rel).is_file()]


def onnx_size(folder: str | os.PathLike) -> int:
    """Bytes of an export folder's graphs (the manifest's files and their external data): what ships. Other
    precisions' graphs beside them (an onnx-community folder's `onnx/`) are not counted."""
    folder = Path(folder)
    graphs = read_json(folder / MANIFEST, "")["files"].values()
    return sum(folder_size(folder / rel) for name in graphs for rel in graph_files(folder, name))


DTYPE_SUFFIX = {"fp32": "", "dynamic": "_quantized", "static": "_int8", "int4": "_q4", "fp16": "_fp16"}
"""A graph's file name suffix per quantization mode in the onnx-community layout, where one folder can hold each
precision side by side and transformers.js picks one by `dtype` (q8: `_quantized`, int8, q4, fp16)."""


def graph_file(name: str, mode: str, layout: str | None) -> str:
    """Where a graph quantized in `mode` is written: `onnx/decoder_model_merged_q4.onnx` in the onnx-community
    layout, the fp32 export's name otherwise."""
    if layout != "onnx-community":
        return name
    path = Path(name)
    return str(path.with_name(path.stem + DTYPE_SUFFIX[mode] + path.suffix).as_posix())


def read_manifest(folder: str | os.PathLike, graphs: Sequence[str] = ()) -> dict[str, Any]:
    """An export folder's manifest, checked: its format, `files` a mapping of graph names to ONNX files that exist in
    the folder, and (`graphs`) holding each graph the reader runs: one line naming the file and key otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    manifest = read_json(path, f"{folder}: no {MANIFEST}; not an export folder (run vlmedge export first)")
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise VlmedgeError(f"{path}: format {got!r}, expected {MANIFEST_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(k, str) and isinstance(v, str) and v
                                                           for k, v in files.items()):
        raise VlmedgeError(f"{path}: 'files' must map each graph name to its ONNX file (got {str(files)[:80]})")
    try:
        Preprocess(**manifest["preprocess"])
    except (KeyError, TypeError, ValueError) as e:
        raise VlmedgeError(f"{path}: preprocess is missing or not usable ({e})") from None
    if type(manifest.get("max_length")) is not int or manifest["max_length"] < 1:
        raise VlmedgeError(f"{path}: max_length {manifest.get('max_length')!r} is not a positive integer")
    for graph in graphs:
        if graph not in files:
            raise VlmedgeError(f"{path}: files has no {graph!r} graph (it has {', '.join(files)}); a "
                               f"{manifest.get('family', 'dual_encoder')} export needs {', '.join(graphs)}")
    for graph, name in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise VlmedgeError(f"{path}: files.{graph} = {name!r} is not a path inside the folder")
        if not (folder / name).is_file():
            raise VlmedgeError(f"{folder / name}: missing (files.{graph} in {path})")
    return manifest


def open_session(path: Path, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",),
                 profile: str | os.PathLike | None = None):
    """`measure.ort_session` with a one-line error for a missing or corrupted file."""
    if not path.is_file():
        raise VlmedgeError(f"{path}: file not found")
    try:
        return ort_session(path, threads, providers, profile)
    except Exception as e:  # ORT raises its own exception types for invalid models
        raise VlmedgeError(f"{path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:160]})") from None


def graph_inputs(path: Path) -> dict[str, list[Any]]:
    """A graph's inputs and their shapes (names for dynamic axes), read without its weights."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx raises its own decode errors for a corrupted file
        raise VlmedgeError(f"{path}: not a readable ONNX file ({str(e).splitlines()[0][:160]})") from None
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                     for d in i.type.tensor_type.shape.dim] for i in graph.input}


def check_inputs(path: Path, graph: dict[str, list[Any]], declared: dict[str, list[Any]]) -> None:
    """The manifest's declared inputs must be what the graph takes (a fixed size that differs would be an ONNX
    Runtime shape error at the first run): a one-line error naming the file."""
    for name, dims in declared.items():
        if name not in graph:
            raise VlmedgeError(f"{path}: the manifest declares input {name!r}, the graph has {sorted(graph)}")
        for axis, (want, have) in enumerate(zip(dims, graph[name])):
            if isinstance(want, int) and isinstance(have, int) and want != have:
                raise VlmedgeError(f"{path}: input {name} axis {axis} is {have} in the graph but {want} in "
                                   f"{MANIFEST} (the manifest was edited, or belongs to another export)")


class OnnxEncoder:
    """An export folder as an `Encoder` for the evaluator: the ONNX files run in ONNX Runtime."""

    def __init__(self, folder: str | os.PathLike, threads: int | None = None,
                 providers: Sequence[str] = ("CPUExecutionProvider",), batch_size: int = 64,
                 profile: str | os.PathLike | None = None, open_sessions: bool = True):
        """`open_sessions=False`: preprocessing and tokenizer only (a caller that runs the graphs its own way)."""
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, ("image", "text"))
        self.preprocess = Preprocess(**self.manifest["preprocess"])
        self.batch_size = batch_size
        files = self.manifest["files"]
        prefix = {t: None if profile is None else f"{profile}-{t}" for t in ("image", "text")}
        # threads=None: the count each tower was tuned to on this machine (manifest), else ONNX Runtime's default
        self.threads = {t: threads or tuned_threads(self.manifest, t) for t in ("image", "text")}
        self._tokenizer = None
        if open_sessions:
            self.image_session = open_session(self.folder / files["image"], self.threads["image"], providers,
                                              prefix["image"])
            self.text_session = open_session(self.folder / files["text"], self.threads["text"], providers,
                                             prefix["text"])
        size = self.preprocess.image_size
        declared = {**self.manifest.get("inputs", {}), "image": {"pixel_values": ["batch", 3, size, size]}}
        for graph, name in files.items():  # preprocessing and declared inputs match the graphs
            path = self.folder / name
            if open_sessions:  # the sessions know their inputs; parsing the file again would cost a full read
                check_inputs(path, {i.name: i.shape for i in self.sessions[graph].get_inputs()},
                             declared.get(graph, {}))
            elif path.is_file():
                check_inputs(path, graph_inputs(path), declared.get(graph, {}))

    @property
    def sessions(self) -> dict[str, Any]:
        """Graph name -> its ONNX Runtime session."""
        return {"image": self.image_session, "text": self.text_session}

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            quiet_transformers()
            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        return self._tokenizer

    def run_image(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.image_session.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def run_text(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self.text_session.run(None, {"input_ids": input_ids.astype(np.int64),
                                            "attention_mask": attention_mask.astype(np.int64)})[0]

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self.tokenizer(list(texts), padding="max_length", truncation=True,
                              max_length=self.manifest["max_length"], return_tensors="np")

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        out = [self.run_image(pixel_values[i:i + self.batch_size]) for i in range(0, len(pixel_values), self.batch_size)]
        return np.concatenate(out).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            tok = self.tokenize(texts[i:i + self.batch_size])
            out.append(self.run_text(tok["input_ids"], tok["attention_mask"]))
        return np.concatenate(out).astype(np.float32)
