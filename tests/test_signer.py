"""The fast path's SigV4 signer signs exactly as botocore's does (issue: loader v2)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from unittest import mock

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from worker.loader.ddb_http import CONTENT_TYPE, TARGET
from worker.loader.signer import Signer, canonical_host

URLS = [
    "https://dynamodb.us-east-1.amazonaws.com/",
    "https://dynamodb.eu-west-1.amazonaws.com:443/",
    "http://127.0.0.1:8000/",
    "http://LocalHost:80/",
    "http://[::1]:9000/",
]


def botocore_headers(
    url: str, region: str, creds: Credentials, body: bytes, now: datetime
) -> dict[str, str]:
    """botocore's own ``SigV4Auth.add_auth``, with its clock set to ``now``."""
    request = AWSRequest(
        method="POST", url=url, data=body,
        headers={"Content-Type": CONTENT_TYPE, "X-Amz-Target": TARGET},
    )  # fmt: skip
    with mock.patch("botocore.auth.get_current_datetime", return_value=now):
        SigV4Auth(creds.get_frozen_credentials(), "dynamodb", region).add_auth(request)
    return dict(request.headers.items())


def test_every_generated_request_is_signed_byte_for_byte_as_botocore_signs_it() -> None:
    rng = random.Random(3)
    start = datetime(2026, 11, 22, 23, 59, 50, tzinfo=UTC)  # across a day boundary
    for case in range(300):
        url = rng.choice(URLS)
        region = rng.choice(["us-east-1", "eu-west-1", "ap-southeast-2"])
        token = rng.choice([None, "", "FwoG" + "x" * rng.randint(1, 300), "a  b\tc"])
        creds = Credentials(f"AKIA{case:04d}", f"secret/{rng.random()}", token)
        body = rng.randbytes(rng.randint(0, 3000))
        now = start + timedelta(seconds=rng.randint(0, 20))
        signer = Signer(url, region, "dynamodb", content_type=CONTENT_TYPE, target=TARGET)
        ours = signer.headers(creds.get_frozen_credentials(), body, now)
        assert ours == botocore_headers(url, region, creds, body, now), (url, region, token)


def test_a_refreshed_credential_gets_a_new_signing_key() -> None:
    signer = Signer(URLS[0], "us-east-1", "dynamodb", content_type=CONTENT_TYPE, target=TARGET)
    now = datetime(2026, 11, 22, 12, tzinfo=UTC)
    for secret in ("first", "first", "rotated", "first"):  # the cache must follow the secret
        creds = Credentials("AKIA", secret, "token-" + secret)
        ours = signer.headers(creds.get_frozen_credentials(), b"{}", now)
        assert ours == botocore_headers(URLS[0], "us-east-1", creds, b"{}", now)


@pytest.mark.parametrize(
    ("url", "host"),
    [("https://a.example:443/", "a.example"), ("http://A.example:8080/", "a.example:8080"),
     ("http://[::1]:80/", "[::1]")],
)  # fmt: skip
def test_the_signed_host_drops_default_ports_and_case(url: str, host: str) -> None:
    assert canonical_host(url) == host


def test_one_signer_across_midnight_signs_each_day_with_that_days_key() -> None:
    signer = Signer(URLS[0], "us-east-1", "dynamodb", content_type=CONTENT_TYPE, target=TARGET)
    creds = Credentials("AKIA", "secret", None)
    for now in (datetime(2026, 11, 22, 23, 59, 59, tzinfo=UTC),
                datetime(2026, 11, 23, 0, 0, 1, tzinfo=UTC),
                datetime(2026, 11, 22, 23, 59, 58, tzinfo=UTC)):  # fmt: skip
        ours = signer.headers(creds.get_frozen_credentials(), b"{}", now)
        assert ours == botocore_headers(URLS[0], "us-east-1", creds, b"{}", now), now
