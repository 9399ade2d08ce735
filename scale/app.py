"""The Celery app: one task that runs an API-format prompt on the worker's own ComfyUI.

Delivery is at least once, never at most once:

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only after its reply has
  been published, so the broker hands a killed worker's job to another worker;
* prefetch 1 and one job at a time per ComfyUI (``worker_prefetch_multiplier=1``, a prefork pool of
  one process): a worker holds no job it is not running. (Celery's thread and solo pools acknowledge
  from their main loop's next turn, up to 2 s later, and with prefetch 1 the next job waits for that:
  measured 2-9 s per job against 10 ms with prefork.)
* ComfyUI not answering (restarting, crashed under a live Celery process) retries the job, on any
  worker, with backoff;
* a job can therefore run twice (a worker killed after replying, before acknowledging): every job
  has an id, the worker answers a repeat from its memory of recent jobs, and the client keeps the
  first reply per id.

Replies are persistent messages on a durable reply queue per client (``comfy-turbo.reply.<client>``),
published with kombu, Celery's own messaging library, so they survive a broker restart as the jobs
do; Celery's result backends would not (the ``rpc://`` reply queue is transient).

Queues: ``comfy-turbo`` (shared, any worker) and ``comfy-turbo.worker.<name>`` (one per worker, for
sticky routing: every job of a live session goes to the worker that holds it).
"""
from __future__ import annotations

import base64
import logging
import os
import socket
import time
from collections import OrderedDict

from celery import Celery
from celery.exceptions import Reject
from kombu import Queue

from .comfy import ComfyClient, ComfyUnavailable, PromptFailed, PromptInvalid

SHARED_QUEUE = "comfy-turbo"
WORKER_QUEUE_PREFIX = "comfy-turbo.worker."
REPLY_QUEUE_PREFIX = "comfy-turbo.reply."
REPLY_QUEUE_EXPIRES_S = 24 * 3600          # an abandoned client's reply queue goes away after a day
TASK_NAME = "comfy_turbo.run_prompt"
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"
MAX_RETRIES = 10                            # ComfyUI not answering: 1, 2, 4, 8, 10, 10, ... s apart

log = logging.getLogger("comfy_turbo.scale")


def worker_queue(name: str) -> Queue:
    return Queue(WORKER_QUEUE_PREFIX + name, durable=True)


def reply_queue(client_id: str) -> Queue:
    return Queue(REPLY_QUEUE_PREFIX + client_id, durable=True, expires=REPLY_QUEUE_EXPIRES_S)


def make_app(broker_url: str | None = None) -> Celery:
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
        broker_heartbeat=30,
        broker_transport_options={"confirm_publish": True},   # a job or reply is sent once the broker has it
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    app.task(bind=True, name=TASK_NAME, acks_late=True, reject_on_worker_lost=True,
             max_retries=MAX_RETRIES)(run_prompt)
    return app


class WorkerState:
    """What one worker process knows: its name, its ComfyUI and the replies of its recent jobs.

    A remembered reply keeps everything but the images (the client got them with the first reply):
    a redelivered job that already ran here is answered again without running it.
    """

    def __init__(self, name: str, comfyui_url: str, remember: int = 1024):
        self.name = name
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
    redelivered = bool(delivery.get("redelivered")) or self.request.retries > 0
    reply = STATE.recent.get(job_id)
    if reply is not None:                    # ran here already (a redelivery): answer again, do not rerun
        reply = dict(reply, repeat=True, redelivered=True)
    else:
        reply = {"job_id": job_id, "worker": STATE.name, "host": socket.gethostname(),
                 "session": job.get("session"), "redelivered": redelivered, "retries": self.request.retries}
        try:
            outcome = STATE.comfy.run(job["prompt"])
        except ComfyUnavailable as e:
            if self.request.retries < MAX_RETRIES:
                log.warning("job %s: %s; back on the queue (retry %d)", job_id, e, self.request.retries + 1)
                raise self.retry(exc=e, countdown=min(2 ** self.request.retries, 10))
            reply["error"] = {"kind": "comfyui_unavailable", "message": f"{e} (after {MAX_RETRIES} retries)"}
        except PromptInvalid as e:
            reply["error"] = {"kind": "invalid_prompt", "message": str(e), "comfyui": e.body}
        except PromptFailed as e:
            reply["error"] = {"kind": "execution_error", "message": str(e), "comfyui": e.info}
        except TimeoutError as e:
            reply["error"] = {"kind": "timeout", "message": str(e)}
        except Exception as e:               # anything else still gets a reply, never a silent loss
            log.exception("job %s failed", job_id)
            reply["error"] = {"kind": "internal", "message": f"{type(e).__name__}: {e}"}
        else:
            reply.update(prompt_id=outcome["prompt_id"], seconds=outcome["seconds"], images=[
                {"node": i["node"], "filename": i["filename"], "png_base64": base64.b64encode(i["data"]).decode()}
                for i in outcome["images"]])
        reply["finished_at"] = time.time()
    try:
        publish_reply(self.app, job["reply_to"], reply)
    except Exception as e:                   # the broker did not take the reply: the job goes back, unacked
        log.error("job %s: the reply could not be published (%s); back on the queue", job_id, e)
        raise Reject(str(e), requeue=True) from e
    if not reply.get("repeat"):
        STATE.remember_reply(job_id, reply)
    return {"job_id": job_id, "worker": STATE.name, "error": "error" in reply}


def publish_reply(app: Celery, client_id: str, reply: dict) -> None:
    with app.producer_or_acquire() as producer:
        queue = reply_queue(client_id)
        producer.publish(reply, exchange="", routing_key=queue.name, serializer="json", delivery_mode=2,
                         declare=[queue], retry=True,
                         retry_policy={"max_retries": 20, "interval_start": 0.5, "interval_step": 1,
                                       "interval_max": 5})
