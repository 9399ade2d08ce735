"""The fleet (scale/): real ComfyUI workers behind a real RabbitMQ, loopback only, and its faults.

A private broker (scripts/local_rabbitmq.py, Debian's rabbitmq-server, installed when missing; its
max_message_size set low for the reply-size test) and two ``python -m scale.worker`` processes, each
starting its own ComfyUI (--cpu, the tiny SD-Turbo, one torch thread, and the test-only fault nodes of
tests/fixtures/fleet_nodes), each talking to the broker through its own cuttable TCP relay
(scripts/tcp_relay.py, on 127.0.0.2 / 127.0.0.3) for the partition tests, and the live gateway (HAProxy,
Debian's haproxy, installed when missing) in front of their ComfyUIs. One broker and these workers serve
the whole module; every wait is bounded; the fixtures kill what they started.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from workflow_utils import SD_TURBO, node_of, txt2img

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from comfy_host import free_port  # noqa: E402
from local_fleet import (WorkerProcess, ensure_debian_package, import_scale, live_session_homes,  # noqa: E402
                         running_on, wait_for_workers)
from tcp_relay import TcpRelay  # noqa: E402

import_scale()

JOB_SIZE = 64
HEARTBEAT_S = 3                     # AMQP heartbeats of the test workers and clients: a cut is seen in ~6 s
MAX_MESSAGE_SIZE = 256 * 1024       # the test broker's limit (RabbitMQ 3.10's default: 128 MiB)
FLEET_NODES = REPO / "tests" / "fixtures" / "fleet_nodes"


def new_worker(name, tmp_path_factory, model_files, broker_url, **kw) -> WorkerProcess:
    return WorkerProcess(name, tmp_path_factory.mktemp(f"worker-{name}"), broker_url, os.environ["COMFYUI_PATH"],
                         {"checkpoints": model_files[SD_TURBO]}, worker_args=["--heartbeat", str(HEARTBEAT_S)],
                         custom_nodes={"comfy_turbo_fleet_test_nodes": FLEET_NODES}, **kw)


def job(seed: int, text: str = "a lighthouse at dusk") -> dict:
    return txt2img(SD_TURBO, JOB_SIZE, JOB_SIZE, seed=seed, prefix="fleet/job", text=text)


def fault_prompt(seconds: float = 0.0, size: int = 64, noise: bool = False, seed: int = 0, crash: bool = False) -> dict:
    """A prompt of the test-only nodes: wait ``seconds`` (interruptible), then an image (or a crash)."""
    prompt = {"1": {"class_type": "ComfyTurboFleetTestImage",
                    "inputs": {"seconds": seconds, "size": size, "noise": noise, "seed": seed}},
              "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fleet/test"}}}
    if crash:
        prompt["2"] = {"class_type": "ComfyTurboFleetTestCrash", "inputs": {"image": ["1", 0]}}
        prompt["3"]["inputs"]["images"] = ["2", 0]
    return prompt


def comfy_post(url: str, path: str, payload: dict) -> dict:
    request = urllib.request.Request(url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def comfy_get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(interval)
    return value


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from local_rabbitmq import LocalRabbitMQ
    instance = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq"), max_message_size=MAX_MESSAGE_SIZE).start()
    yield instance
    instance.kill()


def relayed_url(broker, relay: TcpRelay) -> str:
    return f"amqp://guest:guest@{relay.url_host_port}//"


@pytest.fixture(scope="module")
def relays(broker):
    """One cuttable link per worker (and one for a partitioned client), each on its own 127.0.0.x."""
    made = {name: TcpRelay((f"127.0.0.{i}", 0), ("127.0.0.1", broker.port)).start()
            for i, name in ((2, "w1"), (3, "w2"), (4, "client"))}
    yield made
    for relay in made.values():
        relay.stop()


@pytest.fixture(scope="module")
def fleet(broker):
    from scale.client import Fleet
    client = Fleet(broker.url, heartbeat=HEARTBEAT_S)
    yield client
    client.close()


@pytest.fixture(scope="module")
def workers(broker, relays, fleet, tmp_path_factory, model_files):
    procs = {name: new_worker(name, tmp_path_factory, model_files, relayed_url(broker, relays[name]),
                              port=free_port()).start() for name in ("w1", "w2")}
    try:
        wait_for_workers(fleet, procs, procs.values())
        yield procs
    finally:
        for p in procs.values():
            p.kill()


@pytest.fixture(scope="module")
def attached(broker, fleet, tmp_path_factory, model_files):
    """w3: a worker attached (``--attach``) to a ComfyUI it did not start, which the tests stop and start."""
    from comfy_host import ComfyHost
    host = ComfyHost(tmp_path_factory.mktemp("attached-comfyui"), Path(os.environ["COMFYUI_PATH"]))
    host.install_model(model_files[SD_TURBO], "checkpoints")
    host.start()
    worker = WorkerProcess("w3", tmp_path_factory.mktemp("worker-w3"), broker.url, "", {}, attach=host.url,
                           worker_args=["--heartbeat", str(HEARTBEAT_S)])
    try:
        worker.start()
        wait_for_workers(fleet, ["w3"], [worker])
        yield host, worker
    finally:
        worker.kill()
        host.stop()


def serves(fleet, worker: str, seed: int) -> bool:
    reply = fleet.wait([fleet.submit(job(seed=seed), worker=worker)], timeout=180, raise_errors=True)
    return next(iter(reply.values()))["worker"] == worker


def test_same_seed_gives_the_same_png_bytes_on_every_worker(fleet, workers):
    ids = {name: fleet.submit(job(seed=1234), worker=name) for name in workers}
    replies = fleet.wait(ids.values(), timeout=180, raise_errors=True)
    by_worker = {name: replies[job_id] for name, job_id in ids.items()}
    assert {name: r["worker"] for name, r in by_worker.items()} == {"w1": "w1", "w2": "w2"}
    pngs = [r["images"][0]["png"] for r in by_worker.values()]
    assert pngs[0][:8] == b"\x89PNG\r\n\x1a\n" and pngs[0] == pngs[1]


def test_a_session_sticks_to_its_worker(fleet, workers):
    for chosen in ("w2", None):
        session = fleet.session(worker=chosen)
        assert session.worker in workers
        ids = [session.submit(job(seed=100 + i)) for i in range(5)]
        replies = fleet.wait(ids, timeout=180, raise_errors=True)
        assert {r["worker"] for r in replies.values()} == {session.worker}
        assert {r["session"] for r in replies.values()} == {session.id}


def test_an_invalid_workflow_reports_comfyuis_error_and_the_worker_keeps_serving(fleet, workers):
    broken = job(seed=5)
    del node_of(broken, "TurboSampler")["inputs"]["positive"]
    unknown = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    ids = [fleet.submit(broken, worker="w1"), fleet.submit(unknown, worker="w1"), fleet.submit(job(seed=6), worker="w1")]
    replies = fleet.wait(ids, timeout=180)
    missing_input, no_such_node, fine = (replies[i] for i in ids)
    assert missing_input["error"]["kind"] == "invalid_prompt"
    assert "Required input is missing" in missing_input["error"]["message"]
    assert "positive" in str(missing_input["error"]["comfyui"]["node_errors"])
    assert no_such_node["error"]["kind"] == "invalid_prompt" and "NoSuchNode" in no_such_node["error"]["message"]
    assert "error" not in fine and fine["images"] and workers["w1"].alive()


# --- faults (issue 21) -------------------------------------------------------------------------------

def test_a_reply_over_the_brokers_limit_is_a_small_error_and_the_job_is_not_run_again(broker, fleet, workers):
    big = fleet.submit(fault_prompt(size=512, noise=True), worker="w1")          # a ~790 kB PNG, ~1 MB in base64
    reply = fleet.wait([big], timeout=120)[big]
    error = reply["error"]
    assert error["kind"] == "reply_too_large" and error["limit"] == MAX_MESSAGE_SIZE
    assert error["size"] > MAX_MESSAGE_SIZE and f"{error['size']} bytes" in error["message"]
    assert f"max_message_size of {MAX_MESSAGE_SIZE} bytes" in error["message"] and "images" not in reply
    assert serves(fleet, "w1", seed=50)                  # the worker took the next job: the big one was acked
    fleet.drain(2)
    assert fleet.duplicates[big] == 0 and broker.queue_depth("comfy-turbo.worker.w1") == 0
    assert workers["w1"].log_tail(400).count(f"job {big}: the reply") == 1       # it ran once


def test_a_timed_out_job_is_cancelled_by_its_prompt_id_and_another_clients_prompt_survives(fleet, workers):
    w1 = workers["w1"]
    url = w1.comfyui_url
    # 1. Our job waits behind another client's prompt and times out: it leaves the queue, theirs finishes.
    theirs = comfy_post(url, "/prompt", {"prompt": fault_prompt(seconds=5, seed=1), "client_id": "someone-else"})
    wait_until(lambda: comfy_get(url, "/queue")["queue_running"], 30, "the other client's prompt to run")
    ours = fleet.submit(fault_prompt(seconds=30, seed=2), worker="w1", timeout=2)
    reply = fleet.wait([ours], timeout=60)[ours]
    assert reply["error"]["kind"] == "timeout" and "taken off" in reply["error"]["message"]
    done = wait_until(lambda: comfy_get(url, f"/history/{theirs['prompt_id']}"), 30, "their prompt")
    assert done[theirs["prompt_id"]]["status"]["status_str"] == "success"
    time.sleep(1)
    ran = [h for h in comfy_get(url, "/history").values() if h["prompt"][2].get("1", {}).get("inputs", {}).get("seed") == 2]
    assert not ran, "the timed-out job should have left the queue without running"
    # 2. Our job runs and times out while theirs waits: ours is interrupted by its id, theirs then runs.
    ours = fleet.submit(fault_prompt(seconds=30, seed=3), worker="w1", timeout=4)
    wait_until(lambda: comfy_get(url, "/queue")["queue_running"], 30, "our prompt to run")
    theirs = comfy_post(url, "/prompt", {"prompt": fault_prompt(seconds=0.5, seed=4), "client_id": "someone-else"})
    reply = fleet.wait([ours], timeout=60)[ours]
    assert reply["error"]["kind"] == "timeout"
    done = wait_until(lambda: comfy_get(url, f"/history/{theirs['prompt_id']}"), 30, "their second prompt")
    assert done[theirs["prompt_id"]]["status"]["status_str"] == "success"
    log = w1.comfyui_log()
    assert "Interrupting prompt" in log and "Global interrupt" not in log


def test_a_poison_job_is_dead_lettered_after_three_attempts_and_the_rest_flow(broker, fleet, workers):
    """A job that ends its ComfyUI, among 10 normal jobs over two workers: 10 delivered, one poison
    error after 3 attempts, one message in the dead-letter queue, and both workers still serving."""
    from scale.app import DEAD_LETTER_QUEUE
    normal = [fleet.submit(job(seed=600 + i)) for i in range(5)]
    poison = fleet.submit(fault_prompt(crash=True))
    normal += [fleet.submit(job(seed=610 + i)) for i in range(5)]
    replies = fleet.wait(normal + [poison], timeout=420)
    assert all("error" not in replies[j] and replies[j]["images"] for j in normal)
    error = replies[poison]["error"]
    assert error["kind"] == "poison" and error["attempts"] == 3 and replies[poison]["attempts"] == 3
    assert poison in error["message"] and DEAD_LETTER_QUEUE in error["message"]
    assert broker.queue_depth(DEAD_LETTER_QUEUE) == 1
    (dead,) = fleet.dead_letters()                        # read and left in place
    assert dead["id"] == poison and dead["attempts"] == 3 and broker.queue_depth(DEAD_LETTER_QUEUE) == 1
    assert all(w.alive() for w in workers.values())
    wait_for_workers(fleet, list(workers), workers.values())
    assert serves(fleet, "w1", seed=620) and serves(fleet, "w2", seed=621)
    restarts = sum(w.log_tail(2000).count("ComfyUI is back") for w in workers.values())
    assert restarts == 3, "the poison job should have ended a ComfyUI exactly three times, each started again"


def test_a_worker_cut_off_mid_job_loses_it_to_the_other_and_comes_back_by_itself(fleet, workers, relays):
    job_id = fleet.submit(fault_prompt(seconds=8, seed=70))
    cut = wait_until(lambda: running_on(workers), 60, "the job to start on a worker")
    other = "w2" if cut == "w1" else "w1"
    relays[cut].cut()
    try:
        started = time.monotonic()
        reply = fleet.wait([job_id], timeout=90)[job_id]
        assert "error" not in reply and reply["worker"] == other and reply["redelivered"]
        assert time.monotonic() - started < 60
    finally:
        relays[cut].restore()
    wait_until(lambda: cut in fleet.workers(timeout=1.0), 90, f"{cut} to reconnect after the cut")
    assert serves(fleet, cut, seed=71) and workers[cut].alive()
    # The cut worker's own late reply, if it sent one after the link came back, is dropped by job id.
    assert fleet.replies[job_id]["worker"] == other and fleet.duplicates[job_id] <= 1


def test_a_client_cut_off_notices_and_gets_its_replies_after_the_link_returns(broker, relays, workers):
    from scale.client import Fleet
    client = Fleet(relayed_url(broker, relays["client"]), heartbeat=HEARTBEAT_S)
    try:
        ids = [client.submit(job(seed=800 + i)) for i in range(3)]
        relays["client"].cut()
        try:
            with pytest.raises(TimeoutError):
                client.wait(ids, timeout=3 * HEARTBEAT_S)
            assert client.reconnects >= 1, "the client did not notice the partition (no heartbeats?)"
        finally:
            relays["client"].restore()
        replies = client.wait(ids, timeout=60)
        assert sorted(replies) == sorted(ids) and all(r["images"] for r in replies.values())
        assert not client.duplicates
    finally:
        client.close()


# --- live sessions through the gateway (issue 21, part 6) ---------------------------------------------

@pytest.fixture(scope="module")
def gateway(workers, tmp_path_factory):
    """HAProxy (scale/haproxy.cfg, by scale.gateway) in front of w1's and w2's ComfyUI."""
    from scale.gateway import Gateway
    ensure_debian_package("haproxy", "/usr/sbin/haproxy")
    instance = Gateway({name: f"127.0.0.1:{w.port}" for name, w in workers.items()},
                       bind=f"127.0.0.1:{free_port()}", workdir=tmp_path_factory.mktemp("gateway")).start()
    yield instance
    instance.stop()


def test_the_gateway_config_is_valid_haproxy_and_bad_backends_are_named():
    import subprocess

    from scale.gateway import TEMPLATE, GatewayError, haproxy_binary, main, parse_backend, render
    ensure_debian_package("haproxy", "/usr/sbin/haproxy")
    config = render(dict(parse_backend(b) for b in ("gpu0=10.0.0.5:8188", "10.0.0.6:8188")), "0.0.0.0:8190")
    assert "    bind 0.0.0.0:8190" in config and config.count("    server ") == 2
    assert "server gpu0 10.0.0.5:8188 check" in config and "server 10.0.0.6-8188 10.0.0.6:8188 check" in config
    for text in (TEMPLATE.read_text(), config):                 # the committed file, and one rendered from it
        check = subprocess.run([haproxy_binary(), "-c", "-f", "/dev/stdin"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
    for bad, message in (("gpu0=10.0.0.5", "is not HOST:PORT"), ("gpu 0=10.0.0.5:1", "backend name"),
                         ("gpu0=10.0.0.5:70000", "is not HOST:PORT"), ("gpu0=bad host:1", "is not HOST:PORT")):
        with pytest.raises(GatewayError, match=message):
            parse_backend(bad)
    with pytest.raises(GatewayError, match="at least one --backend"):
        render({})
    with pytest.raises(SystemExit):
        main(["print", "--backend", "a=1.2.3.4:1", "--backend", "a=1.2.3.4:2"])      # the same name twice


def test_the_fleet_cli_prints_the_gateway_config(capsys):
    from scale.client import main
    assert main(["gateway", "--bind", "127.0.0.1:9", "print", "--backend", "gpu0=[::1]:8188"]) == 0
    printed = capsys.readouterr().out
    assert "    bind 127.0.0.1:9" in printed and "    server gpu0 [::1]:8188 check" in printed


def live_frame(i: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_live_sessions_through_the_gateway_keep_to_one_worker_and_move_when_it_dies(fleet, workers, gateway):
    """Four live sessions through the gateway (scripts/live_client.py's ServerLoop): each one's frames, value
    change and pictures pass through one worker's ComfyUI, and the sessions spread over both. Then one
    session's ComfyUI is SIGKILLed: its sessions reattach through the gateway to the other worker within
    10 s and their loops go on; the other worker's sessions never move."""
    from live_client import LiveClient, ServerLoop, passthrough_graph
    sessions = [f"gateway-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)]
    loops = {s: ServerLoop(LiveClient(gateway.url, session=s).connect(), passthrough_graph(s), reattach_within=10)
             for s in sessions}
    try:
        for step in range(6):
            for s, loop in loops.items():
                loop.push_frame(live_frame(step))
                if step == 3:
                    loop.edit(passthrough_graph(s, quality=70))
                loop.pump(0.1)
        for loop in loops.values():
            loop.drain(60)
        homes = {s: live_session_homes(workers, s) for s in sessions}
        assert all(len(h) == 1 for h in homes.values()), f"a session should live on one worker: {homes}"
        for path in ("/queue", "/system_stats", "/interrupt", "/api/free", "/"):   # only the live client's routes pass
            with pytest.raises(urllib.error.HTTPError, match="403"):
                comfy_get(gateway.url, path)
        for s in sessions:                  # the pack's routes under ComfyUI's /api prefix stick to the session too
            assert comfy_get(gateway.url, f"/api/comfy-turbo/live/{s}")["attached"], s
        assert {h[0] for h in homes.values()} == {"w1", "w2"}, f"the sessions should spread: {homes}"
        for s, loop in loops.items():
            assert not loop.errors and not loop.refusals and not loop.reattachments, (loop.errors, loop.refusals)
            status = comfy_get(workers[homes[s][0]].comfyui_url, f"/comfy-turbo/live/{s}")
            assert status["attached"] and status["frames"]["received"] == 6
            value_runs = {run for run, reason in loop.reasons.items() if reason == "values"}
            assert value_runs and any(o.prompt_id in value_runs for o in loop.outputs), \
                "the value change's run should have sent its picture back through the same worker"
            assert status["frames"]["sent"] == len(loop.outputs) > 0

        victim = homes[sessions[0]][0]
        survivor = "w2" if victim == "w1" else "w1"
        moving = [s for s in sessions if homes[s] == [victim]]
        staying = [s for s in sessions if homes[s] == [survivor]]
        shown = {s: len(loops[s].outputs) for s in sessions}
        killed = workers[victim].kill_comfyui()
        assert len(killed) == 1, killed
        killed_at = time.perf_counter()
        step = 100

        def moved_and_showing(s: str) -> bool:
            loop = loops[s]
            return bool(loop.reattachments) and any(o.shown_at > loop.reattachments[0]["attached_at"]
                                                    for o in loop.outputs)

        while not all(moved_and_showing(s) for s in moving):
            assert time.perf_counter() - killed_at < 30, {s: (loops[s].reattachments, loops[s].errors) for s in moving}
            step += 1
            for loop in loops.values():
                loop.push_frame(live_frame(step))
                loop.pump(0.1)
        for s in moving:
            loop = loops[s]
            (move,) = loop.reattachments
            assert move["attached_at"] - killed_at < 10, f"{s} took {move['attached_at'] - killed_at:.1f} s to reattach"
            assert not loop.closed and live_session_homes(workers, s) == [survivor]
        for s in staying:
            loop = loops[s]
            assert not loop.reattachments and not loop.closed and len(loop.outputs) > shown[s]
            assert live_session_homes(workers, s) == [survivor]
    finally:
        for loop in loops.values():
            loop.client.close()
    # The worker starts its ComfyUI again, and serves jobs again.
    assert serves(fleet, victim, seed=75) and workers[victim].alive()


def test_killed_worker_loses_nothing(fleet, workers):
    """20 jobs; once both workers have delivered, SIGKILL w1's process group the moment it replies.

    w1 then holds one unacknowledged job: the one it just replied to (acknowledged only after the
    reply is out) or the next one. Either comes back from the broker to w2 (counted as an attempt and
    put back on the queue): a job run twice (its second reply dropped by the client) or a job finished
    only by w2.
    """
    ids = [fleet.submit(job(seed=1000 + i)) for i in range(20)]
    before_kill: set[str] = set()
    killed = [False]

    def on_reply(reply, done, total):
        if killed[0]:
            return
        before_kill.add(reply["worker"])
        if before_kill == {"w1", "w2"} and reply["worker"] == "w1":
            workers["w1"].kill()
            killed[0] = True

    replies = fleet.wait(ids, timeout=300, on_reply=on_reply)
    assert killed[0], "w1 never delivered while w2 did: the kill did not happen"
    assert before_kill == {"w1", "w2"}
    assert sorted(replies) == sorted(ids) and all("error" not in r for r in replies.values())
    assert all(r["images"] for r in replies.values())
    # The held job, if w1 had replied to it before the kill, runs again on w2 from the back of the queue
    # (a redelivery is republished with its attempt counted), so its repeat may come after the rest.
    deadline = time.monotonic() + 60
    while not (redelivered := [r for r in list(replies.values()) + fleet.repeats if r["redelivered"]]):
        assert time.monotonic() < deadline, "no job came back from the killed worker"
        fleet.drain(1)
    assert all(r["worker"] == "w2" for r in redelivered)
    # Each job once: the client kept the first reply per id; a repeat is only counted.
    assert all(fleet.duplicates[j] <= 1 for j in ids)


def test_a_worker_whose_comfyui_is_down_stops_taking_work(fleet, workers, attached):
    """w3's ComfyUI is down, w2 is healthy (w1 was killed above): 10 shared jobs are all delivered, all by
    w2, within what w2 alone needs for 10 plus a margin, and the job w3 may have held goes back."""
    host, worker = attached
    assert not workers["w1"].alive()
    start = time.monotonic()
    alone = [fleet.submit(job(seed=900 + i), worker="w2") for i in range(10)]
    fleet.wait(alone, timeout=300, raise_errors=True)
    w2_alone = time.monotonic() - start
    host.stop()
    try:
        start = time.monotonic()
        ids = [fleet.submit(job(seed=950 + i)) for i in range(10)]
        replies = fleet.wait(ids, timeout=300, raise_errors=True)
        took = time.monotonic() - start
        assert {r["worker"] for r in replies.values()} == {"w2"}
        assert took < w2_alone + 15, f"10 jobs took {took:.1f} s, w2 alone needs {w2_alone:.1f} s"
        assert "w3" not in fleet.workers() and worker.alive()
    finally:
        host.start()
    wait_until(lambda: "w3" in fleet.workers(timeout=1.0), 60, "w3 to take jobs again")


def test_queued_jobs_survive_a_broker_restart(broker, fleet, workers):
    """Jobs queued for the (dead) w1 wait on disk through a broker restart, then run when w1 comes back."""
    assert not workers["w1"].alive()
    ids = [fleet.submit(job(seed=2000 + i), worker="w1") for i in range(3)]
    broker.restart()
    workers["w1"].start()
    wait_for_workers(fleet, ["w1", "w2"], workers.values())
    replies = fleet.wait(ids, timeout=300, raise_errors=True)
    assert {r["worker"] for r in replies.values()} == {"w1"} and all(r["images"] for r in replies.values())
    # The surviving worker reconnected on its own and still serves.
    after = fleet.wait([fleet.submit(job(seed=3000), worker="w2")], timeout=180, raise_errors=True)
    assert next(iter(after.values()))["worker"] == "w2"


def test_a_job_waits_out_its_comfyuis_restart(fleet, attached):
    """A worker attached to a ComfyUI that goes down stops taking jobs; its own queue's job waits for
    ComfyUI to be back, then runs there."""
    host, worker = attached
    assert "w3" in fleet.workers()
    host.stop()
    wait_until(lambda: "w3" not in fleet.workers(timeout=1.0), 30, "w3 to stop consuming")
    job_id = fleet.submit(job(seed=4000), worker="w3")
    time.sleep(2 * HEARTBEAT_S)
    assert job_id not in fleet.replies and worker.alive()
    host.start()
    reply = fleet.wait([job_id], timeout=180, raise_errors=True)[job_id]
    assert reply["worker"] == "w3" and reply["images"]
    wait_until(lambda: "w3" in fleet.workers(timeout=1.0), 30, "w3 to take jobs again")
