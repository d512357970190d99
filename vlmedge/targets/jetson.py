"""The `jetson` target: a remote device over SSH.

vlmedge packs a self-contained bundle (the export's ONNX files and manifest, `runner.py` with the runtime's
`measure.py`, `parsers.py` and `trtexec.py`), streams it to the board over ssh (tar on stdin: no scp, no sftp needed), runs the runner there
(ONNX Runtime, or `trtexec` as JetPack ships it at /usr/src/tensorrt/bin/trtexec), reads the result back and
removes the bundle.

Safety: host keys are verified against known_hosts (`StrictHostKeyChecking=yes`; `accept_new_host: true` opts in
to trust-on-first-use); `BatchMode` forbids password prompts; every remote argument is shell-quoted; connection
and per-command timeouts turn a lost board into a clear error instead of a hang.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import tarfile
from pathlib import Path
from typing import Any

from ..disk import RECORD_FILES
from ..errors import VlmedgeError
from ..runtime.measure import MeasureConfig
from ..runtime.onnx import graph_files, read_manifest

# the runner and the board-safe runtime modules it imports (standard library, numpy, ONNX Runtime)
BUNDLE_CODE = ("targets/runner.py", "runtime/measure.py", "runtime/parsers.py", "runtime/trtexec.py")
JETPACK_TRTEXEC = "/usr/src/tensorrt/bin/trtexec"


def ssh_command(host: str, user: str | None = None, port: int = 22, key: str | None = None,
                known_hosts: str | None = None, accept_new_host: bool = False, connect_timeout: int = 10) -> list[str]:
    cmd = ["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", f"ConnectTimeout={connect_timeout}",
           "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
           "-o", f"StrictHostKeyChecking={'accept-new' if accept_new_host else 'yes'}"]
    if known_hosts:
        cmd += ["-o", f"UserKnownHostsFile={known_hosts}"]
    if key:
        cmd += ["-i", key, "-o", "IdentitiesOnly=yes"]
    return cmd + [f"{user}@{host}" if user else host]


def _remote(base: list[str], command: str, *, stdin: bytes | None = None, timeout: float, what: str) -> bytes:
    try:
        p = subprocess.run(base + ["--", command], input=stdin, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VlmedgeError(f"jetson: {what} did not finish within {timeout:.0f} s (connection lost or board hung); "
                           f"host {base[-1]}") from None
    if p.returncode == 255:
        reason = (p.stderr.decode(errors="replace").strip().splitlines() or ["ssh failed"])[-1]
        raise VlmedgeError(f"jetson: ssh to {base[-1]} failed during {what}: {reason}")
    if p.returncode != 0:
        tail = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise VlmedgeError(f"jetson: {what} failed on {base[-1]} (exit {p.returncode}): {tail[0][:200]}")
    return p.stdout


def make_bundle(export_folder: Path) -> bytes:
    """A tar of the export (ONNX, manifest, tokenizer files) and the runner code."""
    graphs = read_manifest(export_folder)["files"].values()  # a clear error for anything but an export folder
    buf = io.BytesIO()
    package = Path(__file__).resolve().parent.parent
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for f in sorted(export_folder.iterdir()):
            if f.is_file() and f.name not in RECORD_FILES:
                tar.add(f, arcname=f.name)
        for name in graphs:  # graphs in a subfolder (the onnx-community layout's onnx/), with their external data
            for rel in graph_files(export_folder, name):
                if (export_folder / rel).parent != export_folder:
                    tar.add(export_folder / rel, arcname=rel)
        for name in BUNDLE_CODE:
            tar.add(package / name, arcname=Path(name).name)
    return buf.getvalue()


def benchmark(path: str | os.PathLike, cfg: MeasureConfig = MeasureConfig(), *, host: str | None = None,
              user: str | None = None, port: int = 22, key: str | None = None, known_hosts: str | None = None,
              accept_new_host: bool = False, python: str = "python3", runtime: str = "ort",
              trtexec: str = JETPACK_TRTEXEC, remote_dir: str | None = None, timeout: float = 1800,
              keep: bool = False, **_: Any) -> dict[str, Any]:
    """Copy, run, fetch. `runtime`: 'ort' (ONNX Runtime on the board) or 'trtexec'."""
    if not host:
        raise VlmedgeError("jetson target needs a host (recipe: targets: [{jetson: {host: orin.local, user: ...}}])")
    if runtime not in ("ort", "trtexec"):
        raise VlmedgeError(f"jetson: runtime={runtime!r}; expected ort or trtexec")
    folder = Path(path)
    base = ssh_command(host, user, port, key, known_hosts, accept_new_host)
    remote = remote_dir or f"/tmp/vlmedge-bench-{os.getpid()}"
    q = shlex.quote
    _remote(base, f"mkdir -p {q(remote)} && tar -xf - -C {q(remote)}", stdin=make_bundle(folder), timeout=600,
            what="copying the bundle")
    args = [python, f"{remote}/runner.py", "--folder", remote, "--json", f"{remote}/result.json",
            "--warmup", str(cfg.warmup), "--min-runs", str(cfg.min_runs), "--min-seconds", str(cfg.min_seconds),
            "--throughput-batch", str(cfg.throughput_batch)]
    if cfg.threads:
        args += ["--threads", str(cfg.threads)]
    if runtime == "trtexec":
        args += ["--trtexec", trtexec]
    try:
        _remote(base, " ".join(q(a) for a in args), timeout=timeout, what="the benchmark")
        raw = _remote(base, f"cat {q(remote + '/result.json')}", timeout=60, what="fetching the result")
    finally:
        if not keep:
            try:
                _remote(base, f"rm -rf {q(remote)}", timeout=60, what="cleaning up")
            except VlmedgeError:
                pass  # the result (or the original error) matters more than the leftover bundle
    try:
        result = json.loads(raw)
    except json.JSONDecodeError:
        raise VlmedgeError(f"jetson: the runner on {host} returned no JSON result") from None
    info = result.get("device_info", {})
    result.update({"target": "jetson", "host": host,
                   "device": info.get("model") or f"{info.get('hostname')} ({info.get('machine')})"})
    return result
