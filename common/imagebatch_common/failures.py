"""Why one image failed: a stage, a reason code and a message a person can act on.

Every image-level failure in the worker is an ``ImageFailure``; the runner records it
in the shard result (``stage`` and ``error``) and in the log line, and moves on to the
next image. Messages are written here, never copied from a library exception, so they
carry no URL (a query string may hold a signature) and no credential.
"""

from __future__ import annotations

from enum import StrEnum

from imagebatch_common.contract import Stage


class Reason(StrEnum):
    """Machine-readable cause of an image failure; the first word of ``error``."""

    URL_INVALID = "url-invalid"  # not http(s), no host, bad port, unparseable
    ADDRESS_BLOCKED = "address-blocked"  # resolves to a non-global address not allowed
    DNS_FAILED = "dns-failed"  # the host name does not resolve
    TOO_MANY_REDIRECTS = "too-many-redirects"
    BAD_REDIRECT = "bad-redirect"  # a 3xx without a usable Location
    HTTP_STATUS = "http-status"  # the server answered with an error status
    TIMEOUT = "timeout"  # connect, read or whole-image time limit
    CONNECTION = "connection-failed"  # refused, reset, closed early
    TLS = "tls-failed"  # certificate or handshake failure
    TOO_LARGE = "too-large"  # more bytes than max_image_bytes
    NOT_AN_IMAGE = "not-an-image"  # no allowed image format recognised
    DECOMPRESSION_BOMB = "decompression-bomb"  # more pixels than max_pixels
    TOO_LARGE_FOR_MEMORY = "too-large-for-memory"  # decoding needs more than the budget
    CORRUPT = "corrupt-image"  # truncated or broken image data
    FORMAT_UNAVAILABLE = "format-unavailable"  # the target encoder is not installed
    ENCODE_FAILED = "encode-failed"
    CANCELLED = "cancelled"  # the shard stopped (storage down) before this image ended
    INTERNAL = "internal-error"  # a defect in the worker; recorded so the shard finishes


class ImageFailure(Exception):
    """One image could not be produced. ``transient`` failures are worth another try."""

    def __init__(
        self,
        stage: Stage,
        reason: Reason,
        message: str,
        *,
        transient: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.stage = stage
        self.reason = reason
        self.message = message
        self.transient = transient
        self.retry_after = retry_after  # seconds the server asked us to wait (429/503)

    def __reduce__(self) -> tuple[object, ...]:
        # Exceptions pickle as ``cls(*args)``; keyword-only fields need saying, so a
        # failure raised in another process arrives whole.
        return (
            _rebuild_failure,
            (self.stage, self.reason, self.message, self.transient, self.retry_after),
        )

    @property
    def error(self) -> str:
        """The text stored in the result's ``error`` field: ``<reason>: <message>``."""
        return f"{self.reason.value}: {self.message}"


def _rebuild_failure(
    stage: Stage, reason: Reason, message: str, transient: bool, retry_after: float | None
) -> ImageFailure:
    return ImageFailure(stage, reason, message, transient=transient, retry_after=retry_after)
