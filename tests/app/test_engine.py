"""Micro-batcher: deterministic (events and a fake runner, no sleeps)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from app.engine import Batcher, EngineClosedError, EngineError, QueueFullError


class FakeRunner:
    def __init__(self, block: bool = False) -> None:
        self.calls: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()

    def __call__(self, x: np.ndarray):
        self.calls.append(len(x))
        self.started.set()
        self.release.wait(10)
        return (x[:, 0] * 2, x[:, 0] + 1)


def rows(*vals: float) -> np.ndarray:
    return np.array([[v] for v in vals], np.float32)


def run(coro):
    return asyncio.run(coro)


async def submit(b: Batcher, x: np.ndarray, ticket=None):
    """One block through the path ModelRuntime.classify takes (submit_many); its rows of the result."""
    (out,) = await b.submit_many([x], ticket)
    return out


def test_groups_up_to_max_batch_without_waiting_for_delay() -> None:
    async def main() -> None:
        runner = FakeRunner()
        sizes: list[int] = []
        b = Batcher(runner, max_batch=4, max_delay_s=60.0, queue_size=100, on_batch=sizes.append)
        b.start()
        results = await asyncio.gather(*(submit(b, rows(i)) for i in range(8)))
        assert runner.calls == [4, 4] and sizes == [4, 4]
        for i, (a, c) in enumerate(results):
            assert a.tolist() == [2.0 * i] and c.tolist() == [i + 1.0]
        await b.close()

    run(main())


def test_returns_on_timeout_with_partial_batch() -> None:
    async def main() -> None:
        runner = FakeRunner()
        b = Batcher(runner, max_batch=64, max_delay_s=0.001, queue_size=100)
        b.start()
        a, c = await submit(b, rows(1, 2, 3))
        assert a.tolist() == [2, 4, 6] and runner.calls == [3]
        await b.close()

    run(main())


def test_waits_for_announced_requests_until_delay() -> None:
    """With a ticket open the worker waits (up to the delay) for it; it runs when it arrives."""

    async def main() -> None:
        runner = FakeRunner()
        b = Batcher(runner, max_batch=64, max_delay_s=60.0, queue_size=100)
        b.start()
        ticket = b.ticket()
        first = asyncio.ensure_future(submit(b, rows(1)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not first.done() and b.depth == 1  # waiting for the announced request
        second = await submit(b, rows(2), ticket)
        assert (await first)[0].tolist() == [2] and second[0].tolist() == [4]
        assert runner.calls == [2]
        # a ticket that never submits: the batch goes at the delay
        b.max_delay_s = 0.001
        with b.ticket():
            a, _ = await submit(b, rows(3))
        assert a.tolist() == [6] and runner.calls == [2, 1]
        await b.close()

    run(main())


def test_multi_row_items_are_not_split_and_respect_max_batch() -> None:
    async def main() -> None:
        runner = FakeRunner()
        b = Batcher(runner, max_batch=4, max_delay_s=60.0, queue_size=100)
        b.start()
        r = await asyncio.gather(submit(b, rows(1, 2, 3)), submit(b, rows(4, 5)), submit(b, rows(6, 7)))
        assert runner.calls == [3, 4]
        assert [x[0].tolist() for x in r] == [[2, 4, 6], [8, 10], [12, 14]]
        await b.close()

    run(main())


def test_queue_full_raises_immediately() -> None:
    async def main() -> None:
        runner = FakeRunner(block=True)
        depths: list[int] = []
        b = Batcher(runner, max_batch=1, max_delay_s=0.0, queue_size=2, on_queue_depth=depths.append)
        b.start()
        first = asyncio.ensure_future(submit(b, rows(0)))
        await asyncio.to_thread(runner.started.wait, 10)  # first batch is running, queue empty
        waiting = [asyncio.ensure_future(submit(b, rows(i))) for i in (1, 2)]
        await asyncio.sleep(0)  # let them enqueue
        with pytest.raises(QueueFullError, match=r"inference queue is full \(2 waiting requests\)"):
            await submit(b, rows(3))
        assert b.depth == 2
        runner.release.set()
        assert [(await f)[0].tolist() for f in (first, *waiting)] == [[0], [2], [4]]
        assert depths[-1] == 0
        await b.close()

    run(main())


def test_ticket_refused_at_the_door_when_the_queue_is_full() -> None:
    """A request arriving at a full queue is refused before its upload is read."""

    async def main() -> None:
        runner = FakeRunner(block=True)
        b = Batcher(runner, max_batch=1, max_delay_s=0.0, queue_size=1)
        b.start()
        first = asyncio.ensure_future(submit(b, rows(0)))
        await asyncio.to_thread(runner.started.wait, 10)  # running, queue empty
        t = b.ticket()  # room in the queue: admitted at the door
        waiting = asyncio.ensure_future(submit(b, rows(1), t))
        await asyncio.sleep(0)
        assert b.depth == 1
        with pytest.raises(QueueFullError):
            b.ticket()
        assert b._arriving == 0  # the refused ticket left no trace
        runner.release.set()
        assert [(await f)[0].tolist() for f in (first, waiting)] == [[0], [2]]
        b.ticket().close()  # room again
        await b.close()

    run(main())


def test_empty_queue_takes_a_request_larger_than_the_queue() -> None:
    """A batch upload of more blocks than the queue holds is refused only while others wait,
    never forever."""

    async def main() -> None:
        runner = FakeRunner(block=True)
        b = Batcher(runner, max_batch=1, max_delay_s=0.0, queue_size=2)
        b.start()
        big = asyncio.ensure_future(b.submit_many([rows(1), rows(2), rows(3)]))
        await asyncio.to_thread(runner.started.wait, 10)  # first block running, two queued
        with pytest.raises(QueueFullError):
            await b.submit_many([rows(4), rows(5), rows(6)])
        runner.release.set()
        assert [r[0].tolist() for r in await big] == [[2], [4], [6]]
        await b.close()

    run(main())


def test_exception_set_on_every_future_of_the_batch() -> None:
    async def main() -> None:
        def boom(x: np.ndarray):
            raise RuntimeError("kaput")

        b = Batcher(boom, max_batch=3, max_delay_s=60.0, queue_size=10)
        b.start()
        res = await asyncio.gather(*(submit(b, rows(i)) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, RuntimeError) and str(r) == "kaput" for r in res)
        await b.close()

    run(main())


def test_output_row_mismatch_fails_batch() -> None:
    async def main() -> None:
        b = Batcher(lambda x: (x[:-1, 0],), max_batch=2, max_delay_s=60.0, queue_size=10)
        b.start()
        res = await asyncio.gather(submit(b, rows(1)), submit(b, rows(2)), return_exceptions=True)
        assert all(isinstance(r, EngineError) and "returned [1] rows for 2 inputs" in str(r) for r in res)
        await b.close()

    run(main())


def test_close_drains_queued_requests_then_refuses() -> None:
    async def main() -> None:
        runner = FakeRunner(block=True)
        b = Batcher(runner, max_batch=1, max_delay_s=0.0, queue_size=10)
        b.start()
        futs = [asyncio.ensure_future(submit(b, rows(i))) for i in range(3)]
        await asyncio.to_thread(runner.started.wait, 10)
        closing = asyncio.ensure_future(b.close())
        await asyncio.sleep(0)
        with pytest.raises(EngineClosedError):
            await submit(b, rows(9))
        runner.release.set()
        await closing
        assert [(await f)[0].tolist() for f in futs] == [[0], [2], [4]]
        assert runner.calls == [1, 1, 1]

    run(main())


def test_close_still_runs_requests_admitted_by_a_ticket() -> None:
    """A reload closes the old batcher while requests holding its tickets are still reading their
    upload: those are run (not refused), the worker waits for them, later tickets are refused."""

    async def main() -> None:
        runner = FakeRunner()
        b = Batcher(runner, max_batch=4, max_delay_s=0.0, queue_size=10)
        b.start()
        before = b.ticket()
        closing = asyncio.ensure_future(b.close())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not closing.done()  # waiting for the admitted request
        after = b.ticket()
        with pytest.raises(EngineClosedError):
            await submit(b, rows(9), after)
        res = await b.submit_many([rows(1, 2), rows(3)], before)
        assert [r[0].tolist() for r in res] == [[2, 4], [6]] and runner.calls == [3]
        await closing
        with pytest.raises(EngineClosedError):
            await submit(b, rows(4), b.ticket())

    run(main())


def test_cancelled_request_is_skipped() -> None:
    async def main() -> None:
        runner = FakeRunner(block=True)
        b = Batcher(runner, max_batch=8, max_delay_s=0.0, queue_size=10)
        b.start()
        first = asyncio.ensure_future(submit(b, rows(0)))
        await asyncio.to_thread(runner.started.wait, 10)
        gone = asyncio.ensure_future(submit(b, rows(1)))
        kept = asyncio.ensure_future(submit(b, rows(2)))
        await asyncio.sleep(0)
        gone.cancel()
        runner.release.set()
        await first
        assert (await kept)[0].tolist() == [4]
        assert runner.calls == [1, 1]
        await b.close()

    run(main())


def test_a_lone_cheap_request_runs_inline_and_a_batch_in_the_thread() -> None:
    """A request alone (nothing queued, no other ticket, no batch running) with a batch cost under
    inline_max_s runs at once on the event loop's thread: no hop that batches nothing. With another
    request on its way (an open ticket) it is queued and batched in the batch thread as before."""
    async def main() -> None:
        where: list[int] = []

        def runner(x: np.ndarray):
            where.append(threading.get_ident())
            return x[:, 0] * 2

        sizes: list[int] = []
        b = Batcher(runner, max_batch=4, max_delay_s=60.0, queue_size=100, on_batch=sizes.append, inline_max_s=1.0)
        b.seed_cost(1e-6)
        b.start()
        with b.ticket() as t:
            out = await submit(b, rows(3), t)
        assert out.tolist() == [6.0] and where == [threading.get_ident()] and sizes == [1]
        first, second = b.ticket(), b.ticket()
        results = await asyncio.gather(submit(b, rows(1), first), submit(b, rows(2), second))
        assert [r.tolist() for r in results] == [[2.0], [4.0]]
        assert sizes == [1, 2] and where[1] != threading.get_ident()  # batched together, in the thread
        b.seed_cost(2.0)  # dearer than inline_max_s: the thread even alone
        assert (await submit(b, rows(5))).tolist() == [10.0] and where[2] != threading.get_ident()
        await b.close()

    run(main())
