"""The jetson target end to end against a real OpenSSH server on 127.0.0.1 (this machine plays the board)."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmedge.errors import VlmedgeError
from vlmedge.runtime.measure import MeasureConfig
from vlmedge.targets.jetson import benchmark

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
FAST = MeasureConfig(warmup=1, min_runs=3, min_seconds=0.01, throughput_batch=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not Path(SSHD).exists() or not shutil.which("ssh"):
        pytest.skip("OpenSSH server not installed (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = _free_port()
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host'}
AuthorizedKeysFile {d / 'authorized_keys'}
PidFile {d / 'sshd.pid'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE, text=True)
    for _ in range(50):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None:
                pytest.skip(f"sshd could not start: {proc.stderr.read()[-300:]}")
            time.sleep(0.1)
    host_pub = (d / "host.pub").read_text().split()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (d / "empty_known_hosts").write_text("")
    yield {"port": port, "key": str(d / "client"), "known_hosts": str(d / "known_hosts"), "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


def test_jetson_target_copies_runs_and_fetches(sshd, tiny_export):
    r = benchmark(tiny_export, FAST, host="127.0.0.1", port=sshd["port"], key=sshd["key"],
                  known_hosts=sshd["known_hosts"], python=sys.executable)
    assert r["target"] == "jetson" and r["host"] == "127.0.0.1"
    for part in ("image", "text", "pair", "zero_shot"):
        assert r[part]["p50_ms"] > 0 and r[part]["samples"] >= 3
    assert r["runtime"].startswith("onnxruntime") and r["device_info"]["hostname"]
    assert r["throughput"]["images_per_s"] > 0


def test_unknown_host_key_is_refused(sshd, tiny_export):
    with pytest.raises(VlmedgeError, match="Host key verification failed"):
        benchmark(tiny_export, FAST, host="127.0.0.1", port=sshd["port"], key=sshd["key"],
                  known_hosts=str(sshd["dir"] / "empty_known_hosts"), python=sys.executable)


def test_unreachable_board_is_a_clear_error(tiny_export):
    with pytest.raises(VlmedgeError, match="ssh to 127.0.0.1 failed"):
        benchmark(tiny_export, FAST, host="127.0.0.1", port=_free_port(), python=sys.executable)


def test_a_missing_runtime_on_the_board_is_reported(sshd, tiny_export):
    with pytest.raises(VlmedgeError, match="the benchmark failed"):
        benchmark(tiny_export, FAST, host="127.0.0.1", port=sshd["port"], key=sshd["key"],
                  known_hosts=sshd["known_hosts"], python="/nonexistent/python3")
