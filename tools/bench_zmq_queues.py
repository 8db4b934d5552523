#!/usr/bin/env python
"""What libzmq itself adds to a ROUTER's RSS per connection as messages pass (no meshfl).

A plain pyzmq ROUTER answers ``--clients`` DEALERs (one other process), ``--messages`` small
requests each per cycle, for ``--cycles`` cycles. libzmq gives every connection message queues
(chunks of 256 message slots per direction) whose pages are first touched as messages pass, so
a young server's RSS grows cycle by cycle until each connection has carried some 500 messages,
then stays flat. tools/bench_hosted.py's ``host_peak_in_models`` (peak RSS during a cycle above
the RSS just before it) counts that growth too; this measures it on its own, as the baseline to
read that figure against. Prints JSON: the growth per client per cycle over the first cycles,
the RSS per client it levels off at, and the cycle where it stopped growing.

    python tools/bench_zmq_queues.py                      # 1 000 clients, CURVE on, ~30 s
    python tools/bench_zmq_queues.py --clients 300 --plain
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

import zmq


def rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def clients(endpoint: str, go_endpoint: str, n: int, m: int, keys) -> None:
    """The DEALER side (a child process): a cycle of ``m`` requests per client when told."""
    ctx = zmq.Context()
    socks = []
    for i in range(n):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.routing_id = b"c%d" % i
        if keys:
            s.curve_serverkey = keys[0]
            s.curve_publickey, s.curve_secretkey = zmq.curve_keypair()
        s.connect(endpoint)
        socks.append(s)
    go = ctx.socket(zmq.PAIR)
    go.linger = 0
    go.connect(go_endpoint)
    while go.recv() == b"go":
        for s in socks:
            for _ in range(m):
                s.send(b"x" * 100)
        for s in socks:
            for _ in range(m):
                s.recv()
        go.send(b"done")
    for s in socks:
        s.close()
    go.close()
    ctx.term()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--messages", type=int, default=4, help="requests per client per cycle")
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--plain", action="store_true", help="CURVE off")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="meshfl-bench-zmq-queues-")
    endpoint, go_endpoint = f"ipc://{root}/router.sock", f"ipc://{root}/go.sock"
    keys = None if args.plain else zmq.curve_keypair()
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    if keys:
        router.curve_server, router.curve_publickey, router.curve_secretkey = True, keys[0], keys[1]
    router.bind(endpoint)
    go = ctx.socket(zmq.PAIR)
    go.linger = 0
    go.bind(go_endpoint)
    pid = os.fork()
    if pid == 0:
        try:
            clients(endpoint, go_endpoint, args.clients, args.messages, keys)
        finally:
            os._exit(0)
    try:
        def cycle() -> None:
            go.send(b"go")
            for _ in range(args.clients * args.messages):
                rid, _ = router.recv_multipart()
                router.send_multipart([rid, b"y" * 100])
            go.recv()

        cycle()  # connections made and their first messages through
        start = rss_anon_kb()
        series = [start]
        for _ in range(args.cycles):
            cycle()
            series.append(rss_anon_kb())
        go.send(b"stop")
    finally:
        _, status = os.waitpid(pid, 0)
        router.close()
        go.close()
        ctx.term()
        shutil.rmtree(root, ignore_errors=True)
    early = min(20, args.cycles)
    flat_from = next((k for k in range(len(series)) if series[-1] - series[k] <= 64), len(series) - 1)
    print(json.dumps({
        "clients": args.clients, "messages_per_cycle": args.messages, "cycles": args.cycles, "curve": bool(keys),
        "growth_kb_per_client_per_cycle_first": round((series[early] - series[0]) / early / args.clients, 3),
        "first_cycles": early,
        "grown_kb_per_client": round((series[-1] - start) / args.clients, 1),
        "flat_from_cycle": flat_from,
        "flat": flat_from < len(series) - 1 - args.cycles // 10,
    }, indent=2))


if __name__ == "__main__":
    main()
