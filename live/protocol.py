"""The binary layouts of Turbo Live messages, shared by the server and its clients.

Frames in (client -> server), on the pack's websocket ``/comfy-turbo/live/ws``::

    >I header_length | header (UTF-8 JSON) | payload

    header: {"frame_id": int (optional), "format": "jpeg" | "png" | "webp" | "rgba",
             "width": int, "height": int (both only for "rgba")}

Commands (client -> server) and the loop's events (server -> client) are JSON text messages on the
same websocket (docs/live.md lists them: graph, set, status; attached, frame, graph, set, run, taken, error).

Frames out (server -> client), on ComfyUI's own websocket ``/ws`` as its binary message type 4,
``PREVIEW_IMAGE_WITH_METADATA`` (ComfyUI 0.3.75 and 0.33 alike), or type 1 (``PREVIEW_IMAGE``, JPEG,
no metadata) to a client that did not announce ``supports_preview_metadata``::

    >I 4 | >I metadata_length | metadata (UTF-8 JSON) | image bytes

    metadata: ComfyUI's own keys (node_id, display_node_id, parent_node_id, real_node_id,
              prompt_id, image_type) plus "turbo_live": {session, frame_id, timings_ms, ...}
"""
from __future__ import annotations

import json
import struct

PREVIEW_IMAGE = 1                   # ComfyUI's protocol.BinaryEventTypes
PREVIEW_IMAGE_WITH_METADATA = 4
PREVIEW_FORMAT_JPEG = 1             # PREVIEW_IMAGE's format field (2 is PNG)
_U32 = struct.Struct(">I")
MAX_HEADER_BYTES = 4096


class ProtocolError(ValueError):
    """A message that does not follow the layout above."""


def pack_frame(header: dict, payload: bytes) -> bytes:
    """A frame message for the live websocket."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return _U32.pack(len(head)) + head + payload


def unpack_frame(message: bytes) -> tuple[dict, memoryview]:
    """(header, payload) of a frame message; ProtocolError names what is wrong."""
    view = memoryview(message)
    if len(view) < 4:
        raise ProtocolError(f"a frame message is at least 4 bytes (>I header length); got {len(view)}")
    (length,) = _U32.unpack_from(view)
    if length > MAX_HEADER_BYTES or 4 + length > len(view):
        raise ProtocolError(f"the header length field says {length} bytes, but the message holds "
                            f"{len(view) - 4} after it (and a header is at most {MAX_HEADER_BYTES})")
    try:
        header = json.loads(bytes(view[4:4 + length]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"the frame header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise ProtocolError("the frame header must be a JSON object")
    return header, view[4 + length:]


def pack_image_with_metadata(metadata: dict, image: bytes) -> bytes:
    """The body of ComfyUI's message type 4 (PromptServer.send_bytes adds the >I type in front)."""
    meta = json.dumps(metadata, separators=(",", ":")).encode()
    return _U32.pack(len(meta)) + meta + image


def pack_preview_image(jpeg: bytes) -> bytes:
    """The body of ComfyUI's message type 1, for a client without ``supports_preview_metadata``:
    ``>I format (1: JPEG)`` then the image (PromptServer.send_bytes adds the >I type in front)."""
    return _U32.pack(PREVIEW_FORMAT_JPEG) + jpeg


def unpack_image_with_metadata(message: bytes) -> tuple[dict, bytes]:
    """(metadata, image bytes) of a whole type-4 websocket message, as a client receives it."""
    if len(message) < 8:
        raise ProtocolError(f"a type-4 message is at least 8 bytes; got {len(message)}")
    event, length = struct.unpack_from(">II", message)
    if event != PREVIEW_IMAGE_WITH_METADATA:
        raise ProtocolError(f"binary message type {event}, not {PREVIEW_IMAGE_WITH_METADATA}")
    if 8 + length > len(message):
        raise ProtocolError(f"metadata length {length} runs past the message ({len(message)} bytes)")
    return json.loads(message[8:8 + length]), bytes(message[8 + length:])
