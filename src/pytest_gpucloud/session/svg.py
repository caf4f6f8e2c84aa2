"""A small SVG writer: rectangles, lines and text, escaped, and nothing more."""

from __future__ import annotations

from xml.sax.saxutils import escape, quoteattr


class Svg:
    """An SVG document built element by element; attribute names use ``_`` for ``-``."""

    def __init__(self, width: float, height: float) -> None:
        self.width = width
        self.height = height
        self._parts: list[str] = []

    def rect(
        self,
        x: float,
        y: float,
        width: float,
        height: float,
        *,
        title: str | None = None,
        **attrs: object,
    ) -> None:
        attrs = {"x": x, "y": y, "width": width, "height": height, **attrs}
        if title is None:
            self._parts.append(f"<rect{_attrs(attrs)}/>")
        else:
            self._parts.append(f"<rect{_attrs(attrs)}><title>{escape(title)}</title></rect>")

    def line(self, x1: float, y1: float, x2: float, y2: float, **attrs: object) -> None:
        self._parts.append(f"<line{_attrs({'x1': x1, 'y1': y1, 'x2': x2, 'y2': y2, **attrs})}/>")

    def text(self, x: float, y: float, content: str, **attrs: object) -> None:
        self._parts.append(f"<text{_attrs({'x': x, 'y': y, **attrs})}>{escape(content)}</text>")

    def open_group(self, **attrs: object) -> None:
        self._parts.append(f"<g{_attrs(attrs)}>")

    def close_group(self) -> None:
        self._parts.append("</g>")

    def render(self) -> str:
        head = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_num(self.width)}" '
            f'height="{_num(self.height)}" viewBox="0 0 {_num(self.width)} {_num(self.height)}" '
            'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="11">'
        )
        return "\n".join([head, *self._parts, "</svg>"]) + "\n"


def _attrs(attrs: dict[str, object]) -> str:
    return "".join(f" {name.replace('_', '-')}={_value(value)}" for name, value in attrs.items())


def _value(value: object) -> str:
    return quoteattr(_num(value) if isinstance(value, float) else str(value))


def _num(value: float) -> str:
    """Two decimals at most, no trailing zeros: short files at 5,000 rectangles."""
    return f"{value:.2f}".rstrip("0").rstrip(".")
