"""Turbo Live on ComfyUI's server: the frame routes, and sending output frames to one client.

Routes (each also under ComfyUI's ``/api`` prefix):

* ``GET  /comfy-turbo/live``                   protocol version, limits, number of sessions
* ``GET  /comfy-turbo/live/{session}``         one session: its client, newest frame, counters
* ``DELETE /comfy-turbo/live/{session}``       end a session that no client is attached to
* ``POST /comfy-turbo/live/{session}/frame``   one frame as the body (JPEG / PNG / WebP bytes, or raw
  RGBA with ``?format=rgba&width=W&height=H``); optional ``frame_id`` and ``client_id`` query values
* ``GET  /comfy-turbo/live/{session}/ws?clientId=C``   a websocket for frames (``protocol.pack_frame``);
  the connection owns the session while it is open, and ``C`` (the client's ComfyUI websocket id)
  receives the session's output frames

Frames are decoded in the server's thread pool, never on its event loop; a frame that arrives while
the previous one of the same connection still decodes replaces it (newest wins). Output frames are
encoded by the caller (the prompt worker thread) and only handed to the event loop to send.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

from aiohttp import WSMsgType, web

from . import frames, protocol
from .frames import FrameError
from .sessions import Frame, SessionError, SessionStore, check_session_id

PROTOCOL_VERSION = 1
ROUTE = "/comfy-turbo/live"
LIVE_NODE_TYPES = ("TurboLiveInput", "TurboLiveOutput")
STORE = SessionStore(frames.Limits.from_env())
_registered: list = []


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
                   client_id: str | None = None) -> dict:
    """Decode a frame (its ``SessionStore.begin_decode`` ticket given) off the event loop and keep it as the
    session's newest; the acknowledgement."""
    frame_id = _optional_int(frame_id, "frame_id") or STORE.reserve_frame_id(session_id, ticket)
    width, height = _optional_int(width, "width"), _optional_int(height, "height")
    pixels, decode_ms = await asyncio.get_running_loop().run_in_executor(
        None, _timed_decode, data, declared, width, height)
    frame = Frame(frame_id, pixels, received_at, decode_ms, declared or frames.sniff(data))
    accepted, session = STORE.put(session_id, frame, client_id)
    return {"type": "frame", "session": session_id, "frame_id": frame_id, "accepted": accepted,
            "width": frame.width, "height": frame.height, "decode_ms": round(decode_ms, 3),
            "frames": session.counters()}


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


async def push_frame(request: web.Request) -> web.Response:
    try:
        session_id = check_session_id(request.match_info["session"])
        query = request.query
        body = await _read_body(request)
        received_at = time.perf_counter()
        client_id = query.get("client_id") or None
        STORE.check_client(session_id, client_id)
        declared = query.get("format") or frames.format_from_content_type(request.headers.get("Content-Type"))
        ticket = STORE.begin_decode(session_id)
        try:
            ack = await _receive(session_id, ticket, body, received_at, declared, query.get("width"),
                                 query.get("height"), query.get("frame_id"), client_id)
        finally:
            STORE.end_decode(session_id, ticket)
        return web.json_response(ack)
    except FrameError as e:
        return _error_response(e)


async def live_status(request: web.Request) -> web.Response:
    return web.json_response({"protocol": PROTOCOL_VERSION, "limits": STORE.limits.as_dict(),
                              "sessions": len(STORE), "formats": list(frames.FORMATS)})


async def session_status(request: web.Request) -> web.Response:
    try:
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
        session_id = check_session_id(request.match_info["session"])
        session = STORE.get(session_id)
        if session is not None and session.attached is not None:
            raise SessionError(f"session '{session_id}' has a client attached; it ends when that client stops Live "
                               "(closes its websocket).", status=409)
    except FrameError as e:
        return _error_response(e)
    return web.json_response({"session": session_id, "ended": STORE.close(session_id)})


# --- websocket --------------------------------------------------------------------------------

class _NewestFrameReceiver:
    """Decodes one connection's frames one at a time; a frame that arrives meanwhile waits, replacing any
    other waiting frame (which counts as dropped and is answered ``accepted: false``, so every frame gets
    an answer). From its arrival until it is kept or refused, a frame holds its session's prompts back
    (``SessionStore.begin_decode``), so a prompt queued right after the frame was sent reads it."""

    def __init__(self, ws: web.WebSocketResponse, session_id: str, client_id: str):
        self.ws, self.session_id, self.client_id = ws, session_id, client_id
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
                                       header.get("width"), header.get("height"), frame_id, self.client_id)
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


async def live_socket(request: web.Request) -> web.StreamResponse:
    limits = STORE.limits
    ws = web.WebSocketResponse(max_msg_size=2 * limits.max_frame_bytes + protocol.MAX_HEADER_BYTES + 4)
    await ws.prepare(request)
    token = object()
    client_id = request.query.get("clientId", "")
    try:
        session_id = check_session_id(request.match_info["session"])
        if not client_id:
            raise SessionError("connect with ?clientId=<the client id of your ComfyUI /ws connection>, which "
                               "receives this session's output frames.")
        STORE.attach(session_id, client_id, token)
    except FrameError as e:
        await ws.send_json(_error_body(e))
        await ws.close(code=4000 + e.status, message=str(e)[:120].encode())
        return ws
    receiver = _NewestFrameReceiver(ws, session_id, client_id)
    try:
        await ws.send_json({"type": "attached", "session": session_id, "client_id": client_id,
                            "protocol": PROTOCOL_VERSION, "limits": limits.as_dict()})
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
                await ws.send_json(_status_or_error(session_id, message.data))
            elif message.type == WSMsgType.ERROR:
                logging.info("comfy-turbo live: session %s connection closed with %s", session_id, ws.exception())
                break
    finally:
        receiver.cancel()
        # The session ends with its connection, and so does its work: the queued prompts are removed and
        # a running one is interrupted (before the frame goes, so that it never fails for want of it).
        cancelled = cancel_queued_prompts(client_id, session_id)
        interrupted = interrupt_running_prompt(client_id, session_id)
        STORE.detach(session_id, token)
        if cancelled or interrupted:
            logging.info("comfy-turbo live: session %s closed; removed %d queued prompt(s)%s", session_id,
                         cancelled, ", interrupted the running one" if interrupted else "")
    return ws


def _status_or_error(session_id: str, text: str) -> dict:
    try:
        command = json.loads(text)
    except ValueError:
        command = None
    if isinstance(command, dict) and command.get("type") == "status":
        session = STORE.get(session_id)
        return {"type": "status", **(session.status() if session else {"session": session_id})}
    return _error_body(FrameError('text messages are commands: {"type": "status"}; frames are binary messages '
                                  "(see docs/live.md, the protocol)."))


def _uses_session(item, client_id: str, session_id: str) -> bool:
    """Whether a prompt queue item (number, id, prompt, extra_data, ...) is this client's, on this session."""
    extra, prompt = item[3], item[2]
    return extra.get("client_id") == client_id and any(
        isinstance(node, dict) and node.get("class_type") in LIVE_NODE_TYPES
        and (node.get("inputs") or {}).get("session") == session_id for node in prompt.values())


def cancel_queued_prompts(client_id: str, session_id: str) -> int:
    """Remove the queued (not yet running) prompts of ``client_id`` that use this live session."""
    queue = _prompt_server().prompt_queue
    removed = 0
    while queue.delete_queue_item(lambda item: _uses_session(item, client_id, session_id)):
        removed += 1
    return removed


def interrupt_running_prompt(client_id: str, session_id: str) -> bool:
    """Interrupt the running prompt if it is this client's on this session.

    The check and the interrupt happen under the queue's lock, as ComfyUI 0.33's own
    ``interrupt_if_running`` does: the worker cannot start another prompt in between, and it clears the
    flag when it starts the next one, so no other prompt is ever interrupted.
    """
    import nodes as comfy_nodes          # ComfyUI's nodes module
    queue = _prompt_server().prompt_queue
    with queue.mutex:
        if any(_uses_session(item, client_id, session_id) for item in queue.currently_running.values()):
            comfy_nodes.interrupt_processing()
            return True
    return False


# --- out --------------------------------------------------------------------------------------

def prompt_client_id() -> str | None:
    """The client id of the prompt being executed (set by ComfyUI's executor)."""
    return getattr(_prompt_server(), "client_id", None)


def is_connected(client_id: str | None) -> bool:
    return client_id is not None and client_id in _prompt_server().sockets


def send_frame(client_id: str, metadata: dict, image: bytes) -> None:
    """Send an encoded frame to one client as ComfyUI's binary message type 4 (from any thread)."""
    server = _prompt_server()
    payload = protocol.pack_image_with_metadata(metadata, image)
    asyncio.run_coroutine_threadsafe(
        server.send_bytes(protocol.PREVIEW_IMAGE_WITH_METADATA, payload, client_id), server.loop)


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
    routes.get(ROUTE + "/{session}/ws")(live_socket)
    _registered.append(True)
