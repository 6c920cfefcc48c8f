"""Step metrics to a slow or dead receiver (an MLflow server) without ever blocking the training loop.

`MetricsSink(send)` runs `send(step, logs)` on a background thread, fed by a bounded queue. `put` never waits:
when the queue is full the step is dropped and counted. A watchdog warns (through `warn`) once a send has
hung for `stall_after_s`, once sends fail, and when the queue starts dropping; `close(timeout_s)` flushes
what it can within the timeout and reports what was not delivered. No Dagster here: the Dagster asset, the
launcher and a Ray worker pass their own `warn`.

MLflow's own async logging (`log_batch(..., synchronous=False)`) is not used: its queue is unbounded, it says
nothing while the server is gone, and its exit handler waits for every queued batch through all of MLflow's
HTTP retries (minutes per batch against a dead server).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

SendFn = Callable[[int, object], None]  # (step, what on_log queued for that step)


@dataclass
class SinkStats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    undelivered: int = 0  # still queued (or in flight) when close() gave up


class MetricsSink:
    def __init__(self, send: SendFn, *, maxsize: int = 1000, stall_after_s: float = 5.0,
                 warn: Callable[[str], None] | None = None, name: str = "MLflow"):
        self._send, self.name = send, name
        self._warn = warn or log.warning
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self.stall_after_s = stall_after_s
        self.stats = SinkStats()
        self._lock = threading.Lock()
        self._busy_since: float | None = None
        self._stall_warned = self._fail_warned = self._drop_warned = False
        self._closing = threading.Event()
        self._done = threading.Event()
        self._abandoned = threading.Event()
        # daemon threads: a receiver that never answers must not keep the process alive at exit
        self._worker = threading.Thread(target=self._run, name=f"{name}-metrics", daemon=True)
        self._watchdog = threading.Thread(target=self._watch, name=f"{name}-metrics-watchdog", daemon=True)
        self._worker.start()
        self._watchdog.start()

    def put(self, step: int, payload) -> bool:
        """Queue one step's metrics (handed to `send` as they are); False, counted as dropped, when full or closed."""
        if self._closing.is_set():
            return False
        try:
            self._queue.put_nowait((step, payload))
            return True
        except queue.Full:
            with self._lock:
                self.stats.dropped += 1
                first = not self._drop_warned
                self._drop_warned = True
            if first:
                self._warn(f"{self.name} metrics queue is full ({self._queue.maxsize} steps): dropping step metrics "
                           "(counted) until the server takes them again; training continues")
            return False

    def _run(self) -> None:
        while not (self._closing.is_set() and self._queue.empty()):
            try:
                step, payload = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            with self._lock:
                self._busy_since = time.monotonic()
            try:
                self._send(step, payload)
            except Exception as e:  # noqa: BLE001  (a dead server raises whatever its client raises)
                with self._lock:
                    self.stats.failed += 1
                    first = not self._fail_warned
                    self._fail_warned = True
                if first:
                    self._warn(f"{self.name} did not take the metrics of step {step} ({type(e).__name__}: {e}); "
                               "training continues, later failures are counted")
            else:
                with self._lock:
                    self.stats.sent += 1
                    recovered = self._stall_warned or self._fail_warned
                    self._stall_warned = self._fail_warned = self._drop_warned = False
                if recovered:
                    self._warn(f"{self.name} takes metrics again (from step {step})")
            finally:
                with self._lock:
                    self._busy_since = None
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(0.25) and not self._abandoned.is_set():
            with self._lock:
                stalled = self._busy_since is not None and time.monotonic() - self._busy_since > self.stall_after_s
                first = stalled and not self._stall_warned
                if first:
                    self._stall_warned = True
            if first:
                self._warn(f"{self.name} has not answered for {self.stall_after_s:.0f} s (server gone?): training "
                           f"continues; up to {self._queue.maxsize} steps of metrics wait, later ones are dropped")

    def close(self, timeout_s: float = 10.0) -> SinkStats:
        """Deliver what is queued within `timeout_s`, then stop; report (and warn about) what was not delivered."""
        self._closing.set()
        if not self._done.wait(timeout_s):
            self._abandoned.set()
        with self._lock:
            self.stats.undelivered = self._queue.qsize() + (self._busy_since is not None)
        if self.stats.undelivered or self.stats.dropped or self.stats.failed:
            self._warn(f"{self.name} metrics: {self.stats.sent} steps sent, {self.stats.failed} failed, "
                       f"{self.stats.dropped} dropped, {self.stats.undelivered} not delivered within {timeout_s:.0f} s")
        return self.stats

    def __enter__(self) -> "MetricsSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
