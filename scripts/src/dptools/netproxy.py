"""A TCP proxy for network fault injection: forward, reset, black-hole, add latency.

The proxy listens on a loopback port and forwards to a target. It runs its own asyncio loop in a
background thread, so a synchronous driver (the fault-injection suite) can switch modes at any time:

- `reset()`: abort every open connection (the peers see a reset); new connections are forwarded;
- `blackhole(True)`: connections stay open but no byte is forwarded either way (new ones too), the
  way a dropped route looks to a client; `blackhole(False)` forwards again (held bytes are dropped and
  the held connections aborted, so clients reconnect);
- `latency(seconds)`: every forwarded chunk is delayed by that much (0 = off);
- `refuse(True)`: abort every open connection and every new one at once, the way a stopped server
  looks to a client; `refuse(False)` forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Future


class NetProxy:
    """A fault-injecting TCP proxy to `target_host:target_port`, run in a background thread."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._blackhole = False
        self._refuse = False
        self._latency = 0.0

    def start(self) -> NetProxy:
        """Start listening on a free loopback port (`self.port`)."""
        self._thread.start()
        self._call(self._start()).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _call(self, coro: object) -> Future[None]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    def reset(self) -> None:
        """Abort every open connection now."""
        self._call(self._abort_all()).result(10)

    def blackhole(self, on: bool) -> None:
        """Stop (True) or resume (False) forwarding; resuming aborts the connections that were held."""
        self._blackhole = on
        if not on:
            self.reset()

    def refuse(self, on: bool) -> None:
        """Refuse connections (True: every open one is aborted, new ones are closed at once) or not."""
        self._refuse = on
        if on:
            self.reset()

    def latency(self, seconds: float) -> None:
        """Delay every forwarded chunk by `seconds` (0 turns it off)."""
        self._latency = max(0.0, seconds)

    def close(self) -> None:
        """Stop listening, drop every connection, stop the thread."""
        async def shutdown() -> None:
            await self._abort_all()
            if self._server is not None:
                self._server.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._server.wait_closed(), 5)

        with contextlib.suppress(Exception):
            self._call(shutdown()).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _abort_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refuse:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        if self._refuse:  # refused while connecting upstream
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self.connections += 1
        self._open.update((writer, up_writer))
        pumps = [asyncio.create_task(self._pump(reader, up_writer)),
                 asyncio.create_task(self._pump(up_reader, writer))]
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                if self._blackhole:
                    continue  # swallowed: the peer waits for an answer that never comes
                if self._latency:
                    await asyncio.sleep(self._latency)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()
