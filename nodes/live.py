"""Turbo Live Input / Turbo Live Output: a graph's frames in and out of a live session, in memory.

*Turbo Live Input* outputs the newest frame a client pushed to its session (``live.server`` routes),
to the session's runs only; its fingerprint is that frame's id, so an unchanged frame leaves the graph
cached and a new one re-runs it. *Turbo Live Output* hands each picture to ``live.sender``, which
encodes it (JPEG or WebP) and sends it off the prompt worker thread to the session's own client, as
ComfyUI's binary websocket message type 4 with the prompt id, the input frame id and the stage
timings; nothing is written to disk, and the session keeps only its last few runs in the history.
A run of a session that has ended stops as interrupted.
"""
from __future__ import annotations

import io
import logging
import time

import torch
from PIL import Image

import comfy.model_management
import comfy.utils
from comfy_api.latest import io as comfy_io

from ..live import server as live_server
from ..live.gc_clock import GC_CLOCK
from ..live.sender import SENDER, Output
from ..live.sessions import RunEnded, SessionError, check_session_id
from .errors import TurboError

SOURCES = ("webcam", "paint", "api")
OUTPUT_FORMATS = {"jpeg": ("JPEG", "image/jpeg"), "webp": ("WEBP", "image/webp")}
DEFAULT_SESSION = "live"


def current_prompt_id() -> str | None:
    from comfy_execution.utils import get_executing_context
    context = get_executing_context()
    return context.prompt_id if context is not None else None


def _session_input():
    return comfy_io.String.Input(
        "session", default=DEFAULT_SESSION,
        tooltip="The live session's name (1-64 letters, digits, '_', '-', '.'). Turbo Live Input and Output of one "
                "graph use the same name; the Turbo Live panel streams to it.")


def _check_session(session) -> bool | str:
    try:
        check_session_id(session)
        return True
    except SessionError as e:
        return str(e)


def frame_to_image(pixels, width: int = 0, height: int = 0) -> torch.Tensor:
    """[H, W, 3] uint8 -> a [1, H, W, 3] IMAGE in 0..1, centre-cropped and resized to width x height if set."""
    image = torch.from_numpy(pixels).unsqueeze(0).to(torch.float32).div_(255.0)
    height, width = height or image.shape[1], width or image.shape[2]
    if (height, width) != tuple(image.shape[1:3]):
        image = comfy.utils.common_upscale(image.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    return image.to(comfy.model_management.intermediate_device())


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """One [H, W, C] image in 0..1 as [H, W, 3] uint8 (8-bit as ComfyUI's SaveImage rounds it), on its device."""
    return image[..., :3].mul(255.0).clamp_(0, 255).to(torch.uint8)


def encode_image(image: torch.Tensor, fmt: str, quality: int) -> bytes:
    """One [H, W, C] image (0..1 floats, or uint8 from ``to_pixels``) as JPEG or WebP bytes."""
    pixels = (image if image.dtype == torch.uint8 else to_pixels(image)).to("cpu").numpy()
    buffer = io.BytesIO()
    pil_format, _ = OUTPUT_FORMATS[fmt]
    options = {"quality": int(quality)}
    if pil_format == "WEBP":
        options["method"] = 0           # the fastest WebP encoder setting
    Image.fromarray(pixels).save(buffer, pil_format, **options)
    return buffer.getvalue()


class TurboLiveInput(comfy_io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return comfy_io.Schema(
            node_id="TurboLiveInput",
            display_name="Turbo Live Input",
            category="sampling/turbo",
            description=("The newest frame of a live session (webcam, paint canvas or any client pushing frames), "
                         "held in memory: no upload, no file. An unchanged frame leaves the graph cached."),
            inputs=[
                _session_input(),
                comfy_io.Int.Input("width", default=512, min=0, max=4096, step=8,
                                   tooltip="Frames are centre-cropped and resized to this width (0: as they "
                                           "arrive). The Turbo Live panel captures at this size."),
                comfy_io.Int.Input("height", default=512, min=0, max=4096, step=8,
                                   tooltip="Frames are centre-cropped and resized to this height (0: as they "
                                           "arrive)."),
                comfy_io.Combo.Input("source", options=list(SOURCES), default="webcam",
                                     tooltip="What the Turbo Live panel streams into this session: the webcam, its "
                                             "paint canvas, or nothing ('api': another client pushes frames)."),
            ],
            outputs=[comfy_io.Image.Output(tooltip="The newest frame, as an IMAGE (batch of 1).")],
        )

    @classmethod
    def validate_inputs(cls, session):
        return _check_session(session)

    @classmethod
    def fingerprint_inputs(cls, session=None, **kwargs):
        # The newest frame's (run, id), for the session's runs: a new frame re-runs the graph, the same frame
        # leaves it cached, and a session's next run (frame ids from 1 again) never matches the last one's
        # frames. Any other prompt gets NaN, so it never reads a run's frame out of ComfyUI's cache either.
        key = live_server.STORE.run_started(session, current_prompt_id()) if isinstance(session, str) else None
        return float("nan") if key is None else f"{session}#{key[0]}.{key[1]}"

    @classmethod
    def execute(cls, session, width=512, height=512, source="webcam") -> comfy_io.NodeOutput:
        free_dead_models(live_server.STORE.heap)
        prompt_id = current_prompt_id()
        try:
            frame, state = live_server.STORE.take(session, prompt_id)
        except RunEnded:
            raise comfy.model_management.InterruptProcessingException() from None
        except SessionError as e:
            raise TurboError(str(e).removeprefix("comfy-turbo live: ")) from None
        state.tell({"type": "taken", "frame_id": frame.id, "prompt_id": prompt_id})
        image = frame_to_image(frame.pixels, width, height)
        state.last_use.ready_at = time.perf_counter()
        return comfy_io.NodeOutput(image)


def free_dead_models(heap) -> bool:
    """A model whose patcher is gone but which a reference cycle keeps alive is what ComfyUI's
    ``cleanup_models_gc`` frees with ``gc.collect()``; with the heap frozen (live.heap) only a collection of the
    frozen objects frees it. True when one was found (and collected)."""
    if heap is None or not heap.frozen:
        return False
    if not any(loaded.is_dead() for loaded in list(comfy.model_management.current_loaded_models)):
        return False
    heap.collect()
    return True


class TurboLiveOutput(comfy_io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return comfy_io.Schema(
            node_id="TurboLiveOutput",
            display_name="Turbo Live Output",
            category="sampling/turbo",
            description=("Sends images to the live session's own client over ComfyUI's websocket as JPEG or WebP, "
                         "with the prompt id, input frame id and timings. Writes nothing to disk and keeps the "
                         "history short."),
            inputs=[
                comfy_io.Image.Input("images", tooltip="The images to show (a batch sends one frame each)."),
                _session_input(),
                comfy_io.Combo.Input("format", options=list(OUTPUT_FORMATS), default="jpeg",
                                     tooltip="JPEG encodes fastest; WebP is smaller at the same quality."),
                comfy_io.Int.Input("quality", default=85, min=1, max=100,
                                   tooltip="Encoder quality, 1-100."),
            ],
            outputs=[],
            hidden=[comfy_io.Hidden.unique_id, comfy_io.Hidden.dynprompt],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, session):
        return _check_session(session)

    @classmethod
    def fingerprint_inputs(cls, session=None, **kwargs):
        # A run of the session begins: noted, so the loop knows it holds the newest values. The value itself
        # never changes.
        if isinstance(session, str):
            live_server.STORE.run_started(session, current_prompt_id())
        return 0

    @classmethod
    def execute(cls, images, session, format="jpeg", quality=85) -> comfy_io.NodeOutput:
        start = time.perf_counter()
        if format not in OUTPUT_FORMATS:
            raise TurboError(f"Unknown format {format!r}: use one of {', '.join(OUTPUT_FORMATS)}.")
        prompt_id = current_prompt_id()
        try:
            state = live_server.STORE.output_session(session, prompt_id)
        except RunEnded:
            raise comfy.model_management.InterruptProcessingException() from None
        except SessionError as e:
            raise TurboError(str(e).removeprefix("comfy-turbo live: ")) from None
        # The session's own client; a prompt on no open session shows its pictures to its own client.
        client_id = state.client_id if state is not None else live_server.prompt_client_id()
        if client_id is None:
            raise TurboError(
                f"live session '{session}' has no client to send frames to. Press Live in the Turbo Live panel, "
                "attach to /comfy-turbo/live/<session>/ws, or queue the prompt with a client_id.")
        if not live_server.is_connected(client_id):
            logging.info("comfy-turbo live: client of session %s is gone; frame of prompt %s not sent",
                         session, prompt_id)
            return comfy_io.NodeOutput()

        use = state.last_use if state is not None else None
        fresh = use is not None and use.prompt_id == prompt_id
        started = live_server.STORE.run_started_at(state, prompt_id) if state is not None else None
        between = gc_between = None
        if state is not None and fresh:
            if state.last_output_at is not None and use.ready_at > state.last_output_at:
                between = (use.ready_at - state.last_output_at) * 1000.0    # the loop's time outside the model
                gc_between = GC_CLOCK.total_ms - state.gc_ms_at_output      # ... of which garbage collection
            state.last_output_at, state.gc_ms_at_output = start, GC_CLOCK.total_ms
        node_id = cls.hidden.unique_id
        dynprompt = cls.hidden.dynprompt
        ids = {"node_id": node_id, "display_node_id": node_id, "parent_node_id": None, "real_node_id": node_id}
        if dynprompt is not None:
            ids.update(display_node_id=dynprompt.get_display_node_id(node_id),
                       parent_node_id=dynprompt.get_parent_node_id(node_id),
                       real_node_id=dynprompt.get_real_node_id(node_id))
        fmt = format if live_server.supports_metadata(client_id) else "jpeg"     # type 1 carries JPEG only
        for index, image in enumerate(images):
            timings = {}
            if use is not None:
                timings.update(wait=(use.taken_at - use.received_at) * 1000.0, decode=use.decode_ms)
            origin = use.ready_at if fresh else started
            if origin is not None:
                timings["graph"] = (start - origin) * 1000.0
            if between is not None:
                timings.update(between=between, gc=gc_between)
            metadata = {**ids, "prompt_id": prompt_id, "image_type": OUTPUT_FORMATS[fmt][1],
                        "turbo_live": {"session": session, "frame_id": use.frame_id if use else None,
                                       "fresh_frame": fresh, "batch_index": index,
                                       "width": int(image.shape[1]), "height": int(image.shape[0])}}
            SENDER.submit(Output(session, _sender(client_id, metadata, timings, to_pixels(image), fmt, quality, state,
                                                  use if fresh else None, started, start),
                                 _dropped(state)))
        return comfy_io.NodeOutput()


def _sender(client_id, metadata, timings, pixels, fmt, quality, state, use, started, output_at):
    """Encode and send one picture (in live.sender's thread): the stage timings are finished there."""
    def send() -> None:
        handed_over = time.perf_counter()
        data = encode_image(pixels, fmt, quality)
        sent_at = time.perf_counter()
        timings.update(handoff=(handed_over - output_at) * 1000.0, encode=(sent_at - handed_over) * 1000.0)
        if use is not None:
            timings["server"] = (sent_at - use.received_at) * 1000.0
        if started is not None:
            timings["prompt"] = (sent_at - started) * 1000.0
        live = metadata["turbo_live"]
        live["timings_ms"] = {k: round(v, 3) for k, v in timings.items()}
        if state is not None:
            state.sent += 1
            live["frames"] = state.counters()
            if state.sent == 1 and live_server.STORE.heap is not None:   # its models are loaded now: freeze them too
                live_server.STORE.heap.refreeze()
        live_server.send_frame(client_id, metadata, data)
    return send


def _dropped(state):
    def dropped() -> None:
        if state is not None:
            state.outputs_dropped += 1
    return dropped
