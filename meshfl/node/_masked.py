"""A node's masked results (secure rounds), kept in memory until the researcher acknowledges them.

A masked vector is of use only in its round, and that round's secrets live in this process alone
(a restarted node drops out of its open secure rounds), so it is not written to disk: that write,
a whole model per node and secure round, and its writeback cost more than making the masks
(docs/security.md, "Cost"). A node that restarts before its result is acknowledged reports it
lost (``result_lost``), and the round treats it as dropped out. The memory of acknowledged
vectors is reused (fresh memory costs a page fault per 4 KiB).
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from ..secagg import VECTOR


class MaskedResults:
    """Masked vectors by task id, and up to ``SPARES`` spare buffers. Thread-safe."""

    SPARES = 2

    def __init__(self) -> None:
        self._live: dict[str, np.ndarray] = {}
        self._spares: list[np.ndarray] = []
        self._lock = threading.Lock()

    def buffer(self, nbytes: int) -> np.ndarray:
        """Memory for a vector of ``nbytes`` bytes, whatever it holds."""
        with self._lock:
            for i, spare in enumerate(self._spares):
                if spare.size == nbytes:
                    return self._spares.pop(i)
        return np.empty(nbytes, dtype=np.uint8)

    def keep(self, task_id: str, vector: np.ndarray) -> None:
        with self._lock:
            self._live[task_id] = vector

    def tensors(self, task_id: str) -> dict[str, torch.Tensor] | None:
        """Task ``task_id``'s result as it is sent (one int32 tensor :data:`VECTOR`), or None."""
        with self._lock:
            vector = self._live.get(task_id)
        return None if vector is None else {VECTOR: torch.from_numpy(vector).view(torch.int32)}

    def drop(self, task_id: str) -> None:
        """Forget a result (acknowledged, or failed after masking); its memory becomes a spare."""
        with self._lock:
            vector = self._live.pop(task_id, None)
            if vector is not None and len(self._spares) < self.SPARES:
                self._spares.append(vector)
