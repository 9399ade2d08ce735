"""One fleet worker: a Celery worker serving one ComfyUI (with comfy-turbo), one job at a time.

    # start a ComfyUI of its own (the pack linked into <base>/custom_nodes), then serve it:
    python -m scale.worker --broker amqp://user:pass@broker:5672// --name gpu0 \\
        --comfyui /path/to/ComfyUI --base-directory /srv/comfy-gpu0 -- --cuda-device 0
    # or attach to a ComfyUI that is already running (the pack must be installed there):
    python -m scale.worker --broker ... --name gpu0 --attach http://127.0.0.1:8188

The worker consumes the shared queue and its own (``comfy-turbo.worker.<name>``, for sticky sessions).
The ComfyUI it starts is its child, in its process group: stopping the worker stops it, and if
ComfyUI exits the worker stops too (exit status 3), for the supervisor (systemd, Kubernetes) to
restart both; its unfinished job goes back to the queue.
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
    # Same process group as the worker: a signal to the group reaches both.
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


def watch(process: subprocess.Popen) -> None:
    """Stop the worker when its ComfyUI exits (status 3), so that a supervisor restarts the pair."""
    process.wait()
    if STOPPING.is_set():
        return
    logging.getLogger("comfy_turbo.scale").error("ComfyUI exited with status %s: stopping this worker",
                                                 process.returncode)
    os._exit(3)


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
    parser.add_argument("--loglevel", default="INFO")
    parser.add_argument("comfyui_args", nargs="*", help="after --: more arguments for ComfyUI's main.py")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel, format=f"[{args.name}] %(levelname)s %(name)s: %(message)s")

    process = None
    if args.comfyui:
        port = args.port or free_port()
        base = (args.base_directory or args.comfyui).resolve()
        process = start_comfyui(args.comfyui.resolve(), base, port, args.comfyui_args, args.python)
        url = f"http://127.0.0.1:{port}"
    else:
        url = args.attach
    state = app_module.WorkerState(args.name, url)
    try:
        wait_ready(state.comfy, process, args.startup_timeout)
    except BaseException:
        if process is not None:
            process.terminate()
        raise
    if process is not None:
        threading.Thread(target=watch, args=(process,), daemon=True).start()
    app_module.STATE = state
    celery_app = app_module.make_app(args.broker)
    queues = f"{app_module.SHARED_QUEUE},{app_module.WORKER_QUEUE_PREFIX}{args.name}"
    logging.getLogger("comfy_turbo.scale").info("serving ComfyUI at %s on queues %s", url, queues)
    try:
        celery_app.worker_main(["worker", "--pool=prefork", "--concurrency=1", "--prefetch-multiplier=1",
                                "-Q", queues, "-n", f"{args.name}@%h", "--without-gossip", "--without-mingle",
                                "--without-heartbeat", f"--loglevel={args.loglevel}"])
    finally:
        STOPPING.set()
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
