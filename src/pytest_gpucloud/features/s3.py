"""S3 from the local side only: URLs, the boto3 client, and errors that name the fix.

Credentials come the standard AWS ways (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ...) and stay in this process: instances get presigned URLs, never keys.
``--gpu-s3-endpoint`` (or ``AWS_ENDPOINT_URL_S3``) points at any S3-compatible store.
boto3 is imported on first use, so a session without S3 never pays for it.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from pytest_gpucloud.core.errors import GpuCloudError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class S3Error(GpuCloudError):
    """An S3 request failed, or S3 is not set up; the message names the object and the fix."""


class Clients:
    """One boto3 S3 client per region, made on first use, shared by threads."""

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self._clients: dict[str | None, S3Client] = {}
        self._lock = threading.Lock()

    def get(self, region: str | None = None) -> S3Client:
        """A client; ``region``: the bucket's, which presigned URLs of AWS itself must name."""
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._clients[region] = self._make(region)
            return client

    def _make(self, region: str | None) -> S3Client:
        import boto3
        from botocore.config import Config

        config = Config(
            signature_version="s3v4",
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            # A custom endpoint (MinIO, moto, an IP) rarely resolves bucket subdomains.
            s3={"addressing_style": "path" if self.endpoint else "auto"},
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=region, config=config
        )


def describe(exc: Exception, what: str) -> S3Error:
    """An :class:`S3Error` for a boto3/botocore failure while doing ``what``."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return S3Error(
            f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE, in the environment of pytest)"
        )
    if isinstance(exc, EndpointConnectionError):
        return S3Error(
            f"{what}: cannot reach the S3 endpoint ({_first_line(exc)}); check --gpu-s3-endpoint"
        )
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", "?"))
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return S3Error(f"{what}: access denied ({code}); check the AWS credentials")
        if code == "NoSuchBucket":
            return S3Error(f"{what}: the bucket does not exist")
        return S3Error(f"{what}: {code} {error.get('Message', '')}".rstrip())
    return S3Error(f"{what}: {type(exc).__name__}: {_first_line(exc)}")


def boto_errors() -> tuple[type[Exception], ...]:
    """The exceptions a boto3 call raises for S3's or the network's trouble."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _first_line(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:200]
