"""Frames between the local side and the remote worker: one JSON object per line.

Local -> remote:
  start     {"args": [...]}                      pytest arguments; sent once, first
  run       {"nodeid": str, "nextid": str|None}  run one collected test
  shutdown  {}                                   finish the session and exit

Remote -> local:
  hello     {"python", "pytest", "protocol", "rootdir"}   first frame, before pytest starts
  collectreport {"report": dict}                 a failed remote collection
  collected {"count": int}                       collection finished
  warning   {"message", "category", "nodeid", "when", "filename", "lineno"}
  report    {"report": dict}                     pytest_report_to_serializable of a TestReport
  done      {"nodeid": str}                      the last report of that test was sent
  crashed   {"message": str}                     the worker hit an internal error and exits
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1

Message = dict[str, Any]


def encode(kind: str, **fields: Any) -> bytes:
    fields["type"] = kind
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def decode(line: bytes) -> Message:
    message = json.loads(line)
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ValueError(f"not a protocol frame: {line[:200]!r}")
    return message
