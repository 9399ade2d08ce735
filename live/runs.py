"""The server-side live loop: a session's runs are ordinary ComfyUI prompts that the server queues itself.

A client hands its session the graph once (``hand_over``); ComfyUI's own validation checks it, as for
``POST /prompt``. From then on ``input_changed`` queues the next run whenever the session's input
changes, a new frame or changed values, with no request from the client:

* at most one run of a session executes and one waits in ComfyUI's queue: a frame that arrives while a
  run waits queues nothing (the waiting run reads the newest frame when it starts), and a change of
  values replaces the waiting run with one that holds them;
* an unchanged input queues nothing;
* each run is a normal prompt in ComfyUI's queue (numbered after whatever other clients queued before
  it, so their prompts are never starved), with the session's client as its ``client_id``: progress,
  previews, errors, Cancel, the history and the cache work as for any prompt;
* a run that vanished from the queue (someone cleared it) is replaced by ``recover`` as soon as input is
  waiting, so the loop never stalls.

Runs are queued from the server's event loop, as ``POST /prompt`` queues prompts.
"""
from __future__ import annotations

import copy
import logging
import time
import uuid
from dataclasses import dataclass, field

from .graphs import GraphError, apply_values, check_live_graph
from .sessions import Session, SessionStore

RECOVERY_SECONDS = 0.5          # how often sessions are checked for a run that vanished


@dataclass
class LiveGraph:
    prompt: dict                  # the API prompt, as validated
    outputs: list                 # the output nodes ComfyUI's validation chose
    extra_data: dict = field(default_factory=dict)
    needs_frames: bool = True     # it has a Turbo Live Input


class GraphRefused(GraphError):
    """ComfyUI's validation refused a graph or values: its error and node_errors, as /prompt answers them."""

    def __init__(self, message: str, node_errors: dict | None = None, error: dict | None = None):
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.error = error or {"type": "invalid_prompt", "message": message, "details": "", "extra_info": {}}


def _server():
    from server import PromptServer
    return PromptServer.instance


async def validate(prompt: dict, session_id: str, extra_data: dict | None = None, what: str = "the graph") -> LiveGraph:
    """Check a graph for ``session_id`` with ComfyUI's own validation (what POST /prompt runs)."""
    import execution
    needs_frames = check_live_graph(prompt, session_id)
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        node.pop("is_changed", None)          # fingerprints are ComfyUI's to compute, never a client's
    server = _server()
    replacements = getattr(server, "node_replace_manager", None)     # ComfyUI 0.33: node replacements
    if replacements is not None:
        replacements.apply_replacements(prompt)
    valid = await execution.validate_prompt(str(uuid.uuid4()), prompt, None)
    if not valid[0]:
        error = valid[1] if isinstance(valid[1], dict) else {"message": str(valid[1])}
        details = "; ".join(f"node {node_id}: " + ", ".join(f"{e.get('message')} ({e.get('details')})"
                                                          for e in entry.get("errors", []))
                            for node_id, entry in (valid[3] or {}).items())
        message = f"ComfyUI refused {what}: {error.get('message')}" + (f". {details}" if details else "")
        raise GraphRefused(message, valid[3], error)
    extra = {k: v for k, v in (extra_data or {}).items() if k in ("extra_pnginfo",)}
    return LiveGraph(prompt, list(valid[2]), extra, needs_frames)


def _pending(session: Session, queue) -> str | None:
    """Whether the session's newest run still waits: 'queued' (in ComfyUI's queue) or 'starting' (picked up by
    the worker, not yet begun: it will read the newest input); None when it began, ended or vanished."""
    run = session.last_run
    if run is None:
        return None
    with queue.mutex:
        if any(item[1] == run for item in queue.queue):
            return "queued"
        if run not in session.started and any(item[1] == run for item in queue.currently_running.values()):
            return "starting"
    return None


def _vanished(run: str, queue) -> bool:
    """A run that is neither queued, running nor in the history: removed from the queue unrun."""
    with queue.mutex:
        return not (any(item[1] == run for item in queue.queue)
                    or any(item[1] == run for item in queue.currently_running.values())
                    or run in queue.history)


def _queue(store: SessionStore, session: Session, reason: str) -> str:
    """Put one run of the session's graph in ComfyUI's queue, as POST /prompt does."""
    server = _server()
    prompt_id = str(uuid.uuid4())
    number = server.number
    server.number += 1
    graph = session.graph
    extra_data = {**graph.extra_data, "create_time": int(time.time() * 1000)}
    # A fresh copy each run: ComfyUI writes each node's fingerprint into the prompt it executes.
    prompt = copy.deepcopy(graph.prompt)
    expired = store.authorize_run(session.id, prompt_id, session.graph_version)
    session.last_run = prompt_id
    # The client id goes with the queue item's sensitive part, which the worker merges back into extra_data
    # and /queue and /history never show: with it, anyone could take over the client's /ws and its pictures.
    server.prompt_queue.put((number, prompt_id, prompt, extra_data, list(graph.outputs),
                             {"client_id": session.client_id}))
    for old in expired:                      # the history keeps the session's last few runs
        server.prompt_queue.delete_history_item(old)
    session.tell({"type": "run", "prompt_id": prompt_id, "reason": reason})
    return prompt_id


def input_changed(store: SessionStore, session_id: str, reason: str) -> str | None:
    """The session's input changed ('frame', 'values', 'graph'): queue a run if one is needed; its prompt id."""
    queue = _server().prompt_queue
    with store.lock:
        session = store.get(session_id)
        if session is None or session.graph is None or session.client_id is None:
            return None
        if session.graph.needs_frames and session.frame is None:
            return None                      # its Turbo Live Input has nothing to read yet
        pending = _pending(session, queue)
        if pending and reason == "frame":
            return None                      # the waiting run will read this frame
        if pending == "queued" and queue.delete_queue_item(lambda item: item[1] == session.last_run):
            session.runs.pop(session.last_run, None)     # replaced before it ran: the new run holds the values
        return _queue(store, session, reason)


async def hand_over(store: SessionStore, session_id: str, prompt, extra_data: dict | None = None) -> str | None:
    """Make ``prompt`` the session's graph (validated by ComfyUI) and start its loop; the first run's id."""
    graph = await validate(prompt, session_id, extra_data)
    with store.lock:
        session = store.get(session_id)
        if session is None:
            raise GraphError(f"live session '{session_id}' ended meanwhile.")
        if session.graph is not None and session.graph.prompt == graph.prompt and \
                session.graph.outputs == graph.outputs:
            return None                      # the same graph: nothing to run again
        session.graph = graph
        session.graph_version += 1
    return input_changed(store, session_id, "graph")


async def set_values(store: SessionStore, session_id: str, values) -> str | None:
    """Change values of the session's graph (validated by ComfyUI; a refusal keeps the last good graph) and
    queue the run that shows them; None when nothing changed."""
    session = store.get(session_id)
    if session is None or session.graph is None:
        raise GraphError("this session has no graph yet: hand it over first ({\"type\": \"graph\", \"prompt\": ...}).")
    current = session.graph
    prompt, changed = apply_values(current.prompt, values)
    if not changed:
        return None
    graph = await validate(prompt, session_id, current.extra_data, "the values")
    with store.lock:
        if session.graph is not current:
            raise GraphError("the graph was replaced while these values were being checked; send them again.")
        session.graph = graph
        session.graph_version += 1
    return input_changed(store, session_id, "values")


def recover(store: SessionStore) -> None:
    """Queue a run for each session whose input waits while its newest run vanished unrun (the queue was
    cleared, or the run deleted); a run that failed or was interrupted is left alone (the client decides)."""
    queue = _server().prompt_queue
    for session in store.sessions():
        with store.lock:
            run = session.last_run
            if run is None or session.graph is None or not session.unserved or not _vanished(run, queue):
                continue
            logging.info("comfy-turbo live: run %s of session %s vanished from the queue; queueing another", run,
                         session.id)
            _queue(store, session, "recovery")
