"""Retry with exponential backoff, shared by the STAC and Earth Engine sources.

Transient failures (HTTP 429 and 5xx, dropped or reset connections, timeouts) are retried
with exponential backoff and jitter; anything else fails at once. ``Retry-After`` is honoured
when a server sends it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import requests
from urllib3.util.retry import Retry

log = logging.getLogger(__name__)

T = TypeVar("T")

#: HTTP statuses worth retrying: rate limiting and server-side failures.
RETRY_STATUS: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


class TransientError(RuntimeError):
    """A failure that a later attempt may not see (429, 5xx, dropped connection)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: attempt ``k`` (0-based) waits ``base * 2**k`` seconds, capped.

    Attributes:
        retries: retries after the first attempt (0 = no retry).
        base: first delay in seconds.
        cap: longest delay in seconds.
    """

    retries: int = 5
    base: float = 1.0
    cap: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt + 1`` (with +-25 % jitter)."""
        d = min(self.cap, self.base * (2.0**attempt)) * (0.75 + 0.5 * random.random())
        if retry_after is not None:
            d = max(d, min(self.cap, retry_after))
        return d

    @classmethod
    def from_options(cls, options: dict) -> Backoff:
        """``options["retries"]`` (default 5) and ``options["backoff"]`` (seconds, default 1)."""
        return cls(retries=int(options.get("retries", 5)), base=float(options.get("backoff", 1.0)))


def retry_call(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    what: str,
    transient: tuple[type[BaseException], ...] = (TransientError, ConnectionError, TimeoutError),
) -> T:
    """Call ``fn`` until it succeeds, retrying transient failures with backoff.

    Args:
        fn: the call.
        backoff: retry count and delays.
        what: short description for the log (never a secret).
        transient: exception types that are retried; others propagate at once.

    Returns:
        What ``fn`` returns.

    Raises:
        The last transient exception once the retries are spent.
    """
    for attempt in range(backoff.retries + 1):
        try:
            return fn()
        except transient as e:
            if attempt >= backoff.retries:
                raise
            wait = backoff.delay(attempt, getattr(e, "retry_after", None))
            log.warning("%s failed (%s); retry %d/%d in %.1f s", what, e, attempt + 1, backoff.retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a ``Retry-After`` header given in seconds (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def requests_session(backoff: Backoff, headers: dict[str, str] | None = None) -> requests.Session:
    """A ``requests`` session retrying 429/5xx and connection errors on every method (POST too)."""
    retry = Retry(
        total=backoff.retries,
        connect=backoff.retries,
        read=backoff.retries,
        status=backoff.retries,
        other=backoff.retries,
        backoff_factor=backoff.base,
        backoff_max=backoff.cap,
        status_forcelist=sorted(RETRY_STATUS),
        allowed_methods=None,
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    s = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if headers:
        s.headers.update(headers)
    return s
