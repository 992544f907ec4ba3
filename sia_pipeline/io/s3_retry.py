"""S3 retry policy and what botocore's own retries do not cover: bodies cut mid-stream.

botocore's "standard" retry mode retries every API call on throttling (``SlowDown``...),
5xx, timeouts and connections reset before (or while reading) a non-streamed response.
A streamed ``get_object`` body is handed to the caller once the headers arrive, so a
connection cut while reading it surfaces as ``ResponseStreamingError`` /
``IncompleteReadError`` with nobody retrying. :class:`ResumableBody` wraps such a body and
reopens it with a ranged GET at the byte offset reached (``If-Match`` the first ETag, so a
replaced object is an error, not a splice).

Knobs (environment, for operators and fast tests): ``SIA_S3_MAX_ATTEMPTS`` (default 8: tries
per request, botocore's and ours alike) and ``SIA_S3_BACKOFF_S`` (default 0.5: base of our
exponential, jittered backoff between reopens of a cut body).
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_ATTEMPTS = 8
DEFAULT_BACKOFF_S = 0.5
MAX_BACKOFF_S = 20.0
_READ_CHUNK = 1 << 20

# Error codes that are worth a retry: throttling and server-side trouble.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "BandwidthLimitExceeded",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry one S3 request.

    Attributes:
        max_attempts: tries per request (1: no retry), for botocore's retries and ours.
        backoff_s: base delay of our own retries; attempt ``i`` (1-based) waits
            ``uniform(0, min(backoff_s * 2 ** (i - 1), MAX_BACKOFF_S))``.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    backoff_s: float = DEFAULT_BACKOFF_S

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The policy from ``SIA_S3_MAX_ATTEMPTS`` / ``SIA_S3_BACKOFF_S`` (defaults if unset)."""
        return cls(
            max_attempts=_env_number("SIA_S3_MAX_ATTEMPTS", DEFAULT_MAX_ATTEMPTS, int, 1),
            backoff_s=_env_number("SIA_S3_BACKOFF_S", DEFAULT_BACKOFF_S, float, 0.0),
        )

    def delay(self, attempt: int) -> float:
        return random.random() * min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)


def _env_number(name: str, default, kind, lowest):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or value < lowest:
        msg = f"{name} must be a number >= {lowest}, got {raw!r}"
        raise ValueError(msg)
    return value


def error_code(err: BaseException) -> str:
    """The S3 error code (``SlowDown``, ``NoSuchKey``; ``HTTP 503`` for a bodiless HEAD), or the
    exception's class name for connection-level failures."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code") or "")
        if code.isdigit():  # a HEAD has no body to name the code: only its status
            return f"HTTP {code}"
        if code:
            return code
    return type(err).__name__


def is_transient(err: BaseException) -> bool:
    """True for failures a later retry may cure: throttling, 5xx, resets, timeouts, cut bodies."""
    from botocore.exceptions import ClientError, HTTPClientError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(err, ClientError):
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        code = error_code(err)
        return code in TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(err, HTTPClientError | BotoConnectionError) or is_cut_body(err)


def is_cut_body(err: BaseException) -> bool:
    """True if ``err`` is a response body that ended early (reset, timeout, short read)."""
    import http.client

    import urllib3.exceptions
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )

    cut = (
        ResponseStreamingError,
        IncompleteReadError,
        ReadTimeoutError,
        ConnectionClosedError,
        urllib3.exceptions.ProtocolError,
        urllib3.exceptions.ReadTimeoutError,
        http.client.IncompleteRead,
        ConnectionError,  # the builtin: resets, broken pipes
        TimeoutError,
    )
    return isinstance(err, cut)


def botocore_retries(err: BaseException) -> bool:
    """True if botocore's own retry mode already retried ``err`` (so we must not again):
    error responses, resets before a response, timeouts, failed connections."""
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    return isinstance(
        err, ClientError | ConnectionClosedError | ReadTimeoutError | BotoConnectionError
    )


def call_with_retry(fn: Callable[[], Any], policy: RetryPolicy) -> tuple[Any, int]:
    """``fn()`` retried while it fails with a response body cut in a way botocore does not
    retry (e.g. urllib3's ``ProtocolError`` while reading an error response); returns
    ``(result, attempts)``. The error that ends it is re-raised with ``sia_cut_retries`` (our
    retries before it) and, if it is a cut body itself, ``sia_attempts``."""
    attempt = 1
    while True:
        try:
            return fn(), attempt
        except Exception as e:
            ours = is_cut_body(e) and not botocore_retries(e)
            if not ours or attempt >= policy.max_attempts:
                e.sia_cut_retries = attempt - 1  # type: ignore[attr-defined]
                if ours:
                    e.sia_attempts = attempt  # type: ignore[attr-defined]
                raise
            delay = policy.delay(attempt)
            log.info("S3 response cut (%s); retrying in %.2fs", type(e).__name__, delay)
            time.sleep(delay)
            attempt += 1


def attempts_made(err: BaseException, policy: RetryPolicy) -> int:
    """Tries made before raising ``err`` (ours, or botocore's from the response)."""
    ours = getattr(err, "sia_attempts", None)
    if ours is not None:
        return int(ours)
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts")
        if retries is not None:
            return int(retries) + 1
    return policy.max_attempts


class ResumableBody(io.RawIOBase):
    """A streamed S3 object that survives cut connections by resuming with a ranged GET.

    Args:
        reopen: ``reopen(offset, etag)`` -> a ``get_object`` response for the object from
            byte ``offset`` on (raising a one-line error when that GET itself fails).
        first: the first ``get_object`` response (``Body``, ``ContentLength``, ``ETag``).
        fail: ``fail(err)`` -> the exception to raise when a cut body is still cut after
            ``policy.max_attempts`` tries without progress.
        policy: retry policy.
    """

    def __init__(
        self,
        reopen: Callable[[int, str | None], dict[str, Any]],
        first: dict[str, Any],
        fail: Callable[[BaseException, int], Exception],
        policy: RetryPolicy,
    ) -> None:
        super().__init__()
        self._reopen = reopen
        self._fail = fail
        self._policy = policy
        self._body = first["Body"]
        self._size = int(first["ContentLength"])
        self._etag = first.get("ETag")
        self._pos = 0
        self.resumes = 0

    @property
    def size(self) -> int:
        return self._size

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def _read_some(self, n: int) -> bytes:
        """Up to ``n`` (> 0) bytes; empty only at the end of the object."""
        fails = 0
        while self._pos < self._size:
            err: BaseException | None = None
            try:
                data = self._body.read(min(n, self._size - self._pos))
            except Exception as e:
                if not is_cut_body(e):
                    raise
                data, err = b"", e
            if data:
                self._pos += len(data)
                return data
            fails += 1
            err = err or EOFError(f"body ended at byte {self._pos} of {self._size}")
            if fails >= self._policy.max_attempts:
                raise self._fail(err, fails) from None
            delay = self._policy.delay(fails)
            log.info(
                "S3 body cut at byte %d of %d (%s); resuming in %.2fs",
                self._pos,
                self._size,
                type(err).__name__,
                delay,
            )
            time.sleep(delay)
            self._close_body()
            self._body = self._reopen(self._pos, self._etag)["Body"]
            self.resumes += 1
        return b""

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        return self._read_some(size) if size else b""

    def readall(self) -> bytes:
        parts = []
        while chunk := self._read_some(_READ_CHUNK):
            parts.append(chunk)
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        data = self._read_some(len(buffer)) if len(buffer) else b""
        buffer[: len(data)] = data
        return len(data)

    def _close_body(self) -> None:
        try:
            self._body.close()
        except Exception:  # a reset connection may fail to close; it is dropped anyway
            log.debug("closing a cut S3 body failed", exc_info=True)

    def close(self) -> None:
        if not self.closed:
            self._close_body()
        super().close()
