"""Datasets on the instance: S3 objects fetched through presigned URLs into a cache.

Standard library only. A dataset spec comes from the local side (``data.py``) in a ``run``
frame: ``{"source": "s3://...", "kind": "object"|"prefix", "objects": [[name, url, etag,
size], ...]}``. :func:`fetch` gives the local path of the dataset: the object's file, or
the folder holding a prefix's objects under their names below the prefix.

The cache is a folder on the instance (the worker's is ``<workspace>/.gpucloud/data``,
which outlives the session and is visible inside a container). An entry is named after a
hash of the source and of each object's name and ETag: a changed object makes a new entry,
an unchanged dataset is found again by later tests and later sessions. An entry is built
under a temporary name and renamed when whole, so it is complete or absent.

Also runs as ``python3 -I -S -c <source> CACHE_DIR`` with a spec as JSON on stdin; it prints
``{"path", "cached", "bytes"}``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_CHUNK = 1 << 20
_PARALLEL = 8
_TIMEOUT_S = 60


class DataError(Exception):
    """A dataset could not be fetched; the message names the object and the cause."""


def entry_name(spec: dict[str, Any]) -> str:
    """The cache entry of ``spec``: its source, and each object's name and ETag."""
    objects = sorted([name, etag] for name, _, etag, _ in spec["objects"])
    key = json.dumps([spec["source"], spec["kind"], objects]).encode()
    return hashlib.sha256(key).hexdigest()[:32]


def fetch(spec: dict[str, Any], cache: str) -> tuple[str, bool, int]:
    """``(path, from the cache, bytes downloaded)`` of the dataset ``spec``."""
    entry = os.path.join(cache, entry_name(spec))
    objects = spec["objects"]
    path = os.path.join(entry, objects[0][0]) if spec["kind"] == "object" else entry
    if os.path.isdir(entry):
        return path, True, 0
    os.makedirs(cache, exist_ok=True)
    building = f"{entry}.{os.getpid()}.part"
    shutil.rmtree(building, ignore_errors=True)
    try:
        if spec["kind"] == "object":
            total = _download(spec["source"], objects[0], building)
        else:
            from concurrent.futures import ThreadPoolExecutor

            prefix = spec["source"].rstrip("/") + "/"
            with ThreadPoolExecutor(_PARALLEL) as pool:
                done = pool.map(lambda obj: _download(prefix + obj[0], obj, building), objects)
                total = sum(done)
        try:
            os.rename(building, entry)
        except OSError:  # another process finished the same entry first
            if not os.path.isdir(entry):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return path, False, total


def _download(what: str, obj: list[Any], folder: str) -> int:
    """Download one object (``what``: its s3:// URL, for messages) into ``folder``."""
    name, url, etag, size = obj
    parts = name.split("/")
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise DataError(f"{what}: refused a name that leaves the dataset's folder")
    target = os.path.join(folder, *parts)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as answer:
            got = answer.headers.get("ETag", "").strip('"')
            if got and got != etag:
                raise DataError(f"{what}: it changed since this session looked (ETag {got})")
            written = 0
            with open(target, "wb") as out:
                while chunk := answer.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
    except urllib.error.HTTPError as exc:
        hint = " (the presigned URL expired or was refused)" if exc.code == 403 else ""
        raise DataError(f"{what}: HTTP {exc.code} {exc.reason}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"{what}: download failed: {reason}") from None
    if written != size:
        raise DataError(f"{what}: got {written} bytes of {size}")
    return written


def main(argv: list[str]) -> int:
    try:
        path, cached, total = fetch(json.load(sys.stdin), argv[0])
    except DataError as exc:
        sys.stderr.write(f"gpucloud datacache: {exc}\n")
        return 1
    sys.stdout.write(json.dumps({"path": path, "cached": cached, "bytes": total}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
