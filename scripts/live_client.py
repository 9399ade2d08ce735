"""A Turbo Live client without a browser: the protocol of docs/live.md, in Python.

It does what the web UI's Turbo Live panel does (web/turbo_live.js), and the tests and the live
benchmark drive the server with it:

* ComfyUI's own websocket ``/ws?clientId=C`` carries the status and the output frames (binary
  message type 4: metadata JSON + JPEG/WebP bytes);
* the pack's websocket ``/comfy-turbo/live/<session>/ws?clientId=C`` carries the input frames
  (``>I header length | header JSON | image bytes``) and answers each with a JSON acknowledgement;
* prompts go to ComfyUI's ``POST /prompt``, never more than one at a time on the server: an input
  that arrives while one runs waits in the client, and only the newest waiting input is sent. A
  prompt is queued as soon as its frame is sent, without waiting for the acknowledgement: the server
  decodes the frame while it validates the prompt, and the prompt reads the frame once it is decoded.

    client = LiveClient("http://127.0.0.1:8188", session="live").connect()
    loop = LiveLoop(client, prompt)          # prompt: the API-format graph with Turbo Live nodes
    loop.push_frame(jpeg_bytes)              # or loop.edit(new_prompt) for prompt-as-you-type
    loop.pump(0.5)                           # submits when idle, collects outputs
    loop.outputs[-1].image, loop.stats()

Needs ``websocket-client`` (a test/bench extra, not a dependency of the pack).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import select
import socket
import statistics
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client


def _load_protocol():
    """The pack's live/protocol.py (standalone: it imports nothing of the pack), loaded by its path, so that
    no folder of the pack lands on sys.path: its nodes/ would shadow ComfyUI's own nodes module."""
    path = Path(__file__).resolve().parent.parent / "live" / "protocol.py"
    spec = importlib.util.spec_from_file_location("comfy_turbo_live_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_protocol = _load_protocol()
pack_frame, unpack_image_with_metadata = _protocol.pack_frame, _protocol.unpack_image_with_metadata

LIVE_ROUTE = "/comfy-turbo/live"


class LiveError(RuntimeError):
    """The server refused something (its message says what and how to fix it)."""


class Http:
    """HTTP/1.1 requests over one kept-alive socket, as a browser's fetch sends them.

    Python's http.client (and requests, urllib on top of it) spend about 3 ms per request here parsing
    headers; that is as much as what is being measured, and a browser does not pay it.
    """

    def __init__(self, url: str):
        host, _, port = url.split("://", 1)[1].partition(":")
        self.address = (host, int(port or 80))
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def request(self, method: str, path: str, body: bytes = b"",
                content_type: str = "application/json") -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.address[0]}\r\nContent-Length: {len(body)}\r\n"
        if body:
            head += f"Content-Type: {content_type}\r\n"
        for attempt in (1, 2):                     # a kept-alive connection the server closed: once more
            try:
                if self.sock is None:
                    self.sock = socket.create_connection(self.address, timeout=600)
                    self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.sock.sendall(head.encode() + b"\r\n" + body)
                return self._response()
            except (ConnectionError, OSError):
                self.close()
                if attempt == 2:
                    raise

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def _response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.buffer:
            self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                self._recv()
            body, self.buffer = self.buffer[:length], self.buffer[length:]
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._recv()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(self.buffer) < size + 2:
                    self._recv()
                body, self.buffer = body + self.buffer[:size], self.buffer[size + 2:]
                if size == 0:
                    break
        else:                                      # no length: the body runs to the end of the connection
            with contextlib.suppress(ConnectionError):
                while True:
                    self._recv()
            body = self.buffer
            self.close()
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, body

    def json(self, method: str, path: str, payload=None):
        status, body = self.request(method, path, b"" if payload is None else json.dumps(payload).encode())
        if status >= 400:
            raise LiveError(f"{method} {path}: HTTP {status}: {body.decode(errors='replace')[:2000]}")
        return json.loads(body)


class LiveClient:
    def __init__(self, url: str, session: str = "live", client_id: str | None = None):
        self.url = url.rstrip("/")
        self.session = session
        self.client_id = client_id or uuid.uuid4().hex
        self.http = Http(self.url)
        self.comfy_ws: websocket.WebSocket | None = None
        self.live_ws: websocket.WebSocket | None = None
        self.attached: dict | None = None

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[len("http"):]

    def connect(self, timeout: float = 10.0) -> "LiveClient":
        self.comfy_ws = websocket.create_connection(f"{self.ws_url}/ws?clientId={self.client_id}", timeout=timeout)
        self.live_ws = self.open_live_socket(timeout)
        first = json.loads(self.live_ws.recv())
        if first.get("type") != "attached":
            self.close()
            raise LiveError(first.get("message", str(first)))
        self.attached = first
        for ws in (self.comfy_ws, self.live_ws):
            ws.settimeout(None)
        return self

    def open_live_socket(self, timeout: float = 10.0) -> websocket.WebSocket:
        return websocket.create_connection(
            f"{self.ws_url}{LIVE_ROUTE}/{self.session}/ws?clientId={self.client_id}", timeout=timeout)

    def close(self) -> None:
        self.http.close()
        for ws in (self.live_ws, self.comfy_ws):
            if ws is not None:
                try:
                    ws.close()
                except Exception:
                    pass

    def __enter__(self) -> "LiveClient":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def receive(self, timeout: float) -> list[tuple[str, object, float]]:
        """What arrived within ``timeout`` on either websocket: (source, message or the closing error, time)."""
        sockets = {ws.sock: name for name, ws in (("comfy", self.comfy_ws), ("live", self.live_ws))
                   if ws is not None and ws.sock is not None}
        if not sockets:
            return [("live", ConnectionError("closed"), time.perf_counter())]
        readable, _, _ = select.select(list(sockets), [], [], max(timeout, 0.0))
        received = []
        for sock in readable:
            name = sockets[sock]
            try:
                message = (self.comfy_ws if name == "comfy" else self.live_ws).recv()
            except Exception as e:          # closed, by either side
                message = e
            received.append((name, message, time.perf_counter()))
        return received

    # -- requests ----------------------------------------------------------------------------
    def send_frame(self, data: bytes, frame_id: int, fmt: str = "jpeg", width: int | None = None,
                   height: int | None = None) -> None:
        header = {"frame_id": frame_id, "format": fmt}
        if fmt == "rgba":
            header.update(width=width, height=height)
        self.live_ws.send_binary(pack_frame(header, data))

    def submit(self, prompt: dict) -> str:
        status, body = self.http.request("POST", "/prompt", json.dumps({"prompt": prompt,
                                                                         "client_id": self.client_id}).encode())
        if status != 200:
            raise LiveError(f"/prompt refused the graph: {body.decode(errors='replace')[:2000]}")
        return json.loads(body)["prompt_id"]


@dataclass
class Output:
    prompt_id: str
    frame_id: int | None
    metadata: dict
    image: bytes
    shown_at: float
    latency_ms: float | None        # input (frame capture or edit) to pixels at this client


@dataclass
class LiveLoop:
    """The panel's scheduling: one prompt on the server at a time, the newest input waits, frames win.

    Frames come either from ``push_frame`` (any rate: the server keeps the newest) or from ``camera``, a
    function returning the camera's current frame as JPEG bytes, which the loop calls itself, just in time
    (see ``_wants_frame``), at most ``fps_cap`` times a second.
    """
    client: LiveClient
    prompt: dict
    camera: object = None
    fps_cap: float = 30.0
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    acks: list = field(default_factory=list)
    prompts: list = field(default_factory=list)          # prompt ids, in order
    submitted: dict = field(default_factory=dict)        # prompt id -> the graph it queued
    executed: dict = field(default_factory=dict)         # prompt id -> [(node id, arrival time)]
    max_queue_remaining: int = 0
    in_flight: str | None = None
    closed: bool = False

    def __post_init__(self):
        self._frame_id = 0                  # the newest frame sent
        self._captured: dict[int, float] = {}
        self._newest_acked = 0
        self._consumed = 0                  # every frame up to this one was used, overtaken or refused
        self._prompt_outputs: set[str] = set()
        self._edited_at: float | None = None
        self._prompt_input_time: dict[str, float | None] = {}
        self._prompt_frame: dict[str, int] = {}
        self._graph_dirty = True
        self._last_capture = float("-inf")
        self._submitted_at = 0.0
        self._expected = 0.0                # seconds a prompt takes, submit to done (moving average)
        self._lead = 0.005                  # seconds a frame takes to reach the server, decoded (moving average)

    # -- inputs ------------------------------------------------------------------------------
    def push_frame(self, data: bytes, fmt: str = "jpeg", captured_at: float | None = None, **size) -> int:
        self._frame_id += 1
        self._captured[self._frame_id] = captured_at or time.perf_counter()
        if len(self._captured) > 4096:
            self._captured.pop(next(iter(self._captured)))
        self.client.send_frame(data, self._frame_id, fmt, **size)
        return self._frame_id

    def edit(self, prompt: dict, edited_at: float | None = None) -> None:
        self.prompt = prompt
        self._graph_dirty = True
        if self._edited_at is None:
            self._edited_at = edited_at or time.perf_counter()

    # -- the loop ----------------------------------------------------------------------------
    def _wants_prompt(self) -> bool:
        if self._needs_frames and self._newest_acked == 0:
            return False                    # its Turbo Live Input has nothing to read yet
        return self._graph_dirty or self._frame_id > self._consumed

    @property
    def _needs_frames(self) -> bool:
        return any(node.get("class_type") == "TurboLiveInput" for node in self.prompt.values())

    def _frame_waiting(self) -> bool:
        """A frame was sent that no prompt has taken yet (nor will the running one)."""
        return self._frame_id > (self._prompt_frame[self.in_flight] if self.in_flight else self._consumed)

    def _wants_frame(self, now: float) -> bool:
        """Capture a camera frame when the loop will use it: at once if no prompt runs; else shortly before
        the running one should end (its expected time less a frame's way to the server), so the next prompt
        starts on a fresh, already decoded frame. One frame waits at most; the fps cap holds throughout."""
        if self.camera is None or self._frame_waiting() or now - self._last_capture < 1.0 / self.fps_cap:
            return False
        return self.in_flight is None or now >= self._submitted_at + self._expected - self._lead

    def _capture(self) -> None:
        now = time.perf_counter()
        if self._wants_frame(now):
            self._last_capture = now
            self.push_frame(self.camera(), captured_at=now)

    def _submit(self) -> None:
        prompt_id = self.client.submit(self.prompt)
        self._submitted_at = time.perf_counter()
        self.in_flight = prompt_id
        self.prompts.append(prompt_id)
        self.submitted[prompt_id] = self.prompt
        self._prompt_input_time[prompt_id] = self._edited_at
        self._prompt_frame[prompt_id] = self._frame_id
        self._edited_at, self._graph_dirty = None, False

    def pump(self, seconds: float = 0.0, until=None) -> None:
        """Handle what arrives for ``seconds`` (or until ``until()`` is true), submitting whenever the server is
        idle and an input is waiting."""
        deadline = time.perf_counter() + seconds
        while until is None or not until():
            if not self.closed:
                self._capture()
                if self.in_flight is None and self._wants_prompt():
                    self._submit()
            received = self.client.receive(min(deadline, self._next_capture()) - time.perf_counter())
            if not received and time.perf_counter() >= deadline:
                return
            for source, message, at in received:
                self._handle(source, message, at)
            if self.closed:
                return
        if self.in_flight is None and self._wants_prompt() and not self.closed:
            self._submit()

    def _next_capture(self) -> float:
        """When the camera may next be wanted (never, without one, or while a frame waits)."""
        if self.camera is None or self._frame_waiting():
            return float("inf")
        soon = self._last_capture + 1.0 / self.fps_cap
        if self.in_flight is not None:
            soon = max(soon, self._submitted_at + self._expected - self._lead)
        return soon

    def _handle(self, source: str, message, at: float) -> None:
        if isinstance(message, Exception) or message in ("", b""):
            self.closed = True
            self.errors.append(f"{source} websocket closed: {message!r}")
            return
        if source == "live":
            reply = json.loads(message)
            if reply.get("type") == "frame":
                self.acks.append(reply)
                if reply["frame_id"] in self._captured:
                    self._lead = 0.8 * self._lead + 0.2 * 1.5 * (at - self._captured[reply["frame_id"]])
                self._newest_acked = max(self._newest_acked, reply["frame_id"])
                if not reply["accepted"]:           # overtaken by a newer frame on the server
                    self._consumed = max(self._consumed, reply["frame_id"])
            elif reply.get("type") == "error":
                self.errors.append(reply["message"])
                if reply.get("frame_id") is not None:
                    self._consumed = max(self._consumed, reply["frame_id"])
            return
        if isinstance(message, bytes):
            if len(message) >= 4 and struct.unpack_from(">I", message)[0] == 4:
                metadata, image = unpack_image_with_metadata(message)
                live = metadata.get("turbo_live") or {}
                frame_id = live.get("frame_id")
                if frame_id is not None:
                    self._consumed = max(self._consumed, frame_id)
                self._prompt_outputs.add(metadata.get("prompt_id"))
                start = self._captured.get(frame_id) if live.get("fresh_frame") else None
                edit = self._prompt_input_time.get(metadata.get("prompt_id"))
                origin = max(t for t in (start, edit) if t is not None) if (start or edit) else None
                self.outputs.append(Output(metadata.get("prompt_id"), frame_id, metadata, image, at,
                                           None if origin is None else (at - origin) * 1000.0))
            return
        event = json.loads(message)
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "status":
            remaining = (data.get("status") or {}).get("exec_info", {}).get("queue_remaining", 0)
            self.max_queue_remaining = max(self.max_queue_remaining, remaining)
        elif data.get("prompt_id") == self.in_flight and self.in_flight is not None:
            if kind == "executing" and data.get("node") is not None:
                self.executed.setdefault(self.in_flight, []).append((data["node"], at))
            if kind == "execution_error":
                self.errors.append(f"{data.get('node_type')}: {data.get('exception_message')}")
            finished = (kind == "executing" and data.get("node") is None) or \
                kind in ("execution_error", "execution_interrupted")
            if finished:
                if self.in_flight not in self._prompt_outputs:
                    # Nothing new ran (all cached): the frames it was queued after, which the server has
                    # acknowledged by now, were used already. One not acknowledged yet may still come.
                    self._consumed = max(self._consumed, min(self._prompt_frame.get(self.in_flight, 0),
                                                             self._newest_acked))
                self._prompt_outputs.discard(self.in_flight)
                self.executed.setdefault(self.in_flight, []).append((None, at))
                took = at - self._submitted_at
                self._expected = took if self._expected == 0 else 0.8 * self._expected + 0.2 * took
                self.in_flight = None

    def node_seconds(self, prompt_id: str) -> dict[str, float]:
        """Wall time per node of a prompt, from the server's 'executing' messages."""
        steps = self.executed.get(prompt_id, [])
        return {node: later - at for (node, at), (_, later) in zip(steps, steps[1:]) if node is not None}

    def drain(self, timeout: float = 60.0) -> None:
        """Stop the camera, and pump until the last prompt has finished and no input is waiting."""
        self.camera = None
        deadline = time.perf_counter() + timeout
        while (self.in_flight is not None or self._wants_prompt()) and not self.closed:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the live loop did not settle within {timeout:.0f}s (in flight: {self.in_flight})")
            self.pump(0.05)

    # -- figures -----------------------------------------------------------------------------
    def stats(self, since: float | None = None) -> dict:
        shown = [o for o in self.outputs if since is None or o.shown_at >= since]
        latencies = sorted(o.latency_ms for o in shown if o.latency_ms is not None)
        span = shown[-1].shown_at - shown[0].shown_at if len(shown) > 1 else 0.0
        last = (shown[-1].metadata.get("turbo_live") or {}).get("frames") if shown else None
        return {"frames_shown": len(shown), "fps": (len(shown) - 1) / span if span > 0 else 0.0,
                "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
                "server_frames": last, "prompts": len(self.prompts),
                "max_queue_remaining": self.max_queue_remaining}


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1] if q < 100 else sorted_values[-1]
