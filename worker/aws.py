"""One aioboto3 session and its long-lived clients.

``Clients`` is an async context manager: the clients are opened once and reused
(across warm Lambda invocations, and for the whole life of a poller), and
closing is idempotent.

Retry policy:
- S3, SQS and the DynamoDB control plane (CreateTable, DescribeTable) use
  botocore's ``standard`` retry mode;
- the DynamoDB data client used for BatchWriteItem makes exactly one attempt per
  call, because ``worker.writer`` owns those retries: it must see throttles to
  shrink its window (AIMD) and must resend only the unprocessed items. It also
  skips botocore's parameter validation: profiled on 100k rows
  (``python -m benchmarks.moto_load --profile``), validation took ~10 s of
  client CPU, about 4x the serializer; ``worker.items`` builds only
  well-formed attribute values, and the property tests prove it.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from worker.ddb_http import DynamoDBHttp

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_sqs import SQSClient

    from worker.config import Settings


def client_config(*, pool: int, attempts: int, validate: bool = True) -> AioConfig:
    return AioConfig(
        parameter_validation=validate,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=pool,
        connect_timeout=5,
        read_timeout=60,
        tcp_keepalive=True,
    )


class BatchWriteClient(Protocol):
    """What ``worker.writer`` needs: the SDK client or ``worker.ddb_http.DynamoDBHttp``."""

    async def batch_write_item(self, *, RequestItems: Any) -> Any: ...  # noqa: N803


class Clients:
    """The process's AWS clients, opened lazily on first ``__aenter__``."""

    def __init__(
        self, *, max_in_flight: int, region: str | None = None, write_path: str = "fast"
    ) -> None:
        self._session = aioboto3.Session(region_name=region)
        self._write_path = write_path
        self._pool = max(10, max_in_flight + 4)
        self._stack: AsyncExitStack | None = None
        self.s3: S3Client
        self.sqs: SQSClient
        self.dynamodb: DynamoDBClient
        self.dynamodb_writes: DynamoDBClient
        self.batch_writes: BatchWriteClient  # the fast path, or the SDK client

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        return cls(
            max_in_flight=settings.write.max_in_flight,
            region=settings.region,
            write_path=settings.write.path,
        )

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            return self
        stack = AsyncExitStack()
        try:
            standard = client_config(pool=self._pool, attempts=5)
            self.s3 = await stack.enter_async_context(self._session.client("s3", config=standard))
            self.sqs = await stack.enter_async_context(self._session.client("sqs", config=standard))
            self.dynamodb = await stack.enter_async_context(
                self._session.client("dynamodb", config=standard)
            )
            self.dynamodb_writes = await stack.enter_async_context(
                self._session.client(
                    "dynamodb", config=client_config(pool=self._pool, attempts=1, validate=False)
                )
            )
            self.batch_writes = self.dynamodb_writes
            if self._write_path == "fast":
                meta = self.dynamodb_writes.meta
                self.batch_writes = await stack.enter_async_context(
                    DynamoDBHttp(
                        self._session.get_credentials,  # type: ignore[arg-type]
                        endpoint_url=meta.endpoint_url,
                        region=meta.region_name,
                        pool=self._pool,
                    )
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()


# Exceptions that mean "the request may succeed if sent again": the connection
# broke, timed out, or the service answered 5xx after the SDK's own retries.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    BotoCoreError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)

# Any failure of an AWS call that the caller survives by logging and carrying on.
AWS_FAILURES: tuple[type[BaseException], ...] = (ClientError, *TRANSIENT_EXCEPTIONS)

THROTTLING_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "Throttling",
        "TooManyRequestsException",
        "SlowDown",
    }
)


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_server_error(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or error_code(exc) in {"InternalServerError", "ServiceUnavailable"}
