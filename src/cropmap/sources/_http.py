"""Retry with exponential backoff, shared by the STAC and Earth Engine sources.

Transient failures (HTTP 408/429/5xx, dropped or reset connections, timeouts) are retried with
exponential backoff and jitter; anything else fails at once. ``Retry-After`` is honoured when a
server sends it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import requests
from urllib3.util.retry import Retry

#: HTTP statuses worth retrying: rate limiting and server-side failures.
RETRY_STATUS: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


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


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a ``Retry-After`` header given in seconds (HTTP dates are ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def retry_policy(backoff: Backoff) -> Retry:
    """urllib3 retry policy: 408/429/5xx and connection errors, every method (POST too)."""
    return Retry(
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


def requests_session(backoff: Backoff, headers: dict[str, str] | None = None) -> requests.Session:
    """A ``requests`` session with :func:`retry_policy`."""
    s = requests.Session()
    adapter = requests.adapters.HTTPAdapter(max_retries=retry_policy(backoff))
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    if headers:
        s.headers.update(headers)
    return s
