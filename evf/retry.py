"""Retrying storage operations through transient faults, and telling transient faults from permanent ones.

Three layers act on an S3 operation, innermost first:

1. botocore retries each HTTP request (``standard`` mode, ``RetryPolicy.request_attempts`` tries, waits
   of ``uniform(0, 2**n)`` s): blips are absorbed inside any call, including the ranged reads behind
   an open file handle (Parquet) and listings that no caller wraps. Set on every S3 filesystem that
   :func:`evf.storage.open_filesystem` creates, unless the caller's options already configure retries.
2. s3fs retries connection resets, read timeouts and ``SlowDown`` replies 5 times within ~2 s (built
   in, not configurable through storage options).
3. :func:`call_with_retry` retries a whole operation (``evf.io.read_bytes``, ``write_bytes``, a commit
   write, a listing) while :func:`is_retryable` says the error is transient, with bounded exponential
   backoff and jitter: wait ``n`` (n = 0, 1, ...) is ``min(first_wait_s * 2**n, max_wait_s) +
   uniform(0, jitter_s)``, at most ``attempts`` tries in all. This layer rides out outages of tens of seconds.

:func:`is_retryable` is the one classification of errors: the job marks an error row ``retryable``
with it, and layer 3 retries exactly what it accepts.
"""

from __future__ import annotations

import errno
import logging
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

__all__ = ["DEFAULT_RETRY_POLICY", "RetryPolicy", "call_with_retry", "is_retryable", "request_retry_config"]

_log = logging.getLogger(__name__)
_Result = TypeVar("_Result")

# HTTP statuses that mean "try again later": timeout, throttling, server-side failures.
_RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# S3 / AWS error codes for throttling and transient server states (botocore's standard-mode lists).
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
    }
)
# errno values of network faults; s3fs also maps SlowDown/ServiceUnavailable to EBUSY and 500 to EREMOTEIO.
_RETRYABLE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "ETIMEDOUT",
        "EPIPE",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ENETRESET",
        "EAGAIN",
        "EBUSY",
        "EREMOTEIO",
    )
    if hasattr(errno, name)
)
_MAX_CHAIN = 32


@dataclass(frozen=True)
class RetryPolicy:
    """How storage operations are retried (see the module docstring for the three layers).

    attempts: tries of one whole operation, the first included (1 = no retry).
    first_wait_s: the wait before the first retry; each later wait doubles.
    max_wait_s: cap on the exponential part of any one wait.
    jitter_s: a uniform random 0..jitter_s added to each wait, so many workers do not retry in step.
    request_attempts: botocore's tries of each S3 HTTP request inside one attempt (1 = none).

    The defaults wait at least 0.5 + 1 + 2 + 4 + 8 + 16 + 20 = 51.5 s before giving up, so a 10-20 s
    outage is ridden out with room to spare; see :attr:`min_total_wait_s` / :attr:`max_total_wait_s`.
    """

    attempts: int = 8
    first_wait_s: float = 0.5
    max_wait_s: float = 20.0
    jitter_s: float = 1.0
    request_attempts: int = 3

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.request_attempts < 1:
            raise ValueError("attempts and request_attempts must be at least 1")
        if min(self.first_wait_s, self.max_wait_s, self.jitter_s) < 0:
            raise ValueError("waits must not be negative")

    def _waits(self, jitter: float) -> Iterator[float]:
        for retry in range(self.attempts - 1):
            yield min(self.first_wait_s * 2**retry, self.max_wait_s) + jitter

    @property
    def min_total_wait_s(self) -> float:
        """The least time spent waiting before the last attempt (no jitter): outages shorter than this
        are always ridden out, whatever each attempt costs."""
        return sum(self._waits(0.0))

    @property
    def max_total_wait_s(self) -> float:
        """The most time spent waiting between attempts (full jitter each time)."""
        return sum(self._waits(self.jitter_s))


DEFAULT_RETRY_POLICY = RetryPolicy()


def request_retry_config(policy: RetryPolicy) -> dict[str, Any]:
    """botocore ``Config`` arguments for layer 1: ``{"retries": {"mode": "standard", ...}}``.

    Passed to s3fs as ``config_kwargs``; :func:`evf.storage.open_filesystem` does this for every S3 URI.
    """
    return {"retries": {"mode": "standard", "total_max_attempts": policy.request_attempts}}


# --------------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------------


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and its causes, outermost first (``__cause__``, else an unsuppressed ``__context__``)."""
    links: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(links) < _MAX_CHAIN and all(current is not seen for seen in links):
        links.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return links


def _status(error: BaseException) -> int | None:
    """The HTTP status an error carries (botocore ``ClientError``, aiohttp, gcsfs, requests...)."""
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for name in ("status", "status_code", "code"):
        value = getattr(error, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _service_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _transient_types() -> tuple[type[BaseException], ...]:
    """Exception classes of transport faults from the optional storage libraries that are installed."""
    found: list[type[BaseException]] = []
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, ResponseParserError

        # ResponseParserError: throttling replies sometimes carry invalid XML (s3fs treats it the same).
        found += [BotoConnectionError, HTTPClientError, ResponseParserError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    from http.client import IncompleteRead

    from fsspec.exceptions import FSTimeoutError

    return (*found, FSTimeoutError, IncompleteRead, ConnectionError, TimeoutError)


def _verdict(error: BaseException) -> bool | None:
    """True (transient), False (permanent) or None (says nothing: a wrapper, look at its cause)."""
    marked = getattr(error, "retryable", None)
    if isinstance(marked, bool):  # set by evf.io on its errors: survives pickling, unlike __cause__
        return marked
    name = type(error).__name__
    if isinstance(error, ssl.SSLError) or "SSL" in name or "Certificate" in name:
        return False  # certificate and TLS set-up problems do not heal by waiting
    code = _service_code(error)
    if code is not None:
        return code in _RETRYABLE_CODES or _status(error) in _RETRYABLE_STATUSES
    if isinstance(error, _transient_types()):
        return True
    status = _status(error)
    if status is not None:
        return status in _RETRYABLE_STATUSES
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in _RETRYABLE_ERRNOS
    if isinstance(error, FileNotFoundError | PermissionError | ValueError | TypeError | KeyError):
        return False
    return None


def is_retryable(error: BaseException) -> bool:
    """Whether ``error`` is a transient storage fault worth trying again later.

    Transient: connection refused, reset or timed out; HTTP 408, 429 and 5xx; S3 throttling and
    transient codes (``SlowDown``, ``InternalError``, ``RequestTimeout``...). Permanent: everything
    else, in particular a missing object or bucket (404 / ``NoSuchKey``), access denied (403), bytes
    that are not an image, an invalid request option, a full local disk, TLS certificate errors.
    Wrapped errors (``ImageReadError`` from an ``EndpointConnectionError``, s3fs's ``OSError`` from a
    botocore ``ClientError``) are judged by their innermost cause that says something; an error with
    a boolean ``retryable`` attribute (``evf.io``'s errors have one) says so itself, which still
    holds after pickling (a Ray task's error) drops ``__cause__``.
    """
    for link in reversed(_chain(error)):
        verdict = _verdict(link)
        if verdict is not None:
            return verdict
    return False


# --------------------------------------------------------------------------------------------------
# Retrying
# --------------------------------------------------------------------------------------------------


def _log_retry(state: tenacity.RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    _log.warning(
        "transient storage error (attempt %d): %s: %s; retrying in %.1f s",
        state.attempt_number,
        type(error).__name__,
        str(error)[:300],
        wait,
    )


def call_with_retry(
    policy: RetryPolicy | None, function: Callable[..., _Result], *args: Any, **kwargs: Any
) -> _Result:
    """``function(*args, **kwargs)``, tried again while it raises an error :func:`is_retryable` accepts.

    Waits as the policy says (``None``: :data:`DEFAULT_RETRY_POLICY`). The last error is raised as it
    is (not wrapped), with ``error.retry_attempts`` set to the number of tries made.
    """
    policy = policy or DEFAULT_RETRY_POLICY
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s)
        + tenacity.wait_random(0, policy.jitter_s),
        retry=tenacity.retry_if_exception(is_retryable),
        before_sleep=_log_retry,
        reraise=True,
    )
    try:
        return retrying(function, *args, **kwargs)
    except Exception as error:
        error.retry_attempts = retrying.statistics.get("attempt_number", 1)  # type: ignore[attr-defined]
        raise
