"""The Celery app: one task that runs an API-format prompt on the worker's own ComfyUI.

Delivery is at least once, never at most once:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only after its reply has
  been published, so the broker hands a killed (or cut-off) worker's job to another worker;
* prefetch 1 and one job at a time per ComfyUI (``worker_prefetch_multiplier=1``, a prefork pool of
  one process): a worker holds no job it is not running. (Celery's thread and solo pools acknowledge
  from their main loop's next turn, up to 2 s later, and with prefetch 1 the next job waits for that:
  measured 2-9 s per job against 10 ms with prefork.)
* a job can therefore run twice (a worker killed after replying, before acknowledging): every job
  has an id, the worker answers a repeat from its memory of recent jobs, and the client keeps the
  first reply per id.

Faults, and what each does to a job (README, "Scale out"):

* **ComfyUI did not take the job** (down, restarting): the job goes back on the queue it came from,
  uncounted, for a healthy worker; the worker stops consuming until its ComfyUI answers again
  (scale/worker.py).
* **A job that ends its ComfyUI or its worker** (a crash in a node): each such attempt is counted in the
  job itself (``attempts``, a counted header in the body, so it works on classic queues and survives
  broker restarts): a broker redelivery (the worker process died) or ComfyUI going away with the job
  taken counts one, and the job is republished with the new count. After ``max_attempts`` (default 3)
  it goes to the dead-letter queue ``comfy-turbo.dead`` and its client gets a ``poison`` error.
* **A reply over the broker's message limit** (RabbitMQ's ``max_message_size``: 128 MiB by default in
  3.10, 16 MiB from 4.0) becomes a small ``reply_too_large`` error naming both sizes; the job is acked,
  never run again for its reply.
* **A job over its deadline** (``timeout_s``) is taken off its ComfyUI's queue, or interrupted by its
  prompt id, and answered with a ``timeout`` error.

Replies are persistent messages on a durable reply queue per client (``comfy-turbo.reply.<client>``),
published with kombu, Celery's own messaging library, so they survive a broker restart and a client's
lost connection as the jobs do; Celery's result backends would not (the ``rpc://`` reply queue is
transient).

Queues: ``comfy-turbo`` (shared, any worker), ``comfy-turbo.worker.<name>`` (one per worker, for
sticky routing: every job of a live session goes to the worker that holds it) and ``comfy-turbo.dead``.
"""
from __future__ import annotations

import base64
import logging
import os
import re
import socket
import time
from collections import OrderedDict

from celery import Celery
from celery.exceptions import Reject
from kombu import Queue

from .comfy import ComfyClient, ComfyCrashed, ComfyUnavailable, PromptFailed, PromptInvalid

SHARED_QUEUE = "comfy-turbo"
WORKER_QUEUE_PREFIX = "comfy-turbo.worker."
REPLY_QUEUE_PREFIX = "comfy-turbo.reply."
DEAD_LETTER_QUEUE = "comfy-turbo.dead"     # poison jobs, kept for a person to look at (scale.client dead)
REPLY_QUEUE_EXPIRES_S = 24 * 3600          # an abandoned client's reply queue goes away after a day
TASK_NAME = "comfy_turbo.run_prompt"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
MAX_ATTEMPTS = 3                            # attempts that ended ComfyUI or the worker, before the dead-letter queue
MAX_REQUEUES = 100                          # times a job went back because ComfyUI was down, before an error
DEFAULT_HEARTBEAT_S = 10.0                  # AMQP heartbeats: a cut link is noticed in about twice this
WORKER_PUBLISH_RETRY = {"max_retries": 20, "interval_start": 0.5, "interval_step": 1, "interval_max": 5}

log = logging.getLogger("comfy_turbo.scale")


def worker_queue(name: str) -> Queue:
    return Queue(WORKER_QUEUE_PREFIX + name, durable=True)


def reply_queue(client_id: str) -> Queue:
    return Queue(REPLY_QUEUE_PREFIX + client_id, durable=True, expires=REPLY_QUEUE_EXPIRES_S)


def dead_letter_queue() -> Queue:
    return Queue(DEAD_LETTER_QUEUE, durable=True)


def make_app(broker_url: str | None = None, heartbeat: float | None = None) -> Celery:
    app = Celery("comfy_turbo_scale")
    app.conf.update(
        broker_url=broker_url or os.environ.get("COMFY_TURBO_BROKER", DEFAULT_BROKER),
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        task_serializer="json", accept_content=["json"],       # never pickle: nothing from outside runs code
        task_ignore_result=True,                                # replies go to the client's own queue
        task_default_queue=SHARED_QUEUE,
        task_queues=(Queue(SHARED_QUEUE, durable=True),),
        task_default_delivery_mode="persistent",
        task_create_missing_queues=True,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=DEFAULT_HEARTBEAT_S if heartbeat is None else heartbeat,
        broker_connection_max_retries=None,                     # a worker cut off keeps trying, for ever
        broker_transport_options={"confirm_publish": True},   # a job or reply is sent once the broker has it
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True)(run_prompt)
    return app


class WorkerState:
    """What one worker process knows: its name, its ComfyUI and the replies of its recent jobs.

    A remembered reply keeps everything but the images (the client got them with the first reply):
    a redelivered job that already ran here is answered again without running it.
    """

    def __init__(self, name: str, comfyui_url: str, remember: int = 1024, max_attempts: int = MAX_ATTEMPTS):
        self.name = name
        self.max_attempts = max_attempts
        self.comfy = ComfyClient(comfyui_url)
        self.recent: "OrderedDict[str, dict]" = OrderedDict()
        self.remember = remember

    def remember_reply(self, job_id: str, reply: dict) -> None:
        self.recent[job_id] = {k: v for k, v in reply.items() if k != "images"}
        while len(self.recent) > self.remember:
            self.recent.popitem(last=False)


STATE: WorkerState | None = None           # set by scale/worker.py before the Celery worker starts


def run_prompt(self, job: dict) -> dict:
    """Run ``job["prompt"]`` on this worker's ComfyUI and publish the reply to ``job["reply_to"]``.

    Returns a short summary (Celery ignores it; the reply message is the result).
    """
    if STATE is None:
        raise RuntimeError("this process is not a comfy-turbo worker (start it with python -m scale.worker)")
    job_id = job["id"]
    delivery = self.request.delivery_info or {}
    queue = delivery.get("routing_key") or SHARED_QUEUE
    reply = STATE.recent.get(job_id)
    if reply is not None:                    # ran here already (a redelivery): answer again, do not rerun
        return send_reply(self.app, job, dict(reply, repeat=True, redelivered=True))
    attempts = int(job.get("attempts", 0))   # attempts that ended a ComfyUI or a worker
    if delivery.get("redelivered"):          # the worker that held it died, or its link to the broker did
        attempts += 1
        return count_attempt(self.app, job, queue, attempts, "its worker stopped (killed, or cut off from the "
                                                             "broker) while holding it")
    reply = {"job_id": job_id, "worker": STATE.name, "host": socket.gethostname(), "session": job.get("session"),
             "redelivered": attempts > 0, "attempts": attempts + 1, "retries": int(job.get("requeues", 0))}
    try:
        outcome = STATE.comfy.run(job["prompt"], timeout=job.get("timeout_s"))
    except ComfyCrashed as e:
        return count_attempt(self.app, job, queue, attempts + 1, str(e))
    except ComfyUnavailable as e:            # never ran: back for a healthy worker, uncounted
        requeues = int(job.get("requeues", 0)) + 1
        if requeues <= MAX_REQUEUES:
            log.warning("job %s: %s; back on the queue %s (requeue %d)", job_id, e, queue, requeues)
            try:
                republish(self.app, dict(job, requeues=requeues), queue)
            except Exception as e:
                raise Reject(f"requeue failed: {e}", requeue=True) from e
            deadline = time.monotonic() + 3.0     # the worker's health check stops its consumers meanwhile
            while time.monotonic() < deadline and not STATE.comfy.alive(timeout=1.0):
                time.sleep(0.25)
            return {"job_id": job_id, "worker": STATE.name, "requeued": True}
        reply["error"] = {"kind": "comfyui_unavailable", "message": f"{e} (after {MAX_REQUEUES} requeues)"}
    except PromptInvalid as e:
        reply["error"] = {"kind": "invalid_prompt", "message": str(e), "comfyui": e.body}
    except PromptFailed as e:
        reply["error"] = {"kind": "execution_error", "message": str(e), "comfyui": e.info}
    except TimeoutError as e:
        reply["error"] = {"kind": "timeout", "message": str(e)}
    except Exception as e:                   # anything else still gets a reply, never a silent loss
        log.exception("job %s failed", job_id)
        reply["error"] = {"kind": "internal", "message": f"{type(e).__name__}: {e}"}
    else:
        reply.update(prompt_id=outcome["prompt_id"], seconds=outcome["seconds"], images=[
            {"node": i["node"], "filename": i["filename"], "png_base64": base64.b64encode(i["data"]).decode()}
            for i in outcome["images"]])
    reply["finished_at"] = time.time()
    return send_reply(self.app, job, reply)


def count_attempt(app: Celery, job: dict, queue: str, attempts: int, why: str) -> dict:
    """One more attempt of ``job`` ended its ComfyUI or worker: republish it with the count, or after
    ``max_attempts`` dead-letter it and tell its client (``poison``)."""
    job_id = job["id"]
    if attempts < STATE.max_attempts:
        log.warning("job %s: attempt %d of %d failed (%s); back on the queue %s", job_id, attempts,
                    STATE.max_attempts, why, queue)
        try:
            republish(app, dict(job, attempts=attempts), queue)
        except Exception as e:                # never acked without a copy on the broker: back as it was
            raise Reject(f"republish failed: {e}", requeue=True) from e
        return {"job_id": job_id, "worker": STATE.name, "attempts": attempts}
    message = (f"job {job_id} is poison: each of its {attempts} attempts ended the ComfyUI or the worker running "
               f"it (the last: {why}); it is in the dead-letter queue {DEAD_LETTER_QUEUE} and will not run again")
    log.error("%s", message)
    dead = dict(job, attempts=attempts, dead_lettered_at=time.time(), last_failure=why, last_worker=STATE.name)
    try:
        publish(app, DEAD_LETTER_QUEUE, dead, dead_letter_queue())
    except Exception as e:
        raise Reject(f"dead-lettering failed: {e}", requeue=True) from e
    reply = {"job_id": job_id, "worker": STATE.name, "host": socket.gethostname(), "session": job.get("session"),
             "redelivered": True, "attempts": attempts, "retries": int(job.get("requeues", 0)),
             "error": {"kind": "poison", "message": message, "attempts": attempts,
                       "dead_letter_queue": DEAD_LETTER_QUEUE},
             "finished_at": time.time()}
    return send_reply(app, job, reply)


def republish(app: Celery, job: dict, queue: str) -> None:
    """``job`` back on ``queue`` as a new message (the held one is acked when the task returns)."""
    app.send_task(TASK_NAME, args=[job], task_id=job["id"], queue=queue, retry=True,
                  retry_policy=WORKER_PUBLISH_RETRY)


# RabbitMQ's refusal: "PRECONDITION_FAILED - message size 2000000 is larger than configured max size 1048576"
MESSAGE_SIZE_REFUSED = re.compile(r"message size (\d+) is larger than configured max size (\d+)")


def send_reply(app: Celery, job: dict, reply: dict) -> dict:
    """Publish ``reply``; a reply the broker refuses for its size becomes a small ``reply_too_large``
    error, so the job is acked and never runs again because of its reply. Other publish failures (the
    broker unreachable after retries) put the job back, unacked."""
    job_id = job["id"]
    try:
        try:
            publish_reply(app, job["reply_to"], reply)
        except Exception as e:
            refused = MESSAGE_SIZE_REFUSED.search(str(e))
            if refused is None:
                raise
            size, limit = (int(g) for g in refused.groups())
            log.error("job %s: the reply (%d bytes) is over the broker's max_message_size (%d bytes)",
                      job_id, size, limit)
            reply = {k: v for k, v in reply.items() if k not in ("images", "error")}
            reply["error"] = {"kind": "reply_too_large", "size": size, "limit": limit, "message": (
                f"the reply of job {job_id} is {size} bytes, over the broker's max_message_size of {limit} bytes: "
                "make its images smaller or fewer (or JPEG/WebP), or raise max_message_size in rabbitmq.conf")}
            publish_reply(app, job["reply_to"], reply, fresh=True)
    except Exception as e:                   # the broker did not take the reply: the job goes back, unacked
        log.error("job %s: the reply could not be published (%s); back on the queue", job_id, e)
        raise Reject(str(e), requeue=True) from e
    if not reply.get("repeat"):
        STATE.remember_reply(job_id, reply)
    return {"job_id": job_id, "worker": STATE.name, "error": "error" in reply}


def publish(app: Celery, routing_key: str, body: dict, queue: Queue, fresh: bool = False) -> None:
    """A persistent message on the default exchange, declared ``queue`` first; ``fresh``: on a new
    connection (after the broker closed the pooled one's channel)."""
    options = dict(exchange="", routing_key=routing_key, serializer="json", delivery_mode=2, declare=[queue],
                   retry=True, retry_policy=WORKER_PUBLISH_RETRY)
    if fresh:
        with app.connection_for_write() as connection:
            connection.Producer().publish(body, **options)
        return
    with app.producer_or_acquire() as producer:
        producer.publish(body, **options)


def publish_reply(app: Celery, client_id: str, reply: dict, fresh: bool = False) -> None:
    queue = reply_queue(client_id)
    publish(app, queue.name, reply, queue, fresh=fresh)
