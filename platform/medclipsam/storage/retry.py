"""Riding out an object-store outage: which failures are worth repeating, and for how long.

A request that failed because the store is down or restarting (connection refused or cut), slow
(timeouts) or overloaded (HTTP 5xx, 429, SlowDown) may well succeed later; one that failed for what
it asked (no such key, access denied, a malformed name) never will. ``retrying`` repeats the first
kind with exponential backoff and jitter until it succeeds or the budget is spent, then raises
``StorageUnavailable``, one sentence naming the URI, the tries and the last cause. The budget is
``MEDCLIPSAM_STORAGE_RETRY_SECONDS`` (default 120 s); the SDK's own quick retries (botocore's, a few
seconds) happen inside each try. ``fail_fast`` turns the budget off for a block: the first contact
with an input, where an unreachable endpoint is far more often a typo than an outage.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from ..errors import StorageUnavailable, describe
from .environment import number_from_env

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_SECONDS_ENV = "MEDCLIPSAM_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 15.0
OUTAGE = "the object store did not answer"  # how an outage reads in error rows and messages

# Exception types (by name: the storage libraries are optional) that mean "no answer", not "no".
_TRANSIENT_TYPES = {
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "HTTPClientError", "ProxyConnectionError", "ClientConnectorError", "ClientConnectionError",
    "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError", "ClientPayloadError", "FSTimeoutError",
    "IncompleteRead", "ResponseParserError",
}
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}

_fail_fast: ContextVar[bool] = ContextVar("storage_fail_fast", default=False)


_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (or, unless suppressed, while handling)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)


def _verdict(error: BaseException) -> bool | None:
    """True: no answer; False: an answer that is a refusal; None: this exception does not say."""
    if isinstance(error, StorageUnavailable):  # already retried for a whole budget
        return False
    response = getattr(error, "response", None)
    if isinstance(response, dict):  # a botocore ClientError (s3fs wraps it in an OSError)
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        code = response.get("Error", {}).get("Code")
        return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False  # the store answered: no such object, access denied
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__name__ in _TRANSIENT_TYPES:
        return True  # refused, reset, aborted, timed out
    return None


def is_transient(exc: BaseException) -> bool:
    """True when ``exc`` says the store did not answer (directly, or through the exception it came
    from), not that it refused; the outermost exception that says either way decides."""
    for error in _chain(exc):
        verdict = _verdict(error)
        if verdict is not None:
            return verdict
    return False


def retry_budget() -> float:
    """Seconds to keep retrying a transient failure (``MEDCLIPSAM_STORAGE_RETRY_SECONDS``)."""
    return number_from_env(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS, 0, "seconds")


@contextlib.contextmanager
def fail_fast() -> Iterator[None]:
    """Within this block (this thread or task), no retries beyond the SDK's own: a transient failure
    is raised as it came, for the caller to report as an input that cannot be read."""
    token = _fail_fast.set(True)
    try:
        yield
    finally:
        _fail_fast.reset(token)


def retrying(uri: str, func: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
    """``func()``, repeated through transient failures of the store holding ``uri``."""
    if _fail_fast.get():
        return func()
    budget = retry_budget()
    start = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return func()
        except Exception as exc:
            if not is_transient(exc):
                raise
            elapsed = time.monotonic() - start
            if elapsed >= budget:
                raise StorageUnavailable(f"{uri}: {OUTAGE} ({tries} {'try' if tries == 1 else 'tries'} over "
                                         f"{elapsed:.0f} s; last: {describe(exc)})") from exc
            if tries == 1:
                log.warning("%s: %s (%s); retrying for up to %.0f s", uri, OUTAGE, describe(exc), budget)
            delay = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (tries - 1)) * random.uniform(0.5, 1.0)
            sleep(min(delay, budget - elapsed))  # the last wait ends with the budget: one more try then


def stop_on_outage(case_id: str, error: str, output: str, kept: int) -> None:
    """A case failed because the store stopped answering: stop the run (raise), since going on would
    spend a whole retry budget on every remaining case and make each an error row. ``kept`` cases
    finished before it stay under ``output`` for the resume."""
    if OUTAGE in error:
        raise StorageUnavailable(
            f"the run stopped: case {case_id}: {error}. The {kept} finished cases are kept under {output}; "
            "run the same command again to resume once the store answers")
