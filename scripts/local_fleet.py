"""Fleet workers on this machine, for the scale-out tests and bench: ``python -m scale.worker`` processes.

Each worker runs in its own process group with a ComfyUI of its own as its child (``--cpu``, one torch
thread), in a private base directory whose models/ links the given model files.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ensure_debian_package(package: str, binary: str) -> None:
    """Install a Debian package with apt-get when ``binary`` is missing (RabbitMQ for scripts/local_rabbitmq.py,
    HAProxy for the live gateway), and stop the system service the package may start (no-op without one)."""
    if Path(binary).exists():
        return
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"{binary} is missing and there is no apt-get to install Debian's {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", package], check=True, env=env, timeout=900,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["service", package, "stop"], capture_output=True)


def import_scale():
    """The repository's ``scale`` package, imported by path: the repository root never goes on sys.path,
    where its ``nodes`` package would shadow ComfyUI's ``nodes`` module in a process that imports ComfyUI."""
    if "scale" not in sys.modules:
        spec = importlib.util.spec_from_file_location("scale", REPO / "scale" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "scale")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["scale"] = module
        spec.loader.exec_module(module)
    return sys.modules["scale"]


class WorkerProcess:
    def __init__(self, name: str, base: Path, broker_url: str, comfyui: str, models: dict[str, Path],
                 port: int | None = None, threads: int = 1, attach: str | None = None,
                 worker_args: list[str] = (), custom_nodes: dict[str, Path] | None = None):
        """``worker_args``: more scale.worker options (``--heartbeat 3``); ``custom_nodes``: folder name ->
        node pack linked into the ComfyUI's custom_nodes besides comfy-turbo (the tests' fault nodes)."""
        self.name, self.base, self.port = name, Path(base), port
        for folder, path in models.items():
            target = self.base / "models" / folder / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(Path(path).resolve())
        for folder, path in (custom_nodes or {}).items():
            target = self.base / "custom_nodes" / folder
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to(Path(path).resolve(), target_is_directory=True)
        self.cmd = [sys.executable, "-m", "scale.worker", "--broker", broker_url, "--name", name, "--loglevel", "INFO",
                    *worker_args]
        if attach:                      # serve a ComfyUI started elsewhere
            self.cmd += ["--attach", attach]
        else:
            self.cmd += ["--comfyui", comfyui, "--base-directory", str(self.base),
                         *(["--port", str(port)] if port else []), "--",
                         "--cpu", "--database-url", f"sqlite:///{self.base / 'comfyui.db'}"]
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        log = open(self.base / "worker.log", "ab")
        self.process = subprocess.Popen(self.cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the Celery worker and its ComfyUI, with no chance to clean up."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def comfyui_pids(self) -> list[int]:
        """The worker's ComfyUI processes (its children running main.py), from /proc."""
        pids = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (stat.parent / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if self.process is not None and ppid == self.process.pid and b"main.py" in cmdline:
                pids.append(int(stat.parent.name))
        return pids

    def kill_comfyui(self) -> list[int]:
        """SIGKILL this worker's ComfyUI (the worker starts it again); the pids killed."""
        pids = self.comfyui_pids()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        return pids

    @property
    def comfyui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def comfyui_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.base.glob("comfyui-*.log")))

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in sorted(self.base.glob("*.log")):
            text += f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def running_on(workers: dict[str, WorkerProcess]) -> str | None:
    """The worker whose ComfyUI is running a prompt now (None: none is, or none answers)."""
    for name, w in workers.items():
        try:
            if _get_json(f"{w.comfyui_url}/queue")["queue_running"]:
                return name
        except OSError:
            pass
    return None


def live_session_homes(workers: dict[str, WorkerProcess], session: str) -> list[str]:
    """The workers whose ComfyUI has this live session (the pack's GET /comfy-turbo/live/<session>)."""
    homes = []
    for name, w in workers.items():
        try:
            _get_json(f"{w.comfyui_url}/comfy-turbo/live/{session}")
            homes.append(name)
        except urllib.error.HTTPError as e:
            if e.code not in (400, 404):             # "no such session" is an answer; anything else is not
                raise
        except OSError:
            pass
    return homes


def wait_for_workers(fleet, names, processes, timeout: float = 300.0) -> None:
    """Until every worker in ``names`` answers the broker (a worker that exits fails at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in processes:
            if not p.alive():
                raise RuntimeError(f"worker {p.name} exited:\n{p.log_tail()}")
        if set(names) <= set(fleet.workers(timeout=1.0)):
            return
        time.sleep(1)
    raise TimeoutError("workers did not come up:\n" + "\n".join(p.log_tail() for p in processes))
