"""The measurement method every target shares (MLPerf SingleStream / Offline ideas, trtexec-style reporting).

Warm-up first; then timed runs until both a minimum count and a minimum duration are reached (so p99 rests on at
least 100 samples when asked for). Statistics come from the raw samples: p50/p90/p99, mean, min, max and the
coefficient of variation; a CV above `max_cv` marks the figure as unstable so a gate re-measures instead of failing.

This module needs only the standard library and numpy: the Jetson runner copies it to the device.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np

# ONNX Runtime fusions whose fused kernel is slower on CPU than what it replaces, disabled in every session we open
# and in the graphs we save. SkipLayerNormalization (residual Add + LayerNormalization in one op), ORT 1.32, 2 threads:
# 0.44 ms vs 0.086 ms for Add + LayerNormalization at [1, 197, 768], 0.054 vs 0.023 ms at [1, 16, 768], 0.087 vs
# 0.048 ms at [1, 65, 256].
SLOW_FUSIONS = ("SkipLayerNormFusion",)
SPINNING = os.environ.get("VLMEDGE_ORT_SPINNING", "1") != "0"
"""ONNX Runtime's threads spin-wait for the next operator's work within a run (stopping when the run ends), unless
VLMEDGE_ORT_SPINNING=0: SmolVLM's INT8 decode steps and answers are faster so at 256M and 500M, a small dual
encoder's pair no slower on 2 threads (its image tower alone slower: thread tuning gives it 1 thread, where nothing
spins) (benchmarks/spinning.py; benchmarks/results/spinning-smolvlm.json)."""


def ort_session(path: str | os.PathLike, threads: int | None = None,
                providers: Sequence[str] = ("CPUExecutionProvider",), profile: str | os.PathLike | None = None):
    """An ONNX Runtime session as every measurement opens it. `profile`: a file prefix; when given, ONNX Runtime's
    profiler records every kernel into PREFIX_<time>.json (see `end_profiling`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    # Spin-waiting within a run, none after it: with two sessions (image, text) on a 2-core CPU, one pool's threads
    # still spinning after its run stalled the other's (pair p90 4.7-5.7 ms, 1.2 ms without spinning), so their
    # spinning stops when a run ends (`force_spinning_stop`); within a run it keeps the threads awake between
    # operators (SPINNING).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPINNING else "0")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    return ort.InferenceSession(str(path), opts, providers=list(providers), disabled_optimizers=list(SLOW_FUSIONS))


def machine_key() -> dict[str, Any]:
    """What a thread tuning is valid for: the CPU model and its core count."""
    return {"cpu": cpu_info()[0], "cores": os.cpu_count()}


def random_feeds(image_size: int, max_length: int, vocab_size: int, batch: int, seed: int = 0,
                 pad_id: int | None = None, cls_id: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random pixels and random token ids: the one generator of synthetic inputs (parity, tuning, board timing).

    Full-length sequences by default (the latency worst case); with `pad_id`, each row has a random length and is
    padded (the parity check then covers the attention mask); `cls_id` starts every row."""
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((batch, 3, image_size, image_size)).astype(np.float32)
    ids = rng.integers(5, max(vocab_size, 6), size=(batch, max_length)).astype(np.int64)
    mask = np.ones_like(ids)
    if pad_id is not None:
        for i in range(batch):
            length = int(rng.integers(3, max_length + 1))
            ids[i, length:] = pad_id
            mask[i, length:] = 0
    if cls_id is not None:
        ids[:, 0] = cls_id
    return pixels, {"input_ids": ids, "attention_mask": mask}


def manifest_inputs(manifest: dict, batch: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`random_feeds` of the shapes an export folder's manifest declares."""
    return random_feeds(manifest["preprocess"]["image_size"], manifest["max_length"], manifest.get("vocab_size", 100),
                        batch, seed)


TUNE_SECONDS = 30.0
"""The time thread tuning may take per graph (at least one round: a minute for SmolVLM-256M's vision encoder on
2 cores)."""


def tune_threads(folder: str | os.PathLike, rounds: int = 5, feeds: dict[str, dict[str, np.ndarray]] | None = None,
                 on_round: Callable[[str, int, int], None] | None = None) -> dict[str, Any] | None:
    """Batch-1 p50 of each tower of an export folder at 1, 2, 4, ... threads (up to all cores), timed in interleaved
    rounds (at least 5 runs and 50 ms per count and round, one run where a first run says that would not fit; as
    many of `rounds` as fit in TUNE_SECONDS per tower, at least one), and the fastest count per tower on this
    machine; None on a 1-core machine. One tower's sessions are open at a time. `feeds`: batch-1 inputs per graph
    (default: random image and text inputs of the manifest's shapes). `on_round(tower, rounds done, rounds
    planned)`: before each round, and with both equal when a tower is done (progress; this module is bundled to
    boards without the rest of vlmedge).

    Small towers run faster on fewer threads: waking a second thread for every operator costs more than it saves
    (measured here, 2 cores: the quickstart INT8 image tower 0.29 ms p50 on 1 thread, 0.42 ms on 2)."""
    folder = Path(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    cores = os.cpu_count() or 1
    counts = sorted({1, cores, *(2 ** k for k in range(1, cores.bit_length()) if 2 ** k < cores)})
    if len(counts) < 2:
        return None
    if feeds is None:
        pixels, tokens = manifest_inputs(manifest, 1)
        feeds = {"image": {"pixel_values": pixels}, "text": tokens}
    cfg = MeasureConfig(warmup=2, min_runs=5, min_seconds=0.05)
    result: dict[str, Any] = {"p50_ms": {}}
    for tower, feed in feeds.items():
        sessions = {n: ort_session(folder / manifest["files"][tower], n) for n in counts}
        samples: dict[int, list[float]] = {n: [] for n in counts}
        start, done = time.perf_counter(), 0
        sessions[counts[-1]].run(None, feed)  # a probe: a graph whose run takes seconds gets one run per count
        probe = time.perf_counter() - start   # (SmolVLM-256M's vision feed: 4m21s for one round of 7 runs each)
        per_round = cfg if probe * len(counts) * (cfg.warmup + cfg.min_runs) <= TUNE_SECONDS else \
            MeasureConfig(warmup=0, min_runs=1, min_seconds=0.0)
        while done < rounds:
            if on_round is not None:
                on_round(tower, done, rounds)
            for n, session in sessions.items():
                run = lambda s=session, f=feed: s.run(None, f)  # noqa: E731
                samples[n] += time_fn(run, per_round, keep_samples=True)["samples_ms"]
            done += 1
            if (time.perf_counter() - start) * (done + 1) / done > TUNE_SECONDS:
                break  # the next round would pass the budget: a slow graph stops early
        if on_round is not None:
            on_round(tower, done, done)
        p50 = {n: float(np.percentile(samples[n], 50)) for n in counts}
        result[tower] = min(counts, key=p50.__getitem__)
        result["p50_ms"][tower] = {str(n): round(ms, 4) for n, ms in p50.items()}
        del sessions
    result["tuned_on"] = machine_key()
    return result


def tuned_threads(manifest: dict, tower: str) -> int | None:
    """A tower's thread count tuned on this machine (the manifest's `threads`), or None: ONNX Runtime's default."""
    tuning = manifest.get("threads")
    if not tuning or tuning.get("tuned_on") != machine_key():
        return None
    return tuning.get(tower)


def thread_record(threads: dict[str, int | None]) -> dict[str, Any]:
    """A latency record's thread fields: `threads` (the largest count, an int, as before per-tower tuning) and
    `tower_threads` (each tower's count; None, ONNX Runtime's default, is recorded as all cores)."""
    counts = {t: n or os.cpu_count() or 1 for t, n in threads.items()}
    return {"threads": max(counts.values()), "tower_threads": counts}


def threads_label(threads: dict[str, int | None]) -> str:
    """How a report names per-tower thread counts: '2', or 'image 1, text 2' (None: all cores)."""
    counts = thread_record(threads)["tower_threads"]
    return str(next(iter(counts.values()))) if len(set(counts.values())) == 1 else \
        ", ".join(f"{t} {n}" for t, n in counts.items())


@dataclass(frozen=True)
class MeasureConfig:
    warmup: int = 10
    min_runs: int = 50
    min_seconds: float = 1.0
    max_runs: int = 2000
    throughput_batch: int = 16
    threads: int | None = None
    """Intra-op threads; None = all cores of this machine."""
    max_cv: float = 0.25
    rounds: int = 1
    """A run's benchmark (`vlmedge compress`): every step measured in turn, this many times over (interleaved
    rounds, so that a slow minute of a shared machine falls on one round of one step, not on one step); each figure
    is the median over the rounds (`pool_rounds`)."""
    options: Any = None
    """The model family's own latency settings (a generative model's `image_splitting`), given as keys of the
    recipe's `measure` section."""

    SECTION: ClassVar[str] = "measure"

    def __post_init__(self):
        # ValueError, not VlmedgeError: this module runs on boards without vlmedge (the recipe loader names the line)
        for key, low in (("warmup", 0), ("min_runs", 1), ("max_runs", 1), ("throughput_batch", 1), ("threads", 1),
                         ("rounds", 1)):
            value = getattr(self, key)
            if value is not None and value < low:
                raise ValueError(f"measure: {key}={value}; expected an integer >= {low}")
        if self.min_seconds < 0 or self.max_cv <= 0:
            raise ValueError(f"measure: min_seconds={self.min_seconds}, max_cv={self.max_cv}; expected >= 0 and > 0")


_POOLED = {"min_ms": min, "max_ms": max, "samples": sum, "peak_rss_mb": max}
"""How `pool_rounds` joins a figure over rounds where the median is not it."""


def pool_rounds(records: list[Any]) -> Any:
    """One record from the same measurement repeated in rounds: each number the median over the rounds (min_ms, max_ms
    their extremes, samples their sum), `stable` only if every round was, anything else as the first round has it."""
    first = records[0]
    if isinstance(first, dict):
        out = {}
        for key, value in first.items():
            values = [r[key] for r in records if isinstance(r, dict) and key in r]
            if isinstance(value, bool):
                out[key] = all(values)
            elif isinstance(value, (int, float)) and key in _POOLED:
                out[key] = _POOLED[key](values)
            else:
                out[key] = pool_rounds(values) if isinstance(value, (dict, int, float)) else value
        return out
    if isinstance(first, (int, float)) and not isinstance(first, bool) and len(records) > 1:
        return float(np.median(records)) if isinstance(first, float) else int(np.median(records))
    return first


def stats(samples_ms: list[float] | np.ndarray) -> dict[str, float]:
    s = np.asarray(samples_ms, dtype=np.float64)
    mean = float(s.mean())
    return {"p50_ms": float(np.percentile(s, 50)), "p90_ms": float(np.percentile(s, 90)),
            "p99_ms": float(np.percentile(s, 99)), "mean_ms": mean, "min_ms": float(s.min()),
            "max_ms": float(s.max()), "cv": float(s.std() / mean) if mean > 0 else 0.0, "samples": int(len(s))}


def time_fn(fn: Callable[[], Any], cfg: MeasureConfig, sync: Callable[[], None] | None = None,
            timer: Callable[[Callable[[], Any]], float] | None = None, keep_samples: bool = False) -> dict[str, Any]:
    """Time `fn` per the method above. `timer` (fn -> ms) replaces wall-clock timing, e.g. CUDA events.
    `keep_samples` adds the raw samples (``samples_ms``), to pool interleaved rounds into one figure."""
    for _ in range(cfg.warmup):
        fn()
    if sync:
        sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < cfg.max_runs and (len(samples) < cfg.min_runs or time.perf_counter() - start < cfg.min_seconds):
        if timer is not None:
            samples.append(timer(fn))
            continue
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    result: dict[str, Any] = stats(samples)
    result["stable"] = result["cv"] <= cfg.max_cv
    if keep_samples:
        result["samples_ms"] = samples
    return result


def release_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the system (glibc's `malloc_trim`; elsewhere only
    the collection): after a model is freed its heap stays in the process's RSS otherwise (measured: 0.8 GB of the
    1.2 GB still resident after SmolVLM-256M's PyTorch model was freed), and ONNX Runtime's weights, mapped apart from
    the heap, cannot reuse it."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, instruction-set flags) from /proc/cpuinfo; the platform's name and no flags elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), [])
    return model or platform.processor() or platform.machine(), set(flags)


def environment() -> dict[str, Any]:
    """Where a figure was measured: CPU model and flags that matter, cores, OS, library versions."""
    env: dict[str, Any] = {"machine": platform.machine(), "system": platform.platform(), "python": platform.python_version(),
                           "cores": os.cpu_count()}
    model, flags = cpu_info()
    env["cpu"] = model
    env["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "sse4", "fma", "f16c", "asimd", "sve")))
    versions = {}
    for mod in ("numpy", "onnxruntime", "torch", "transformers", "onnx", "tensorrt"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # absent or broken optional library: simply not recorded
            continue
    env["versions"] = versions
    return env


def suite(image: Callable[[int], Callable[[], Any]], text: Callable[[int], Callable[[], Any]],
          zero_shot: Callable[[], Any], cfg: MeasureConfig, record: dict[str, Any],
          timer=None, sync=None) -> dict[str, Any]:
    """Batch-1 latency of image, text, pair (image then text) and zero-shot; batched image throughput.

    `image(b)` / `text(b)` return a zero-argument callable that runs one batch of size b.
    """
    img1, txt1 = image(1), text(1)

    def pair():
        img1()
        txt1()

    result = time_each({"image": img1, "text": txt1, "pair": pair, "zero_shot": zero_shot}, cfg, record, timer=timer,
                       sync=sync)
    b = cfg.throughput_batch
    batched = time_fn(image(b), MeasureConfig(warmup=2, min_runs=10, min_seconds=0.5), sync=sync, timer=timer)
    result["throughput"] = {"batch": b, "images_per_s": b / (batched["p50_ms"] / 1e3), "p50_ms": batched["p50_ms"]}
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def time_each(scenarios: dict[str, Callable[[], Any]], cfg: MeasureConfig, record: dict[str, Any], timer=None,
              sync=None) -> dict[str, Any]:
    """Batch-1 latency of each named scenario, one after another with `time_fn`: the latency record (`record`, the
    measurement settings, a `stats` per scenario, the process's peak RSS)."""
    result = {**record, "batch": 1, "measure": {k: getattr(cfg, k) for k in ("warmup", "min_runs", "min_seconds")}}
    for name, fn in scenarios.items():
        result[name] = time_fn(fn, cfg, sync=sync, timer=timer)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_ort(folder: Path, cfg: MeasureConfig, providers: list[str] | None = None, tune: bool = True,
            inputs: tuple | None = None) -> dict:
    """Image, text, pair and zero-shot latency of an export folder in ONNX Runtime: the one ORT timing path, for the
    board and for the local `cpu` and `cuda` targets.

    `tune`: with no thread count given and no tuning made on this machine in the manifest, tune the towers' thread
    counts here first (a board is rarely the machine that made the artifact). `inputs`: (pixels, tokens) batches to
    time with (the `cpu` target passes real preprocessed images and captions); else random ones of the manifest's
    shapes."""
    import onnxruntime as ort

    manifest = json.loads((Path(folder) / "manifest.json").read_text())
    if tune and not cfg.threads and tuned_threads(manifest, "image") is None:
        manifest["threads"] = tune_threads(folder)
    available = ort.get_available_providers()
    providers = [p for p in (providers or ["CUDAExecutionProvider", "CPUExecutionProvider"]) if p in available]
    threads = {t: cfg.threads or tuned_threads(manifest, t) for t in ("image", "text")}
    img, txt = (ort_session(Path(folder) / manifest["files"][t], threads[t], providers) for t in ("image", "text"))
    pixels, tokens = inputs or manifest_inputs(manifest, cfg.throughput_batch)
    text_embeds = txt.run(None, {k: v[:1].repeat(36, 0) for k, v in tokens.items()})[0]  # 36 zero-shot classes

    def image(b):
        return lambda: img.run(None, {"pixel_values": pixels[:b]})

    def text(b):
        return lambda: txt.run(None, {k: v[:b] for k, v in tokens.items()})

    def zero_shot():
        return int(np.argmax(img.run(None, {"pixel_values": pixels[:1]})[0] @ text_embeds.T))

    record = {"runtime": f"onnxruntime {ort.__version__}", "providers": img.get_providers(),
              "precision": manifest.get("precision", "fp32"), **thread_record(threads),
              "thread_tuning": manifest.get("threads")}
    return suite(image, text, zero_shot, cfg, record)
