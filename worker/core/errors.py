"""The worker's error tree.

Every failure that the pipeline reports is a ``WorkerError``. Its branch says
what the caller should do with the message that caused it::

    WorkerError
    ├── RetryableError            retriable: leave the message; SQS redelivers it
    │   ├── WriteThrottled        BatchWriteItem attempts ran out (throttles, unprocessed)
    │   ├── TransientAwsError     5xx, timeouts, connection resets that outlived retries
    │   ├── FetchUnavailable      an HTTP(S) source's 5xx, 429, timeouts that outlived retries
    │   └── DeadlineExceeded      the Lambda safety margin came before the work finished
    └── PermanentError            not retriable: ERROR log; the redrive policy moves it to the DLQ
        ├── ConfigError           a setting the worker cannot use, or no AWS credentials/region
        ├── MalformedMessage      the SQS body names no object we can read
        ├── SourceNotAllowed      a bucket outside SOURCE_BUCKETS, a scheme not allowed
        │   ├── HostNotAllowed    a URL (or redirect) to a host outside ACQUIRE_ALLOWED_HOSTS
        │   └── AddressNotAllowed a connection to a private, loopback or metadata address
        ├── FetchFailed           an HTTP(S) source's 4xx, too many redirects, no secret
        ├── ChecksumMismatch      a fetched file is not what its manifest or server said
        │   └── SizeMismatch      ... by its size
        ├── ObjectUnavailable     NoSuchKey / AccessDenied
        ├── ObjectTooLarge        over MAX_OBJECT_BYTES, or over MAX_DECODED_BYTES once gunzipped
        ├── CorruptObject         empty, truncated gzip, or not a protobuf ``OutputFile``
        ├── ExtractFailed         the TABLE_EXTRACT callable raised
        ├── InvalidTable          a table name DynamoDB cannot accept, or a write it rejects
        │   └── TableNotOwned     a table the loader did not create (ledger, cache, others')
        ├── UnsupportedEvent      a Lambda event of a shape no route knows
        ├── LakeError             a Delta apply that cannot proceed (bad part, missing bucket)
        ├── DispatchFailed        a run's files cannot be listed or sent (no bucket, no queue)
        └── InvalidRequest        an API request that breaks the contract (400)
            ├── NotFound          no such dataset, run or route (404)
            ├── Conflict          the run has ended, or another run of the date is open (409)
            └── Unprocessable     an Idempotency-Key reused with another request (422)

Entry points map the tree to exit codes: ``ConfigError`` is 2 (a usage or
configuration problem), every other ``WorkerError`` 1.

Each error carries a short machine-readable ``reason`` and the input it names
(``context``), so the structured ERROR log line says what failed and where.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WorkerError(Exception):
    """Base of every error the worker reports."""

    retriable: ClassVar[bool] = False
    reason: ClassVar[str] = "worker_error"

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        self.context = context

    def as_log(self) -> dict[str, Any]:
        """The fields a structured log line carries for this error."""
        return {
            "error": self.reason,
            "error_message": self.message,
            "retriable": self.retriable,
            **self.context,
        }


class RetryableError(WorkerError):
    retriable = True
    reason = "retryable"


class WriteThrottled(RetryableError):
    reason = "write_attempts_exhausted"


class TransientAwsError(RetryableError):
    reason = "transient_aws_error"


class DeadlineExceeded(RetryableError):
    reason = "deadline_exceeded"


class FetchUnavailable(RetryableError):
    reason = "fetch_unavailable"


class PermanentError(WorkerError):
    retriable = False
    reason = "permanent"


class ConfigError(PermanentError):
    """A setting the worker cannot use; ``variable`` names it where there is one."""

    reason = "config_error"


class MalformedMessage(PermanentError):
    reason = "malformed_message"


class SourceNotAllowed(PermanentError):
    reason = "source_not_allowed"


class HostNotAllowed(SourceNotAllowed):
    reason = "host_not_allowed"


class AddressNotAllowed(SourceNotAllowed):
    reason = "address_not_allowed"


class FetchFailed(PermanentError):
    reason = "fetch_failed"


class ChecksumMismatch(PermanentError):
    """``expected`` and ``actual`` name both values (``algorithm``: sha256, md5, size)."""

    reason = "checksum_mismatch"


class SizeMismatch(ChecksumMismatch):
    reason = "size_mismatch"


class ObjectUnavailable(PermanentError):
    reason = "object_unavailable"


class ObjectTooLarge(PermanentError):
    reason = "object_too_large"


class CorruptObject(PermanentError):
    reason = "corrupt_object"


class ExtractFailed(PermanentError):
    reason = "extract_failed"


class InvalidTable(PermanentError):
    reason = "invalid_table"


class TableNotOwned(InvalidTable):
    reason = "table_not_owned"


class UnsupportedEvent(PermanentError):
    reason = "unsupported_event"


class LakeError(PermanentError):
    reason = "lake_error"


class DispatchFailed(PermanentError):
    reason = "dispatch_failed"


class InvalidStreamRecord(PermanentError):
    reason = "invalid_stream_record"


class InvalidRequest(PermanentError):
    """An API request the worker refuses; ``status`` is its HTTP status."""

    reason = "invalid_request"
    status: ClassVar[int] = 400


class NotFound(InvalidRequest):
    reason = "not_found"
    status = 404


class Conflict(InvalidRequest):
    reason = "conflict"
    status = 409


class Unprocessable(InvalidRequest):
    reason = "unprocessable"
    status = 422


def first_line(exc: BaseException) -> str:
    """An exception's message as one line (its first, at most 300 characters): how
    a library's many-line error (delta-rs, Arrow) is told in one."""
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__
