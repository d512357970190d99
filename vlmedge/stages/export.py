"""ONNX export of the graphs a model's family declares (`Family.graphs`), with a parity check against PyTorch, the
family's own checks (`verify_export`) and the manifest. The folder follows the layout asked for (`Family.layouts`;
the first is the default); every export folder also holds manifest.json (family, preprocessing, tokenizer files,
opset, source, parity, precision) and the tokenizer files, so a device needs nothing else.

- dual encoder: image_encoder.onnx (pixel_values -> image_embeds, L2-normalised) and text_encoder.onnx
  (input_ids, attention_mask -> text_embeds), plus zero_shot_labels.json + zero_shot_text_embeds.npy, so a device
  can classify with the image encoder alone; `layout: onnx-community` writes onnx/vision_model.onnx and
  onnx/text_model.onnx beside config.json and preprocessor_config.json, a folder transformers.js loads as written.
- generative: onnx-community's vision_encoder.onnx, embed_tokens.onnx and decoder_model_merged.onnx (with its KV
  cache) in onnx/, beside the model's configs.
- matching: image_encoder.onnx, text_encoder.onnx and matcher.onnx (the cross-attention ITM head).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import families
from .._progress import Budget, Progress
from ..artifact import Artifact
from ..disk import RECORD_FILES, atomic_dir, write_json
from ..errors import VlmedgeError
from ..families.onnx_export import declare_side_files, finish_graph, quiet_export, trace_graph
from ..runtime.fusion import fuse_attention
from ..runtime.measure import ort_session, release_memory
from ..runtime.onnx import MANIFEST, MANIFEST_FORMAT, SIDE_FILES, onnx_size, record_thread_tuning
from . import Context, register

ONE_FILE_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2
"""A graph with more weights than this keeps them in its side file (`X.onnx_data`): protobuf holds at most 2 GB."""
PARITY_SECONDS = 60.0
"""The time an unset `parity_questions` may take (the questions of a split image come on top)."""


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 17
    """ONNX opset (11..21)."""
    max_abs_diff: float = 1e-4
    """Parity: largest allowed |onnx - torch| on any embedding element."""
    min_cosine: float = 0.9999
    """Parity: smallest allowed cosine between ONNX and PyTorch outputs."""
    parity_samples: int = 4
    """Fresh random inputs per graph for the parity check."""
    parity_questions: int | None = None
    """Held-out inputs of the family's end-to-end parity check (`Family.verify_export`): a generative model's
    questions, whose greedy answers from the ONNX files must be token-identical to PyTorch generate's (at most one
    may differ); a matching model's images, whose ITM reranking order must match PyTorch's (one batched pass). None:
    as many as fit in PARITY_SECONDS at the pace of the first two (2 to 100; a tiny model answers 100 in seconds, a
    SmolVLM-256M 8 in a minute on 2 cores, after its split question), said in the log; the count is recorded in the
    manifest. A family without such a check ignores it."""
    zero_shot_labels: tuple[str, ...] = field(default_factory=tuple)
    """Captions whose normalised text embeddings are precomputed into the export (e.g. 'a red circle')."""
    tune_threads: bool = True
    """Time each tower at 1, 2, 4, ... threads on this machine and record the fastest in the manifest, which
    vlmedge's runners use when no thread count is given."""
    fuse_attention: bool = True
    """Rewrite each graph's unmasked self-attention as ONNX Runtime's MultiHeadAttention op (a vision tower's; a
    padded text tower keeps its own), kept only where its outputs match the unfused graph's, and write a graph its
    family can write as fused operators that way (`Graph.write`: a generative model's decoder, with
    GroupQueryAttention) instead of tracing it. SmolVLM-256M's vision graph: 1.06x (fp32) and 1.12x (INT8) faster
    on 2 AVX-512 cores."""
    layout: str | None = None
    """The folder's layout; None: the family's own (a dual encoder or matching model: flat, image_encoder.onnx ...;
    a generative model: onnx-community). onnx-community: a model folder transformers.js loads as written (a dual
    encoder: onnx/vision_model.onnx and onnx/text_model.onnx, config.json, preprocessor_config.json)."""
    seed: int = 0

    def __post_init__(self):
        if not 11 <= self.opset <= 21:
            raise VlmedgeError(f"export: opset={self.opset}; expected 11..21")
        if (self.parity_questions is not None and self.parity_questions < 1) or self.parity_samples < 1:
            raise VlmedgeError("export: parity_samples and parity_questions must be >= 1")

    def check_model(self, shapes: dict[str, dict[str, int]], family) -> None:
        """At recipe load: the layout is one the model's family writes."""
        self.layout_of(family)

    def layout_of(self, family) -> str:
        """The layout to write (`layout`, else the family's own); a one-line error for one it does not write."""
        if not family.layouts:
            raise VlmedgeError(f"the {family.name} family cannot be exported")
        layout = self.layout or next(iter(family.layouts))
        if layout not in family.layouts:
            raise VlmedgeError(f"export: layout {layout!r}; a {family.name} export is one of "
                               f"{', '.join(family.layouts)}")
        return layout


def export(source: str | os.PathLike, out: str | os.PathLike, cfg: ExportConfig = ExportConfig(),
           eval_cfg=None, progress: bool = False, family: families.Family | None = None) -> dict[str, Any]:
    """Export a model folder to ONNX (the graphs its family declares), check them, and write the manifest.
    `eval_cfg` (an `EvalConfig`): its zero-shot classes are precomputed into the export (`export_extras`);
    `progress`: the family's checks of the export report progress; `family`: the model's (default: read from the
    folder)."""
    import onnx

    family = family or families.of(source)
    layout = cfg.layout_of(family)
    model = family.load(source, attn_implementation="eager")  # eager attention: a graph ORT's fusions recognise
    graphs = [replace(g, file=family.layouts[layout][g.name]) for g in family.graphs(model)]
    feeds = family.parity_inputs(model, max(2, cfg.parity_samples), cfg.seed)
    parameters = family.parameters(model)
    files, defaults = {g.name: g.file for g in graphs}, {g.name: g.defaults for g in graphs}
    with atomic_dir(out) as tmp:
        # 1. with the PyTorch model: each graph traced (its weights streamed to a side file), the reference outputs
        # and the family's end-to-end reference (`export_references`)
        weights, written = _trace(family, model, graphs, feeds, tmp, cfg.opset, progress, cfg.fuse_attention)
        reference = _reference_outputs(graphs, feeds)
        manifest = {"format": MANIFEST_FORMAT, "family": family.name, "precision": "fp32", "layout": layout,
                    "files": files, "opset": cfg.opset,
                    "inputs": {g.name: g.declared for g in graphs}, **family.manifest_fields(model, reference, tmp),
                    "model_files": family.model_files(model, tmp, layout),  # after the tokenizer manifest_fields saves
                    "source_model": str(source), "parameters": parameters}
        apart = [files[name] for name in files if weights[name] >= ONE_FILE_BYTES]
        if apart and "config.json" in manifest["model_files"]:  # a model folder transformers.js loads
            declare_side_files(tmp / "config.json", apart)
        questions = cfg.parity_questions or Budget(PARITY_SECONDS, most=100,
                                                   hint="parity_questions (--parity-questions)")
        expected = family.export_references(model, questions, progress)
        # 2. the PyTorch model freed: the graphs finished and checked, then opened in ONNX Runtime (the weights are
        # held once at a time)
        del model, graphs
        release_memory()
        fused: dict[str, int] = {}
        with Progress("export: checking the graphs", len(files), enabled=progress, unit="graphs",
                      every=1 / len(files)) as bar:
            for i, (name, file) in enumerate(files.items()):
                path = tmp / file
                one_file = file not in apart
                finish_graph(path, defaults[name], one_file)
                if name in written:
                    fused[name] = _attention_nodes(path)
                elif cfg.fuse_attention and one_file:
                    fused[name] = _fused(path, feeds[name], cfg.max_abs_diff, fuse_attention)
                onnx.checker.check_model(str(path), full_check=True)
                release_memory()  # the protobuf copies and fusion sessions of this graph
                bar.update(i + 1, graph=file)
        manifest["fused_attention"] = {name: n for name, n in fused.items() if n}
        write_json(tmp / MANIFEST, manifest)
        adapter = family.adapter(tmp)  # one set of sessions for parity, the sanity check and the extras
        parity = {name: _parity(adapter.sessions[name].run(None, feeds[name])[0], ref)
                  for name, ref in reference.items()}
        for name, p in parity.items():
            if p["max_abs_diff"] > cfg.max_abs_diff or p["cosine_min"] < cfg.min_cosine:
                raise VlmedgeError(f"export: {name} graph parity failed (max abs diff {p['max_abs_diff']:.2e} > "
                                   f"{cfg.max_abs_diff:.0e} or cosine {p['cosine_min']:.6f} < {cfg.min_cosine})")
        manifest["parity"] = parity
        # real inputs: random token ids cannot show a collapsed text tower (a CLIP tower pools at its end-of-text
        # id, which random ids lack, so a healthy one gives them all one output)
        family.sanity_check(adapter)
        manifest.update(family.verify_export(expected, adapter, progress))
        manifest.update(family.export_extras(tmp, adapter, cfg.zero_shot_labels, eval_cfg))
        del adapter  # its sessions close before the thread tuning opens its own
        write_json(tmp / MANIFEST, manifest)
        record_thread_tuning(tmp, cfg.tune_threads, {g: {k: v[:1] for k, v in f.items()} for g, f in feeds.items()},
                             progress)
    return {"parity": parity, "size_bytes": onnx_size(out)}


def _trace(family, model, graphs, feeds, folder: Path, opset: int, progress: bool, fuse: bool
           ) -> tuple[dict[str, int], set[str]]:
    """Each graph traced into `folder` (`trace_graph`: its weights in a side file), or written by its family as fused
    operators (`Graph.write`, when `fuse`); the bytes of weights per graph and the names of the graphs written."""
    import torch

    weights, written = {}, set()
    with Progress("export: tracing the graphs", len(graphs), enabled=progress, unit="graphs",
                  every=1 / len(graphs)) as bar, torch.no_grad(), quiet_export(), family.tracing(model):
        for i, g in enumerate(graphs):
            (folder / g.file).parent.mkdir(parents=True, exist_ok=True)
            if fuse and g.write is not None:
                weights[g.name] = g.write(folder / g.file, opset)
                written.add(g.name)
            else:
                example = tuple(torch.from_numpy(feeds[g.name][k][:1]) for k in g.input_names)
                weights[g.name] = trace_graph(g.module, example, folder / g.file, g.input_names, g.output_names,
                                              opset, g.dynamic_axes)
            bar.update(i + 1, graph=g.file)
    return weights, written


def _reference_outputs(graphs, feeds) -> dict[str, np.ndarray]:
    """PyTorch's output per graph on the parity feeds: a graph's first output is the one compared (embeddings,
    features, logits)."""
    import torch

    with torch.no_grad():
        return {g.name: _first(g.module(*(torch.from_numpy(feeds[g.name][k]) for k in g.input_names)))
                for g in graphs}


def _fused(path: Path, feeds: dict[str, np.ndarray], tolerance: float, fuse) -> int:
    """Replace the graph at `path` by its attention-fused form where that gives the same outputs (max |diff| within
    `tolerance` on the parity inputs); the number of fused attention nodes kept."""
    candidate = path.with_name(path.name + ".fused")
    count = fuse(path, candidate)
    if not count:
        return 0
    feeds = {k: v[:1] for k, v in feeds.items()}
    want = ort_session(path).run(None, feeds)
    try:
        got = ort_session(candidate).run(None, feeds)
    except Exception:  # noqa: BLE001  (a rewrite this ONNX Runtime cannot load or run, e.g. at an old opset, is dropped)
        got = []
    if got and all(a.shape == b.shape and float(np.abs(a - b).max(initial=0.0)) <= tolerance
                   for a, b in zip(got, want)):
        candidate.replace(path)
        return count
    candidate.unlink()
    return 0


def _attention_nodes(path: Path) -> int:
    """ONNX Runtime's fused attention operators in the graph at `path` (its weights not read)."""
    import onnx

    return sum(n.domain == "com.microsoft" and n.op_type.endswith("Attention")
               for n in onnx.load(str(path), load_external_data=False).graph.node)


def _first(out):
    return (out[0] if isinstance(out, (tuple, list)) else out).numpy()


def _parity(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = np.linalg.norm(got, axis=-1), np.linalg.norm(ref, axis=-1)
    cos = (got * ref).sum(-1) / (a * b + 1e-12)
    cos = np.where((a < 1e-12) & (b < 1e-12), 1.0, cos)  # both zero (a padding token's embedding): equal
    return {"max_abs_diff": float(np.abs(got - ref).max()), "cosine_min": float(cos.min())}


def copy_support_files(src: Path, dst: Path) -> None:
    """Copy everything of an export folder except the ONNX files (manifest, tokenizer, zero-shot data)."""
    for p in src.iterdir():
        graph = p.name.endswith((".onnx", *(f".onnx{s}" for s in SIDE_FILES)))
        if p.is_file() and not graph and p.name not in RECORD_FILES:
            shutil.copy2(p, dst / p.name)


@register(ExportConfig, kind="export", consumes="model", produces="onnx", provides="onnx")
def run(parent: Artifact, cfg: ExportConfig, ctx: Context) -> Artifact:
    return ctx.artifact(parent, ctx.out, export(parent.path, ctx.out, cfg, ctx.eval, ctx.progress,
                                                     families.of_artifact(parent)))
