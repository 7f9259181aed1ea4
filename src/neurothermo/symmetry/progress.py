"""Progress lines for slow detections: nothing for the first second, then each stage.

``progress=None`` (default): lines go to stderr once the work has taken one second (a timer
prints the stage in progress at that moment); ``True``: every stage at once; ``False``: silent;
a callable ``f(line)`` receives the lines instead of stderr (the monitor uses this).
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

ProgressArg = bool | Callable[[str], None] | None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    def __init__(self, arg: ProgressArg, what: str, after: float = 1.0) -> None:
        if arg is not None and not isinstance(arg, bool) and not callable(arg):
            raise TypeError(f"progress must be None, a bool or a callable, got {type(arg).__name__}")
        self.emit: Callable[[str], None] | None = None if arg is False else (
            _stderr if arg is None or arg is True else arg)
        self.what, self.after = what, 0.0 if arg is True else after
        self.t0 = time.perf_counter()
        self.stage = ""
        self.shown = False
        self.last = 0.0
        self.lock = threading.Lock()
        self.timer: threading.Timer | None = None
        if self.emit is not None and self.after > 0:
            self.timer = threading.Timer(self.after, self._late)
            self.timer.daemon = True
            self.timer.start()

    def _line(self, msg: str) -> None:
        assert self.emit is not None
        self.emit(f"{self.what}: {msg} ({time.perf_counter() - self.t0:.1f} s)")
        self.shown = True
        self.last = time.perf_counter()

    def _late(self) -> None:
        with self.lock:
            if self.stage and not self.shown:
                self._line(self.stage + " …")

    def __call__(self, msg: str, *, minor: bool = False) -> None:
        """A new stage; ``minor`` lines (counters) are printed at most twice a second."""
        if self.emit is None:
            return
        with self.lock:
            self.stage = msg
            late = time.perf_counter() - self.t0 >= self.after
            if late and (not minor or time.perf_counter() - self.last >= 0.5):
                self._line(msg)

    def close(self, msg: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            if self.emit is not None and (self.shown or time.perf_counter() - self.t0 >= self.after):
                self._line(msg)
            self.stage = ""
