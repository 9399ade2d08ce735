"""The worker's side of one ComfyUI: queue an API-format prompt over HTTP, wait for it, collect its images.

Standard library only. A worker runs one job at a time, so polling ``/history/<id>`` every 50 ms
costs nothing measurable and needs no websocket.
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid


class ComfyUnavailable(ConnectionError):
    """ComfyUI did not answer (down, restarting, unreachable): the job is retried, on this or another worker."""


class ComfyCrashed(ComfyUnavailable):
    """ComfyUI took the prompt, then stopped answering or came back without it: the prompt may have ended
    the process. The worker counts it as a failed attempt of the job (see scale/app.py, poison jobs)."""


class PromptInvalid(Exception):
    """ComfyUI refused the prompt at validation; ``body`` is its JSON answer (error and node_errors)."""

    def __init__(self, body: dict):
        self.body = body
        error = body.get("error") or {}
        details = [f"{node}: {e.get('message')} ({e.get('details')})" for node, errors in
                   (body.get("node_errors") or {}).items() for e in errors.get("errors", [])]
        super().__init__((error.get("message") or "invalid prompt") + ("; " + "; ".join(details) if details else ""))


class PromptFailed(Exception):
    """The prompt ran and failed (a node raised); ``info`` holds ComfyUI's execution_error message."""

    def __init__(self, info: dict):
        self.info = info
        super().__init__(f"{info.get('node_type')} (node {info.get('node_id')}): {info.get('exception_message')}")


def refused(error: ComfyUnavailable) -> bool:
    """Whether the connection was refused (nothing listening), rather than dropped after it was made."""
    cause = error.__cause__
    cause = getattr(cause, "reason", cause)               # URLError wraps the socket error
    return isinstance(cause, ConnectionRefusedError)


class ComfyClient:
    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, path: str, payload: dict | None = None, timeout: float = 30.0) -> bytes:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data,
                                         headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError:
            raise
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise ComfyUnavailable(f"ComfyUI at {self.url} did not answer: {e}") from e

    def get_json(self, path: str):
        return json.loads(self._request(path))

    def check(self, node_types: tuple[str, ...] = ("TurboSampler",)) -> dict:
        """ComfyUI's /system_stats, after checking that it has the pack's nodes."""
        stats = self.get_json("/system_stats")
        for node in node_types:
            try:
                self.get_json(f"/object_info/{node}")[node]
            except (urllib.error.HTTPError, KeyError):
                raise RuntimeError(f"ComfyUI at {self.url} has no {node} node: install comfy-turbo in its "
                                   "custom_nodes folder and restart it.") from None
        return stats

    def alive(self, timeout: float = 2.0) -> bool:
        """Whether ComfyUI answers at all (a busy one still does: its HTTP server has its own loop)."""
        try:
            self._request("/system_stats", timeout=timeout)
            return True
        except (ComfyUnavailable, urllib.error.HTTPError):
            return False

    def run(self, prompt: dict, timeout: float | None = None) -> dict:
        """Run ``prompt``; returns {"prompt_id", "images": [{"node", "filename", "data"}], "seconds"}.

        ComfyUnavailable: ComfyUI did not take the prompt (it never ran). ComfyCrashed: it took it and
        then went away. TimeoutError after ``timeout`` (default: the client's), with the prompt taken
        off ComfyUI's queue or interrupted by its id."""
        start = time.monotonic()
        timeout = self.timeout if timeout is None else min(float(timeout), self.timeout)
        try:
            queued = json.loads(self._request("/prompt", {"prompt": prompt, "client_id": self.client_id}))
        except ComfyUnavailable as e:
            if refused(e):
                raise                                    # nothing listened: the prompt cannot have run
            # It took the request and went away before answering: the prompt may have run, and ended it.
            raise ComfyCrashed(f"ComfyUI at {self.url} went away while taking the prompt: {e.__cause__}") from e
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = {"error": {"message": body[:2000]}}
            if e.code == 400:
                raise PromptInvalid(parsed) from None
            raise ComfyUnavailable(f"ComfyUI at {self.url} answered HTTP {e.code}: {body[:500]}") from None
        prompt_id = queued["prompt_id"]
        try:
            entry = self._wait(prompt_id, start + timeout, timeout)
        except ComfyCrashed:
            raise
        except ComfyUnavailable as e:
            raise ComfyCrashed(f"ComfyUI at {self.url} stopped answering while running prompt {prompt_id}: {e}") from e
        status = entry.get("status") or {}
        if status.get("status_str") == "error":
            info = next((data for kind, data in status.get("messages", []) if kind == "execution_error"), {})
            raise PromptFailed(info)
        images = []
        for node_id, output in (entry.get("outputs") or {}).items():
            for image in output.get("images", []):
                if image.get("type") != "output":
                    continue                     # previews in temp/ are not results
                query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
                images.append({"node": node_id, "filename": image["filename"],
                               "data": self._request(f"/view?{query}", timeout=60)})
        return {"prompt_id": prompt_id, "images": images, "seconds": time.monotonic() - start}

    def _wait(self, prompt_id: str, deadline: float, timeout: float) -> dict:
        next_queue_check = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            check_queue = time.monotonic() > next_queue_check
            if check_queue:
                next_queue_check = time.monotonic() + 1.0
            try:
                entry = self._poll(prompt_id, check_queue)
            except ComfyCrashed:
                raise
            except ComfyUnavailable as e:
                if refused(e):
                    raise ComfyCrashed(f"ComfyUI at {self.url} went down while running prompt {prompt_id}: "
                                       f"{e}") from e
                time.sleep(0.5)              # a slow answer or a reset: ask again (a crash ends in refusals)
                continue
            if entry is not None:
                return entry
            time.sleep(0.05)
        self._cancel(prompt_id)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s on {self.url}; "
                           "it was taken off that ComfyUI's queue (or interrupted, if it was running)")

    def _poll(self, prompt_id: str, check_queue: bool) -> dict | None:
        """The prompt's finished history entry, or None; with ``check_queue``, ComfyCrashed if ComfyUI no
        longer knows it."""
        entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return entry
        if check_queue:                              # a ComfyUI restarted since has neither queue nor history of it
            if not self._queued(prompt_id) and not self.get_json(f"/history/{prompt_id}").get(prompt_id):
                raise ComfyCrashed(f"ComfyUI at {self.url} lost prompt {prompt_id} (it restarted while running it)")
        return None

    def _queued(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` is running or waiting in ComfyUI's queue."""
        queue = self.get_json("/queue")
        return any(len(item) > 1 and item[1] == prompt_id
                   for item in queue.get("queue_running", []) + queue.get("queue_pending", []))

    def _cancel(self, prompt_id: str) -> None:
        """Take the prompt off ComfyUI's queue, or interrupt it by its id if it is the one running; never a
        global /interrupt, which would stop whichever prompt runs then, another client's included.
        (ComfyUI interrupts by ``prompt_id`` only when that prompt is the running one.)"""
        try:
            self._request("/queue", {"delete": [prompt_id]})
            running = self.get_json("/queue").get("queue_running", [])
            if any(len(item) > 1 and item[1] == prompt_id for item in running):
                self._request("/interrupt", {"prompt_id": prompt_id})
        except Exception:
            pass                                   # best effort: the job is reported as timed out either way
