"""A private RabbitMQ broker on 127.0.0.1 for the scale-out tests and bench (Debian's rabbitmq-server).

Installs the package with apt-get when it is missing (as the browser tests install Chromium). Each
broker gets its own node name, ports, data and log directories, and listens on the loopback
interface only: AMQP (``RABBITMQ_NODE_IP_ADDRESS``), Erlang distribution (``inet_dist_use_interface``)
and its own epmd (``ERL_EPMD_ADDRESS``, ``ERL_EPMD_PORT``). Messages and durable queues live in its
data directory, so ``restart()`` keeps them.

    python scripts/local_rabbitmq.py        # start one in the foreground (Ctrl-C stops it)
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_host import free_port  # noqa: E402
from local_fleet import ensure_debian_package  # noqa: E402

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")    # the scripts themselves, run as the current user
DEBIAN_PACKAGE = "rabbitmq-server"


def ensure_installed() -> None:
    # The package may start a system broker; ours are private, and that one is stopped.
    ensure_debian_package(DEBIAN_PACKAGE, str(RABBITMQ_BIN / "rabbitmq-server"))


class LocalRabbitMQ:
    def __init__(self, base_dir: Path | None = None, max_message_size: int | None = None):
        """``max_message_size``: RabbitMQ's limit on one message in bytes (rabbitmq.conf; its default in
        3.10, Debian 12's, is 128 MiB), set low by the tests of replies too large to send."""
        ensure_installed()
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="comfy-turbo-rabbitmq-"))
        for sub in ("data", "log", "home"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        self.max_message_size = max_message_size
        (self.base / "rabbitmq.conf").write_text(
            "" if max_message_size is None else f"max_message_size = {int(max_message_size)}\n")
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"ct{uuid.uuid4().hex[:8]}@localhost"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict:
        return {**os.environ,
                "HOME": str(self.base / "home"),             # its Erlang cookie
                "RABBITMQ_NODENAME": self.node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1", "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
                "RABBITMQ_MNESIA_BASE": str(self.base / "data"), "RABBITMQ_LOG_BASE": str(self.base / "log"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
                "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq")}

    def start(self, timeout: float = 90.0) -> "LocalRabbitMQ":
        log = open(self.base / "server.out", "ab")
        self.process = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env(), stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.process.returncode}:\n{self.log_tail()}")
            if self._amqp_answers():
                return self
            time.sleep(0.3)
        self.kill()
        raise TimeoutError(f"RabbitMQ did not listen within {timeout:.0f} s:\n{self.log_tail()}")

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """``rabbitmqctl`` against this broker; its output."""
        done = subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def queue_depth(self, name: str) -> int:
        """Messages ready in queue ``name`` (0 if it does not exist)."""
        for line in self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages_ready").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == name:
                return int(parts[1])
        return 0

    def _amqp_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                s.settimeout(2)
                return s.recv(1) == b"\x01"                   # Connection.Start frame
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> None:
        """A clean shutdown (durable queues and persistent messages are kept on disk)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "stop"], env=self.env(), capture_output=True,
                           timeout=timeout)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._stop_epmd()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._stop_epmd()
        self.process = None

    def _stop_epmd(self, timeout: float = 10.0) -> None:
        """Stop this broker's own epmd; it refuses while the node still shows as registered (just after a kill)."""
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(["epmd", "-kill"], env=self.env(), capture_output=True, text=True)
            if "Killed" in done.stdout or "no running epmd" in done.stdout + done.stderr.lower() \
                    or "cannot connect" in (done.stdout + done.stderr).lower() or time.monotonic() > deadline:
                return
            time.sleep(0.2)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.base / "server.out").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> "LocalRabbitMQ":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    broker = LocalRabbitMQ().start()
    print(f"RabbitMQ at {broker.url} (data in {broker.base}); Ctrl-C stops it", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        broker.stop()
    sys.exit(0)
