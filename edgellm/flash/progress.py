# SPDX-License-Identifier: MIT
"""Transfer progress for `edgellm flash`: bytes done, rate and time left, on stderr.

Every transfer (serial, SSH, SD card) reports through one callback type,
``ProgressFn = Callable[[int, int], None]`` called as ``progress(done_bytes, total_bytes)``
(monotonic ``done``; the last call has ``done == total``). ``Progress`` is that callback with
a tqdm bar behind it, and it remembers the figures for the summary line::

    with Progress("ssh d-1", total) as prog:
        send(..., progress=prog)          # prog(done, total) as bytes go out
    print(prog.summary())                 # "1.4 MB in 0.21 s, 6.5 MB/s"

Public API: ``ProgressFn``, ``Progress``, ``fmt_rate``.

.. versionadded:: 0.1
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import IO, Any, Callable

__all__ = ["Progress", "ProgressFn", "fmt_rate"]

ProgressFn = Callable[[int, int], None]


def fmt_rate(n_bytes: float, seconds: float) -> str:
    """Bytes and seconds as "1.4 MB in 0.21 s, 6.5 MB/s" (powers of 10, as tqdm shows)."""
    rate = n_bytes / seconds if seconds > 0 else 0.0
    return f"{n_bytes / 1e6:.1f} MB in {seconds:.2f} s, {rate / 1e6:.1f} MB/s"


class Progress:
    """A ``progress(done, total)`` callback drawing a bar (bytes, rate, ETA) on a stream.

    - ``Progress(desc, total, enabled=None)``: enabled None draws only when the stream is a
      terminal; disabled, it still counts bytes and time for ``summary()``;
    - call it with (done, total) from any transfer; ``close()`` (or the with block) ends it.
    """

    def __init__(self, desc: str, total: int, *, stream: IO[str] | None = None,
                 enabled: bool | None = None) -> None:
        self.desc, self.total, self.done = desc, int(total), 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self.t1: float | None = None
        self._bar: Any = None
        show = enabled if enabled is not None else bool(getattr(self.stream, "isatty",
                                                                lambda: False)())
        if show:
            from tqdm import tqdm  # type: ignore[import-untyped]

            self._bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1000, file=self.stream, dynamic_ncols=True,
                             mininterval=0.2)

    def __call__(self, done: int, total: int) -> None:
        if total != self.total:
            self.total = int(total)
            if self._bar is not None:
                self._bar.total = self.total
        step = int(done) - self.done
        self.done = int(done)
        if self._bar is not None and step:
            self._bar.update(step)

    @property
    def seconds(self) -> float:
        return (self.t1 if self.t1 is not None else time.perf_counter()) - self.t0

    @property
    def rate(self) -> float:
        """Bytes per second so far."""
        s = self.seconds
        return self.done / s if s > 0 else 0.0

    def eta(self) -> float | None:
        """Seconds left at the rate so far (None before the first byte)."""
        r = self.rate
        return (self.total - self.done) / r if r > 0 else None

    def summary(self) -> str:
        return fmt_rate(self.done, self.seconds)

    def close(self) -> None:
        if self.t1 is None:
            self.t1 = time.perf_counter()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
