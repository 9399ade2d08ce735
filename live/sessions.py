"""The live sessions: a bounded in-memory store holding the newest frame of each, its graph and its runs.

A session is named by its client (``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``) and holds one frame: each new
frame replaces the last, and a frame replaced before any run used it counts as dropped. A frame
older than the one held (by frame id) is dropped on arrival, so the newest always wins even when
frames decode out of order. One client at a time may attach to a session (its websocket); the session
ends when that connection closes. At most ``Limits.max_sessions`` exist; one fed over HTTP, with no
attached client, ends after ``Limits.idle_seconds`` without a frame or a run. A refused frame opens no
session.

Sessions are private. Each has a secret ``token``, handed to whoever opened it (the attached connection,
or the first HTTP push); pushing frames, changing the graph and queueing a run by hand all need it. Only
the session's *runs* may read its frames: the prompts its loop queued (``live.runs``) and the ones queued
by hand with its token (``authorize_run``). When a session ends, its runs are remembered as ended, so a
run that is still being picked up stops as interrupted instead of failing for want of a frame.

Thread-safe: frames arrive on the server's event loop (decoded in its executor) and are read by the
prompt worker thread.
"""
from __future__ import annotations

import itertools
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from .frames import FrameError, Limits
from .heap import FrozenHeap

SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
KEPT_PROMPTS = 8          # history entries a session keeps of its prompts (the rest are deleted)
KEPT_RUN_IDS = 64         # run ids a session (and the store, of ended sessions) remembers
DECODE_WAIT = 1.0         # seconds a prompt waits for a frame of its session that is still decoding
_runs = itertools.count(1)  # numbers each run of a session: frame ids restart at 1 with every run
_decode_tickets = itertools.count(1)  # numbers each frame that starts decoding, in arrival order


class SessionError(FrameError):
    """A session that cannot be used as asked (bad name, unknown, busy, too many, wrong token)."""


class RunEnded(Exception):
    """The prompt is a run of a session that has ended: it stops as interrupted (never "no frame")."""


def _bounded_add(ids: OrderedDict, key, value=True, limit: int = KEPT_RUN_IDS) -> None:
    ids[key] = value
    ids.move_to_end(key)
    while len(ids) > limit:
        ids.popitem(last=False)


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
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    client_id: str | None = None          # ComfyUI client id that gets this session's output frames
    attached: object | None = None        # the attached websocket's connection object, if any
    notify: object | None = None          # callable(dict): a message to the attached connection (any thread)
    graph: object | None = None           # the loop's graph (live.runs.LiveGraph), once handed over
    graph_version: int = 0                # counts changes of the graph or its values
    served_version: int = 0               # the newest graph version a started run holds
    last_run: str | None = None           # the newest run the loop queued
    runs: OrderedDict = field(default_factory=OrderedDict)      # run prompt id -> graph version (bounded)
    started: OrderedDict = field(default_factory=OrderedDict)   # run prompt ids that began (read their frame key)
    pinned: OrderedDict = field(default_factory=OrderedDict)    # run prompt id -> the frame its fingerprint named
    outputs_dropped: int = 0              # output frames a newer one replaced before they were sent
    last_output_at: float | None = None   # perf_counter() when the last run's output node ran
    gc_ms_at_output: float = 0.0          # GC_CLOCK.total_ms then
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
        return {"received": self.received, "used": self.used, "dropped": self.dropped, "sent": self.sent,
                "outputs_dropped": self.outputs_dropped}

    def status(self) -> dict:
        """What anyone may read: no client id, no token, no pixels."""
        frame = self.frame
        return {"session": self.id, "attached": self.attached is not None,
                "frame": None if frame is None else {"frame_id": frame.id, "width": frame.width,
                                                     "height": frame.height, "format": frame.source},
                "frames": self.counters(),
                "loop": {"graph": self.graph is not None, "runs": len(self.runs)}}

    @property
    def unserved(self) -> bool:
        """An input no run has taken yet: a frame the graph reads, or a change of the graph's values."""
        needs_frames = self.graph is not None and self.graph.needs_frames
        return self.graph is not None and (self.graph_version > self.served_version or
                                           (needs_frames and self.frame is not None and not self.frame_used))

    def tell(self, message: dict) -> None:
        if self.notify is not None:
            self.notify(message)


class SessionStore:
    def __init__(self, limits: Limits | None = None, clock=time.monotonic, heap: FrozenHeap | None = None):
        self.limits = limits or Limits()
        self._clock = clock
        self._lock = threading.RLock()
        self._decoded = threading.Condition(self._lock)
        # session id -> {ticket: frame id reserved on arrival, or 0} of the frames that arrived, not decoded yet
        self._decoding: dict[str, dict[int, int]] = {}
        self._sessions: dict[str, Session] = {}
        self._other_prompts = PromptLog()      # live prompts of sessions that are not open
        self._ended_runs: OrderedDict = OrderedDict()   # run prompt ids of sessions that ended
        self.heap = heap                        # frozen out of the collector while a session is open (live.heap)

    @property
    def lock(self) -> threading.RLock:
        """Held while the loop decides whether to queue a run (live.runs), so inputs and runs agree."""
        return self._lock

    # -- lookup and lifetime -----------------------------------------------------------------
    def _expire(self) -> None:
        now = self._clock()
        for sid in [sid for sid, s in self._sessions.items()
                    if s.attached is None and now - s.last_seen > self.limits.idle_seconds]:
            self._end(sid)

    def _end(self, session_id: str) -> Session | None:
        session = self._sessions.pop(session_id, None)
        if session is not None:
            for run in session.runs:
                _bounded_add(self._ended_runs, run, limit=4 * KEPT_RUN_IDS)
            if self.heap is not None:
                self.heap.release(session_id)
        self._forget_reserved_ids(session_id)
        return session

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
            if self.heap is not None:
                self.heap.hold(session_id)
        session.last_seen = self._clock()
        return session

    def get(self, session_id: str) -> Session | None:
        with self._lock:
            self._expire()
            return self._sessions.get(session_id)

    def sessions(self) -> list[Session]:
        with self._lock:
            self._expire()
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)

    def close(self, session_id: str, token: str | None = None) -> bool:
        """End a session fed over HTTP (its token needed)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return False
            self._check_token(session, token)
            if session.attached is not None:
                raise SessionError(f"session '{session_id}' has a client attached; it ends when that client stops "
                                   "Live (closes its websocket).", status=409)
            return self._end(session_id) is not None

    # -- clients and tokens ------------------------------------------------------------------
    def attach(self, session_id: str, client_id: str, connection: object, notify=None,
               token: str | None = None) -> Session:
        """Bind the session to one client's connection (a second live connection is refused); the session gets
        a new token, which the connection hands to its client. A session fed over HTTP is taken over only with
        its token."""
        with self._lock:
            check_session_id(session_id)
            existing = self.get(session_id)
            if existing is not None and existing.attached is not None and existing.attached is not connection:
                raise SessionError(
                    f"session '{session_id}' is already live in another tab or client. Stop Live there, or give "
                    "this graph's Turbo Live nodes another session name.", status=409)
            if existing is not None and existing.attached is None:
                self._check_token(existing, token)
            session = self._open(session_id)
            if session.attached is not connection:     # a new owner: frames numbered from 1, a new secret
                for run in session.runs:
                    _bounded_add(self._ended_runs, run, limit=4 * KEPT_RUN_IDS)
                session.frame, session.frame_used, session.last_frame_id = None, False, 0
                session.last_use, session.run, session.token = None, next(_runs), secrets.token_urlsafe(24)
                session.graph, session.last_run, session.runs = None, None, OrderedDict()
                self._forget_reserved_ids(session_id)
            session.attached, session.client_id, session.notify = connection, client_id, notify
            return session

    def detach(self, session_id: str, connection: object) -> bool:
        """The attached connection closed: the session ends (its frame is freed). True if it was the owner."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.attached is not connection:
                return False
            self._end(session_id)
            return True

    @staticmethod
    def _check_token(session: Session, token: str | None) -> None:
        if not isinstance(token, str) or not secrets.compare_digest(token.encode(), session.token.encode()):
            raise SessionError(
                f"live session '{session.id}' belongs to another client: {'this token is wrong' if token else 'no token was given'}. "
                "Send the token its owner got when it opened the session (the websocket's 'attached' message, or "
                "the first frame's answer) as the X-Turbo-Live-Token header, or use another session name.",
                status=403)

    def check_token(self, session_id: str, token: str | None) -> Session:
        """The session, if ``token`` is its secret; else a 403 (404 when there is no such session)."""
        with self._lock:
            session = self.get(session_id)
            if session is None:
                raise SessionError(f"there is no live session '{session_id}' (it never started, or expired after "
                                   "being idle).", status=404)
            self._check_token(session, token)
            return session

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

    def check_push(self, session_id: str, token: str | None) -> None:
        """Refuse a frame for an open session without its token (a new session needs none: it gets one)."""
        with self._lock:
            check_session_id(session_id)
            session = self.get(session_id)
            if session is not None:
                self._check_token(session, token)

    def put(self, session_id: str, frame: Frame, token: str | None = None,
            client_id: str | None = None) -> tuple[bool, Session]:
        """Keep ``frame`` as the session's newest, unless a newer one is held. Returns (accepted, session).

        An open session needs its ``token``; a frame for a session that is not open opens it (its answer
        carries the new token). ``client_id`` (frames pushed over HTTP) becomes the session's client,
        unless one is attached.
        """
        with self._lock:
            self.check_push(session_id, token)
            session = self._open(session_id)
            if client_id and session.attached is None:
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

    # -- runs --------------------------------------------------------------------------------
    def authorize_run(self, session_id: str, prompt_id: str, graph_version: int | None = None) -> list[str]:
        """Make ``prompt_id`` one of the session's runs (it may read the session's frames); returns the runs
        whose history entries can go (all but the last ``KEPT_PROMPTS``)."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return []
            _bounded_add(session.runs, prompt_id, session.graph_version if graph_version is None else graph_version)
            session.last_seen = self._clock()
            return session.prompts.note(prompt_id)

    def _run_of(self, session_id: str, prompt_id: str | None) -> Session:
        """The session whose run ``prompt_id`` is; RunEnded if that session ended; a SessionError otherwise."""
        if prompt_id is not None and prompt_id in self._ended_runs:
            raise RunEnded(prompt_id)
        check_session_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionError(
                f"live session '{session_id}' has no frame: it is not open (no frame has arrived). Press Live in the "
                f"Turbo Live panel, or push a frame to /comfy-turbo/live/{session_id}/frame, before queueing this "
                "graph.", status=404)
        if prompt_id not in session.runs:
            raise SessionError(
                f"this prompt is not a run of live session '{session_id}', so it may not read that session's frames. "
                "Hand the graph to the session (Turbo Live panel, or the session's websocket: docs/live.md), or queue "
                "it with the session's token as extra_data.turbo_live_token.", status=403)
        return session

    def run_started(self, session_id: str, prompt_id: str | None) -> tuple[int, int] | None:
        """A run of the session begins (ComfyUI asks its Turbo Live nodes for their fingerprint): note it, and
        return the (session run, frame id) of the newest frame, unique across runs of a session; None when
        there is no frame or the prompt is not one of the session's runs."""
        with self._lock:
            try:
                session = self._run_of(session_id, prompt_id)
            except (SessionError, RunEnded):
                return None
            # A frame still decoding counts as waiting for this run (so it queues no other), then the run begins.
            self._wait_for_decodes(session_id, DECODE_WAIT)
            self._mark_started(session, prompt_id)
            frame = session.pinned.get(prompt_id) or session.frame
            if frame is None:
                return None
            # The run reads the frame its fingerprint names, even if a newer one arrives before it executes
            # (that one queues the next run): the cache key and the pixels always agree.
            _bounded_add(session.pinned, prompt_id, frame, limit=8)
            if frame is session.frame and not session.frame_used:
                session.used += 1
                session.frame_used = True
            return session.run, frame.id

    @staticmethod
    def _mark_started(session: Session, prompt_id: str) -> None:
        if prompt_id not in session.started:
            _bounded_add(session.started, prompt_id, time.perf_counter())
            session.served_version = max(session.served_version, session.runs[prompt_id])

    def knows_run(self, prompt_id) -> bool:
        """Whether ``prompt_id`` is (or was) a run of any session: a new prompt may not reuse it."""
        if not isinstance(prompt_id, str):
            return False
        with self._lock:
            return prompt_id in self._ended_runs or any(prompt_id in s.runs for s in self._sessions.values())

    def run_started_at(self, session: Session, prompt_id: str | None) -> float | None:
        with self._lock:
            return session.started.get(prompt_id)

    def take(self, session_id: str, prompt_id: str | None = None, wait: float = DECODE_WAIT) -> tuple[Frame, Session]:
        """The session's newest frame, for one of its runs. RunEnded when its session ended; an error that names
        the session when there is no frame, or when the prompt is not one of the session's runs."""
        with self._lock:
            session = self._run_of(session_id, prompt_id)
            self._mark_started(session, prompt_id)        # (without ComfyUI's cache no fingerprint is asked)
            frame = session.pinned.pop(prompt_id, None)
            if frame is None:
                self._wait_for_decodes(session_id, wait)
                frame = session.frame
            if frame is None:
                raise SessionError(
                    f"live session '{session_id}' has no frame: no frame has arrived yet. Press Live in the Turbo "
                    f"Live panel, or push a frame to /comfy-turbo/live/{session_id}/frame, before queueing this "
                    "graph.", status=404)
            if frame is session.frame and not session.frame_used:
                session.used += 1
                session.frame_used = True
            session.last_seen = self._clock()
            now = time.perf_counter()
            session.last_use = FrameUse(frame.id, frame.received_at, frame.decode_ms, now, now, prompt_id)
            return frame, session

    def output_session(self, session_id: str, prompt_id: str | None) -> Session | None:
        """The session a Turbo Live Output sends to: None when it is not open (the prompt's own client gets the
        frames then); RunEnded or a SessionError when the prompt may not send to it."""
        with self._lock:
            if prompt_id is not None and prompt_id in self._ended_runs:
                raise RunEnded(prompt_id)
            if self._sessions.get(session_id) is None:
                return None
            session = self._run_of(session_id, prompt_id)
            self._mark_started(session, prompt_id)
            return session

    def run_ended(self, prompt_id: str | None) -> bool:
        with self._lock:
            return prompt_id in self._ended_runs

    # -- prompts -----------------------------------------------------------------------------
    def note_prompt(self, session_id: str, prompt_id: str | None) -> list[str]:
        """Record that ``prompt_id`` is one of the session's; returns its prompt ids whose history can go."""
        with self._lock:
            if not prompt_id:
                return []
            session = self._sessions.get(session_id)
            return (session.prompts if session else self._other_prompts).note(prompt_id)
