"""The live sessions: a bounded in-memory store holding the newest frame of each.

A session is named by its client (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``) and holds one frame: each new
frame replaces the last, and a frame replaced before any prompt used it counts as dropped. A frame
older than the one held (by frame id) is dropped on arrival, so the newest always wins even when
frames decode out of order. One client at a time may attach to a session (its websocket); frames of
the session's outputs go to that client only, and the session ends when that connection closes. At
most ``Limits.max_sessions`` exist; one fed over HTTP, with no attached client, ends after
``Limits.idle_seconds`` without a frame or a prompt. A refused frame opens no session.

Thread-safe: frames arrive on the server's event loop (decoded in its executor) and are read by the
prompt worker thread.
"""
from __future__ import annotations

import itertools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .frames import FrameError, Limits

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEPT_PROMPTS = 8          # history entries a session keeps of its prompts (the rest are deleted)
DECODE_WAIT = 1.0         # seconds a prompt waits for a frame of its session that is still decoding
_runs = itertools.count(1)  # numbers each run of a session: frame ids restart at 1 with every run
_decode_tickets = itertools.count(1)  # numbers each frame that starts decoding, in arrival order


class SessionError(FrameError):
    """A session that cannot be used as asked (bad name, unknown, busy, too many)."""


def check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.fullmatch(session_id):
        raise SessionError(f"session id {str(session_id)[:80]!r} is not valid: use 1-64 letters, digits, '_', '-' or "
                           "'.', starting with a letter or digit (e.g. 'live').")
    return session_id


@dataclass
class Frame:
    id: int
    pixels: np.ndarray             # [H, W, 3] uint8 RGB
    received_at: float             # time.perf_counter() when its last byte arrived
    decode_ms: float
    source: str                    # jpeg / png / webp / rgba

    @property
    def width(self) -> int:
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        return self.pixels.shape[0]


@dataclass
class FrameUse:
    """The frame a prompt took, with when, for the output's metadata."""
    frame_id: int
    received_at: float
    decode_ms: float
    taken_at: float
    ready_at: float
    prompt_id: str | None


class PromptLog:
    """The prompt ids of a session's last prompts (whose history entries stay) and when each started."""

    def __init__(self):
        self.ids: deque = deque()
        self.started: dict[str, float] = {}

    def note(self, prompt_id: str) -> list[str]:
        """Record a prompt (once); returns the ids that fell out of the last ``KEPT_PROMPTS``."""
        if prompt_id in self.started:
            return []
        self.ids.append(prompt_id)
        self.started[prompt_id] = time.perf_counter()
        expired = []
        while len(self.ids) > KEPT_PROMPTS:
            expired.append(self.ids.popleft())
            del self.started[expired[-1]]
        return expired


@dataclass
class Session:
    id: str
    run: int = field(default_factory=lambda: next(_runs))
    client_id: str | None = None          # ComfyUI client id that gets this session's output frames
    attached: object | None = None        # token of the attached websocket, if any
    frame: Frame | None = None
    frame_used: bool = False
    last_frame_id: int = 0
    received: int = 0
    used: int = 0
    dropped: int = 0
    sent: int = 0
    last_use: FrameUse | None = None
    prompts: PromptLog = field(default_factory=PromptLog)
    last_seen: float = field(default_factory=time.monotonic)

    def counters(self) -> dict:
        return {"received": self.received, "used": self.used, "dropped": self.dropped, "sent": self.sent}

    def status(self) -> dict:
        frame = self.frame
        return {"session": self.id, "attached": self.attached is not None, "client_id": self.client_id,
                "frame": None if frame is None else {"frame_id": frame.id, "width": frame.width,
                                                     "height": frame.height, "format": frame.source},
                "frames": self.counters()}


class SessionStore:
    def __init__(self, limits: Limits | None = None, clock=time.monotonic):
        self.limits = limits or Limits()
        self._clock = clock
        self._lock = threading.RLock()
        self._decoded = threading.Condition(self._lock)
        # session id -> {ticket: frame id reserved on arrival, or 0} of the frames that arrived, not decoded yet
        self._decoding: dict[str, dict[int, int]] = {}
        self._sessions: dict[str, Session] = {}
        self._other_prompts = PromptLog()      # live prompts of sessions that are not open

    # -- lookup and lifetime -----------------------------------------------------------------
    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items()
                    if s.attached is None and now - s.last_seen > self.limits.idle_seconds]:
            del self._sessions[sid]

    def _open(self, session_id: str) -> Session:
        check_session_id(session_id)
        self._expire()
        session = self._sessions.get(session_id)
        if session is None:
            if len(self._sessions) >= self.limits.max_sessions:
                raise SessionError(
                    f"there are already {len(self._sessions)} live sessions, the limit "
                    f"(COMFY_TURBO_LIVE_MAX_SESSIONS={self.limits.max_sessions}). Stop one, or wait "
                    f"{self.limits.idle_seconds:.0f} s for an idle one to expire.", status=503)
            session = self._sessions[session_id] = Session(session_id)
        session.last_seen = self._clock()
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            self._expire()
            return self._sessions.get(session_id)

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def close(self, session_id: str) -> bool:
        with self._lock:
            self._forget_reserved_ids(session_id)
            return self._sessions.pop(session_id, None) is not None

    # -- clients -----------------------------------------------------------------------------
    def attach(self, session_id: str, client_id: str, token: object) -> Session:
        """Bind the session to one client's connection; a second live connection is refused."""
        with self._lock:
            session = self._open(session_id)
            if session.attached is not None and session.attached is not token:
                raise SessionError(
                    f"session '{session_id}' is already live in another tab or client. Stop Live there, or give "
                    "this graph's Turbo Live nodes another session name.", status=409)
            if session.attached is not token:     # a new run numbers its frames from 1
                session.frame, session.frame_used, session.last_frame_id = None, False, 0
                session.last_use, session.run = None, next(_runs)
                self._forget_reserved_ids(session_id)
            session.attached, session.client_id = token, client_id
            return session

    def detach(self, session_id: str, token: object) -> bool:
        """The attached connection closed: the session ends (its frame is freed). True if it was the owner."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.attached is not token:
                return False
            del self._sessions[session_id]
            self._forget_reserved_ids(session_id)
            return True

    def check_client(self, session_id: str, client_id: str | None) -> None:
        """Refuse a frame pushed over HTTP by another client than the one attached to the session."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.attached is not None and client_id != session.client_id:
                raise SessionError(
                    f"session '{session_id}' is live in another client's connection; push frames there, pass "
                    "that client's client_id, or use another session name.", status=409)

    # -- frames ------------------------------------------------------------------------------
    def reserve_frame_id(self, session_id: str, ticket: int | None = None) -> int:
        """The id of a frame that just arrived without one, handed out on arrival: one more than any frame
        held or reserved by a frame still decoding. The id stays reserved with the frame's decode ``ticket``
        until ``end_decode``, so of two frames decoding at once (two HTTP pushes) the later one is the
        newer, whichever finishes decoding first; a refused frame leaves nothing behind."""
        with self._lock:
            session = self._sessions.get(session_id)
            decoding = self._decoding.get(session_id, {})
            frame_id = max(max(decoding.values(), default=0), session.last_frame_id if session else 0) + 1
            if ticket in decoding:
                decoding[ticket] = frame_id
            return frame_id

    def _forget_reserved_ids(self, session_id: str) -> None:
        """A session ended or began a new run: the ids its decoding frames reserved no longer count."""
        for ticket in self._decoding.get(session_id, {}):
            self._decoding[session_id][ticket] = 0

    def put(self, session_id: str, frame: Frame, client_id: str | None = None) -> tuple[bool, Session]:
        """Keep ``frame`` as the session's newest, unless a newer one is held. Returns (accepted, session).

        ``client_id`` (frames pushed over HTTP) becomes the session's client, unless another one is attached.
        """
        with self._lock:
            self.check_client(session_id, client_id)
            session = self._open(session_id)
            if client_id:
                session.client_id = client_id
            session.received += 1
            if frame.id <= session.last_frame_id and session.frame is not None:
                session.dropped += 1            # overtaken by a newer frame
                return False, session
            if session.frame is not None and not session.frame_used:
                session.dropped += 1
            session.frame, session.frame_used, session.last_frame_id = frame, False, frame.id
            return True, session

    def put_dropped(self, session_id: str) -> None:
        """Count a frame that a newer one overtook before it could be kept."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.received += 1
                session.dropped += 1

    # A client may queue its prompt right after sending a frame, so that decoding overlaps ComfyUI's
    # handling of the prompt; the prompt then waits here for that frame instead of missing it. It waits
    # only for frames that arrived before it asked, never for the ones that keep arriving after.
    def begin_decode(self, session_id: str) -> int:
        """Note a frame that arrived and is decoding; returns its ticket, for ``end_decode``."""
        with self._lock:
            ticket = next(_decode_tickets)
            self._decoding.setdefault(session_id, {})[ticket] = 0
            return ticket

    def end_decode(self, session_id: str, ticket: int) -> None:
        with self._lock:
            tickets = self._decoding.get(session_id, {})
            tickets.pop(ticket, None)
            if not tickets:
                self._decoding.pop(session_id, None)
            self._decoded.notify_all()

    def _wait_for_decodes(self, session_id: str, timeout: float) -> None:
        """Wait (at most ``timeout``) for the frames of the session that were decoding when this was called."""
        deadline = time.monotonic() + timeout
        before = max(self._decoding.get(session_id, ()), default=0)
        while any(t <= before for t in self._decoding.get(session_id, ())) and \
                (left := deadline - time.monotonic()) > 0:
            self._decoded.wait(left)

    def newest_frame_key(self, session_id: str, wait: float = DECODE_WAIT) -> tuple[int, int] | None:
        """(run, frame id) of the session's newest frame, unique across runs of a session; or None."""
        with self._lock:
            self._wait_for_decodes(session_id, wait)
            session = self._sessions.get(session_id)
            return None if session is None or session.frame is None else (session.run, session.frame.id)

    def take(self, session_id: str, prompt_id: str | None = None, wait: float = DECODE_WAIT) -> tuple[Frame, Session]:
        """The session's newest frame, for a prompt; an error names the session when there is none."""
        with self._lock:
            check_session_id(session_id)
            self._wait_for_decodes(session_id, wait)
            session = self._sessions.get(session_id)
            if session is None or session.frame is None:
                known = "no frame has arrived yet" if session else "it is not open (no frame has arrived)"
                raise SessionError(
                    f"live session '{session_id}' has no frame: {known}. Press Live in the Turbo Live panel, or "
                    f"push a frame to /comfy-turbo/live/{session_id}/frame, before queueing this graph.", status=404)
            frame = session.frame
            if not session.frame_used:
                session.used += 1
            session.frame_used = True
            session.last_seen = self._clock()
            now = time.perf_counter()
            session.last_use = FrameUse(frame.id, frame.received_at, frame.decode_ms, now, now, prompt_id)
            return frame, session

    # -- prompts -----------------------------------------------------------------------------
    def note_prompt(self, session_id: str, prompt_id: str | None) -> list[str]:
        """Record that ``prompt_id`` is one of the session's; returns its prompt ids whose history can go."""
        with self._lock:
            if not prompt_id:
                return []
            session = self._sessions.get(session_id)
            return (session.prompts if session else self._other_prompts).note(prompt_id)

    def prompt_started(self, session_id: str, prompt_id: str | None) -> float | None:
        with self._lock:
            session = self._sessions.get(session_id)
            return (session.prompts if session else self._other_prompts).started.get(prompt_id)
