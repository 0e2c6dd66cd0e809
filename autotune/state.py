"""Resumable measurements, a time budget and atomic file writes for ``tkernels autotune``.

Every measurement is a job with a stable id; its result is saved to a state file beside the
output right after it is taken, so an interrupted run resumes where it stopped (a state file
written for other arguments or versions is ignored and replaced). Final outputs are written to
a temporary file and renamed into place: a config file is never seen half-written.

Time budget: ``TKERNELS_DEADLINE`` (Unix time; ``bench/device.sh`` sets it per stage) stops
measuring before the deadline instead of being cut by a signal: no new measurement starts
when the time left is less than the longest one so far took (:class:`OutOfTime`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEADLINE_ENV = "TKERNELS_DEADLINE"
MIN_RESERVE_S = 5.0  # no measurement is started with less than this left


def seconds_left() -> float:
    """Seconds until ``$TKERNELS_DEADLINE`` (Unix time); infinite when it is unset or empty."""
    deadline = os.environ.get(DEADLINE_ENV, "").strip()
    if not deadline:
        return float("inf")
    try:
        return float(deadline) - time.time()
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV}: must be a Unix time in seconds, got {deadline!r}") from None


class OutOfTime(Exception):
    """The time budget ends before the next measurement could finish."""


def write_atomic(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; configs are read by servers run as others
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class Measurements:
    """Job id -> result, persisted after every new result; prints progress with an ETA."""

    def __init__(self, path: Path, run_key: dict[str, Any], total_jobs: int, quiet: bool = False,
                 max_new: int | None = None):
        self.path, self.run_key, self.total, self.quiet = path, run_key, total_jobs, quiet
        self.max_new = max_new  # stop (OutOfTime) after this many new measurements
        self.results: dict[str, Any] = {}
        if path.is_file():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError:
                saved = {}
            if saved.get("run_key") == run_key:
                self.results = saved.get("results", {})
                self._say(f"resuming: {len(self.results)} of {total_jobs} measurements already taken ({path})\n")
        self.resumed = len(self.results)
        self.started = time.monotonic()
        self.longest = 0.0  # seconds of the longest measurement taken in this run

    def get(self, job: str, measure: Callable[[], Any]) -> Any:
        """The saved result of ``job``, else ``measure()`` saved; raises :class:`OutOfTime`
        instead of starting a measurement that the time budget would cut."""
        if job not in self.results:
            if self.max_new is not None and len(self.results) - self.resumed >= self.max_new:
                raise OutOfTime(f"took the {self.max_new} measurements this run may take")
            left = seconds_left()
            if left < max(self.longest, MIN_RESERVE_S):
                raise OutOfTime(f"{left:.0f}s left of the time budget, the longest measurement took {self.longest:.0f}s")
            self._progress(job)
            start = time.monotonic()
            self.results[job] = measure()
            self.longest = max(self.longest, time.monotonic() - start)
            write_atomic(self.path, json.dumps({"run_key": self.run_key, "results": self.results}))
        return self.results[job]

    @property
    def taken(self) -> int:
        return len(self.results)

    def done(self) -> None:
        self._say("\n")
        self.path.unlink(missing_ok=True)

    def _progress(self, job: str) -> None:
        taken = len(self.results) - self.resumed
        elapsed = time.monotonic() - self.started
        eta = elapsed / taken * (self.total - len(self.results)) if taken else float("nan")
        eta_text = "?" if eta != eta else f"{eta:4.0f}s"
        width = 30
        filled = width * len(self.results) // max(self.total, 1)
        self._say(f"\r[{'#' * filled}{'.' * (width - filled)}] {len(self.results)}/{self.total} "
                  f"eta {eta_text}  {job[:60]:<60}")

    def _say(self, text: str) -> None:
        if not self.quiet:
            sys.stderr.write(text)
            sys.stderr.flush()
