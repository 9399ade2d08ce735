"""Submit workflows to the fleet and collect their images: a Python API and a command line.

    python -m scale.client --broker amqp://user:pass@broker:5672// run workflows/api/turbo_txt2img_api.json \\
        --count 20 --seed 1 --prompt "a lighthouse at dusk" --width 512 --height 512 --out results/
    python -m scale.client --broker ... workers
    python -m scale.client --broker ... dead            # the poison jobs in the dead-letter queue
    python -m scale.client gateway print --backend gpu0=10.0.0.5:8188 ...   # the live gateway (scale/gateway.py)

    from scale.client import Fleet
    with Fleet("amqp://...") as fleet:
        ids = [fleet.submit(prompt) for prompt in prompts]
        replies = fleet.wait(ids, timeout=600)          # job id -> reply (images as PNG bytes)
        live = fleet.session()                          # sticky: every job of it runs on one worker
        live.submit(prompt)

Delivery is at least once: a job whose worker died runs again elsewhere, so a reply can arrive twice;
``wait`` keeps the first per job id and counts the repeats in ``duplicates``. A job that ended its
ComfyUI or worker on every attempt answers with a ``poison`` error (see scale/app.py). The client's
connection has AMQP heartbeats: a cut link is noticed in about twice ``heartbeat`` seconds and the
client reconnects by itself; replies wait for it on its durable reply queue meanwhile.
"""
from __future__ import annotations

import argparse
import base64
import os
import queue as queue_module
import random
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

from kombu import Connection
from kombu.exceptions import OperationalError

from . import workflow as workflow_module
from .app import (DEAD_LETTER_QUEUE, DEFAULT_BROKER, DEFAULT_HEARTBEAT_S, SHARED_QUEUE, TASK_NAME,
                  WORKER_QUEUE_PREFIX, dead_letter_queue, make_app, reply_queue, worker_queue)

PUBLISH_RETRY = {"max_retries": 30, "interval_start": 0.5, "interval_step": 1, "interval_max": 5}


class JobFailed(Exception):
    def __init__(self, reply: dict):
        self.reply = reply
        error = reply["error"]
        super().__init__(f"job {reply['job_id']} on {reply.get('worker')}: {error['kind']}: {error['message']}")


class Fleet:
    def __init__(self, broker_url: str | None = None, client_id: str | None = None,
                 heartbeat: float = DEFAULT_HEARTBEAT_S):
        self.broker_url = broker_url or os.environ.get("COMFY_TURBO_BROKER", DEFAULT_BROKER)
        self.heartbeat = heartbeat
        self.app = make_app(self.broker_url, heartbeat=heartbeat)
        self.reconnects = 0                         # times the reply connection was lost and made again
        self.client_id = client_id or uuid.uuid4().hex
        self.replies: dict[str, dict] = {}
        self.duplicates: Counter = Counter()        # job id -> replies after the first (a job that ran twice)
        self.repeats: list[dict] = []               # those replies themselves
        self._connection = None
        self._replies = None
        self._open_replies()          # declared before any job goes out, so no reply can be missed

    # -- submitting --------------------------------------------------------------------------
    def submit(self, prompt: dict, job_id: str | None = None, worker: str | None = None,
               session: str | None = None, timeout: float | None = None) -> str:
        """Queue ``prompt`` (API format) for any worker, or for ``worker``; returns the job id.

        ``timeout``: seconds the prompt may run on its ComfyUI (default: the worker's, 600) before it is
        taken off that ComfyUI's queue or interrupted by its prompt id, and answered with a timeout error."""
        job_id = job_id or uuid.uuid4().hex
        job = {"id": job_id, "prompt": prompt, "reply_to": self.client_id, "session": session}
        if timeout is not None:
            job["timeout_s"] = float(timeout)
        queue = worker_queue(worker).name if worker else SHARED_QUEUE
        self.app.send_task(TASK_NAME, args=[job], task_id=job_id, queue=queue, retry=True,
                           retry_policy=PUBLISH_RETRY)
        return job_id

    def session(self, worker: str | None = None, session_id: str | None = None) -> "Session":
        """A sticky session: all its jobs run on one worker (``worker``, or one of those that answer)."""
        if worker is None:
            found = self.workers()
            if not found:
                raise RuntimeError("no worker answered: start one with python -m scale.worker")
            worker = random.choice(found)
        return Session(self, worker, session_id or uuid.uuid4().hex)

    def workers(self, timeout: float = 2.0) -> list[str]:
        """Names of the workers that answer, sorted."""
        for attempt in range(3):
            try:    # a connection of its own: a pooled one may have died with a broker restart
                with Connection(self.broker_url) as connection:
                    answers = self.app.control.inspect(timeout=timeout, connection=connection).active_queues() or {}
                break
            except (OSError, *self._connection.connection_errors):
                time.sleep(0.5 * (attempt + 1))
        else:
            return []
        names = {q["name"][len(WORKER_QUEUE_PREFIX):] for queues in answers.values() for q in queues
                 if q["name"].startswith(WORKER_QUEUE_PREFIX)}
        return sorted(names)

    # -- collecting --------------------------------------------------------------------------
    def wait(self, job_ids, timeout: float = 600.0, on_reply=None, raise_errors: bool = False) -> dict[str, dict]:
        """Block until every job in ``job_ids`` has replied; returns job id -> reply (first one per id).

        A reply's images carry ``png`` (bytes). ``on_reply(reply, done, total)`` is called for each new one.
        """
        wanted = list(dict.fromkeys(job_ids))
        deadline = time.monotonic() + timeout
        while True:
            missing = [j for j in wanted if j not in self.replies]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(missing)} of {len(wanted)} jobs did not reply within {timeout:.0f} s")
            reply = self._take(self._next_reply(min(1.0, max(0.05, deadline - time.monotonic()))))
            if reply is not None and on_reply is not None and reply["job_id"] in wanted:
                on_reply(reply, sum(j in self.replies for j in wanted), len(wanted))
        result = {j: self.replies[j] for j in wanted}
        if raise_errors:
            for reply in result.values():
                if "error" in reply:
                    raise JobFailed(reply)
        return result

    def drain(self, seconds: float) -> None:
        """Receive replies for ``seconds`` (late repeats included: they land in ``duplicates``)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._take(self._next_reply(min(1.0, max(0.05, left))))

    def _take(self, reply: dict | None) -> dict | None:
        """Keep ``reply`` if it is the first for its job (returned), count it as a repeat if not."""
        if reply is None:
            return None
        if reply["job_id"] in self.replies:
            self.duplicates[reply["job_id"]] += 1
            self.repeats.append({k: v for k, v in reply.items() if k != "images"})
            return None
        for image in reply.get("images", []):
            image["png"] = base64.b64decode(image.pop("png_base64"))
        self.replies[reply["job_id"]] = reply
        return reply

    def dead_letters(self) -> list[dict]:
        """The jobs in the dead-letter queue (poison jobs), left there: read, then put back unacked."""
        with Connection(self.broker_url) as connection:
            channel = connection.channel()
            queue = dead_letter_queue()(channel)
            queue.declare()
            jobs = []
            while (message := queue.get(no_ack=False)) is not None:
                jobs.append(message.payload)
            channel.close()                  # the unacked messages go back, in order
        return jobs

    def _open_replies(self, retries: int = 30) -> None:
        connection = Connection(self.broker_url, heartbeat=self.heartbeat or 0, connect_timeout=4)
        self._connection_errors = tuple(connection.connection_errors)
        try:
            connection.ensure_connection(max_retries=retries, interval_start=0.5, interval_step=1, interval_max=5)
            replies = connection.SimpleQueue(reply_queue(self.client_id))
            # Start consuming now, on the connection just made: SimpleQueue would send basic.consume on its
            # first get(), and a link that died since would block that for ever (no heartbeat is read then).
            replies._consume()
            self._replies = replies
        except Exception:
            connection.release()
            raise
        self._connection = connection

    def _next_reply(self, timeout: float) -> dict | None:
        if self._replies is None:                             # the link was lost: one try to make it again
            try:
                self._open_replies(retries=1)
            except (OSError, OperationalError, *self._connection_errors):
                time.sleep(min(1.0, timeout))
                return None
        try:
            if self.heartbeat:
                self._connection.heartbeat_check()          # raises once two heartbeats are missed
                timeout = min(timeout, self.heartbeat / 4)
            message = self._replies.get(block=True, timeout=timeout)
            payload = message.payload
            message.ack()
        except queue_module.Empty:
            return None
        except (OSError, *self._connection.connection_errors, *self._connection.channel_errors):
            self._reconnect()                                   # e.g. the broker restarted, or a partition
            return None                                         # an unacked reply comes again: kept once by id
        return payload

    def _reconnect(self) -> None:
        """The reply connection is gone (a broker restart, a partition noticed by the heartbeat): drop it;
        ``_next_reply`` makes a new one, one try per turn, so ``wait`` keeps its deadline meanwhile."""
        self.reconnects += 1
        self._replies = None
        try:
            self._connection.collect()          # drop the socket: a polite close would wait on a dead link
        except Exception:
            pass

    def close(self, delete_reply_queue: bool = True) -> None:
        """Stop listening; by default delete this client's reply queue (replies still in it are dropped)."""
        if self._replies is None:
            return
        replies, connection, self._replies = self._replies, self._connection, None
        try:
            if delete_reply_queue:
                replies.queue.delete()
            replies.close()
        except Exception:              # the broker is gone or restarting: the queue expires by itself
            pass
        finally:
            connection.release()

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Session:
    """Jobs of one live session, all routed to one worker's own queue."""

    def __init__(self, fleet: Fleet, worker: str, session_id: str):
        self.fleet, self.worker, self.id = fleet, worker, session_id

    def submit(self, prompt: dict, job_id: str | None = None) -> str:
        return self.fleet.submit(prompt, job_id=job_id, worker=self.worker, session=self.id)


# -- command line --------------------------------------------------------------------------------

def write_images(reply: dict, out: Path) -> list[Path]:
    paths = []
    for i, image in enumerate(reply.get("images", [])):
        path = out / f"{reply['job_id']}-{i}.png"
        path.write_bytes(image["png"])
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=os.environ.get("COMFY_TURBO_BROKER", DEFAULT_BROKER))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="queue a workflow (API format) N times and write the images")
    run.add_argument("workflow", type=Path)
    run.add_argument("--count", type=int, default=1, help="jobs to queue; seeds count up from --seed")
    run.add_argument("--seed", type=int)
    run.add_argument("--prompt", help="positive prompt text")
    run.add_argument("--width", type=int)
    run.add_argument("--height", type=int)
    run.add_argument("--worker", help="run every job on this worker (its own queue)")
    run.add_argument("--out", type=Path, default=Path("fleet-output"))
    run.add_argument("--timeout", type=float, default=3600.0)
    commands.add_parser("workers", help="list the workers that answer")
    commands.add_parser("dead", help=f"list the poison jobs in the dead-letter queue {DEAD_LETTER_QUEUE}")
    gateway = commands.add_parser("gateway", add_help=False,
                                  help="print or run the live gateway's HAProxy config (python -m scale.gateway)")
    gateway.add_argument("gateway_args", nargs=argparse.REMAINDER)
    raw = list(sys.argv[1:] if argv is None else argv)
    args, rest = parser.parse_known_args(raw)
    if args.command == "gateway":                       # needs no broker; everything after it is the gateway's
        from . import gateway as gateway_module
        return gateway_module.main(raw[raw.index("gateway") + 1:])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    with Fleet(args.broker) as fleet:
        if args.command == "workers":
            print("\n".join(fleet.workers()) or "no worker answered")
            return 0
        if args.command == "dead":
            jobs = fleet.dead_letters()
            for job in jobs:
                print(f"{job['id']}  attempts {job.get('attempts')}  last on {job.get('last_worker')}: "
                      f"{job.get('last_failure')}")
            print(f"{len(jobs)} job(s) in {DEAD_LETTER_QUEUE}", file=sys.stderr)
            return 0
        try:
            base = workflow_module.load(args.workflow)
            prompts = [workflow_module.apply_overrides(base, None if args.seed is None else (args.seed + i) % 2**64,
                                                       args.prompt, args.width, args.height)
                       for i in range(args.count)]
        except workflow_module.WorkflowError as e:
            parser.error(str(e))
        args.out.mkdir(parents=True, exist_ok=True)
        ids = [fleet.submit(p, worker=args.worker) for p in prompts]
        failed = 0

        def progress(reply, done, total):
            nonlocal failed
            if "error" in reply:
                failed += 1
                status = f"FAILED: {reply['error']['kind']}: {reply['error']['message']}"
            else:
                status = f"{reply['seconds']:.2f} s, " + ", ".join(str(p) for p in write_images(reply, args.out))
            print(f"[{done}/{total}] job {reply['job_id'][:8]} on {reply['worker']}: {status}", file=sys.stderr,
                  flush=True)

        fleet.wait(ids, timeout=args.timeout, on_reply=progress)
        print(f"{len(ids) - failed} of {len(ids)} jobs done, images in {args.out}", file=sys.stderr)
        return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
