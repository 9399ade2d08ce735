"""A TCP relay that a test can cut and restore: a network partition between two processes on one machine.

    relay = TcpRelay(("127.0.0.2", 0), ("127.0.0.1", broker_port)).start()
    ... connect to relay.address instead of the broker ...
    relay.cut()        # a partition: nothing passes either way, and nothing is closed (no RST, no FIN)
    relay.restore()    # the link is back: the connections the partition broke are closed, as TCP
                       # would find them after the peer gave up on them; new ones pass again

While cut, new connections are accepted and held silent, as packets into a partition are lost: the
peer sees a connect that never answers rather than a refusal. Each end notices only through its own
timeouts and heartbeats, which is what the partition tests test. Runs its asyncio loop in a thread.
"""
from __future__ import annotations

import asyncio
import threading


class TcpRelay:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.listen, self.target = listen, target
        self.address: tuple[str, int] | None = None
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()             # set: the link is up (created on the loop's thread below)
        self._connections: set[asyncio.StreamWriter] = set()
        self._broken: set[asyncio.StreamWriter] = set()
        self._server = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="tcp-relay")

    @property
    def url_host_port(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def start(self) -> "TcpRelay":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._serve, *self.listen)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        if not self._open.is_set():
            self._broken.add(writer)              # accepted during the cut: it never gets an answer
        try:
            await self._open.wait()
            if writer.is_closing():               # restore() closed it
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self._connections.discard(writer)
            return
        self._connections.add(up_writer)
        pair = (writer, up_writer)
        await asyncio.gather(self._pipe(reader, up_writer, pair), self._pipe(up_reader, writer, pair))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if not self._open.is_set():           # cut: what is in flight is lost, then nothing passes
                    self._broken.update(pair)
                    await self._open.wait()
                if writer.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for w in pair:
                self._close(w)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self._connections.discard(writer)
        self._broken.discard(writer)
        try:
            writer.close()
        except Exception:
            pass

    def _call(self, fn) -> None:
        async def run():
            fn()
        asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def cut(self) -> None:
        """Partition: every open connection goes silent both ways; new ones are accepted and held."""
        def go():
            self._broken.update(self._connections)
            self._open.clear()
        self._call(go)

    def restore(self) -> None:
        """End the partition: close what it broke (both ends then see the connection end) and let new ones pass."""
        def go():
            for writer in list(self._broken):
                self._close(writer)
            self._open.set()
        self._call(go)

    def stop(self) -> None:
        def go():
            if self._server is not None:
                self._server.close()
            for writer in list(self._connections):
                self._close(writer)
            self._open.set()
        self._call(go)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
