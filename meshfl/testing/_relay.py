"""An impairment relay: TCP links with a delay per direction, jitter, a blackhole and resets.

The kernel on these machines has no ``netem``, so the network-namespace harness
(:mod:`meshfl.testing.netns`) makes latency and link faults in user space: a client dials the
relay, the relay dials the target, and every byte waits its link's delay before it is passed on.
ZeroMQ runs over TCP, so a TCP relay is all a mesh needs. Per link:

- ``up_ms`` / ``down_ms``: one-way delay client -> target / target -> client (RTT = their sum);
- ``jitter_ms``: each read is delayed by up to that much more or less, never reordered (TCP
  carries one ordered stream, so a late piece holds back those behind it);
- ``blackhole``: nothing is passed on, in either direction, while it is on; bytes wait (up to the
  buffer, then the sender is held back as a full TCP window would) and flow again once it is off,
  like a path that lost its route for a while: TCP loses nothing, endpoints may time out;
- ``reset``: every open connection of the link is aborted with a TCP RST on both sides.

Each direction of a connection buffers at most ``buffer`` bytes; past that the relay stops
reading, so the delay line behaves like a path whose window is ``buffer`` (no slow start).
The standard library only (it starts in a few milliseconds, imports neither zmq nor torch):
``python _relay.py CONTROL_SOCKET``; it prints one line, ``ready``, once the control socket
listens. The control protocol is one JSON object per line, answered by one JSON line:

    {"op": "add", "name": N, "listen": [host, port], "target": [host, port],
     "up_ms": 0, "down_ms": 0, "jitter_ms": 0, "buffer": 8388608}   -> {"ok": true, "port": P}
    {"op": "set", "name": N, "up_ms"|"down_ms"|"jitter_ms"|"blackhole": value}  -> {"ok": true}
    {"op": "reset", "name": N}                              -> {"ok": true, "connections": n}
    {"op": "stats"}  -> {"ok": true, "links": {N: {"up_bytes", "down_bytes", "up_queued", "down_queued",
                                                       "connections"}}}
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import socket
import struct
import sys

READ_BYTES = 256 * 1024
DEFAULT_BUFFER = 8 * 2**20
SETTINGS = ("up_ms", "down_ms", "jitter_ms", "blackhole")


class Link:
    """One listening address and its target, with the impairments applied to each byte."""

    def __init__(self, name: str, target: tuple[str, int], up_ms: float = 0.0, down_ms: float = 0.0,
                 jitter_ms: float = 0.0, buffer: int = DEFAULT_BUFFER) -> None:
        self.name, self.target, self.buffer = name, target, int(buffer)
        self.up_ms, self.down_ms, self.jitter_ms = float(up_ms), float(down_ms), float(jitter_ms)
        self.open = asyncio.Event()  # cleared while the blackhole is on
        self.open.set()
        self.bytes = {"up": 0, "down": 0}  # passed on
        self.queued = {"up": 0, "down": 0}  # read, waiting for their time (or the blackhole's end)
        self.connections: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.server: asyncio.AbstractServer | None = None

    def set(self, **settings) -> None:
        for key, value in settings.items():
            if key == "blackhole":
                self.open.clear() if value else self.open.set()
            else:
                setattr(self, key, float(value))

    def delay(self, direction: str) -> float:
        base = self.up_ms if direction == "up" else self.down_ms
        jitter = random.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0
        return max(0.0, base + jitter) / 1000

    async def serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            target_r, target_w = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(client_w)  # the target refuses: so does the relay, at once
            return
        pair = (client_w, target_w)
        self.connections.add(pair)
        pipes = [asyncio.ensure_future(self._pipe(client_r, target_w, "up")),
                 asyncio.ensure_future(self._pipe(target_r, client_w, "down"))]
        try:
            done, _ = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
            failed = any(not t.cancelled() and t.exception() is not None for t in done)
        finally:
            for pipe in pipes:
                pipe.cancel()
            self.connections.discard(pair)
        for writer in pair:  # a reset on one side resets the other; both ends done: a plain close
            _abort(writer) if failed else writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, direction: str) -> None:
        """Read as data comes, hand each piece on once its time has come (in order)."""
        loop = asyncio.get_running_loop()
        line: collections.deque = collections.deque()
        state = {"queued": 0, "last": 0.0}
        arrived, room = asyncio.Event(), asyncio.Event()

        async def read() -> None:
            while True:
                try:
                    data = await src.read(READ_BYTES)
                except OSError as exc:  # reset: passed on like the end of the stream, in its turn
                    data = exc
                due = max(state["last"], loop.time() + self.delay(direction))
                state["last"] = due
                line.append((due, data))
                arrived.set()
                if not data or isinstance(data, OSError):
                    return
                state["queued"] += len(data)
                self.queued[direction] += len(data)
                while state["queued"] > self.buffer:
                    room.clear()
                    await room.wait()

        reader = asyncio.ensure_future(read())
        try:
            while True:
                if not line:
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, data = line[0]
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self.open.wait()
                line.popleft()
                if isinstance(data, OSError):
                    raise data
                state["queued"] -= len(data)
                self.queued[direction] -= len(data)
                room.set()
                if not data:
                    if dst.can_write_eof():
                        dst.write_eof()
                    return
                dst.write(data)
                self.bytes[direction] += len(data)
                await dst.drain()
        finally:
            reader.cancel()
            self.queued[direction] -= state["queued"]  # what a reset threw away

    def reset(self) -> int:
        count = len(self.connections)
        for pair in list(self.connections):
            for writer in pair:
                _abort(writer)
        return count


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (linger 0), not a FIN: the peer sees its connection reset."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Relay:
    def __init__(self) -> None:
        self.links: dict[str, Link] = {}

    async def command(self, cmd: dict) -> dict:
        op = cmd.get("op")
        if op == "add":
            name = cmd["name"]
            if name in self.links:
                raise ValueError(f"link {name!r} exists")
            link = Link(name, tuple(cmd["target"]), cmd.get("up_ms", 0), cmd.get("down_ms", 0),
                        cmd.get("jitter_ms", 0), cmd.get("buffer", DEFAULT_BUFFER))
            host, port = cmd["listen"]
            link.server = await asyncio.start_server(link.serve, host, port, limit=READ_BYTES)
            self.links[name] = link
            return {"ok": True, "port": link.server.sockets[0].getsockname()[1]}
        link = self.links.get(cmd.get("name", ""))
        if op == "set" and link is not None:
            link.set(**{k: v for k, v in cmd.items() if k in SETTINGS})
            return {"ok": True}
        if op == "reset" and link is not None:
            return {"ok": True, "connections": link.reset()}
        if op == "stats":
            return {"ok": True, "links": {n: {"up_bytes": l.bytes["up"], "down_bytes": l.bytes["down"],
                                              "up_queued": l.queued["up"], "down_queued": l.queued["down"],
                                              "connections": len(l.connections)} for n, l in self.links.items()}}
        raise ValueError(f"unknown op {op!r} or link {cmd.get('name')!r}")

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            try:
                reply = await self.command(json.loads(line))
            except Exception as exc:  # a bad command gets an answer; the relay goes on
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        writer.close()


async def main(control_path: str) -> None:
    relay = Relay()
    server = await asyncio.start_unix_server(relay.control, control_path)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1]))
    except KeyboardInterrupt:
        pass
