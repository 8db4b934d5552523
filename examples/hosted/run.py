"""A hosted model trained by a few hundred light clients that come and go, on loopback.

    python examples/hosted/run.py [--clients 300] [--versions 8] [--mode cycle|async]

A host (a researcher home, CURVE on, enrolled keys only) hosts a small classifier; every client
is a :class:`meshfl.Client` with its own key and a private, non-IID shard (two of four classes),
asking to train when it likes. In cycle mode each cycle takes the first ``--per-cycle`` clients
that ask and the others are told to come back later; in async mode (FedBuff) every
``--buffer`` diffs make a new version. After each version the script prints the global model's
accuracy on held-out data, and the host's own per-version record (diffs, clients, staleness,
the clients' mean test accuracy).
"""

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import zmq
from torch import nn

from meshfl.crypto import Identity
from meshfl.errors import MeshflError
from meshfl.home import Home
from meshfl.hosted import Backoff, Client, Host
from meshfl.plans import TorchTrainingPlan


class BlobsPlan(TorchTrainingPlan):
    def init_model(self, features=8, hidden=16, classes=4):
        return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def shard(rng, n, classes, centres):
    y = rng.choice(classes, n)
    return torch.tensor(centres[y] + rng.normal(size=(n, centres.shape[1])), dtype=torch.float32), torch.tensor(y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=300)
    p.add_argument("--versions", type=int, default=8)
    p.add_argument("--mode", choices=["cycle", "async"], default="cycle")
    p.add_argument("--per-cycle", type=int, default=60)
    p.add_argument("--buffer", type=int, default=30)
    p.add_argument("--threads", type=int, default=8, help="threads driving the clients")
    args = p.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 1.5
    x_test, y_test = shard(rng, 2000, [0, 1, 2, 3], centres)

    root = Path(tempfile.mkdtemp(prefix="meshfl-hosted-"))
    Home.init(root / "host", "researcher", "host", listen=f"ipc://{root}/host.sock").close()
    host = Host(root / "host").start()
    server = ({"mode": "cycle", "max_clients": args.per_cycle, "min_clients": args.per_cycle // 2,
               "cycle_length": 30} if args.mode == "cycle" else
              {"mode": "async", "buffer": args.buffer, "max_staleness": 8, "max_clients": args.clients})
    host.add_model("blobs", BlobsPlan, server=server,
                   training_args={"epochs": 2, "lr": 0.02, "batch_size": 16, "test_fraction": 0.25})

    ctx = zmq.Context()
    clients = [Client(host.endpoint, host.card, identity=Identity.generate(f"device{i}"), context=ctx,
                      data=shard(rng, int(rng.integers(20, 60)), [i % 4, (i + 1) % 4], centres), plans=[BlobsPlan])
               for i in range(args.clients)]
    host.enroll(c.card for c in clients)  # bulk: one transaction, one audit record
    print(f"host {host.endpoint}: {args.clients} light clients enrolled, {args.mode} mode")

    done = threading.Event()

    def drive(mine: list) -> None:  # each thread walks its clients: ask, train, push, or come back later
        later = {}
        while not done.is_set():
            for c in mine:
                if done.is_set() or later.get(c.peer_id, 0) > time.monotonic():
                    continue
                try:
                    answer = c.train_once("blobs")
                except MeshflError:
                    continue
                if isinstance(answer, Backoff):
                    later[c.peer_id] = time.monotonic() + min(answer.retry_in, 0.5)
            done.wait(0.01)

    threads = [threading.Thread(target=drive, args=(clients[i::args.threads],), daemon=True)
               for i in range(args.threads)]
    for t in threads:
        t.start()
    model = BlobsPlan().init_model()
    try:
        for v in range(1, args.versions + 1):
            if not host.wait_version("blobs", v, timeout=120):
                raise SystemExit(f"no version {v} in two minutes")
            model.load_state_dict(host.model("blobs", v))
            with torch.no_grad():
                acc = float((model(x_test).argmax(1) == y_test).float().mean())
            rec = host.versions("blobs")[v]
            print(f"version {v}: held-out accuracy {acc:.3f}  ({rec['diffs']} diffs from {rec['clients']} clients, "
                  f"staleness {rec['staleness']}, clients' test accuracy {rec['metrics'].get('test_accuracy', 0):.3f})")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=30)
        for c in clients:
            c.close()
        host.close()
        ctx.term()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
