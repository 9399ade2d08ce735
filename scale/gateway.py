"""The live gateway: HAProxy in front of the fleet's ComfyUIs, each live session sticky to one of them.

    python -m scale.gateway print --bind 0.0.0.0:8190 --backend gpu0=10.0.0.5:8188 --backend gpu1=10.0.0.6:8188
    python -m scale.gateway run   --bind 0.0.0.0:8190 --backend gpu0=10.0.0.5:8188 --backend gpu1=10.0.0.6:8188

``print`` prints scale/haproxy.cfg with these workers (for /etc/haproxy/haproxy.cfg); ``run`` starts HAProxy
(Debian's ``haproxy``) with it in the foreground. ``python -m scale.client gateway ...`` is the same. Live clients then connect to the gateway instead of a ComfyUI:
``python scripts/live_client.py``'s ``LiveClient("http://gateway:8190", session=...)``, with
``ServerLoop(..., reattach_within=10)`` to move to another worker when theirs dies. What the gateway does
and does not guarantee is in docs/scale.md.

A worker's ComfyUI listens on 127.0.0.1 unless started with ``-- --listen 0.0.0.0`` (after the worker's
own options): a gateway on another machine needs that.
"""
from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMPLATE = Path(__file__).resolve().with_name("haproxy.cfg")
DEFAULT_BIND = "127.0.0.1:8190"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HOST = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]{1,253}|[0-9A-Fa-f:]+|\*)$")     # a name, IPv4, [IPv6], *


class GatewayError(RuntimeError):
    pass


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not _HOST.match(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"{what} {text!r} is not HOST:PORT (for example 10.0.0.5:8188)")
    return host, int(port)


def parse_backend(text: str) -> tuple[str, str]:
    """``NAME=HOST:PORT`` (or ``HOST:PORT``, named after it) -> (name, host:port)."""
    name, sep, address = text.partition("=")
    if not sep:
        name, address = text.replace(":", "-"), text
    if not _NAME.match(name):
        raise GatewayError(f"backend name {name!r}: use letters, digits, '.', '_' or '-' (NAME=HOST:PORT)")
    host, port = _host_port(address, f"backend {name}:")
    return name, f"{host}:{port}"


def render(backends: dict[str, str], bind: str = DEFAULT_BIND, template: Path = TEMPLATE) -> str:
    """scale/haproxy.cfg with its bind line and server lines replaced by ``bind`` and ``backends``
    (name -> host:port)."""
    if not backends:
        raise GatewayError("the gateway needs at least one --backend NAME=HOST:PORT (a worker's ComfyUI)")
    _host_port(bind, "--bind")
    lines, servers_at = [], None
    for line in template.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("bind "):
            line = f"    bind {bind}"
        elif stripped.startswith("server "):
            servers_at = len(lines) if servers_at is None else servers_at
            continue
        lines.append(line)
    if servers_at is None:
        raise GatewayError(f"{template} has no server lines to replace")
    lines[servers_at:servers_at] = [f"    server {name} {address} check" for name, address in backends.items()]
    return "\n".join(lines) + "\n"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy")
                                             if Path(p).exists()), None)
    if not found:
        raise GatewayError("HAProxy is not installed: install Debian's haproxy package (apt-get install haproxy)")
    return found


class Gateway:
    """HAProxy with a rendered config, as a child process (the tests and the bench start one)."""

    def __init__(self, backends: dict[str, str], bind: str = DEFAULT_BIND, workdir: Path | None = None):
        self.backends, self.bind = dict(backends), bind
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="comfy-turbo-gateway-"))
        self.config = self.workdir / "haproxy.cfg"
        self.log_path = self.workdir / "haproxy.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host, port = self._address()
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _address(self) -> tuple[str, int]:
        """Where a client on this machine reaches the gateway (a wildcard bind: on loopback)."""
        host, port = _host_port(self.bind, "--bind")
        return ("127.0.0.1" if host in ("0.0.0.0", "*") else host.strip("[]")), port

    def start(self, timeout: float = 10.0) -> "Gateway":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(render(self.backends, self.bind))
        binary = haproxy_binary()
        check = subprocess.run([binary, "-c", "-q", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise GatewayError(f"HAProxy refused {self.config}:\n{check.stdout}{check.stderr}")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([binary, "-db", "-f", str(self.config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise GatewayError(f"HAProxy exited with status {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(self._address(), 0.5).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise GatewayError(f"HAProxy did not listen on {self.bind} within {timeout:.0f} s:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> "Gateway":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scale.gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("print", "run"), help="print the HAProxy config, or run HAProxy with it")
    parser.add_argument("--backend", action="append", default=[], metavar="NAME=HOST:PORT",
                        help="a worker's ComfyUI (repeat for each worker)")
    parser.add_argument("--bind", default=DEFAULT_BIND, metavar="HOST:PORT", help=f"where clients connect ({DEFAULT_BIND})")
    args = parser.parse_args(argv)
    try:
        backends = dict(parse_backend(b) for b in args.backend)
        if len(backends) != len(args.backend):
            raise GatewayError("two --backend options have the same name")
        config = render(backends, args.bind)
        if args.command == "print":
            sys.stdout.write(config)
            return 0
        with tempfile.TemporaryDirectory(prefix="comfy-turbo-gateway-") as workdir:
            path = Path(workdir) / "haproxy.cfg"
            path.write_text(config)
            print(f"comfy-turbo gateway on {args.bind} -> " + ", ".join(f"{n} {a}" for n, a in backends.items()),
                  file=sys.stderr, flush=True)
            return subprocess.call([haproxy_binary(), "-db", "-f", str(path)])
    except GatewayError as e:
        parser.error(str(e))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
