"""What every results file under benchmarks/ records beside its figures: the command that made it, the commit, the
environment (CPU model and flags, library versions), the load average before and after, and whether the CPU was
busy when the timing started (thread pools stall under any other load: such a figure is not comparable).

    run = Provenance.start()          # first thing in a script's main
    ...
    run.write(path, results)          # results + {"provenance": ...}, and a warning line when the CPU was busy

    python benchmarks/provenance.py stamp FILE.json --command "..." --load-before 0.12 [--started T]
                                      # the same record added to a file a shell script copied (benchmarks/run.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUSY_LOAD = 0.5
"""A 1-minute load average at or above this before a run means other processes shared the CPU."""


def commit() -> str:
    """HEAD's hash, `-dirty` when tracked files other than the results themselves (`benchmarks/results/`, which a
    run rewrites) differ from it; 'unknown' outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
        return head + ("-dirty" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed from the repository root: `python benchmarks/x.py ARGS`."""
    argv = list(sys.argv if argv is None else argv)
    script = Path(argv[0]).resolve()
    shown = str(script.relative_to(ROOT)) if script.is_relative_to(ROOT) else argv[0]
    return shlex.join(["python", shown, *argv[1:]])


@dataclass
class Provenance:
    command: str
    load_before: list[float]
    started: float = field(default_factory=time.time)

    @classmethod
    def start(cls, command: str | None = None) -> "Provenance":
        return cls(command or command_line(), [round(x, 2) for x in os.getloadavg()])

    def record(self) -> dict:
        from vlmedge.runtime.measure import environment

        busy = self.load_before[0] >= BUSY_LOAD
        out = {"command": self.command, "commit": commit(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
               "seconds": round(time.time() - self.started, 1), "environment": environment(),
               "load_before": self.load_before, "load_after": [round(x, 2) for x in os.getloadavg()],
               "cpu_busy_before": busy}
        if busy:
            out["note"] = (f"the 1-minute load average was {self.load_before[0]} before this run (>= {BUSY_LOAD}): "
                           "other processes shared the CPU, so its timings are not comparable with an idle run")
        return out

    def write(self, path: Path, results: dict) -> dict:
        """`results` with this run's record under "provenance", written to `path` (returned too)."""
        record = self.record()
        if record["cpu_busy_before"]:
            print(f"warning: {record['note']}", file=sys.stderr)
        full = {**results, "provenance": record}
        Path(path).write_text(json.dumps(full, indent=2) + "\n")
        return full


def main() -> int:
    ap = argparse.ArgumentParser(description="Add the provenance record to a results file a shell script wrote.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stamp")
    s.add_argument("file", type=Path)
    s.add_argument("--command", required=True)
    s.add_argument("--load-before", type=float, nargs="+", required=True)
    s.add_argument("--started", type=float, help="seconds since the epoch when the command started")
    a = ap.parse_args()
    run = Provenance(a.command, a.load_before, a.started or time.time())
    run.write(a.file, json.loads(a.file.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
