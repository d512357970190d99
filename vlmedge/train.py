"""The one training loop of every family, resumable and data-parallel; what it minimises is the family's
(`Family.training_loss`: the dual encoder's symmetric InfoNCE with a learnable temperature, the generative model's
answer NLL, the matching model's ITC + ITM), or with a teacher the distillation objective.

One step, top to bottom: draw the global batch from a step-seeded RNG (so a resumed run sees exactly the batches an
uninterrupted one would), compute the family's loss on each micro-batch, backpropagate, sum gradients across ranks,
clip, step AdamW and the warmup + cosine schedule.

Under ``torchrun`` every rank embeds its slice of the global batch and all-gathers the others' embeddings, so each
rank contrasts against the whole global batch; gradients are summed across ranks, which makes N processes compute
the same update as one process on the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from . import families
from ._progress import Progress
from .artifact import FOLDER
from .data import DEFAULT_SOURCE
from .disk import atomic_dir, write_json
from .errors import Interrupted, VlmedgeError
from .families import TrainBatch
from .losses import DistillLosses
from .models import DEFAULT_PRESET, load_preset


PRESET_DEFAULT = "preset_default"
"""Field metadata of a training setting whose None means: the preset's `train` value, else this fallback."""


def preset_default(fallback):
    """A training setting that defaults to the preset's (its JSON's `train` section), else to `fallback`: the one
    place both defaults are written (`TrainConfig.resolved` applies them, `--help` shows them)."""
    return field(default=None, metadata={PRESET_DEFAULT: fallback})


@dataclass(frozen=True)
class TrainSchedule:
    """How to train: the part of the settings a recipe's train (and distill) stage sets."""

    steps: int | None = preset_default(1000)
    batch_size: int | None = preset_default(64)
    """Global batch size (all ranks together, all accumulation micro-batches together)."""
    lr: float | None = preset_default(5e-4)
    warmup_steps: int | None = preset_default(50)
    weight_decay: float = 0.1
    grad_accum: int = 1
    """Split each batch into this many micro-batches; each contrasts within itself (saves memory, not negatives)."""
    hard_negatives: float = 0.25
    """Fraction of each batch drawn as neighbours of the rest (one attribute changed): hard-negative mining."""
    text_negatives: float | None = preset_default(0.0)
    """Fraction of each batch's images that also get a false caption one edit from a true one (an object's colour,
    shape, size or position changed, two objects swapped) as an extra negative (NegCLIP); data that cannot write
    such captions (only shapes can) ignores it."""
    precision: str = "auto"
    """auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16 (CUDA)."""
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self):
        """Every value set is checked at load (a recipe line, a flag), before any work; unset ones after the
        preset's defaults are filled in (`TrainConfig.resolved`)."""
        stage = "distill" if isinstance(self, DistillStage) else "train"
        checks = [("steps", lambda v: v >= 1, "an integer >= 1"), ("batch_size", lambda v: v >= 2, ">= 2"),
                  ("lr", lambda v: v > 0, "> 0"), ("warmup_steps", lambda v: v >= 0, ">= 0"),
                  ("weight_decay", lambda v: v >= 0, ">= 0"), ("grad_accum", lambda v: v >= 1, ">= 1"),
                  ("hard_negatives", lambda v: 0 <= v < 1, "a fraction in [0, 1)"),
                  ("text_negatives", lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
                  ("precision", lambda v: v in PRECISIONS, ", ".join(PRECISIONS)),
                  ("checkpoint_every", lambda v: v >= 1, ">= 1")]
        for key, ok, expected in checks:
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise VlmedgeError(f"{stage}: {key}={value!r} is invalid; expected {expected}")
        if self.batch_size is not None and self.batch_size % self.grad_accum:
            raise VlmedgeError(f"{stage}: batch_size={self.batch_size} is invalid; expected a multiple of "
                               f"grad_accum={self.grad_accum}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainStage(TrainSchedule):
    """A recipe's train stage (and `vlmedge train`'s flags): the schedule and the two-stage start of a generative
    model."""

    vision_init: str | None = field(default=None, metadata={FOLDER: True})
    """A generative preset's vision encoder starts from this folder's image tower (a vlmedge dual encoder's ViT or a
    SigLIP folder): two-stage training."""
    freeze_vision_steps: int | None = preset_default(0)
    """Keep the vision encoder frozen for this many first steps."""

    def __post_init__(self):
        super().__post_init__()
        if self.freeze_vision_steps is not None and self.freeze_vision_steps < 0:
            raise VlmedgeError(f"train: freeze_vision_steps={self.freeze_vision_steps!r} is invalid; expected >= 0")


@dataclass(frozen=True)
class TrainConfig(TrainStage):
    """Training settings: the schedule plus what to train on. Unset values (None) take the preset's defaults."""

    preset: str = DEFAULT_PRESET
    """Model preset name (tiny, small, base) or a path to a preset JSON."""
    init: str | None = None
    """Start from this model folder (any family vlmedge loads) instead of a fresh preset."""
    data: str = DEFAULT_SOURCE
    """Data source: shapes, shapes:COUNT, an image folder with metadata.jsonl, a COCO .json or .tar shards."""
    data_count: int | None = preset_default(20000)
    """Images to generate (shapes) or to use (the first of a source)."""
    skip_bad: bool = False

    @classmethod
    def from_schedule(cls, schedule: TrainSchedule, **where) -> "TrainConfig":
        """A stage's schedule (train or distill) with what to train on."""
        return cls(**{f.name: getattr(schedule, f.name) for f in fields(schedule) if f.name in
                      {g.name for g in fields(TrainStage)}}, **where)

    def resolved(self) -> "TrainConfig":
        """Every unset setting (None) given its default: the preset's `train` value, else the field's fallback."""
        defaults = load_preset(self.preset).get("train", {}) if not self.init else {}
        values = {f.name: defaults.get(f.name, f.metadata[PRESET_DEFAULT]) for f in fields(self)
                  if PRESET_DEFAULT in f.metadata and getattr(self, f.name) is None}
        return replace(self, **values)  # validated again, every value now set


@dataclass(frozen=True)
class DistillStage(TrainSchedule):
    """A recipe's distill stage: the training schedule (shorter defaults) and the loss weights."""

    steps: int | None = 300
    batch_size: int | None = 128
    lr: float | None = 5e-4
    warmup_steps: int | None = 20
    contrastive: float = 1.0
    affinity: float = 1.0
    feature: float = 1.0
    options: Any = None
    """The student's family's own losses (`Family.options["distill"]`: a matching model's `matching`, a
    generative model's `tokens` and `temperature`), given as keys of the stage."""

    SECTION: ClassVar[str] = "distill"

    def __post_init__(self):
        super().__post_init__()
        self.losses.validate()

    @property
    def losses(self) -> DistillLosses:
        return DistillLosses(**{f.name: getattr(self, f.name) for f in fields(DistillLosses)})


# --- distributed helpers -------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def gather(self, local):
        """All ranks' rows, in rank order; this rank's slice keeps its gradient."""
        if self.world == 1:
            return local
        import torch
        import torch.distributed as dist

        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.detach().contiguous())
        parts[self.rank] = local
        return torch.cat(parts)

    def close(self) -> None:
        """Wait for every rank (rank 0 writes the model), then tear the process group down explicitly: a gloo group
        left to the interpreter's exit can abort a rank whose peer has already gone."""
        if self.world == 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def sum_gradients(self, params) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


# --- checkpoints (safetensors + JSON; written atomically) ----------------------------------------------------------

def save_checkpoint(folder: Path, vlm, optimizer, scheduler, step: int, config: dict) -> None:
    from safetensors.torch import save_file

    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().clone() for k, v in vlm.model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        state = optimizer.state_dict()
        tensors = {f"{idx}/{name}": (v if v.dim() else v.reshape(1)).contiguous()
                   for idx, s in state["state"].items() for name, v in s.items()}
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        vlm.tokenizer.save_pretrained(tmp)
        write_json(tmp / "trainer.json", {"step": step, "param_groups": state["param_groups"],
                                          "scheduler": scheduler.state_dict(), "config": config})


def load_checkpoint(folder: Path, vlm, optimizer, scheduler) -> int:
    from safetensors.torch import load_file

    meta = json.loads((folder / "trainer.json").read_text())
    vlm.model.load_state_dict(load_file(str(folder / "model.safetensors")))
    flat = load_file(str(folder / "optimizer.safetensors"))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    for key, v in flat.items():
        idx, name = key.split("/", 1)
        # scalars were stored with shape [1]: give each state tensor back its parameter's shape
        state.setdefault(int(idx), {})[name] = v.reshape(()) if name == "step" else v.reshape(params[int(idx)].shape)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return int(meta["step"])


# --- training ------------------------------------------------------------------------------------------------------

def _batch_indices(ds, step: int, cfg: TrainConfig) -> list[int]:
    rng = np.random.default_rng([cfg.seed, step, 7])
    n_hard = int(cfg.batch_size * cfg.hard_negatives) if hasattr(ds, "neighbours") else 0
    anchors = rng.integers(len(ds), size=cfg.batch_size - n_hard).tolist()
    return anchors + [ds.neighbours(anchors[k % len(anchors)], rng) for k in range(n_hard)]


def _negatives(ds, indices: list[int], micro: int, cfg: TrainConfig, rng: np.random.Generator):
    """(texts, specs) of false captions for the first `text_negatives` of every rank's micro-batch rows (None for
    the other rows), or None: every micro-batch of every rank gets the same count, so they all-gather evenly."""
    n = round(micro * cfg.text_negatives)
    if not n or not hasattr(ds, "negative_captions"):
        return None
    chosen = [j for j in range(len(indices)) if j % micro < n]
    texts, specs = ds.negative_captions([indices[j] for j in chosen], rng)
    out_t, out_s = [None] * len(indices), [None] * len(indices)
    for j, t, sp in zip(chosen, texts, specs):
        out_t[j], out_s[j] = t, sp
    return out_t, out_s


def make_optimizer(model, cfg: TrainConfig, total_steps: int):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def _autocast(precision: str, device: str):
    import contextlib

    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, progress: bool = True,
          device: str | None = None, on_step: Callable[[int, float], None] | None = None,
          teacher: str | None = None, losses_cfg: DistillLosses | None = None) -> dict[str, Any]:
    """Train a model and write its folder to `out`. Returns a summary (losses, throughput, timings).

    With `teacher` (a model folder), this is distillation: the teacher is frozen in eval mode and the loss is
    the family's distillation objective weighted by `losses_cfg`.
    """
    import torch

    cfg = cfg.resolved()
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    if precision != "fp32" and device == "cpu":
        raise VlmedgeError(f"train: precision={precision} on CPU is emulated (about 50x slower); use fp32 on CPU")
    dist = Dist.from_env(device)
    ckpt = out / "checkpoints" / "last"
    if resume and not (ckpt / "trainer.json").is_file():
        raise VlmedgeError(f"{out}: nothing to resume (no checkpoints/last/trainer.json)")
    if not resume and (out / "config.json").exists():
        raise VlmedgeError(f"{out}: already holds a trained model; choose another --out or remove it")

    if cfg.init:
        family = families.of(cfg.init)
        vlm = family.load(cfg.init)
        resolution = vlm.preprocess.image_size
    else:
        spec = load_preset(cfg.preset)
        family = families.for_preset(spec)
        resolution = spec["preprocess"]["image_size"]
    if cfg.vision_init and cfg.init:
        raise VlmedgeError("train: --vision-init starts a preset's vision encoder; with --init the whole model "
                           "comes from that folder")
    ds = family.open_data(cfg.data, "train", resolution=resolution, count=cfg.data_count, seed=cfg.seed,
                          skip_bad=cfg.skip_bad, progress=progress and dist.rank == 0)
    skipped = list(getattr(ds, "skipped", None) or [])
    if skipped and dist.rank == 0:  # what --skip-bad promises: the count, even under --quiet
        print(f"data: skipped {len(skipped)} unreadable image(s) of {cfg.data} (--skip-bad), e.g. {skipped[0]}; "
              f"training on the other {len(ds)}", flush=True)
    if not cfg.init:
        if resume:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(ckpt, local_files_only=True)
        else:
            tokenizer = family.tokenizer(spec, ds, np.random.default_rng(cfg.seed))
        vlm = family.build(spec, tokenizer, seed=cfg.seed, source=f"preset:{cfg.preset}",
                           vision_init=None if resume else cfg.vision_init)

    model = vlm.model.to(device).train()
    teacher_vlm = None
    if teacher:
        losses_cfg = losses_cfg or DistillLosses()
        losses_cfg.validate()
        teacher_vlm = families.of(teacher).load(teacher)
        teacher_vlm.model.to(device).eval().requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, cfg, cfg.steps)
    start = load_checkpoint(ckpt, vlm, optimizer, scheduler) if resume else 0
    torch.manual_seed(cfg.seed + start)
    log_path = out / "train_log.jsonl"
    if dist.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if not resume and log_path.exists():
            log_path.unlink()

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = Progress("distill" if teacher else "train", cfg.steps, enabled=progress and dist.rank == 0, start=start,
                   unit="samples")
    done = start  # steps whose update has been applied
    stop = _DeferredInterrupt(dist.world == 1)
    try:
        for step in range(start, cfg.steps):
            stop.check()
            t_step = time.perf_counter()
            indices = _batch_indices(ds, step, cfg)
            captions, specs = ds.training_captions(indices, np.random.default_rng([cfg.seed, step, 11]))
            per_rank = len(indices) // dist.world
            lo = dist.rank * per_rank
            micro = per_rank // cfg.grad_accum
            negatives = _negatives(ds, indices, micro, cfg, np.random.default_rng([cfg.seed, step, 13]))
            optimizer.zero_grad(set_to_none=True)
            family.before_step(vlm, step, cfg)
            step_loss = 0.0
            for m in range(cfg.grad_accum):
                a, b = lo + m * micro, lo + (m + 1) * micro
                # micro-batch m of every rank forms one contrastive batch
                rows = [j for r in range(dist.world) for j in range(r * per_rank + m * micro,
                                                                      r * per_rank + (m + 1) * micro)]
                batch = TrainBatch(ds, indices, captions, specs, slice(a, b), rows, dist.gather, device,
                                   lambda: _autocast(precision, device), negatives)
                loss = family.training_loss(vlm, batch, teacher_vlm, losses_cfg)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
            dist.sum_gradients(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            family.after_step(vlm)
            losses.append(step_loss)
            done = step + 1
            rate = len(indices) / (time.perf_counter() - t_step)
            if on_step:
                on_step(step, step_loss)
            if dist.rank == 0:
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": step, "loss": round(step_loss, 6), "lr": scheduler.get_last_lr()[0],
                                        "samples_per_s": round(rate, 1)}) + "\n")
                bar.update(step + 1, loss=step_loss, rate=rate)
                if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                    save_checkpoint(ckpt, vlm, optimizer, scheduler, step + 1, asdict(cfg))
        stop.check()
    except KeyboardInterrupt:
        if dist.rank == 0 and done > start:
            save_checkpoint(ckpt, vlm, optimizer, scheduler, done, asdict(cfg))
            bar.close()
            raise Interrupted(f"interrupted after step {done}; checkpoint saved; continue with --resume") from None
        raise
    finally:
        stop.restore()
        bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"steps": cfg.steps, "resumed_from": start, "first_loss": losses[0] if losses else None,
               "final_loss": float(np.mean(losses[-10:])) if losses else None, "seconds": round(elapsed, 1),
               "samples_per_s": round((cfg.steps - start) * cfg.batch_size / max(elapsed, 1e-9), 1),
               "precision": precision, "world_size": dist.world, "device": device, "config": asdict(cfg),
               "teacher": teacher, "losses": asdict(losses_cfg) if teacher else None, "skipped_images": len(skipped),
               "measured": getattr(ds, "measured", None)}
    if dist.rank == 0:
        vlm.model = model.to("cpu").eval()
        vlm.source = f"distilled:{cfg.init}<-{teacher}" if teacher else f"trained:{cfg.init or 'preset:' + cfg.preset}"
        with atomic_dir(out / ".model.partial") as tmp:
            vlm.save(tmp)
            write_json(tmp / "train_summary.json", summary)
        finish_model_folder(out / ".model.partial", out)
    dist.close()
    return summary


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) during a single-process run stops at the end of the current step, not inside it: a
    KeyboardInterrupt raised in the middle of an optimizer step or of a checkpoint's tokenizer and safetensors writes
    once left a process that never exited, and a half-applied step would be saved as done. A second Ctrl-C
    interrupts at once. Under torchrun (`enabled` False) the signal is left as it is: ranks told to stop at
    different steps would wait on each other's collectives."""

    def __init__(self, enabled: bool):
        import signal
        import threading

        self.requested, self.previous = False, None
        if enabled and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt here, between steps, if Ctrl-C was pressed."""
        if self.requested:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self.previous is not None:
            import signal

            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def finish_model_folder(staged: Path, out: Path) -> None:
    """Move a staged model folder's files into `out`, config.json last: a folder with config.json is complete."""
    files = sorted(staged.iterdir(), key=lambda p: p.name == "config.json")
    for f in files:
        os.replace(f, out / f.name)
    staged.rmdir()
