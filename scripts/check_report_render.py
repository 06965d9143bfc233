"""Render a report.html in headless Chromium and save a screenshot, to see the report the way a reader will.

Usage: python scripts/check_report_render.py PATH/report.html OUT.png

Exit status: 0 rendered and not blank; 1 the render failed or came out blank; 2 no Chromium/Chrome on PATH
(install one, e.g. ``apt-get install -y chromium`` on Debian). A blank (single-colour) screenshot usually means the
page failed to load, so it counts as a failure rather than a pass.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = "1280,2000"
TIMEOUT_S = 120


def find_browser() -> str | None:
    return next((found for name in BROWSERS if (found := shutil.which(name))), None)


def screenshot(browser: str, page: Path, out: Path) -> subprocess.CompletedProcess:
    """One headless screenshot; --no-sandbox because CI containers run as root, where the sandbox refuses to start."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={out}",
        f"--window-size={WINDOW}",
        page.resolve().as_uri(),
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


def distinct_colours(path: Path) -> int:
    """Number of colours in the image (capped), enough to tell a blank page from a rendered one."""
    with Image.open(path) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    return len(colours) if colours is not None else 1 << 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="report.html to render")
    parser.add_argument("out", type=Path, help="where to save the PNG screenshot")
    args = parser.parse_args(argv)
    if not args.html.is_file():
        print(f"error: {args.html} does not exist", file=sys.stderr)
        return 1
    browser = find_browser()
    if browser is None:
        print(f"no headless browser found: install one of {', '.join(BROWSERS)} to check rendering", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)  # a stale screenshot must not pass for a fresh one
    result = screenshot(browser, args.html, args.out)
    if not args.out.is_file():
        print(
            f"error: {browser} wrote no screenshot (exit {result.returncode}):\n{result.stderr[-2000:]}",
            file=sys.stderr,
        )
        return 1
    colours = distinct_colours(args.out)
    if colours <= 1:
        print(f"error: {args.out} is blank (one colour): the page did not render", file=sys.stderr)
        return 1
    with Image.open(args.out) as image:
        print(f"rendered {args.html} with {browser} -> {args.out} ({image.width}x{image.height}, {colours} colours)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
