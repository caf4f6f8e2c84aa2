"""Markdown pieces for tables that GitHub renders: code spans and cells."""

from __future__ import annotations


def code(text: str) -> str:
    fence = "``" if "`" in text else "`"
    return f"{fence}{cell(text)}{fence}"


def cell(text: str) -> str:
    """Text that stays in its table cell (GitHub splits cells at ``|``, even in code)."""
    return " ".join(text.split()).replace("|", "\\|")
