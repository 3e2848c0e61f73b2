"""Micro-batching inference engine.

`Batcher` groups concurrent requests: each `submit_many` puts (rows, future) per block on a
bounded deque and sets an event; one worker task takes the first waiting item,
keeps collecting until `max_batch` rows or `max_delay_s` have passed, runs ONE
call of `run_batch` in a dedicated thread (off the event loop), checks its result
has one row per input row, and resolves each request's future with its rows of it.
The result is one object that slices by row (`Verdicts`, an array) or a tuple of
arrays (each sliced alike, e.g. raw model outputs). A batch's exception is set on every one of its futures.
A full queue raises `QueueFullError` at once (the API answers 503 + Retry-After).

Closing (a reload retiring the old version, or shutdown) refuses new requests but
finishes the admitted ones: those queued and those holding a `Ticket` taken before
the close, which may still be reading their upload when it begins.

`ModelRuntime` binds a `LoadedModel` to a Batcher whose `run_batch` is the version's
inference runtime (ONNX Runtime or OpenVINO, whichever app/runtimes.py chose) + `geodesic_verdict`:
`classify` answers the `Verdicts` of its rows, the very object the rule made (the routes map it to
the response and the metrics).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
from numpy.typing import NDArray

from app.model_store import LoadedModel
from app.verdict import Verdicts, geodesic_verdict

log = logging.getLogger("dsphere.engine")

R = TypeVar("R")  # the type run_batch returns; each request receives its own rows of one


class EngineError(Exception):
    """Base of engine errors."""


class QueueFullError(EngineError):
    def __init__(self, queue_size: int) -> None:
        super().__init__(f"inference queue is full ({queue_size} waiting requests); retry shortly")


class EngineClosedError(EngineError):
    def __init__(self) -> None:
        super().__init__("inference engine is shutting down")


class Ticket:
    """Announces a request that will submit soon (it is still reading/decoding its input).

    The worker waits (up to max_delay) to fill a batch only while tickets are open:
    with nothing on its way, a lone request runs at once instead of idling out the delay.
    A ticket taken before the Batcher began closing also admits its request: submitted
    with it, the rows are still run, and the worker stops only once every ticket is closed.
    Close it (or submit with it) exactly once; closing twice is harmless.
    """

    def __init__(self, on_close: Callable[[], None], admitted: bool) -> None:
        self._on_close: Callable[[], None] | None = on_close
        self.admitted = admitted

    @property
    def open(self) -> bool:
        return self._on_close is not None

    def close(self) -> None:
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close()

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class _Item(Generic[R]):
    x: NDArray[np.float32]
    future: asyncio.Future[R]


def _row_counts(result: Any) -> list[int]:
    """Rows in each part of a batch's result: every array of a tuple (or list), else the result itself."""
    return [len(part) for part in result] if isinstance(result, tuple | list) else [len(result)]


def _rows(result: Any, start: int, end: int) -> Any:
    """Rows start..end-1 of a batch's result (of each array of a tuple or list, as a tuple)."""
    return tuple(part[start:end] for part in result) if isinstance(result, tuple | list) else result[start:end]


class Batcher(Generic[R]):
    def __init__(
        self,
        run_batch: Callable[[NDArray[np.float32]], R],
        max_batch: int,
        max_delay_s: float,
        queue_size: int,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "batcher",
        inline_max_s: float = 0.0,
    ) -> None:
        self._run_batch = run_batch
        # A request alone (nothing queued, no other ticket open, no batch running) batches with nothing:
        # it runs at once in its own task, on the event loop, when a batch costs at most inline_max_s
        # (the moving average of the batches run so far, seeded by `seed_cost`); else in the thread.
        self.inline_max_s = inline_max_s
        self._cost_s = float("inf")
        self._running = False
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.queue_size = queue_size
        self._on_batch = on_batch
        self._on_queue_depth = on_queue_depth
        self._pending: collections.deque[_Item[R]] = collections.deque()
        self._event = asyncio.Event()
        self._closing = False
        self._stopped = False  # the worker has ended: nothing queued from now on would run
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._name = name
        self._arriving = 0  # open tickets: requests still preparing their input

    @property
    def depth(self) -> int:
        return len(self._pending)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name=self._name)

    def ticket(self) -> Ticket:
        """Announce a request that is on its way (still reading its upload).

        Raises QueueFullError at once when the queue is already full: the request would almost
        surely be refused after its upload is read and decoded, and under a burst that wasted work
        is what starves the accepted requests. (The queue is checked again on submit.)
        """
        if not self._closing and len(self._pending) >= self.queue_size:
            raise QueueFullError(self.queue_size)
        self._arriving += 1
        return Ticket(self._ticket_closed, admitted=not self._closing)

    def _ticket_closed(self) -> None:
        self._arriving -= 1
        self._event.set()

    async def submit_many(self, xs: Sequence[NDArray[np.float32]], ticket: Ticket | None = None) -> list[R]:
        """Queue the blocks `xs` together (one queue slot each, all or none), then close `ticket`.

        While closing, only a request admitted by an open ticket taken before the close is queued.
        """
        admitted = ticket is not None and ticket.open and ticket.admitted
        if (len(xs) == 1 and not self._pending and not self._running and not self._closing and not self._stopped
                and self._arriving == (1 if admitted else 0) and self._cost_s <= self.inline_max_s):
            if ticket is not None:
                ticket.close()
            return [self._execute(xs[0])]
        try:
            if self._stopped or (self._closing and not admitted):
                raise EngineClosedError()
            # an empty queue takes any request, even one of more blocks than the queue holds
            # (a large batch upload on a small queue would otherwise be refused forever)
            if self._pending and len(self._pending) + len(xs) > self.queue_size:
                raise QueueFullError(self.queue_size)
            loop = asyncio.get_running_loop()
            items: list[_Item[R]] = [_Item(x, loop.create_future()) for x in xs]
            self._pending.extend(items)
            self._depth_changed()
            self._event.set()
        finally:
            if ticket is not None:  # after queueing: a closing worker sees the rows before the ticket goes
                ticket.close()
        return list(await asyncio.gather(*(it.future for it in items)))

    def _depth_changed(self) -> None:
        if self._on_queue_depth is not None:
            self._on_queue_depth(len(self._pending))

    def _rows_pending(self) -> int:
        return sum(len(it.x) for it in self._pending)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                if self._closing and self._arriving == 0:  # admitted requests may still submit
                    return
                self._event.clear()
                await self._event.wait()
            # Collect until max_batch rows, or the delay after the first item has passed,
            # or no announced request (ticket) is still on its way.
            deadline = loop.time() + self.max_delay_s
            while self._rows_pending() < self.max_batch and not self._closing and self._arriving > 0:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._event.clear()
                try:
                    await asyncio.wait_for(self._event.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            self._depth_changed()
            if batch:
                await self._run(loop, batch)

    def _take(self) -> list[_Item[R]]:
        batch: list[_Item[R]] = []
        rows = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # cancelled by a client that went away
                self._pending.popleft()
                continue
            if batch and rows + len(item.x) > self.max_batch:
                break
            self._pending.popleft()
            batch.append(item)
            rows += len(item.x)
        return batch

    def seed_cost(self, seconds: float) -> None:
        """What one batch costs before any was served (the warm-up's measurement)."""
        self._cost_s = seconds

    def _timed(self, x: NDArray[np.float32]) -> R:
        t0 = time.perf_counter()
        result = self._run_batch(x)
        dt = time.perf_counter() - t0
        self._cost_s = dt if self._cost_s == float("inf") else 0.9 * self._cost_s + 0.1 * dt
        return result

    def _checked(self, result: R, n: int) -> R:
        counts = _row_counts(result)
        if not counts or any(c != n for c in counts):
            raise EngineError(f"model returned {counts} rows for {n} inputs")
        return result

    def _execute(self, x: NDArray[np.float32]) -> R:
        """One request's rows run at once on the calling thread (the event loop): see `inline_max_s`."""
        n = len(x)
        if self._on_batch is not None:
            self._on_batch(n)
        try:
            return self._checked(self._timed(x), n)
        except Exception:
            log.exception("batch of %d rows failed", n)
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Item[R]]) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([it.x for it in batch], axis=0)
        n = len(x)
        if self._on_batch is not None:
            self._on_batch(n)
        self._running = True
        try:
            result = self._checked(await loop.run_in_executor(self._executor, self._timed, x), n)
        except Exception as exc:  # set the batch's exception on every future
            log.exception("batch of %d rows failed", n)
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(exc)
            return
        finally:
            self._running = False
        start = 0
        for it in batch:
            end = start + len(it.x)
            if not it.future.done():
                it.future.set_result(_rows(result, start, end))
            start = end

    async def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, finish every admitted one (queued, or holding a ticket taken
        before the close), stop the worker; after `timeout` the rest fail with EngineClosedError."""
        self._closing = True
        self._event.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except TimeoutError:
                self._task.cancel()
                for it in self._pending:
                    if not it.future.done():
                        it.future.set_exception(EngineClosedError())
        self._stopped = True
        self._executor.shutdown(wait=False)


class ModelRuntime:
    """One loaded model version serving through its own Batcher."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        rho: float | None,
        max_batch: int,
        max_delay_s: float,
        queue_size: int,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
        inline_max_s: float = 0.0,
    ) -> None:
        self.model = model
        m = model.manifest
        self.rho = float(rho if rho is not None else m.rho)
        self._mean = np.asarray(m.angle_mean_deg, np.float64)
        self._std = np.asarray(m.angle_std_deg, np.float64)
        self.input_shape: tuple[int, int, int] = m.input.shape
        self.batcher: Batcher[Verdicts] = Batcher(
            self._run_batch,
            max_batch=max_batch,
            max_delay_s=max_delay_s,
            queue_size=queue_size,
            on_batch=on_batch,
            on_queue_depth=on_queue_depth,
            name=f"infer-{model.name}-{model.version}",
            inline_max_s=inline_max_s,
        )
        self.warmed = False

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def version(self) -> str:
        return self.model.version

    def run_model(self, x: NDArray[np.float32]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """Raw outputs of the inference runtime (logits, cosines) for x of shape [N, C, H, W]."""
        logits, cosines = self.model.runner(x)
        return np.asarray(logits), np.asarray(cosines)

    def _run_batch(self, x: NDArray[np.float32]) -> Verdicts:
        logits, cosines = self.run_model(x)
        return geodesic_verdict(logits, cosines, self._mean, self._std, self.rho)

    def warmup(self) -> None:
        """One blocking call at batch size 1 and max batch size (allocations, kernels)."""
        t0 = time.perf_counter()
        for n in sorted({1, self.batcher.max_batch}):
            self._run_batch(np.zeros((n, *self.input_shape), np.float32))
        one = np.zeros((1, *self.input_shape), np.float32)
        costs = []
        for _ in range(5):  # what a lone request's batch costs, warm (Batcher.inline_max_s)
            t1 = time.perf_counter()
            self._run_batch(one)
            costs.append(time.perf_counter() - t1)
        self.batcher.seed_cost(float(np.median(costs)))
        self.warmed = True
        log.info("warmed %s/%s in %.1f ms", self.name, self.version, (time.perf_counter() - t0) * 1e3)

    def start(self) -> None:
        self.batcher.start()

    def ticket(self) -> Ticket:
        return self.batcher.ticket()

    async def classify(self, x: NDArray[np.float32], ticket: Ticket | None = None) -> Verdicts:
        """Verdicts for x of shape [N, C, H, W] (or one [C, H, W]); N > max_batch is split."""
        if x.ndim == 3:
            x = x[None]
        step = self.batcher.max_batch
        parts = await self.batcher.submit_many([x[i : i + step] for i in range(0, len(x), step)], ticket)
        return parts[0] if len(parts) == 1 else Verdicts.concat(parts)

    async def close(self, timeout: float | None = 30.0) -> None:
        await self.batcher.close(timeout)
