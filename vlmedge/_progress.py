"""Progress of long work: a rich bar on a terminal, plain lines in logs (CI), nothing with --quiet.

When stdout is not a terminal a live bar prints nothing until the end (or garbage), so a CI log showed a stage line
and then 7 minutes of silence. There, `Progress` prints one line at about every `every` of the work (and at the end):

    train: 80/800 (10%) loss 2.4812, 206 samples/s; elapsed 1m12s, ETA 10m48s
"""

from __future__ import annotations

import sys
import time
from typing import Any


LARGE = 4096
"""Sets of items (images to embed or decode) at least this large report their progress; smaller ones are quick."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """`update(completed, **fields)` as work advances; `fields` are shown as `name value` (floats to 4 digits, a
    field named `rate` as `N {unit}/s`). A context manager; `close()` is idempotent."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, start: int = 0, unit: str = "items",
                 every: float = 0.1, terminal: bool | None = None, stream=None):
        self.label, self.total, self.unit, self.start = label, max(int(total), 1), unit, start
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.step = max(1, round(self.total * every))
        self.next_line = (start // self.step + 1) * self.step
        self.t0 = time.perf_counter()
        self.done = start
        self.fields: dict[str, Any] = {}
        self.bar = None
        if self.enabled and self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[text]}"),
                           TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(label, total=self.total, completed=start, text="")
            self.bar.start()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fields(self) -> str:
        parts = []
        for k, v in self.fields.items():
            if k == "rate":
                parts.append(f"{v:.0f} {self.unit}/s")
            else:
                parts.append(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}")
        return ", ".join(parts)

    def update(self, completed: int, **fields) -> None:
        if not self.enabled:
            return
        self.done = completed
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, text=self._fields())
        elif completed >= self.next_line or completed >= self.total:
            self.next_line = (completed // self.step + 1) * self.step
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        moved = self.done - self.start
        eta = elapsed / moved * (self.total - self.done) if moved > 0 else float("nan")
        fields = self._fields()
        line = (f"{self.label}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%)"
                f"{' ' + fields if fields else ''}; elapsed {_duration(elapsed)}"
                + (f", ETA {_duration(eta)}" if self.done < self.total and eta == eta else ""))
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        self.enabled = False
