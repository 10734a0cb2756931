"""One generation thread behind a bounded queue.

The model is not thread-safe, so every generation runs on this one thread, in arrival order; each
job carries its own messages and options, and the model builds a fresh KV cache and generator per
call, so concurrent requests cannot see each other's state. The event loop only enqueues and reads
events, so health checks and file downloads stay fast while the model works, and a full queue is
refused at once (HTTP 503) rather than growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every slot of the queue (waiting or running) is taken."""


class _Done:
    pass


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Job:
    """A submitted generation; iterate it (async) for its events, `cancel` to drop it."""

    def __init__(self, work: Callable[[], Iterator[Any]], loop: asyncio.AbstractEventLoop):
        self.work = work
        self._loop = loop
        self._events: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop at the next event (the client went away): the slot frees for the next request."""
        self.cancelled.set()

    def emit(self, event: Any) -> None:
        """Called on the worker thread; hands the event to the request's event loop."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutdown): nobody is listening
            self.cancel()

    async def __aiter__(self) -> AsyncIterator[Any]:
        while True:
            event = await self._events.get()
            if isinstance(event, _Done):
                return
            if isinstance(event, _Failed):
                raise event.error
            yield event


class GenerationWorker:
    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"queue capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._pending = 0  # waiting + running
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def full(self) -> bool:
        return self._pending >= self.capacity

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="nextgpt-generation", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the queued jobs finish, then end the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._thread = None

    def submit(self, work: Callable[[], Iterator[Any]]) -> Job:
        """Queue `work` (a generator function run on the worker thread); QueueFull when full."""
        job = Job(work, asyncio.get_running_loop())
        with self._lock:
            if self._pending >= self.capacity:
                raise QueueFull(f"the server is busy: {self._pending} requests are queued")
            self._pending += 1
        self._queue.put(job)
        return job

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            events = None
            try:
                if not job.cancelled.is_set():
                    events = job.work()
                    for event in events:
                        job.emit(event)
                        if job.cancelled.is_set():
                            break
            except Exception as e:  # reported to the request, the thread keeps serving
                if not isinstance(e, ValueError):
                    log.exception("generation failed")
                job.emit(_Failed(e))
            finally:
                if events is not None:
                    events.close()  # a cancelled generation stops here, mid-reply
                with self._lock:
                    self._pending -= 1
                job.emit(_Done())
