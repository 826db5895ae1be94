"""Which export stage runs, for which component, and the memory and time each one takes.

Export names its stages (trace, fuse, fp16 measure, fp16 convert, write, verify) through a
`StageWatch`; the progress bar shows the current one with the process's RSS, and the memory
benchmark reads the records. Peaks come from /proc (VmHWM where a stage set a new high for the
process, else the largest RSS a background sampler saw), so nothing resets the kernel's
high-water mark that `/usr/bin/time -v` reports.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

GIB = 2**30
STATUS = Path("/proc/self/status")

# a stage name -> a context manager that runs while that stage does; export takes one of these
StageFn = Callable[[str], AbstractContextManager[object]]


def no_stages(name: str) -> AbstractContextManager[object]:
    """The `StageFn` for callers that do not watch the stages."""
    return nullcontext()


def _status_kib(field: str) -> int | None:
    try:
        text = STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def rss_bytes() -> int:
    """Resident set size now; the peak so far where /proc is missing (macOS)."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak_bytes()


def peak_bytes() -> int:
    """The process's high-water RSS (VmHWM; ru_maxrss, KiB on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class StageRecord:
    component: str
    stage: str
    peak_bytes: int
    seconds: float
    exact: bool  # True: the process's high-water mark; False: the largest sampled RSS


class StageWatch:
    """Samples RSS every `interval` seconds on a daemon thread while a stage runs and keeps one
    `StageRecord` per stage; `on_change(component, stage, rss)` is called at each stage start
    and on every sample (the progress bar's postfix); `on_record` gets each record as its stage
    ends (so a run killed for memory still shows where it got to)."""

    def __init__(
        self,
        on_change: Callable[[str, str, int], None] | None = None,
        interval: float = 0.02,
        on_record: Callable[[StageRecord], None] | None = None,
    ) -> None:
        self.records: list[StageRecord] = []
        self.on_change = on_change
        self.on_record = on_record
        self.interval = interval
        self.component = ""

    def for_component(self, component: str) -> StageFn:
        """The `StageFn` that files its stages under `component`."""

        def stage(name: str) -> AbstractContextManager[object]:
            return self.stage(component, name)

        return stage

    @contextmanager
    def stage(self, component: str, name: str) -> Iterator[None]:
        self.component = component
        hwm_before = peak_bytes()
        sampled = [rss_bytes()]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(self.interval):
                now = rss_bytes()
                sampled[0] = max(sampled[0], now)
                if self.on_change:
                    self.on_change(component, name, now)

        if self.on_change:
            self.on_change(component, name, sampled[0])
        sampler = threading.Thread(target=sample, name=f"rss-{name}", daemon=True)
        started = time.perf_counter()
        sampler.start()
        try:
            yield
        finally:
            stop.set()
            sampler.join()
            seconds = time.perf_counter() - started
            hwm_after = peak_bytes()
            exact = hwm_after > hwm_before  # this stage set the process's new high
            peak = hwm_after if exact else max(sampled[0], rss_bytes())
            record = StageRecord(component, name, peak, seconds, exact)
            self.records.append(record)
            if self.on_record:
                self.on_record(record)

    def component_peaks(self) -> dict[str, int]:
        """Largest stage peak per component, in export order."""
        peaks: dict[str, int] = {}
        for r in self.records:
            peaks[r.component] = max(peaks.get(r.component, 0), r.peak_bytes)
        return peaks
