"""Progress of long loops: a tqdm bar on a terminal, plain periodic lines otherwise.

A bar redraws itself with carriage returns, which a log file keeps as one unreadable line;
when stderr is not a terminal (nohup, a container, CI) `progress` prints one complete line
every `every_s` seconds and a last one when the loop ends.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

DEFAULT_EVERY_S = 30.0


def is_terminal(stream: TextIO | None = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class LineProgress:
    """The tqdm calls this project uses (iterate, update, set_postfix, close), as log lines:
    `desc: 120/1000 (12%), 3.41 it/s, elapsed 00:35, eta 04:18, loss=0.0123`."""

    def __init__(self, iterable: Iterable | None = None, *, total: int | None = None,
                 initial: int = 0, desc: str = "", every_s: float = DEFAULT_EVERY_S,
                 stream: TextIO | None = None) -> None:
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        self.every_s, self.stream = every_s, stream
        self.postfix: dict[str, Any] = {}
        self._start_n = initial
        self._started = self._last = self._updated = time.monotonic()
        self._printed_n: int | None = None
        self._closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("LineProgress without an iterable is not iterable; call update()")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self._updated = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print(now)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._printed_n != self.n and self.n > self._start_n:
            self._print(self._updated)  # the rate of the loop, not of what followed it

    def line(self, now: float | None = None) -> str:
        elapsed = (time.monotonic() if now is None else now) - self._started
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)"
                 if self.total else f"{self.n}"]
        parts.append(f"{rate:.2f} it/s" if rate >= 1 or rate == 0 else f"{1 / rate:.2f} s/it")
        parts.append(f"elapsed {_duration(elapsed)}")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"eta {_duration((self.total - self.n) / rate)}")
        text = ", ".join(parts)
        if self.postfix:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        return f"{self.desc}: {text}" if self.desc else text

    def _print(self, now: float) -> None:
        self._printed_n = self.n
        print(self.line(now), file=self.stream or sys.stderr, flush=True)


class _Silent:
    """Progress that shows nothing (progress=False, or a rank other than 0)."""

    def __init__(self, iterable: Iterable | None = None) -> None:
        self.iterable = iterable

    def __iter__(self) -> Iterator:
        return iter(self.iterable if self.iterable is not None else ())

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress(iterable: Iterable | None = None, *, total: int | None = None, initial: int = 0,
             desc: str = "", disable: bool = False, leave: bool = True,
             every_s: float = DEFAULT_EVERY_S, terminal: bool | None = None):
    """A tqdm bar when stderr is a terminal (or `terminal=True`), else a LineProgress that
    prints every `every_s` seconds; nothing at all when `disable`."""
    if disable:
        return _Silent(iterable)
    if terminal if terminal is not None else is_terminal():
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc or None, leave=leave,
                    dynamic_ncols=True)
    return LineProgress(iterable, total=total, initial=initial, desc=desc, every_s=every_s)
