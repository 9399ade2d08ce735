"""Output frames, encoded and sent off ComfyUI's prompt worker thread.

Turbo Live Output hands each picture here and returns at once, so the session's next run starts while
this one's picture is encoded (JPEG or WebP) and sent. One thread does it, one picture after another,
waiting for each send to reach the socket, so a client gets its pictures in order. At most
``MAX_WAITING`` pictures of a session wait: a newer one replaces the oldest waiting (the newest wins),
counted as ``outputs_dropped``.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

MAX_WAITING = 2          # pictures of one session waiting to be sent
SEND_TIMEOUT = 10.0      # seconds one send may take before the picture is given up


@dataclass
class Output:
    session: str
    send: Callable[[], None]          # encodes and sends; blocks until the bytes are on the socket
    dropped: Callable[[], None]       # called instead of send when a newer picture replaced it


class OutputSender:
    def __init__(self, max_waiting: int = MAX_WAITING):
        self.max_waiting = max_waiting
        self._waiting: deque[Output] = deque()
        self._ready = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, output: Output) -> None:
        with self._ready:
            same = [o for o in self._waiting if o.session == output.session]
            if len(same) >= self.max_waiting:
                self._waiting.remove(same[0])
                same[0].dropped()
            self._waiting.append(output)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="comfy-turbo-live-sender", daemon=True)
                self._thread.start()
            self._ready.notify()

    def waiting(self, session: str | None = None) -> int:
        with self._ready:
            return sum(1 for o in self._waiting if session is None or o.session == session)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting:
                    self._ready.wait()
                output = self._waiting.popleft()
            try:
                output.send()
            except Exception:           # one picture's failure never stops the others
                logging.exception("comfy-turbo live: sending a picture of session %s failed", output.session)


SENDER = OutputSender()
