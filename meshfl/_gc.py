"""Garbage collection in meshfl's long-running processes (a node daemon, its training worker)."""

import gc


def freeze_startup_objects() -> None:
    """Move everything alive after start-up (torch's and numpy's import graph: some 170 000
    objects) out of the cyclic collector's reach. Those objects live as long as the process, yet
    each full collection walked them all: tens of milliseconds, every few hundred tasks of a busy
    node. After this a full collection walks only what the process made since."""
    gc.collect()
    gc.freeze()
