"""Saving figures: interactive HTML always, static PNG through kaleido with a local browser.

The HTML is deterministic: its plot ``<div>`` gets a fixed id (the file's stem) instead of
plotly's random one, so equal figures give byte-equal files.

Kaleido renders with a Chromium it finds on the machine (``BROWSER_PATH`` or ``chromium`` on
``PATH``; ``make install`` installs Debian's package). Nothing is downloaded: with no browser,
the PNG is skipped with a warning naming the fix, and the HTML is still written.

Why PNG export goes through :class:`PngExporter` and not ``fig.write_image``: plotly's
``write_image`` starts a fresh Chromium for every figure (kaleido's "oneshot" mode, ~4 s each on
our CI box), and kaleido takes the first ``Runtime.executionContextCreated`` and
``Page.loadEventFired`` events it sees after opening its tab (it enables ``Runtime`` only after
``Page.navigate``). In a browser that has just started, those events can still belong to the
initial ``about:blank`` document, so the first render may run before ``kaleido_scopes.js`` has
loaded: ``JavascriptError: kaleido_scopes is not defined`` (seen in ``make figures``, gone on a
rerun). Here one Chromium per process is opened once and reused (after each render kaleido
reloads its tab with the events subscribed *before* the reload, so later renders are not
exposed), and a failed render is retried on a fresh Chromium, a bounded number of times, each
retry logged. The PNG bytes do not depend on which session drew them (same Chromium, same
plotly.js, MathJax off: nothing is fetched). The file is written whole (temp file + rename), so
a crash never leaves a truncated PNG.

Example
-------
>>> save_figure(fig, "figures/heads")        # -> figures/heads.html, figures/heads.png   # doctest: +SKIP
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

from ..data.outputs import write_bytes_atomic

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: attempts per PNG (the first try and the retries), each on a fresh Chromium after a failure
PNG_ATTEMPTS = 3
#: seconds to wait for Chromium to start, and for one figure to render
OPEN_TIMEOUT_S = 120.0
RENDER_TIMEOUT_S = 180.0

logger = logging.getLogger(__name__)


def find_browser() -> str | None:
    """Path of a local Chromium/Chrome, or None."""
    if os.environ.get("BROWSER_PATH"):
        return os.environ["BROWSER_PATH"]
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


class PngExporter:
    """One kaleido/Chromium session rendering figures to PNG bytes, reused across figures.

    The session runs its own asyncio loop in a daemon thread (so it works from notebooks, whose
    loop is already running) and is opened on the first :meth:`render`. :meth:`render` retries a
    failed render up to ``attempts`` times in all, each time on a freshly started Chromium, and
    logs every retry (logger ``lens_halluc.figures.io``, level WARNING).

    ``browser``: Chromium/Chrome executable; ``attempts`` ≥ 1; timeouts in seconds.

    Example
    -------
    >>> exporter = PngExporter("/usr/bin/chromium")                                    # doctest: +SKIP
    >>> png = exporter.render(fig, width=900, height=600, scale=2)   # bytes             # doctest: +SKIP
    >>> exporter.close()                                                               # doctest: +SKIP
    """

    def __init__(self, browser: str, attempts: int = PNG_ATTEMPTS, open_timeout: float = OPEN_TIMEOUT_S,
                 render_timeout: float = RENDER_TIMEOUT_S):
        if int(attempts) < 1:
            raise ValueError(f"attempts={attempts!r}: need at least 1.")
        self.browser = str(browser)
        self.attempts = int(attempts)
        self.open_timeout = float(open_timeout)
        self.render_timeout = float(render_timeout)
        self.restarts_ = 0  # fresh Chromiums started after a failure (diagnostics, tests)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._kaleido = None

    # -- session -------------------------------------------------------------------------
    def _run(self, coro, timeout: float):
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except BaseException:
            fut.cancel()
            raise

    def _start_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lens_halluc-kaleido", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        import kaleido

        self._start_loop()

        async def start():
            # MathJax off: its default is a CDN script (we are offline, and no figure of ours uses LaTeX)
            k = kaleido.Kaleido(n=1, mathjax=False, timeout=self.render_timeout, path=self.browser)
            await k.open()
            return k

        self._kaleido = self._run(start(), self.open_timeout)

    def close(self) -> None:
        """Close the Chromium and the loop thread (best effort; a later :meth:`render` reopens)."""
        if self._loop is None:
            return
        try:
            if self._kaleido is not None:
                self._run(self._kaleido.close(), 30)
        except Exception as e:  # a broken browser must not block the restart
            logger.debug("closing kaleido failed: %r", e)
        finally:
            self._kaleido = None
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = self._thread = None

    # -- rendering -----------------------------------------------------------------------
    def render(self, fig, width: int = 900, height: int = 600, scale: float = 2, name: str = "figure") -> bytes:
        """PNG bytes of ``fig`` (a plotly figure or its dict); ``name`` only labels log lines and errors.

        Raises RuntimeError naming ``name`` after ``attempts`` failures.
        """
        spec = fig.to_dict() if hasattr(fig, "to_dict") else dict(fig)
        opts = {"format": "png", "width": int(width), "height": int(height), "scale": scale}
        with self._lock:
            last: BaseException | None = None
            for attempt in range(1, self.attempts + 1):
                try:
                    if self._kaleido is None:
                        self._open()
                    png = self._run(self._kaleido.calc_fig(spec, opts=opts), self.render_timeout + 30)
                    if not isinstance(png, (bytes, bytearray)) or not bytes(png).startswith(PNG_MAGIC):
                        raise RuntimeError(f"kaleido returned no PNG ({type(png).__name__}, {len(png or b'')} bytes)")
                    return bytes(png)
                except Exception as e:  # kaleido raises JavascriptError, KaleidoError, RuntimeError, TimeoutError
                    last = e
                    self.close()
                    if attempt < self.attempts:
                        self.restarts_ += 1
                        logger.warning("PNG export of %s failed (attempt %d of %d: %s: %s); retrying on a fresh "
                                       "Chromium.", name, attempt, self.attempts, type(e).__name__, e)
            raise RuntimeError(
                f"{name}: PNG export failed {self.attempts} times (last error {type(last).__name__}: {last}). "
                f"Browser: {self.browser}. Check that it starts (`{self.browser} --headless --version`), "
                "or skip PNGs with png=False (the HTML figure is written either way).") from last


_EXPORTER: PngExporter | None = None
_EXPORTER_PID: int | None = None


def png_exporter(browser: str) -> PngExporter:
    """The process's shared :class:`PngExporter` for ``browser`` (a new one after a fork or another browser).

    Example
    -------
    >>> png_exporter("/usr/bin/chromium").render(fig)                                  # doctest: +SKIP
    """
    global _EXPORTER, _EXPORTER_PID
    if _EXPORTER is None or _EXPORTER_PID != os.getpid() or _EXPORTER.browser != str(browser):
        if _EXPORTER is not None and _EXPORTER_PID == os.getpid():
            _EXPORTER.close()
        _EXPORTER, _EXPORTER_PID = PngExporter(browser), os.getpid()
    return _EXPORTER


@atexit.register
def _close_exporter() -> None:
    if _EXPORTER is not None and _EXPORTER_PID == os.getpid():
        _EXPORTER.close()


def save_figure(fig, stem: str | Path, png: bool = True, width: int = 900, height: int = 600,
                div_id: str | None = None) -> list[Path]:
    """Write ``stem.html`` (plotly.min.js written once beside it) and, when a browser is available, ``stem.png``.

    ``div_id``: id of the plot's ``<div>`` in the HTML (default: the stem's name), fixed so that
    the file does not change between runs. The PNG (``width`` × ``height`` at scale 2) is drawn by
    the process's shared :class:`PngExporter` (retried on failure). Returns the paths written.

    Example
    -------
    >>> save_figure(fig, "figures/heads")        # -> [heads.html, heads.png]              # doctest: +SKIP
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
        data = png_exporter(browser).render(fig, width=width, height=height, scale=2, name=str(stem.with_suffix(".png")))
        write_bytes_atomic(stem.with_suffix(".png"), data)
        written.append(stem.with_suffix(".png"))
    return written
