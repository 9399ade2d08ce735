"""The fleet (scale/): two real ComfyUI workers behind a real RabbitMQ, loopback only.

A private broker (scripts/local_rabbitmq.py, Debian's rabbitmq-server, installed when missing) and two
``python -m scale.worker`` processes, each starting its own ComfyUI (--cpu, the tiny SD-Turbo, one
torch thread). Every wait is bounded; the fixtures kill what they started.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from workflow_utils import SD_TURBO, node_of, txt2img

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from local_fleet import WorkerProcess, import_scale, wait_for_workers  # noqa: E402

import_scale()

JOB_SIZE = 64


def new_worker(name, tmp_path_factory, model_files, broker_url) -> WorkerProcess:
    return WorkerProcess(name, tmp_path_factory.mktemp(f"worker-{name}"), broker_url, os.environ["COMFYUI_PATH"],
                         {"checkpoints": model_files[SD_TURBO]})


def job(seed: int, text: str = "a lighthouse at dusk") -> dict:
    return txt2img(SD_TURBO, JOB_SIZE, JOB_SIZE, seed=seed, prefix="fleet/job", text=text)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from local_rabbitmq import LocalRabbitMQ
    instance = LocalRabbitMQ(tmp_path_factory.mktemp("rabbitmq")).start()
    yield instance
    instance.kill()


@pytest.fixture(scope="module")
def fleet(broker):
    from scale.client import Fleet
    client = Fleet(broker.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def workers(broker, fleet, tmp_path_factory, model_files):
    procs = {name: new_worker(name, tmp_path_factory, model_files, broker.url).start() for name in ("w1", "w2")}
    try:
        wait_for_workers(fleet, procs, procs.values())
        yield procs
    finally:
        for p in procs.values():
            p.kill()


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


def test_killed_worker_loses_nothing(fleet, workers):
    """20 jobs; once both workers have delivered, SIGKILL w1's process group the moment it replies.

    w1 then holds one unacknowledged job: the one it just replied to (acknowledged only after the
    reply is out) or the next one. Either comes back from the broker to w2: a job run twice (its
    second reply dropped by the client) or a job finished only by w2.
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
    redelivered = [r for r in list(replies.values()) + fleet.repeats if r["redelivered"]]
    assert redelivered, "no job came back from the killed worker"
    assert all(r["worker"] == "w2" for r in redelivered)
    # Each job once: the client kept the first reply per id; a repeat is only counted.
    assert all(fleet.duplicates[j] <= 1 for j in ids)


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


def test_a_job_waits_out_its_comfyuis_restart(broker, fleet, tmp_path_factory, model_files):
    """A worker attached to a ComfyUI that goes down retries the job (backoff) until ComfyUI is back."""
    from comfy_host import ComfyHost
    host = ComfyHost(tmp_path_factory.mktemp("attached-comfyui"), Path(os.environ["COMFYUI_PATH"]))
    host.install_model(model_files[SD_TURBO], "checkpoints")
    host.start()
    attached = WorkerProcess("w3", tmp_path_factory.mktemp("worker-w3"), broker.url, "", {}, attach=host.url)
    try:
        attached.start()
        wait_for_workers(fleet, ["w3"], [attached])
        host.stop()
        job_id = fleet.submit(job(seed=4000), worker="w3")
        deadline = time.monotonic() + 60
        while "back on the queue (retry 1)" not in attached.log_tail(200):
            assert time.monotonic() < deadline, attached.log_tail()
            time.sleep(0.2)
        host.start()
        reply = fleet.wait([job_id], timeout=180, raise_errors=True)[job_id]
        assert reply["worker"] == "w3" and reply["retries"] >= 1 and reply["images"]
        assert attached.alive()
    finally:
        attached.kill()
        host.stop()
