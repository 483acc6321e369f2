"""Progress: a bar on a terminal, a few concise lines in a log file.

A stage run by Snakemake writes into ``logs/<region>/<stage>.log`` (``cropmap <stage> --log``),
where a redrawn progress bar would leave thousands of carriage-return updates. :class:`Progress`
draws a :mod:`tqdm` bar only when stderr is a terminal and otherwise logs one line per
:data:`STEP` of the work (``stack s2: 40 % (8/20 chunks)``).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import Any, TypeVar

log = logging.getLogger("cropmap.progress")

#: A log line at every this share of the work (without a terminal).
STEP = 0.25

T = TypeVar("T")


def on_terminal() -> bool:
    """Whether progress bars can be drawn: stderr is a TTY and ``TQDM_DISABLE`` is not set."""
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


class Progress:
    """Progress over ``total`` items: a tqdm bar on a terminal, else a log line per :data:`STEP`.

    Use as a context manager and call :meth:`update`, like a tqdm bar.

    Args:
        total: items to do.
        desc: what is counted, e.g. ``stack s2``.
        unit: the item's name, e.g. ``chunk``.
        enabled: ``False`` shows nothing at all.
    """

    def __init__(self, total: int, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit = max(0, int(total)), desc, unit
        self.done = 0
        self._next = STEP
        self._bar: Any = None
        self._quiet = not enabled
        if enabled and on_terminal():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False)

    def update(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self._quiet or not self.total:
            return
        share = self.done / self.total
        if share >= self._next or self.done == self.total:
            log.info("%s: %d %% (%d/%d %ss)", self.desc, round(100 * share), self.done, self.total, self.unit)
            while self._next <= share:
                self._next += STEP

    def close(self) -> None:
        """Remove the bar (no-op in a log)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, unit: str = "it", total: int | None = None) -> Iterator[T]:
    """Iterate over ``items`` showing :class:`Progress` (``total`` defaults to ``len(items)``)."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(n, desc, unit) as bar:
        for item in items:
            yield item
            bar.update()
