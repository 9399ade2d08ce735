"""Turbo Live on ComfyUI's server: the routes, the live websocket, and sending output frames to one client.

Routes (each also under ComfyUI's ``/api`` prefix; docs/live.md has the protocol):

* ``GET  /comfy-turbo/live``                   protocol version, limits, number of sessions
* ``GET  /comfy-turbo/live/{session}``         one session's counters (no client id, no token)
* ``DELETE /comfy-turbo/live/{session}``       end a session fed over HTTP (token)
* ``POST /comfy-turbo/live/{session}/frame``   one frame as the body; a new session's answer carries its token
* ``POST /comfy-turbo/live/{session}/graph``   hand the session its graph (token): the server runs the loop
* ``POST /comfy-turbo/live/{session}/values``  change values of that graph (token)
* ``GET  /comfy-turbo/live/{session}/ws?clientId=C``   the live websocket: frames, the graph, values,
  and the loop's events; the connection owns the session while it is open, and ``C`` (the client's
  ComfyUI websocket id) receives the session's output frames

The token goes in the ``X-Turbo-Live-Token`` header (or a ``token`` query value). A prompt queued by
hand with ``extra_data.turbo_live_token`` becomes one of the session's runs (the token is removed from
it before ComfyUI stores it). A request from another origin is refused, as ComfyUI refuses it.

Frames are decoded in the server's thread pool, never on its event loop; a frame that arrives while
the previous one of the same connection still decodes replaces it (newest wins). Output frames are
encoded and sent by ``live.sender``, off the prompt worker thread.
"""
from __future__ import annotations

import asyncio
import ipaddress
import secrets
import json
import logging
import time
import urllib.parse
import uuid

from aiohttp import WSMsgType, web

from . import frames, protocol, runs
from .frames import FrameError
from .gc_clock import GC_CLOCK
from .graphs import LIVE_NODE_TYPES, GraphError
from .heap import FrozenHeap
from .sessions import Frame, SessionError, SessionStore, check_session_id

PROTOCOL_VERSION = 2
ROUTE = "/comfy-turbo/live"
TOKEN_HEADER = "X-Turbo-Live-Token"
TOKEN_EXTRA_DATA = "turbo_live_token"
MAX_COMMAND_BYTES = 8 * 1024 * 1024         # a text message (a graph) on the live websocket
_LIMITS = frames.Limits.from_env()
STORE = SessionStore(_LIMITS, heap=FrozenHeap() if _LIMITS.freeze_gc else None)
_registered: list = []
_recovery: list = []


def _prompt_server():
    from server import PromptServer
    return PromptServer.instance


def _error_body(error: FrameError, **extra) -> dict:
    return {"type": "error", "status": error.status, "message": str(error), **extra}


def _error_response(error: FrameError) -> web.Response:
    return web.json_response({"error": _error_body(error)}, status=error.status)


def _optional_int(value, name: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise FrameError(f"{name} must be an integer, got {value!r}.")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise FrameError(f"{name} must be an integer, got {str(value)[:40]!r}.") from None
    if number < 1:
        raise FrameError(f"{name} must be 1 or more, got {number}.")
    return number


def _timed_decode(data, declared, width, height):
    start = time.perf_counter()
    pixels = frames.decode(data, declared, width, height, STORE.limits)
    return pixels, (time.perf_counter() - start) * 1000.0


async def _receive(session_id: str, ticket: int, data, received_at: float, declared, width, height, frame_id,
                   token: str | None, client_id: str | None = None) -> dict:
    """Decode a frame (its ``SessionStore.begin_decode`` ticket given) off the event loop, keep it as the
    session's newest and let the session's loop run it; the acknowledgement."""
    frame_id = _optional_int(frame_id, "frame_id") or STORE.reserve_frame_id(session_id, ticket)
    width, height = _optional_int(width, "width"), _optional_int(height, "height")
    pixels, decode_ms = await asyncio.get_running_loop().run_in_executor(
        None, _timed_decode, data, declared, width, height)
    frame = Frame(frame_id, pixels, received_at, decode_ms, declared or frames.sniff(data))
    opened = STORE.get(session_id) is None
    accepted, session = STORE.put(session_id, frame, token, client_id)
    ack = {"type": "frame", "session": session_id, "frame_id": frame_id, "accepted": accepted,
           "width": frame.width, "height": frame.height, "decode_ms": round(decode_ms, 3),
           "frames": session.counters()}
    if opened:
        ack["token"] = session.token          # the first push opened the session: its secret, once
    if accepted:
        prompt_id = runs.input_changed(STORE, session_id, "frame")
        if prompt_id is not None:
            ack["prompt_id"] = prompt_id
    return ack


# --- HTTP -------------------------------------------------------------------------------------

async def _read_body(request: web.Request) -> bytes:
    limit = STORE.limits.max_frame_bytes
    if request.content_length is not None and request.content_length > limit:
        raise FrameError(f"the frame is {request.content_length} bytes; the limit is {limit}. Send JPEG or WebP, "
                         "or a smaller image.", status=413)
    body = bytearray()
    while chunk := await request.content.read(1 << 16):
        body += chunk
        if len(body) > limit:
            raise FrameError(f"the frame is over the limit of {limit} bytes. Send JPEG or WebP, or a smaller "
                             "image.", status=413)
    return bytes(body)


def _token(request: web.Request) -> str | None:
    return request.headers.get(TOKEN_HEADER) or request.query.get("token") or None


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_origin(request: web.Request) -> None:
    """Refuse a request from another origin, with ComfyUI's own rule (its origin-only middleware, which
    guards a server on a loopback address unless it was started with --enable-cors-header)."""
    origin, host = request.headers.get("Origin"), request.headers.get("Host")
    if not origin or not host:
        return
    try:
        from comfy.cli_args import args
        allowed = args.enable_cors_header
    except Exception:
        allowed = None
    if allowed in ("*", origin):
        return
    parsed, hosted = urllib.parse.urlparse(origin), urllib.parse.urlsplit("//" + host)
    origin_netloc, host_netloc = parsed.netloc.lower(), host.lower()
    if parsed.port is None:           # as ComfyUI: compare host names when the origin gives no port
        origin_netloc, host_netloc = parsed.hostname or "", hosted.hostname or ""
    if _is_loopback(hosted.hostname) and origin_netloc and host_netloc and origin_netloc != host_netloc:
        raise SessionError(f"a request from another origin ({origin[:80]}) is refused, as ComfyUI refuses it; "
                           "open the web UI from this server's own address.", status=403)


async def push_frame(request: web.Request) -> web.Response:
    try:
        check_origin(request)
        session_id = check_session_id(request.match_info["session"])
        query = request.query
        token = _token(request)
        STORE.check_push(session_id, token)
        body = await _read_body(request)
        received_at = time.perf_counter()
        client_id = query.get("client_id") or None
        declared = query.get("format") or frames.format_from_content_type(request.headers.get("Content-Type"))
        ticket = STORE.begin_decode(session_id)
        try:
            ack = await _receive(session_id, ticket, body, received_at, declared, query.get("width"),
                                 query.get("height"), query.get("frame_id"), token, client_id)
        finally:
            STORE.end_decode(session_id, ticket)
        _start_recovery()
        return web.json_response(ack)
    except FrameError as e:
        return _error_response(e)


def _graph_error_body(error: GraphError, request: str) -> dict:
    body = {"type": "error", "status": 400, "request": request, "message": f"comfy-turbo live: {error}"}
    if isinstance(error, runs.GraphRefused):
        body.update(error=error.error, node_errors=error.node_errors)
    return body


async def _command(session_id: str, command: dict) -> dict:
    """A graph hand-over, a change of values, or a status request (the live websocket's text messages and
    the HTTP routes alike); the answer. Nothing a client sends ends its session: an unexpected failure is
    answered as an error too."""
    try:
        return await _run_command(session_id, command)
    except Exception as e:          # a malformed graph ComfyUI's validation trips on, say
        logging.exception("comfy-turbo live: a %s command of session %s failed", command.get("type"), session_id)
        return _error_body(FrameError(f"the server could not handle this {str(command.get('type'))[:20]} message "
                                      f"({type(e).__name__}: {str(e)[:200]}); check it against docs/live.md.",
                                      status=400), request=command.get("type") if command.get("type") in
                           ("graph", "set", "status") else None)


async def _run_command(session_id: str, command: dict) -> dict:
    kind = command.get("type")
    try:
        if kind == "graph":
            extra = command.get("extra_data") if isinstance(command.get("extra_data"), dict) else None
            prompt_id = await runs.hand_over(STORE, session_id, command.get("prompt"), extra)
            return {"type": "graph", "accepted": True, "prompt_id": prompt_id}
        if kind == "set":
            prompt_id = await runs.set_values(STORE, session_id, command.get("values"))
            return {"type": "set", "accepted": True, "prompt_id": prompt_id}
    except GraphError as e:
        return _graph_error_body(e, kind)
    if kind == "status":
        session = STORE.get(session_id)
        return {"type": "status", **(session.status() if session else {"session": session_id})}
    return _error_body(FrameError('text messages are commands: {"type": "graph", "prompt": ...}, {"type": "set", '
                                  '"values": ...} or {"type": "status"}; frames are binary messages (see docs/live.md, '
                                  'the protocol).'), request=str(kind)[:40] if kind else None)


async def _read_json(request: web.Request) -> dict:
    if request.content_length is not None and request.content_length > MAX_COMMAND_BYTES:
        raise FrameError(f"the body is {request.content_length} bytes; the limit is {MAX_COMMAND_BYTES}.", status=413)
    try:
        body = json.loads(await request.read())
    except ValueError:
        raise FrameError("the body must be JSON.") from None
    if not isinstance(body, dict):
        raise FrameError("the body must be a JSON object.")
    return body


def _http_command(kind: str):
    async def handle(request: web.Request) -> web.Response:
        try:
            check_origin(request)
            session_id = check_session_id(request.match_info["session"])
            session = STORE.check_token(session_id, _token(request))
            body = await _read_json(request)
            if kind == "graph" and session.attached is None and isinstance(body.get("client_id"), str):
                session.client_id = body["client_id"]
            if kind == "graph" and session.client_id is None:
                raise FrameError("hand over the graph with \"client_id\": the ComfyUI client id (of your /ws "
                                 "connection) that receives the session's pictures.")
        except FrameError as e:
            return _error_response(e)
        answer = await _command(session_id, {**body, "type": kind})
        _start_recovery()
        return web.json_response(answer, status=answer.get("status", 200) if answer["type"] == "error" else 200)
    return handle


async def live_status(request: web.Request) -> web.Response:
    return web.json_response({"protocol": PROTOCOL_VERSION, "limits": STORE.limits.as_dict(),
                              "sessions": len(STORE), "formats": list(frames.FORMATS),
                              "gc_frozen": STORE.heap is not None and STORE.heap.frozen})


async def session_status(request: web.Request) -> web.Response:
    try:
        check_origin(request)
        session_id = check_session_id(request.match_info["session"])
    except FrameError as e:
        return _error_response(e)
    session = STORE.get(session_id)
    if session is None:
        return _error_response(SessionError(f"there is no live session '{session_id}' (it never started, or expired "
                                            "after being idle).", status=404))
    return web.json_response(session.status())


async def end_session(request: web.Request) -> web.Response:
    try:
        check_origin(request)
        session_id = check_session_id(request.match_info["session"])
        session = STORE.get(session_id)
        run_ids = list(session.runs) if session is not None else []
        ended = STORE.close(session_id, _token(request))
    except FrameError as e:
        return _error_response(e)
    if ended:
        stop_runs(run_ids)
    return web.json_response({"session": session_id, "ended": ended})


# --- websocket --------------------------------------------------------------------------------

class _NewestFrameReceiver:
    """Decodes one connection's frames one at a time; a frame that arrives meanwhile waits, replacing any
    other waiting frame (which counts as dropped and is answered ``accepted: false``, so every frame gets
    an answer). From its arrival until it is kept or refused, a frame holds its session's prompts back
    (``SessionStore.begin_decode``), so a prompt queued right after the frame was sent reads it."""

    def __init__(self, ws: web.WebSocketResponse, session_id: str, client_id: str, token: str):
        self.ws, self.session_id, self.client_id, self.token = ws, session_id, client_id, token
        self.waiting: tuple | None = None
        self.task: asyncio.Task | None = None

    def offer(self, message: bytes, received_at: float) -> None:
        if self.waiting is not None:
            STORE.put_dropped(self.session_id)
            self._answer_overtaken(self.waiting[0])
            ticket = self.waiting[2]                # overtaken: its decode ticket passes on to the newer frame
        else:
            ticket = STORE.begin_decode(self.session_id)
        self.waiting = (message, received_at, ticket)
        if self.task is None or self.task.done():
            self.task = asyncio.ensure_future(self._run())

    def _answer_overtaken(self, message: bytes) -> None:
        """The reply to a frame that a newer one replaced before it was decoded."""
        try:
            frame_id = protocol.unpack_frame(message)[0].get("frame_id")
        except protocol.ProtocolError as e:
            reply = _error_body(FrameError(str(e)))
        else:
            session = STORE.get(self.session_id)
            reply = {"type": "frame", "session": self.session_id, "frame_id": frame_id, "accepted": False,
                     "overtaken": True, "frames": session.counters() if session else {}}
        asyncio.ensure_future(self._send(reply))

    async def _send(self, reply: dict) -> None:
        if not self.ws.closed:
            try:
                await self.ws.send_json(reply)
            except ConnectionError:
                pass

    async def _run(self) -> None:
        while self.waiting is not None:
            message, received_at, ticket = self.waiting
            self.waiting = None
            frame_id = None
            try:
                header, payload = protocol.unpack_frame(message)
                frame_id = header.get("frame_id")
                reply = await _receive(self.session_id, ticket, payload, received_at, header.get("format"),
                                       header.get("width"), header.get("height"), frame_id, self.token)
            except protocol.ProtocolError as e:
                reply = _error_body(FrameError(str(e)), frame_id=frame_id)
            except FrameError as e:
                reply = _error_body(e, frame_id=frame_id)
            finally:
                STORE.end_decode(self.session_id, ticket)
            if self.ws.closed:
                return
            await self._send(reply)

    def cancel(self) -> None:
        if self.waiting is not None:
            STORE.end_decode(self.session_id, self.waiting[2])
            self.waiting = None
        if self.task is not None:
            self.task.cancel()


def _notifier(ws: web.WebSocketResponse, loop: asyncio.AbstractEventLoop):
    """A function that sends a JSON message on ``ws`` from any thread, in the order it is called."""
    async def send(message: dict) -> None:
        if not ws.closed:
            try:
                await ws.send_json(message)
            except ConnectionError:
                pass

    def notify(message: dict) -> None:
        try:
            in_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            in_loop = False
        if in_loop:
            loop.create_task(send(message))
        else:
            loop.call_soon_threadsafe(lambda: loop.create_task(send(message)))
    return notify


async def live_socket(request: web.Request) -> web.StreamResponse:
    limits = STORE.limits
    try:
        check_origin(request)
    except FrameError as e:
        return _error_response(e)
    # The heartbeat pings a silent client; one that does not answer is gone, and its session with it.
    ws = web.WebSocketResponse(max_msg_size=2 * limits.max_frame_bytes + protocol.MAX_HEADER_BYTES + 4,
                               heartbeat=limits.heartbeat_seconds)
    await ws.prepare(request)
    connection = object()
    client_id = request.query.get("clientId", "")
    try:
        session_id = check_session_id(request.match_info["session"])
        if not client_id:
            raise SessionError("connect with ?clientId=<the client id of your ComfyUI /ws connection>, which "
                               "receives this session's output frames.")
        session = STORE.attach(session_id, client_id, connection, _notifier(ws, asyncio.get_running_loop()),
                               _token(request))
    except FrameError as e:
        await ws.send_json(_error_body(e))
        await ws.close(code=4000 + e.status, message=str(e)[:120].encode())
        return ws
    _start_recovery()
    receiver = _NewestFrameReceiver(ws, session_id, client_id, session.token)
    try:
        await ws.send_json({"type": "attached", "session": session_id, "client_id": client_id,
                            "token": session.token, "protocol": PROTOCOL_VERSION, "limits": limits.as_dict()})
        async for message in ws:
            if message.type == WSMsgType.BINARY:
                size = len(message.data)
                if size > limits.max_frame_bytes + protocol.MAX_HEADER_BYTES + 4:
                    await ws.send_json(_error_body(FrameError(
                        f"the frame message is {size} bytes; the limit is {limits.max_frame_bytes} per frame. "
                        "Send JPEG or WebP, or a smaller image.", status=413)))
                    continue
                receiver.offer(message.data, time.perf_counter())
            elif message.type == WSMsgType.TEXT:
                await ws.send_json(await _text_command(session_id, message.data))
            elif message.type == WSMsgType.ERROR:
                logging.info("comfy-turbo live: session %s connection closed with %s", session_id, ws.exception())
                break
    finally:
        receiver.cancel()
        # The session ends with its connection, and so does its work: its queued runs are removed and a
        # running one is interrupted; one being picked up stops as interrupted when it starts (RunEnded).
        run_ids = list(session.runs)
        if STORE.detach(session_id, connection):
            removed, interrupted = stop_runs(run_ids)
            if removed or interrupted:
                logging.info("comfy-turbo live: session %s closed; removed %d queued run(s)%s", session_id,
                             removed, ", interrupted the running one" if interrupted else "")
    return ws


async def _text_command(session_id: str, text: str) -> dict:
    if len(text) > MAX_COMMAND_BYTES:
        return _error_body(FrameError(f"a text message is at most {MAX_COMMAND_BYTES} bytes; got {len(text)}.",
                                      status=413), request=None)
    try:
        command = json.loads(text)
    except ValueError:
        command = None
    if not isinstance(command, dict):
        command = {}
    return await _command(session_id, command)


def stop_runs(run_ids: list[str]) -> tuple[int, bool]:
    """Remove the queued ones of these runs from ComfyUI's queue and interrupt the running one; (removed, interrupted).

    The check and the interrupt happen under the queue's lock, as ComfyUI 0.33's own
    ``interrupt_if_running`` does: the worker cannot start another prompt in between. A run the worker has
    just picked up may start anyway (ComfyUI clears the flag as a prompt starts): its session has ended, so
    its Turbo Live nodes stop it as interrupted (``SessionStore.take`` raises ``RunEnded``).
    """
    import nodes as comfy_nodes          # ComfyUI's nodes module
    ids = set(run_ids)
    if not ids:
        return 0, False
    queue = _prompt_server().prompt_queue
    removed = 0
    while queue.delete_queue_item(lambda item: item[1] in ids):
        removed += 1
    with queue.mutex:
        if any(item[1] in ids for item in queue.currently_running.values()):
            comfy_nodes.interrupt_processing()
            return removed, True
    return removed, False


def authorize_prompt(json_data: dict) -> dict:
    """ComfyUI's on-prompt hook, for every POST /prompt that names a live session in a Turbo Live node:

    * a client-chosen ``prompt_id`` that is (or was) a session's run is dropped, so nobody can pass for a
      run by reusing its id (ComfyUI mints a fresh one);
    * node fingerprints (``is_changed``, which ComfyUI writes into the prompts it runs and /history shows)
      are removed, so nobody can forge a run's frame key to read its frame out of ComfyUI's cache;
    * with a session's token (``extra_data.turbo_live_token``) the prompt becomes one of that session's
      runs; the token is taken out before ComfyUI stores the prompt.
    """
    if not isinstance(json_data, dict):
        return json_data
    extra = json_data.get("extra_data")
    token = extra.pop(TOKEN_EXTRA_DATA, None) if isinstance(extra, dict) else None
    prompt = json_data.get("prompt")
    if not isinstance(prompt, dict):
        return json_data
    sessions = {(node.get("inputs") or {}).get("session") if isinstance(node.get("inputs"), dict) else None
                for node in prompt.values()
                if isinstance(node, dict) and node.get("class_type") in LIVE_NODE_TYPES}
    if not sessions:
        return json_data
    for node in prompt.values():
        if isinstance(node, dict):
            node.pop("is_changed", None)
    if STORE.knows_run(json_data.get("prompt_id")):
        json_data.pop("prompt_id", None)
    for session_id in sessions:
        session = STORE.get(session_id) if isinstance(session_id, str) else None
        if session is None or not isinstance(token, str) or \
                not secrets.compare_digest(token.encode(), session.token.encode()):
            continue
        if json_data.get("prompt_id") is None:
            json_data["prompt_id"] = str(uuid.uuid4())
        delete_history(STORE.authorize_run(session_id, str(json_data["prompt_id"])))
    return json_data


async def _recover_forever() -> None:
    while True:
        await asyncio.sleep(runs.RECOVERY_SECONDS)
        try:
            runs.recover(STORE)
        except Exception:
            logging.exception("comfy-turbo live: checking the live sessions' runs failed")


def _start_recovery() -> None:
    if not _recovery:
        _recovery.append(asyncio.get_running_loop().create_task(_recover_forever()))


# --- out --------------------------------------------------------------------------------------

def prompt_client_id() -> str | None:
    """The client id of the prompt being executed (set by ComfyUI's executor)."""
    return getattr(_prompt_server(), "client_id", None)


def is_connected(client_id: str | None) -> bool:
    return client_id is not None and client_id in _prompt_server().sockets


def supports_metadata(client_id: str) -> bool:
    """Whether the client announced ``supports_preview_metadata`` (ComfyUI's websocket feature flags)."""
    from comfy_api import feature_flags
    server = _prompt_server()
    return feature_flags.supports_feature(getattr(server, "sockets_metadata", {}), client_id,
                                          "supports_preview_metadata")


def send_frame(client_id: str, metadata: dict, image: bytes, timeout: float = 10.0) -> None:
    """Send an encoded frame to one client as ComfyUI's binary message type 4, or type 1 (PREVIEW_IMAGE, a
    JPEG) to a client that did not announce ``supports_preview_metadata``; from a thread other than the
    server's event loop, returning once the bytes are on the socket."""
    server = _prompt_server()
    if supports_metadata(client_id):
        event, payload = protocol.PREVIEW_IMAGE_WITH_METADATA, protocol.pack_image_with_metadata(metadata, image)
    else:
        event, payload = protocol.PREVIEW_IMAGE, protocol.pack_preview_image(image)
    asyncio.run_coroutine_threadsafe(server.send_bytes(event, payload, client_id), server.loop).result(timeout)


def delete_history(prompt_ids: list[str]) -> None:
    queue = _prompt_server().prompt_queue
    for prompt_id in prompt_ids:
        queue.delete_history_item(prompt_id)


def register() -> None:
    """Add the routes to ComfyUI's server (once; before it starts serving). Without a server (ComfyUI's nodes
    imported in-process, as bench/run.py does), there is nothing to add them to."""
    from server import PromptServer
    if _registered or getattr(PromptServer, "instance", None) is None:
        return
    routes = PromptServer.instance.routes
    routes.get(ROUTE)(live_status)
    routes.get(ROUTE + "/{session}")(session_status)
    routes.delete(ROUTE + "/{session}")(end_session)
    routes.post(ROUTE + "/{session}/frame")(push_frame)
    routes.post(ROUTE + "/{session}/graph")(_http_command("graph"))
    routes.post(ROUTE + "/{session}/values")(_http_command("set"))
    routes.get(ROUTE + "/{session}/ws")(live_socket)
    PromptServer.instance.add_on_prompt_handler(authorize_prompt)
    GC_CLOCK.install()
    _registered.append(True)
