"""The server-side live loop against a real ComfyUI server: the graph handed over once, values changed
without re-sending it, unchanged input queueing nothing, recovery when a run vanishes from the queue, and
the sessions' privacy (tokens, other clients' prompts, cross-origin requests, a peer that vanishes).

The graph is mostly Turbo Live Input -> Turbo Live Output (no model), so each run takes milliseconds; the
loop's behaviour on the tiny models is in tests/test_live_server.py.
"""
from __future__ import annotations

import copy
import json
import struct
import time
import uuid

import pytest
import requests
import websocket

from live_client import LiveClient, ServerLoop
from test_live_server import (encode, end_http_session, id_frame, live_twin, new_session, passthrough,
                              post_prompt_with_token, read_id, wait_for, webcam_like, _post_frame)


def run_status(host, prompt_id: str, timeout: float = 60.0) -> dict:
    """The history entry of a prompt once it has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entry = host.history(prompt_id)
        if entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.05)
    raise TimeoutError(prompt_id)


def wait_until_gone(host, session: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while requests.get(f"{host.url}/comfy-turbo/live/{session}", timeout=10).status_code != 404:
        assert time.monotonic() < deadline, f"session {session} is still open"
        time.sleep(0.1)


def error_of(entry: dict) -> str:
    return json.dumps([m for m in entry["status"]["messages"] if m[0] == "execution_error"])


@pytest.fixture
def echo(host):
    """A connected client looping the passthrough graph on a fresh session."""
    client = LiveClient(host.url, new_session()).connect()
    loop = ServerLoop(client, passthrough(client.session))
    yield loop
    client.close()


# --- the loop -------------------------------------------------------------------------------------

def test_values_change_without_resending_the_graph_and_a_refused_one_keeps_the_last_good_graph(host, echo):
    loop = echo
    loop.push_frame(encode(id_frame(1, 64)))
    wait_for(loop, lambda: loop.outputs)
    assert loop.outputs[-1].metadata["image_type"] == "image/jpeg"
    # A value changed while live: only it goes ("set"), and the very next output shows it, same frame.
    webp = copy.deepcopy(loop.prompt)
    webp["2"]["inputs"]["format"] = "webp"
    loop.edit(webp)
    wait_for(loop, lambda: len(loop.outputs) == 2 and loop.settled())
    assert loop.reasons[loop.prompts[-1]] == "values"
    assert loop.outputs[-1].metadata["image_type"] == "image/webp" and loop.outputs[-1].frame_id == 1
    # An invalid value: ComfyUI's own validation error, and the loop goes on with the last good graph.
    bad = copy.deepcopy(webp)
    bad["2"]["inputs"]["quality"] = 500
    loop.edit(bad)
    wait_for(loop, lambda: loop.refusals and loop.settled())
    refusal = loop.refusals[-1]
    assert refusal["request"] == "set" and "Value 500 bigger than max of 100 (quality)" in refusal["message"]
    assert "2" in refusal["node_errors"]
    loop.push_frame(encode(id_frame(2, 64)))
    wait_for(loop, lambda: loop.outputs[-1].frame_id == 2)
    assert loop.outputs[-1].metadata["image_type"] == "image/webp" and read_id(loop.outputs[-1].image) == 2
    assert host.history(loop.prompts[-1])["prompt"][2]["2"]["inputs"]["quality"] == 90   # not 500
    # A link cannot be set, nor a node that is not there; the session's name cannot change.
    for values, message in [({"2": {"quality": ["9", 0]}}, "looks like a link"),
                            ({"2": {"images": "x"}}, "is a link, not a value"),
                            ({"99": {"seed": 1}}, "there is no node '99'"),
                            ({"1": {"session": "other"}}, "session cannot change")]:
        loop.client.command({"type": "set", "values": values})
        loop._answers_due += 1
        wait_for(loop, loop.settled)
        assert message in loop.refusals[-1]["message"], (values, loop.refusals[-1])
    assert not loop.errors


def test_an_unchanged_input_queues_nothing(host, echo):
    loop = echo
    loop.push_frame(encode(id_frame(1, 64)))
    wait_for(loop, lambda: loop.outputs and loop.settled())
    runs = len(loop.prompts)
    loop.edit(copy.deepcopy(loop.prompt))                   # the same graph: nothing is sent
    loop.client.command({"type": "set", "values": {"2": {"quality": 90}}})     # the value it already has
    loop.client.command({"type": "graph", "prompt": loop.prompt})              # the same graph again
    loop._answers_due += 2
    loop.pump(1.5)
    assert loop.settled() and len(loop.prompts) == runs and len(loop.outputs) == 1
    assert loop.refusals == []


def test_the_heap_is_frozen_out_of_comfyuis_collections_while_a_session_is_open(host):
    """live.heap: ComfyUI's gc.collect() between prompts walks only what a live session made, not the ~400k
    objects of torch and ComfyUI; the server hands them back to the collector when the last session ends."""
    client = LiveClient(host.url, new_session()).connect()
    loop = ServerLoop(client, passthrough(client.session))
    try:
        loop.push_frame(encode(id_frame(1, 64)))
        wait_for(loop, lambda: loop.outputs and loop.settled())
        assert host.get_json("/comfy-turbo/live")["gc_frozen"] is True
    finally:
        client.close()
    wait_until_gone(host, client.session)
    status = host.get_json("/comfy-turbo/live")
    assert status["gc_frozen"] is (status["sessions"] > 0)       # other tests' HTTP sessions may linger


def test_a_graph_that_is_not_the_sessions_is_refused(host, echo):
    loop = echo
    for prompt, message in [(passthrough("someone-else"), "uses live session 'someone-else'"),
                            ({"1": passthrough(loop.client.session)["1"]}, "has no Turbo Live Output"),
                            ([1, 2], "API format"),
                            ({"1": {"class_type": "NoSuchNode", "inputs": {}},
                              **{"2": passthrough(loop.client.session)["2"]}}, "ComfyUI refused the graph")]:
        loop.client.command({"type": "graph", "prompt": prompt})
        loop._answers_due += 1
        wait_for(loop, loop.settled)
        assert loop.refusals[-1]["request"] == "graph" and message in loop.refusals[-1]["message"], loop.refusals[-1]
    loop.push_frame(encode(id_frame(3, 64)))                 # the first graph still runs
    wait_for(loop, lambda: loop.outputs and loop.outputs[-1].frame_id == 1)
    assert read_id(loop.outputs[-1].image) == 3


def test_the_loop_recovers_when_its_waiting_run_is_removed_from_the_queue(host, user_models):
    """Someone clears ComfyUI's queue while a run waits: the frame it was to read is run anyway, by a run
    the server queues itself once it sees the waiting one gone."""
    session = new_session()
    cleared = 0
    with LiveClient(host.url, session) as client:
        loop = ServerLoop(client, live_twin("turbo_live_webcam", session, size=192))
        loop.push_frame(encode(webcam_like(1, 192)))
        wait_for(loop, lambda: loop.outputs, timeout=300)            # models loaded
        for attempt in range(8):
            running = loop.push_frame(encode(webcam_like(10 + attempt, 192)))
            wait_for(loop, lambda: running in loop.taken.values(), timeout=120)     # a run executes with it
            newest = loop.push_frame(encode(webcam_like(30 + attempt, 192)))
            wait_for(loop, lambda: loop.acks and loop.acks[-1]["frame_id"] == newest)   # its run is queued
            waiting = loop.acks[-1]["prompt_id"]     # the run the frame queued
            assert requests.post(f"{host.url}/queue", json={"clear": True}, timeout=10).status_code == 200
            wait_for(loop, lambda: loop.outputs[-1].frame_id == newest, timeout=120)
            if host.history(waiting) == {}:          # it still waited when the queue was cleared: it never ran,
                assert loop.reasons[loop.outputs[-1].prompt_id] == "recovery"    # and another run read the frame
                cleared += 1
                if cleared == 2:
                    break
    assert cleared >= 1, "the waiting run was never caught in the queue"
    assert not loop.errors


def test_pictures_respect_the_clients_preview_metadata_flag(host):
    """A ComfyUI client that did not announce supports_preview_metadata gets type 1 (a JPEG) instead of 4."""
    session = new_session()
    client = LiveClient(host.url, session).connect(preview_metadata=False)
    try:
        client.command({"type": "graph", "prompt": passthrough(session)})
        client.send_frame(encode(id_frame(9, 64)), 1)
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline
            binary = [m for source, m, _ in client.receive(1.0) if source == "comfy" and isinstance(m, bytes)]
            if binary:
                break
        event, image_format = struct.unpack_from(">II", binary[0])
        assert (event, image_format) == (1, 1) and read_id(binary[0][8:]) == 9
    finally:
        client.close()


# --- privacy -----------------------------------------------------------------------------------------

def test_a_session_is_private_to_its_token(host, echo):
    loop = echo
    session, token = loop.client.session, loop.client.token
    loop.push_frame(encode(id_frame(1, 64)))
    wait_for(loop, lambda: loop.outputs and loop.settled())
    # Frames, graph, values and DELETE over HTTP need the token.
    for wrong in (None, "guess"):
        assert _post_frame(host, session, encode(id_frame(2, 64)), wrong).status_code == 403
        for route, body in (("graph", {"prompt": passthrough(session)}), ("values", {"values": {"2": {"quality": 5}}})):
            response = requests.post(f"{host.url}/comfy-turbo/live/{session}/{route}", json=body, timeout=10,
                                     headers={"X-Turbo-Live-Token": wrong} if wrong else {})
            assert response.status_code == 403 and "belongs to another client" in response.json()["error"]["message"]
        response = requests.delete(f"{host.url}/comfy-turbo/live/{session}", timeout=10,
                                   headers={"X-Turbo-Live-Token": wrong} if wrong else {})
        assert response.status_code == 403
    # The status tells nobody the owner's client id (which would let them take over its /ws) or the token.
    status = host.get_json(f"/comfy-turbo/live/{session}")
    assert loop.client.client_id not in json.dumps(status) and token not in json.dumps(status)
    # With the token, the owner's HTTP push is a frame of the loop like any other.
    ack = _post_frame(host, session, encode(id_frame(4, 64)), token).json()
    assert ack["accepted"] and "token" not in ack
    wait_for(loop, lambda: read_id(loop.outputs[-1].image) == 4)
    # Another client's prompt may not read the session's frames, not even the session's own graph out of
    # ComfyUI's cache, nor send pictures to the session's owner.
    outsider = uuid.uuid4().hex
    for prompt in (passthrough(session), {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": passthrough(session)["2"]}):
        entry = run_status(host, post_prompt_with_token(host, prompt, None, client_id=outsider))
        assert "not a run of live session" in error_of(entry), entry["status"]
    entry = run_status(host, post_prompt_with_token(host, passthrough(session), "guess", client_id=outsider))
    assert "not a run of live session" in error_of(entry)
    # Nor by passing for a run: reusing a run's prompt id (ComfyUI mints a new one), or replaying a run's
    # prompt from /history with its fingerprints (they are dropped; the frame key is never taken on trust).
    run = loop.prompts[-1]
    replayed = copy.deepcopy(host.history(run)["prompt"][2])
    for node in replayed.values():        # a forged frame key: the form is no secret
        node["is_changed"] = [f"{session}#1.1"]
    response = requests.post(f"{host.url}/prompt", timeout=30, json={"prompt": replayed, "prompt_id": run,
                                                                     "client_id": outsider})
    assert response.status_code == 200 and response.json()["prompt_id"] != run
    entry = run_status(host, response.json()["prompt_id"])
    assert "not a run of live session" in error_of(entry)
    assert not any("is_changed" in node for node in entry["prompt"][2].values())
    # The runs' client id shows nowhere (with it, anyone could take over the owner's /ws and its pictures).
    assert loop.client.client_id not in json.dumps(host.history(run))
    # The token never lands in ComfyUI's queue or history, where anyone can read them.
    mine = post_prompt_with_token(host, passthrough(session), token, client_id=loop.client.client_id)
    entry = run_status(host, mine)
    assert entry["status"]["status_str"] == "success" and token not in json.dumps(entry)
    assert token not in json.dumps(host.get_json("/history"))
    loop.pump(0.5)
    assert not loop.errors


def test_a_session_fed_over_http_is_taken_over_only_with_its_token(host):
    session = new_session()
    token = _post_frame(host, session, encode(id_frame(1, 64))).json()["token"]
    stranger = LiveClient(host.url, session)
    ws = stranger.open_live_socket()
    try:
        reply = json.loads(ws.recv())
        assert reply["status"] == 403 and "belongs to another client" in reply["message"]
    finally:
        ws.close()
    # The graph over HTTP: the owner's loop runs with no websocket of the pack at all.
    comfy = websocket.create_connection(f"ws://127.0.0.1:{host.port}/ws?clientId={stranger.client_id}")
    try:
        comfy.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        answer = requests.post(f"{host.url}/comfy-turbo/live/{session}/graph", timeout=30,
                               headers={"X-Turbo-Live-Token": token},
                               json={"prompt": passthrough(session), "client_id": stranger.client_id}).json()
        assert answer["accepted"] and answer["prompt_id"]
        comfy.settimeout(30)
        while not isinstance(message := comfy.recv(), bytes):
            pass
        assert read_id(message[8 + struct.unpack_from(">I", message, 4)[0]:]) == 1
        values = requests.post(f"{host.url}/comfy-turbo/live/{session}/values", timeout=30,
                               headers={"X-Turbo-Live-Token": token}, json={"values": {"2": {"quality": 60}}}).json()
        assert values["accepted"] and values["prompt_id"]
    finally:
        comfy.close()
    owner = LiveClient(host.url, session)
    ws = owner.open_live_socket(token=token)               # with the token, a websocket takes it over
    try:
        attached = json.loads(ws.recv())
        assert attached["type"] == "attached" and attached["token"] != token
    finally:
        ws.close()
    wait_until_gone(host, session)


def test_cross_origin_requests_are_refused_as_comfyui_refuses_them(host):
    session = new_session()
    evil = {"Origin": "http://evil.example:8188"}
    response = requests.post(f"{host.url}/comfy-turbo/live/{session}/frame", data=encode(id_frame(1, 64)),
                             headers=evil, timeout=10)
    assert response.status_code == 403
    assert requests.post(f"{host.url}/prompt", json={"prompt": {}}, headers=evil, timeout=10).status_code == 403
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{host.port}/comfy-turbo/live/{session}/ws?clientId=x",
                                    origin=evil["Origin"], timeout=10)
    assert refused.value.status_code == 403
    assert requests.get(f"{host.url}/comfy-turbo/live/{session}", timeout=10).status_code == 404   # none opened
    same = {"Origin": f"http://127.0.0.1:{host.port}"}
    ok = requests.post(f"{host.url}/comfy-turbo/live/{session}/frame", data=encode(id_frame(1, 64)), headers=same,
                       timeout=10)
    assert ok.status_code == 200
    assert end_http_session(host, session, ok.json()["token"])


def test_a_client_that_vanishes_without_closing_frees_its_session_within_30_s(host):
    """The live websocket's heartbeat: a peer that stops answering (here: never reads again, so it never
    answers a ping) is dropped, and its session with it, so it blocks neither the name nor the limit."""
    session = new_session()
    ws = websocket.create_connection(f"ws://127.0.0.1:{host.port}/comfy-turbo/live/{session}/ws?clientId=gone")
    assert json.loads(ws.recv())["type"] == "attached"
    start = time.monotonic()
    try:
        while requests.get(f"{host.url}/comfy-turbo/live/{session}", timeout=10).status_code == 200:
            assert time.monotonic() - start < 30, "the vanished client still holds its session"
            time.sleep(0.5)
    finally:
        if ws.sock is not None:
            ws.sock.close()
    print(f"\nsession freed {time.monotonic() - start:.1f} s after its client went silent")
    with LiveClient(host.url, session) as again:         # the name is free again
        assert again.token
