"""Keeps ComfyUI's garbage collections short while live sessions are open.

ComfyUI's prompt worker runs a full ``gc.collect()`` between prompts (at most every 10 s). With torch and
ComfyUI imported that walks some 400 000 objects, about 0.4 s on a 2-core CPU: in a live loop, one frame in
every few dozen waits that long (the p95 of the loop's overhead). Nearly all of those objects are modules,
functions and loaded models that live as long as the server.

While at least one live session is open, ``FrozenHeap`` moves the objects that exist into the collector's
permanent generation (``gc.freeze()``, a constant-time list splice), once when the first session opens and
once more after a session's first picture (its models are loaded by then). Collections then walk only what
was made since: a few milliseconds. When the last session ends, ``gc.unfreeze()`` hands everything back.

What freezing costs: reference cycles among frozen objects are not collected until the last session ends
(objects without cycles are freed by reference counting as always). The one cycle that matters, a model
ComfyUI dropped that a cycle keeps alive (ComfyUI's ``cleanup_models_gc`` frees those with a
``gc.collect()``, which a frozen heap defeats), is collected by the next live run: Turbo Live Input checks
for one and runs ``collect`` (a full collection, once). If something else froze the heap first, the store
leaves freezing to it. ``COMFY_TURBO_LIVE_FREEZE_GC=0`` turns it off.
"""
from __future__ import annotations

import gc
import threading


class FrozenHeap:
    def __init__(self):
        self._holders: set[str] = set()
        self._frozen_by_us = False
        self._lock = threading.Lock()

    @property
    def frozen(self) -> bool:
        return self._frozen_by_us

    def hold(self, holder: str) -> None:
        """``holder`` (a session) opens: freeze the heap if it is the first and nobody else froze it."""
        with self._lock:
            if not self._holders and not self._frozen_by_us and gc.get_freeze_count() == 0:
                gc.freeze()
                self._frozen_by_us = True
            self._holders.add(holder)

    def refreeze(self) -> None:
        """Freeze what was made since (a session's models, loaded by its first run)."""
        with self._lock:
            if self._frozen_by_us:
                gc.freeze()

    def collect(self) -> None:
        """Collect the frozen objects too, then freeze again: what ComfyUI's own ``gc.collect()`` cannot reach
        while frozen (a model that died in a reference cycle; ``nodes.live.free_dead_models``)."""
        with self._lock:
            if self._frozen_by_us:
                gc.unfreeze()
                gc.collect()
                gc.freeze()

    def release(self, holder: str) -> None:
        """``holder`` ended: unfreeze when it was the last."""
        with self._lock:
            self._holders.discard(holder)
            if not self._holders and self._frozen_by_us:
                gc.unfreeze()
                self._frozen_by_us = False
