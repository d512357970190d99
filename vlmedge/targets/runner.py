"""The on-device benchmark runner: needs only Python 3, numpy and ONNX Runtime (or trtexec) on the device.

Copied into a bundle next to `measure.py`, `parsers.py`, the ONNX files and `manifest.json`, then run there:

    python3 runner.py --json result.json [--threads N] [--trtexec /usr/src/tensorrt/bin/trtexec]

Without --threads it first tunes each tower's thread count on the board (unless the manifest already holds a tuning
made on this CPU). It measures image, text, pair and zero-shot latency (batch 1) and batched throughput with the
shared method, and records the device: `nvpmodel -q` mode, CPU clocks, and power and temperature sampled by
`tegrastats` during the run when it exists.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

try:  # inside the package
    from ..runtime import measure, parsers, trtexec
except ImportError:  # in a bundle on the device
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import measure  # type: ignore[no-redef]
    import parsers  # type: ignore[no-redef]
    import trtexec  # type: ignore[no-redef]


class Tegrastats:
    """Samples `tegrastats` in the background while the benchmark runs (if the board has it)."""

    def __init__(self, interval_ms: int = 500):
        self.lines: list[str] = []
        self.proc = None
        exe = shutil.which("tegrastats")
        if exe:
            self.proc = subprocess.Popen([exe, "--interval", str(interval_ms)], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> dict:
        if not self.proc:
            return {}
        self.proc.terminate()
        samples = []
        for line in self.lines:
            try:
                samples.append(parsers.parse_tegrastats(line))
            except ValueError:
                continue
        if not samples:
            return {}
        rails = {k for s in samples for k in s["power_mw"]}
        return {"samples": len(samples),
                "power_mw_mean": {k: float(np.mean([s["power_mw"][k]["now"] for s in samples if k in s["power_mw"]]))
                                  for k in rails},
                "temperature_c_max": {k: max(s["temperature_c"].get(k, -1e9) for s in samples)
                                      for k in samples[-1]["temperature_c"]},
                "gpu_load_percent_mean": float(np.mean([s.get("gpu_load_percent", 0) for s in samples]))}


def device_info() -> dict:
    info = {"hostname": platform.node(), "machine": platform.machine()}
    for key, cmd in (("nvpmodel", ["nvpmodel", "-q"]), ("jetson_release", ["cat", "/etc/nv_tegra_release"])):
        if shutil.which(cmd[0]):
            try:
                info[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                pass
    freqs = sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_cur_freq"))
    if freqs:
        info["cpu_mhz"] = [int(p.read_text()) // 1000 for p in freqs]
    model = Path("/proc/device-tree/model")
    if model.is_file():
        info["model"] = model.read_text().strip("\x00\n")
    return info


run_ort = measure.run_ort  # the one ORT timing path lives with the shared method


def run_trtexec(folder: Path, exe: str, cfg: measure.MeasureConfig) -> dict:
    """Build an engine per tower with trtexec on the device (the `tensorrt` target's command) and parse it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    version = trtexec.version_of(exe)
    if version is None:
        raise RuntimeError(f"cannot tell the TensorRT version of {exe}")
    from_log = {}
    for tower, name in manifest["files"].items():
        cmd = trtexec.build_command(exe, folder / name, trtexec.fixed_shapes(manifest, tower), version,
                                    manifest.get("precision", "fp32"), warmup=cfg.warmup, min_runs=cfg.min_runs,
                                    min_seconds=cfg.min_seconds)
        log = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if log.returncode != 0:
            raise RuntimeError(f"trtexec failed on {name}: {log.stdout[-500:]}{log.stderr[-500:]}")
        from_log[tower] = parsers.parse_trtexec(log.stdout)
    return {"runtime": f"TensorRT {version[0]}.{version[1]} (trtexec)", "batch": 1,
            "image": from_log["image"]["latency"], "text": from_log["text"]["latency"], "trtexec": from_log,
            "command": cmd}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--folder", default=str(Path(__file__).resolve().parent))
    p.add_argument("--json", required=True)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-tune-threads", dest="tune_threads", action="store_false",
                   help="without --threads: use ONNX Runtime's default instead of tuning the towers' counts here")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--min-runs", type=int, default=50)
    p.add_argument("--min-seconds", type=float, default=1.0)
    p.add_argument("--throughput-batch", type=int, default=8)
    p.add_argument("--trtexec", help="path to trtexec: time TensorRT engines instead of ONNX Runtime")
    args = p.parse_args(argv)
    cfg = measure.MeasureConfig(warmup=args.warmup, min_runs=args.min_runs, min_seconds=args.min_seconds,
                                threads=args.threads, throughput_batch=args.throughput_batch)
    folder = Path(args.folder)
    stats = Tegrastats()
    try:
        result = (run_trtexec(folder, args.trtexec, cfg) if args.trtexec
                  else run_ort(folder, cfg, tune=args.tune_threads))
    finally:
        power = stats.stop()
    result["device_info"] = device_info()
    result["power"] = power
    result["environment"] = measure.environment()
    Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
