"""Progress of long work: a rich bar on a terminal, plain lines in logs (CI), nothing with --quiet.

When stdout is not a terminal a live bar prints nothing until the end (or garbage), so a CI log showed a stage line
and then 7 minutes of silence. There, `Progress` prints one line at about every `every` of the work (and at the end):

    train: 80/800 (10%) loss 2.4812, 206 samples/s; elapsed 1m12s, ETA 10m48s
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

LARGE = 4096
"""Sets of items (images to embed or decode) at least this large report their progress; smaller ones are quick."""


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


@dataclass(frozen=True)
class Budget:
    """A count chosen by time, for a check whose cost grows with the model (greedy answers of a 256M-parameter VLM
    take seconds each on a CPU, a tiny one's milliseconds): as many items as fit in `seconds` at the pace of the
    first `least` timed ones, at least `least`, at most `most`. `hint` (the setting that fixes the count) is named in
    the log line that states the choice."""

    seconds: float
    most: int
    least: int = 2
    hint: str = ""

    def fit(self, pace_s: float) -> int:
        return max(self.least, min(self.most, int(self.seconds / max(pace_s, 1e-9))))


def upper(count: "int | Budget") -> int:
    """The most items `count` (a number, or a `Budget`) can take: how many to prepare."""
    return count.most if isinstance(count, Budget) else count


def paced(items: Sequence, count: "int | Budget", bar: "Progress", timed_from: int = 0) -> Iterator[tuple[int, Any]]:
    """(index, item) for the first `count` of `items`, or for a `Budget`: items from `timed_from` on are timed (the
    ones before it are extra, e.g. a slow kind of item checked once), and after `least` of them the count is fixed,
    set as `bar`'s total and, when the budget cuts it, said in one line ("quantize: answer agreement: 16 questions
    (the first 1, then 15 at 4.0 s each: ~59s of a 1m00s budget; set agreement_questions (--agreement-questions)
    for more)", measured on the SmolVLM-256M shape). The time is the
    caller's work between one item and the next."""
    if not isinstance(count, Budget):
        yield from enumerate(items[:count])
        return
    n, t0 = len(items), time.perf_counter()
    for k, item in enumerate(items):
        if k >= n:
            return
        if k == timed_from:
            t0 = time.perf_counter()
        yield k, item
        if k == timed_from + count.least - 1:
            pace = (time.perf_counter() - t0) / count.least
            n = min(len(items), timed_from + count.fit(pace))
            if n < min(len(items), count.most):  # the budget binds: say so
                hint = f"; set {count.hint} for more" if count.hint else ""
                first, timed = f"the first {timed_from}, then " if timed_from else "", n - timed_from
                each = f"{pace * 1e3:.0f} ms" if pace < 1 else f"{pace:.1f} s"
                bar.say(f"{bar.label}: {n} {bar.unit} ({first}{timed} at {each} each: ~{_duration(timed * pace)} of "
                        f"a {_duration(count.seconds)} budget{hint})")
            bar.retotal(n)


class Progress:
    """`update(completed, **fields)` as work advances; `fields` are shown as `name value` (floats to 4 digits, a
    field named `rate` as `N {unit}/s`). A context manager; `close()` is idempotent. `after`: plain lines only once
    this many seconds have passed (a loop whose length varies with the model, quiet when it is quick)."""

    def __init__(self, label: str, total: int, *, enabled: bool = True, start: int = 0, unit: str = "items",
                 every: float = 0.1, terminal: bool | None = None, stream=None, after: float = 0.0):
        self.label, self.total, self.unit, self.start = label, max(int(total), 1), unit, start
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty() if terminal is None else terminal
        self.every, self.after = every, after
        self.step = max(1, round(self.total * every))
        self.next_line = (start // self.step + 1) * self.step
        self.t0 = time.perf_counter()
        self.done = start
        self.fields: dict[str, Any] = {}
        self.bar = None
        if self.enabled and self.terminal:
            from rich.progress import BarColumn, MofNCompleteColumn
            from rich.progress import Progress as Bar
            from rich.progress import TextColumn, TimeRemainingColumn

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
                parts.append(f"{v:.0f} {self.unit}/s" if v >= 10 else f"{v:.2g} {self.unit}/s")  # 0.14, not 0
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

    def retotal(self, total: int) -> None:
        """The work turned out to be `total` items (a `Budget` fixed it)."""
        self.total = max(int(total), 1)
        self.step = max(1, round(self.total * self.every))
        self.next_line = (self.done // self.step + 1) * self.step
        if self.bar is not None:
            self.bar.update(self.task, total=self.total)
        elif self.enabled and self.done >= self.total:
            self._line()  # the work already done is all of it: its last line

    def say(self, text: str) -> None:
        """One line of its own (above the bar on a terminal); nothing when disabled."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed < self.after:
            return  # quick work says nothing
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
