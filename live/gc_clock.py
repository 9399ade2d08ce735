"""Time spent in Python's garbage collector, process-wide, so a live frame can say how much of its time
outside the model was a collection (ComfyUI's prompt worker runs ``gc.collect()`` between prompts, at
most every 10 s, and that holds everything up: the tail of the loop's per-frame overhead)."""
from __future__ import annotations

import gc
import threading
import time


class GcClock:
    def __init__(self):
        self.total_ms = 0.0
        self._started: dict[int, float] = {}
        self._lock = threading.Lock()

    def __call__(self, phase: str, info: dict) -> None:
        thread = threading.get_ident()
        if phase == "start":
            self._started[thread] = time.perf_counter()
        elif (began := self._started.pop(thread, None)) is not None:
            with self._lock:
                self.total_ms += (time.perf_counter() - began) * 1000.0

    def install(self) -> "GcClock":
        if self not in gc.callbacks:
            gc.callbacks.append(self)
        return self


GC_CLOCK = GcClock()
