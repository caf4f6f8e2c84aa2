"""Text that an instance or a cloud wrote, made safe for this machine's terminal.

An API's error message, a region name or the tail of a remote stderr may hold escape
sequences (ESC, OSC, BEL...) that would move the cursor, retitle the window, rewrite what
was printed before or hide text. :func:`visible` shows every control character as an
escape (``\\x1b``) instead; tabs stay, and newlines unless ``one_line``.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the bidirectional overrides that reorder what is shown.
_CONTROLS = "\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{_CONTROLS}]")
_CONTROL_OR_NEWLINE = re.compile(f"[{_CONTROLS}\n]")


def visible(text: str, *, one_line: bool = False) -> str:
    """``text`` with its control characters written as Python escapes."""
    pattern = _CONTROL_OR_NEWLINE if one_line else _CONTROL
    return pattern.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
