"""A one-line progress bar on stderr, for the commands of :mod:`refnorm.cli` and
:mod:`refnorm.oracle.cli`.

It sits below both (it imports nothing of refnorm), so the library never imports the command
that sits on top of it.
"""
from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """A one-line progress bar on stderr, shown only when stderr is a terminal (or forced)."""

    def __init__(self, total, label, *, enabled=None, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.label, self.done, self.start = total, label, 0, time.monotonic()
        self.enabled = self.stream.isatty() if enabled is None else enabled

    def step(self, what=""):
        self.done += 1
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        elapsed = time.monotonic() - self.start
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                          f"{self.done}/{self.total} {elapsed:5.1f}s {what[:30]:<30}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
