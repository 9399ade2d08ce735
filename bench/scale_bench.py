#!/usr/bin/env python3
"""The fleet on this machine: throughput with 1 and 2 workers, and the queue's overhead per prompt.

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
from local_fleet import WorkerProcess, import_scale, wait_for_workers  # noqa: E402
from local_rabbitmq import LocalRabbitMQ, free_port  # noqa: E402

import_scale()
from scale.client import Fleet  # noqa: E402
from scale.comfy import ComfyClient  # noqa: E402
from scale import workflow as fleet_workflow  # noqa: E402

PAGE_START, PAGE_END = "<!-- scale-figures:start -->", "<!-- scale-figures:end -->"
MD_HEADER = "# comfy-turbo fleet benchmark\n\n"
WORKFLOW = REPO / "workflows" / "api" / "turbo_txt2img_sd_api.json"


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
    port = free_port()
    workers = {name: WorkerProcess(name, tmp / name, broker.url, comfyui, {"checkpoints": checkpoint},
                                   port=port if name == "w1" else None) for name in ("w1", "w2")}
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
        return {
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
        broker.kill()


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
        "own cost more than a GPU fleet's scaling, where each worker has its own device.", ""])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2, help="throughput rounds per worker count")
    parser.add_argument("--size", type=int, default=64)
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
