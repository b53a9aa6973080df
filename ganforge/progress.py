"""A small progress line for long work (training, export, batch jobs): rate, ETA, a status.

On a terminal it redraws one line; otherwise (CI logs, pipes) it prints a line every
`every_s` seconds so logs stay short.
"""

from __future__ import annotations

import sys
import time


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "it", stream=None,
                 every_s: float = 5.0, enabled: bool = True, initial: int = 0):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.enabled = enabled
        self.n = self.initial = initial     # work done before (a resumed run): not in the rate
        self.start = time.perf_counter()
        self._last = 0.0
        self._drawn_at = -1
        self._tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.status = ""

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, k: int = 1, status: str | None = None) -> None:
        self.n += k
        if status is not None:
            self.status = status
        now = time.perf_counter()
        if self.enabled and (self.n >= self.total or now - self._last >= (0.2 if self._tty else self.every_s)):
            self._last = now
            self._drawn_at = self.n
            self._draw(final=False)

    def line(self) -> str:
        el = self.elapsed
        rate = (self.n - self.initial) / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        pct = 100.0 * self.n / self.total if self.total else 100.0
        width = 24
        filled = int(width * min(self.n, self.total) / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        tail = f" {self.status}" if self.status else ""
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {pct:5.1f}% "
                f"{rate:.2f} {self.unit}/s elapsed {_fmt_time(el)} eta {_fmt_time(eta)}{tail}")

    def _draw(self, final: bool) -> None:
        if self._tty:
            self.stream.write("\r\033[K" + self.line() + ("\n" if final else ""))
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tty:
            self._draw(final=True)
        elif self._drawn_at != self.n:
            self._draw(final=False)
