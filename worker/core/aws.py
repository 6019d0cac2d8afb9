"""One aioboto3 session and its long-lived clients.

``Clients`` is an async context manager: the clients are opened once and reused
(across warm Lambda invocations, and for the whole life of a poller), and
closing is idempotent.

Retry policy:
- S3, SQS and the DynamoDB control plane (CreateTable, DescribeTable) use
  botocore's ``standard`` retry mode;
- the DynamoDB data client (``dynamodb_writes``) makes exactly one attempt per
  call, because its callers own those retries (the loader's writer, the Firehose
  claims): it must see throttles to
  shrink its window (AIMD) and must resend only the unprocessed items. It also
  skips botocore's parameter validation: profiled on 100k rows
  (``python -m benchmarks.moto_load --profile``), validation took ~10 s of
  client CPU, about 4x the serializer; ``worker.loader.items`` builds only
  well-formed attribute values, and the property tests prove it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit

import aioboto3
import aiohttp
from aiobotocore.config import AioConfig
from botocore import exceptions as botocore_errors
from botocore.exceptions import ClientError, NoRegionError

from worker.core.config import AwsSettings
from worker.core.errors import ConfigError, TransientAwsError, WorkerError

if TYPE_CHECKING:
    from types_aiobotocore_dynamodb import DynamoDBClient
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_secretsmanager import SecretsManagerClient
    from types_aiobotocore_sqs import SQSClient

    from worker.core.config import Settings


def client_config(
    aws: AwsSettings, *, pool: int, attempts: int, validate: bool = True
) -> AioConfig:
    return AioConfig(
        parameter_validation=validate,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=pool,
        connect_timeout=aws.connect_timeout_s,
        read_timeout=aws.read_timeout_s,
        tcp_keepalive=True,
    )


class Clients:
    """The process's AWS clients, opened lazily on first ``__aenter__``."""

    def __init__(self, *, max_in_flight: int, aws: AwsSettings | None = None) -> None:
        self._aws = aws or AwsSettings()
        self.session = aioboto3.Session(region_name=self._aws.region)
        self.pool = max(10, max_in_flight + 4)
        self._stack: AsyncExitStack | None = None
        self.s3: S3Client
        self.sqs: SQSClient
        self.dynamodb: DynamoDBClient
        self.dynamodb_writes: DynamoDBClient
        self._secrets: SecretsManagerClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Clients:
        return cls(max_in_flight=settings.write.max_in_flight, aws=settings.aws)

    async def __aenter__(self) -> Self:
        if self._stack is not None:
            return self
        stack = AsyncExitStack()
        try:
            standard = client_config(self._aws, pool=self.pool, attempts=5)
            self.s3 = await stack.enter_async_context(self.session.client("s3", config=standard))
            self.sqs = await stack.enter_async_context(self.session.client("sqs", config=standard))
            self.dynamodb = await stack.enter_async_context(
                self.session.client("dynamodb", config=standard)
            )
            self.dynamodb_writes = await stack.enter_async_context(
                self.session.client(
                    "dynamodb",
                    config=client_config(self._aws, pool=self.pool, attempts=1, validate=False),
                )
            )
        except NoRegionError:
            await stack.aclose()
            raise ConfigError("no AWS region: set AWS_REGION", variable="AWS_REGION") from None
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def secrets(self) -> SecretsManagerClient:
        """Secrets Manager, opened on first use: only sources with credentials need it."""
        assert self._stack is not None, "open the clients first"
        if self._secrets is None:
            config = client_config(self._aws, pool=4, attempts=5)
            self._secrets = await self._stack.enter_async_context(
                self.session.client("secretsmanager", config=config)
            )
        return self._secrets

    def on_close(self, close: Callable[[], Awaitable[object]]) -> None:
        """Close ``close``'s owner with these clients (a transport opened beside them)."""
        assert self._stack is not None, "open the clients first"
        self._stack.push_async_callback(close)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        self._secrets = None
        if stack is not None:
            await stack.aclose()


# Exceptions that mean "the request may succeed if sent again": the connection
# broke or timed out, or a credential provider did not answer.
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = (
    botocore_errors.ConnectionError,
    botocore_errors.HTTPClientError,
    botocore_errors.IncompleteReadError,
    botocore_errors.CredentialRetrievalError,
    aiohttp.ClientError,
    asyncio.TimeoutError,
)

# Exceptions that mean "this process is not set up to call AWS": no retry cures them.
ENVIRONMENT_FAILURES: tuple[type[BaseException], ...] = (
    botocore_errors.NoCredentialsError,
    botocore_errors.PartialCredentialsError,
    NoRegionError,
)


def environment_error(exc: BaseException) -> ConfigError:
    """A missing credential or region, as the permanent error it is."""
    return ConfigError(f"AWS is not configured: {exc}", aws_error=type(exc).__name__)


# Any failure of an AWS call that the caller survives by logging and carrying on.
AWS_FAILURES: tuple[type[BaseException], ...] = (
    ClientError,
    *TRANSIENT_EXCEPTIONS,
    *ENVIRONMENT_FAILURES,
)

# Any failure of an AWS call at all, a parameter botocore refuses included.
ANY_AWS_FAILURE: tuple[type[BaseException], ...] = (*AWS_FAILURES, botocore_errors.BotoCoreError)

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


def is_loopback(endpoint_url: str | None) -> bool:
    """Whether an endpoint is on this machine (moto, dynalite: local use)."""
    host = urlsplit(endpoint_url or "").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_transient(exc: BaseException) -> bool:
    """Whether an AWS call that raised ``exc`` may succeed if sent again: a throttle,
    a 5xx or a broken connection. Anything else (a refusal, a missing bucket or
    queue, a parameter AWS rejects) will fail the same way every time."""
    if isinstance(exc, ClientError):
        return error_code(exc) in THROTTLING_CODES or is_server_error(exc)
    return isinstance(exc, TRANSIENT_EXCEPTIONS)


def aws_error(
    what: str, exc: BaseException, permanent: Callable[[str], WorkerError]
) -> WorkerError:
    """An AWS failure as the error it is: ``TransientAwsError`` when a retry may cure
    it (``is_transient``), else the caller's ``permanent`` one; both name ``what``."""
    cause = error_code(exc) if isinstance(exc, ClientError) else f"{type(exc).__name__}: {exc}"
    message = f"{what}: {cause}"[:1000]
    return TransientAwsError(message) if is_transient(exc) else permanent(message)


def is_server_error(exc: ClientError) -> bool:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status >= 500 or error_code(exc) in {"InternalServerError", "ServiceUnavailable"}
