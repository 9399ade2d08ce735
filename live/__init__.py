"""Turbo Live: frames in and out of a running ComfyUI without disk, PNG or uploads.

* ``frames``: what a client may send (JPEG, PNG, WebP or raw RGBA), checked and decoded, with limits.
* ``sessions``: the bounded, in-memory store of live sessions (one newest frame each).
* ``protocol``: the binary message layouts, for the server and for clients.
* ``server``: the routes the pack adds to ComfyUI's server, and sending frames to a client.

Only ``server`` imports ComfyUI; the rest is Pillow and numpy (both ComfyUI requirements).
"""
