"""Crash-test child: drives a TaskQueue as fast as it can until it is killed.

Usage: python store_queue_writer.py STORE_FOLDER

After each operation has committed it prints "<op> <task id>" (op: push, claim, done, fail) and
flushes, so every line the parent reads is a promise the store must keep after a SIGKILL. The map
starts tiny so that the kill can also land while the map is growing.
"""

import sys

from meshfl.store import Store, TaskQueue


def report(op: str, task_id: str) -> None:
    print(op, task_id, flush=True)


def main(folder: str) -> None:
    queue = TaskQueue(Store(folder, map_size=64 * 1024))
    running = None
    for n in range(10**9):
        for _ in range(2):
            report("push", queue.push({"n": n, "pad": "x" * 2000}))
        task = queue.claim()
        report("claim", task.id)
        if running is not None:
            if n % 5 == 0:
                queue.fail(running.id, {"code": "test"})
                report("fail", running.id)
            else:
                queue.done(running.id, {"n": n})
                report("done", running.id)
        running = task


if __name__ == "__main__":
    main(sys.argv[1])
