"""Bounded waits for conditions that other threads or processes bring about."""

import threading
import time


def wait_until(cond, timeout=30.0):
    """Poll ``cond`` until it is true or ``timeout`` seconds pass; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        threading.Event().wait(0.02)
    return cond()
