"""Datasets of ``gpu(data={"name": "s3://bucket/key-or-prefix"})``: presigned here, fetched
there.

For each name, this side asks S3 (with this machine's credentials) what the URL holds: the
object with that key, else every object under ``key/``. It sends the instance one presigned
GET URL per object with its ETag and size, in the test's ``run`` frame, and the instance
downloads them into its cache (``remote/datacache.py``). No credential reaches the instance:
a presigned URL names the access key id (not a secret) and allows one GET of one object
until it expires.
"""

from __future__ import annotations

import asyncio
import posixpath
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pytest_gpucloud.core.addresses import split_url
from pytest_gpucloud.core.units import format_size
from pytest_gpucloud.features import s3

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from pytest_gpucloud.remote.protocol import Message

# Presigned URLs live this long at least: long enough for a boot and a test's time limit.
MIN_EXPIRY_S = 3600
MAX_EXPIRY_S = 7 * 24 * 3600  # SigV4's limit


class DataError(s3.S3Error):
    """A dataset cannot be found or presigned; the message names the test, name and URL."""


@dataclass
class _Listing:
    """What one ``s3://`` URL holds: ``(name, key, etag, size)`` per object."""

    kind: str
    bucket: str
    objects: list[tuple[str, str, str, int]]
    region: str | None
    at: float = field(default_factory=time.monotonic)


class DataSource:
    """Presigns the datasets of each test; listings are cached for half the URLs' life."""

    def __init__(self, endpoint: str | None, expiry_s: float) -> None:
        self._clients = s3.Clients(endpoint)
        self._aws = endpoint is None
        self.expiry_s = int(min(MAX_EXPIRY_S, max(MIN_EXPIRY_S, expiry_s)))
        self._listings: dict[str, _Listing] = {}
        self.downloads = 0
        self.downloaded_bytes = 0
        self.cache_hits = 0

    async def presign(self, nodeid: str, data: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        """The ``data`` field of ``nodeid``'s run frame: name -> dataset spec (see
        ``remote/datacache.py``). Raises :class:`DataError` for a missing object."""
        return await asyncio.to_thread(self._presign_all, nodeid, data)

    def note(self, frames: list[Message]) -> None:
        """Count a test's ``data`` frames: downloaded, or found in the instance's cache."""
        for frame in frames:
            if frame.get("cached"):
                self.cache_hits += 1
            else:
                self.downloads += 1
                self.downloaded_bytes += int(frame.get("bytes", 0))

    def summary_lines(self) -> list[str]:
        if not self.downloads and not self.cache_hits:
            return []
        return [
            f"datasets: {self.downloads} download(s), {format_size(self.downloaded_bytes)}; "
            f"{self.cache_hits} found in the instances' cache"
        ]

    def _presign_all(self, nodeid: str, data: tuple[tuple[str, str], ...]) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for name, url in data:
            what = f"{nodeid}: data {name!r} ({url})"
            try:
                listing = self._listing(url, what)
                client = self._clients.get(listing.region)
                objects = [
                    [obj_name, self._url(client, listing.bucket, key), etag, size]
                    for obj_name, key, etag, size in listing.objects
                ]
            except s3.boto_errors() as exc:
                raise DataError(str(s3.describe(exc, what))) from None
            specs[name] = {"source": url, "kind": listing.kind, "objects": objects}
        return specs

    def _url(self, client: S3Client, bucket: str, key: str) -> str:
        return client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.expiry_s
        )

    def _listing(self, url: str, what: str) -> _Listing:
        cached = self._listings.get(url)
        if cached is not None and time.monotonic() - cached.at < self.expiry_s / 2:
            return cached
        bucket, key = split_url(url)
        client = self._clients.get()
        listing = None
        if key and not key.endswith("/"):
            listing = self._object(client, bucket, key)
        if listing is None:
            listing = self._prefix(
                client, bucket, key if key.endswith("/") or not key else key + "/"
            )
        if not listing.objects:
            raise DataError(
                f"{what}: not found: no object with that key and none under it (check the "
                "URL, and --gpu-s3-endpoint for a store that is not AWS S3)"
            )
        self._listings[url] = listing
        return listing

    def _object(self, client: S3Client, bucket: str, key: str) -> _Listing | None:
        from botocore.exceptions import ClientError

        try:
            head = client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        name = posixpath.basename(key)
        objects = [(name, key, _etag(head["ETag"]), int(head["ContentLength"]))]
        return _Listing("object", bucket, objects, self._region(head))

    def _prefix(self, client: S3Client, bucket: str, prefix: str) -> _Listing:
        objects = []
        region = None
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            region = region or self._region(page)
            for obj in page.get("Contents", []):
                key = obj["Key"]
                name = key[len(prefix) :]
                if name and not key.endswith("/"):  # "folder" markers hold nothing
                    objects.append((name, key, _etag(obj["ETag"]), int(obj["Size"])))
        return _Listing("prefix", bucket, objects, region)

    def _region(self, answer: Any) -> str | None:
        """The bucket's region, which a presigned URL of AWS itself must name."""
        if not self._aws:
            return None
        headers = answer.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region")
        return str(region) if region else None


def _etag(value: str) -> str:
    return value.strip('"')
