"""How loaded a model replica is, measured where the work happens (Ray-free).

A :class:`LoadMeter` counts, for one model replica:

* the fraction of wall time the model spent generating since the previous sample (``busy``, 0..1);
* the inputs accepted by the replica but not yet inside a running ``generate`` call (``waiting``):
  those in Serve's batch queue and in the replica's own merge queue.

Their combination ``load = busy + waiting / max_batch_size`` is the replica's demand in
replicas' worth of work: a replica generating all the time with a full batch waiting behind it has
load 2, an idle one 0. Serve's autoscaler reads it (see ``lorahub_ray.cluster.serve_autoscaling``);
unlike Serve's default metric (ongoing requests), it counts inputs rather than requests, and it
rises when the model is the bottleneck, whatever share of the clients sits in the proxy and the
ingress at a given moment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class LoadMeter:
    """Busy time and waiting inputs of one replica; :meth:`sample` reads and restarts the busy window."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_s = 0.0          # busy seconds completed since the last sample
        self._active = 0            # generate calls running now
        self._active_since = 0.0    # when the current busy stretch began (or the last sample, if later)
        self._in_flight = 0         # inputs accepted and not yet answered
        self._running = 0           # inputs inside running generate calls
        self._window_start = clock()

    # --- events ------------------------------------------------------------------------------

    @contextmanager
    def accepted(self, n: int) -> Iterator[None]:
        """``n`` inputs are in the replica for the duration of the block (leak-proof on errors and cancellation)."""
        with self._lock:
            self._in_flight += n
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= n

    @contextmanager
    def running(self, n: int) -> Iterator[None]:
        """The model generates ``n`` inputs for the duration of the block."""
        with self._lock:
            if self._active == 0:
                self._active_since = self._clock()
            self._active += 1
            self._running += n
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._running -= n
                if self._active == 0:
                    self._busy_s += self._clock() - self._active_since

    # --- reading -----------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        with self._lock:
            return max(0, self._in_flight - self._running)

    def sample(self, max_batch_size: int) -> dict[str, float]:
        """``busy`` (fraction of the time since the last sample), ``waiting`` inputs and ``load``; starts a new window."""
        with self._lock:
            now = self._clock()
            busy = self._busy_s
            if self._active:
                busy += now - self._active_since
                self._active_since = now
            elapsed = now - self._window_start
            self._window_start = now
            self._busy_s = 0.0
            waiting = max(0, self._in_flight - self._running)
        fraction = min(1.0, busy / elapsed) if elapsed > 0 else (1.0 if self._active else 0.0)
        return {"busy": fraction, "waiting": float(waiting), "load": fraction + waiting / max(1, max_batch_size)}


__all__ = ["LoadMeter"]
