"""Run a real ComfyUI server with comfy-turbo installed as a custom node, and talk to it over HTTP.

Used by the tests, the demo and the benchmarks. The server gets a private base directory
(models/, input/, output/, user/, custom_nodes/) and the pack is linked into its custom_nodes/
exactly as a user's clone would sit there.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import websocket  # websocket-client

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfy-turbo"
TERMINAL_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
MODEL_FOLDERS = ("checkpoints", "loras", "controlnet", "vae", "vae_approx", "embeddings", "clip", "upscale_models")


def default_comfyui_path() -> Path:
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise RuntimeError("COMFYUI_PATH is not set: run through scripts/env.sh, or point it at a ComfyUI checkout.")
    return Path(path)


def cache_dir() -> Path:
    """comfy-turbo's cache (environments, generated models), resolved as scripts/env.sh resolves it."""
    if os.environ.get("COMFY_TURBO_CACHE"):
        return Path(os.environ["COMFY_TURBO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfy-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PromptResult:
    prompt_id: str
    status: str                      # "success", "error" or "interrupted"
    events: list = field(default_factory=list)   # websocket messages of this prompt, in order, with "t"
    history: dict = field(default_factory=dict)

    @property
    def error(self) -> dict | None:
        for event in self.events:
            if event["type"] in ("execution_error", "execution_interrupted"):
                return event["data"]
        return None

    def images(self) -> list[dict]:
        return [img for out in self.history.get("outputs", {}).values() for img in out.get("images", [])]

    def node_seconds(self) -> dict[str, float]:
        """Wall time per executed node id, from the server's 'executing' messages."""
        times, current, start = {}, None, None
        for event in self.events:
            if event["type"] not in ("executing", *TERMINAL_EVENTS):
                continue
            if current is not None:
                times[current] = times.get(current, 0.0) + event["t"] - start
            current, start = event["data"].get("node"), event["t"]
        return times


class ComfyHost:
    def __init__(self, base_dir: Path, comfyui_path: Path | None = None, python: str | None = None,
                 port: int | None = None, extra_args: tuple[str, ...] = (), cpu: bool = True):
        self.base_dir = Path(base_dir).resolve()
        self.comfyui_path = Path(comfyui_path or default_comfyui_path()).resolve()
        self.python = python or sys.executable
        self.port = port or free_port()
        self.extra_args = tuple(extra_args)
        self.cpu = cpu                   # False: ComfyUI picks its device (a GPU)
        self.client_id = uuid.uuid4().hex
        self.process: subprocess.Popen | None = None
        self.log_path = self.base_dir / "server.log"
        self.prepare()

    # -- directories -------------------------------------------------------------------------
    def prepare(self) -> None:
        for sub in ("input", "output", "temp", "user", "custom_nodes", "front-end"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        for folder in MODEL_FOLDERS:
            (self.models_dir / folder).mkdir(parents=True, exist_ok=True)
        link = self.base_dir / "custom_nodes" / PACK_DIR_NAME
        if not link.is_symlink() or link.resolve() != REPO_ROOT:
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(REPO_ROOT, target_is_directory=True)

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def install_model(self, source: Path, folder: str, name: str | None = None) -> str:
        """Link a model file into models/<folder>/ and return the name ComfyUI lists it under."""
        target = self.models_dir / folder / (name or Path(source).name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(Path(source).resolve())
        return target.name

    # -- process -----------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyHost":
        cmd = [self.python, "-u", str(self.comfyui_path / "main.py"), *(["--cpu"] if self.cpu else []),
               "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.base_dir / 'user' / 'comfyui.db'}", *self.extra_args]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, cwd=self.comfyui_path, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> "ComfyHost":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- HTTP --------------------------------------------------------------------------------
    def request(self, path: str, payload: dict | None = None, timeout: float = 30.0) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.read()

    def get_json(self, path: str, timeout: float = 30.0):
        return json.loads(self.request(path, timeout=timeout))

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def post_prompt(self, prompt: dict, client_id: str | None = None) -> dict:
        """POST /prompt; returns the server's JSON, raising PromptRejected on a 400 (validation error)."""
        try:
            payload = {"prompt": prompt, "client_id": client_id or self.client_id}
            return json.loads(self.request("/prompt", payload))
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise PromptRejected(e.code, json.loads(body) if body.startswith("{") else {"raw": body}) from None

    def interrupt(self) -> None:
        self.request("/interrupt", {})

    def history(self, prompt_id: str) -> dict:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id, {})

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.request(f"/view?{query}")

    def connect(self, timeout: float = 10.0, client_id: str | None = None) -> websocket.WebSocket:
        ws = websocket.WebSocket()
        ws.connect(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id or self.client_id}", timeout=timeout)
        return ws

    def run(self, prompt: dict, timeout: float = 600.0, on_event=None) -> PromptResult:
        """Queue a prompt and follow it over the websocket until it succeeds, fails or is interrupted."""
        ws = self.connect()
        try:
            prompt_id = self.post_prompt(prompt)["prompt_id"]
            return self.follow(ws, prompt_id, timeout, on_event)
        finally:
            ws.close()

    def follow(self, ws: websocket.WebSocket, prompt_id: str, timeout: float = 600.0, on_event=None,
               fetch_history: bool = True) -> PromptResult:
        events, deadline = [], time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f}s:\n{self.log_tail()}")
            ws.settimeout(min(remaining, 5.0))
            try:
                message = ws.recv()
            except websocket.WebSocketTimeoutException:
                if not self.alive():
                    raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
                continue
            if not isinstance(message, str):
                continue  # binary preview frames
            event = json.loads(message)
            data = event.get("data") or {}
            if data.get("prompt_id") != prompt_id:
                continue
            event["t"] = time.monotonic()
            events.append(event)
            if on_event is not None:
                on_event(event)
            kind = event["type"]
            finished = (kind == "executing" and data.get("node") is None) or kind in TERMINAL_EVENTS
            if finished:
                status = {"execution_error": "error", "execution_interrupted": "interrupted"}.get(kind, "success")
                return PromptResult(prompt_id, status, events,
                                    self.wait_history(prompt_id) if fetch_history else {})

    def wait_history(self, prompt_id: str, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry.get("status", {}).get("completed") is not None or entry.get("outputs"):
                return entry
            time.sleep(0.1)
        return self.history(prompt_id)


class PromptRejected(Exception):
    """The server refused a prompt at validation (HTTP 400); .body holds its JSON."""

    def __init__(self, code: int, body: dict):
        self.code, self.body = code, body
        super().__init__(f"HTTP {code}: {json.dumps(body)[:2000]}")
