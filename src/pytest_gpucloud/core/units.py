"""Parsing of durations ("90s", "5m", "1h30m", 300) and sizes ("24GB", "500MB"); amounts
for people."""

from __future__ import annotations

import functools
import math
import re

_DURATION = re.compile(
    r"(?:([0-9]+(?:\.[0-9]+)?)h)?(?:([0-9]+(?:\.[0-9]+)?)m)?(?:([0-9]+(?:\.[0-9]+)?)s)?"
)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a plain number of seconds, or h/m/s parts such as ``1h30m``."""
    text = text.strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    seconds = hms_seconds(text)
    if seconds is None:
        raise ValueError(f"{text!r} is not a duration")
    return seconds


@functools.lru_cache(maxsize=1024)
def hms_seconds(text: str) -> float | None:
    """Seconds in h/m/s parts such as ``90s`` or ``1h30m`` (None: not such a duration)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or not any(match.groups()):
        return None
    parts = zip(match.groups(), (3600, 60, 1), strict=True)
    return sum(float(number) * unit for number, unit in parts if number)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?b?")


def parse_size(text: str) -> int:
    """Bytes in ``text``: a plain number of bytes, or ``500MB``, ``2GB``, ``1.5GiB`` (kB, MB,
    GB, TB are powers of 1000; KiB, MiB, GiB, TiB of 1024)."""
    match = _SIZE.fullmatch(text.strip().lower())
    if match is None:
        raise ValueError(f"{text!r} is not a size")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def format_size(size: float) -> str:
    """``size`` bytes for people: ``512 B``, ``20.0 MB``, ``1.5 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def format_dollars(amount: float) -> str:
    """US dollars with the digits that tell small amounts apart: ``$1.2500``, ``$0.0042``,
    ``$0.000736`` (four decimals, or three significant digits below a tenth of a cent)."""
    if amount == 0 or abs(amount) >= 0.001:
        return f"${amount:.4f}"
    decimals = 2 - math.floor(math.log10(abs(amount)))
    return f"${amount:.{decimals}f}"
