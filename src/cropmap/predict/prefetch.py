"""Reading ahead: :func:`prefetch` runs producers in reader threads with bounded memory, and the
decoded-cell cache (:class:`CellCache`) they share.

Generic (nothing here knows about models or rasters): :mod:`cropmap.predict.pixels` and
:mod:`cropmap.predict.chips` produce ready batches with it while the model thread runs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from cropmap.progress import Progress


class CellCache:
    """Decoded unit cells shared by the reader threads of one tile (small LRU, decode once per key)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._items: OrderedDict[Any, Future] = OrderedDict()

    def get(self, key: Any, load: Callable[[], Any]) -> Any:
        with self._lock:
            fut = self._items.get(key)
            owner = fut is None
            if fut is None:
                fut = Future()
                self._items[key] = fut
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            else:
                self._items.move_to_end(key)
        if owner:
            try:
                fut.set_result(load())
            except BaseException as exc:
                fut.set_exception(exc)
                with self._lock:
                    self._items.pop(key, None)
                raise
        return fut.result()


class _Stop(Exception):
    """The consumer went away: the producer stops."""


_END = object()


class _Error:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def counted(items: Iterable[tuple[Any, Any]], bar: Any) -> Iterator[tuple[Any, Any]]:
    """The ``(meta, batch)`` items of a producer; a ``(meta, None)`` marks a finished block and
    advances the progress ``bar`` instead of being yielded."""
    for meta, batch in items:
        if batch is None:
            bar.update()
            continue
        yield meta, batch


def prefetch(units: Iterable[Any], produce: Callable[[Any, Callable[[Any], None]], None], readers: int,
             depth: int = 2) -> Iterator[Any]:
    """Items that ``produce(unit, put)`` puts, unit after unit, produced ahead in reader threads.

    Up to ``readers + 1`` units are in flight, each holding at most ``depth`` produced items
    that the consumer has not taken yet, so memory is bounded whatever the number of units.
    Exceptions in a producer are raised in the consumer.
    """
    stop = threading.Event()
    it = iter(units)
    pending: deque[queue.Queue] = deque()

    def job(unit: Any, q: queue.Queue) -> None:
        def put(item: Any) -> None:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue
            raise _Stop

        try:
            produce(unit, put)
            put(_END)
        except _Stop:
            pass
        except BaseException as exc:  # handed to the consumer
            with contextlib.suppress(_Stop):
                put(_Error(exc))

    ex = ThreadPoolExecutor(max(1, readers), thread_name_prefix="cropmap-read")

    def submit() -> None:
        unit = next(it, _END)
        if unit is not _END:
            q: queue.Queue = queue.Queue(maxsize=max(1, depth))
            ex.submit(job, unit, q)
            pending.append(q)

    try:
        for _ in range(max(1, readers) + 1):
            submit()
        while pending:
            q = pending.popleft()
            while (item := q.get()) is not _END:
                if isinstance(item, _Error):
                    raise item.exc
                yield item
            submit()
    finally:
        stop.set()
        ex.shutdown(wait=True, cancel_futures=True)


def progress_bar(total: int, enabled: bool, desc: str) -> Progress:
    """Progress over ``total`` read units: a bar on a terminal, a few lines in a log
    (:class:`cropmap.progress.Progress`; nothing when not ``enabled`` or ``TQDM_DISABLE`` is set)."""
    return Progress(total, desc, "block", enabled=enabled)
