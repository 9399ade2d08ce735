"""A live session's graph: checking that it belongs to the session, and changing its values in place of
re-sending it. Pure dict work on ComfyUI's API prompt format, no ComfyUI import (ComfyUI's own
validation runs after, in ``live.runs``)."""
from __future__ import annotations

import copy

LIVE_INPUT, LIVE_OUTPUT = "TurboLiveInput", "TurboLiveOutput"
LIVE_NODE_TYPES = (LIVE_INPUT, LIVE_OUTPUT)
MAX_VALUES = 256                 # values one change may set


class GraphError(ValueError):
    """A graph or a change of values that the session refuses before ComfyUI validates it."""


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def check_live_graph(prompt, session_id: str) -> bool:
    """Refuse a graph that is not a session's: not an API prompt, no Turbo Live Output, or live nodes on
    another session. Returns whether it reads frames (has a Turbo Live Input)."""
    if not isinstance(prompt, dict) or not prompt or not all(
            isinstance(node, dict) and isinstance(node.get("class_type"), str)
            and isinstance(node.get("inputs", {}), dict) for node in prompt.values()):
        raise GraphError("the graph must be ComfyUI's API format: {node id: {\"class_type\": ..., \"inputs\": {...}}} "
                         "(the 'output' of app.graphToPrompt(), or a workflow saved with Export (API)).")
    live_nodes = {node_id: node for node_id, node in prompt.items() if node["class_type"] in LIVE_NODE_TYPES}
    if not any(node["class_type"] == LIVE_OUTPUT for node in live_nodes.values()):
        raise GraphError("the graph has no Turbo Live Output node: add one, so the session's pictures have "
                         "somewhere to go.")
    for node_id, node in live_nodes.items():
        named = (node.get("inputs") or {}).get("session")
        if named != session_id:
            raise GraphError(f"node {node_id} ({node['class_type']}) uses live session {str(named)[:70]!r}, but this "
                             f"is session '{session_id}': give the graph's Turbo Live nodes this session's name.")
    return any(node["class_type"] == LIVE_INPUT for node in live_nodes.values())


def apply_values(prompt: dict, values) -> tuple[dict, int]:
    """A copy of ``prompt`` with ``values`` ({node id: {input: value}}) set; (the copy, how many changed).

    Only an input that holds a value (a widget) may change, not a link, and the Turbo Live nodes' session
    stays; ComfyUI's validation then checks the values themselves."""
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise GraphError('values must be {"<node id>": {"<input name>": value, ...}, ...}.')
    if sum(len(v) for v in values.values()) > MAX_VALUES:
        raise GraphError(f"one change may set at most {MAX_VALUES} values; send the graph again instead.")
    changed_prompt, changed = copy.deepcopy(prompt), 0
    for node_id, inputs in values.items():
        node = changed_prompt.get(node_id)
        if node is None:
            raise GraphError(f"there is no node {str(node_id)[:40]!r} in the session's graph; send the graph again "
                             "if it changed.")
        node_inputs = node.setdefault("inputs", {})
        if not isinstance(node_inputs, dict):
            raise GraphError(f"node {node_id} has no inputs dict; send the graph again.")
        for name, value in inputs.items():
            if is_link(node_inputs.get(name)):
                raise GraphError(f"input {str(name)[:60]!r} of node {node_id} ({node['class_type']}) is a link, not a "
                                 "value; change the graph's links by sending the graph again.")
            if is_link(value):
                raise GraphError(f"the value for input {str(name)[:60]!r} of node {node_id} looks like a link "
                                 "([node id, output]); links change by sending the graph again.")
            if node["class_type"] in LIVE_NODE_TYPES and name == "session":
                raise GraphError("the Turbo Live nodes' session cannot change while live; open another session.")
            if node_inputs.get(name, _MISSING) != value:
                node_inputs[name] = value
                changed += 1
    return changed_prompt, changed


_MISSING = object()
