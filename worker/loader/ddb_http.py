"""The fast BatchWriteItem path: an orjson body, a SigV4 signer for this one request, aiohttp.

botocore spends tens of microseconds per item turning a BatchWriteItem into
JSON (its serializer walks the model for every attribute value). Our items are
already wire-format attribute values, so this client writes the body with
orjson, signs it with ``worker.loader.signer`` (botocore's SigV4, byte for
byte, without its per-request overhead) from botocore's credential chain
(refreshable credentials included), then posts it with aiohttp.

It answers like the SDK client: the parsed response on success, and a
``botocore.exceptions.ClientError`` with the same ``Error.Code`` and
``ResponseMetadata.HTTPStatusCode`` on failure, so ``worker.loader.writer`` treats
both paths identically (throttles, UnprocessedItems, 5xx, validation errors).
The endpoint and region are the SDK client's own, so ``AWS_ENDPOINT_URL_DYNAMODB``
and the rest of botocore's configuration apply unchanged. Everything other than
BatchWriteItem (CreateTable, DescribeTable, S3, SQS) stays on the SDK.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
import orjson
from botocore.exceptions import ClientError, NoCredentialsError

from worker.loader.signer import Signer

if TYPE_CHECKING:
    from worker.core.aws import Clients

TARGET = "DynamoDB_20120810.BatchWriteItem"
CONTENT_TYPE = "application/x-amz-json-1.0"


def _default(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not a DynamoDB wire value")


def encode_request(request_items: dict[str, Any]) -> bytes:
    return orjson.dumps({"RequestItems": request_items}, default=_default)


class DynamoDBHttp:
    """``batch_write_item`` over HTTP, shaped like the aiobotocore client method."""

    def __init__(
        self,
        get_credentials: Callable[[], Awaitable[Any]],
        *,
        endpoint_url: str,
        region: str,
        pool: int,
        timeout_s: float = 60.0,
    ) -> None:
        self._get_credentials = get_credentials
        self._url = endpoint_url.rstrip("/") + "/"
        self._signer = Signer(
            self._url, region, "dynamodb", content_type=CONTENT_TYPE, target=TARGET
        )
        self._connector = aiohttp.TCPConnector(limit=pool, keepalive_timeout=30)
        self._http = aiohttp.ClientSession(
            connector=self._connector,
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=5),
            skip_auto_headers=("User-Agent",),
        )

    async def close(self) -> None:
        if not self._http.closed:
            await self._http.close()

    async def batch_write_item(self, *, RequestItems: dict[str, Any]) -> dict[str, Any]:  # noqa: N803 - the SDK's name
        body = encode_request(RequestItems)
        headers = await self._signed_headers(body)
        async with self._http.post(self._url, data=body, headers=headers) as response:
            payload = await response.read()
            status = response.status
            request_id = response.headers.get("x-amzn-RequestId", "")
        if status == 200:
            parsed: dict[str, Any] = orjson.loads(payload)
            return parsed
        raise _client_error(status, payload, request_id)

    async def _signed_headers(self, body: bytes) -> dict[str, str]:
        credentials = await self._get_credentials()
        if credentials is None:
            raise NoCredentialsError()
        frozen = await credentials.get_frozen_credentials()  # refreshes when near expiry
        return self._signer.headers(frozen, body)


def _client_error(status: int, payload: bytes, request_id: str) -> ClientError:
    """A DynamoDB JSON error body as botocore would raise it."""
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    kind = str(doc.get("__type", ""))
    code = kind.rpartition("#")[2] or ("InternalServerError" if status >= 500 else str(status))
    message = str(
        doc.get("message") or doc.get("Message") or payload[:200].decode(errors="replace")
    )
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "RequestId": request_id},
    }
    return ClientError(response, "BatchWriteItem")


class BatchWriteClient(Protocol):
    """What ``worker.loader.writer`` needs: the SDK client or ``DynamoDBHttp``."""

    async def batch_write_item(self, *, RequestItems: Any) -> Any: ...  # noqa: N803


def batch_write_client(clients: Clients, path: str) -> BatchWriteClient:
    """The BatchWriteItem client of ``DDB_WRITE_PATH``: the fast path (closed with
    ``clients``) or the SDK's one-attempt data client."""
    if path == "sdk":
        return clients.dynamodb_writes
    meta = clients.dynamodb_writes.meta
    http = DynamoDBHttp(
        clients.session.get_credentials,  # type: ignore[arg-type]
        endpoint_url=meta.endpoint_url,
        region=meta.region_name,
        pool=clients.pool,
    )
    clients.on_close(http.close)
    return http
