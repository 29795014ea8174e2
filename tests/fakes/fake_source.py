"""A FAKE frame source with a per-read script: raise, hang, return garbage, or end."""

from __future__ import annotations

import threading
import time
import weakref

import numpy as np

from app.sources import Source


class FakeSource(Source):
    """A FAKE camera: makes numbered frames every ``period`` seconds, following a per-read script."""

    def __init__(self, period=0.002, script=None, shape=(24, 32), limit=None, live=None):
        self.period = period
        self.script = script or {}
        self.shape = shape
        self.limit = limit
        self.live = live
        self.n = 0
        self.closed = threading.Event()

    def read(self):
        i = self.n
        self.n += 1
        action = self.script.get(i)
        if action == "raise":
            raise OSError("camera unplugged")
        if action == "hang":
            self.closed.wait(30)  # like a blocked driver call: returns only when closed
            return np.zeros(self.shape, np.uint8)
        if action == "garbage":
            return np.zeros(self.shape, np.float32)
        if self.limit is not None and i >= self.limit:
            return None
        time.sleep(self.period)
        px = np.full(self.shape, i % 256, np.uint8)
        if self.live is not None:
            self.live.add(id(px))
            weakref.finalize(px, self.live.discard, id(px))
        return px

    def close(self):
        self.closed.set()
