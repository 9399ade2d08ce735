"""A Turbo Live client without a browser: the protocol of docs/live.md, in Python.

It does what the web UI's Turbo Live panel does (web/turbo_live.js), and the tests and the live
benchmark drive the server with it:

* ComfyUI's own websocket ``/ws?clientId=C`` carries the status, the runs' progress and the output
  frames (binary message type 4: metadata JSON + JPEG/WebP bytes);
* the pack's websocket ``/comfy-turbo/live/<session>/ws?clientId=C`` carries the input frames
  (``>I header length | header JSON | image bytes``), each answered with a JSON acknowledgement, and
  the graph and its values; the server answers with the session's token and tells of each run it queues
  and each frame a run takes.

``ServerLoop`` is protocol 2, what the panel does: the graph is handed over once, and the server runs
the loop (a new frame or changed values queue the next run there; no ``POST /prompt``).

    client = LiveClient("http://127.0.0.1:8188", session="live").connect()
    loop = ServerLoop(client, prompt)        # prompt: the API-format graph with Turbo Live nodes
    loop.push_frame(jpeg_bytes)              # or loop.edit(new_prompt): only changed values are sent
    loop.pump(0.5)                           # collects outputs
    loop.outputs[-1].image, loop.stats()

``LiveLoop`` is the browser-driven loop of protocol 1, kept for the benchmark's comparison: the client
POSTs each prompt itself (with the session's token), one at a time, the newest input waiting in the
client.

Needs ``websocket-client`` (a test/bench extra, not a dependency of the pack).
"""
from __future__ import annotations

import contextlib
import copy
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


def _load_live(name: str):
    """One of the pack's standalone live/ modules (protocol.py, graphs.py: they import nothing of the pack or of
    ComfyUI), loaded by its path, so that no folder of the pack lands on sys.path: its nodes/ would shadow
    ComfyUI's own nodes module."""
    path = Path(__file__).resolve().parent.parent / "live" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"comfy_turbo_live_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_protocol = _load_live("protocol")
pack_frame, unpack_image_with_metadata = _protocol.pack_frame, _protocol.unpack_image_with_metadata
is_link = _load_live("graphs").is_link          # the server's own rule for what is a link

LIVE_ROUTE = "/comfy-turbo/live"


def passthrough_graph(session: str, width: int = 0, height: int = 0, quality: int = 90) -> dict:
    """The smallest live graph: the session's frame (fed over the API) straight back as a JPEG picture."""
    return {"1": {"class_type": "TurboLiveInput", "inputs": {"session": session, "width": width, "height": height,
                                                              "source": "api"}},
            "2": {"class_type": "TurboLiveOutput", "inputs": {"images": ["1", 0], "session": session,
                                                               "format": "jpeg", "quality": quality}}}


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


def _read_message(ws: websocket.WebSocket):
    """One message (str or bytes) of a readable websocket, or None for a control frame. The server's
    heartbeat pings are answered here: a plain ``recv()`` would answer one and then block for the next
    message, however long that takes."""
    opcode, data = ws.recv_data(control_frame=True)      # answers a ping with a pong
    if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
        return None
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        raise ConnectionError("closed")
    return data.decode() if opcode == websocket.ABNF.OPCODE_TEXT else data


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

    @property
    def token(self) -> str | None:
        return (self.attached or {}).get("token")

    def connect(self, timeout: float = 10.0, preview_metadata: bool = True) -> "LiveClient":
        # ``session`` is for a gateway (scale/haproxy.cfg), which sends a session's connections to one worker;
        # ComfyUI ignores it.
        self.comfy_ws = websocket.create_connection(f"{self.ws_url}/ws?clientId={self.client_id}&session={self.session}",
                                                    timeout=timeout)
        if preview_metadata:         # as ComfyUI's frontend announces it: pictures come as type 4, with metadata
            self.comfy_ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        self.live_ws = self.open_live_socket(timeout)
        first = json.loads(self.live_ws.recv())
        if first.get("type") != "attached":
            self.close()
            raise LiveError(first.get("message", str(first)))
        self.attached = first
        for ws in (self.comfy_ws, self.live_ws):
            ws.settimeout(None)
        return self

    def open_live_socket(self, timeout: float = 10.0, token: str | None = None) -> websocket.WebSocket:
        query = f"clientId={self.client_id}" + (f"&token={token}" if token else "")
        return websocket.create_connection(f"{self.ws_url}{LIVE_ROUTE}/{self.session}/ws?{query}", timeout=timeout)

    def reconnect(self, timeout: float = 2.0) -> "LiveClient":
        """Both websockets again, as a new attachment (through a gateway: to another worker if this
        session's worker is gone), under a new client id: the old /ws may still be closing on its server,
        which would drop the new one's registration if it had the same id. The session there is a new
        one, with its own token."""
        self.close()
        self.http = Http(self.url)
        self.comfy_ws = self.live_ws = self.attached = None
        self.client_id = uuid.uuid4().hex
        return self.connect(timeout)

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
                message = _read_message(self.comfy_ws if name == "comfy" else self.live_ws)
            except Exception as e:          # closed, by either side
                message = e
            if message is not None:
                received.append((name, message, time.perf_counter()))
        return received

    # -- requests ----------------------------------------------------------------------------
    def send_frame(self, data: bytes, frame_id: int, fmt: str = "jpeg", width: int | None = None,
                   height: int | None = None) -> None:
        header = {"frame_id": frame_id, "format": fmt}
        if fmt == "rgba":
            header.update(width=width, height=height)
        self.live_ws.send_binary(pack_frame(header, data))

    def command(self, message: dict) -> None:
        """A text command on the live websocket (graph, set, status); its answer comes through ``receive``."""
        self.live_ws.send(json.dumps(message))

    def submit(self, prompt: dict) -> str:
        """POST /prompt by hand (protocol 1's loop), with the session's token: the prompt is one of its runs."""
        status, body = self.http.request("POST", f"/prompt?session={self.session}", json.dumps({
            "prompt": prompt, "client_id": self.client_id,
            "extra_data": {"turbo_live_token": self.token}}).encode())
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


class _Loop:
    """What both loops share: frames out with their capture times, pictures in, per-node times, figures."""

    def _start(self) -> None:
        self._frame_id = 0                  # the newest frame sent
        self._captured: dict[int, float] = {}
        self._last_capture = float("-inf")
        self._expected = 0.0                # seconds a run takes (moving average)
        self._lead = 0.005                  # seconds a frame takes to reach the server, decoded (moving average)

    def push_frame(self, data: bytes, fmt: str = "jpeg", captured_at: float | None = None, **size) -> int:
        self._frame_id += 1
        self._captured[self._frame_id] = captured_at or time.perf_counter()
        if len(self._captured) > 4096:
            self._captured.pop(next(iter(self._captured)))
        self.client.send_frame(data, self._frame_id, fmt, **size)
        return self._frame_id

    def _closed_by(self, source: str, message) -> bool:
        """A websocket closed (``receive`` hands over the exception or an empty message): the loop stops."""
        if isinstance(message, Exception) or message in ("", b""):
            self.closed = True
            self.errors.append(f"{source} websocket closed: {message!r}")
            return True
        return False

    def _frame_acked(self, reply: dict, at: float) -> None:
        self.acks.append(reply)
        if reply["frame_id"] in self._captured:
            self._lead = 0.8 * self._lead + 0.2 * 1.5 * (at - self._captured[reply["frame_id"]])

    def _picture(self, message: bytes, at: float, input_time: dict) -> Output | None:
        """A type-4 picture message as an Output (its latency from the newer of its frame's capture and the
        edit its run was queued for, ``input_time``: prompt id -> edit time); None for other binary messages."""
        if len(message) < 4 or struct.unpack_from(">I", message)[0] != 4:
            return None
        metadata, image = unpack_image_with_metadata(message)
        live = metadata.get("turbo_live") or {}
        frame_id = live.get("frame_id")
        start = self._captured.get(frame_id) if live.get("fresh_frame") else None
        edit = input_time.get(metadata.get("prompt_id"))
        origin = max(t for t in (start, edit) if t is not None) if (start or edit) else None
        output = Output(metadata.get("prompt_id"), frame_id, metadata, image, at,
                        None if origin is None else (at - origin) * 1000.0)
        self.outputs.append(output)
        return output

    def _queue_status(self, data: dict) -> None:
        remaining = (data.get("status") or {}).get("exec_info", {}).get("queue_remaining", 0)
        self.max_queue_remaining = max(self.max_queue_remaining, remaining)

    def _took(self, seconds: float) -> None:
        self._expected = seconds if self._expected == 0 else 0.8 * self._expected + 0.2 * seconds

    def node_seconds(self, prompt_id: str) -> dict[str, float]:
        """Wall time per node of a prompt, from the server's 'executing' messages."""
        steps = self.executed.get(prompt_id, [])
        return {node: later - at for (node, at), (_, later) in zip(steps, steps[1:]) if node is not None}

    def stats(self, since: float | None = None) -> dict:
        shown = [o for o in self.outputs if since is None or o.shown_at >= since]
        latencies = sorted(o.latency_ms for o in shown if o.latency_ms is not None)
        span = shown[-1].shown_at - shown[0].shown_at if len(shown) > 1 else 0.0
        last = (shown[-1].metadata.get("turbo_live") or {}).get("frames") if shown else None
        return {"frames_shown": len(shown), "fps": (len(shown) - 1) / span if span > 0 else 0.0,
                "latency_p50_ms": percentile(latencies, 50), "latency_p95_ms": percentile(latencies, 95),
                "server_frames": last, "prompts": len(self.prompts),
                "max_queue_remaining": self.max_queue_remaining}


@dataclass
class LiveLoop(_Loop):
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
        self._start()
        self._newest_acked = 0
        self._consumed = 0                  # every frame up to this one was used, overtaken or refused
        self._prompt_outputs: set[str] = set()
        self._edited_at: float | None = None
        self._prompt_input_time: dict[str, float | None] = {}
        self._prompt_frame: dict[str, int] = {}
        self._graph_dirty = True
        self._submitted_at = 0.0

    # -- inputs ------------------------------------------------------------------------------
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
        if self._closed_by(source, message):
            return
        if source == "live":
            reply = json.loads(message)
            if reply.get("type") == "frame":
                self._frame_acked(reply, at)
                self._newest_acked = max(self._newest_acked, reply["frame_id"])
                if not reply["accepted"]:           # overtaken by a newer frame on the server
                    self._consumed = max(self._consumed, reply["frame_id"])
            elif reply.get("type") == "error":
                self.errors.append(reply["message"])
                if reply.get("frame_id") is not None:
                    self._consumed = max(self._consumed, reply["frame_id"])
            return
        if isinstance(message, bytes):
            output = self._picture(message, at, self._prompt_input_time)
            if output is not None:
                if output.frame_id is not None:
                    self._consumed = max(self._consumed, output.frame_id)
                self._prompt_outputs.add(output.prompt_id)
            return
        event = json.loads(message)
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "status":
            self._queue_status(data)
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
                self._took(at - self._submitted_at)
                self.in_flight = None

    def drain(self, timeout: float = 60.0) -> None:
        """Stop the camera, and pump until the last prompt has finished and no input is waiting."""
        self.camera = None
        deadline = time.perf_counter() + timeout
        while (self.in_flight is not None or self._wants_prompt()) and not self.closed:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the live loop did not settle within {timeout:.0f}s (in flight: {self.in_flight})")
            self.pump(0.05)


def value_changes(old: dict, new: dict) -> dict | None:
    """{node id: {input: value}} of the widget values that differ from ``old`` to ``new``; None when the graph
    itself changed (nodes, classes or links), so it must be sent again."""
    if old.keys() != new.keys():
        return None
    changes: dict = {}
    for node_id, node in new.items():
        before = old[node_id]
        if node.get("class_type") != before.get("class_type"):
            return None
        inputs, previous = node.get("inputs", {}), before.get("inputs", {})
        if inputs.keys() != previous.keys():
            return None
        for name, value in inputs.items():
            was = previous[name]
            if is_link(value) or is_link(was):
                if value != was:
                    return None
            elif value != was:
                changes.setdefault(node_id, {})[name] = value
    return changes


@dataclass
class ServerLoop(_Loop):
    """Protocol 2, the panel's loop: the graph goes to the server once, and the server queues every run.

    ``edit`` sends only the values that changed (``set``), or the whole graph when its shape changed.
    Frames come from ``push_frame`` (any rate: the server keeps the newest and queues a run when none is
    waiting) or from ``camera``, a function returning the camera's current frame as JPEG bytes, which the
    loop calls itself just in time (see ``_wants_frame``): at most one frame waits untaken on the server.

    ``reattach_within`` (seconds, 0: off): when a websocket closes, connect again within that time (through
    a gateway, to another worker if this one died) and hand the graph over again; the loop goes on, and
    each move is in ``reattachments``. The run and the frame the lost connection held are gone with it.
    """
    client: LiveClient
    prompt: dict
    camera: object = None
    fps_cap: float = 30.0
    reattach_within: float = 0.0
    reattachments: list = field(default_factory=list)    # {"reason", "lost_at", "attached_at"} per move
    outputs: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    refusals: list = field(default_factory=list)         # error answers to graph / set
    acks: list = field(default_factory=list)
    prompts: list = field(default_factory=list)          # the runs the server queued, in order
    reasons: dict = field(default_factory=dict)          # run prompt id -> why the server queued it
    executed: dict = field(default_factory=dict)         # run prompt id -> [(node id, arrival time)]
    taken: dict = field(default_factory=dict)            # run prompt id -> frame id it read
    steps: dict = field(default_factory=dict)            # run prompt id -> its sampler's step count (progress max)
    max_queue_remaining: int = 0
    closed: bool = False

    def __post_init__(self):
        self._start()
        self._consumed = 0                   # every frame up to this one was taken, overtaken or refused
        self._finished: set[str] = set()
        self._sent_prompt: dict | None = None
        self._answers_due = 0                # graph / set commands not answered yet
        self._runs_before_move = 0           # runs queued before the last move (lost with it)
        self._edited_at: float | None = None
        self._run_input_time: dict[str, float | None] = {}
        self._last_taken_at = 0.0
        self._taken_at: dict[str, float] = {}    # (a run's time: its frame taken to the run done)
        self._send_graph()

    @property
    def in_flight(self) -> str | None:
        """The newest run, while it has not finished (runs execute in order; one the server replaced with a
        newer one before it ran never finishes, and never counts)."""
        return self.prompts[-1] if self.prompts and self.prompts[-1] not in self._finished else None

    # -- inputs ------------------------------------------------------------------------------
    def _send_graph(self) -> None:
        self.client.command({"type": "graph", "prompt": self.prompt})
        self._sent_prompt, self._answers_due = copy.deepcopy(self.prompt), self._answers_due + 1

    def edit(self, prompt: dict, edited_at: float | None = None) -> None:
        """The graph as it is now: its changed values go to the server at once (or the graph, if its shape
        changed); an unchanged graph sends nothing."""
        self.prompt = prompt
        changes = value_changes(self._sent_prompt, prompt)
        if changes == {}:
            return
        if self._edited_at is None:
            self._edited_at = edited_at or time.perf_counter()
        if changes is None:
            self._send_graph()
        else:
            self.client.command({"type": "set", "values": changes})
            self._sent_prompt, self._answers_due = copy.deepcopy(prompt), self._answers_due + 1

    # -- the loop ----------------------------------------------------------------------------
    def _frame_waiting(self) -> bool:
        return self._frame_id > self._consumed

    def _wants_frame(self, now: float) -> bool:
        """Capture a camera frame when a run will take it: at once if no run executes, else shortly before the
        running one should end (its expected time less a frame's way to the server); one waits at most."""
        if self.camera is None or self._frame_waiting() or now - self._last_capture < 1.0 / self.fps_cap:
            return False
        return self.in_flight is None or now >= self._last_taken_at + self._expected - self._lead

    def _next_capture(self) -> float:
        if self.camera is None or self._frame_waiting():
            return float("inf")
        soon = self._last_capture + 1.0 / self.fps_cap
        if self.in_flight is not None:
            soon = max(soon, self._last_taken_at + self._expected - self._lead)
        return soon

    def pump(self, seconds: float = 0.0, until=None) -> None:
        """Handle what arrives for ``seconds`` (or until ``until()`` is true), capturing camera frames."""
        deadline = time.perf_counter() + seconds
        while until is None or not until():
            now = time.perf_counter()
            if not self.closed and self._wants_frame(now):
                self._last_capture = now
                self.push_frame(self.camera(), captured_at=now)
            received = self.client.receive(min(deadline, self._next_capture()) - time.perf_counter())
            if not received and time.perf_counter() >= deadline:
                return
            moves = len(self.reattachments)
            for source, message, at in received:
                self._handle(source, message, at)
                if len(self.reattachments) != moves:     # the rest came from the connections just replaced
                    break
            if self.closed:
                return

    def push_frame(self, data: bytes, fmt: str = "jpeg", captured_at: float | None = None, **size) -> int:
        try:
            return super().push_frame(data, fmt, captured_at, **size)
        except (OSError, websocket.WebSocketException) as e:
            if not self.reattach_within or not self._reattach(f"sending a frame failed: {e!r}"):
                raise
            return self._frame_id               # that frame is lost with the old connection; the next one goes

    def _reattach(self, reason: str) -> bool:
        """Connect again within ``reattach_within`` seconds and hand the graph over; if that fails, the loop
        is closed (``closed``, the reason in ``errors``) and False."""
        if self.closed:
            return False
        lost_at = time.perf_counter()
        deadline = lost_at + self.reattach_within
        while True:
            try:
                self.client.reconnect(timeout=max(0.5, min(2.0, deadline - time.perf_counter())))
                self._send_graph()
                break
            except (OSError, ValueError, LiveError, websocket.WebSocketException) as e:
                if time.perf_counter() + 0.2 >= deadline:
                    self.errors.append(f"{reason}; could not reattach within {self.reattach_within:.0f} s: {e!r}")
                    self.closed = True
                    return False
                time.sleep(0.2)
        # What the lost connection held is gone with it: its runs never finish, its frames were not taken,
        # and only the graph just handed over is waiting for an answer.
        self._finished.update(self.prompts)
        self._runs_before_move = len(self.prompts)
        self._consumed, self._answers_due = self._frame_id, 1
        self._taken_at.clear()
        self.reattachments.append({"reason": reason, "lost_at": lost_at, "attached_at": time.perf_counter()})
        return True

    def settled(self) -> bool:
        """Nothing left to do: every command answered, every frame consumed, no run in flight, and the newest
        run's picture here if it made one (pictures are sent after their run ends, off the worker thread)."""
        return self._answers_due == 0 and not self._frame_waiting() and self.in_flight is None \
            and not self._picture_due()

    def _picture_due(self) -> bool:
        run = self.prompts[-1] if len(self.prompts) > self._runs_before_move else None
        outputs = {node_id for node_id, node in self.prompt.items() if node.get("class_type") == "TurboLiveOutput"}
        ran_output = any(node in outputs for node, _ in self.executed.get(run, []))
        return ran_output and not any(o.prompt_id == run for o in self.outputs[-4:])

    def drain(self, timeout: float = 60.0) -> None:
        """Stop the camera, and pump until the server has run every input."""
        self.camera = None
        deadline = time.perf_counter() + timeout
        while not self.settled() and not self.closed:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"the live loop did not settle within {timeout:.0f}s (in flight: {self.in_flight}, "
                                   f"answers due {self._answers_due}, frame {self._frame_id} > {self._consumed})")
            self.pump(0.05)

    def _handle(self, source: str, message, at: float) -> None:
        if self.reattach_within and (isinstance(message, Exception) or message in ("", b"")):
            self._reattach(f"{source} websocket closed: {message!r}")     # on failure: closed, with the reason
            return
        if self._closed_by(source, message):
            return
        if source == "live":
            self._handle_live(json.loads(message), at)
        elif isinstance(message, bytes):
            self._picture(message, at, self._run_input_time)
        else:
            self._handle_comfy(json.loads(message), at)

    def _handle_live(self, reply: dict, at: float) -> None:
        kind = reply.get("type")
        if kind in ("frame", "graph", "set") and reply.get("prompt_id"):
            # The answer names the run it queued; it can arrive before the "run" event.
            self._note_run(reply["prompt_id"], "frame" if kind == "frame" else "values" if kind == "set" else "graph")
        if kind == "frame":
            self._frame_acked(reply, at)
            if not reply["accepted"]:
                self._consumed = max(self._consumed, reply["frame_id"])
        elif kind == "run":
            self._note_run(reply["prompt_id"], reply["reason"])
        elif kind == "taken":
            self.taken[reply["prompt_id"]] = reply["frame_id"]
            self._taken_at[reply["prompt_id"]] = at
            self._consumed = max(self._consumed, reply["frame_id"])
            self._last_taken_at = at
        elif kind in ("graph", "set"):
            self._answers_due -= 1
        elif kind == "error":
            if reply.get("request") in ("graph", "set"):
                self._answers_due -= 1
                self.refusals.append(reply)
            else:
                self.errors.append(reply["message"])
            if reply.get("frame_id") is not None:
                self._consumed = max(self._consumed, reply["frame_id"])

    def _note_run(self, prompt_id: str, reason: str) -> None:
        if prompt_id in self.reasons:
            return
        self.prompts.append(prompt_id)
        self.reasons[prompt_id] = reason
        if reason in ("values", "graph"):
            self._run_input_time[prompt_id] = self._edited_at
            self._edited_at = None

    def _handle_comfy(self, event: dict, at: float) -> None:
        data = event.get("data") or {}
        kind = event.get("type")
        if kind == "status":
            self._queue_status(data)
            return
        prompt_id = data.get("prompt_id")
        if prompt_id not in self.reasons:
            return
        if kind == "executing" and data.get("node") is not None:
            self.executed.setdefault(prompt_id, []).append((data["node"], at))
        if kind == "progress":
            self.steps[prompt_id] = max(self.steps.get(prompt_id, 0), int(data.get("max") or 0))
        if kind == "execution_error":
            self.errors.append(f"{data.get('node_type')}: {data.get('exception_message')}")
        if (kind == "executing" and data.get("node") is None) or kind in ("execution_error", "execution_interrupted"):
            self._finished.add(prompt_id)
            self.executed.setdefault(prompt_id, []).append((None, at))
            if prompt_id in self._taken_at:      # its own frame's time: the next run's taken may come first
                self._took(at - self._taken_at.pop(prompt_id))


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return sorted_values[0]
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[int(q) - 1] if q < 100 else sorted_values[-1]
