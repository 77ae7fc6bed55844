"""Lanes: several networks trained at the same time in one process, each in its own thread.

On a CPU with few cores, one small network's step does not keep every core busy:
every operator is split across the threads and waits for the slowest one. Training
one network per core, each with one thread, keeps the cores busy instead. On a
2-core CPU two single-thread shallow CNNs stepping at once trained 1.3 to 1.4 times
the images/s of one network with two threads.

PyTorch releases the GIL inside its operators, and on a CPU the backward pass runs
in the thread that calls it, so Python threads suffice. A lane trains whole
networks: each network's arithmetic is the same as when it trains alone with one
thread, so results do not depend on the number of lanes or on which lane ran a
network.

``torch.set_num_threads`` acts on the whole process (a worker thread that sets it
changes it for the main thread too), so the thread count of every lane is set once
before the lanes start and restored when they end.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import threading
import time
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from engine.training.autotune import Candidate, make_step, thread_count

Result = TypeVar("Result")

# Models are created under this lock: their initialization draws from the global RNG,
# which ``torch.manual_seed`` resets, so two threads creating models at once would
# interleave their draws.
INIT_LOCK = threading.RLock()


class Cancelled(Exception):
    """Raised in a lane's training when the lanes were stopped; never leaves ``run_in_lanes``."""


Task = Callable[[Callable[[], bool]], Iterable[Result]]


def run_in_lanes(
    tasks: Sequence[tuple[float, Task]],
    lanes: int,
    threads: int = 1,
    follow: Callable[[Result], Sequence[tuple[float, Task]]] | None = None,
) -> Iterator[Result]:
    """Run ``tasks`` in ``lanes`` threads and yield each result as soon as its task produces it.

    ``tasks`` are ``(priority, task)`` pairs. A task is called with a function
    ``cancelled()`` that it should check between epochs, raising any exception to
    stop, and returns the results of its networks. Whenever a lane is free it starts
    the ready task of highest priority (its estimated seconds, so the longest starts
    first and the lanes finish together). ``follow``, called with each result before
    it is yielded, returns further tasks that the result made possible (the N2 of a
    finished N1).

    When a task raises, no further task starts, the running ones are cancelled and
    finish their epoch, their finished results are still yielded, and then the first
    exception is raised. Closing the iterator (for example on Ctrl-C) cancels the
    same way and waits for the running tasks' epochs to end.
    """
    cancel = threading.Event()
    results: list[Result] = []
    lock = threading.Lock()
    ready = threading.Condition(lock)
    queue: list[tuple[float, int, Task]] = []
    order = itertools.count()

    def run(task: Task) -> None:
        torch.set_num_threads(threads)
        if cancel.is_set():
            raise Cancelled()
        for result in task(cancel.is_set):
            with ready:
                results.append(result)
                ready.notify()

    def add(items: Sequence[tuple[float, Task]]) -> None:
        for priority, task in items:
            heapq.heappush(queue, (-priority, next(order), task))

    with thread_count(threads):
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="lane")
        running: set[concurrent.futures.Future] = set()

        def start_ready() -> None:
            while queue and len(running) < lanes and not cancel.is_set():
                future = pool.submit(run, heapq.heappop(queue)[2])
                future.add_done_callback(lambda _: _notify(ready))
                running.add(future)

        add(tasks)
        start_ready()
        error: BaseException | None = None
        try:
            while running or results:
                with ready:
                    if not results and not any(f.done() for f in running):
                        ready.wait(timeout=1.0)
                    batch, results[:] = list(results), []
                for result in batch:
                    if follow is not None and not cancel.is_set():
                        add(follow(result))
                    start_ready()
                    yield result
                for future in [f for f in running if f.done()]:
                    running.discard(future)
                    failure = future.exception()
                    if failure is not None and not isinstance(failure, Cancelled) and error is None:
                        error = failure
                        cancel.set()
                        queue.clear()
                start_ready()
        finally:
            cancel.set()
            pool.shutdown(wait=True, cancel_futures=True)
        if error is not None:
            raise error


def _notify(condition: threading.Condition) -> None:
    with condition:
        condition.notify()


def measure_lanes(
    model: torch.nn.Module,
    singles: Sequence[Candidate],
    input_shape: Sequence[int],
    batch_size: int,
    precision: str,
    device: torch.device,
    lanes: int,
    budget_s: float,
    windows: int = 4,
) -> tuple[float, dict[str, float]]:
    """Return the images/s of ``lanes`` copies of ``model`` stepping at once, and of one copy per candidate.

    Each lane runs the trainer's eager step (see ``autotune.make_step``) with one
    thread in a thread of its own, kept for all windows and warmed up in that
    thread. Windows of the lanes and of one network under each of ``singles`` (a
    layout and thread count, by label) alternate, ``windows`` of each, about
    ``budget_s / windows`` seconds long, so load from other processes hits all alike. Each
    throughput is images over time in all windows, summed over the lanes. The fastest window,
    which ranks the other candidates, would favour the one network: with several
    threads it is the one that a descheduled thread stalls, and a single window
    often escapes that. The first error of a lane is raised here, and the global RNG
    is left as it was.
    """
    lane = Candidate(singles[0].channels_last, "off", 1)
    with torch.random.fork_rng(devices=[]):
        with thread_count(1):
            steps = [make_step(model, lane, input_shape, batch_size, precision, device) for _ in range(lanes)]
        alone = {c.label: (c, make_step(model, c, input_shape, batch_size, precision, device)) for c in singles}
    window_s = budget_s / windows
    counts, seconds = [0] * lanes, [0.0] * lanes
    barriers = warm, start, end = [threading.Barrier(lanes + 1) for _ in range(3)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            torch.set_num_threads(1)
            steps[index](0)
            warm.wait()
            for _ in range(windows):
                start.wait()
                count, spent_s = _timed_window(steps[index], counts[index], window_s)
                counts[index] += count
                seconds[index] += spent_s
                end.wait()
        except threading.BrokenBarrierError:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            errors.append(exc)
            for barrier in barriers:
                barrier.abort()

    def wait(barrier: threading.Barrier) -> None:
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            raise errors[0] if errors else RuntimeError("a lane stopped while timing the lanes") from None

    images, spent = dict.fromkeys(alone, 0), dict.fromkeys(alone, 0.0)
    workers = [threading.Thread(target=run, args=(index,), name=f"lane-timing-{index}") for index in range(lanes)]
    try:
        with thread_count(1):
            for worker in workers:
                worker.start()
            # The thread count is the process's, so the one network's warm-up waits for the lanes'.
            wait(warm)
        for candidate, step in alone.values():
            with thread_count(candidate.threads):
                step(0)
        for _ in range(windows):
            with thread_count(1):
                wait(start)
                wait(end)
            for label, (candidate, step) in alone.items():
                with thread_count(candidate.threads):
                    count, spent_s = _timed_window(step, 0, window_s)
                spent[label] += spent_s
                images[label] += count * batch_size
    finally:
        # On an error or Ctrl-C the lanes stop at their next barrier; each ends its step first.
        for barrier in barriers:
            barrier.abort()
        for worker in workers:
            worker.join()
    # Each lane's own steps over its own time: a lane that finishes its window first
    # and waits for the others is not counted as running.
    together = sum(count * batch_size / spent_s for count, spent_s in zip(counts, seconds))
    return together, {label: images[label] / spent[label] for label in alone}


def _timed_window(step: Callable[[int], None], done: int, window_s: float) -> tuple[int, float]:
    """Run ``step`` (numbered on from ``done``) for at least one step and ``window_s``; return the steps and seconds."""
    began, count = time.perf_counter(), 0
    while count == 0 or time.perf_counter() - began < window_s:
        count += 1
        step(done + count)
    return count, time.perf_counter() - began
