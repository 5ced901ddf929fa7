"""Retrying a call to the API server until it answers, as a kubelet retries its writes.

A transient failure (no connection, a reset, a timeout, HTTP 429 or 5xx) is retried
with capped exponential backoff; any other failure is raised at once, for the caller to
judge (404 on a pod that is already gone is an answer, not an outage). There is no limit
on attempts: a pod's terminal status that is dropped leaves its Job waiting forever, so
the only thing that ends the retrying is ``stop`` (the agent shutting down) or the
caller's ``give_up`` (the write has been overtaken, e.g. a Running status once the
container has exited).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import urllib3
from kubernetes.client.rest import ApiException

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``initial``, then times ``factor``, never above ``cap``."""

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 5.0

    def delay(self, failures: int) -> float:
        """Seconds to wait after the ``failures``-th failure in a row (counting from 1)."""
        if failures < 1:
            return 0.0
        return float(min(self.initial * self.factor ** (failures - 1), self.cap))


class Stopped(Exception):
    """The retrying ended (shutdown or give-up) before the call succeeded."""


def is_transient(error: BaseException) -> bool:
    """Whether the API server may well answer if asked again a little later."""
    if isinstance(error, ApiException):
        status = error.status or 0  # 0 or None: the client never got an HTTP answer
        return status in {0, 429} or status >= 500
    return isinstance(error, urllib3.exceptions.HTTPError | OSError | TimeoutError)


def retry(
    call: Callable[[], T],
    *,
    stop: threading.Event,
    give_up: Callable[[], bool] = lambda: False,
    backoff: Backoff = Backoff(),
    transient: Callable[[BaseException], bool] = is_transient,
    on_failure: Callable[[int, BaseException], None] | None = None,
) -> T:
    """``call()`` until it returns; wait ``backoff`` between transient failures.

    A failure that is not ``transient`` propagates unchanged. ``Stopped`` is raised when
    ``stop`` is set or ``give_up()`` holds after a failed attempt; ``on_failure`` sees
    each transient failure with its number in the current run of failures (for logs).
    """
    failures = 0
    while True:
        try:
            return call()
        except Exception as error:
            if not transient(error):
                raise
            failures += 1
            if on_failure is not None:
                on_failure(failures, error)
            if stop.wait(backoff.delay(failures)) or give_up():
                raise Stopped(f"gave up after {failures} failed attempt(s): {error}") from error
