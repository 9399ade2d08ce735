"""Live input frames: which bytes a client may send, checked and decoded to RGB pixels.

Accepted: JPEG, PNG and WebP (recognised by their bytes, not by what the client says), or raw RGBA
with its width and height. Everything is checked before any pixel is decoded: the byte count, the
format, and the pixel count from the image header, so a small file that claims a huge image (a
decompression bomb) is refused without allocating it. Each refusal is a ``FrameError`` whose text
names the problem and the fix; the HTTP status travels with it.
"""
from __future__ import annotations

import io
import os
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

FORMATS = ("jpeg", "png", "webp", "rgba")
_PIL_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
CONTENT_TYPES = {"image/jpeg": "jpeg", "image/png": "png", "image/webp": "webp"}


@dataclass(frozen=True)
class Limits:
    """What the server accepts; each can be set with an environment variable (COMFY_TURBO_LIVE_<NAME>)."""
    max_frame_bytes: int = 16 * 1024 * 1024   # a raw 2048x2048 RGBA frame
    max_pixels: int = 2048 * 2048
    max_side: int = 8192
    max_sessions: int = 8
    idle_seconds: float = 120.0
    heartbeat_seconds: float = 10.0            # a live websocket silent this long is pinged; no pong: it closes
    freeze_gc: int = 1                         # 0: leave ComfyUI's collections alone while sessions are open (live.heap)

    @classmethod
    def from_env(cls, environ=os.environ) -> "Limits":
        values = {}
        for name, default in asdict(cls()).items():
            raw = environ.get(f"COMFY_TURBO_LIVE_{name.upper()}")
            if raw is not None:
                try:
                    values[name] = type(default)(raw)
                except ValueError:
                    raise ValueError(f"COMFY_TURBO_LIVE_{name.upper()}={raw!r} is not a number") from None
        return cls(**values)

    def as_dict(self) -> dict:
        return asdict(self)


class FrameError(ValueError):
    """A frame the server refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(f"comfy-turbo live: {message}")
        self.status = status


def sniff(data) -> str | None:
    """The encoded format of ``data`` from its first bytes, or None."""
    head = bytes(data[:12])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def format_from_content_type(content_type: str | None) -> str | None:
    if not content_type:
        return None
    return CONTENT_TYPES.get(content_type.split(";")[0].strip().lower())


def _check_size(width: int, height: int, limits: Limits) -> None:
    if width < 1 or height < 1:
        raise FrameError(f"the frame is {width}x{height}; it needs at least one pixel.")
    if width > limits.max_side or height > limits.max_side or width * height > limits.max_pixels:
        raise FrameError(
            f"the frame is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels} pixels "
            f"and {limits.max_side} per side. Send it smaller (Turbo models work at 512x512).", status=413)


def decode(data, declared: str | None = None, width: int | None = None, height: int | None = None,
           limits: Limits = Limits()) -> np.ndarray:
    """Check and decode one frame to an [H, W, 3] uint8 RGB array.

    ``declared`` is the format the client named (None: recognise it from the bytes); raw RGBA must be
    declared, with ``width`` and ``height``.
    """
    size = len(data)
    if size == 0:
        raise FrameError("the frame is empty (0 bytes). Send a JPEG, PNG or WebP image, or raw RGBA.")
    if size > limits.max_frame_bytes:
        raise FrameError(f"the frame is {size} bytes; the limit is {limits.max_frame_bytes}. Send JPEG or WebP, "
                         "or a smaller image.", status=413)
    if declared is not None and declared not in FORMATS:
        raise FrameError(f"format {str(declared)[:20]!r} is not accepted; use one of {', '.join(FORMATS)}.",
                         status=415)
    if declared == "rgba":
        if not isinstance(width, int) or not isinstance(height, int):
            raise FrameError("a raw RGBA frame needs its width and height (integers).")
        _check_size(width, height, limits)
        if size != width * height * 4:
            raise FrameError(f"a raw RGBA frame of {width}x{height} is {width * height * 4} bytes; got {size}. "
                             "Send 4 bytes per pixel, rows top to bottom, or fix width and height.")
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()

    found = sniff(data)
    if found is None:
        raise FrameError(f"the frame is not a JPEG, PNG or WebP image (it starts with {bytes(data[:8]).hex()}). "
                         "Send one of those, or raw RGBA declared with its width and height.", status=415)
    if declared is not None and declared != found:
        raise FrameError(f"the frame was declared {declared} but its bytes are {found}; declare {found} "
                         "or leave the format out.", status=415)
    try:
        image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[found]])
        _check_size(*image.size, limits)
        image.draft("RGB", image.size)        # JPEG: decode straight to RGB
        return np.array(image.convert("RGB"))
    except FrameError:
        raise
    except Image.DecompressionBombError as e:     # the header claims far more pixels than any limit
        raise FrameError(f"the frame's header claims an enormous image ({e}); the limit is {limits.max_pixels} "
                         "pixels. Send it smaller (Turbo models work at 512x512).", status=413) from None
    except Exception as e:  # truncated, corrupt, or a format PIL cannot read
        raise FrameError(f"the {found} frame could not be decoded ({type(e).__name__}: {e}). It is truncated or "
                         "corrupt; send the whole file.") from None
