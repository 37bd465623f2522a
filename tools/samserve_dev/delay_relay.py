"""A TCP relay that holds every byte back for a fixed time in each direction: the link delay of the multi-host test
(tests/integration/test_multihost.py). ``tc netem`` would delay packets in the kernel, but this machine's kernel
has no ``sch_netem`` (only tbf, htb and pfifo, none of which delays), so the delay is added here, in user space,
at the destination host: what a client sees is the same one-way latency on every segment, in order, with no loss.

Run it in the namespace that owns both addresses; it relays until its event loop stops."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses

CHUNK_BYTES = 1 << 16
_EOF = b""


@dataclasses.dataclass(frozen=True)
class Link:
    """``listen`` (host, port) is relayed to ``target`` (host, port), each direction ``delay_s`` later."""

    listen: tuple[str, int]
    target: tuple[str, int]
    delay_s: float


async def _delayed_copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Copy ``reader`` to ``writer``; each chunk is written ``delay_s`` after it was read, in order. The end of the
    stream is passed on (half close) as late as the data before it."""
    loop = asyncio.get_running_loop()
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def receive() -> None:
        while chunk := await reader.read(CHUNK_BYTES):
            due.put_nowait((loop.time() + delay_s, chunk))
        due.put_nowait((loop.time() + delay_s, _EOF))

    async def send() -> None:
        while True:
            at, chunk = await due.get()
            if (wait := at - loop.time()) > 0:
                await asyncio.sleep(wait)
            if chunk == _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(chunk)
            await writer.drain()

    await asyncio.gather(receive(), send())


async def _relay(link: Link, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
    try:
        server_reader, server_writer = await asyncio.open_connection(*link.target)
    except OSError:
        client_writer.close()
        return
    try:
        async with asyncio.TaskGroup() as directions:
            directions.create_task(_delayed_copy(client_reader, server_writer, link.delay_s))
            directions.create_task(_delayed_copy(server_reader, client_writer, link.delay_s))
    except* OSError:
        pass  # a reset on either side ends both directions: the peer sees its connection closed, as over a wire
    finally:
        for writer in (client_writer, server_writer):
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def start(link: Link) -> asyncio.Server:
    """Listen on ``link.listen`` now; every accepted connection is relayed with the delay."""
    return await asyncio.start_server(lambda r, w: _relay(link, r, w), *link.listen, reuse_address=True)
