"""Renders an SVG file to PNG with headless chromium, as a person's browser would show it.

``python -m tests.browser TIMELINE.svg OUT.png`` renders one by hand (the README's picture).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)


def chromium() -> str | None:
    return shutil.which("chromium")


def render_png(svg: Path, png: Path) -> None:
    """Screenshot ``svg`` at its own width and height into ``png``."""
    head = svg.read_text(encoding="utf-8")[:400]
    size = re.search(r'width="([\d.]+)" height="([\d.]+)"', head)
    assert size is not None, "the SVG names no width and height"
    width, height = (round(float(n)) for n in size.groups())
    browser = chromium()
    assert browser is not None, "no chromium on PATH: run scripts/ensure-chromium"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                # headless chromium paints only part of a short window: a taller one,
                # cropped below
                f"--window-size={width},{height + 400}",
                f"--screenshot={png.resolve()}",
                svg.resolve().as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    with Image.open(png) as shot:
        shot.crop((0, 0, width, height)).save(png)


if __name__ == "__main__":
    render_png(Path(sys.argv[1]), Path(sys.argv[2]))
