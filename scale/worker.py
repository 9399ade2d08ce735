"""One fleet worker: a Celery worker serving one ComfyUI (with comfy-turbo), one job at a time.

    # start a ComfyUI of its own (the pack linked into <base>/custom_nodes), then serve it:
    python -m scale.worker --broker amqp://user:pass@broker:5672// --name gpu0 \\
        --comfyui /path/to/ComfyUI --base-directory /srv/comfy-gpu0 -- --cuda-device 0
    # or attach to a ComfyUI that is already running (the pack must be installed there):
    python -m scale.worker --broker ... --name gpu0 --attach http://127.0.0.1:8188

The worker consumes the shared queue and its own (``comfy-turbo.worker.<name>``, for sticky sessions),
while its ComfyUI answers: a health check (``--health-interval``) cancels both consumers when ComfyUI
stops answering, so healthy workers take the shared work, and adds them back when it answers again.
The ComfyUI it starts is its child, in its process group: stopping the worker stops it. If that
ComfyUI exits (a crash, a poison job), the worker starts it again on the same port; if it cannot
(``--max-restarts`` failed starts in a row), the worker stops (exit status 3) for its supervisor.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from celery.worker.control import control_command

from . import app as app_module
from .comfy import ComfyClient, ComfyUnavailable

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "comfy-turbo"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfyui: Path, base: Path, port: int, extra: list[str], python: str) -> subprocess.Popen:
    """Start ComfyUI's main.py on 127.0.0.1:``port`` with ``base`` as its base directory and the pack linked in."""
    nodes_dir = base / "custom_nodes"
    nodes_dir.mkdir(parents=True, exist_ok=True)
    link = nodes_dir / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    log_file = open(base / f"comfyui-{port}.log", "ab")
    cmd = [python, "-u", str(comfyui / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--disable-auto-launch", *extra]
    # Same process group as the worker: a signal to the group reaches both. The child keeps its own copy of
    # the log's descriptor; the worker's is closed, so restarts do not pile up open files.
    with log_file:
        return subprocess.Popen(cmd, cwd=comfyui, stdout=log_file, stderr=subprocess.STDOUT)


def wait_ready(client: ComfyClient, process: subprocess.Popen | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"ComfyUI exited with status {process.returncode} while starting (see its log)")
        try:
            client.check()
            return
        except ComfyUnavailable:
            if time.monotonic() > deadline:
                raise SystemExit(f"ComfyUI at {client.url} did not answer within {timeout:.0f} s")
            time.sleep(0.5)


STOPPING = threading.Event()           # set when the worker itself stops ComfyUI
log = logging.getLogger("comfy_turbo.scale")


class ComfySupervisor:
    """The ComfyUI this worker started: started again on the same port whenever it exits, until it fails to
    start (exits or hangs before answering) ``max_restarts`` times in a row (then the worker stops, status 3)."""

    def __init__(self, start, client: ComfyClient, startup_timeout: float, max_restarts: int = 5):
        self.start, self.client, self.startup_timeout = start, client, startup_timeout
        self.max_restarts = max_restarts
        self.process: subprocess.Popen = start()
        self.restarts = 0
        self._lock = threading.Lock()         # stop() never races a restart: no ComfyUI outlives its worker

    def watch(self) -> None:
        failed_starts = 0                     # starts in a row that never answered (a crash after is no count)
        while True:
            self.process.wait()
            if STOPPING.is_set():
                return
            if failed_starts > self.max_restarts:
                log.error("ComfyUI failed to start %d times in a row: stopping this worker", failed_starts)
                os._exit(3)
            with self._lock:
                if STOPPING.is_set():
                    return
                log.error("ComfyUI exited with status %s: starting it again", self.process.returncode)
                self.process = self.start()
                self.restarts += 1
            try:
                wait_ready(self.client, self.process, self.startup_timeout)
                failed_starts = 0
                log.info("ComfyUI is back (restart %d)", self.restarts)
            except SystemExit as e:           # it exited or hung while starting
                failed_starts += 1
                log.error("%s", e)
                if self.process.poll() is None:
                    self.process.kill()

    def stop(self) -> None:
        with self._lock:
            STOPPING.set()
            process = self.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@control_command(args=[("consume", bool)], signature="<consume>")
def comfy_turbo_consume(state, consume: bool = True, **_):
    """Remote control: stop (False) or resume (True) consuming every task queue this worker started with.

    Celery's own cancel_consumer / add_consumer would do, but cancel_consumer also deselects the queue and
    add_consumer does not select it again, so the first reconnection after a pause would consume nothing."""
    consumer = state.consumer
    queues = consumer.app.amqp.queues

    def apply():
        for name in PAUSABLE_QUEUES:
            if consume:
                queues.select_add(queues[name])
                consumer.add_task_queue(name)
            else:
                consumer.cancel_task_queue(name)
    consumer.call_soon(apply)
    return {"ok": f"consume {consume}"}


PAUSABLE_QUEUES: list[str] = []        # set by main(): the shared queue and this worker's own


class HealthCheck:
    """Consume only while ComfyUI answers: after ``failures`` failed checks ``interval`` s apart, cancel
    this worker's consumers (the job it holds is put back by the task itself); on the first answer
    again, add them back. Through Celery's remote control (:func:`comfy_turbo_consume`), addressed to
    this worker's node name alone."""

    def __init__(self, celery_app, node_name: str, client: ComfyClient, interval: float = 1.0, failures: int = 2):
        self.app, self.node_name, self.client = celery_app, node_name, client
        self.interval, self.failures = interval, failures
        self.consuming = True

    def _consume(self, consume: bool) -> None:
        self.app.control.broadcast("comfy_turbo_consume", arguments={"consume": consume}, destination=[self.node_name])
        self.consuming = consume

    def run(self) -> None:
        failed = turn = 0
        while not STOPPING.is_set():
            time.sleep(self.interval)
            failed = 0 if self.client.alive(timeout=max(1.0, self.interval)) else failed + 1
            try:
                # Either state is sent again every few turns: a broadcast sent while the worker's consumer
                # was reconnecting (or not yet listening) is lost, and the command is idempotent.
                if failed == 0 and self.consuming and (turn := turn + 1) % 10 == 0:
                    self._consume(True)
                if failed >= self.failures and (self.consuming or failed % 5 == 0):
                    if self.consuming:
                        log.warning("ComfyUI at %s does not answer: no more jobs until it does", self.client.url)
                    self._consume(False)
                elif not self.consuming and failed == 0:
                    log.info("ComfyUI at %s answers again: taking jobs", self.client.url)
                    self._consume(True)
            except Exception as e:            # the broker unreachable: try again on the next turn
                log.warning("health check: could not reach the broker (%s)", e)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default=os.environ.get("COMFY_TURBO_BROKER", app_module.DEFAULT_BROKER),
                        help="AMQP URL of the RabbitMQ broker (default: $COMFY_TURBO_BROKER or local)")
    parser.add_argument("--name", default=socket.gethostname(),
                        help="this worker's name, unique in the fleet: its own queue is comfy-turbo.worker.<name>")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--attach", metavar="URL", help="serve a ComfyUI that is already running")
    where.add_argument("--comfyui", type=Path, metavar="PATH", help="start ComfyUI from this checkout")
    parser.add_argument("--base-directory", type=Path, help="ComfyUI's base directory (models/, output/, ...) "
                                                            "when started here (default: the checkout)")
    parser.add_argument("--port", type=int, help="port for the ComfyUI started here (default: a free one)")
    parser.add_argument("--python", default=sys.executable, help="Python for the ComfyUI started here")
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    parser.add_argument("--max-attempts", type=int, default=app_module.MAX_ATTEMPTS,
                        help="attempts of a job that end its ComfyUI or worker before it is dead-lettered "
                             f"(default {app_module.MAX_ATTEMPTS})")
    parser.add_argument("--heartbeat", type=float, default=app_module.DEFAULT_HEARTBEAT_S,
                        help="AMQP heartbeat in seconds: a cut link is noticed in about twice this "
                             f"(default {app_module.DEFAULT_HEARTBEAT_S:g}; 0 turns heartbeats off)")
    parser.add_argument("--health-interval", type=float, default=1.0,
                        help="seconds between checks that ComfyUI answers (default 1)")
    parser.add_argument("--max-restarts", type=int, default=5,
                        help="failed starts in a row of the ComfyUI started here before the worker stops")
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("comfyui_args", nargs="*", help="after --: more arguments for ComfyUI's main.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format=f"[{args.name}] %(levelname)s %(name)s: %(message)s")

    if args.max_attempts < 1:
        parser.error("--max-attempts must be 1 or more")
    supervisor = None
    if args.comfyui:
        port = args.port or free_port()
        base = (args.base_directory or args.comfyui).resolve()
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.attach
    state = app_module.WorkerState(args.name, url, max_attempts=args.max_attempts)
    if args.comfyui:
        supervisor = ComfySupervisor(
            lambda: start_comfyui(args.comfyui.resolve(), base, port, args.comfyui_args, args.python),
            state.comfy, args.startup_timeout, args.max_restarts)
    try:
        wait_ready(state.comfy, supervisor.process if supervisor else None, args.startup_timeout)
    except BaseException:
        if supervisor is not None:
            supervisor.stop()
        raise
    if supervisor is not None:
        threading.Thread(target=supervisor.watch, daemon=True, name="comfyui-supervisor").start()
    app_module.STATE = state
    celery_app = app_module.make_app(args.broker, heartbeat=args.heartbeat)
    queues = [app_module.SHARED_QUEUE, f"{app_module.WORKER_QUEUE_PREFIX}{args.name}"]
    PAUSABLE_QUEUES[:] = queues
    node_name = f"{args.name}@{socket.gethostname()}"
    health = HealthCheck(celery_app, node_name, state.comfy, args.health_interval)
    threading.Thread(target=health.run, daemon=True, name="comfyui-health").start()
    log.info("serving ComfyUI at %s on queues %s", url, ",".join(queues))
    try:
        celery_app.worker_main(["worker", "--pool=prefork", "--concurrency=1", "--prefetch-multiplier=1",
                                "-Q", ",".join(queues), "-n", node_name, "--without-gossip", "--without-mingle",
                                "--without-heartbeat", f"--loglevel={args.loglevel}"])
    finally:
        STOPPING.set()
        if supervisor is not None:
            supervisor.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
