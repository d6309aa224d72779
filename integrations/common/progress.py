"""Progress of long work: a bar on a terminal, a line at a fixed interval in a log file.

A job whose stderr is a file (``nohup``, a cluster scheduler, ``2> log``) is never silent: every
``SETPERM_PROGRESS_SECONDS`` (default 60) it writes ``desc: step 120/512 (23%), loss=0.014, 3.1 s/it,
ETA 20m15s``. ``SETPERM_PROGRESS=1`` forces the bar, ``=0`` turns both off.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class LineProgress:
    """The tqdm subset the trainers use (iterate, ``update``, ``set_postfix``, ``close``), printing a
    line every ``interval`` seconds and a last line on ``close``."""

    def __init__(self, iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 initial: int = 0, interval: float = 60.0, stream=None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.n, self.initial = desc, initial, initial
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self):
        return self.total or 0

    def set_postfix(self, **kw) -> None:
        self.postfix = kw

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._write(now)

    def _write(self, now: float) -> None:
        done = self.n - self.initial
        rate = (now - self.start) / done if done else None
        parts = [f"{self.desc}: step {self.n}" + (f"/{self.total}" if self.total else "")]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        if rate is not None:
            parts.append(f"{rate:.3g} s/it")
            if self.total:
                parts.append(f"ETA {_fmt_seconds(rate * (self.total - self.n))}")
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n > self.initial:
                self._write(time.monotonic())


class _Silent(LineProgress):
    def _write(self, now: float) -> None:
        pass


def progress(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
             disable: Optional[bool] = None, initial: int = 0, **kw):
    """A tqdm bar when stderr is a terminal, else a :class:`LineProgress`; ``disable=True`` (e.g. on
    non-zero DDP ranks) or ``SETPERM_PROGRESS=0`` silences both."""
    env = os.environ.get("SETPERM_PROGRESS")
    if disable or env == "0":
        return _Silent(iterable, total=total, desc=desc, initial=initial)
    if env == "1" or sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, dynamic_ncols=True, **kw)
    interval = float(os.environ.get("SETPERM_PROGRESS_SECONDS", "60"))
    return LineProgress(iterable, total=total, desc=desc, initial=initial, interval=interval)
