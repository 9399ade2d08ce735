#!/usr/bin/env python3
"""The fleet on this machine: throughput with 1 and 2 workers, the queue's overhead per prompt, the time
to recover from each fault, and what the live gateway adds per frame.

    bash bench/scale.sh                         # tiny SD-Turbo, 64x64, 20 jobs per measurement
    bash bench/scale.sh --page docs/scale.md    # and write the figures into docs/scale.md
    python bench/scale_bench.py --render bench/results/scale/cpu-amd-epyc.json --page docs/scale.md
                                                # no run: re-render a results file's .md and the page

A private RabbitMQ (scripts/local_rabbitmq.py) and two workers (``python -m scale.worker``, each with
its own ComfyUI, --cpu, one torch thread), all on 127.0.0.1. The job is the shipped
``turbo_txt2img_sd`` workflow on the tiny SD-Turbo fixture, saved as PNG and fetched, as a fleet
client gets it.

* Overhead: one job at a time, alternating a direct ``/prompt`` to w1's ComfyUI (queue, wait, fetch
  the PNG: what a worker itself does) with the same job through the broker to w1 (publish, worker,
  reply message, base64 PNG). The difference of the medians is what the queue adds per prompt.
* Throughput: ``--jobs`` jobs submitted at once, to w1 only (one worker) or to the shared queue (two
  workers), rounds alternating; jobs per second from the first submit to the last reply.
* Recovery (``--fault-rounds`` per fault): a job that waits ``FAULT_JOB_S`` seconds (the tests' fault
  node) goes to the shared queue; once it runs on a worker, that worker gets the fault: its ComfyUI
  SIGKILLed (the worker starts it again), its link to the broker cut (scripts/tcp_relay.py: nothing
  passes, nothing is closed; AMQP heartbeats at the default 10 s), or the worker's whole process group
  SIGKILLed (then started again). Recovery is the seconds from the fault to that job's reply, which the
  other worker sends after running it again; less the job's own run, it is the fleet's detection and
  handover. Each worker's link goes through a relay, in every phase.
* Live gateway: one live session (a pass-through graph, 256x256 JPEG frames) sends a frame, waits for
  its picture, and sends the next, in blocks alternating between w1's ComfyUI directly and a gateway
  (scale/haproxy.cfg, HAProxy) in front of w1 alone; the gateway's cost per frame is the difference of
  the median round trips. Then, per fault round, a session through a gateway in front of both workers
  has its ComfyUI SIGKILLed: seconds to its next picture, from the other worker.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "scripts"))
import models as bench_models  # noqa: E402
import report  # noqa: E402
from run import summary_ms  # noqa: E402  (the executor bench's median / p10 / p90)
from local_fleet import (WorkerProcess, ensure_debian_package, import_scale, live_session_homes,  # noqa: E402
                         running_on, wait_for_workers)
from local_rabbitmq import LocalRabbitMQ, free_port  # noqa: E402
from tcp_relay import TcpRelay  # noqa: E402

import_scale()
from scale.client import Fleet  # noqa: E402
from scale.comfy import ComfyClient  # noqa: E402
from scale import workflow as fleet_workflow  # noqa: E402

PAGE_START, PAGE_END = "<!-- scale-figures:start -->", "<!-- scale-figures:end -->"
MD_HEADER = "# comfy-turbo fleet benchmark\n\n"
WORKFLOW = REPO / "workflows" / "api" / "turbo_txt2img_sd_api.json"
FLEET_NODES = REPO / "tests" / "fixtures" / "fleet_nodes"     # the fault tests' nodes: a job that waits
FAULT_JOB_S = 3.0


def job_prompt(seed: int, size: int) -> dict:
    prompt = fleet_workflow.apply_overrides(fleet_workflow.load(WORKFLOW), seed=seed, width=size, height=size)
    for node in prompt.values():
        if node["class_type"] == "TurboCheckpointLoader":
            node["inputs"]["ckpt_name"] = bench_models.MODEL_SETS["tiny"]["sd-turbo"]
        if node["class_type"] == "SaveImage":
            node["inputs"]["filename_prefix"] = "fleet-bench/job"
    return prompt


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def measure(args, log) -> dict:
    comfyui = os.environ["COMFYUI_PATH"]
    models = bench_models.ensure("tiny", ["sd-turbo"], comfyui)
    checkpoint = models / "checkpoints" / bench_models.MODEL_SETS["tiny"]["sd-turbo"]
    tmp = Path(tempfile.mkdtemp(prefix="comfy-turbo-scale-bench-"))
    broker = LocalRabbitMQ(tmp / "rabbitmq").start()
    relays = {name: TcpRelay((f"127.0.0.{i}", 0), ("127.0.0.1", broker.port)).start()
              for i, name in ((2, "w1"), (3, "w2"))}
    workers = {name: WorkerProcess(name, tmp / name, f"amqp://guest:guest@{relays[name].url_host_port}//", comfyui,
                                   {"checkpoints": checkpoint}, port=free_port(),
                                   custom_nodes={"comfy_turbo_fleet_test_nodes": FLEET_NODES}) for name in ("w1", "w2")}
    port = workers["w1"].port
    fleet = None
    try:
        for w in workers.values():
            (tmp / w.name).mkdir(exist_ok=True)
            w.start()
        fleet = Fleet(broker.url)
        wait_for_workers(fleet, workers, workers.values())
        log("broker and two workers up")
        seed = [0]

        def next_job():
            seed[0] += 1
            return job_prompt(seed[0], args.size)

        for name in workers:                                  # warm-up: load the model in both
            fleet.wait([fleet.submit(next_job(), worker=name) for _ in range(3)], timeout=300, raise_errors=True)
        direct_client = ComfyClient(f"http://127.0.0.1:{port}")
        direct, queued = [], []
        for _ in range(args.jobs):
            start = time.perf_counter()
            direct_client.run(next_job())
            direct.append(time.perf_counter() - start)
            start = time.perf_counter()
            fleet.wait([fleet.submit(next_job(), worker="w1")], timeout=300, raise_errors=True)
            queued.append(time.perf_counter() - start)
        log(f"one at a time: direct {statistics.median(direct) * 1000:.0f} ms, "
            f"queued {statistics.median(queued) * 1000:.0f} ms")

        throughput = {"1": [], "2": []}
        for r in range(args.rounds * 2):
            n_workers = "1" if r % 2 == 0 else "2"
            start = time.perf_counter()
            ids = [fleet.submit(next_job(), worker="w1" if n_workers == "1" else None) for _ in range(args.jobs)]
            replies = fleet.wait(ids, timeout=600, raise_errors=True)
            throughput[n_workers].append(args.jobs / (time.perf_counter() - start))
            used = sorted({rep["worker"] for rep in replies.values()})
            log(f"{n_workers} worker(s): {throughput[n_workers][-1]:.2f} jobs/s on {used}")
        gateway = measure_gateway(args, fleet, workers, tmp, log)
        recovery = measure_recovery(args, fleet, workers, relays, log)
        return {
            "recovery": recovery, "gateway": gateway, "fault_job_s": FAULT_JOB_S,
            "direct_ms": summary_ms(direct), "queued_ms": summary_ms(queued),
            "overhead_ms": (statistics.median(queued) - statistics.median(direct)) * 1000,
            "throughput": {k: {"runs": v, "median": statistics.median(v)} for k, v in throughput.items()},
            "ratio_2_vs_1": statistics.median(throughput["2"]) / statistics.median(throughput["1"]),
        }
    finally:
        if fleet is not None:
            fleet.close()
        for w in workers.values():
            w.kill()
        for relay in relays.values():
            relay.stop()
        broker.kill()


def fault_job(seed: int) -> dict:
    return {"1": {"class_type": "ComfyTurboFleetTestImage",
                  "inputs": {"seconds": FAULT_JOB_S, "size": 64, "noise": False, "seed": seed}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "fleet-bench/fault"}}}


def settle(fleet, workers, size: int, timeout: float = 300.0) -> None:
    """Until both workers' ComfyUIs answer, both workers consume, and each has run a job (its model loaded)."""
    from scale.worker import wait_ready
    for w in workers.values():
        wait_ready(ComfyClient(w.comfyui_url), None, timeout)
    time.sleep(3)                          # the health checks resume the consumers (two polls)
    wait_for_workers(fleet, workers, workers.values())
    for name in workers:
        fleet.wait([fleet.submit(job_prompt(random_seed(), size), worker=name)], timeout=300, raise_errors=True)


def random_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")


def live_move(gateway, workers, frames) -> float:
    """A session through the gateway; its ComfyUI SIGKILLed: seconds until its first picture after that."""
    import uuid

    from live_client import LiveClient, ServerLoop, passthrough_graph
    session = f"bench-move-{uuid.uuid4().hex[:8]}"
    loop = ServerLoop(LiveClient(gateway.url, session=session).connect(), passthrough_graph(session),
                      reattach_within=10)
    try:
        loop.drain(60)
        homes = live_session_homes(workers, session)
        if not homes:
            raise RuntimeError(f"no worker's ComfyUI has the session {session}")
        workers[homes[0]].kill_comfyui()
        killed = time.perf_counter()
        i = 0
        while not (loop.reattachments and loop.outputs and loop.outputs[-1].shown_at > killed):
            if time.perf_counter() - killed > 30 or loop.closed:
                raise RuntimeError(f"the session did not come back through the gateway: {loop.errors}")
            i += 1
            loop.push_frame(frames[i % len(frames)])
            loop.pump(0.05)
        return loop.outputs[-1].shown_at - killed
    finally:
        loop.client.close()


def measure_recovery(args, fleet, workers, relays, log) -> dict:
    """Seconds from a fault on the worker running a job to that job's reply (see the module's docstring)."""
    results = {"comfyui_outage": [], "partition": [], "worker_kill": []}
    by_other = {fault: [] for fault in results}           # whether the other worker delivered the job
    seed = 10_000
    for fault in results:
        for _ in range(args.fault_rounds):
            seed += 1
            job_id = fleet.submit(fault_job(seed))
            deadline = time.monotonic() + 120
            while (victim := running_on(workers)) is None:
                if time.monotonic() > deadline:
                    raise TimeoutError("the fault job did not start on a worker")
                time.sleep(0.05)
            time.sleep(0.5)                       # mid-job
            started = time.perf_counter()
            if fault == "comfyui_outage":
                workers[victim].kill_comfyui()
            elif fault == "partition":
                relays[victim].cut()
            else:
                workers[victim].kill()
            reply = fleet.wait([job_id], timeout=300, raise_errors=True)[job_id]
            seconds = time.perf_counter() - started
            by_other[fault].append(reply["worker"] != victim)
            if fault == "partition":
                relays[victim].restore()
            elif fault == "worker_kill":
                workers[victim].start()
            results[fault].append(seconds)
            log(f"{fault} on {victim}: job delivered by {reply['worker']} {seconds:.1f} s after the fault")
            settle(fleet, workers, args.size)
    return {fault: {"runs": runs, "median": statistics.median(runs), "by_other_worker": by_other[fault]}
            for fault, runs in results.items()}


def measure_gateway(args, fleet, workers, tmp, log) -> dict:
    """Round trips of one live frame, directly to w1's ComfyUI and through the gateway, in alternating blocks;
    then, per fault round, the seconds from SIGKILLing a gateway session's ComfyUI to its first picture from
    the other worker (``ServerLoop(reattach_within=10)``)."""
    import io
    import uuid

    from PIL import Image
    from live_client import LiveClient, ServerLoop, passthrough_graph
    from scale.gateway import Gateway
    ensure_debian_package("haproxy", "/usr/sbin/haproxy")
    frames = []
    for i in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (256, 256), (i * 15, 255 - i * 15, 128)).save(buffer, "JPEG", quality=90)
        frames.append(buffer.getvalue())
    timings = {"direct": [], "gateway": []}
    moves = []

    gateway = Gateway({"w1": f"127.0.0.1:{workers['w1'].port}"}, bind=f"127.0.0.1:{free_port()}",
                      workdir=tmp / "gateway-w1").start()
    both = None
    try:
        for block in range(args.live_blocks * 2):
            route = "direct" if block % 2 == 0 else "gateway"
            session = f"bench-{uuid.uuid4().hex[:8]}"
            client = LiveClient(workers["w1"].comfyui_url if route == "direct" else gateway.url, session=session)
            loop = ServerLoop(client.connect(), passthrough_graph(session))
            try:
                loop.drain(60)
                for i in range(args.live_frames + 3):
                    shown = len(loop.outputs)
                    sent = time.perf_counter()
                    loop.push_frame(frames[i % len(frames)])
                    loop.pump(30, until=lambda: len(loop.outputs) > shown or loop.closed)
                    if loop.closed or len(loop.outputs) == shown:
                        raise RuntimeError(f"the live loop ({route}) stopped: {loop.errors}")
                    if i >= 3:                                     # the first frames warm the session up
                        timings[route].append(loop.outputs[-1].shown_at - sent)
            finally:
                client.close()
        log(f"live frame round trip: direct {statistics.median(timings['direct']) * 1000:.2f} ms, "
            f"gateway {statistics.median(timings['gateway']) * 1000:.2f} ms")
        both = Gateway({name: f"127.0.0.1:{w.port}" for name, w in workers.items()}, bind=f"127.0.0.1:{free_port()}",
                       workdir=tmp / "gateway").start()
        time.sleep(3)                       # both servers through their first health checks
        for _ in range(args.fault_rounds):
            moves.append(live_move(both, workers, frames))
            log(f"a live session's ComfyUI killed: its next picture, from the other worker, "
                f"{moves[-1]:.2f} s after the kill")
            settle(fleet, workers, args.size)
    finally:
        gateway.stop()
        if both is not None:
            both.stop()
    return {"move_s": {"runs": moves, "median": statistics.median(moves)} if moves else None,"direct_ms": summary_ms(timings["direct"]), "gateway_ms": summary_ms(timings["gateway"]),
            "added_ms": (statistics.median(timings["gateway"]) - statistics.median(timings["direct"])) * 1000,
            "frames": len(timings["direct"])}


def markdown(results: dict) -> str:
    m = results["measured"]
    t = m["throughput"]
    return "\n".join([
        f"Measured {results['date']} on {results['device_name']} ({results['cpus']} cores) at commit "
        f"{results['commit']} (`{results['command']}`): RabbitMQ {results['rabbitmq']}, Celery {results['celery']}, "
        f"the tiny SD-Turbo at {results['size']}², {results['jobs']} jobs per measurement.", "",
        "| measure | value |", "|---|---|",
        f"| one job, direct `/prompt` to a worker's ComfyUI (queue, wait, fetch the PNG), median (p10–p90) | "
        f"{m['direct_ms']['median']:.0f} ms ({m['direct_ms']['p10']:.0f}–{m['direct_ms']['p90']:.0f}) |",
        f"| one job through the broker to that worker (reply message with the PNG), median (p10–p90) | "
        f"{m['queued_ms']['median']:.0f} ms ({m['queued_ms']['p10']:.0f}–{m['queued_ms']['p90']:.0f}) |",
        f"| **queue overhead per job** (difference of the medians) | **{m['overhead_ms']:+.0f} ms**"
        + (" (smaller than the jobs' own spread: not measurable here)"
           if abs(m["overhead_ms"]) < (m["direct_ms"]["p90"] - m["direct_ms"]["p10"]) / 2 else "") + " |",
        f"| throughput, 1 worker | {t['1']['median']:.2f} jobs/s |",
        f"| throughput, 2 workers | {t['2']['median']:.2f} jobs/s |",
        f"| **2 workers / 1 worker** | **{m['ratio_2_vs_1']:.2f}×** |", "",
        "Two workers share this machine's cores (one torch thread each), so the ratio shows the fleet's "
        "own cost more than a GPU fleet's scaling, where each worker has its own device.", "",
        *recovery_markdown(m), *gateway_markdown(m)])


FAULT_NAMES = {"comfyui_outage": "the worker's ComfyUI SIGKILLed (the worker starts it again)",
               "partition": "the worker's link to the broker cut (heartbeat 10 s)",
               "worker_kill": "the worker's process group SIGKILLed"}


def recovery_markdown(m: dict) -> list[str]:
    if "recovery" not in m:
        return []
    job = m["fault_job_s"]
    rows = [f"Recovery: a {job:.0f} s job is running on a worker when that worker gets the fault; seconds from "
            "the fault until the other worker has run the job again and its reply is in, median "
            f"({', '.join(str(len(v['runs'])) for v in m['recovery'].values())} rounds):", "",
            "| fault | fault → reply | less the job's own run |", "|---|---|---|"]
    for fault, r in m["recovery"].items():
        by_self = len(r.get("by_other_worker", [])) - sum(r.get("by_other_worker", []))
        note = f" ({by_self} of the rounds' jobs came back from the faulted worker itself)" if by_self else ""
        rows.append(f"| {FAULT_NAMES[fault]} | {r['median']:.1f} s ({', '.join(f'{x:.1f}' for x in r['runs'])}){note} | "
                    f"{r['median'] - job:.1f} s |")
    return rows + [""]


def gateway_markdown(m: dict) -> list[str]:
    if "gateway" not in m:
        return []
    g = m["gateway"]
    move = ([f"| a session's ComfyUI SIGKILLed: from the kill to its next picture, from the other worker "
             f"(`ServerLoop(reattach_within=10)`) | {g['move_s']['median']:.2f} s "
             f"({', '.join(f'{x:.2f}' for x in g['move_s']['runs'])}) |"] if g.get("move_s") else [])
    return ["Live gateway: one session's frame round trip (frame sent → its picture back, a pass-through graph, "
            f"256² JPEG), {g['frames']} frames per route, median (p10–p90):", "",
            "| route | round trip |", "|---|---|",
            f"| directly to a worker's ComfyUI | {g['direct_ms']['median']:.2f} ms ({g['direct_ms']['p10']:.2f}–"
            f"{g['direct_ms']['p90']:.2f}) |",
            f"| through the gateway (HAProxy, scale/haproxy.cfg) | {g['gateway_ms']['median']:.2f} ms "
            f"({g['gateway_ms']['p10']:.2f}–{g['gateway_ms']['p90']:.2f}) |",
            f"| **added by the gateway per frame** | **{g['added_ms']:+.2f} ms** |", *move, ""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per worker count")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fault-rounds", type=int, default=2, help="rounds per fault for the recovery times")
    parser.add_argument("--live-blocks", type=int, default=3, help="blocks per route (direct, gateway)")
    parser.add_argument("--live-frames", type=int, default=40, help="frames per block")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale")
    parser.add_argument("--name", help="results file name (default: cpu-<cpu model>)")
    parser.add_argument("--page", type=Path, metavar="PAGE",
                        help="also write the figures into this docs page (docs/scale.md), between its markers")
    parser.add_argument("--render", type=Path, metavar="JSON", help="only re-render this results file")
    args = parser.parse_args(argv)
    t0 = time.monotonic()

    def log(msg):
        print(f"[{time.monotonic() - t0:5.0f} s] {msg}", flush=True)

    if args.render:                                   # re-render the markdown (and the page) from the JSON
        results = json.loads(args.render.read_text())
        text = markdown(results)
        args.render.with_suffix(".md").write_text(MD_HEADER + text)
        if args.page:
            report.replace_section(args.page, PAGE_START, PAGE_END, text)
        print(text)
        return 0
    import celery
    measured = measure(args, log)
    name = args.name or "cpu-" + "-".join(cpu_name().lower().split()[:2])
    rabbit = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
                            text=True).stdout.strip() or "?"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    results = {"device_name": cpu_name(), "cpus": os.cpu_count(), "jobs": args.jobs, "size": args.size,
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": commit, "celery": celery.__version__, "rabbitmq": rabbit,
               "command": "bench/scale_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "measured": measured}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    (args.out / f"{name}.md").write_text(MD_HEADER + text)
    log(f"wrote {args.out / name}.json and .md")
    print(text)
    if args.page:
        report.replace_section(args.page, PAGE_START, PAGE_END, text)
        log(f"{args.page} updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
