"""Saving figures: interactive HTML always, static PNG through kaleido with a local browser.

The HTML is deterministic: its plot ``<div>`` gets a fixed id (the file's stem) instead of
plotly's random one, so equal figures give byte-equal files.

Kaleido renders with a Chromium it finds on the machine (``BROWSER_PATH`` or ``chromium`` on
``PATH``; ``make install`` installs Debian's package). Nothing is downloaded: with no browser,
the PNG is skipped with a warning naming the fix, and the HTML is still written.

Example
-------
>>> save_figure(fig, "figures/heads")        # -> figures/heads.html, figures/heads.png   # doctest: +SKIP
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    """Path of a local Chromium/Chrome, or None."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def save_figure(fig, stem: str | Path, png: bool = True, width: int = 900, height: int = 600,
                div_id: str | None = None) -> list[Path]:
    """Write ``stem.html`` (plotly.min.js written once beside it) and, when a browser is available, ``stem.png``.

    ``div_id``: id of the plot's ``<div>`` in the HTML (default: the stem's name), fixed so that
    the file does not change between runs. Returns the paths written.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = [stem.with_suffix(".html")]
    # one shared plotly.min.js beside the HTML files (offline, and small figures)
    fig.write_html(written[0], include_plotlyjs="directory", full_html=True, div_id=div_id or stem.name)
    if png:
        browser = find_browser()
        if browser is None:
            warnings.warn(f"no Chromium found: {stem}.png not written. Install one (`apt-get install chromium`, "
                          "done by `make install`) or set BROWSER_PATH.", stacklevel=2)
            return written
        os.environ.setdefault("BROWSER_PATH", browser)
        fig.write_image(stem.with_suffix(".png"), width=width, height=height, scale=2)
        written.append(stem.with_suffix(".png"))
    return written
