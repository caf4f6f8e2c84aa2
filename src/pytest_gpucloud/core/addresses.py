"""The grammars of the addresses users write: ``s3://bucket/key`` URLs and ``--gpu-hosts``
entries. Each parser raises ValueError naming what is wrong."""

from __future__ import annotations

import re
from dataclasses import dataclass

_URL = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", re.DOTALL)
URL_FORM = "an s3://bucket/prefix URL"
HOSTS_FORMAT = "user@host[:port]=TYPE[:COUNT]"
_HOST = re.compile(
    r"(?P<user>[A-Za-z0-9._-]+)@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?"
    r"=(?P<gpu>[A-Za-z0-9][A-Za-z0-9._-]{0,31})(?::(?P<count>\d{1,2}))?"
)


def split_url(url: str) -> tuple[str, str]:
    """``(bucket, key)`` of ``s3://bucket/key``; the key may be empty. ValueError if not one."""
    match = _URL.fullmatch(url)
    if match is None:
        raise ValueError(f"must be {URL_FORM} (a bucket name of 3-63 lowercase letters, digits)")
    return match.group(1), match.group(2) or ""


@dataclass(frozen=True)
class StaticHost:
    """One entry of ``--gpu-hosts``."""

    user: str
    host: str
    port: int
    gpu: str
    count: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:{self.port}"

    @property
    def instance_id(self) -> str:
        return "ssh-" + re.sub(r"[^A-Za-z0-9.-]+", "-", f"{self.host}-{self.port}").strip("-")


def parse_hosts(text: str) -> list[StaticHost]:
    """``--gpu-hosts``; a bad entry raises ValueError naming it."""
    hosts: list[StaticHost] = []
    for entry in (e.strip() for e in text.split(",")):
        match = _HOST.fullmatch(entry)
        if match is None:
            raise ValueError(f"{entry!r} is not {HOSTS_FORMAT}")
        port = int(match["port"] or 22)
        count = int(match["count"] or 1)
        if not 1 <= port <= 65535 or count < 1:
            raise ValueError(f"{entry!r}: port 1-65535 and a GPU count of at least 1")
        host = StaticHost(match["user"], match["host"].strip("[]"), port, match["gpu"], count)
        if any(h.instance_id == host.instance_id for h in hosts):
            raise ValueError(f"{host.address} is named twice")
        hosts.append(host)
    return hosts
